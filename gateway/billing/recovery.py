"""Fee recovery, the rules (pure: integers of micro-yuan, no I/O, no clock of their own):
arrears grades, credit forecasts, debt by instalments, payment channels, and the daily
statement's figures. Cost control (costcontrol.py) keeps the account documents and calls
these; docs/cost-control.md ("Fee recovery") states the rules with a worked example.
"""

import datetime as _dt
import functools
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from gateway.billing.pricing import centi
from gateway.billing.tariff import DAY_MS, EPOCH, MICRO, local_ms, micro_to_yuan
from gateway.money import parse_yuan

FEN = MICRO // 100                     # micro-yuan in one fen

# ---------------------------------------------------------------- days

# A reading taken this soon after midnight closes the day before: the poller reads on the
# clock's quarter hours and the answer takes seconds, so the 00:00 reading is the day's last
# (as the meter's own 00:00 freeze is), not the next day's first.
DAY_GRACE_MS = 120000
# A day counts toward the forecast only when its readings reach this close to both its ends
# and are never further apart (a meter offline for part of the day would make it look
# cheap, and the day it returns dear).
OFFLINE_GAP_MS = 2 * 3600 * 1000


def day_number(ts_ms):
    """The local day (days since 1970-01-01 on the local axis) a reading at ts belongs to."""
    return (local_ms(ts_ms) - DAY_GRACE_MS - 1) // DAY_MS


def today_number(ts_ms):
    """The local day a movement at ts (a top-up, a recovery) belongs to."""
    return local_ms(ts_ms) // DAY_MS


@functools.lru_cache(maxsize=512)
def day_iso(n):
    return (EPOCH + _dt.timedelta(days=n)).date().isoformat()


def day_of_iso(text):
    return (_dt.date.fromisoformat(text) - EPOCH.date()).days


def day_start_local(n):
    """Local-axis ms of the day's 00:00."""
    return n * DAY_MS


def yuan(micro):
    """Money out: a decimal string with two places, rounded half up to the fen."""
    return str(micro_to_yuan(micro))


def kwh(steps):
    return str(Decimal(steps).scaleb(-2).quantize(Decimal("0.01")))


# ---------------------------------------------------------------- arrears grades

GRADES = ("none", "light", "moderate", "heavy")
GRADE_KEYS = tuple("%s_%s" % (g, k) for g in GRADES[1:] for k in ("amount", "days"))
GRADE_DEFAULTS = {"light_amount": "0.01", "light_days": 0,
                  "moderate_amount": "100.00", "moderate_days": 30,
                  "heavy_amount": "500.00", "heavy_days": 90}


def parse_grades(table, base=None):
    """{light_amount: micro, light_days: n, ...} from a table of yuan strings and whole days
    (only the keys given; `base` fills the rest). ValueError naming the key otherwise."""
    if not isinstance(table, dict):
        raise ValueError("must be a table of %s" % ", ".join(GRADE_KEYS))
    out = dict(base) if base is not None else {}
    for key, value in table.items():
        if key not in GRADE_KEYS:
            raise ValueError("%s: not a grade threshold (%s)" % (str(key)[:32],
                                                                 ", ".join(GRADE_KEYS)))
        if key.endswith("_amount"):
            try:
                out[key] = int(parse_yuan(value) * MICRO)
            except ValueError as exc:
                raise ValueError("%s: %s" % (key, exc)) from None
        else:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3650:
                raise ValueError("%s: whole days 0-3650, not %r" % (key, value))
            out[key] = value
    if base is not None:
        amounts = [out[g + "_amount"] for g in GRADES[1:]]
        days = [out[g + "_days"] for g in GRADES[1:]]
        if amounts != sorted(amounts) or days != sorted(days):
            raise ValueError("thresholds must not fall from light to moderate to heavy")
        if out["light_amount"] < FEN:
            raise ValueError("light_amount: at least 0.01")
    return out


DEFAULT_GRADES = parse_grades(GRADE_DEFAULTS, {})


def owed(balance_uy, debt_uy):
    """What the customer owes: the balance below zero and the recorded debt."""
    return max(0, -balance_uy) + debt_uy


def grade_of(owed_uy, days, thresholds):
    """The arrears grade: the highest whose amount is reached, or whose days in arrears are
    reached while anything is owed; `none` when nothing is owed."""
    if owed_uy <= 0:
        return "none"
    for g in ("heavy", "moderate", "light"):
        if owed_uy >= thresholds[g + "_amount"] or days >= thresholds[g + "_days"]:
            return g
    return "none"


def grade_points(debt_uy, thresholds):
    """Balances p where `balance <= p` flips the grade's amount test (see _same_state)."""
    return [-1] + [debt_uy - thresholds[g + "_amount"] for g in GRADES[1:]]


# ---------------------------------------------------------------- credit forecast

