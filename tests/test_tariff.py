"""The tariff engine: exact money, 0.01 kWh steps, tiers re-evaluated at every step."""

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.billing.tariff import from_config, micro_to_yuan, split_interval
from gateway.billing.pricing import Billing
from gateway.billing.costcontrol import new_account_doc

ACC = {"opening_balance": Decimal("100.00"), "alarm1": Decimal("20.00"),
       "alarm2": Decimal("10.00"), "overdraft_limit": Decimal("0.00"),
       "restore_threshold": Decimal("0.00"), "max_kw": Decimal("60"), "mode": "local"}

FLAT = from_config("flat", {"kind": "flat", "price": "0.5283"})
TIERED = from_config("tiered", {"kind": "tiered", "price": "0.5283", "ladder": [
    {"upto_kwh": "2760", "surcharge": "0"}, {"upto_kwh": "4800", "surcharge": "0.05"},
    {"surcharge": "0.30"}], "reset_day": 15})
TOU = from_config("tou", {"kind": "tou", "prices": {"valley": "0.3015", "flat": "0.5283"},
                            "schedule": [{"from": "22:00", "to": "06:00", "rate": "valley"},
                                         {"from": "06:00", "to": "22:00", "rate": "flat"}]})
BOTH = from_config("both", {
    "kind": "tiered_tou",
    "prices": {"sharp": "1.0253", "peak": "0.8653", "flat": "0.5283", "valley": "0.3015"},
    "schedule": [{"from": "00:00", "to": "08:00", "rate": "valley"},
                 {"from": "08:00", "to": "11:00", "rate": "peak"},
                 {"from": "11:00", "to": "17:00", "rate": "flat"},
                 {"from": "17:00", "to": "19:00", "rate": "peak"},
                 {"from": "19:00", "to": "21:00", "rate": "sharp"},
                 {"from": "21:00", "to": "24:00", "rate": "flat"}],
    "ladder": [{"upto_kwh": "2760", "surcharge": "0"}, {"upto_kwh": "4800", "surcharge": "0.05"},
               {"surcharge": "0.30"}]})
NOON = dt.datetime(2026, 6, 10, 12, 0)


def test_flat_price_per_step():
    cost, _ = FLAT.charge(1234, NOON, 0)
    assert cost == 1234 * 5283 == 6519222
    assert micro_to_yuan(cost) == Decimal("6.52")


def test_tier_boundary_inside_one_reading_is_priced_on_both_sides():
    cost, tier = TIERED.charge(30, NOON, 275990)
    assert cost == 10 * 5283 + 20 * 5783 and tier == 276020


def test_time_of_use_across_midnight():
    t0, t1 = dt.datetime(2026, 6, 10, 21, 0), dt.datetime(2026, 6, 10, 23, 0)
    parts = split_interval(100, t0, t1, TOU)
    assert [(p[0].hour, p[1]) for p in parts] == [(21, 50), (22, 50)]
    cost = sum(TOU.charge(n, when, 0)[0] for when, n in parts)
    assert cost == 50 * 5283 + 50 * 3015
    assert TOU.tou.rate_at(dt.datetime(2026, 6, 11, 3, 0)) == "valley"
    assert TOU.tou.rate_at(dt.datetime(2026, 6, 11, 5, 59)) == "valley"
    assert TOU.tou.rate_at(dt.datetime(2026, 6, 11, 6, 0)) == "flat"


def test_tier_year_starts_on_the_billing_date_not_january():
    assert TIERED.period_start(dt.datetime(2026, 1, 10)) == dt.datetime(2025, 1, 15)
    assert TIERED.period_start(dt.datetime(2026, 1, 20)) == dt.datetime(2026, 1, 15)
    monthly = from_config("m", {"kind": "tiered", "price": "0.5", "period": "monthly",
                                  "reset_day": 28, "reset_hour": 8,
                                  "ladder": [{"upto_kwh": "100"}, {"surcharge": "0.1"}]})
    assert monthly.period_start(dt.datetime(2026, 3, 28, 7, 59)) == dt.datetime(2026, 2, 28, 8)
    assert monthly.period_start(dt.datetime(2026, 1, 5)) == dt.datetime(2025, 12, 28, 8)


def test_annual_reset_inside_a_reading_resets_the_ladder():
    billing = Billing(ACC, TIERED)
    doc = new_account_doc(ACC)
    doc["tier_period"] = TIERED.period_start(dt.datetime(2026, 1, 14, 12)).isoformat()
    doc["tier_centi"] = 479990                            # deep in tier 2 before the reset
    t0 = dt.datetime(2026, 1, 14, 23)
    t1 = dt.datetime(2026, 1, 15, 1)
    _apply(billing, doc, "1000.00", t0)
    _apply(billing, doc, "1000.40", t1)                 # 40 steps: 20 before, 20 after reset
    assert doc["charges_uy"] == 10 * 5783 + 10 * (5283 + 3000) + 20 * 5283
    assert doc["tier_centi"] == 20


