"""Billing to the rule (issue 18): one regression test per finding, each failing on the code
before it (commit d711e3d), and the worked examples of docs/cost-control.md."""

import datetime as dt
import os
import types
from decimal import Decimal

import pytest

from gateway.billing import costcontrol
from gateway.billing.tariff import from_config, split_interval
from gateway.billing.pricing import Billing, hold
from gateway.config import ConfigError
from gateway.service.config import validate
from gateway.billing.costcontrol import new_account_doc
from gateway.store.journal import Journal, Reading
from gateway.store.accounts import AccountStore
from gateway.store.docs import open_docs
from gateway.store.state import StateStore

ACC = {"meter": "m1", "opening_balance": Decimal("100.00"), "alarm1": Decimal("20.00"),
       "alarm2": Decimal("10.00"), "overdraft_limit": Decimal("0.00"),
       "restore_threshold": Decimal("0.00"), "max_kw": Decimal("60"), "mode": "local",
       "guarantee": False}
SCHEDULE = [{"from": "00:00", "to": "08:00", "rate": "valley"},
            {"from": "08:00", "to": "11:00", "rate": "peak"},
            {"from": "11:00", "to": "17:00", "rate": "flat"},
            {"from": "17:00", "to": "19:00", "rate": "peak"},
            {"from": "19:00", "to": "21:00", "rate": "sharp"},
            {"from": "21:00", "to": "24:00", "rate": "flat"}]
PRICES = {"sharp": "1.0253", "peak": "0.8653", "flat": "0.5283", "valley": "0.3015"}
LADDER = [{"upto_kwh": "2760", "surcharge": "0"}, {"upto_kwh": "4800", "surcharge": "0.05"},
          {"surcharge": "0.30"}]
BOTH = from_config("both", {"kind": "tiered_tou", "prices": PRICES, "schedule": SCHEDULE,
                              "ladder": LADDER, "reset_day": 15})
PEAK_VALLEY = from_config("pv", {
    "kind": "tou", "prices": {"peak": "0.6000", "valley": "0.3000"},
    "schedule": [{"from": "08:00", "to": "22:00", "rate": "peak"},
                 {"from": "22:00", "to": "08:00", "rate": "valley"}]})
FLAT = from_config("flat", {"kind": "flat", "price": "0.5000"})
NOON = dt.datetime(2026, 6, 10, 12, 0)


def ms(when):
    return int(when.timestamp()) * 1000


def group(when, total, **tregs):
    g = {"energy.import.total": (total, ms(when))}
    for name, v in tregs.items():               # t1="100.00", ...
        g["energy.import." + name] = (v, ms(when))
    return g


def run(billing, doc, *groups):
    events = []
    for g in groups:
        billing.apply(doc, g, events)
    return events


# ---------------------------------------------------------------- finding 1

class _Gateway:
    """The real journal and state store under cost control, without the rest of the box."""

    def __init__(self, tmp_path, tariffs, accounts):
        self.journal = Journal(str(tmp_path / "journal.db"))
        self.state = StateStore(str(tmp_path / "state.json"))
        self.docs = open_docs(str(tmp_path / "accounts.db"), self.state)
        self.events = []
        self.sink = types.SimpleNamespace(event=lambda t, **f: self.events.append((t, f)))
        self.cfg = {"account_list": [dict(ACC, meter=m, tariff=t) for m, t in accounts],
                    "tariff_objects": tariffs,
                    "cost_policy": dict(costcontrol.POLICY_DEFAULTS, protected_ranges=[],
                                        holiday_dates=set())}
        self.cc = costcontrol.CostControl(
            accounts=[dict(ACC, meter=m, tariff=t) for m, t in accounts], tariffs=tariffs,
            policy=self.cfg["cost_policy"], store=AccountStore(self.docs),
            journal=self.journal, events=self.sink.event,
            request_relay=lambda *a, **k: None)

    def feed(self, meter, when, total, **tregs):
        rows = [Reading(meter, "energy.import.total", Decimal(total), "kWh", ms(when),
                        ms(when))]
        rows += [Reading(meter, "energy.import." + k, Decimal(v), "kWh", ms(when), ms(when))
                 for k, v in tregs.items()]
        self.journal.append_readings(rows)

    def close(self):
        self.journal.close()
        self.docs.close()
        self.state.close()


