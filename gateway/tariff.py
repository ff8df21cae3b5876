"""Tariffs: flat, tiered (annual or monthly ladders from a billing date), time-of-use
(sharp/peak/flat/valley periods, across midnight, seasonal calendars), and tiered +
time-of-use combined.

Money is exact. Prices have at most 4 decimals (yuan/kWh); energy is counted in steps of
0.01 kWh, as local-prepay meters deduct; one step costs (time-of-use price + tier surcharge)
x 0.01 yuan, which is an exact number of micro-yuan (1e-6 yuan). The tier is re-evaluated at
every step, so a ladder boundary inside one reading is priced on both sides of it. Balances
are kept in micro-yuan; shown in yuan with 2 decimals, rounded half up (the only rounding).
"""

import datetime as _dt
from decimal import ROUND_HALF_UP, Decimal

RATES = ("sharp", "peak", "flat", "valley")          # T1..T4 of DL/T 645 meters
MICRO = 1000000


def yuan_to_micro(amount):
    d = Decimal(amount) * MICRO
    if d != d.to_integral_value():
        raise ValueError("amount %s has more than 6 decimals" % amount)
    return int(d)


def micro_to_yuan(micro):
    return (Decimal(micro) / MICRO).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def price_units(price):
    """A price in yuan/kWh (<= 4 decimals) as micro-yuan per 0.01 kWh step."""
    d = Decimal(price) * 10000
    if d != d.to_integral_value():
        raise ValueError("price %s has more than 4 decimals" % price)
    return int(d)


def parse_hhmm(text):
    h, m = text.split(":")
    h, m = int(h), int(m)
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError("not a time of day: %r" % text)
    return h * 60 + m