def test_worked_example_tiered_and_time_of_use():
    """docs/cost-control.md: 3.00 kWh from the meter's T2 (peak) and T4 (valley) registers
    with the tier counter 1.00 kWh below the first boundary."""
    billing = Billing(ACC, BOTH)
    doc = new_account_doc(ACC)
    doc["tier_period"] = BOTH.period_start(NOON).isoformat()
    doc["tier_centi"] = 275900
    regs0 = {"energy.import.total": "5000.00", "energy.import.t1": "100.00",
             "energy.import.t2": "2000.00", "energy.import.t3": "1900.00",
             "energy.import.t4": "1000.00"}
    regs1 = dict(regs0, **{"energy.import.total": "5003.00", "energy.import.t2": "2002.00",
                           "energy.import.t4": "1001.00"})
    _apply_group(billing, doc, regs0, NOON)
    _apply_group(billing, doc, regs1, NOON + dt.timedelta(hours=1))
    # T2 peak 2.00 kWh: 100 steps at 0.8653 (tier 1), 100 at 0.8653 + 0.05 (tier 2);
    # then T4 valley 1.00 kWh: 100 steps at 0.3015 + 0.05
    assert doc["charges_uy"] == 100 * 8653 + 100 * 9153 + 100 * 3515 == 2132100
    assert micro_to_yuan(doc["charges_uy"]) == Decimal("2.13")


def test_register_sanity_no_charge_and_an_event():
    billing = Billing(ACC, FLAT)
    doc = new_account_doc(ACC)
    events = []
    _apply(billing, doc, "1000.00", NOON, events)
    _apply(billing, doc, "999.00", NOON + dt.timedelta(hours=1), events)      # decreasing
    _apply(billing, doc, "5000.00", NOON + dt.timedelta(hours=2), events)     # 4001 kWh in 1 h
    _apply(billing, doc, "5001.00", NOON + dt.timedelta(hours=3), events)
    assert [e[0] for e in events] == ["meter.register_decrease", "meter.register_jump"]
    assert doc["charges_uy"] == 100 * 5283                # only the last, plausible kWh


def _apply(billing, doc, total, when, events=None):
    _apply_group(billing, doc, {"energy.import.total": total}, when, events)


def _apply_group(billing, doc, regs, when, events=None):
    ms = int(when.timestamp() * 1000)
    billing.apply(doc, {q: (Decimal(v), ms) for q, v in regs.items()},
                  events if events is not None else [])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=30),
       st.sampled_from(["flat", "tiered"]), st.integers(270000, 280000))
def test_splitting_consumption_never_changes_the_charge(steps, which, start_tier):
    tariff = FLAT if which == "flat" else TIERED
    billing = Billing(dict(ACC, max_kw=Decimal("100000")), tariff)
    whole = new_account_doc(ACC)
    split = new_account_doc(ACC)
    for doc in (whole, split):
        doc["tier_period"] = tariff.period_start(NOON).isoformat()
        doc["tier_centi"] = start_tier
    total = sum(steps)
    base = Decimal("1000.00")
    _apply(billing, whole, str(base), NOON)
    _apply(billing, whole, str(base + Decimal(total).scaleb(-2)), NOON + dt.timedelta(hours=1))
    _apply(billing, split, str(base), NOON)
    acc = 0
    for i, s in enumerate(steps):
        acc += s
        _apply(billing, split, str(base + Decimal(acc).scaleb(-2)),
               NOON + dt.timedelta(minutes=1 + i * 60 // len(steps)))
    assert split["charges_uy"] == whole["charges_uy"]
    assert split["balance_uy"] + split["charges_uy"] == split["opening_uy"]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 100000), st.integers(0, 23), st.integers(0, 59), st.integers(1, 600))
def test_time_of_use_split_adds_up_exactly(centi, hour, minute, minutes):
    t0 = dt.datetime(2026, 6, 10, hour, minute)
    parts = split_interval(centi, t0, t0 + dt.timedelta(minutes=minutes), BOTH)
    assert sum(n for _, n in parts) == centi
    for when, _ in parts:
        assert t0 <= when < t0 + dt.timedelta(minutes=minutes)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="price"):
        from_config("x", {"kind": "flat", "price": 0.5})
    with pytest.raises(ValueError, match="schedule"):
        from_config("x", {"kind": "tou", "prices": {"flat": "0.5"},
                            "schedule": [{"from": "00:00", "to": "12:00", "rate": "flat"}]})
    with pytest.raises(ValueError, match="more than 4 decimals"):
        from_config("x", {"kind": "flat", "price": "0.52831"})
