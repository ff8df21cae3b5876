"""The relay intents (TRIP, CLOSE_ALLOWED, DIRECT_CLOSE, GUARANTEE, GUARANTEE_RELEASE) are
the gateway's own words, in protocols/exchange.py, whatever the meter speaks: DL/T 645 maps
them to its 0x1C frame's N1 codes, the DL/T 698.45 driver to ACTIONs on 8000/8001, and the
control core knows no protocol's codes. The ledger keeps their names, so a command a
gateway had sent before an upgrade (or a crash) is still concluded by the name it stored."""

import ast
import glob
import os
import time

import pytest

from gateway.control import relay
from gateway.line import dlt698 as drv698
from gateway.store import paths
from gateway.store.state import StateStore
from gwharness import Harness
from protocols import dlt645
from protocols.exchange import RelayIntent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_control_core_speaks_no_protocols_relay_codes():
    for path in glob.glob(os.path.join(ROOT, "gateway", "control", "*.py")):
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + ["%s.%s" % (node.module, a.name)
                                                for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith("protocols.dlt645") or n == "protocols.dlt698"
                           for n in names), (path, names)
    rc = relay.command_for("restore", {"mode": "direct"}, "close_allowed")
    assert rc is RelayIntent.DIRECT_CLOSE and not isinstance(rc, int)


def test_each_intent_has_its_dlt645_code_and_its_dlt698_action():
    assert {i.name: int(c) for i, c in dlt645.RELAY_CODES.items()} == {
        "TRIP": 0x1A, "CLOSE_ALLOWED": 0x1B, "DIRECT_CLOSE": 0x1C, "GUARANTEE": 0x3A,
        "GUARANTEE_RELEASE": 0x3B}
    assert set(drv698._PLAIN_ACTIONS) == {i.name for i in RelayIntent}
    # the names are what the ledger stores: they never change
    assert [i.name for i in RelayIntent] == [i.value for i in RelayIntent] == [
        "TRIP", "CLOSE_ALLOWED", "DIRECT_CLOSE", "GUARANTEE", "GUARANTEE_RELEASE"]


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def test_ledger_entries_written_before_the_move_still_resume(harness):
    """Ledger documents as the gateway wrote them with DL/T 645's RelayCommand names (and
    one from before relay_command was stored): each is concluded from the meter's state by
    the name it carries, never sent again."""
    h = harness
    h.start()
    h.stop()
    now = time.time()
    old = {"params": {}, "source": "remote", "received_at": now - 5, "response_topic": None,
           "correlation": None, "state": "sent", "sent_at": now - 4}
    docs = {"c-trip": dict(old, meter="m1", action="cut_off", relay_command="TRIP"),
            "c-guarantee": dict(old, meter="m2", action="guarantee_on",
                                relay_command="GUARANTEE"),
            "c-close": dict(old, meter="m3", action="restore",
                            relay_command="CLOSE_ALLOWED"),
            "c-oldest": dict(old, meter="m4", action="cut_off")}
    store = StateStore(paths.path(h.cfg.gateway.data_dir, paths.STATE))
    for cid, doc in docs.items():
        store.put("commands", cid, doc)
    store.close()
    m1, m2, m3, m4 = h.sim_meters
    m1.relay_open = m1.relay_command_trip = True       # the trip had reached the meter
    m2.guarantee = True
    m4.relay_open = m4.relay_command_trip = True
    h.start()
    results = {cid: h.wait_result(cid) for cid in docs}
    for cid, r in results.items():
        assert (r["status"], r["reason"]) == ("done", "completed before a restart"), (cid, r)
    assert results["c-trip"]["relay"] == "open" and results["c-guarantee"]["guarantee"]
    assert results["c-close"]["relay"] == "closed"
    assert h.relay_moves() == []                          # concluded by reading only
