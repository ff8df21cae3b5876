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

import bisect
import itertools
import logging
import operator
import re
import time
from decimal import Decimal
from fractions import Fraction

from gateway.billing.tariff import (DAY_MS, RATES, _offsets, largest_remainder, local_ms,
                                    segments, to_datetime)
log = logging.getLogger(__name__)

ENERGY_TOTAL = "energy.import.total"
SINGLE = "single"          # the band of a tariff without time of use
TARIFF_QUANTITIES = {"energy.import.t1": "sharp", "energy.import.t2": "peak",
                     "energy.import.t3": "flat", "energy.import.t4": "valley"}
QUANTITY_OF_RATE = {rate: q for q, rate in TARIFF_QUANTITIES.items()}
# Each of four registers displayed truncated to 0.01 kWh trails its true value by less than
# one step, so their sum trails the truncated total by 0, 1, 2 or 3 steps: between two
# readings the growths differ by at most 3 steps on a meter that counts correctly.
REMAINDER_STEPS = 3

_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?\Z")
_centi_memo = {}
# Each account's memo needs only the texts of its last reading or two (the T registers that
# did not grow); every reading adds the ones that did, so a large bound is memory that
# grows with time: at the old bound of 4,096 texts an account kept about 450 kB (estimated:
# 4,096 entries of about 110 bytes), so 450 MB for 1,000 accounts after a few weeks of
# readings; tests/test_billing.py measured 902 kB kept by 25 accounts after 600 readings.
MEMO_MAX = 16
CENTI_MEMO_MAX = 4096


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
    if len(_centi_memo) > CENTI_MEMO_MAX:
        _centi_memo.clear()
    _centi_memo[value] = c
    return c


# the journal's energy table's columns, and the T1..T4 rates by index
_QUANTITIES = (ENERGY_TOTAL,) + tuple(QUANTITY_OF_RATE[r] for r in RATES)
_RATE_INDEX = {r: k for k, r in enumerate(RATES)}
_NO_REGISTERS = (None, None, None, None)


_RUN_MIN = 8               # readings in a batch before its columns are worth making
_RUN_MAX = 2048            # readings looked at for one run
_CLEAN = re.compile(r"[0-9]+\.[0-9][0-9](?:\x1f[0-9]+\.[0-9][0-9])*\Z")