def test_a_reading_that_cannot_be_priced_holds_that_meter_only(tmp_path):
    """A peak/valley tariff and a meter whose T3 (flat) grows: that meter's billing is held
    with a reason and one event; the other meter is charged and the cursor moves on. When
    the tariff prices flat, the held energy is billed and the hold ends."""
    gw = _Gateway(tmp_path, {"pv": PEAK_VALLEY, "flat": FLAT}, [("m1", "pv"), ("m2", "flat")])
    try:
        regs = {"t1": "0.00", "t2": "10.00", "t3": "5.00", "t4": "20.00"}
        gw.feed("m1", NOON, "35.00", **regs)
        gw.feed("m2", NOON, "100.00")
        gw.feed("m1", NOON + dt.timedelta(minutes=15), "35.10", **dict(regs, t2="10.05",
                                                                         t3="5.05"))
        gw.feed("m2", NOON + dt.timedelta(minutes=15), "101.00")
        assert gw.cc.bill_once() > 0                  # no KeyError out of billing
        m1, m2 = gw.docs.get("accounts", "m1"), gw.docs.get("accounts", "m2")
        assert m2["charges_uy"] == 100 * 5000          # the neighbour is billed
        assert m1["charges_uy"] == 0
        held = m1["billing_hold"]
        assert "flat" in held["reason"] and held["seq"] > 0 and held["since"] > 0
        assert [e for e in gw.events if e[0] == "billing.held"] == [
            ("billing.held", {"reason": held["reason"], "seq": held["seq"], "meter": "m1"})]
        assert gw.journal.cursor("billing", "energy") == 12       # acknowledged
        # more readings: still held, no second event, the neighbour still billed
        gw.feed("m1", NOON + dt.timedelta(minutes=30), "35.20", **dict(regs, t2="10.10",
                                                                         t3="5.10"))
        gw.feed("m2", NOON + dt.timedelta(minutes=30), "102.00")
        gw.cc.bill_once()
        assert gw.docs.get("accounts", "m1")["billing_hold"] == held
        assert gw.docs.get("accounts", "m2")["charges_uy"] == 200 * 5000
        assert len([e for e in gw.events if e[0] == "billing.held"]) == 1
        # the tariff is corrected: the held energy is billed from where billing stopped
        fixed = from_config("pv3", {
            "kind": "tou", "prices": {"peak": "0.6000", "flat": "0.4000", "valley": "0.3000"},
            "schedule": [{"from": "08:00", "to": "22:00", "rate": "peak"},
                         {"from": "22:00", "to": "08:00", "rate": "valley"}]})
        gw.cc.billing["m1"] = Billing(gw.cc.accounts["m1"], fixed)
        gw.feed("m1", NOON + dt.timedelta(minutes=45), "35.30", **dict(regs, t2="10.15",
                                                                         t3="5.15"))
        gw.cc.bill_once()
        m1 = gw.docs.get("accounts", "m1")
        assert m1["billing_hold"] is None
        assert m1["charges_uy"] == 15 * 6000 + 15 * 4000
        assert [e[0] for e in gw.events if e[0].startswith("billing.")] == [
            "billing.held", "billing.resumed"]
    finally:
        gw.close()


def test_hold_keeps_its_first_reason():
    doc = {}
    evs = []
    assert hold(doc, "first", 5, 1.0, evs)
    assert not hold(doc, "second", 6, 2.0, evs)
    assert doc["billing_hold"] == {"reason": "first", "since": 1.0, "seq": 5}
    assert len(evs) == 1


def test_a_value_that_is_not_a_number_holds_and_the_next_good_reading_resumes():
    billing = Billing(ACC, FLAT)
    doc = new_account_doc(ACC)
    evs = run(billing, doc, group(NOON, "100.00"), group(NOON + dt.timedelta(hours=1), "x"),
              group(NOON + dt.timedelta(hours=2), "101.00"))
    assert [e[0] for e in evs] == ["billing.held", "billing.resumed"]
    assert doc["charges_uy"] == 100 * 5000 and doc["billing_hold"] is None


