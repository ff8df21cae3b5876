"""An independent reference model of the billing rules, compared with gateway.billing.

The model is written from docs/cost-control.md ("How a charge is computed", "What is never
billed", "Billing on hold"), not from the code: it reads the tariff's configuration table
itself, works on datetimes and Fractions, finds rate changes by testing every window edge,
and prices one 0.01 kWh step at a time. It imports nothing from the gateway but the object
under test (Billing, new_account_doc, the tariff's from_config to build it).

Examples: a few hundred by default (CI); the full run sets MGW_BILLING_EXAMPLES, e.g.
    MGW_BILLING_EXAMPLES=20000 python -m pytest -q tests/test_billing_model.py
"""

import copy
import datetime as dt
import os
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.billing.tariff import from_config
from gateway.billing.pricing import Billing, _as_tuple
from gateway.billing.costcontrol import new_account_doc

EXAMPLES = int(os.environ.get("MGW_BILLING_EXAMPLES", "300"))
RATE_NAMES = ("sharp", "peak", "flat", "valley")
MS = dt.timedelta(milliseconds=1)


# ---------------------------------------------------------------- the model

def units(text):
    """yuan/kWh -> micro-yuan per 0.01 kWh."""
    return int(Fraction(Decimal(text)) * 10000)


def hhmm(text):
    h, m = text.split(":")
    return int(h) * 60 + int(m)


class ModelTariff:
    def __init__(self, doc):
        self.kind = doc["kind"]
        self.tou = self.kind in ("tou", "tiered_tou")
        self.tiered = self.kind in ("tiered", "tiered_tou")
        if self.tou:
            self.prices = {r: units(p) for r, p in doc["prices"].items()}
            self.schedule = [(hhmm(w["from"]), hhmm(w["to"]), w["rate"])
                             for w in doc["schedule"]]
            self.seasons = [(set(s["months"]), [(hhmm(w["from"]), hhmm(w["to"]), w["rate"])
                                                for w in s["schedule"]])
                            for s in doc.get("seasons", [])]
        else:
            self.base = units(doc["price"])
        self.ladder = []
        if self.tiered:
            for step in doc["ladder"]:
                bound = step.get("upto_kwh")
                self.ladder.append((None if bound is None else int(Decimal(bound) * 100),
                                    units(step.get("surcharge", "0"))))
        self.period = doc.get("period", "annual")
        self.month = doc.get("reset_month", 1)
        self.day = doc.get("reset_day", 1)
        self.hour = doc.get("reset_hour", 0)

    def windows(self, when):
        for months, sched in self.seasons:
            if when.month in months:
                return sched
        return self.schedule

    def rate_at(self, when):
        m = when.hour * 60 + when.minute
        for start, end, rate in self.windows(when):
            end = end if end else 1440
            if (start <= m < end) if start < end else (m >= start or m < end):
                return rate
        raise AssertionError("no window at %s" % when)

    def period_start(self, when):
        cands = []
        for y in (when.year - 1, when.year):
            if self.period == "annual":
                cands.append(dt.datetime(y, self.month, self.day, self.hour))
            else:
                cands += [dt.datetime(y, mo, self.day, self.hour) for mo in range(1, 13)]
        return max(c for c in cands if c <= when)

    def period_starts_between(self, a, b):
        """Period starts s with a < s < b."""
        out = []
        s = self.period_start(b)
        while s > a:
            if s < b:
                out.append(s)
            s = self.period_start(s - MS)
        return sorted(out)

    def edges_between(self, a, b):
        """Every instant in (a, b) where a window starts or ends, and every midnight."""
        out = set()
        day = a.date()
        while day <= b.date():
            midnight = dt.datetime.combine(day, dt.time())
            for start, end, _ in self.windows(midnight):
                for m in (0, start, end):
                    x = midnight + dt.timedelta(minutes=m)
                    if a < x < b:
                        out.add(x)
            day += dt.timedelta(days=1)
        return out

    def surcharge(self, counter):
        for bound, extra in self.ladder:
            if bound is None or counter < bound:
                return extra
        raise AssertionError("the last step has no bound")


def steps_of(text):
    d = Decimal(text)
    if not d.is_finite():
        raise InvalidOperation
    return int(d.quantize(Decimal("0.01"), rounding=ROUND_DOWN) * 100)