class _Columns:
    """A batch's readings as columns, for billing runs of them at once: each register's
    steps and text, the time and local time, and for each reading its growth over the
    reading before it in the batch (registers' steps, priced), and `bad`: the readings
    (in order, ending with len(items)) the fast path must bill one by one, as a reading
    on its own would go there (a register down, registers against the total, no
    interval, local time not after the one before, a possible jump, a rate with no
    price, a register missing or a value that is not a plain number with two decimals).
    For batches where T1..T4 are there (a time-of-use tariff: priced by them) or where no
    reading has any (priced by the total)."""

    __slots__ = ("texts", "total", "regs", "ts", "local", "grown", "priced", "bad", "deltas")

    @classmethod
    def of(cls, items, tariff, columns=None):
        if columns is not None:
            tss, texts = columns[0], columns[1:]
        else:
            values = list(map(_ITEM_VALUES, items))
            if set(map(type, values)) != {tuple}:
                values = [v if type(v) is tuple else _as_tuple(v) for v in values]
            texts = list(zip(*values))
            tss = list(map(_ITEM_TS, items))
        if len(texts) != 5:
            return None
        # priced by the registers (every reading has T1..T4; a time-of-use tariff), or by
        # the total (no reading has any)
        by_total = all(col.count(None) == len(col) for col in texts[1:])
        if not by_total and tariff.tou is None:
            return None
        steps = []
        odd = set()                     # readings with a register missing or not plain
        for col in (texts[:1] if by_total else texts):
            if None not in col:
                # each text once (a register stands still while its rate is not on)
                known = dict.fromkeys(col)
                joined = "\x1f".join(known)
                if _CLEAN.match(joined):
                    if len(known) < len(col):
                        known = dict(zip(known, map(int, joined.replace(".", "").split(
                            "\x1f"))))
                        steps.append(list(map(known.__getitem__, col)))
                    else:
                        steps.append(list(map(int, joined.replace(".", "").split("\x1f"))))
                    continue
            col = list(map(_plain_steps, col))
            odd.update(itertools.compress(range(len(col)), map(
                operator.is_, col, itertools.repeat(None))))
            steps.append([0 if c is None else c for c in col])
        prices = [tariff.price_of(r) for r in RATES]
        if any(p is not None and p < 0 for p in prices) or \
                any(extra < 0 for _, extra in tariff.ladder):
            return None                 # costs must only grow along a run (bisect)
        self = cls()
        self.texts = texts
        self.total = total = steps[0]
        self.regs = regs = steps[1:] if not by_total else [texts[1]] * 4
        self.ts = tss
        offsets = list(map(_offsets.get, map(operator.floordiv, tss,
                                              itertools.repeat(900000))))
        if None in offsets:
            self.local = local = list(map(local_ms, tss))
        else:
            self.local = local = list(map(operator.add, tss, offsets))
        add, sub, mul = operator.add, operator.sub, operator.mul
        # growth over the reading before (index 0: none; it is bad)
        grown_total = [0] + list(map(sub, total[1:], total[:-1]))
        checks = []                     # (values, test, bound) where test fails: bad
        if by_total:
            self.grown = grown_total
            self.priced = None
            self.deltas = None
            checks += [(grown_total, operator.lt, 0), (grown_total, operator.gt, 100)]
            return self._flag(checks, odd, tss, local, len(items))
        d = [[0] + list(map(sub, r[1:], r[:-1])) for r in regs]
        self.deltas = d
        self.grown = grown = list(map(add, map(add, d[0], d[1]), map(add, d[2], d[3])))
        priced = None
        for k in range(4):
            checks.append((d[k], operator.lt, 0))
            if prices[k] is None:
                checks.append((d[k], operator.gt, 0))
                continue
            term = map(mul, d[k], itertools.repeat(prices[k]))
            priced = list(term) if priced is None else list(map(add, priced, term))
        self.priced = priced if priced is not None else [0] * len(items)
        rem = list(map(sub, grown_total, grown))
        checks += [(grown_total, operator.lt, 0), (grown_total, operator.gt, 100),
                   (rem, operator.gt, REMAINDER_STEPS), (rem, operator.lt, -REMAINDER_STEPS)]
        return self._flag(checks, odd, tss, local, len(items))

    def _flag(self, checks, odd, tss, local, n):
        """`bad` from the checks ((values, test, bound): test true is bad), the odd
        readings, and times that do not go forward."""
        bad = {0}
        # an odd reading goes through the fast path's own checks, and so does the next
        # (its growth over an odd one is no number here)
        bad.update(odd)
        bad.update(k + 1 for k in odd)
        for col, test, bound in checks:
            # one pass in C; the per-reading flags only where something is there
            extreme = min(col) if test is operator.lt else max(col)
            if test(extreme, bound):
                bad.update(itertools.compress(range(len(col)),
                                              map(test, col, itertools.repeat(bound))))
        for col in (tss, local):
            if not all(map(operator.lt, col[:-1], col[1:])):
                bad.update(k + 1 for k in itertools.compress(
                    range(len(col) - 1), map(operator.ge, col[:-1], col[1:])))
        self.bad = sorted(bad) + [n]
        return self


def _plain_steps(v):
    """Steps of a text with two decimals, or None (what _CLEAN matches, one at a time)."""
    if type(v) is str and len(v) > 3 and v[-3] == "." and v.isascii() and \
            (v[:-3] + v[-2:]).isdigit():
        return int(v[:-3] + v[-2:])
    return None


_ITEM_VALUES = operator.itemgetter(3)
_ITEM_TS = operator.itemgetter(2)


def _same_presence(a, b):
    return (a is None) == (b is None)


def _went_down(c, p):
    return c is not None and p is not None and c < p


def _as_tuple(values):
    """{quantity: value} -> (total, t1, t2, t3, t4), None where absent."""
    get = values.get
    return (get(ENERGY_TOTAL), get(_QUANTITIES[1]), get(_QUANTITIES[2]), get(_QUANTITIES[3]),
            get(_QUANTITIES[4]))


