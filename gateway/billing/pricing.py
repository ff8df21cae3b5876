"""Billing of one prepaid account: the growth of a meter's energy registers into money.

Pure (no I/O, no clock but the one a hold is stamped with): readings in, the account
document updated, events out. The rules, each with a worked example, are in
docs/cost-control.md ("How a charge is computed"); in short:

- Registers count in whole 0.01 kWh steps (further decimals are dropped, as the meter's
  display drops them). Energy is integer steps, money integer micro-yuan; no float anywhere.
- A time-of-use tariff prices the meter's own rate registers (T1..T4 = sharp, peak, flat,
  valley) when the reading and the previous one carry the same ones and their growth agrees
  with the total's to within the 0.03 kWh that truncating four registers can explain; the
  remainder is not charged separately (the registers show it later). Otherwise the total's
  growth is spread over the time since the previous reading, in proportion to the time in
  each run of one rate and one tier period (largest remainder, the earliest run first on a
  tie; exact integers).
- Energy belongs to the tier period it was used in: an interval [previous, this) that ends
  exactly at the billing date is all in the old period.
- A register that goes down, or a total that grows more than max_kw x hours x 1.2 + 1 kWh
  (exactly at the limit is billed), is charged nothing and becomes the new starting point.
- A reading that cannot be priced (a rate the tariff has no price for, a value that is not a
  number) is not charged and puts the account's billing on hold (`billing_hold` in the
  document, one `billing.held` event); the registers are not advanced, so when pricing works
  again (the tariff is corrected) the held energy is billed from where it stopped.
"""

import logging
import re
import time
from decimal import Decimal
from fractions import Fraction

from gateway.billing import tariff as T
log = logging.getLogger(__name__)

ENERGY_TOTAL = "energy.import.total"
TARIFF_QUANTITIES = {"energy.import.t1": "sharp", "energy.import.t2": "peak",
                     "energy.import.t3": "flat", "energy.import.t4": "valley"}
QUANTITY_OF_RATE = {rate: q for q, rate in TARIFF_QUANTITIES.items()}
# Each of four registers displayed truncated to 0.01 kWh trails its true value by less than
# one step, so their sum trails the truncated total by 0, 1, 2 or 3 steps: between two
# readings the growths differ by at most 3 steps on a meter that counts correctly.
REMAINDER_STEPS = 3

_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?\Z")
_centi_memo = {}