def share(steps, lengths):
    """Largest remainder, exact; the earliest part first on a tie."""
    total = sum(lengths)
    exact = [Fraction(steps * n, total) for n in lengths]
    parts = [int(x) for x in exact]
    order = sorted(range(len(lengths)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[:steps - sum(parts)]:
        parts[i] += 1
    return parts


class Model:
    def __init__(self, tdoc, max_kw):
        self.t = ModelTariff(tdoc)
        self.max_kw = Fraction(Decimal(max_kw))
        self.regs = None              # {"total": text, rate: text}
        self.ts = None
        self.charges = 0
        self.bands = {}               # {rate or "single": [steps, micro-yuan]}
        self.period = None            # datetime of the tier period's start
        self.counter = 0
        self.held = False

    @staticmethod
    def local(ts):
        return dt.datetime.fromtimestamp(ts // 1000) + (ts % 1000) * MS

    def reading(self, values, ts):
        """values: {"total": text, "sharp": text, ...}; returns events [(type, detail)]."""
        try:
            return self._reading(values, ts)
        except (InvalidOperation, ValueError, LookupError) as exc:
            if self.held:
                return []
            self.held = True
            return [("billing.held", str(exc)[:0])]

    def _resume(self, events):
        if self.held:
            self.held = False
            events.append(("billing.resumed", ""))
        return events

    def _store(self, values, ts, events):
        self.regs = dict(values)
        self.ts = ts
        return self._resume(events)

    def _reading(self, values, ts):
        new = {k: steps_of(v) for k, v in values.items()}
        if self.regs is None:
            return self._store(values, ts, [])
        old = {k: steps_of(v) for k, v in self.regs.items()}
        for k in ("total",) + RATE_NAMES:
            if k in new and k in old and new[k] < old[k]:
                return self._store(values, ts, [("meter.register_decrease", k)])
        growth = new["total"] - old["total"]
        hours = Fraction(max(0, ts - self.ts), 3600000)
        if growth > (self.max_kw * hours * Fraction(12, 10) + 1) * 100:
            return self._store(values, ts, [("meter.register_jump", "total")])
        a, b = self.local(self.ts), self.local(ts)
        events = []
        parts = None                  # [(instant for the period, rate, steps)]
        mine = [r for r in RATE_NAMES if r in new]
        theirs = [r for r in RATE_NAMES if r in old]
        if self.t.tou and mine and mine == theirs:
            deltas = [(r, new[r] - old[r]) for r in mine]
            if abs(growth - sum(d for _, d in deltas)) <= 3:
                parts = self.register_parts(deltas, a, b)
            else:
                events.append(("meter.registers_inconsistent", ""))
        if parts is None:
            parts = self.time_parts(growth, a, b)
        cost, counter, period = 0, self.counter, self.period
        bands = {}                    # kept only when the whole reading is priced
        for when, rate, n in parts:
            if self.t.tou:
                price = self.t.prices[rate]          # KeyError: a rate with no price
            else:
                price = self.t.base
            if self.t.tiered:
                p = self.t.period_start(when)
                if p != period:
                    period, counter = p, 0
            band = bands.setdefault(rate if self.t.tou else "single", [0, 0])
            for _ in range(n):
                step = price + (self.t.surcharge(counter) if self.t.tiered else 0)
                cost += step
                band[0] += 1
                band[1] += step
                counter += 1
        self.charges += cost
        for name, (n, c) in bands.items():
            total = self.bands.setdefault(name, [0, 0])
            total[0] += n
            total[1] += c
        if self.t.tiered:
            self.counter, self.period = counter, period
        return self._store(values, ts, events)

    def register_parts(self, deltas, a, b):
        deltas = [(r, d) for r, d in deltas if d > 0]
        if b <= a:
            return [(b - MS, r, d) for r, d in deltas]
        if not self.t.tiered:
            return [(a, r, d) for r, d in deltas]
        cuts = [a] + self.t.period_starts_between(a, b) + [b]
        lengths = [(y - x) // MS for x, y in zip(cuts, cuts[1:])]
        split = [share(d, lengths) for _, d in deltas]
        return [(cuts[k], r, parts[k]) for k in range(len(lengths))
                for (r, _), parts in zip(deltas, split) if parts[k]]

    def time_parts(self, steps, a, b):
        if steps <= 0:
            return []
        if b <= a:
            x = b - MS
            return [(x, self.t.rate_at(x) if self.t.tou else None, steps)]
        cuts = set()
        if self.t.tou:
            cuts |= self.t.edges_between(a, b)
        if self.t.tiered:
            cuts |= set(self.t.period_starts_between(a, b))
        cuts = [a] + sorted(cuts) + [b]
        runs = []                     # [start, end, label]
        for x, y in zip(cuts, cuts[1:]):
            label = (self.t.rate_at(x) if self.t.tou else None,
                     self.t.period_start(x) if self.t.tiered else None)
            if runs and runs[-1][2] == label:
                runs[-1][1] = y
            else:
                runs.append([x, y, label])
        parts = share(steps, [(y - x) // MS for x, y, _ in runs])
        return [(x, label[0], n) for (x, _, label), n in zip(runs, parts) if n]


def priced(bands):
    """Bands that were charged money (a free rate's steps are nobody's concern, and the
    model reads a register that is not a meter's number differently at price 0)."""
    return {b: v for b, v in bands.items() if v[1]}


# ---------------------------------------------------------------- random tariffs

def price_text(u):
    return "%d.%04d" % divmod(u, 10000)


@st.composite
def schedules(draw, rates):
    cuts = sorted(set(draw(st.lists(st.sampled_from(
        [0, 1, 59, 360, 420, 479, 480, 600, 660, 1020, 1080, 1140, 1260, 1320, 1439]) |
        st.integers(0, 1439), min_size=1, max_size=5))))
    if len(cuts) == 1:
        return [{"from": "00:00", "to": "24:00", "rate": draw(st.sampled_from(rates))}]
    out = []
    for i, c in enumerate(cuts):
        end = cuts[(i + 1) % len(cuts)]
        out.append({"from": "%02d:%02d" % divmod(c, 60), "to": "%02d:%02d" % divmod(end, 60),
                    "rate": draw(st.sampled_from(rates))})
    return draw(st.permutations(out))


@st.composite
def tariffs(draw):
    kind = draw(st.sampled_from(["flat", "tiered", "tou", "tiered_tou"]))
    doc = {"kind": kind}
    price = st.integers(0, 15000)
    if kind in ("tou", "tiered_tou"):
        rates = draw(st.lists(st.sampled_from(RATE_NAMES), min_size=1, max_size=4,
                              unique=True))
        doc["prices"] = {r: price_text(draw(price)) for r in rates}
        doc["schedule"] = draw(schedules(rates))
        months = draw(st.permutations(list(range(1, 13))))
        seasons = []
        for k in range(draw(st.integers(0, 2))):
            chunk = months[k * 3:k * 3 + draw(st.integers(1, 3))]
            seasons.append({"months": list(chunk), "schedule": draw(schedules(rates))})
        if seasons:
            doc["seasons"] = seasons
    else:
        doc["price"] = price_text(draw(price))
    if kind in ("tiered", "tiered_tou"):
        bounds = sorted(set(draw(st.lists(st.integers(1, 5000), min_size=0, max_size=3))))
        doc["ladder"] = [{"upto_kwh": str(Decimal(b).scaleb(-2)),
                          "surcharge": price_text(draw(st.integers(0, 5000)))}
                         for b in bounds] + [{"surcharge": price_text(draw(st.integers(0,
                                                                                       5000)))}]
        doc["period"] = draw(st.sampled_from(["annual", "monthly"]))
        if doc["period"] == "annual" and draw(st.booleans()):
            doc["reset_month"] = draw(st.integers(1, 12))
        doc["reset_day"] = draw(st.sampled_from([1, 15, 28]) | st.integers(1, 28))
        doc["reset_hour"] = draw(st.sampled_from([0, 8, 23]) | st.integers(0, 23))
    return doc


ANCHORS = [dt.datetime(2028, 2, 28, 23, 0), dt.datetime(2028, 2, 29, 12, 0),
           dt.datetime(2027, 12, 31, 22, 30), dt.datetime(2026, 6, 30, 23, 45),
           dt.datetime(2026, 1, 15, 0, 0), dt.datetime(2026, 3, 1, 7, 0),
           dt.datetime(2026, 9, 30, 21, 59)]
INTERVALS_MS = [0, 1000, 30000, 60000, 120000, 300000, 600000, 900000, 3600000, 3 * 3600000,
                86400000, 40 * 86400000]


@st.composite
def scenarios(draw):
    tdoc = draw(tariffs())
    max_kw = draw(st.sampled_from(["60", "10", "2.5", "0.5"]))
    start = draw(st.sampled_from(ANCHORS))
    if tdoc["kind"] in ("tiered", "tiered_tou") and draw(st.booleans()):
        # next to a billing date
        month = tdoc.get("reset_month", draw(st.integers(1, 12)))
        start = dt.datetime(2027, month, tdoc["reset_day"], tdoc["reset_hour"])
    start += dt.timedelta(minutes=draw(st.sampled_from([0, -15, 15]) | st.integers(-90, 90)))
    ts = int(start.timestamp()) * 1000
    regs = draw(st.booleans())
    digits = draw(st.sampled_from([2, 2, 3]))
    rates = list(RATE_NAMES)
    wh = {r: draw(st.integers(0, 10 ** 6)) for r in rates}
    readings = []
    for _ in range(draw(st.integers(2, 10))):
        values = {"total": str(Decimal(sum(wh.values()) // 10 ** (3 - digits))
                               .scaleb(-digits))}
        if regs and draw(st.integers(0, 9)):
            for r in rates:
                values[r] = str(Decimal(wh[r] // 10 ** (3 - digits)).scaleb(-digits))
        special = draw(st.integers(0, 29))
        if special == 0:
            values["total"] = str(Decimal(values["total"]) - 1)            # goes down
        elif special == 1 and len(values) > 1:
            values["valley"] = "0.00"                                       # a T goes down
        elif special == 2:
            values["total"] = '"n/a"'                                        # not a number
        elif special in (3, 4, 5) and len(values) > 1:
            # registers ahead of the total by 0.03 (truncation can explain it), 0.04 or
            # 0.07 (it cannot)
            extra = {3: "0.03", 4: "0.04", 5: "0.07"}[special]
            r = draw(st.sampled_from(rates))
            values[r] = str(Decimal(values[r]) + Decimal(extra))
        readings.append((values, ts))
        step = draw(st.sampled_from(INTERVALS_MS))
        if draw(st.booleans()):
            step += draw(st.integers(0, 999))
        ts += step
        kind = draw(st.integers(0, 9))
        if kind == 0:         # exactly at the jump limit, or 0.01 kWh above it
            limit = Fraction(Decimal(max_kw)) * Fraction(step, 3600000) * Fraction(6, 5) * 100 \
                + 100
            use = int(limit) * 10 + draw(st.sampled_from([0, 10])) * (limit.denominator == 1)
        elif kind == 1:
            use = draw(st.integers(0, 300000))                               # big
        else:
            use = draw(st.integers(0, 4000))
        split = draw(st.sampled_from(rates))
        other = draw(st.sampled_from(rates))
        first = draw(st.integers(0, use))
        wh[split] += first
        wh[other] += use - first
    return tdoc, max_kw, readings


def json_text(v):
    return v     # journal JSON text of a Decimal is its string; '"n/a"' a JSON string


QUANTITY = {"total": "energy.import.total", "sharp": "energy.import.t1",
            "peak": "energy.import.t2", "flat": "energy.import.t3",
            "valley": "energy.import.t4"}


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios())
def test_billing_agrees_with_the_reference_model(scenario):
    tdoc, max_kw, readings = scenario
    acc = {"meter": "m1", "opening_balance": Decimal("100.00"), "alarm1": Decimal("20.00"),
           "alarm2": Decimal("10.00"), "overdraft_limit": Decimal("0.00"),
           "restore_threshold": Decimal("0.00"), "max_kw": Decimal(max_kw), "mode": "local"}
    billing = Billing(acc, from_config("t", tdoc))
    doc = new_account_doc(acc)
    model = Model(tdoc, max_kw)
    for i, (values, ts) in enumerate(readings):
        group = {QUANTITY[k]: (json_text(v), ts) for k, v in values.items()}
        events = []
        billing.apply(doc, group, events, seq=i + 1, now=0)
        expected = model.reading(values, ts)
        got = [(t, f.get("register", "").replace("energy.import.", "")
                .replace("t1", "sharp").replace("t2", "peak").replace("t3", "flat")
                .replace("t4", "valley") if t == "meter.register_decrease" else
                ("total" if t == "meter.register_jump" else "")) for t, f in events]
        assert got == expected, (i, values, ts)
        assert doc["charges_uy"] == model.charges, (i, values, ts)
        assert priced(billing.bands) == priced(model.bands), (i, values)
        assert doc["balance_uy"] == doc["opening_uy"] - model.charges
        assert bool(doc.get("billing_hold")) == model.held, (i, values, ts)
        if model.t.tiered and model.period is not None:
            assert doc["tier_centi"] == model.counter, (i, values, ts)
            assert doc["tier_period"] == model.period.isoformat(), (i, values, ts)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenarios(), st.integers(1, 4))
def test_a_batch_bills_as_the_rules_reading_by_reading(scenario, cut):
    """apply_batch (the cycle's path: integers kept between readings, the rules only for
    the unusual reading) leaves the same document and the same events, in the same order,
    as the rules (`_apply_checked`) applied to each reading in turn; and the model agrees
    on the charges. The readings go in as batches of `cut`-ish sizes, the watch asked
    after every reading whose balance leaves its range."""
    tdoc, max_kw, readings = scenario
    acc = {"meter": "m1", "opening_balance": Decimal("100.00"), "alarm1": Decimal("20.00"),
           "alarm2": Decimal("10.00"), "overdraft_limit": Decimal("0.00"),
           "restore_threshold": Decimal("0.00"), "max_kw": Decimal(max_kw), "mode": "local"}
    tariff = from_config("t", tdoc)
    rules, batch = Billing(acc, tariff), Billing(acc, tariff)
    doc_r = new_account_doc(acc)
    doc_b = copy.deepcopy(doc_r)
    events_r, events_b = [], []
    balances_r, balances_b = [], []
    items = []
    for i, (values, ts) in enumerate(readings):
        group = {QUANTITY[k]: (json_text(v), ts) for k, v in values.items()}
        evs = []
        rules._apply_checked(doc_r, group, evs, seq=i + 1, now=0)
        events_r += [(i, t, f) for t, f in evs]
        balances_r.append(doc_r["balance_uy"])
        items.append((i, i + 1, ts, {q: v for q, (v, _) in group.items()}))

    def moved(doc, tag):
        balances_b.append((tag, doc["balance_uy"]))
        return doc["balance_uy"] - 1 - tag % 3, doc["balance_uy"]  # a range, any range

    watch = [0, 0, moved]
    for k in range(0, len(items), cut):
        batch.apply_batch(doc_b, items[k:k + cut], events_b, watch, now=0)
    assert doc_b == doc_r
    assert events_b == events_r
    # the watch saw the balance after every reading that left the range it was given
    for tag, bal in balances_b:
        assert bal == balances_r[tag]
    model = Model(tdoc, max_kw)
    for values, ts in readings:
        model.reading(values, ts)
    assert doc_b["charges_uy"] == model.charges
    # the charges per band (the statements' bands) as the model prices them step by step
    assert priced(batch.take_bands()) == priced(model.bands)
    assert priced(rules.take_bands()) == priced(model.bands) and batch.bands == {}


@st.composite
def long_runs(draw):
    """Days of quarter-hour readings as meters send them (the cycle's common case), with
    now and then what sends a reading to the rules: a billing date, a season, a register
    that goes down, a jump, a value that is not a number, a total without registers."""
    tdoc = draw(tariffs())
    start = draw(st.sampled_from(ANCHORS)) + dt.timedelta(minutes=draw(st.integers(-600, 600)))
    ts = int(start.timestamp()) * 1000
    regs = draw(st.booleans())
    wh = {r: draw(st.integers(0, 10 ** 6)) for r in RATE_NAMES}
    out = []
    for _ in range(draw(st.integers(20, 300))):
        values = {"total": str(Decimal(sum(wh.values()) // 10).scaleb(-2))}
        if regs:
            for r in RATE_NAMES:
                values[r] = str(Decimal(wh[r] // 10).scaleb(-2))
        odd = draw(st.integers(0, 60))
        if odd == 0:
            values["total"] = str(Decimal(values["total"]) - 1)
        elif odd == 1:
            values["total"] = '"n/a"'
        elif odd == 2 and regs:
            del values[draw(st.sampled_from(RATE_NAMES))]
        elif odd == 3:
            values = {k: v for k, v in values.items() if k == "total"}
        out.append((values, ts))
        ts += draw(st.sampled_from([900000] * 8 + [0, 60000, 3600000, 86400000]))
        r = draw(st.sampled_from(RATE_NAMES))
        wh[r] += draw(st.sampled_from([0, 5, 30, 250, 600]) | st.integers(0, 3000))
    return tdoc, out


@settings(max_examples=max(20, EXAMPLES // 10), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(long_runs(), st.sampled_from([1, 7, 96, 10 ** 6]))
def test_long_runs_bill_in_batches_as_the_rules_do(run, cut):
    tdoc, readings = run
    acc = {"meter": "m1", "opening_balance": Decimal("300.00"), "alarm1": Decimal("200.00"),
           "alarm2": Decimal("100.00"), "overdraft_limit": Decimal("50.00"),
           "restore_threshold": Decimal("0.00"), "max_kw": Decimal("60"), "mode": "local"}
    tariff = from_config("t", tdoc)
    rules, batch = Billing(acc, tariff), Billing(acc, tariff)
    doc_r = new_account_doc(acc)
    doc_b = copy.deepcopy(doc_r)
    events_r, events_b, items, balances_r = [], [], [], []
    for i, (values, ts) in enumerate(readings):
        group = {QUANTITY[k]: (v, ts) for k, v in values.items()}
        evs = []
        rules._apply_checked(doc_r, group, evs, seq=i + 1, now=0)
        events_r += [(i, t, f) for t, f in evs]
        balances_r.append(doc_r["balance_uy"])
        items.append((i, i + 1, ts, {q: v for q, (v, _) in group.items()}))
    for k in range(0, len(items), cut):
        batch.apply_batch(doc_b, items[k:k + cut], events_b, now=0)
    assert doc_b == doc_r
    assert events_b == events_r
    # the same readings as the journal's energy table gives them, (total, t1..t4) tuples,
    # watched as cost control watches them: runs of readings billed at once stop exactly
    # where the balance leaves the watched range
    rows = Billing(acc, tariff)
    doc_t = new_account_doc(acc)
    events_t, seen = [], []

    def around(bal, tag):
        return bal - 1 - (tag % 7) * 20000, bal + (tag % 2)

    def moved(doc, tag):
        seen.append((tag, doc["balance_uy"]))
        watch[:2] = around(doc["balance_uy"], tag)      # the next batch starts from it
        return watch[0], watch[1]
    watch = [0, 0, moved]
    tuples = [(tag, seq, ts, _as_tuple(values)) for tag, seq, ts, values in items]
    for k in range(0, len(tuples), cut):
        rows.apply_batch(doc_t, tuples[k:k + cut], events_t, watch, now=0)
    doc_t["state_since"] = doc_r["state_since"]
    assert doc_t == doc_r
    assert events_t == events_r
    # runs billed at once charge each band what the rules charge it reading by reading
    assert rows.take_bands() == batch.take_bands() == rules.take_bands()
    assert sum(c for _, c in rules.bands.values()) == 0
    expected, (low, high) = [], (0, 0)
    for tag, bal in enumerate(balances_r):
        if not low < bal <= high:
            expected.append((tag, bal))
            low, high = around(bal, tag)
    assert seen == expected


@pytest.mark.parametrize("registers", [True, False])
def test_runs_of_readings_are_billed_at_once_as_the_rules_bill_them(monkeypatch, registers):
    """A long clean batch (the journal's energy rows after an outage: the total, with or
    without T1..T4, every quarter hour) on a tiered time-of-use tariff, across a billing
    date, ladder steps, changes of rate and the balance thresholds: apply_batch bills most
    readings in runs (`_run_at`), and the document, the events and the watch's calls are
    those of the rules reading by reading."""
    import gateway.billing.pricing as pricing
    tdoc = {"kind": "tiered_tou", "period": "monthly", "reset_day": 1,
            "prices": {"sharp": "1.0253", "peak": "0.8653", "flat": "0.5283",
                       "valley": "0.3015"},
            "schedule": [{"from": "00:00", "to": "08:00", "rate": "valley"},
                         {"from": "08:00", "to": "17:00", "rate": "peak"},
                         {"from": "17:00", "to": "21:00", "rate": "sharp"},
                         {"from": "21:00", "to": "24:00", "rate": "flat"}],
            "ladder": [{"upto_kwh": "30", "surcharge": "0"},
                       {"upto_kwh": "60", "surcharge": "0.05"}, {"surcharge": "0.30"}]}
    tariff = from_config("t", tdoc)
    acc = {"meter": "m1", "opening_balance": Decimal("80.00"), "alarm1": Decimal("60.00"),
           "alarm2": Decimal("30.00"), "overdraft_limit": Decimal("20.00"),
           "restore_threshold": Decimal("0.00"), "max_kw": Decimal("60"), "mode": "local"}
    rate_of_hour = [3] * 8 + [1] * 9 + [0] * 4 + [2] * 3
    wh = [1234560, 2345670, 3456780, 456780]
    ts = int(dt.datetime(2026, 3, 30, 18, 0).timestamp()) * 1000
    items = []
    for i in range(600):
        hour = dt.datetime.fromtimestamp(ts / 1000).hour
        wh[rate_of_hour[hour]] += (i * 37) % 400 + (3 if i % 50 == 7 else 0)
        texts = tuple(str(Decimal(w // 10).scaleb(-2)) for w in wh)
        total = str(Decimal(sum(wh) // 10).scaleb(-2))
        items.append((i, i + 1, ts, (total,) + (texts if registers else (None,) * 4)))
        ts += 900000
    runs = []
    real = Billing._run_at

    def counted(self, *a):
        got = real(self, *a)
        if got is not None:
            runs.append(got[0] - a[1])
        return got
    monkeypatch.setattr(Billing, "_run_at", counted)

    rules, batch = Billing(acc, tariff), Billing(acc, tariff)
    doc_r, doc_b = new_account_doc(acc), new_account_doc(acc)
    doc_b["state_since"] = doc_r["state_since"]
    events_r, balances_r = [], []
    for tag, seq, when, values in items:
        evs = []
        group = {q: (v, when) for q, v in zip(pricing._QUANTITIES, values) if v is not None}
        rules._apply_checked(doc_r, group, evs, seq=seq, now=0)
        events_r += [(tag, t, f) for t, f in evs]
        balances_r.append(doc_r["balance_uy"])
    seen, events_b = [], []
    thresholds = [yuan * 10 ** 6 for yuan in (60, 30, 0, -20)]

    def around(bal):
        return (max([p for p in thresholds if p < bal], default=-10 ** 30),
                min([p for p in thresholds if p >= bal], default=10 ** 30))

    def moved(doc, tag):
        seen.append((tag, doc["balance_uy"]))
        return around(doc["balance_uy"])
    batch.apply_batch(doc_b, items, events_b, list(around(doc_b["balance_uy"])) + [moved],
                      now=0)
    assert doc_b == doc_r and events_b == events_r
    # the same with the columns cost control passes along (the journal's, not unzipped)
    columns = [[it[2] for it in items]] + [list(c) for c in zip(*(it[3] for it in items))]
    doc_c, events_c = new_account_doc(acc), []
    doc_c["state_since"] = doc_r["state_since"]
    Billing(acc, tariff).apply_batch(doc_c, items, events_c,
                                     list(around(doc_c["balance_uy"])) + [lambda d, t: around(
                                         d["balance_uy"])], now=0, columns=columns)
    assert doc_c == doc_r and events_c == events_r
    low, high = around(balances_r[0] + 1)
    expected = []
    for tag, bal in enumerate(balances_r):
        if not low < bal <= high:
            expected.append((tag, bal))
            low, high = around(bal)
    assert seen == expected and len(expected) >= 3
    assert doc_r["tier_period"] and doc_r["tier_centi"] > 6000
    assert sum(runs) > (500 if registers else 400) and len(runs) > 5