class _Slow(Exception):
    """The fast path hands a reading to the rules."""


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
        self._run = (1, 0, None, None)       # (start, end, rate, price): local ms
        self._seg = self._segment(0)         # the ladder stretch of the last tier counter
        self._memo = {}                      # register text -> its steps (MEMO_MAX)
        # what has been charged per band (rate; "single" on a tariff without time of use):
        # {band: [steps, micro-yuan]}, taken by cost control for the day's statement
        self.bands = {}

    def take_bands(self):
        """The charges per band since the last call ({band: [steps, micro-yuan]})."""
        out, self.bands = self.bands, {}
        return out

    def _band(self, rate, steps, cost):
        b = self.bands.get(rate or SINGLE)
        if b is None:
            self.bands[rate or SINGLE] = [steps, cost]
        else:
            b[0] += steps
            b[1] += cost

    # ------------------------------------------------------------ the entry points

    def apply(self, doc, group, events, seq=None, now=None):
        """`group`: the readings of one meter taken at one moment {quantity: (value, ts)}.
        Updates doc in place; appends (event_type, fields) to events. A reading that cannot
        be priced puts the account on hold instead of raising (seq: its journal position)."""
        total = group.get(ENERGY_TOTAL)
        if total is None:
            return                       # nothing to bill without the total
        tagged = []
        self.apply_batch(doc, [(0, seq, total[1], {q: v[0] for q, v in group.items()})],
                         tagged, now=now)
        events.extend((etype, fields) for _, etype, fields in tagged)

    def apply_batch(self, doc, items, events, watch=None, now=None, columns=None):
        """Several readings of the account in order, as `apply` of each in turn would bill
        them (same document, same events), without the cost per reading of `apply`.

        items: [(tag, seq, ts, values)], values either {quantity: value} or the tuple
        (total, t1, t2, t3, t4) of the register values, None where the reading has none
        (the journal's energy table gives these; quantities other than the five are not
        billed either way); events are appended as (tag, event_type, fields). watch: None
        or [low, high, fn]: after a reading that leaves the balance outside (low, high],
        fn(doc, tag) is called (the document then holds the balance) and returns the new
        (low, high); cost control re-derives the account's state there, so it runs exactly
        when a reading could change it. columns: None, or the items' (ts, total, t1, t2, t3,
        t4) as lists, in their order (what the journal gives: no unzipping).

        The common reading (registers grew, within the meter's rating, inside one tier
        period and one rate, not held) is priced here from integers kept between readings;
        any other reading goes through `_apply`, the rules as written, with the document
        brought up to date first. Both give the same result (tests/test_billing_model.py
        runs every scenario both ways)."""
        tariff = self.tariff
        tou = tariff.tou
        tiered = tariff.tiered
        ladder_price = tariff.charge_steps
        price_of = tariff.price_of
        rate_prices = tuple(map(price_of, RATES))        # T1..T4's, None where unpriced
        sub = operator.sub
        memo = self._memo
        memo_get = memo.get
        offsets_get = _offsets.get
        if watch is not None:
            low, high, moved = watch
        n = len(items)
        vec = _Columns.of(items, tariff, columns) if n >= _RUN_MIN else None
        i = 0
        while i < n:
            st = self._load(doc)
            if st is not None:
                bal, chg, tier, period, tot, totx, prevc, prevx, pts, pl = st
                dirty = False
                fast = -1                # the last reading the fast path billed
                while i < n:
                    if fast == i - 1 and vec is not None and \
                            (watch is None or low < bal <= high):
                        run = self._run_at(vec, i, bal, tier, period, pl,
                                           None if watch is None else low)
                        if run is not None:
                            # readings i .. m-1 at once (each as the loop below bills it)
                            m, cost, grown, seg, name, bands = run
                            bal -= cost
                            chg += cost
                            for rate, steps_b, cost_b in bands:
                                self._band(rate, steps_b, cost_b)
                            if grown and tiered:
                                tier = (tier if name == period else 0) + grown
                                period = name
                                self._seg = seg
                            k = m - 1
                            tot = vec.total[k]
                            totx = vec.texts[0][k]
                            prevc = (vec.regs[0][k], vec.regs[1][k], vec.regs[2][k],
                                     vec.regs[3][k])
                            prevx = (vec.texts[1][k], vec.texts[2][k], vec.texts[3][k],
                                     vec.texts[4][k])
                            pts = vec.ts[k]
                            pl = vec.local[k]
                            dirty = True
                            fast = k
                            i = m
                            if watch is not None and not low < bal <= high:
                                self._store(doc, bal, chg, tier, period, totx, prevx, pts)
                                dirty = False
                                low, high = moved(doc, items[k][0])
                            continue
                    tag, seq, ts, values = items[i]
                    try:
                        if type(values) is not tuple:
                            values = _as_tuple(values)
                        text = values[0]
                        if text is not None:     # (nothing to bill without the total)
                            # the total, in steps (a text like the last one: same steps)
                            if text == totx:
                                cur = tot
                            elif type(text) is str and len(text) > 3 and text[-3] == "." \
                                    and text.isascii() and (text[:-3] + text[-2:]).isdigit():
                                cur = memo[text] = int(text[:-3] + text[-2:])
                                if len(memo) > MEMO_MAX:
                                    memo.clear()         # (kept: this reading's texts)
                                    memo[text] = cur
                            else:
                                raise _Slow
                            steps = cur - tot
                            if steps < 0:
                                raise _Slow      # went down: an event
                            # T1..T4: texts, steps; `same`: the same ones as the last time
                            regx = values[1:]
                            if regx == prevx:
                                regc = prevc
                                same = True
                            else:
                                # the steps of a text seen before come from the memo (in
                                # C); the rest are parsed here (usually the one that grew)
                                regc = list(map(memo_get, regx))
                                if None in regc:
                                    for k in (0, 1, 2, 3):
                                        v = regx[k]
                                        if regc[k] is None and v is not None:
                                            if type(v) is str and len(v) > 3 and \
                                                    v[-3] == "." and v.isascii() and \
                                                    (v[:-3] + v[-2:]).isdigit():
                                                regc[k] = memo[v] = int(v[:-3] + v[-2:])
                                            else:
                                                raise _Slow
                                    if len(memo) > MEMO_MAX:
                                        memo.clear()     # (kept: this reading's texts)
                                        memo[text] = cur
                                        for v, c in zip(regx, regc):
                                            if v is not None:
                                                memo[v] = c
                                same = None not in regx and None not in prevx or \
                                    all(map(_same_presence, regx, prevx))
                                if None in regc or None in prevc:
                                    if any(map(_went_down, regc, prevc)):
                                        raise _Slow          # went down: an event
                                elif min(map(sub, regc, prevc)) < 0:
                                    raise _Slow              # went down: an event
                                regc = tuple(regc)
                            if ts <= pts:
                                raise _Slow      # no interval: the instant before
                            if steps > 100:
                                jp, jq = self._jump_limit()
                                if (steps - 100) * jq * 30000 > jp * (ts - pts):
                                    raise _Slow  # a jump: an event
                            off = offsets_get(ts // 900000)
                            b = ts + off if off is not None else local_ms(ts)
                            if b <= pl:
                                raise _Slow
                            name = None
                            if tiered:
                                start, end, name = self._period
                                if not (start <= pl < end):
                                    start, end, name = self._period_of(pl)
                                if b > end:
                                    raise _Slow  # across a billing date
                            if tou is not None and same and regx != _NO_REGISTERS:
                                # the registers' growth, in the order sharp .. valley
                                if None in regc:
                                    ds = tuple(c - prevc[k] if c is not None else 0
                                               for k, c in enumerate(regc))
                                else:
                                    ds = tuple(map(sub, regc, prevc))
                                if not -REMAINDER_STEPS <= steps - sum(ds) <= REMAINDER_STEPS:
                                    raise _Slow  # registers against the total: an event
                                grew = 4 - ds.count(0)
                                if grew == 1:    # the usual reading: one rate's register
                                    d = max(ds)
                                    k = ds.index(d)
                                    parts = ((RATES[k], rate_prices[k], d),)
                                else:
                                    parts = [(RATES[k], rate_prices[k], d)
                                             for k, d in enumerate(ds) if d > 0]
                            elif steps <= 0:
                                parts = ()
                            elif tou is None:
                                parts = ((None, price_of(None), steps),)
                            else:
                                run = self._run
                                if not (run[0] <= pl and b <= run[1]):
                                    # the whole run of this rate (within the tier period):
                                    # the next readings inside it need no look-up
                                    rate, stop = tou.run(pl, end if tiered else
                                                         max(b, pl + 2 * DAY_MS))
                                    run = self._run = (pl, stop, rate, price_of(rate))
                                    if b > stop:
                                        raise _Slow      # across a change of rate
                                parts = ((run[2], run[3], steps),)
                            cost = 0
                            new_tier = tier
                            new_period = period
                            charged = []
                            for rate, price, k in parts:
                                if price is None:
                                    raise _Slow  # no price: the account is held
                                if tiered:
                                    if name != new_period:
                                        new_period = name
                                        new_tier = 0
                                    lo, hi, extra = self._seg
                                    if lo <= new_tier and (hi is None or new_tier + k <= hi):
                                        c = k * (price + extra)
                                        new_tier += k
                                    else:
                                        c, new_tier = ladder_price(k, price, new_tier)
                                        self._seg = self._segment(new_tier)
                                else:
                                    c = k * price
                                cost += c
                                charged.append((rate, k, c))
                            for rate, k, c in charged:
                                self._band(rate, k, c)
                            # the reading is billed: commit it
                            bal -= cost
                            chg += cost
                            tier = new_tier
                            period = new_period
                            tot = cur
                            totx = text
                            prevc = regc
                            prevx = regx
                            pts = ts
                            pl = b
                            dirty = True
                            fast = i
                    except _Slow:
                        break
                    except Exception:         # never a reason not to bill: the rules decide
                        log.exception("billing %s: fast path", self.acc.get("meter"))
                        break
                    i += 1
                    if watch is not None and not low < bal <= high:
                        self._store(doc, bal, chg, tier, period, totx, prevx, pts)
                        dirty = False
                        low, high = moved(doc, tag)
                if dirty:
                    self._store(doc, bal, chg, tier, period, totx, prevx, pts)
                if i == n:
                    break
            # this reading through the rules
            tag, seq, ts, values = items[i]
            i += 1
            evs = []
            if type(values) is tuple:
                group = {q: (v, ts) for q, v in zip(_QUANTITIES, values) if v is not None}
            else:
                group = {q: (v, ts) for q, v in values.items()}
            self._apply_checked(doc, group, evs, seq, now)
            for etype, fields in evs:
                events.append((tag, etype, fields))
            if watch is not None and not low < doc["balance_uy"] <= high:
                low, high = moved(doc, tag)

    def _load(self, doc):
        """The fast path's state (balance, charges, tier counter, tier period, total steps,
        total text, T1..T4 steps, T1..T4 texts (None where absent), register_ts, its local
        ms) from the document, or None if its next reading must go through the rules (the
        first reading, a held account, anything it does not recognise)."""
        try:
            if doc.get("billing_hold"):
                return None
            regs = doc["registers"]
            total = regs.get("total")
            ts = doc.get("register_ts")
            if type(total) is not str or type(ts) is not int:
                return None
            texts = [None] * 4
            steps = [None] * 4
            memo = self._memo              # the last readings' texts: parsed already
            for r, text in regs.items():
                if r == "total":
                    continue
                k = _RATE_INDEX.get(r)
                if k is None or type(text) is not str:
                    return None
                texts[k] = text
                c = memo.get(text)
                steps[k] = c if c is not None else centi(text)
            bal, chg = doc["balance_uy"], doc["charges_uy"]
            tier = doc.get("tier_centi", 0)
            if type(bal) is not int or type(chg) is not int or type(tier) is not int:
                return None
            c = memo.get(total)
            return (bal, chg, tier, doc.get("tier_period"),
                    c if c is not None else centi(total), total,
                    tuple(steps), tuple(texts), ts, local_ms(ts))
        except (Unpriceable, KeyError, AttributeError, TypeError):
            return None

    def _run_at(self, vec, i, bal, tier, period, pl, low):
        """The readings from i on that the fast path would bill alike (in one tier period
        and one stretch of the ladder; priced by their T1..T4 growth, or by the total's
        within one run of one rate; the balance not leaving its watched range before the
        last): (end, cost, steps, ladder stretch, period name), or None if not even
        reading i. The reading before i was billed by the fast path, so it is the
        previous reading of i; vec has each reading's growth over the one before it, and
        `bad` the readings the fast path must look at one by one."""
        bad = vec.bad
        # (at most _RUN_MAX readings: the work here grows with the run)
        m = min(bad[bisect.bisect_left(bad, i)], i + _RUN_MAX)    # bad ends with n
        if m <= i:
            return None
        local = vec.local
        name = None
        extra = 0
        tariff = self.tariff
        tiered = tariff.tiered
        if tiered:
            start, end, name = self._period
            if not (start <= pl < end):
                start, end, name = self._period_of(pl)
            # within the period: local time <= its end (a reading exactly at the end is
            # the old period's, and the last of the run)
            m = min(m, bisect.bisect_right(local, end, i, m),
                    bisect.bisect_left(local, end, i, m) + 1)
            if m <= i:
                return None
            tier0 = tier if name == period else 0
            seg = self._segment(tier0)
            lo, hi, extra = seg
            if not lo <= tier0:
                return None
        price = None
        rate = None
        if vec.priced is None:                       # by the total
            if tariff.tou is None:
                price = tariff.price_of(None)
            else:
                rate, stop = tariff.tou.run(pl, end if tiered else
                                            max(local[m - 1], pl + 2 * DAY_MS))
                price = tariff.price_of(rate)
                m = min(m, bisect.bisect_right(local, stop, i, m))
            if price is None or price < 0 or m <= i:
                return None
        grown = list(itertools.accumulate(vec.grown[i:m]))
        if tiered and hi is not None:
            m = i + bisect.bisect_right(grown, hi - tier0)
            if m <= i:
                return None
            del grown[m - i:]
        if price is not None:
            costs = list(map(operator.mul, grown, itertools.repeat(price + extra)))
        elif extra:
            costs = list(itertools.accumulate(map(operator.add, vec.priced[i:m],
                                                  map(operator.mul, vec.grown[i:m],
                                                      itertools.repeat(extra)))))
        else:
            costs = list(itertools.accumulate(vec.priced[i:m]))
        if low is not None:
            # the balance goes below the watched range at the first reading whose cost
            # reaches bal - low: that reading is the last (the state is looked at there)
            k = bisect.bisect_left(costs, bal - low)
            if k < len(costs):
                m = i + k + 1
        if price is not None:
            bands = ((rate, grown[m - i - 1], costs[m - i - 1]),)
        else:
            bands = []
            for k, col in enumerate(vec.deltas):
                n = sum(col[i:m])
                if n:
                    bands.append((RATES[k], n, n * (tariff.price_of(RATES[k]) + extra)))
        return m, costs[m - i - 1], grown[m - i - 1], (seg if tiered else None), name, bands

    def _store(self, doc, bal, chg, tier, period, total, texts, ts):
        """The fast path's state into the document, as _commit writes it."""
        doc["balance_uy"] = bal
        doc["charges_uy"] = chg
        if self.tariff.tiered:
            doc["tier_centi"] = tier
            doc["tier_period"] = period
        regs = {"total": total}
        if texts != _NO_REGISTERS:
            for r, text in zip(RATES, texts):
                if text is not None:
                    regs[r] = text
        doc["registers"] = regs
        doc["register_ts"] = ts

    def _segment(self, tier):
        """(low, high, surcharge): the stretch of the tier counter priced alike, around
        `tier` (high: where the next step of the ladder starts; None: no end)."""
        low = 0
        for upper, extra in self.tariff.ladder:
            if upper is None:
                return (low, None, extra)
            if tier < upper:
                return (low, upper, extra)
            low = upper
        return (0, -1, 0)                # no ladder: never used

    def _apply_checked(self, doc, group, events, seq=None, now=None):
        """The rules for one reading; a reading that cannot be priced holds the account."""
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
            for rate in RATES:             # T1..T4: the first that went down is named
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
        a, b = local_ms(prev_ts), local_ms(ts)
        parts = None
        if tariff.tou is not None and rates and len(rates) == len(regs) - 1 and \
                all(r in regs for r in rates):
            deltas = [(r, rates[r][0] - centi(regs[r], "a stored register"))
                      for r in RATES if r in rates]
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
        charged = []
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
            charged.append((rate, n, c))
        self._commit(doc, cost, tier if tiered else None, period, value, rates, ts, events,
                     pending)
        for rate, n, c in charged:
            self._band(rate, n, c)

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
        self._period = (start, end, to_datetime(start).isoformat())
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
        split = [largest_remainder(d, lengths) for _, d in deltas]
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
        segs = segments(tariff, a, b)
        parts = largest_remainder(steps, [e - s for s, e, _ in segs])
        return [(self._period_of(s)[2] if tariff.tiered else None, r, n)
                for (s, _, r), n in zip(segs, parts) if n]