# ---------------------------------------------------------------- finding 2

def test_registers_are_priced_when_their_sum_trails_the_total_by_truncation():
    """T2 (peak) +0.05 and T4 (valley) +0.04 with the total +0.10 (the 0.01 kWh the
    truncated registers do not show yet) in an interval the gateway's windows call sharp:
    the meter's registers are priced, not the gateway's windows."""
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    t0 = dt.datetime(2026, 6, 10, 19, 0)
    regs = {"t1": "10.00", "t2": "20.00", "t3": "30.00", "t4": "40.00"}
    run(billing, doc, group(t0, "100.00", **regs),
        group(t0 + dt.timedelta(minutes=15), "100.10", **dict(regs, t2="20.05", t4="40.04")))
    assert doc["charges_uy"] == 5 * 8653 + 4 * 3015
    assert doc["tier_centi"] == 9                  # the registers' steps
    assert doc["registers"]["total"] == "100.10" and doc["registers"]["peak"] == "20.05"


def test_the_remainder_is_billed_when_the_registers_show_it():
    """Over a run of readings the registers' growth is billed exactly: the 0.01 kWh the total
    shows first is charged when the register shows it."""
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    t0 = dt.datetime(2026, 6, 10, 1, 0)
    regs = {"t1": "0.00", "t2": "0.00", "t3": "0.00", "t4": "40.00"}
    run(billing, doc, group(t0, "40.00", **regs),
        group(t0 + dt.timedelta(minutes=15), "40.10", **dict(regs, t4="40.09")),
        group(t0 + dt.timedelta(minutes=30), "40.20", **dict(regs, t4="40.20")))
    assert doc["charges_uy"] == 20 * 3015


def test_registers_that_disagree_with_the_total_beyond_truncation_are_not_used():
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    t0 = dt.datetime(2026, 6, 10, 12, 0)           # flat by the windows
    regs = {"t1": "0.00", "t2": "0.00", "t3": "0.00", "t4": "40.00"}
    evs = run(billing, doc, group(t0, "40.00", **regs),
              group(t0 + dt.timedelta(minutes=15), "40.10", **dict(regs, t4="40.14")))
    assert [e[0] for e in evs] == ["meter.registers_inconsistent"]
    assert doc["charges_uy"] == 10 * 5283          # the total, by the time windows


# ---------------------------------------------------------------- finding 3

def test_energy_used_before_the_billing_date_is_in_the_old_period():
    """The quarter hour ending exactly at the billing date (15 January 00:00) is the old
    period's, with registers as with the total only; the new period starts at 0."""
    for regs in (True, False):
        billing = Billing(ACC, BOTH)
        doc = new_account_doc(ACC)
        t0 = dt.datetime(2026, 1, 14, 23, 45)
        doc["tier_period"] = "2025-01-15T00:00:00"
        doc["tier_centi"] = 479990                  # 0.10 kWh below tier 3
        r0 = {"t1": "0", "t2": "0", "t3": "0", "t4": "0"} if regs else {}
        r1 = {"t1": "0", "t2": "0", "t3": "0.30", "t4": "0"} if regs else {}
        run(billing, doc, group(t0, "100.00", **r0),
            group(t0 + dt.timedelta(minutes=15), "100.30", **r1))
        assert doc["tier_period"] == "2025-01-15T00:00:00"
        assert doc["tier_centi"] == 480020
        assert doc["charges_uy"] == 10 * (5283 + 500) + 20 * (5283 + 3000), regs
        run(billing, doc, group(t0 + dt.timedelta(minutes=30), "100.31",
                                **(dict(r1, t3="0.31") if regs else {})))
        assert doc["tier_period"] == "2026-01-15T00:00:00" and doc["tier_centi"] == 1


