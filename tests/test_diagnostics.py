"""The head-end's diagnostic commands on a polling gateway: scan, trace, audit_verify and logs
answered within their bounds, while relay commands queued behind them run first."""

import datetime as dt
import time

import pytest

from gateway.control import diagnostics
from gwharness import Harness


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path, meters=3).start()
    yield harness
    harness.close()


def _seq_of(h, cmd_id, status="done"):
    rows = h.gw.journal.read("test", "results", limit=100000, after=0)
    return next(r.seq for r in rows if r.body.get("id") == cmd_id
                and r.body["status"] == status)


def test_diagnostics_are_answered_within_bounds_and_relay_commands_behind_them_run_first(h):
    h.gw.journal.register("test", "results")
    trace = h.command("*", "trace", {"port": "p1", "seconds": 3})
    scan = h.command("*", "scan", {"port": "p1", "protocol": "dlt645", "max_s": 120})
    audit = h.command("*", "audit_verify")
    logs = h.command("*", "logs", {"lines": 20})
    cut1 = h.command("m1", "cut_off")
    t0 = time.monotonic()
    for c in (trace, scan, audit, logs, cut1):
        h.send(c)
    # the cut-off behind four diagnostics: done while the trace is still listening
    assert h.wait_result(cut1["id"])["status"] == "done"
    assert time.monotonic() - t0 < 3
    tr = h.wait_result(trace["id"], timeout=10)
    assert tr["status"] == "done" and tr["port"] == "p1" and tr["seconds"] == 3
    # a cut-off sent while the scan holds the line runs between its probes
    cut2 = h.command("m2", "cut_off")
    h.send(cut2)
    assert h.wait_result(cut2["id"], timeout=10)["status"] == "done"
    sc = h.wait_result(scan["id"], timeout=150)
    assert _seq_of(h, cut1["id"]) < _seq_of(h, trace["id"])
    assert _seq_of(h, cut2["id"]) < _seq_of(h, scan["id"])

    # the trace: time-stamped hex of both directions, the relay frame's secrets masked
    assert tr["frames"] and {f["dir"] for f in tr["frames"]} == {"tx", "rx"}
    for f in tr["frames"]:
        assert dt.datetime.fromisoformat(f["t"]).tzinfo is not None
    relay_tx = [f["hex"] for f in tr["frames"] if f["dir"] == "tx" and "*" in f["hex"]]
    assert relay_tx and all("*" * 16 in x for x in relay_tx)
    # the scan: what `mgw scan --json` prints, every meter found, each named as configured
    assert sc["status"] == "done" and sc["complete"] is True
    assert sc["port"] == "p1" and sc["protocol"] == "dlt645"
    assert sorted((f["address"], f["configured_as"]) for f in sc["found"]) == [
        (m.address, "m%d" % (i + 1)) for i, m in enumerate(h.sim_meters)]
    assert all(f["baudrate"] == 115200 for f in sc["found"])
    assert sc["answered_at"] == ["115200 8E1 (3)"]            # as `mgw scan --json` says it
    assert h.wait_result(audit["id"])["whole"] is True
    assert isinstance(h.wait_result(logs["id"])["lines"], list)   # (no log handler here)
    assert len(h.relay_moves()) == 2
    # the line went on polling afterwards: every meter still online
    assert all(hl.online for hl in h.gw.pollers["p1"].health.values())


def test_diagnostic_params_are_checked_and_a_full_queue_is_refused(h):
    bad = [h.command("*", "scan", {"port": "nope"}),
           h.command("*", "scan", {"port": "p1", "protocol": "x"}),
           h.command("*", "scan", {"port": "p1", "baudrate": 1234}),
           h.command("*", "trace", {"port": "p1", "seconds": 3600})]
    for c in bad:
        h.send(c)
    reasons = [h.wait_result(c["id"]) for c in bad]
    assert [r["code"] for r in reasons] == ["bad_params"] * 4
    assert "params.port" in reasons[0]["reason"]
    assert "params.seconds" in reasons[3]["reason"]
    # one running and QUEUE_MAX waiting: the next is refused at once, not queued
    traces = [h.command("*", "trace", {"port": "p1", "seconds": 1})
              for _ in range(diagnostics.QUEUE_MAX + 2)]
    for c in traces:
        h.send(c)
    out = [h.wait_result(c["id"], timeout=30) for c in traces]
    busy = [r for r in out if r["status"] != "done"]
    assert busy and all(r["status"] == "failed" and r["code"] == "busy" for r in busy)
    assert len(out) - len(busy) >= diagnostics.QUEUE_MAX       # as many as may wait ran
    assert out[-1] in busy


def test_a_scan_stops_at_its_time_limit_and_says_so(h):
    scan = h.command("*", "scan", {"port": "p1", "max_s": 1})
    h.send(scan)
    r = h.wait_result(scan["id"], timeout=40)
    assert r["status"] == "done" and r["complete"] is False


def test_trace_keeps_at_most_its_bound_and_counts_the_rest():
    tap = diagnostics.Trace(max_chars=40)
    for i in range(10):
        tap("tx", bytes([0x68] * 8))
        time.sleep(0.06)
    frames = tap.frames()
    assert sum(len(f["hex"]) for f in frames) <= 40
    assert tap.dropped == 10 - len(frames) and tap.dropped > 0


def test_a_relay_request_of_another_master_is_masked_in_received_bytes():
    import datetime as _dt
    from protocols import dlt645
    frame = dlt645.relay_control("000000000001", dlt645.RelayCommand.TRIP, password_level=2,
                                 password="123456", operator_code="87654321",
                                 valid_until=_dt.datetime(2030, 1, 1))
    tap = diagnostics.Trace()
    tap("rx", b"\x00\x01" + frame)
    text = tap.frames()[0]["hex"]
    assert "*" * 16 in text and text.startswith("0001")
    assert frame.hex()[20:36] not in text