def average_daily(history, window, minimum):
    """Average daily charge (micro-yuan, floor) over the last `window` days of the history
    [[day, charges_uy, online], ...], days offline left out; None with fewer than `minimum`
    days that count."""
    days = [c for _, c, online in history[-window:] if online]
    if len(days) < max(1, minimum):
        return None
    return sum(days) // len(days)


def forecast_band(balance_uy, avg_uy, thresholds):
    """The smallest threshold (days) the credit left is at or under, or None."""
    if not avg_uy:
        return None
    band = None
    for t in sorted(thresholds, reverse=True):
        if balance_uy <= t * avg_uy:
            band = t
    return band


def days_left(balance_uy, avg_uy):
    """Days of credit left, a decimal string with one place (floor), "0.0" at or below 0."""
    if not avg_uy:
        return None
    return str(Decimal(max(0, balance_uy) * 10 // avg_uy).scaleb(-1))


def forecast_points(avg_uy, thresholds):
    return [t * avg_uy for t in thresholds] if avg_uy else []


def forecast_view(doc, window, minimum):
    """The forecast as status and events show it."""
    fc = doc.get("forecast") or {}
    avg = fc.get("avg_uy")
    if avg is None:
        return {"days_left": None, "reason": "insufficient history",
                "history_days": sum(1 for d in doc.get("history", [])[-window:] if d[2]),
                "needs_days": minimum}
    if avg == 0:
        return {"days_left": None, "reason": "no consumption", "average_daily": "0.00"}
    return {"days_left": days_left(doc["balance_uy"], avg), "average_daily": yuan(avg),
            "threshold": fc.get("band")}


# ---------------------------------------------------------------- debt by instalments

def parse_rate(value):
    """recovery_rate: a decimal string 0 to 1 with at most 4 places ("0.30")."""
    if not isinstance(value, str) or not re.fullmatch(r"[01](\.[0-9]{1,4})?", value,
                                                      re.ASCII):
        raise ValueError("recovery_rate must be a decimal string from \"0\" to \"1\", "
                         "such as \"0.30\"")
    try:
        rate = Decimal(value)
    except InvalidOperation:
        raise ValueError("recovery_rate: not a number") from None
    if rate > 1:
        raise ValueError("recovery_rate must not be above 1")
    return rate


def fen_floor(micro):
    return max(0, micro) // FEN * FEN


def split_topup(amount_uy, balance_uy, debt_uy, rate, restore_uy):
    """(to credit, to debt) of a top-up: `rate` of the amount goes to the debt, rounded down
    to the fen, never more than the debt, and never so much that the balance after the
    top-up is not above the restore threshold (the payment must restore supply)."""
    if debt_uy <= 0 or not rate:
        return amount_uy, 0
    f = Fraction(rate)
    share = fen_floor(amount_uy * f.numerator // f.denominator)
    room = fen_floor(balance_uy + amount_uy - restore_uy - 1)
    share = min(share, debt_uy, room)
    return amount_uy - share, share


def daily_share(daily_uy, balance_uy, debt_uy, restore_uy):
    """The fixed daily instalment: at most the debt, and never so much that the balance is
    no longer above the restore threshold (it must not cut anyone off)."""
    if debt_uy <= 0 or daily_uy <= 0:
        return 0
    return min(daily_uy, debt_uy, fen_floor(balance_uy - restore_uy - 1))


# ---------------------------------------------------------------- payment channels

CHANNEL_MAX = 32
_CHANNEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,%d}" % (CHANNEL_MAX - 1), re.ASCII)
NO_CHANNEL = "unspecified"


def check_channel(value):
    """Why a top-up's params.channel is not acceptable, or None (absent is acceptable)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _CHANNEL.fullmatch(value):
        return "channel must be a name of 1-%d letters, digits or _.:- (such as " \
               "\"wechat\")" % CHANNEL_MAX
    return None


# ---------------------------------------------------------------- the day's movements

def new_day():
    return {"charges_uy": 0, "bands": {}, "topups": {}, "recovered_uy": 0, "debt_adjust_uy": 0,
            "readings": 0, "first_prev_ts": None, "last_ts": None, "max_gap_ms": 0}


def day_record(doc, n):
    """The movements of local day n (created; a day already stated gives the first day not
    yet stated, so that nothing moves after its statement)."""
    n = max(n, doc["stated_day"] + 1)
    days = doc.setdefault("days", {})
    key = day_iso(n)
    rec = days.get(key)
    if rec is None:
        rec = days[key] = new_day()
    return rec


def moves(rec):
    """Net balance movement of a day record (micro-yuan)."""
    return sum(rec["topups"].values()) - rec["charges_uy"] - rec["recovered_uy"]


def online_day(rec, n):
    """Whether the meter was read through the day (for the forecast)."""
    if not rec or not rec["readings"] or rec["first_prev_ts"] is None:
        return False
    start = day_start_local(n) + DAY_GRACE_MS
    end = start + DAY_MS
    return local_ms(rec["first_prev_ts"]) <= start + OFFLINE_GAP_MS and \
        local_ms(rec["last_ts"]) >= end - OFFLINE_GAP_MS and \
        rec.get("max_gap_ms", 0) <= OFFLINE_GAP_MS


def band_split(charges_fen_uy, bands):
    """Each band's charge in fen, summing exactly to the day's charge in fen (largest
    remainder over the bands' exact micro-yuan; the earliest band on a tie)."""
    names = list(bands)
    exact = [bands[b][1] for b in names]
    total = sum(exact)
    fen = charges_fen_uy // FEN
    if not names:
        return {}
    if total <= 0:
        parts = [fen] + [0] * (len(names) - 1)
    else:
        parts = [fen * e // total for e in exact]
        left = fen - sum(parts)
        rems = sorted(range(len(names)), key=lambda i: (-(fen * exact[i] % total), i))
        for i in rems[:left]:
            parts[i] += 1
    return {b: p * FEN for b, p in zip(names, parts)}


def statement(meter, n, doc, freezes, tariff_name):
    """The statement of day n for an account document whose days before n are stated, and
    the (start, end) freezes of the day (dicts of register texts, or None).

    Money reconciles to the fen by construction: the opening and closing balances are the
    exact balances rounded to the fen, top-ups and recoveries are whole fen, and the day's
    charges are what is left (the fall of the rounded balance not explained by them), split
    over the bands by largest remainder. `reconciled` is the check that the exact balance
    now equals this closing plus every later day's movements."""
    rec = (doc.get("days") or {}).get(day_iso(n)) or new_day()
    opening = doc["stated_closing_uy"]
    closing = opening + moves(rec)
    later = sum(moves(r) for d, r in (doc.get("days") or {}).items() if day_of_iso(d) > n)
    reconciled = closing + later == doc["balance_uy"]
    topups_uy = sum(rec["topups"].values())
    open_fen = int(micro_to_yuan(opening) * 100) * FEN
    close_fen = int(micro_to_yuan(closing) * 100) * FEN
    charges_fen = open_fen + topups_uy - rec["recovered_uy"] - close_fen
    split = band_split(charges_fen, rec["bands"])
    steps = sum(b[0] for b in rec["bands"].values())
    debt_open = doc.get("stated_debt_uy", 0)
    debt_close = debt_open + rec["debt_adjust_uy"] - rec["recovered_uy"]
    body = {
        "meter": meter, "day": day_iso(n), "tariff": tariff_name,
        "opening_balance": yuan(opening), "closing_balance": yuan(closing),
        "consumption_kwh": kwh(steps), "charges": yuan(charges_fen),
        "bands": [{"band": b, "kwh": kwh(rec["bands"][b][0]), "charges": yuan(split[b])}
                  for b in rec["bands"]],
        "topups": yuan(topups_uy),
        "topups_by_channel": {c: yuan(v) for c, v in sorted(rec["topups"].items())},
        "recovered": yuan(rec["recovered_uy"]),
        "adjustments": {"debt": yuan(rec["debt_adjust_uy"]) if rec["debt_adjust_uy"] >= 0
                        else "-" + yuan(-rec["debt_adjust_uy"])},
        "debt": {"opening": yuan(debt_open), "closing": yuan(debt_close)},
        "reconciled": reconciled,
    }
    start, end = freezes
    mismatch = None
    if start is not None and end is not None:
        freeze_steps = _freeze_steps(end) - _freeze_steps(start)
        if "t1" in start and "t1" in end and all(("t%d" % k) in start and ("t%d" % k) in end
                                                 for k in (1, 2, 3, 4)) and \
                any(b not in ("single",) for b in rec["bands"]):
            # billed by the meter's rate registers: compare with theirs
            freeze_steps = _freeze_steps(end, True) - _freeze_steps(start, True)
        body["meter_freeze"] = {"start": start, "end": end, "kwh": kwh(freeze_steps)}
        if abs(freeze_steps - steps) > 1:
            mismatch = {"meter": meter, "day": day_iso(n), "charged_kwh": kwh(steps),
                        "meter_kwh": kwh(freeze_steps)}
    else:
        body["meter_freeze"] = None
    body["mismatch"] = mismatch is not None
    state = {"closing_uy": closing, "debt_uy": debt_close, "charges_uy": rec["charges_uy"],
             "online": online_day(rec, n), "reconciled": reconciled}
    return body, mismatch, state


def _freeze_steps(freeze, registers=False):
    if registers:
        return sum(centi(freeze["t%d" % k]) for k in (1, 2, 3, 4))
    return centi(freeze["total"])