def test_a_reading_at_the_same_time_as_the_previous_one_is_used_before_it():
    """No interval: priced as used in the last millisecond before the reading, so a
    repeated timestamp exactly at the billing date stays in the old period."""
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    date = dt.datetime(2026, 1, 15)
    doc["tier_period"] = "2025-01-15T00:00:00"
    doc["tier_centi"] = 100
    run(billing, doc, group(date, "10.00"), group(date, "10.10"))
    assert doc["tier_period"] == "2025-01-15T00:00:00" and doc["tier_centi"] == 110
    assert doc["charges_uy"] == 10 * 5283            # 23:59:59.999 is flat


def test_a_register_reading_across_the_billing_date_is_divided_by_time():
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    t0 = dt.datetime(2026, 1, 14, 23, 30)
    doc["tier_period"] = "2025-01-15T00:00:00"
    doc["tier_centi"] = 479990
    z = {"t1": "0", "t2": "0", "t3": "0", "t4": "0"}
    run(billing, doc, group(t0, "10.00", **z),
        group(t0 + dt.timedelta(minutes=60), "10.40", **dict(z, t3="0.40")))
    # 30 of 60 minutes before the date: 20 steps old period (10 tier 2, 10 tier 3), 20 new
    assert doc["charges_uy"] == 10 * 5783 + 10 * 8283 + 20 * 5283
    assert doc["tier_period"] == "2026-01-15T00:00:00" and doc["tier_centi"] == 20


def test_annual_period_from_a_billing_month():
    t = from_config("x", {"kind": "tiered", "price": "0.5", "reset_month": 7,
                            "reset_day": 1, "ladder": [{"upto_kwh": "10"}, {"surcharge": "1"}]})
    assert t.period_start(dt.datetime(2026, 3, 1)) == dt.datetime(2025, 7, 1)
    assert t.period_start(dt.datetime(2026, 7, 1)) == dt.datetime(2026, 7, 1)
    assert t.next_period_start(dt.datetime(2026, 3, 1)) == dt.datetime(2026, 7, 1)


# ---------------------------------------------------------------- finding 4

@pytest.mark.parametrize("minutes", [1, 2, 3, 5, 10, 15, 60])
def test_growth_exactly_at_the_jump_limit_is_billed(minutes):
    """limit = max_kw x hours x 1.2 + 1 kWh, exactly: at the limit billed, 0.01 above not."""
    billing = Billing(ACC, FLAT)
    limit = 60 * minutes * 2 + 100                 # steps: 60 kW x m/60 h x 1.2 x 100 + 100
    for growth, jump in ((limit, False), (limit + 1, True)):
        doc = new_account_doc(ACC)
        evs = run(billing, doc, group(NOON, "1000.00"),
                  group(NOON + dt.timedelta(minutes=minutes),
                        str(Decimal(100000 + growth).scaleb(-2))))
        assert [e[0] for e in evs] == (["meter.register_jump"] if jump else []), minutes
        assert doc["charges_uy"] == (0 if jump else growth * 5000)


def test_no_one_minute_floor_on_the_jump_limit():
    billing = Billing(ACC, FLAT)
    doc = new_account_doc(ACC)
    evs = run(billing, doc, group(NOON, "1000.00"),
              group(NOON + dt.timedelta(seconds=30), "1001.61"))   # limit 1.60 kWh in 30 s
    assert [e[0] for e in evs] == ["meter.register_jump"]
    assert evs[0][1]["limit_kwh"] == "1.60" and evs[0][1]["interval_s"] == 30


# ---------------------------------------------------------------- finding 5

VALLEY_LATE = from_config("vl", {
    "kind": "tou", "prices": {"flat": "0.5000", "valley": "0.3000"},
    "schedule": [{"from": "22:15", "to": "06:00", "rate": "valley"},
                 {"from": "06:00", "to": "22:15", "rate": "flat"}]})


def test_a_window_across_midnight_is_one_run_in_the_split():
    """20:45-01:45 and 0.02 kWh: flat 1.5 h (0.012), valley 3.5 h (0.028) -> 1 + 1 steps.
    Cut at midnight, valley would be two parts of 0.014 whose remainders beat flat's."""
    billing = Billing(ACC, VALLEY_LATE)
    doc = new_account_doc(ACC)
    t0 = dt.datetime(2026, 6, 10, 20, 45)
    run(billing, doc, group(t0, "10.00"), group(t0 + dt.timedelta(hours=5), "10.02"))
    assert doc["charges_uy"] == 5000 + 3000
    parts = split_interval(2, t0, t0 + dt.timedelta(hours=5), VALLEY_LATE)
    assert [(p[0].hour, p[1]) for p in parts] == [(20, 1), (22, 1)]


