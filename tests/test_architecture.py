"""The architecture as a test: import-linter's contracts (.importlinter) and no import
cycle between gateway's modules, so a wrong arrow fails CI."""

import os
import subprocess
import sys

import grimp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    r = subprocess.run([lint, "--config", os.path.join(ROOT, ".importlinter")], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_no_import_cycle_in_gateway():
    graph = grimp.build_graph("gateway")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("gateway") and graph.chain_exists(importer=imported,
                                                                     imported=module):
                cycles.append((module, imported))
    assert cycles == [], cycles


OWN_SIMULATORS = {os.path.join(*entry.simulator.split(".")) + ".py"
                  for entry in __import__("gateway.registry", fromlist=["PROTOCOLS"])
                  .PROTOCOLS.values()}


def test_protocol_names_appear_only_in_the_configuration_registry():
    """Adding a protocol is a codec module and a registry entry: nothing else in gateway/
    branches on a protocol's name."""
    from gateway.registry import NAMES
    hits = []
    for folder, _, files in os.walk(os.path.join(ROOT, "gateway")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)
            # the registry, each protocol's own simulator (its meters say what they speak)
            # and the demo's sample configuration; not the simulators' common code
            if rel == os.path.join("gateway", "registry.py") or rel in OWN_SIMULATORS or \
                    rel == os.path.join("gateway", "sim", "demo.py"):
                continue
            for n, line in enumerate(open(path, encoding="utf-8"), 1):
                if any('"%s"' % proto in line for proto in NAMES):
                    hits.append("%s:%d: %s" % (rel, n, line.strip()))
    assert hits == [], "\n".join(hits)


DRIVER_INTERFACE = ("HAS_RELAY", "tasks", "poll", "read_now",
                    "check_quantities", "scan", "quick_probe", "suggested_id", "toml_lines",
                    "key_of")


RELAY_INTERFACE = ("status_exchange", "relay_state", "relay_exchange", "relay_refusal",
                   "relay_params_problem")


def test_every_registered_protocol_has_a_whole_driver():
    """What the line, the CLI and the control core ask of a protocol's driver."""
    import importlib

    from gateway.registry import PROTOCOLS
    for name, module in PROTOCOLS.items():
        driver = importlib.import_module(module.driver)
        missing = [n for n in DRIVER_INTERFACE if not hasattr(driver, n)]
        assert missing == [], (name, missing)
        if driver.HAS_RELAY:               # what control/relay.py asks of it
            missing = [n for n in RELAY_INTERFACE if not hasattr(driver, n)]
            assert missing == [], (name, missing)


def test_time_sync_is_the_meters_own_protocols_or_a_one_line_refusal():
    import pytest
    """sync_time once fell back to a DL/T 645 broadcast for any protocol without its own
    (a Modbus meter got a DL/T 645 frame): the driver decides, or it is refused."""
    import datetime as dt
    from types import SimpleNamespace
    from gateway.line import reads
    from gateway.model import GatewayError
    from protocols import dlt645
    from protocols.framing import Scanner
    when = dt.datetime(2026, 11, 27, 10, 15, 1)
    m645 = SimpleNamespace(id="m1", protocol="dlt645")
    m698 = SimpleNamespace(id="m2", protocol="dlt698")
    assert reads.time_sync_frame(m645, when) == dlt645.broadcast_time_sync(when)
    f698 = reads.time_sync_frame(m698, when)
    assert f698 != dlt645.broadcast_time_sync(when)
    assert len(Scanner("dlt698").feed(f698)) == 1 and not Scanner("dlt645").feed(f698)
    with pytest.raises(GatewayError, match=r"^meter mb1 \(Modbus\) has no clock the "
                                           r"gateway can set$"):
        reads.time_sync_frame(SimpleNamespace(id="mb1", protocol="modbus"), when)
