"""Fee-recovery benchmark: 1,000 prepaid households for 90 simulated days through the real
cost-control code (billing, warnings, cut-off and restore decisions, top-ups with debt
recovery, grades, forecasts, daily statements), with an injected clock.

The real parts: gateway.billing (CostControl, Billing, the recovery rules), the account
store on its real SQLite file (accounts.db), the real journal (SQLite, WAL: readings,
the energy table, freezes, statements). Simulated: the meters (hourly readings of the total
register, and T1..T4 on the time-of-use tariff; a daily freeze at midnight), the relay
(a cut-off stops a household's consumption until it is restored), the payers and the
head-end (a weather hold, releasing the mass cut-off breaker an hour after it trips).

Households: consumption profiles (small, medium, large, electric heating; evening peaks,
weekends), two tariffs (flat; tiered + time of use with T registers), payers who top up
early, late (after a cut-off), in small amounts, or not at all for weeks, some with old
debt on instalments (30% of each top-up, some also a fixed daily amount), a few under
guarantee, some meters offline for a day. Protected hours (18:00-08:00), weekends and a
weather hold apply.

It prints: wall time per simulated day and per account-day (the feed and cost control apart);
cut-offs, restores and the delay from each qualifying payment to its restore (simulated
time); cut-offs inside a protected window or under guarantee (must be 0); accounts whose
statements do not reconcile to the fen (must be 0); grade and forecast events by kind; the
days-of-credit-left forecasts against when the credit actually ran out.

Target (issue 17): a simulated day for 1,000 accounts in under 1 s on the 2-core machine.

Run: python bench/recovery.py [--households N] [--days D]. It prints figures; it asserts
nothing.
"""

import argparse
import collections
import datetime as _dt
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from decimal import Decimal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.billing import RATE_OF_HOUR, TARIFF as TOU  # noqa: E402  (the same households' tariff)
from gateway.billing import costcontrol, tariff as T  # noqa: E402
from gateway.store.accounts import AccountStore  # noqa: E402
from gateway.store.docs import open_docs  # noqa: E402
from gateway.store.journal import Journal, Reading  # noqa: E402
from gateway.store.state import StateStore  # noqa: E402

FLAT = {"kind": "flat", "price": "0.5283"}
START = _dt.datetime(2026, 3, 2)            # a Monday, local time
HOUR = 3600
# Wh per hour of the day for a medium household (evening peak); scaled per profile
SHAPE = [180, 150, 140, 140, 150, 200, 350, 450, 400, 300, 280, 300,
         350, 300, 280, 300, 400, 600, 800, 900, 850, 700, 450, 250]
PROFILES = {"small": 0.5, "medium": 1.0, "large": 1.8, "heating": 3.0}
PAYERS = ("early", "late", "small", "absent")
WEATHER_DAYS = (40, 41, 42)                  # a heat wave: the head-end holds cut-offs
PROTECTED = ["18:00-08:00"]


class Timed:
    """Counts and times the account store's commits (the real method, wrapped)."""

    def __init__(self, store):
        self.n = 0
        self.s = 0.0
        self.real = store._write
        store._write = self

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self.real(*a, **k)
        finally:
            self.n += 1
            self.s += time.perf_counter() - t