def test_an_exact_tie_in_the_split_goes_to_the_earliest_run():
    """16:00-22:00, 0.02 kWh over peak 4 h, sharp 1 h, flat 1 h: shares 4/3, 1/3, 1/3; the
    left-over step goes to the earliest of the tied remainders (peak)."""
    tou = from_config("t", {"kind": "tou", "prices": PRICES, "schedule": [
        {"from": "16:00", "to": "20:00", "rate": "peak"},
        {"from": "20:00", "to": "21:00", "rate": "sharp"},
        {"from": "21:00", "to": "16:00", "rate": "flat"}]})
    billing = Billing(ACC, tou)
    doc = new_account_doc(ACC)
    t0 = dt.datetime(2026, 6, 10, 16, 0)
    run(billing, doc, group(t0, "10.00"), group(t0 + dt.timedelta(hours=6), "10.02"))
    assert doc["charges_uy"] == 2 * 8653


# ---------------------------------------------------------------- finding 6

def test_registers_are_kept_after_a_reading_whose_total_did_not_move():
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    t0 = dt.datetime(2026, 6, 10, 1, 0)             # valley by the windows
    z = {"t1": "0.00", "t2": "0.00", "t3": "9.99", "t4": "0.00"}
    run(billing, doc, group(t0, "10.00", **z),
        group(t0 + dt.timedelta(minutes=15), "10.00", **dict(z, t3="10.00")),
        group(t0 + dt.timedelta(minutes=30), "10.10", **dict(z, t3="10.10")))
    assert doc["registers"]["flat"] == "10.10"
    assert doc["charges_uy"] == 11 * 5283           # all flat, as the meter counted


def test_a_decreasing_tariff_register_raises_an_event_and_is_not_charged():
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    z = {"t1": "0.00", "t2": "0.00", "t3": "5.00", "t4": "5.00"}
    evs = run(billing, doc, group(NOON, "10.00", **z),
              group(NOON + dt.timedelta(minutes=15), "10.10", **dict(z, t3="4.00",
                                                                      t4="6.10")),
              group(NOON + dt.timedelta(minutes=30), "10.20", **dict(z, t3="4.10",
                                                                      t4="6.10")))
    assert evs == [("meter.register_decrease", {"register": "energy.import.t3",
                                                "previous": "5.00", "now": "4.00"})]
    assert doc["charges_uy"] == 10 * 5283


# ---------------------------------------------------------------- finding 7

def _problems(tariff_doc):
    try:
        validate({"gateway": {"id": "g"}, "tariffs": {"home": tariff_doc}}, "gw.toml")
    except ConfigError as exc:
        return exc.problems
    return []


TOU_OK = {"kind": "tou", "prices": {"peak": "0.6", "valley": "0.3"},
          "schedule": [{"from": "08:00", "to": "22:00", "rate": "peak"},
                       {"from": "22:00", "to": "08:00", "rate": "valley"}]}