class Unpriceable(Exception):
    """A reading that cannot be priced; `reason` says why (shown in status and events)."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def centi(value, what="value"):
    """A register value (the journal's JSON text, a Decimal or an int) in whole 0.01 kWh
    steps, further decimals dropped (toward zero). Raises Unpriceable if it is no number."""
    if type(value) is not str:
        if isinstance(value, Decimal) and value.is_finite():
            value = format(value, "f")
        elif isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        else:
            raise Unpriceable("%s is not a number: %r" % (what, value))
    c = _centi_memo.get(value)
    if c is not None:
        return c
    if not _NUMBER.match(value):
        raise Unpriceable("%s is not a number: %s" % (what, value[:40]))
    i = value.find(".")
    c = int(value) * 100 if i < 0 else int(value[:i] + (value[i + 1:i + 3] + "0")[:2])
    if len(_centi_memo) > 20000:
        _centi_memo.clear()
    _centi_memo[value] = c
    return c


def _text(value):
    return value if type(value) is str else (format(value, "f") if isinstance(value, Decimal)
                                             else str(value))


def hold(doc, reason, seq=None, now=None, events=None):
    """Put the account's billing on hold (once: a held account keeps its first reason)."""
    if doc.get("billing_hold"):
        return False
    doc["billing_hold"] = {"reason": reason, "since": time.time() if now is None else now,
                           "seq": seq}
    if events is not None:
        events.append(("billing.held", {"reason": reason, "seq": seq}))
    return True


class Billing:
    """Pure billing of one account: readings in, charges and events out (no I/O)."""

    def __init__(self, acc, tariff):
        self.acc = acc
        self.tariff = tariff
        self._max_kw = None
        self._jump = (0, 1)
        self._period = (1, 0, None)          # (start, end, name) in local ms: none yet

    # ------------------------------------------------------------ the entry point

    def apply(self, doc, group, events, seq=None, now=None):
        """`group`: the readings of one meter taken at one moment {quantity: (value, ts)}.
        Updates doc in place; appends (event_type, fields) to events. A reading that cannot
        be priced puts the account on hold instead of raising (seq: its journal position)."""
        try:
            self._apply(doc, group, events)
        except Unpriceable as exc:
            hold(doc, exc.reason, seq, now, events)
        except Exception as exc:        # a bug must stop this account's billing, not all
            log.exception("billing %s", self.acc.get("meter"))
            hold(doc, "cannot bill: %s: %s" % (type(exc).__name__, exc), seq, now, events)

    # ------------------------------------------------------------ the rules

    def _apply(self, doc, group, events):
        total = group.get(ENERGY_TOTAL)
        if total is None:
            return                       # nothing to bill without the total
        value, ts = total
        cur = centi(value, ENERGY_TOTAL)
        rates = {}
        for q, v in group.items():
            rate = TARIFF_QUANTITIES.get(q)
            if rate is not None:
                rates[rate] = (centi(v[0], q), v[0])
        regs = doc["registers"]
        prev_text = regs.get("total")
        if prev_text is None:            # the first reading: the starting point
            self._commit(doc, 0, None, None, value, rates, ts, events, ())
            return
        steps = cur - centi(prev_text, "the stored total")
        prev_ts = doc.get("register_ts")
        if prev_ts is None:
            prev_ts = ts

        # a register that goes down: a meter replaced or reset
        down = None
        if steps < 0:
            down = (ENERGY_TOTAL, prev_text, value)
        else:
            for rate in T.RATES:             # T1..T4: the first that went down is named
                p = regs.get(rate)
                if p is not None and rate in rates and rates[rate][0] < centi(
                        p, "a stored register"):
                    down = (QUANTITY_OF_RATE[rate], p, rates[rate][1])
                    break
        if down is not None:
            ev = ("meter.register_decrease", {"register": down[0], "previous": _text(down[1]),
                                              "now": _text(down[2])})
            self._commit(doc, 0, None, None, value, rates, ts, events, (ev,))
            return

        # a jump beyond the meter's rating: growth > max_kw x hours x 1.2 + 1 kWh
        dt = ts - prev_ts if ts > prev_ts else 0
        if steps > 100:
            p, q = self._jump_limit()
            if (steps - 100) * q * 30000 > p * dt:
                limit = Fraction(p * dt, q * 30000) + 100
                ev = ("meter.register_jump", {
                    "register": ENERGY_TOTAL, "previous": _text(prev_text), "now": _text(value),
                    "interval_s": dt // 1000,
                    "limit_kwh": str(Decimal(limit.numerator * 100 // limit.denominator)
                                     .scaleb(-4).quantize(Decimal("0.01")))})
                self._commit(doc, 0, None, None, value, rates, ts, events, (ev,))
                return

        pending = []
        tariff = self.tariff
        a, b = T.local_ms(prev_ts), T.local_ms(ts)
        parts = None
        if tariff.tou is not None and rates and len(rates) == len(regs) - 1 and \
                all(r in regs for r in rates):
            deltas = [(r, rates[r][0] - centi(regs[r], "a stored register"))
                      for r in T.RATES if r in rates]
            summed = sum(d for _, d in deltas)
            if abs(steps - summed) <= REMAINDER_STEPS:
                parts = self._register_parts(deltas, a, b)
            else:
                pending.append(("meter.registers_inconsistent", {
                    "total_kwh": str(Decimal(steps).scaleb(-2)),
                    "registers_kwh": str(Decimal(summed).scaleb(-2))}))
        if parts is None:
            parts = self._time_parts(steps, a, b)

        # price the parts in order; the tier counter moves step by step
        cost = 0
        tier = doc.get("tier_centi", 0)
        period = doc.get("tier_period")
        tiered = tariff.tiered
        for name, rate, n in parts:
            price = tariff.price_of(rate)
            if price is None:
                raise Unpriceable("%s (%s) grew %s kWh and tariff %s has no %s price" % (
                    QUANTITY_OF_RATE[rate], rate, Decimal(n).scaleb(-2), tariff.name, rate))
            if tiered:
                if name != period:
                    period = name
                    tier = 0
                c, tier = tariff.charge_steps(n, price, tier)
            else:
                c = n * price
            cost += c
        self._commit(doc, cost, tier if tiered else None, period, value, rates, ts, events,
                     pending)

    def _commit(self, doc, cost, tier, period, value, rates, ts, events, pending):
        if cost:
            doc["balance_uy"] -= cost
            doc["charges_uy"] += cost
        if tier is not None:
            doc["tier_centi"] = tier
            doc["tier_period"] = period
        regs = {"total": _text(value)}
        for rate, (_, v) in rates.items():
            regs[rate] = _text(v)
        doc["registers"] = regs
        doc["register_ts"] = ts
        events.extend(pending)
        held = doc.get("billing_hold")
        if held:
            doc["billing_hold"] = None   # None, not deleted: a state put merges fields
            events.append(("billing.resumed", {"held_since_seq": held.get("seq")}))

    def _jump_limit(self):
        mk = self.acc["max_kw"]
        if mk is not self._max_kw:
            f = Fraction(Decimal(str(mk)))
            self._jump = (f.numerator, f.denominator)
            self._max_kw = mk
        return self._jump

    def _period_of(self, x):
        """(start, end, name) of the tier period containing local ms x (cached)."""
        start, end, name = self._period
        if start <= x < end:
            return self._period
        start, end = self.tariff.period_bounds(x)
        self._period = (start, end, T.to_datetime(start).isoformat())
        return self._period

    def _register_parts(self, deltas, a, b):
        """[(period, rate, steps)] from the rate registers' growth: in the order sharp, peak,
        flat, valley; a reading across a billing date is divided between the periods in
        proportion to the time in each (per register, largest remainder)."""
        deltas = [(r, d) for r, d in deltas if d > 0]
        if not self.tariff.tiered:
            return [(None, r, d) for r, d in deltas]
        if b <= a:                        # no interval: the instant before the reading
            name = self._period_of(b - 1)[2]
            return [(name, r, d) for r, d in deltas]
        start, end, name = self._period_of(a)
        if b <= end:
            return [(name, r, d) for r, d in deltas]
        periods = []
        x = a
        while x < b:
            start, end, name = self._period_of(x)
            periods.append((x, min(end, b), name))
            x = end
        lengths = [e - s for s, e, _ in periods]
        split = [T.largest_remainder(d, lengths) for _, d in deltas]
        out = []
        for k, (_, _, name) in enumerate(periods):
            for (r, _), parts in zip(deltas, split):
                if parts[k]:
                    out.append((name, r, parts[k]))
        return out

    def _time_parts(self, steps, a, b):
        """[(period, rate, steps)] from the total's growth spread over [a, b) by time."""
        if steps <= 0:
            return []
        tariff = self.tariff
        tou = tariff.tou
        if tou is None and not tariff.tiered:
            return [(None, None, steps)]
        if b <= a:                        # no interval: the instant before the reading
            x = b - 1
            rate = tou.run(x, x + 1)[0] if tou is not None else None
            name = self._period_of(x)[2] if tariff.tiered else None
            return [(name, rate, steps)]
        name = None
        end = b
        if tariff.tiered:
            _, end, name = self._period_of(a)
            end = min(end, b)
        rate = None
        if tou is not None:
            rate, end = tou.run(a, end)
        if end >= b:                      # one rate and one period: the common case
            return [(name, rate, steps)]
        segs = T.segments(tariff, a, b)
        parts = T.largest_remainder(steps, [e - s for s, e, _ in segs])
        return [(self._period_of(s)[2] if tariff.tiered else None, r, n)
                for (s, _, r), n in zip(segs, parts) if n]
