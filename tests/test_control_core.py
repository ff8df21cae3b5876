"""The control core against what an attacker with broker access, a technician with a shell
and a power cut do: each test is named after what it protects."""

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from gateway.service import gateway as service
from gateway.config import ConfigError
from gateway.service.config import validate
from gwharness import Harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"notice_s": 0, "protected_hours": [], "protected_weekends": False,
        "check_interval_s": 1}
ACCOUNT = {"meter": "m1", "tariff": "flat", "opening_balance": "0.00", "max_kw": "20000",
           "restore_threshold": "1.00"}


def wait(cond, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("not reached within %ss" % timeout)


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path).start()
    yield harness
    harness.close()


def test_unauthenticated_input_never_speaks_in_a_real_commands_name(h):
    real = h.command("m1", "read", {"quantities": ["energy.import.total"]})
    forged = {"v": 1, "id": real["id"]}
    h.gw.executor.handle_remote(json.dumps(forged).encode(),
                                response_topic="mgw/v1/other-gw/command-results",
                                correlation=b"\x01\x02")
    rows = h.results()
    assert [r for r in rows if r["id"] == real["id"]] == []
    anon = [r for r in rows if r["id"] is None]
    assert len(anon) == 1 and anon[0]["claimed_id"] == real["id"]
    assert "_response_topic" not in anon[0] and "_correlation_data" not in anon[0]
    h.send(real)                                   # the real command still runs, once
    assert h.wait_result(real["id"])["status"] == "done"


def test_a_wildcard_response_topic_of_a_signed_command_is_not_stored(h):
    cmd = h.command("m1", "read", {"quantities": ["energy.import.total"]})
    h.gw.executor.handle_remote(json.dumps(cmd).encode(), response_topic="evil/#",
                                correlation=b"x" * 1000)
    rows = [r for r in h.results(cmd["id"])]
    assert rows and all("_response_topic" not in r and "_correlation_data" not in r
                        for r in rows)


def test_unauthenticated_answers_are_rate_limited(h):
    for i in range(200):
        h.gw.executor.handle_remote(b'{"v":1,"id":"junk-%d","sig":"AAAA"}' % i)
    anon = [r for r in h.results() if r["id"] is None]
    assert 1 <= len(anon) <= 12
    assert h.gw.executor.counts["unauthenticated"] == 200


def test_relay_secrets_never_reach_the_audit_trail(tmp_path):
    h = Harness(tmp_path, meter_kw={"password": "314159", "operator_code": "27182818"})
    h.start()
    try:
        cut = h.command("m1", "cut_off")
        h.send(cut)
        h.wait_result(cut["id"])            # the simulated meter refuses this password
        audit = open(os.path.join(h.cfg.gateway.data_dir, "audit.log")).read()
        assert '"relay.frame"' in audit
        password = bytes(((0x14 + 0x33) & 0xFF, (0x31 + 0x33) & 0xFF, (0x59 + 0x33) & 0xFF)
                         ).hex()     # 314159 as BCD, low byte first, +0x33 on the wire
        assert password not in audit and "314159" not in audit and "27182818" not in audit
        assert "****************" in audit
    finally:
        h.close()


def test_money_that_overflows_is_a_rejection_and_a_config_error():
    doc = {"gateway": {"id": "gw"}, "ports": [{"name": "p", "device": "/dev/null"}],
           "meters": [{"id": "m1", "port": "p", "address": "000000000001"}],
           "tariffs": {"flat": {"kind": "flat", "price": "0.5"}},
           "accounts": [{"meter": "m1", "tariff": "flat", "opening_balance": "1e400"}]}
    with pytest.raises(ConfigError) as exc:
        validate(doc, "<test>")
    problems = exc.value.problems
    assert any("accounts[0].opening_balance" in p and "1e400" in p for p in problems), problems


def test_account_update_with_an_overflowing_amount_gets_a_rejection(tmp_path):
    h = Harness(tmp_path, accounts=[dict(ACCOUNT, opening_balance="50.00")]).start()
    try:
        upd = h.command("m1", "account_update", {"alarm1": "1e400"})
        h.send(upd)
        r = h.wait_result(upd["id"])
        assert r["status"] == "rejected" and r["code"] == "bad_params"
    finally:
        h.close()


