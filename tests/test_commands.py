"""Remote cut-off and restore: authenticated, at most once, read back, audited."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gateway.store.audit import verify as verify_audit
from gateway.control.signing import generate, load_private_key
from gwharness import Harness


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path).start()
    yield harness
    harness.close()


def test_every_bad_command_is_rejected_with_its_reason_and_code_and_moves_nothing(h, tmp_path):
    other = load_private_key(generate(str(tmp_path / "other"))[0])
    forged = h.command("m1", "cut_off")
    forged["meter"] = "m2"                              # changed after signing
    cases = [
        (h.command("m1", "cut_off", issued_offset_s=-7200, valid_s=900), "expired"),
        (h.command("m1", "cut_off", issued_offset_s=3600), "not yet valid"),
        (h.command("m1", "cut_off", valid_s=7 * 86400), "longer than the allowed"),
        (h.command("m9", "cut_off"), "unknown meter"),
        (h.command("m1", "self_destruct"), "unknown action"),
        (h.command("m1", "topup", {"amount": "5", "txn": "T1"}), "no prepaid account"),
    ]
    ids = []
    for cmd, _ in cases:
        h.send(cmd)
        ids.append(cmd["id"])
    # input that fails authentication: answered without speaking in the claimed id's name
    h.send(forged)
    h.send(h.command("m1", "cut_off", key=other))
    h.send(b"{not json")
    h.send(b"x" * 10000)
    codes = {"expired": "expired", "not yet valid": "not_yet_valid",
             "longer than the allowed": "window_too_long", "unknown meter": "unknown_meter",
             "unknown action": "unknown_action", "no prepaid account": "no_account"}
    for cmd_id, (_, reason) in zip(ids, cases):
        r = h.wait_result(cmd_id)
        assert r["status"] == "rejected" and reason in r["reason"], (reason, r)
        assert r["code"] == codes[reason]
    end = time.time() + 10
    while time.time() < end and len([r for r in h.results() if r["id"] is None]) < 4:
        time.sleep(0.05)
    anon = [r for r in h.results() if r["id"] is None]
    assert sorted(r["code"] for r in anon) == ["bad_signature", "malformed", "oversized",
                                               "unknown_key"]
    assert [r["claimed_id"] for r in anon if r["code"] == "bad_signature"] == [forged["id"]]
    assert not [r for r in h.results(forged["id"])]          # never under the real id
    assert h.relay_moves() == []
    assert all(r["status"] == "rejected" for r in h.results())


def test_cut_off_then_restore_move_the_relay_and_report_the_state_read_back(h):
    cut = h.command("m2", "cut_off")
    h.send(cut)
    r = h.wait_result(cut["id"])
    assert r["status"] == "done" and r["relay"] == "open" and r["meter"] == "m2"
    assert [x["status"] for x in h.results(cut["id"])] == ["accepted", "done"]
    assert h.sim_meters[1].relay_open
    restore = h.command("m2", "restore", {"mode": "direct"})
    h.send(restore)
    r = h.wait_result(restore["id"])
    assert r["status"] == "done" and r["relay"] == "closed"
    assert h.relay_moves() == [("000000000002", "open", "TRIP"),
                               ("000000000002", "closed", "DIRECT_CLOSE")]


def test_the_same_command_twice_is_executed_once_and_its_result_sent_again(h):
    cut = h.command("m1", "cut_off")
    h.send(cut)
    h.wait_result(cut["id"])
    h.send(cut)                                           # QoS 1 redelivery
    end = time.time() + 10
    while time.time() < end and len([r for r in h.results(cut["id"])
                                     if r["status"] == "done"]) < 2:
        time.sleep(0.05)
    done = [r for r in h.results(cut["id"]) if r["status"] == "done"]
    assert len(done) == 2 and done[0]["relay"] == done[1]["relay"] == "open"
    assert len(h.relay_moves()) == 1
    other = dict(h.command("m1", "restore"), id=cut["id"])      # same id, other command
    from gateway.control.signing import sign
    h.send(sign(other, h.key))
    end = time.time() + 10
    while time.time() < end and not [r for r in h.results(cut["id"])
                                      if r["status"] == "rejected"]:
        time.sleep(0.05)
    assert "replayed id" in [r for r in h.results(cut["id"])
                             if r["status"] == "rejected"][0]["reason"]
    assert len(h.relay_moves()) == 1


def test_a_meter_that_does_not_answer_fails_with_the_reason(h):
    h.sim_meters[2].faults.silent = True
    cut = h.command("m3", "cut_off")
    h.send(cut)
    r = h.wait_result(cut["id"], timeout=30)
    assert r["status"] == "failed" and "no answer" in r["reason"]
    assert h.relay_moves() == []


def test_guarantee_blocks_cut_off_at_the_gateway_and_at_the_meter(h):
    g = h.command("m4", "guarantee_on")
    h.send(g)
    r = h.wait_result(g["id"])
    assert r["status"] == "done" and r["guarantee"] is True
    assert h.sim_meters[3].guarantee
    cut = h.command("m4", "cut_off")
    h.send(cut)
    r = h.wait_result(cut["id"])
    assert r["status"] == "rejected" and "guarantee" in r["reason"]
    off = h.command("m4", "guarantee_off")
    h.send(off)
    assert h.wait_result(off["id"])["guarantee"] is False
    assert h.relay_moves() == []


def test_no_cut_off_while_the_gateway_clock_is_untrusted_but_restore_goes(h):
    h.clock_ok = False
    cut = h.command("m1", "cut_off")
    h.send(cut)
    assert "not synchronised" in h.wait_result(cut["id"])["reason"]
    h.sim_meters[0].relay_open = True
    restore = h.command("m1", "restore", {"mode": "direct"})
    h.send(restore)
    assert h.wait_result(restore["id"])["status"] == "done"


def test_read_and_the_audit_trail(h):
    rd = h.command("m1", "read", {"quantities": ["energy.import.total", "voltage.a"]})
    h.send(rd)
    r = h.wait_result(rd["id"])
    assert r["status"] == "done"
    assert {v["q"] for v in r["values"]} >= {"energy.import.total", "voltage.a"}
    cut = h.command("m1", "cut_off")
    h.send(cut)
    h.wait_result(cut["id"])
    path = os.path.join(h.cfg.gateway.data_dir, "audit.log")
    n, problem = verify_audit(path)
    assert problem is None and n >= 6
    kinds = [json.loads(line)["kind"] for line in open(path)]
    assert "relay.before" in kinds and "relay.frame" in kinds and "relay.after" in kinds
    frames = [json.loads(line) for line in open(path) if '"relay.frame"' in line][0]
    assert frames["frames"][0].startswith("fefefefe68")          # the bytes that were sent
    lines = open(path).read().splitlines()
    tampered = lines[:2] + [lines[2].replace('"n": 3', '"n": 30')] + lines[3:]
    open(path + ".t", "w").write("\n".join(tampered) + "\n")
    assert verify_audit(path + ".t")[1] is not None


CHILD = r"""
import sys, threading
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[2] + "/tests")
import pathlib
from gwharness import Harness
from gateway.service.gateway import serve
"""


@pytest.mark.parametrize("point", ["after_ledger", "after_send"])
def test_sigkill_inside_the_command_path_is_resumed_exactly_once(tmp_path, point):
    """The gateway process dies at `point`; the restarted one finishes the command from
    its ledger: exactly one relay operation at the simulator, one final result."""
    h = Harness(tmp_path)
    h.start()
    cut = h.command("m1", "cut_off")
    h.stop()                                            # a fresh process will take over
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "gw.py"
    script.write_text(_CHILD_GATEWAY % {"root": root, "device": h.line.device,
                                        "data": h.cfg.gateway.data_dir,
                                        "pub": h.key_paths[1]})
    env = dict(os.environ, MGW_FAILPOINT=point)
    child = subprocess.Popen([sys.executable, str(script), json.dumps(cut)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.wait(30)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()[-2000:]
    # restart (no failpoint): the ledger says what happened
    h.start()
    r = h.wait_result(cut["id"], timeout=30)
    time.sleep(0.5)
    finals = [x for x in h.results(cut["id"]) if x["status"] in ("done", "failed")]
    h.close()
    assert r["status"] == "done" and r["relay"] == "open", r
    assert len(h.relay_moves()) == 1
    assert len(finals) == 1


_CHILD_GATEWAY = r'''
import json, sys, threading
sys.path.insert(0, %(root)r)
from gateway.clock import ClockPolicy
from gateway.service.config import validate
from gateway.service.gateway import Gateway, serve
from gateway.uplink.mqtt import Command
doc = {"gateway": {"id": "gw-test", "data_dir": %(data)r, "status_interval_s": 1},
       "ports": [{"name": "p1", "device": %(device)r, "baudrate": 115200, "retries": 1}],
       "meters": [{"id": "m%%d" %% (i + 1), "port": "p1", "address": "%%012d" %% (i + 1),
                   "interval_s": 10, "instant_interval_s": 0, "clock_interval_s": 0}
                  for i in range(4)],
       "control": {"public_keys": [%(pub)r], "require_synced_clock": False},
       "tariffs": {"flat": {"kind": "flat", "price": "0.5000"}}, "accounts": []}
cfg = validate(doc)
gw = Gateway(cfg)
stop = threading.Event()
def started(g):
    g.commands.put(Command(sys.argv[1].encode()))
serve(gw, stop, on_started=started)
'''


def test_secured_meters_get_the_master_stations_payload_unchanged(tmp_path):
    h = Harness(tmp_path, meter_kw={"secured": True}).start()
    try:
        cut = h.command("m1", "cut_off")
        h.send(cut)
        r = h.wait_result(cut["id"])
        assert r["status"] == "rejected" and "secured level" in r["reason"]
        payload = "98" + "00" * 7 + "ab" * 24                  # level 98: ciphertext + MAC
        cut = h.command("m1", "cut_off", {"payload": payload})
        h.send(cut)
        r = h.wait_result(cut["id"])
        # the simulated meter has no ESAM key: it refuses, and nothing moved
        assert r["status"] == "failed" and "meter refused" in r["reason"]
        audit = open(os.path.join(h.cfg.gateway.data_dir, "audit.log")).read()
        sent = [json.loads(line) for line in audit.splitlines() if '"relay.frame"' in line]
        masked = sent[-1]["frames"][0]
        # PA, password and operator code masked in the audit; the rest forwarded unchanged
        head = 2 * (4 + 10)                                      # preamble, 68 A 68 C L
        assert masked[head:head + 2 * 8] == "*" * 16
        tail = bytes.fromhex(masked[head + 16:-4])               # before CS and 16
        assert bytes((b - 0x33) & 0xFF for b in tail).hex() == payload[16:]
        assert h.relay_moves() == []
    finally:
        h.close()


def test_relay_movements_are_events_too(h):
    cut = h.command("m3", "cut_off")
    h.send(cut)
    h.wait_result(cut["id"])
    h.gw.journal.register("t-ev", "events")
    evs = [r.body for r in h.gw.journal.read("t-ev", "events", limit=1000, after=0)
           if r.body["type"].startswith("relay.")]
    assert evs == [{"type": "relay.opened", "meter": "m3", "command": cut["id"],
                    "source": "remote"}]


def test_a_relay_the_meter_moves_itself_is_an_event_and_ours_are_not(tmp_path):
    """Polling reads the status word every second here. A cut-off and a restore of ours are
    relay.opened/closed events only; the meter tripping by itself (its own prepaid logic, a
    technician) and the customer's button after a close-allowed restore are
    meter.relay_changed, once each; a relay found closed after a restart that left it open
    is one too."""
    h = Harness(tmp_path, meters=2, meter_kw={"instant_interval_s": 1},
                sim_kw={"button_required": True}).start()
    try:
        h.gw.journal.register("t-ev", "events")

        def relay_events():
            return [r.body for r in h.gw.journal.read("t-ev", "events", limit=1000, after=0)
                    if r.body["type"].startswith(("relay.", "meter.relay"))]
        wait = lambda f, t=20: _wait(f, t)
        wait(lambda: h.gw.pollers["p1"].health["m1"].relay == "closed")
        cut = h.command("m1", "cut_off")
        h.send(cut)
        assert h.wait_result(cut["id"])["status"] == "done"
        polls = h.gw.pollers["p1"].health["m1"].reads
        wait(lambda: h.gw.pollers["p1"].health["m1"].reads >= polls + 3)
        back = h.command("m1", "restore", {"mode": "close_allowed"})
        h.send(back)
        assert h.wait_result(back["id"])["status"] == "done"
        polls = h.gw.pollers["p1"].health["m1"].reads
        wait(lambda: h.gw.pollers["p1"].health["m1"].reads >= polls + 3)
        # close allowed: still open, the customer's button next
        assert [(e["type"], e.get("awaiting_customer")) for e in relay_events()] == \
            [("relay.opened", None), ("relay.opened", True)]
        assert h.sim_meters[0].awaiting_customer
        h.sim_meters[0].press_button()           # the customer
        h.sim_meters[1].relay_open = True        # m2 trips by itself
        wait(lambda: len(relay_events()) == 4)
        assert sorted((e["meter"], e["relay"], e["previous"]) for e in relay_events()[2:]) == \
            [("m1", "closed", "open"), ("m2", "open", "closed")]
        assert all(e["type"] == "meter.relay_changed" for e in relay_events()[2:])
        time.sleep(2.5)
        assert len(relay_events()) == 4          # once, not at every poll
        h.stop()                                  # stopping saves the meters' state
        h.sim_meters[1].relay_open = False        # closed while the gateway was down
        h.start()
        h.gw.journal.register("t-ev2", "events")
        wait(lambda: [r.body for r in h.gw.journal.read("t-ev2", "events", limit=1000,
                                                         after=0)
                      if r.body["type"] == "meter.relay_changed" and r.body["meter"] == "m2"
                      and r.body["relay"] == "closed" and r.body["previous"] == "open"])
    finally:
        h.close()


def test_a_move_the_meter_made_before_our_command_is_still_reported(tmp_path):
    """The status word is polled once an hour here: the meter trips itself between polls
    and a cut-off comes before the next one. The command's own first read sees the move
    that was not ours and reports it; its read-back after the frame reports nothing."""
    h = Harness(tmp_path, meters=1, meter_kw={"instant_interval_s": 3600}).start()
    try:
        h.gw.journal.register("t-ev", "events")
        _wait(lambda: h.gw.pollers["p1"].health["m1"].relay == "closed", 20)
        h.sim_meters[0].relay_open = True         # by itself
        cut = h.command("m1", "cut_off")
        h.send(cut)
        assert h.wait_result(cut["id"])["status"] == "done"
        evs = [r.body for r in h.gw.journal.read("t-ev", "events", limit=1000, after=0)
               if r.body["type"] in ("meter.relay_changed", "relay.opened")]
        assert [(e["type"], e.get("relay"), e.get("previous")) for e in evs] == [
            ("meter.relay_changed", "open", "closed"), ("relay.opened", None, None)]
    finally:
        h.close()


def _wait(f, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if f():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashed_line_worker_is_restarted_and_a_failing_job_is_counted(h):
    worker = h.gw.workers["p1"]

    def bug(w):
        raise RuntimeError("a bug in a poll job")
    worker.submit_job(bug)
    end = time.time() + 5
    while time.time() < end and worker.stats.errors == 0:
        time.sleep(0.05)
    assert worker.stats.errors == 1 and worker.is_alive()        # logged, counted, carried on

    def die(w):
        raise SystemExit("thread killed")
    worker.submit_job(die)
    end = time.time() + 5
    while time.time() < end and worker.is_alive():
        time.sleep(0.05)
    assert not worker.is_alive()
    end = time.time() + 5
    while time.time() < end and h.gw.workers["p1"] is worker:
        time.sleep(0.1)                                          # the supervisor notices
    new = h.gw.workers["p1"]
    assert new is not worker and new.is_alive() and h.gw.restarts["p1"] == 1
    cut = h.command("m1", "cut_off")                             # and the line works again
    h.send(cut)
    assert h.wait_result(cut["id"])["status"] == "done"