class Household:
    __slots__ = ("meter", "profile", "payer", "tou", "wh", "rate_wh", "cut", "debt",
                 "rng", "next_pay", "absent_until", "offline_day", "guarantee")

    def __init__(self, k, rng):
        self.meter = "m%04d" % (k + 1)
        self.rng = random.Random(rng.random())
        self.profile = PROFILES[rng.choice(list(PROFILES))]
        self.payer = PAYERS[k % 4]
        self.tou = k % 3 != 0
        self.wh = rng.randrange(10 ** 5, 2 * 10 ** 6)
        self.rate_wh = [self.wh // 4] * 4
        self.wh = sum(self.rate_wh)
        self.cut = False
        self.debt = k % 5 == 0
        self.next_pay = None
        self.absent_until = 0
        self.offline_day = rng.randrange(5, 85) if k % 50 == 7 else None
        self.guarantee = k % 97 == 3


def kwh_text(wh):
    return str(Decimal(wh // 10).scaleb(-2))


class Bench:
    def __init__(self, folder, households, days, seed=1):
        self.days = days
        self.now = START.timestamp()
        rng = random.Random(seed)
        self.homes = [Household(k, rng) for k in range(households)]
        self.by_meter = {h.meter: h for h in self.homes}
        self.journal = Journal(os.path.join(folder, "journal.db"), quota_bytes=10 ** 12)
        self.state = StateStore(os.path.join(folder, "state.json"))
        self.docs = open_docs(os.path.join(folder, "accounts.db"), self.state)
        self.store = AccountStore(self.docs)
        tariffs = {"flat": T.from_config("flat", FLAT), "tou": T.from_config("tou", TOU)}
        accounts = [{"meter": h.meter, "mode": "local", "tariff": "tou" if h.tou else "flat",
                     "opening_balance": Decimal(rng.choice(["30.00", "60.00", "120.00"])),
                     "alarm1": Decimal("20.00"), "alarm2": Decimal("10.00"),
                     "overdraft_limit": Decimal("0.00"), "restore_threshold": Decimal("5.00"),
                     "max_kw": Decimal("60"), "guarantee": h.guarantee} for h in self.homes]
        policy = dict(costcontrol.POLICY_DEFAULTS, protected_hours=PROTECTED,
                      breaker_max_count=50, breaker_max_share=0.2,
                      protected_ranges=costcontrol.settings._hours(PROTECTED),
                      holiday_dates=frozenset())
        self.events = collections.Counter()
        self.forecasts = []                       # (meter, t, days_left)
        self.ran_out = collections.defaultdict(list)     # meter -> times the credit hit 0
        self.cutoffs = []                          # (meter, t, protected?, guarantee?)
        self.restores = []                         # (meter, t, delay_s)
        self.qualifying = {}                       # meter -> time of the qualifying payment
        self.cc = costcontrol.CostControl(
            accounts=accounts, tariffs=tariffs, policy=policy, store=self.store,
            journal=self.journal, events=self._event, request_relay=self._relay,
            clock=lambda: self.now)
        self.cc.now = lambda: _dt.datetime.fromtimestamp(self.now)
        self.journal.register("bench", "statements")
        # the head-end's uplink: what it has is deleted from the journal, as in the field
        self.journal.register("uplink", "readings")
        for h in self.homes:
            if h.debt:
                self.cc.update_account(h.meter, dict(
                    {"debt": str(h.rng.choice([200, 400, 800])) + ".00",
                     "recovery_rate": "0.30"},
                    **({"daily_recovery": "1.00"} if h.rng.random() < 0.5 else {})))

    # ------------------------------------------------------------ what the code calls

    def _event(self, etype, **fields):
        if etype == "balance.grade":
            self.events["grade %s" % fields["grade"]] += 1
        elif etype == "balance.forecast":
            self.events["forecast %s" % fields["threshold_days"]] += 1
            if fields["threshold_days"] is not None and fields["days_left"] is not None:
                self.forecasts.append((fields["meter"], self.now,
                                       Decimal(fields["days_left"])))
        elif etype in ("balance.zero", "balance.exhausted"):
            self.ran_out[fields["meter"]].append(self.now)
            self.events[etype] += 1
        else:
            self.events[etype] += 1

    def _relay(self, meter, action, reason, tick=None):
        h = self.by_meter[meter]
        t = _dt.datetime.fromtimestamp(self.now)
        if action == "cut_off":
            minute = t.hour * 60 + t.minute
            protected = minute >= 18 * 60 or minute < 8 * 60 or t.weekday() >= 5 or \
                self._day() in WEATHER_DAYS
            self.cutoffs.append((meter, self.now, protected,
                                 h.guarantee or self.store.guarantee_on(meter)))
            h.cut = True
            self.store.set_cut(meter, True)
        else:
            paid = self.qualifying.pop(meter, None)
            self.restores.append((meter, self.now, None if paid is None else self.now - paid))
            h.cut = False
            self.store.set_cut(meter, False)

    def _day(self):
        return int((self.now - START.timestamp()) // 86400)

    # ------------------------------------------------------------ the simulated world

    def feed(self, hour_ts):
        """Every household's reading at hour_ts (and its freeze at midnight)."""
        t = _dt.datetime.fromtimestamp(hour_ts)
        ms = int(hour_ts * 1000)
        day = self._day()
        weekend = 1.3 if t.weekday() >= 5 else 1.0
        rate = RATE_OF_HOUR[(t.hour - 1) % 24] - 1  # the hour that just ended (T1..T4)
        rows = []
        for h in self.homes:
            if h.offline_day == day:
                continue
            if not h.cut:
                used = int(SHAPE[(t.hour - 1) % 24] * h.profile * weekend *
                           h.rng.uniform(0.6, 1.4))
                h.wh += used
                h.rate_wh[rate] += used
            rows.append(Reading(h.meter, "energy.import.total", Decimal(kwh_text(h.wh)),
                                "kWh", ms, ms))
            if h.tou:
                for i in range(4):
                    rows.append(Reading(h.meter, "energy.import.t%d" % (i + 1),
                                        Decimal(kwh_text(h.rate_wh[i])), "kWh", ms, ms))
            if t.hour == 0:
                rows.append(Reading(h.meter, "freeze.daily.energy.import.total",
                                    Decimal(kwh_text(h.wh)), "kWh", ms, ms))
                if h.tou:
                    for i in range(4):
                        rows.append(Reading(h.meter, "freeze.daily.energy.import.t%d" % (i + 1),
                                            Decimal(kwh_text(h.rate_wh[i])), "kWh", ms, ms))
        self.journal.append_readings(rows)

    def pay(self, docs):
        """Payers decide once an hour, from the balance they see on their meter."""
        day = self._day()
        for h in self.homes:
            doc = docs[h.meter]
            bal = doc["balance_uy"]
            amount = None
            if h.payer == "early" and bal < 25 * T.MICRO:
                amount = h.rng.choice(["50.00", "100.00"])
            elif h.payer == "small" and bal < 12 * T.MICRO:
                amount = h.rng.choice(["10.00", "15.00", "20.00"])
            elif h.payer == "late" and h.cut:
                if h.next_pay is None:
                    h.next_pay = self.now + h.rng.randrange(1, 48) * HOUR
                elif self.now >= h.next_pay:
                    amount = h.rng.choice(["50.00", "100.00", "200.00"])
                    h.next_pay = None
            elif h.payer == "absent" and bal < 5 * T.MICRO and day >= h.absent_until:
                if h.next_pay is None:
                    h.next_pay = self.now + h.rng.randrange(7, 28) * 86400
                elif self.now >= h.next_pay:
                    amount = "300.00"
                    h.next_pay = None
                    h.absent_until = day + 1
            if amount is None:
                continue
            t = self.now + h.rng.randrange(60, 3000)     # sometime in the hour
            saved, self.now = self.now, t
            res = self.cc.apply_topup(h.meter, Decimal(amount), "pay-%s-%d" % (h.meter, t),
                                      channel=h.rng.choice(["counter", "bank", "wechat",
                                                            "alipay", "card"]))
            if h.cut and Decimal(res.balance) > Decimal("5.00"):
                self.qualifying.setdefault(h.meter, t)
            self._prompt()                       # the thread's prompt restore
            self.now = saved

    def _prompt(self):
        due = set()
        while not self.cc._due.empty():
            m = self.cc._due.get_nowait()
            if m is not None:
                due.add(m)
        for m in sorted(due):
            self.cc.act(only=m)

    def run(self):
        self.writes = Timed(self.docs)
        feed_s = cc_s = 0.0
        self.cpu = time.process_time()
        self.written = _written_bytes()
        t0 = START.timestamp()
        self.feed(t0)
        for day in range(self.days):
            if day == WEATHER_DAYS[0]:
                self.cc.set_weather_hold(True)
            if day == WEATHER_DAYS[-1] + 1:
                self.cc.set_weather_hold(False)
            for hour in range(1, 25):
                self.now = t0 + (day * 24 + hour) * HOUR
                a = time.perf_counter()
                self.feed(self.now)
                self.journal.ack("uplink", "readings", self.journal.next_seqs()["readings"] - 1)
                b = time.perf_counter()
                while self.cc.bill_once():
                    pass
                self.pay(self.store.all())
                self.cc.act()
                if self.cc.breaker_tripped and hour % 2 == 0:
                    self.cc.release_breaker()     # the head-end confirms
                self.cc.housekeeping()
                c = time.perf_counter()
                feed_s += b - a
                cc_s += c - b
        self.cpu = time.process_time() - self.cpu
        if self.written is not None:
            self.written = _written_bytes() - self.written
        return feed_s, cc_s

    # ------------------------------------------------------------ the figures

    def statements(self):
        return [r.body for r in self.journal.read("bench", "statements", limit=10 ** 7,
                                                   after=0)]


def reconciles(st):
    d = Decimal
    return (d(st["opening_balance"]) + d(st["topups"]) - d(st["charges"]) - d(st["recovered"])
            == d(st["closing_balance"]) and
            sum((d(v) for v in st["topups_by_channel"].values()), d(0)) == d(st["topups"]) and
            sum((d(b["charges"]) for b in st["bands"]), d(0)) == d(st["charges"]) and
            st["reconciled"])


def report(b, feed_s, cc_s, n, days):
    total = feed_s + cc_s
    print("\n  wall time per simulated day   %7.3f s   (meter feed %.3f s + cost control %.3f s)"
          % (total / days, feed_s / days, cc_s / days))
    print("  per account-day               %7.1f us  (cost control alone %.1f us)"
          % (total / (n * days) * 1e6, cc_s / (n * days) * 1e6))
    print("  CPU time per simulated day    %7.3f s   (this process; the machine is shared: "
          "load %.1f)" % (b.cpu / days, os.getloadavg()[0]))
    print("  target: a simulated day for 1,000 accounts in < 1 s")
    if b.written is not None:
        print("  written to storage per day    %7.1f MB  (this process, /proc/self/io: "
              "journal and account store, what flash wears by)" % (b.written / days / 1e6))
    w = b.writes
    print("  of which account-store commits %6.3f s   (%.0f a day, %.2f ms each; the file: "
          "%.0f kB at the end)" % (w.s / days, w.n / days, w.s / max(1, w.n) * 1000,
                                    _size(b.docs.path) / 1024))
    print("  cost control without them     %7.3f s" % ((cc_s - w.s) / days))
    delays = [d for _, _, d in b.restores if d is not None]
    print("\n  cut-offs                      %7d" % len(b.cutoffs))
    print("  restores                      %7d   (%d after a qualifying payment)"
          % (len(b.restores), len(delays)))
    if delays:
        print("  payment -> restore (simulated) median %.0f s, max %.0f s"
              % (statistics.median(delays), max(delays)))
    print("  cut-offs in a protected window %6d   (must be 0)"
          % sum(1 for c in b.cutoffs if c[2]))
    print("  cut-offs under guarantee      %7d   (must be 0)"
          % sum(1 for c in b.cutoffs if c[3]))
    print("  breaker trips                 %7d" % b.events["costcontrol.breaker_tripped"])
    sts = b.statements()
    by_account = collections.defaultdict(list)
    for st in sts:
        by_account[st["meter"]].append(st)
    bad = set()
    for m, lst in by_account.items():
        for a, c in zip(lst, lst[1:]):
            if a["closing_balance"] != c["opening_balance"] or \
                    a["debt"]["closing"] != c["debt"]["opening"]:
                bad.add(m)
        if not all(map(reconciles, lst)):
            bad.add(m)
    print("\n  statements                    %7d   (%d accounts x %d days stated)"
          % (len(sts), len(by_account), len(sts) // max(1, len(by_account))))
    print("  accounts not reconciling      %7d   (must be 0)" % len(bad))
    print("  statement.mismatch            %7d   (meters offline for a day: %d)"
          % (b.events["statement.mismatch"], sum(1 for h in b.homes if h.offline_day)))
    recovered = sum(Decimal(st["recovered"]) for st in sts)
    print("  debt recovered                %10s yuan (%d recoveries)"
          % (recovered, b.events["debt.recovered"]))
    print("\n  events by kind:")
    for k in sorted(k for k in b.events if k.startswith(("grade", "forecast"))):
        print("    %-28s %7d" % (k, b.events[k]))
    errs, censored = [], 0
    for meter, t, left in b.forecasts:
        later = [x for x in b.ran_out[meter] if x >= t]
        if not later:
            censored += 1
            continue
        errs.append(float((Decimal(later[0] - t) / 86400) - left))
    if errs:
        print("\n  forecast error (actual - forecast days), %d forecasts that ran out: "
              "mean %+.2f, mean |error| %.2f, p90 |error| %.2f"
              % (len(errs), statistics.mean(errs), statistics.mean(map(abs, errs)),
                 sorted(map(abs, errs))[int(len(errs) * 0.9) - 1] if len(errs) > 1 else 0))
    print("  forecasts not run out (topped up before): %d" % censored)


def _written_bytes():
    """Bytes this process caused to be written to storage (None where /proc has no io)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _size(path):
    return sum(os.path.getsize(path + sfx) for sfx in ("", "-wal") if os.path.exists(path + sfx))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--households", type=int, default=1000)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  ".."),
                    help="where to put the files (use the data partition: fsync cost matters)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix=".mgw-bench-recovery-", dir=args.dir)
    try:
        print("meter-gateway fee-recovery benchmark: %d households x %d simulated days, "
              "hourly readings, real cost control, journal and account store; %s"
              % (args.households, args.days, folder))
        b = Bench(folder, args.households, args.days)
        feed_s, cc_s = b.run()
        report(b, feed_s, cc_s, args.households, args.days)
        b.journal.close()
        b.docs.close()
        b.state.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