def test_billing_and_a_relay_outcome_never_overwrite_each_other(tmp_path):
    """Billing holds a batch of account documents while the executor records that cost
    control cut the meter: both changes survive (one writer, one lock)."""
    h = Harness(tmp_path, meters=1, accounts=[dict(ACCOUNT, opening_balance="500.00")],
                sim_kw={"load_kw": 3600, "start_kwh": 1000}, interval_s=1,
                cost_control=dict(FAST, check_interval_s=3600)).start()
    try:
        cc = h.gw.costcontrol
        billing = cc.billing["m1"]
        inside, release = threading.Event(), threading.Event()
        real_apply = billing.apply_batch            # billing cycles price per account

        def slow_apply(doc, items, events, *a, **kw):
            real_apply(doc, items, events, *a, **kw)
            inside.set()
            release.wait(10)
        billing.apply_batch = slow_apply
        wait(lambda: inside.is_set())
        writer = threading.Thread(target=h.gw.accounts.set_cut, args=("m1", True))
        writer.start()
        time.sleep(0.3)
        release.set()
        billing.apply_batch = real_apply
        writer.join(10)
        wait(lambda: h.gw.accounts.get("m1")["charges_uy"] > 0)
        time.sleep(1.5)                                  # more billing cycles
        doc = h.gw.accounts.get("m1")
        assert doc["cut_by_costcontrol"] is True
        assert doc["opening_uy"] + doc["topups_uy"] - doc["charges_uy"] == doc["balance_uy"]
    finally:
        h.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_hung_executor_is_replaced_and_commands_run_again(h, monkeypatch):
    monkeypatch.setattr(service, "HUNG_AFTER_S", 1.0)
    old = h.gw.executor
    block = threading.Event()
    old.handle = lambda message: block.wait(30)
    stuck = h.command("m1", "read", {"quantities": ["energy.import.total"]})
    h.send(stuck)
    wait(lambda: h.gw.executor is not old, timeout=15)
    assert h.gw.restarts["commands"] >= 1
    cmd = h.command("m2", "cut_off")
    h.send(cmd)
    assert h.wait_result(cmd["id"])["status"] == "done"
    block.set()


CHILD = r'''
import json, sys, threading
sys.path.insert(0, %(root)r)
from gateway.clock import ClockPolicy
from gateway.service.config import validate
from gateway.service.gateway import Gateway, serve
doc = json.loads(sys.argv[1])
cfg = validate(doc)
cfg = cfg.replace(meters=tuple(m.replace(interval_s=1) for m in cfg.meters))
gw = Gateway(cfg, clock_policy=ClockPolicy(False))
serve(gw, threading.Event())
'''


