"""Prepaid cost control on simulated meters: exact balances, warnings first, safe cut-off,
prompt restore, the mass cut-off breaker."""

import datetime as dt
import time
from decimal import Decimal

from gateway.billing.tariff import yuan_to_micro
from gateway.store.journal import Reading
from gwharness import Harness

FAST = {"notice_s": 1, "protected_hours": [], "protected_weekends": False,
        "check_interval_s": 1}


def wait(cond, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    raise AssertionError("not reached within %ss" % timeout)


def events(h, type_=None):
    h.gw.journal.register("test-ev", "events")
    rows = h.gw.journal.read("test-ev", "events", limit=100000, after=0)
    return [r.body for r in rows if type_ is None or r.body["type"] == type_]


def reconcile(h, meter):
    doc = h.gw.docs.get("accounts", meter)
    assert doc["opening_uy"] + doc["topups_uy"] - doc["charges_uy"] == doc["balance_uy"]
    return doc


def test_household_runs_down_is_warned_cut_off_and_restored_after_topup(tmp_path):
    h = Harness(tmp_path, meters=2, sim_kw={"load_kw": 3600, "start_kwh": 1000},
                accounts=[{"meter": "m1", "tariff": "flat", "opening_balance": "3.00",
                           "alarm1": "2.00", "alarm2": "1.00", "max_kw": "20000",
                           "restore_threshold": "1.00"}],
                cost_control=FAST, interval_s=1).start()
    try:
        wait(lambda: h.sim_meters[0].relay_open, timeout=40)
        # the relay moves before the read-back and the result: wait for those too (the
        # account is marked cut at the intent, before the frame leaves: no sign of the result)
        wait(lambda: [r for r in h.results() if r.get("action") == "cut_off"
                      and r["status"] == "done"])
        types = [(e["type"], e.get("level")) for e in events(h) if e.get("meter") == "m1"
                 and e["type"].startswith("balance.")]
        assert types[:3] == [("balance.low", 1), ("balance.low", 2), ("balance.exhausted",
                                                                      None)]
        doc = reconcile(h, "m1")
        assert doc["state"] == "exhausted" and doc["cut_by_costcontrol"]
        cut = [r for r in h.results() if r.get("action") == "cut_off"
               and r["status"] == "done"]
        assert cut and cut[0]["relay"] == "open" and cut[0]["id"].startswith("costcontrol-")
        topup = h.command("m1", "topup", {"amount": "20.00", "txn": "PAY-1"})
        h.send(topup)
        r = h.wait_result(topup["id"])
        assert r["status"] == "done"
        wait(lambda: not h.sim_meters[0].relay_open)         # restored at once, any hour
        h.send(h.command("m1", "topup", {"amount": "20.00", "txn": "PAY-1"}))   # replayed txn
        time.sleep(1.0)
        doc = reconcile(h, "m1")
        assert doc["topups_uy"] == yuan_to_micro("20.00")   # applied once
        assert [m[1] for m in h.relay_moves()] == ["open", "closed"]
        assert h.sim_meters[1].relay_log == []                # the neighbour never moved
    finally:
        h.close()


def test_no_cut_off_inside_a_protected_window_or_under_guarantee(tmp_path, monkeypatch):
    from gateway.billing import costcontrol
    monkeypatch.setattr(costcontrol.CostControl, "now",
                        staticmethod(lambda: dt.datetime(2026, 11, 25, 19, 30)))   # Wednesday
    window = "18:00-21:00"
    h = Harness(tmp_path, meters=2,
                accounts=[{"meter": "m1", "tariff": "flat", "opening_balance": "0.00"},
                          {"meter": "m2", "tariff": "flat", "opening_balance": "0.00",
                           "guarantee": True}],
                cost_control=dict(FAST, protected_hours=[window]), interval_s=1).start()
    try:
        time.sleep(4)
        assert h.relay_moves() == []
        assert h.gw.costcontrol.protected_now() == "protected hours"
        h.gw.costcontrol.policy["protected_ranges"] = []          # the window ends
        wait(lambda: h.sim_meters[0].relay_open)
        time.sleep(2)
        assert not h.sim_meters[1].relay_open                     # guarantee holds
    finally:
        h.close()


def test_mass_cut_off_breaker_holds_after_the_limit(tmp_path):
    accounts = [{"meter": "m%d" % (i + 1), "tariff": "flat",
                 "opening_balance": "0.00" if i < 40 else "100.00"} for i in range(48)]
    h = Harness(tmp_path, meters=48, accounts=accounts,
                cost_control=dict(FAST, breaker_max_count=5, breaker_max_share=0.5),
                meter_kw={"interval_s": 3600}).start()
    try:
        wait(lambda: events(h, "costcontrol.breaker_tripped"), timeout=60)
        time.sleep(3)
        moved = {m[0] for m in h.relay_moves()}
        assert len(moved) == 5
        ev = events(h, "costcontrol.breaker_tripped")[0]
        assert ev["limit"] == 5 and ev["due"] >= 35
        rel = h.command("*", "release_breaker")
        h.send(rel)
        assert h.wait_result(rel["id"])["status"] == "done"
    finally:
        h.close()


def test_ledger_reconciles_across_restarts_and_duplicated_readings(tmp_path):
    h = Harness(tmp_path, meters=1,
                accounts=[{"meter": "m1", "tariff": "flat", "opening_balance": "50.00"}],
                cost_control=FAST, meter_kw={"interval_s": 3600})
    h.sim_meters[0].faults.silent = True          # readings come from the test, exactly
    h.start()
    try:
        base = int(time.time() * 1000)

        def feed(total, k):
            h.gw.sink.readings([Reading("m1", "energy.import.total", Decimal(total), "kWh",
                                        base + k * 60000, base + k * 60000)])
        feed("100.00", 0)
        feed("101.50", 1)
        feed("101.50", 1)                          # the same reading again
        wait(lambda: h.gw.docs.get("accounts", "m1")["charges_uy"] == 150 * 5000)
        h.stop()
        h.start()                                  # a restart: nothing charged twice
        feed("102.00", 2)
        wait(lambda: h.gw.docs.get("accounts", "m1")["charges_uy"] == 200 * 5000)
        topup = h.command("m1", "topup", {"amount": "5.55", "txn": "T-9"})
        h.send(topup)
        assert h.wait_result(topup["id"])["balance"] == "54.55"     # 50 - 2 kWh x 0.50 + 5.55
        doc = reconcile(h, "m1")
        assert doc["balance_uy"] == yuan_to_micro("50.00") - 200 * 5000 + \
            yuan_to_micro("5.55")
        status = h.gw.status()
        assert status["accounts"]["m1"]["balance"] == "54.55"
    finally:
        h.close()


def test_accounts_are_updatable_from_the_head_end_and_the_update_survives_a_restart(tmp_path):
    h = Harness(tmp_path, meters=1,
                tariffs={"flat": {"kind": "flat", "price": "0.5000"},
                         "cheap": {"kind": "flat", "price": "0.1000"}},
                accounts=[{"meter": "m1", "tariff": "flat", "opening_balance": "15.00"}],
                cost_control=FAST, meter_kw={"interval_s": 3600})
    h.start()
    try:
        bad = h.command("m1", "account_update", {"alarm1": 5})
        h.send(bad)
        assert "decimal string" in h.wait_result(bad["id"])["reason"]
        upd = h.command("m1", "account_update", {"alarm1": "30.00", "alarm2": "20.00",
                                                 "tariff": "cheap"})
        h.send(upd)
        r = h.wait_result(upd["id"])
        assert r["status"] == "done" and r["account"]["tariff"] == "cheap"
        assert h.gw.docs.get("accounts", "m1")["state"] == "alarm2"   # 15.00 <= 20.00
        assert [e["level"] for e in events(h, "balance.low")] == [1, 2]   # opened low, then 2
        h.stop()
        h.start()
        assert h.gw.costcontrol.accounts["m1"]["tariff"] == "cheap"
        assert h.gw.costcontrol.accounts["m1"]["alarm1"] == Decimal("30.00")
    finally:
        h.close()


def test_a_cut_off_intent_is_never_kept_for_a_command_no_ledger_knows(tmp_path, monkeypatch):
    """The command ledger (state file) and the accounts (accounts.db) are two files: the
    intent "cut by cost control" is written only after the ledger entry, so a ledger write
    that fails (a full disk, or a kill in between) leaves the account uncut; cost control
    tries again, and a restart resumes what the ledger has."""
    import errno
    import pytest
    from gateway.control.executor import StorageFull
    from gateway.store import state as state_mod
    h = Harness(tmp_path, meters=1,
                accounts=[{"meter": "m1", "tariff": "flat", "opening_balance": "5.00"}]
                ).start()
    try:
        def full(path, tables):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(state_mod, "write_state_file", full)
        cmd = {"id": "costcontrol-test-1", "meter": "m1", "action": "cut_off", "params": {}}
        with pytest.raises(StorageFull):
            h.gw.executor._record(cmd, "accepted", source="costcontrol", intent=True)
        assert not h.gw.accounts.get("m1").get("cut_by_costcontrol")
        assert h.gw.state.get("commands", "costcontrol-test-1") is None
    finally:
        monkeypatch.undo()
        h.close()
