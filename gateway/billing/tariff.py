"""Tariffs: flat, tiered (annual or monthly ladders from a billing date), time-of-use
(sharp/peak/flat/valley periods, across midnight, seasonal calendars), and tiered +
time-of-use combined.

Money is exact and nothing here goes through a float. Prices have at most 4 decimals
(yuan/kWh); energy is counted in whole steps of 0.01 kWh, as local-prepay meters deduct; one
step costs (time-of-use price + tier surcharge) x 0.01 yuan, which is an exact number of
micro-yuan (1e-6 yuan). The tier is re-evaluated at every step, so a ladder boundary inside
one reading is priced on both sides of it. Balances are kept in micro-yuan; shown in yuan
with 2 decimals, rounded half up (the only rounding).

Times are the gateway's local wall-clock time, as integer milliseconds on a local axis
(`local_ms`): 0 is 1970-01-01 00:00 local. Windows start and end on whole minutes; a window
is the half-open interval [from, to).

The rules themselves (and worked examples) are in docs/cost-control.md.
"""

import datetime as _dt
import functools
import time as _time
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

RATES = ("sharp", "peak", "flat", "valley")          # T1..T4 of DL/T 645 meters
MICRO = 1000000
MINUTE_MS = 60000
DAY_MS = 86400000
EPOCH = _dt.datetime(1970, 1, 1)
_EPOCH_ORDINAL = EPOCH.toordinal()
_MS = _dt.timedelta(milliseconds=1)

KINDS = ("flat", "tiered", "tou", "tiered_tou")


class TariffError(ValueError):
    """A tariff table that cannot be used: `key` is the key below [tariffs.NAME]."""

    def __init__(self, key, message):
        super().__init__("%s: %s" % (key, message))
        self.key = key
        self.message = message


# ---------------------------------------------------------------- money and units

@functools.lru_cache(maxsize=4096)
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
    if not (h.isdigit() and m.isdigit() and len(m) == 2):
        raise ValueError("not a time of day: %r" % text)
    h, m = int(h), int(m)
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError("not a time of day: %r" % text)
    return h * 60 + m