@pytest.mark.parametrize("doc, line", [
    (dict(TOU_OK, schedule=TOU_OK["schedule"] + [{"from": "12:00", "to": "13:00",
                                                  "rate": "valley"}]),
     "gw.toml: tariffs.home.schedule[2]: overlaps schedule[0] at 12:00"),
    (dict(TOU_OK, schedule=[{"from": "05:00", "to": "05:00", "rate": "peak"}]),
     "gw.toml: tariffs.home.schedule[0]: 05:00-05:00 is empty (a window for the whole day "
     "is 00:00-24:00)"),
    (dict(TOU_OK, seasons=[{"months": [6, 7], "schedule": TOU_OK["schedule"]},
                           {"months": [7, 8], "schedule": TOU_OK["schedule"]}]),
     "gw.toml: tariffs.home.seasons[1].months: month 7 is also in seasons[0]"),
    ({"kind": "tiered", "price": "0.5", "ladder": [{"upto_kwh": "100", "surchage": "0.1"},
                                                   {"surcharge": "0.2"}]},
     "gw.toml: tariffs.home.ladder[0].surchage: unknown key (upto_kwh, surcharge)"),
    ({"kind": "flat", "price": "0.5", "surcharge": "0.1"},
     "gw.toml: tariffs.home.surcharge: unknown key for a flat tariff (keys: kind, price)"),
    ({"kind": "tiered", "price": "0.5", "ladder": [{"upto_kwh": "200"}, {"upto_kwh": "100"},
                                                   {"surcharge": "0.1"}]},
     "gw.toml: tariffs.home.ladder[1].upto_kwh: bounds must increase (100.00 kWh is not "
     "above 200.00)"),
    ({"kind": "flat", "price": "-0.5"},
     "gw.toml: tariffs.home.price: price must not be negative: -0.5"),
    (dict(TOU_OK, prices={"peak": "0.6", "valley": "-0.3"}),
     "gw.toml: tariffs.home.prices.valley: price must not be negative: -0.3"),
    ({"kind": "tiered", "price": "0.5", "ladder": [{"upto_kwh": "100", "surcharge": "-0.1"},
                                                   {"surcharge": "0.2"}]},
     "gw.toml: tariffs.home.ladder[0].surcharge: surcharge must not be negative: -0.1"),
    ({"kind": "tiered", "price": "0.5", "period": "monthly", "reset_month": 3,
      "ladder": [{"surcharge": "0"}]},
     "gw.toml: tariffs.home.reset_month: only for an annual period (a monthly period starts "
     "every month)"),
    (dict(TOU_OK, schedule=[{"from": "08:00", "to": "22:00", "rate": "flat"},
                            {"from": "22:00", "to": "08:00", "rate": "valley"}]),
     "gw.toml: tariffs.home.schedule[0].rate: 'flat' has no price in prices"),
])
def test_config_refuses_a_bad_tariff_in_one_line_naming_the_key(doc, line):
    assert _problems(doc) == [line]


def test_config_accepts_the_documented_tariffs():
    assert _problems({"kind": "tiered_tou", "prices": PRICES, "schedule": SCHEDULE,
                      "ladder": LADDER, "period": "annual", "reset_month": 7,
                      "reset_day": 1, "reset_hour": 0}) == []
    assert _problems(dict(TOU_OK, seasons=[{"months": [6, 7, 8], "schedule": [
        {"from": "00:00", "to": "24:00", "rate": "valley"}]}])) == []


def test_docs_show_the_refusals_and_every_rule():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs",
                             "cost-control.md")).read()
    for phrase in ("reset_month", "0.03 kWh", "earliest", "billing.held", "billing_hold",
                   "meter.registers_inconsistent", "0.01 kWh more is not",
                   "last millisecond before"):
        assert phrase in text, phrase


# ---------------------------------------------------------------- finding 8

def test_splitting_register_readings_never_changes_the_charge():
    """With the meter's registers, charges add up over any re-split of the readings (in one
    tier period): 3 readings or 1 across a tier boundary and several rates."""
    def bill(points):
        billing = Billing(ACC, BOTH)
        doc = new_account_doc(ACC)
        doc["tier_period"] = "2026-01-15T00:00:00"
        doc["tier_centi"] = 275950
        run(billing, doc, *[group(NOON + dt.timedelta(minutes=15 * i), tot, t1=a, t2=b,
                                  t3=c, t4=d) for i, (tot, a, b, c, d) in enumerate(points)])
        return doc["charges_uy"], doc["tier_centi"]
    start = ("10.00", "1.00", "2.00", "3.00", "4.00")
    mid1 = ("10.60", "1.30", "2.00", "3.30", "4.00")
    mid2 = ("10.90", "1.30", "2.20", "3.30", "4.10")
    end = ("11.50", "1.50", "2.20", "3.50", "4.30")
    assert bill([start, mid1, mid2, end]) == bill([start, end])


# ---------------------------------------------------------------- the energy table

