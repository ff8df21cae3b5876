"""Billing benchmark: prepaid account-days billed per second through the real path.

Households on a tiered + time-of-use tariff (the one in docs/cost-control.md), read every
15 minutes (96 readings a day), their readings appended to a real journal (SQLite, WAL); then
cost control's `bill_once` is run until the journal is drained: rows read from the journal,
priced, balances written to the real state file (TinyDB, atomic, one write per cycle), events
emitted, the cursor acknowledged. Two kinds of reading: the total register only, and the
total with the T1..T4 (sharp, peak, flat, valley) registers, truncated to 0.01 kWh as meters
display them. Only the billing is timed; the appending (journal rows, and the energy
table's row per reading that billing reads) is shown beside it per journal row, with the
making of the readings, for comparison only.

Target (issue 18): >= 2,000 account-days per second on the 2-core development machine, so a
concentrator with 1,000 prepaid households bills a day in well under a minute of one ARM core.

Run: python bench/billing.py [--households N] [--days D]. It prints figures; it asserts nothing.
"""

import datetime as _dt
import os
import random
import shutil
import sys
import tempfile
import time
from decimal import Decimal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gateway.billing import costcontrol, tariff as T  # noqa: E402
from gateway.store.journal import Journal, Reading  # noqa: E402
from gateway.service.sink import ReadingSink  # noqa: E402
from gateway.store.accounts import AccountStore  # noqa: E402
from gateway.store.docs import open_docs  # noqa: E402
from gateway.store.state import StateStore  # noqa: E402

TARIFF = {
    "kind": "tiered_tou",
    "prices": {"sharp": "1.0253", "peak": "0.8653", "flat": "0.5283", "valley": "0.3015"},
    "schedule": [{"from": "00:00", "to": "08:00", "rate": "valley"},
                 {"from": "08:00", "to": "11:00", "rate": "peak"},
                 {"from": "11:00", "to": "17:00", "rate": "flat"},
                 {"from": "17:00", "to": "19:00", "rate": "peak"},
                 {"from": "19:00", "to": "21:00", "rate": "sharp"},
                 {"from": "21:00", "to": "24:00", "rate": "flat"}],
    "ladder": [{"upto_kwh": "2760", "surcharge": "0"}, {"upto_kwh": "4800", "surcharge": "0.05"},
               {"surcharge": "0.30"}],
}
# T1..T4 index of each hour of the day under TARIFF
RATE_OF_HOUR = [4] * 8 + [2] * 3 + [3] * 6 + [2] * 2 + [1] * 2 + [3] * 3
START = _dt.datetime(2026, 3, 1)
STEP_MS = 15 * 60 * 1000


def readings(households, days, registers, seed=1):
    """Every 15 minutes, every household: (ts, [Reading...]), in time order."""
    rnd = random.Random(seed)
    wh = [rnd.randrange(10 ** 6, 10 ** 7) for _ in range(households)]     # internal Wh
    rate_wh = [[w // 4] * 4 for w in wh]
    wh = [sum(r) for r in rate_wh]
    t0 = int(time.mktime(START.timetuple())) * 1000
    for k in range(days * 96 + 1):
        ts = t0 + k * STEP_MS
        hour = (START + _dt.timedelta(minutes=15 * k)).hour
        rate = RATE_OF_HOUR[hour] - 1
        batch = []
        for h in range(households):
            if k:
                used = rnd.randrange(20, 600)                  # 0.02-0.6 kWh a quarter hour
                wh[h] += used
                rate_wh[h][rate] += used
            m = "m%04d" % (h + 1)
            batch.append(Reading(m, "energy.import.total", Decimal(wh[h] // 10).scaleb(-2),
                                 "kWh", ts, ts))
            if registers:
                for i in range(4):
                    batch.append(Reading(m, "energy.import.t%d" % (i + 1),
                                         Decimal(rate_wh[h][i] // 10).scaleb(-2), "kWh", ts,
                                         ts))
        yield batch


def run(folder, households, days, registers):
    tag = "regs" if registers else "total"
    journal = Journal(os.path.join(folder, "journal-%s.db" % tag), quota_bytes=10 ** 12)
    state = StateStore(os.path.join(folder, "state-%s.json" % tag))
    docs = open_docs(os.path.join(folder, "accounts-%s.db" % tag), state)
    tariffs = {"residential": T.from_config("residential", TARIFF)}
    accounts = [{"meter": "m%04d" % (h + 1), "mode": "local", "tariff": "residential",
                 "opening_balance": Decimal("100000.00"), "alarm1": Decimal("20.00"),
                 "alarm2": Decimal("10.00"), "overdraft_limit": Decimal("0.00"),
                 "restore_threshold": Decimal("0.00"), "max_kw": Decimal("60"),
                 "guarantee": False} for h in range(households)]
    cfg = {"account_list": accounts, "tariff_objects": tariffs,
           "cost_policy": dict(costcontrol.POLICY_DEFAULTS, protected_ranges=[],
                               holiday_dates=set())}
    sink = ReadingSink(journal)
    cc = costcontrol.CostControl(accounts=cfg["account_list"], tariffs=tariffs,
                                 policy=cfg["cost_policy"], store=AccountStore(docs),
                                 journal=journal, events=sink.event,
                                 request_relay=lambda *a, **k: None)
    pending = []
    appended = 0
    t0 = time.perf_counter()
    for batch in readings(households, days, registers):
        pending += batch
        if len(pending) >= 20000:
            journal.append_readings(pending)
            appended += len(pending)
            pending = []
    if pending:
        journal.append_readings(pending)
        appended += len(pending)
    append_s = time.perf_counter() - t0     # (with making the readings: for comparison)
    t0 = time.perf_counter()
    cycles = 0
    while cc.bill_once():
        cycles += 1
    elapsed = time.perf_counter() - t0
    charged = sum(d["charges_uy"] for d in docs.all("accounts").values())
    sink.flush()
    journal.close()
    docs.close()
    state.close()
    return households * days / elapsed, elapsed, cycles, charged, append_s * 1e6 / appended


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--households", type=int, default=50)
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  ".."),
                    help="where to put the files (use the data partition: fsync cost matters)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix=".mgw-bench-billing-", dir=args.dir)
    try:
        print("meter-gateway billing benchmark: %d households x %d days, 96 readings a day, "
              "tiered + time-of-use; journal -> bill_once -> state; %s"
              % (args.households, args.days, folder))
        print("\n  %-28s %16s %10s %8s %16s %14s" % (
            "", "account-days/s", "seconds", "cycles", "charged (yuan)", "append us/row"))
        for registers in (False, True):
            rate, elapsed, cycles, charged, append_us = run(folder, args.households, args.days,
                                                            registers)
            print("  %-28s %16.0f %10.2f %8d %16s %14.1f" % (
                "total and T1..T4" if registers else "total register only", rate, elapsed,
                cycles, T.micro_to_yuan(charged), append_us))
        print("  target: >= 2,000 account-days/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