def _hhmm(minute):
    return "%02d:%02d" % (minute // 60, minute % 60)


# ---------------------------------------------------------------- local time

_offsets = {}


def local_ms(ts_ms):
    """Unix milliseconds -> the gateway's local wall-clock time in ms on the local axis
    (what datetime.fromtimestamp shows), in integers. UTC offsets only change on quarter
    hours, so one lookup serves a quarter hour."""
    block = ts_ms // 900000
    off = _offsets.get(block)
    if off is None:
        if len(_offsets) > 4096:
            _offsets.clear()
        off = _offsets[block] = _time.localtime(ts_ms // 1000).tm_gmtoff * 1000
    return ts_ms + off


def to_datetime(lms):
    return EPOCH + _dt.timedelta(milliseconds=lms)


def from_datetime(when):
    return (when - EPOCH) // _MS


# ---------------------------------------------------------------- time of use

class TimeOfUse:
    """Rates by minute of day, per month (seasons). schedule: [(from_min, to_min, rate)];
    a window may wrap midnight (from > to). The windows of a day must not overlap and must
    cover the whole day; each month is in at most one season."""

    def __init__(self, prices, schedule, seasons=()):
        self.prices = {r: price_units(p) for r, p in prices.items()}
        self.default = self._table(schedule, "schedule")
        self.month_table = [None] + [self.default] * 12
        seen = {}
        for i, (months, s) in enumerate(seasons):
            table = self._table(s, "seasons[%d].schedule" % i)
            for m in months:
                if m in seen:
                    raise TariffError("seasons[%d].months" % i, "month %d is also in "
                                      "seasons[%d]" % (m, seen[m]))
                seen[m] = i
                self.month_table[m] = table
        self._days = {}

    def _table(self, schedule, key):
        """Per minute of day: (rate, end minute of that window within the day)."""
        owner = [None] * 1440
        for i, (start, end, rate) in enumerate(schedule):
            if rate not in self.prices:
                raise TariffError("%s[%d].rate" % (key, i), "%r has no price in prices"
                                  % (rate,))
            if start == 1440:
                raise TariffError("%s[%d].from" % (key, i), "24:00 only ends a window")
            if start == end:
                raise TariffError("%s[%d]" % (key, i), "%s-%s is empty (a window for the "
                                  "whole day is 00:00-24:00)" % (_hhmm(start), _hhmm(end)))
            m = start % 1440
            while True:
                if owner[m] is not None:
                    j = owner[m]
                    raise TariffError("%s[%d]" % (key, i), "overlaps %s[%d] at %s"
                                      % (key, j, _hhmm(m)))
                owner[m] = i
                m = (m + 1) % 1440
                if m == end % 1440:
                    break
        if None in owner:
            missing = owner.index(None)
            raise TariffError(key, "leaves %s without a rate" % _hhmm(missing))
        rates = [schedule[i][2] for i in owner]
        table = [None] * 1440
        end = 1440
        for m in range(1439, -1, -1):
            if m < 1439 and rates[m] != rates[m + 1]:
                end = m + 1
            table[m] = (rates[m], end)
        return table

    def _day(self, day):
        t = self._days.get(day)
        if t is None:
            if len(self._days) > 800:
                self._days.clear()
            t = self._days[day] = self.month_table[
                _dt.date.fromordinal(_EPOCH_ORDINAL + day).month]
        return t

    def run(self, x, limit):
        """(rate, end): the rate at local ms x and where it stops holding, at most `limit`
        (a run of one rate across midnight is one run)."""
        day = x // DAY_MS
        rate, end = self._day(day)[(x - day * DAY_MS) // MINUTE_MS]
        end_ms = day * DAY_MS + end * MINUTE_MS
        while end_ms < limit and end == 1440:
            day += 1
            r2, end = self._day(day)[0]
            if r2 != rate:
                break
            end_ms = day * DAY_MS + end * MINUTE_MS
        return rate, min(end_ms, limit)

    def rate_at(self, when):
        return self._day(from_datetime(when) // DAY_MS)[when.hour * 60 + when.minute][0]

    def price_at(self, when):
        return self.prices[self.rate_at(when)]


# ---------------------------------------------------------------- tariffs

class Tariff:
    """One tariff: a base (flat price or time-of-use) plus an optional tier ladder.
    ladder: [(upper bound in 0.01 kWh or None, surcharge in micro-yuan per step)], bounds
    increasing, the last without a bound."""

    def __init__(self, name, base_price=None, tou=None, ladder=(), period="annual",
                 reset_day=1, reset_hour=0, reset_month=1):
        self.name = name
        self.base = price_units(base_price) if base_price is not None else None
        self.tou = tou
        self.ladder = list(ladder)
        if self.ladder and self.ladder[-1][0] is not None:
            self.ladder.append((None, self.ladder[-1][1]))
        self.period = period
        self.reset_day = reset_day
        self.reset_hour = reset_hour
        self.reset_month = reset_month

    @property
    def tiered(self):
        return bool(self.ladder)

    def price_of(self, rate):
        """Units per step of a rate (None: the flat price); None if the tariff has none."""
        if self.tou is None:
            return self.base
        return self.tou.prices.get(rate)

    def surcharge(self, tier_centi):
        for upper, extra in self.ladder:
            if upper is None or tier_centi < upper:
                return extra
        return 0

    def charge_steps(self, steps, price, tier_centi):
        """(cost in micro-yuan, new tier counter) of `steps` at `price` units per step; the
        tier is re-evaluated at every step."""
        if not self.ladder:
            return steps * price, tier_centi
        cost = 0
        for upper, extra in self.ladder:
            if upper is None:
                n = steps
            elif tier_centi < upper:
                n = min(steps, upper - tier_centi)
            else:
                continue
            cost += n * (price + extra)
            tier_centi += n
            steps -= n
            if not steps:
                break
        return cost, tier_centi

    def charge(self, steps, when, tier_centi, rate=None):
        """Cost of `steps` x 0.01 kWh at datetime `when` (or at `rate`), the tier counter
        starting at tier_centi."""
        if rate is None and self.tou is not None:
            rate = self.tou.rate_at(when)
        return self.charge_steps(steps, self.price_of(rate), tier_centi)

    def period_start(self, when):
        """Start of the tier period containing datetime `when` (the billing date: day 1-28,
        hour, and for an annual period the month)."""
        if self.period == "monthly":
            start = when.replace(day=self.reset_day, hour=self.reset_hour, minute=0, second=0,
                                 microsecond=0)
            if start > when:
                month = start.month - 1 or 12
                year = start.year - (1 if start.month == 1 else 0)
                start = start.replace(year=year, month=month)
            return start
        start = when.replace(month=self.reset_month, day=self.reset_day, hour=self.reset_hour,
                             minute=0, second=0, microsecond=0)
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

    def period_bounds(self, x):
        """(start, end) in local ms of the tier period containing local ms x."""
        when = to_datetime(x)
        return (from_datetime(self.period_start(when)),
                from_datetime(self.next_period_start(when)))


def largest_remainder(centi, lengths):
    """Split `centi` steps in proportion to `lengths` (integers, sum > 0): each part gets the
    whole steps of its exact share, and the steps left over go one each to the parts with
    the largest remainders, the earliest first on a tie. Exact integer arithmetic."""
    total = sum(lengths)
    parts = [centi * n // total for n in lengths]
    left = centi - sum(parts)
    if left:
        rems = [centi * n % total for n in lengths]
        for i in sorted(range(len(lengths)), key=lambda i: (-rems[i], i))[:left]:
            parts[i] += 1
    return parts


def segments(tariff, a, b):
    """[(start, end, rate)] covering [a, b) (local ms, a < b): the maximal intervals of one
    rate and one tier period. rate is None for a tariff without time of use."""
    out = []
    tiered = bool(tariff.ladder)
    x = a
    while x < b:
        end = b
        rate = None
        if tiered:
            end = min(end, tariff.period_bounds(x)[1])
        if tariff.tou is not None:
            rate, end = tariff.tou.run(x, end)
        out.append((x, end, rate))
        x = end
    return out


def split_interval(centi, t0, t1, tariff):
    """Energy consumed between datetimes t0 and t1 attributed to the intervals where the
    rate and the tier period are constant, in proportion to their duration, in whole 0.01
    kWh steps (largest remainder, earliest first on a tie). [(interval start, steps)]."""
    if centi <= 0:
        return []
    a, b = from_datetime(t0), from_datetime(t1)
    if b <= a:
        return [(t1, centi)]
    segs = segments(tariff, a, b)
    parts = largest_remainder(centi, [e - s for s, e, _ in segs])
    return [(to_datetime(s), n) for (s, _, _), n in zip(segs, parts) if n]


# ---------------------------------------------------------------- configuration

KEYS_OF_KIND = {
    "flat": {"kind", "price"},
    "tiered": {"kind", "price", "ladder", "period", "reset_month", "reset_day", "reset_hour"},
    "tou": {"kind", "prices", "schedule", "seasons"},
    "tiered_tou": {"kind", "prices", "schedule", "seasons", "ladder", "period", "reset_month",
                   "reset_day", "reset_hour"},
}


def _decimal(key, value, places, what):
    """A non-negative decimal string with at most `places` decimals."""
    if not isinstance(value, str):
        raise TariffError(key, "a decimal string such as \"0.5283\"")
    try:
        d = Decimal(value)
    except InvalidOperation:
        raise TariffError(key, "not a decimal number: %r" % value) from None
    if not d.is_finite():
        raise TariffError(key, "not a decimal number: %r" % value)
    if d < 0:
        raise TariffError(key, "%s must not be negative: %s" % (what, value))
    if d != d.quantize(Decimal(1).scaleb(-places)):
        raise TariffError(key, "%s %s has more than %d decimals" % (what, value, places))
    return d


def _int(doc, key, low, high, text, default):
    v = doc.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise TariffError(key, text)
    return v


def from_config(name, doc):
    """A Tariff from its [tariffs.NAME] table; raises TariffError (a ValueError) naming the
    key below the table."""
    kind = doc.get("kind")
    if kind not in KINDS:
        raise TariffError("kind", "must be flat, tiered, tou or tiered_tou, not %r" % (kind,))
    for key in doc:
        if key not in KEYS_OF_KIND[kind]:
            raise TariffError(key, "unknown key for a %s tariff (keys: %s)" % (
                kind, ", ".join(sorted(KEYS_OF_KIND[kind]))))
    tou = None
    base = None
    if kind in ("tou", "tiered_tou"):
        prices = doc.get("prices")
        if not isinstance(prices, dict) or not prices:
            raise TariffError("prices", "a table of rate = \"price\" (sharp, peak, flat, "
                              "valley)")
        for rate, p in prices.items():
            if rate not in RATES:
                raise TariffError("prices.%s" % rate, "rates are %s" % ", ".join(RATES))
            _decimal("prices.%s" % rate, p, 4, "price")
        schedule = _schedule(doc.get("schedule"), "schedule")
        seasons = []
        raw_seasons = doc.get("seasons", [])
        if not isinstance(raw_seasons, list):
            raise TariffError("seasons", "a list of {months = [...], schedule = [...]}")
        for i, s in enumerate(raw_seasons):
            if not isinstance(s, dict):
                raise TariffError("seasons[%d]" % i, "a table {months = [...], schedule = "
                                  "[...]}")
            for k in s:
                if k not in ("months", "schedule"):
                    raise TariffError("seasons[%d].%s" % (i, k), "unknown key (months, "
                                      "schedule)")
            months = s.get("months")
            if not isinstance(months, list) or not months or not all(
                    isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 12
                    for m in months) or len(set(months)) != len(months):
                raise TariffError("seasons[%d].months" % i, "a list of month numbers 1-12, "
                                  "each once")
            seasons.append((months, _schedule(s.get("schedule"), "seasons[%d].schedule" % i)))
        tou = TimeOfUse(prices, schedule, seasons)
    else:
        base = doc.get("price")
        _decimal("price", base, 4, "price")
    ladder = []
    if kind in ("tiered", "tiered_tou"):
        raw = doc.get("ladder")
        if not isinstance(raw, list) or not raw:
            raise TariffError("ladder", "a list of {upto_kwh = \"...\", surcharge = \"...\"}, "
                              "the last without upto_kwh")
        previous = 0
        for i, step in enumerate(raw):
            key = "ladder[%d]" % i
            if not isinstance(step, dict):
                raise TariffError(key, "a table {upto_kwh = \"...\", surcharge = \"...\"}")
            for k in step:
                if k not in ("upto_kwh", "surcharge"):
                    raise TariffError("%s.%s" % (key, k), "unknown key (upto_kwh, surcharge)")
            upto = step.get("upto_kwh")
            sur = price_units(_decimal(key + ".surcharge", step.get("surcharge", "0"), 4,
                                       "surcharge"))
            if upto is None:
                if i != len(raw) - 1:
                    raise TariffError(key + ".upto_kwh", "only the last step has no bound")
            else:
                if isinstance(upto, int) and not isinstance(upto, bool):
                    upto = str(upto)
                upto = int(_decimal(key + ".upto_kwh", upto, 2, "upto_kwh") * 100)
                if upto <= previous:
                    raise TariffError(key + ".upto_kwh", "bounds must increase (%s kWh is "
                                      "not above %s)" % (Decimal(upto).scaleb(-2),
                                                         Decimal(previous).scaleb(-2)))
                previous = upto
            ladder.append((upto, sur))
        if ladder[-1][0] is not None:
            raise TariffError("ladder[%d]" % (len(raw) - 1), "the last step has no upto_kwh "
                              "(it has no upper bound)")
    period = doc.get("period", "annual")
    if period not in ("annual", "monthly"):
        raise TariffError("period", "annual or monthly")
    if "reset_month" in doc and period != "annual":
        raise TariffError("reset_month", "only for an annual period (a monthly period "
                          "starts every month)")
    reset_month = _int(doc, "reset_month", 1, 12, "the billing month of an annual period, "
                       "1-12", 1)
    reset_day = _int(doc, "reset_day", 1, 28, "the billing day, 1-28", 1)
    reset_hour = _int(doc, "reset_hour", 0, 23, "0-23", 0)
    return Tariff(name, base, tou, ladder, period, reset_day, reset_hour, reset_month)


def _schedule(raw, key):
    if not isinstance(raw, list) or not raw:
        raise TariffError(key, "a list of {from = \"HH:MM\", to = \"HH:MM\", rate = \"...\"}")
    out = []
    for i, p in enumerate(raw):
        if isinstance(p, dict):
            for k in p:
                if k not in ("from", "to", "rate"):
                    raise TariffError("%s[%d].%s" % (key, i, k), "unknown key (from, to, "
                                      "rate)")
        try:
            out.append((parse_hhmm(p["from"]), parse_hhmm(p["to"]), p["rate"]))
        except (KeyError, ValueError, TypeError, AttributeError):
            raise TariffError("%s[%d]" % (key, i), "needs from, to (HH:MM) and "
                              "rate") from None
    return out