class TimeOfUse:
    """Rates by minute of day, per season. schedule: [(from_min, to_min, rate)], periods
    may wrap midnight (from > to)."""

    def __init__(self, prices, schedule, seasons=()):
        self.prices = {r: price_units(p) for r, p in prices.items()}
        self.default = self._table(schedule)
        self.seasons = [(set(months), self._table(s)) for months, s in seasons]

    def _table(self, schedule):
        table = [None] * 1440
        for start, end, rate in schedule:
            if rate not in self.prices:
                raise ValueError("rate %r has no price" % rate)
            m = start
            while True:
                table[m % 1440] = rate
                m += 1
                if m % 1440 == end % 1440:
                    break
        if None in table:
            missing = table.index(None)
            raise ValueError("schedule leaves %02d:%02d without a rate"
                             % (missing // 60, missing % 60))
        return table

    def rate_at(self, when):
        table = self.default
        for months, t in self.seasons:
            if when.month in months:
                table = t
                break
        return table[when.hour * 60 + when.minute]

    def price_at(self, when):
        return self.prices[self.rate_at(when)]

    def next_change(self, when):
        """The next minute boundary where the rate (or season) may change after `when`."""
        table = self.default
        for months, t in self.seasons:
            if when.month in months:
                table = t
        minute = when.hour * 60 + when.minute
        rate = table[minute]
        midnight = when.replace(hour=0, minute=0, second=0, microsecond=0) + \
            _dt.timedelta(days=1)             # seasons are looked up again each day
        for k in range(1, 1440 - minute):
            if table[minute + k] != rate:
                return when.replace(second=0, microsecond=0) + _dt.timedelta(minutes=k)
        return midnight


class Tariff:
    """One tariff: a base (flat price or time-of-use) plus an optional tier ladder."""

    def __init__(self, name, base_price=None, tou=None, ladder=(), period="annual",
                 reset_day=1, reset_hour=0):
        self.name = name
        self.base = price_units(base_price) if base_price is not None else None
        self.tou = tou
        # ladder: [(upper bound in 0.01 kWh or None, surcharge units)]
        self.ladder = list(ladder)
        self.period = period
        self.reset_day = reset_day
        self.reset_hour = reset_hour

    @property
    def tiered(self):
        return bool(self.ladder)

    def unit_price(self, when, tier_centi, rate=None):
        base = self.tou.prices[rate] if (self.tou and rate) else \
            self.tou.price_at(when) if self.tou else self.base
        return base + self.surcharge(tier_centi)

    def surcharge(self, tier_centi):
        for upper, extra in self.ladder:
            if upper is None or tier_centi < upper:
                return extra
        return self.ladder[-1][1] if self.ladder else 0

    def steps_to_next_tier(self, tier_centi):
        for upper, _ in self.ladder:
            if upper is not None and tier_centi < upper:
                return upper - tier_centi
        return None

    def period_start(self, when):
        """Start of the tier period containing `when` (billing day 1-28 and hour)."""
        if self.period == "monthly":
            start = when.replace(day=self.reset_day, hour=self.reset_hour, minute=0, second=0,
                                 microsecond=0)
            if start > when:
                month = start.month - 1 or 12
                year = start.year - (1 if start.month == 1 else 0)
                start = start.replace(year=year, month=month)
            return start
        start = when.replace(month=1, day=self.reset_day, hour=self.reset_hour, minute=0,
                             second=0, microsecond=0)
        if start > when:
            start = start.replace(year=start.year - 1)
        return start

    def next_period_start(self, when):
        start = self.period_start(when)
        if self.period == "monthly":
            month = start.month % 12 + 1
            year = start.year + (1 if start.month == 12 else 0)
            return start.replace(year=year, month=month)
        return start.replace(year=start.year + 1)

    def charge(self, steps, when, tier_centi, rate=None):
        """Cost in micro-yuan of `steps` x 0.01 kWh at `when`, the tier counter starting at
        tier_centi; the tier is re-evaluated at every step (ladder boundaries split)."""
        cost = 0
        while steps > 0:
            room = self.steps_to_next_tier(tier_centi) if self.ladder else None
            n = steps if room is None else min(steps, room)
            cost += n * self.unit_price(when, tier_centi, rate)
            steps -= n
            tier_centi += n
        return cost, tier_centi


def split_interval(centi, t0, t1, tariff):
    """Energy consumed between t0 and t1 attributed to segments where the price is constant
    (time-of-use changes, tier period resets), in proportion to their duration, in whole
    0.01 kWh steps (largest remainder, so the parts add up exactly)."""
    if centi <= 0:
        return []
    if t1 <= t0:
        return [(t1, centi)]
    bounds = [t0]
    t = t0
    while True:
        nxt = t1
        if tariff.tou is not None:
            nxt = min(nxt, tariff.tou.next_change(t))
        if tariff.ladder:
            nxt = min(nxt, tariff.next_period_start(t))
        if nxt >= t1:
            break
        bounds.append(nxt)
        t = nxt
    bounds.append(t1)
    total = (t1 - t0).total_seconds()
    shares = []
    for a, b in zip(bounds, bounds[1:]):
        exact = Decimal(centi) * Decimal((b - a).total_seconds()) / Decimal(total)
        shares.append([a, int(exact), exact - int(exact)])
    left = centi - sum(s[1] for s in shares)
    for s in sorted(shares, key=lambda s: -s[2])[:left]:
        s[1] += 1
    return [(a, n) for a, n, _ in shares if n]


def from_config(name, doc):
    """A Tariff from its [tariffs.NAME] table; raises ValueError naming the key."""
    kind = doc.get("kind")
    if kind not in ("flat", "tiered", "tou", "tiered_tou"):
        raise ValueError("kind: must be flat, tiered, tou or tiered_tou, not %r" % (kind,))
    tou = None
    base = None
    if kind in ("tou", "tiered_tou"):
        prices = doc.get("prices")
        if not isinstance(prices, dict) or not prices:
            raise ValueError("prices: a table of rate = \"price\" (sharp, peak, flat, valley)")
        for rate, p in prices.items():
            if rate not in RATES:
                raise ValueError("prices.%s: rates are %s" % (rate, ", ".join(RATES)))
            if not isinstance(p, str):
                raise ValueError("prices.%s: a decimal string such as \"0.5283\"" % rate)
        schedule = _schedule(doc.get("schedule"), "schedule")
        seasons = []
        for i, s in enumerate(doc.get("seasons", [])):
            months = s.get("months")
            if not isinstance(months, list) or not all(isinstance(m, int) and 1 <= m <= 12
                                                       for m in months):
                raise ValueError("seasons[%d].months: a list of month numbers 1-12" % i)
            seasons.append((months, _schedule(s.get("schedule"), "seasons[%d].schedule" % i)))
        try:
            tou = TimeOfUse(prices, schedule, seasons)
        except ValueError as exc:
            raise ValueError("schedule: %s" % exc) from None
    else:
        base = doc.get("price")
        if not isinstance(base, str):
            raise ValueError("price: a decimal string such as \"0.5283\"")
    ladder = []
    if kind in ("tiered", "tiered_tou"):
        raw = doc.get("ladder")
        if not isinstance(raw, list) or not raw:
            raise ValueError("ladder: a list of {upto_kwh = \"...\", surcharge = \"...\"}, "
                             "the last without upto_kwh")
        for i, step in enumerate(raw):
            upto = step.get("upto_kwh")
            sur = step.get("surcharge", "0")
            if upto is not None:
                upto = int(Decimal(str(upto)) * 100)
            elif i != len(raw) - 1:
                raise ValueError("ladder[%d].upto_kwh: only the last step has no bound" % i)
            ladder.append((upto, price_units(sur)))
    period = doc.get("period", "annual")
    if period not in ("annual", "monthly"):
        raise ValueError("period: annual or monthly")
    reset_day = doc.get("reset_day", 1)
    if not isinstance(reset_day, int) or not 1 <= reset_day <= 28:
        raise ValueError("reset_day: the billing day, 1-28")
    reset_hour = doc.get("reset_hour", 0)
    if not isinstance(reset_hour, int) or not 0 <= reset_hour <= 23:
        raise ValueError("reset_hour: 0-23")
    try:
        return Tariff(name, base, tou, ladder, period, reset_day, reset_hour)
    except ValueError as exc:
        raise ValueError("price: %s" % exc) from None


def _schedule(raw, key):
    if not isinstance(raw, list) or not raw:
        raise ValueError("%s: a list of {from = \"HH:MM\", to = \"HH:MM\", rate = \"...\"}"
                         % key)
    out = []
    for i, p in enumerate(raw):
        try:
            out.append((parse_hhmm(p["from"]), parse_hhmm(p["to"]), p["rate"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            raise ValueError("%s[%d]: needs from, to (HH:MM) and rate" % (key, i)) from None
    return out