def run_child_until_killed(tmp_path, doc, failpoint):
    """A gateway process on the harness's configuration, killed by SIGKILL at `failpoint`
    of the command path."""
    doc = dict(doc, control=dict(doc["control"], require_synced_clock=False))
    script = tmp_path / "child.py"
    script.write_text(CHILD % {"root": ROOT})
    child = subprocess.Popen([sys.executable, str(script), json.dumps(doc)],
                             env=dict(os.environ, MGW_FAILPOINT=failpoint),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child.wait(40)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()[-2000:]


def test_a_crash_during_an_automatic_cut_off_still_restores_after_payment(tmp_path,
                                                                         monkeypatch):
    """Killed just after the trip frame went; restarted inside protected hours; the customer
    pays: the relay closes within 20 s."""
    from gateway.billing import costcontrol
    monkeypatch.setattr(costcontrol.CostControl, "now",
                        staticmethod(lambda: dt.datetime(2026, 11, 25, 23)))      # inside
    protected = dict(FAST, protected_hours=["22:00-06:00"])
    h = Harness(tmp_path, meters=1, accounts=[ACCOUNT], cost_control=protected,
                sim_kw={"load_kw": 0.001, "start_kwh": 1000})
    run_child_until_killed(tmp_path, dict(h.doc, cost_control=FAST), "after_send")
    assert h.sim_meters[0].relay_open                 # the trip frame went
    h.start()
    try:
        topup = h.command("m1", "topup", {"amount": "20.00", "txn": "PAY-after-crash"})
        h.send(topup)
        assert h.wait_result(topup["id"])["status"] == "done"
        wait(lambda: not h.sim_meters[0].relay_open, timeout=20)
        assert h.gw.costcontrol.protected_now() == "protected hours"
        wait(lambda: h.gw.accounts.get("m1")["cut_by_costcontrol"] is False)
    finally:
        h.close()


def test_a_replaced_cost_control_keeps_the_breaker_and_cuts_no_meter_twice(tmp_path,
                                                                           monkeypatch):
    """A slow line makes a cut-off take seconds: cost control keeps showing signs of life
    while it waits, and the breaker counts from the ledger, not from memory."""
    from gateway.control import relay
    monkeypatch.setattr(service, "HUNG_AFTER_S", 2.0)
    real = relay.operate
    monkeypatch.setattr(relay, "operate", lambda *a, **k: (time.sleep(3), real(*a, **k))[1])
    accounts = [dict(ACCOUNT, meter="m%d" % i) for i in range(1, 5)]
    h = Harness(tmp_path, meters=4, accounts=accounts,
                cost_control=dict(FAST, breaker_max_count=2, breaker_max_share=0.5),
                sim_kw={"load_kw": 0.001, "start_kwh": 1000}).start()
    try:
        wait(lambda: h.gw.accounts.flags().get("breaker_tripped"), timeout=40)
        time.sleep(4)
        cuts = [d["meter"] for d in h.gw.state.all("commands").values()
                if d["action"] == "cut_off" and d["source"] == "costcontrol"]
        assert sum(m.relay_open for m in h.sim_meters) == 2
        assert sorted(cuts) == sorted(set(cuts)) and len(cuts) == 2
        assert h.gw.restarts.get("costcontrol", 0) == 0
    finally:
        h.close()


def test_a_replayed_signed_command_is_cheap_and_never_answered_elsewhere(h):
    cmd = h.command("m1", "read", {"quantities": ["energy.import.total"]})
    h.send(cmd)
    h.wait_result(cmd["id"])
    audit = os.path.join(h.cfg.gateway.data_dir, "audit.log")
    before = os.path.getsize(audit)
    rows_before = len(h.results(cmd["id"]))
    for _ in range(1000):
        h.gw.executor.handle_remote(json.dumps(cmd).encode(),
                                    response_topic="mgw/v1/gw-OTHER/command-results")
    h.gw.executor.audit.flush_unauthenticated(force=True)
    assert os.path.getsize(audit) - before <= 2048 + 1500
    again = h.results(cmd["id"])[rows_before:]
    assert len(again) <= 1
    assert not any(r.get("_response_topic") for r in h.results(cmd["id"]))


def test_an_old_signed_command_replayed_records_nothing(h):
    old = h.command("m1", "cut_off", issued_offset_s=-7200, valid_s=900)
    for _ in range(200):
        h.gw.executor.handle_remote(json.dumps(old).encode())
    assert h.gw.state.get("commands", old["id"]) is None
    assert len(h.results(old["id"])) <= 12
    assert h.relay_moves() == []


def test_a_cut_off_whose_frame_never_left_does_not_count_as_cut(tmp_path):
    """Killed after the ledger entry, before the frame; back after the command's window:
    the interrupted cut-off is concluded failed and cost control cuts the account again."""
    h = Harness(tmp_path, meters=1, accounts=[ACCOUNT], cost_control=FAST,
                sim_kw={"load_kw": 0.001, "start_kwh": 1000})
    run_child_until_killed(tmp_path, dict(h.doc), "after_ledger")
    assert not h.sim_meters[0].relay_open
    from gateway.store.state import StateStore
    state = StateStore(os.path.join(h.cfg.gateway.data_dir, "state.json"))
    for cid, doc in state.all("commands").items():
        state.put("commands", cid, dict(doc, expires_at=time.time() - 300))   # a long outage
    state.close()
    h.start()
    try:
        wait(lambda: h.sim_meters[0].relay_open, timeout=30)
        finals = [r for r in h.results() if r.get("action") == "cut_off"
                  and r["status"] in ("done", "failed")]
        assert [r["code"] for r in finals if r["status"] == "failed"] == ["interrupted"]
    finally:
        h.close()


def test_audit_verify_and_logs_are_answered_from_the_box_and_rate_limited(h):
    cut = h.command("m1", "cut_off")
    h.send(cut)
    h.wait_result(cut["id"])
    check = h.command("*", "audit_verify")
    h.send(check)
    r = h.wait_result(check["id"])
    assert r["status"] == "done" and r["whole"] is True and r["entries"] >= 5
    logs = h.command("*", "logs", {"lines": 5, "level": "debug"})
    h.send(logs)
    r = h.wait_result(logs["id"])
    assert r["status"] == "done" and len(r["lines"]) <= 5
    bad = h.command("*", "logs", {"lines": 100000})
    h.send(bad)
    assert h.wait_result(bad["id"])["code"] == "bad_params"
    codes = []
    for _ in range(8):
        c = h.command("*", "audit_verify")
        h.send(c)
        codes.append(h.wait_result(c["id"]).get("code"))
    assert "rate_limit" in codes


def test_mgw_audit_verify_finds_an_edited_entry(h, tmp_path):
    import subprocess as sp
    cut = h.command("m1", "cut_off")
    h.send(cut)
    h.wait_result(cut["id"])
    h.stop()
    data = h.cfg.gateway.data_dir
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[gateway]\nid = "gw-test"\ndata_dir = "%s"\n[[ports]]\nname = "p1"\n'
                   'device = "/dev/null"\n[[meters]]\nid = "m1"\nport = "p1"\n'
                   'address = "000000000001"\n' % data)
    run = [sys.executable, "-m", "gateway", "audit", "verify", "--config", str(cfg), "--json"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = sp.run(run, capture_output=True, text=True, env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["whole"] is True, p.stderr
    path = os.path.join(data, "audit.log")
    lines = open(path).read().splitlines()
    lines[2] = lines[2].replace('"n": 3', '"n": 33')
    open(path, "w").write("\n".join(lines) + "\n")
    p = sp.run(run, capture_output=True, text=True, env=env)
    out = json.loads(p.stdout)
    assert p.returncode == 1 and not out["whole"] and "line 3" in out["broken_at"]