def _as_schema_1(path, billing_acked):
    """The journal at `path` as version 1 wrote it: no energy table, billing's cursor on the
    readings at `billing_acked` (the readings are all still there: no uplink here)."""
    import sqlite3
    db = sqlite3.connect(path)
    db.execute("DROP TABLE energy")
    db.execute("DELETE FROM cursors WHERE stream='energy'")
    db.execute("INSERT INTO cursors VALUES ('billing', 'readings', ?)", (billing_acked,))
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.commit()
    db.close()


def _feed_days(gw, first, days):
    """Quarter-hour readings of m1 (total and T1..T4) and m2 (total only), days
    first .. first + days - 1 of one sequence."""
    wh = [300000, 200000, 500000, 100000]
    for k in range((first + days) * 96):
        when = NOON + dt.timedelta(minutes=15 * k)
        wh[k % 4] += 37 * (k % 11) + 5
        if k < first * 96:
            continue
        regs = {"t%d" % (i + 1): str(Decimal(w // 10).scaleb(-2)) for i, w in enumerate(wh)}
        gw.feed("m1", when, str(Decimal(sum(wh) // 10).scaleb(-2)), **regs)
        gw.feed("m2", when, str(Decimal(2 * sum(wh) // 10).scaleb(-2)))


def _bill_all(gw):
    while gw.cc.bill_once(limit=150):
        pass
    return {m: {k: v for k, v in gw.docs.get("accounts", m).items()
                if k not in ("state_since", "warned")} for m in ("m1", "m2")}


@pytest.mark.parametrize("crashed", [False, True])
def test_an_upgraded_gateway_bills_what_its_old_journal_held_once(tmp_path, crashed):
    """A gateway upgraded in place: its journal (schema 1) holds readings billing had not
    acknowledged. They are billed from the energy table filled at start, each once: the
    accounts end as on a gateway that always had the table. `crashed`: the old version
    wrote the state of its last cycle but was killed before acknowledging it, so the
    first readings filled in were charged already (charged_to_seq): not charged again."""
    accounts = [("m1", "both"), ("m2", "both")]
    ref = _Gateway(tmp_path / "ref", {"both": BOTH}, accounts)
    _feed_days(ref, 0, 3)
    expected = _bill_all(ref)
    ref.close()

    gw = _Gateway(tmp_path / "old", {"both": BOTH}, accounts)
    _feed_days(gw, 0, 1)
    _bill_all(gw)
    acked = gw.journal.cursor("billing", "energy")
    _feed_days(gw, 1, 2)
    gw.close()
    _as_schema_1(str(tmp_path / "old" / "journal.db"), acked - 30 if crashed else acked)
    gw = _Gateway(tmp_path / "old", {"both": BOTH}, accounts)
    assert gw.journal.cursor("billing", "energy") == (acked - 30 if crashed else acked)
    with pytest.raises(KeyError):
        gw.journal.cursor("billing", "readings")
    assert _bill_all(gw) == expected
    assert not [e for e in gw.events if e[0].startswith("billing.")]
    gw.close()


def test_an_accounts_billing_state_does_not_grow_with_its_readings():
    """Six days of quarter-hour readings on 25 time-of-use accounts: what the Billing objects
    keep between readings stays small (their register memo was bounded at 4,096 texts per
    account: about 450 kB each, 450 MB for 1,000 accounts after a few weeks)."""
    import tracemalloc
    t0 = dt.datetime(2026, 6, 10, 0, 0)
    accounts = [(Billing(ACC, BOTH), new_account_doc(ACC)) for _ in range(25)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for k in range(1, 600):
            when = t0 + dt.timedelta(minutes=15 * k)
            wh = 4 * k
            regs = {"t1": "%d.%02d" % divmod(k, 100), "t2": "%d.%02d" % divmod(k, 100),
                    "t3": "%d.%02d" % divmod(k, 100), "t4": "%d.%02d" % divmod(wh - 3 * k, 100)}
            total = "%d.%02d" % divmod(wh, 100)
            for billing, doc in accounts:
                billing.apply(doc, group(when, total, **regs), [])
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert all(doc["charges_uy"] > 0 for _, doc in accounts), grown
    assert grown < 400_000, "%d bytes kept for 25 accounts" % grown
