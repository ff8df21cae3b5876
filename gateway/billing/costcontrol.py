"""Prepaid cost control: meter registers into money, balances kept on the box, warnings
first, safe automatic cut-off, prompt restore.

Cost control is a consumer of the journal's readings. For each account it prices the
growth of the meter's energy registers with the account's tariff (per-tariff registers
where the meter has them and the tariff is time-of-use; otherwise the total register,
priced by the time window it was consumed in), in 0.01 kWh steps as the meters do. The
balance and the journal position it has been charged up to are written in the same state
document, so a restart neither charges twice nor skips.

Account states follow the meters': normal, alarm1, alarm2 (pre-trip), zero (within
overdraft), exhausted (past the overdraft limit); entering each raises one event. In `local`
mode an exhausted account is cut off only when every safety condition holds (notice given,
no guarantee, outside protected windows, the mass cut-off breaker not tripped); a top-up
that brings the balance above the restore threshold restores supply at once, at any hour.
Cut-offs and restores go through the command executor (ledger, read-back, audit, results).

Fee recovery (recovery.py has the rules): each account carries an arrears grade and a credit
forecast (events when they change), a debt recovered by instalments (a share of each top-up,
a fixed amount a day), top-ups by payment channel, and the movements of each day, which
become one statement per account and day on the journal's `statements` stream.
"""

import collections
import copy
import datetime as _dt
import logging
import operator
import queue
import threading
import time
from decimal import Decimal

from gateway.billing import recovery, settings
from gateway.billing.recovery import day_iso, day_number, day_record, today_number, yuan
from gateway.billing.tariff import DAY_MS, local_ms, micro_to_yuan, yuan_to_micro
from gateway.billing.pricing import ENERGY_TOTAL, TARIFF_QUANTITIES, Billing  # noqa: F401
from gateway.money import parse_yuan
from gateway.store.journal import ENERGY

log = logging.getLogger(__name__)

_ACT_LOCK = threading.Lock()
ACT_LOCK_WAIT_S = 1.0

CONSUMER = "billing"
STATES = ("normal", "alarm1", "alarm2", "zero", "exhausted")
EVENT_OF_STATE = {"alarm1": ("balance.low", {"level": 1}), "alarm2": ("balance.low",
                                                                      {"level": 2}),
                  "zero": ("balance.zero", {}), "exhausted": ("balance.exhausted", {}),
                  "normal": ("balance.normal", {})}

# [cost_control]'s defaults as the file gives them (gateway/billing/settings.py declares
# them; the configured policy arrives as a CostPolicy record)
POLICY_DEFAULTS = {f.name: f.value for f in settings.COST_CONTROL.fields}

Topup = collections.namedtuple("Topup", "balance applied credit recovered debt channel")


# ---------------------------------------------------------------- the engine

def state_of(balance_uy, acc):
    """The account state for a balance (micro-yuan)."""
    if balance_uy < -yuan_to_micro(acc["overdraft_limit"]) or \
            (balance_uy <= 0 and acc["overdraft_limit"] == 0):
        return "exhausted"
    if balance_uy <= 0:
        return "zero"
    if balance_uy <= yuan_to_micro(acc["alarm2"]):
        return "alarm2"
    if balance_uy <= yuan_to_micro(acc["alarm1"]):
        return "alarm1"
    return "normal"


def new_account_doc(acc, now=None):
    now = time.time() if now is None else now
    opening = yuan_to_micro(acc["opening_balance"])
    doc = {"balance_uy": opening, "opening_uy": opening, "topups_uy": 0, "charges_uy": 0,
           "charged_to_seq": 0, "registers": {}, "register_ts": None, "tier_centi": 0,
           "tier_period": None, "state": state_of(opening, acc), "state_since": now,
           "warned": {}, "cut_by_costcontrol": False, "txns": []}
    recovery_fields(doc, now)
    return doc


def recovery_fields(doc, now):
    """The fee-recovery fields of an account document (a document from before them gets
    them: its statements start with the day it is upgraded on, from its balance then)."""
    doc.setdefault("debt_uy", 0)
    doc.setdefault("recovered_uy", 0)         # debt recovered, all time (the ledger's sum)
    doc.setdefault("debt_added_uy", 0)        # debt set by the head-end, net, all time
    doc.setdefault("stated_day", today_number(int(now * 1000)) - 1)
    doc.setdefault("stated_closing_uy", doc["balance_uy"])
    doc.setdefault("stated_debt_uy", doc["debt_uy"])
    doc.setdefault("days", {})
    doc.setdefault("history", [])             # [[day, charges_uy, online]] of stated days
    doc.setdefault("grade", "none")
    doc.setdefault("arrears_since", None)
    doc.setdefault("forecast", {"avg_uy": None, "band": None})
    doc.setdefault("recovery_day", None)      # the last day a daily instalment was taken
    return doc


class CostControl(threading.Thread):
    """The cost-control thread: bills the journal's readings into the account store, warns,
    and asks for cut-offs and restores through `request_relay(meter, action, reason)`
    (the command executor's local path). It owns no stored record itself: every account
    change goes through the account store."""

    def __init__(self, *, accounts, tariffs, policy, store, journal, events, request_relay,
                 relay_states=lambda: {}, cutoff_times=None, clock=time.time):
        super().__init__(name="costcontrol", daemon=True)
        # accounts: AccountConfig records (or dicts); copied, as head-end updates change them
        self.accounts = {a["meter"]: dict(a) for a in accounts}
        self.tariffs = tariffs
        self.policy = dict(POLICY_DEFAULTS)
        self.policy.update(policy if policy is not None else settings.COST_CONTROL.default())
        if any(isinstance(v, str) for v in self.policy["grades"].values()):
            self.policy["grades"] = recovery.parse_grades(self.policy["grades"],
                                                          recovery.DEFAULT_GRADES)
        # each tariff's own grades (the keys it gives, over [cost_control.grades])
        self.tariff_grades = {}
        for name, tariff in tariffs.items():
            if getattr(tariff, "grades", None):
                self.tariff_grades[name] = recovery.parse_grades(tariff.grades,
                                                                 self.policy["grades"])
        self.clock = clock                      # wall time, seconds (tests and bench inject)
        self.store = store
        self.journal = journal
        self.events = events
        self.request_relay = request_relay
        self._relay_states = relay_states
        self.billing = {m: Billing(a, self.tariffs[a["tariff"]])
                        for m, a in self.accounts.items()}
        self._lock = threading.RLock()          # billing cycles and settings changes
        self._act_lock = _ACT_LOCK              # one relay decision at a time, even across
                                                # a replaced instance
        self._cutoff_times = cutoff_times       # since -> times of automatic cut-offs
        self._halt = threading.Event()
        self._due = queue.Queue()               # meters to act on now (after a top-up)
        self._cutoffs = []                      # times of automatic cut-offs (breaker)
        self.heartbeat = time.monotonic()
        if self.accounts:
            # billing reads the journal's energy table (a journal from before it moves
            # billing's readings cursor there, see Journal.register)
            self.journal.register(CONSUMER, ENERGY)
        else:
            # nothing to bill: read nothing, and hold nothing back for billing
            self.journal.unregister(CONSUMER, ENERGY)
            self.journal.unregister(CONSUMER, "readings")    # a journal from before it
        self._init_accounts()

    # ---------------------------------------------------------------- head-end updates

    UPDATABLE_MONEY = ("alarm1", "alarm2", "overdraft_limit", "restore_threshold",
                       "daily_recovery")
    # fee recovery: `debt` is the amount owed (kept in the account document, not a setting)
    RECOVERY_KEYS = ("debt", "recovery_rate", "daily_recovery", "grades")

    def check_update(self, params, meter=None):
        """Why an account_update's params are not acceptable, or None."""
        if not params:
            return "account_update needs params (mode, tariff, alarm1, alarm2, " \
                   "overdraft_limit, restore_threshold, debt, recovery_rate, " \
                   "daily_recovery, grades)"
        for key, value in params.items():
            if key in self.UPDATABLE_MONEY or key == "debt":
                try:
                    parse_yuan(value)
                except ValueError:
                    return "%s must be yuan as a decimal string, such as \"10.00\"" % key
            elif key == "recovery_rate":
                try:
                    recovery.parse_rate(value)
                except ValueError as exc:
                    return str(exc)
            elif key == "grades":
                base = self._grades(meter) if meter in self.accounts else None
                try:
                    recovery.parse_grades(value, base or self.policy["grades"])
                except ValueError as exc:
                    return "grades: %s" % exc
            elif key == "mode":
                if value not in ("local", "remote"):
                    return "mode is local or remote"
            elif key == "tariff":
                if not isinstance(value, str) or value not in self.tariffs:
                    return "no tariff %s on this gateway" % json_text(value)
            else:
                return "%s cannot be updated (mode, tariff, %s, debt, recovery_rate, " \
                    "grades)" % (str(key)[:32], ", ".join(self.UPDATABLE_MONEY))
        return None

    @staticmethod
    def check_topup(params):
        """Why a top-up's params beyond amount and txn are not acceptable (the channel), or
        None."""
        return recovery.check_channel(params.get("channel"))

    def _apply_settings(self, meter, params):
        acc = self.accounts[meter]
        for key, value in params.items():
            if key == "debt":
                continue                        # the document's, see update_account
            if key == "grades":
                acc[key] = recovery.parse_grades(value, self._grades(meter))
            elif key == "recovery_rate":
                acc[key] = recovery.parse_rate(value)
            else:
                acc[key] = Decimal(value) if key in self.UPDATABLE_MONEY else value
        if "tariff" in params:
            self.billing[meter] = Billing(acc, self.tariffs[acc["tariff"]])

    def update_account(self, meter, params):
        """Apply and keep (state file) a head-end update of an account's settings. `debt`
        sets what the account owes besides its balance (a day's adjustment)."""
        events = []
        now = self.clock()
        settings_only = {k: v for k, v in params.items() if k != "debt"}

        def change(doc):
            recovery_fields(doc, now)
            if "debt" in params:
                new = yuan_to_micro(parse_yuan(params["debt"]))
                adjust = new - doc["debt_uy"]
                doc["debt_uy"] = new
                doc["debt_added_uy"] += adjust
                day_record(doc, today_number(int(now * 1000)))["debt_adjust_uy"] += adjust
            self._transition(meter, doc, events)
        with self._lock:
            self._apply_settings(meter, params)
            self.store.update_settings(meter, settings_only, change)
        for etype, fields in events:
            self.events(etype, **fields)
        self.events("account.updated", meter=meter, **params)
        self._due.put(meter)                    # a lower threshold may allow a restore
        acc = self.accounts[meter]
        out = {k: str(v) if isinstance(v, Decimal) else v for k, v in acc.items()
               if k in ("mode", "tariff", "recovery_rate") + self.UPDATABLE_MONEY}
        out["grades"] = self._grades_view(meter)
        out["debt"] = yuan(self.store.get(meter).get("debt_uy", 0))
        return out

    def _grades(self, meter):
        """The account's own (account_update), else its tariff's, else [cost_control]'s."""
        acc = self.accounts[meter]
        return acc.get("grades") or self.tariff_grades.get(acc["tariff"]) or \
            self.policy["grades"]

    def _grades_view(self, meter):
        return {k: yuan(v) if k.endswith("_amount") else v
                for k, v in self._grades(meter).items()}

    def _init_accounts(self):
        for meter, overrides in self.store.overrides().items():
            if meter in self.accounts and not self.check_update(overrides, meter):
                self._apply_settings(meter, overrides)
        events = []
        now = self.clock()
        stale = [m for m, d in self.store.all().items()
                 if m in self.accounts and "stated_day" not in d]
        if stale:                               # documents from before fee recovery
            with self.store.transaction() as tx:
                for m in stale:
                    tx.put(m, recovery_fields(tx.get(m), now))
        for mid, acc in self.accounts.items():
            doc = new_account_doc(acc, now)
            if doc["state"] != "normal":
                # an account that opens low is warned like one that runs low
                doc["warned"][doc["state"]] = now
            if self.store.create(mid, doc) and doc["state"] != "normal":
                etype, fields = EVENT_OF_STATE[doc["state"]]
                events.append((etype, dict(fields, meter=mid, previous=None,
                                           balance=str(acc["opening_balance"]))))
            if acc.get("guarantee") and not self.store.guarantee_on(mid):
                self.store.set_guarantee(mid, True, "config")
        for etype, fields in events:
            self.events(etype, **fields)

    def stop(self, timeout=5.0):
        self._halt.set()
        self._due.put(None)
        if self.is_alive():
            self.join(timeout)

    # ---------------------------------------------------------------- queries

    @property
    def breaker_tripped(self):
        return bool(self.store.flags().get("breaker_tripped"))

    def has_account(self, meter_id):
        return meter_id in self.accounts

    def doc(self, meter_id):
        return self.store.get(meter_id)

    def balances(self):
        return {m: str(micro_to_yuan(d["balance_uy"]))
                for m, d in self.store.all().items() if m in self.accounts}

    def relay_states(self):
        return self._relay_states()

    def accounts_status(self):
        out = {}
        for m, d in self.store.all().items():
            if m not in self.accounts:
                continue
            acc = self.accounts[m]
            out[m] = {"balance": str(micro_to_yuan(d["balance_uy"])), "state": d["state"],
                      "mode": acc["mode"], "tariff": acc["tariff"],
                      "cut_by_costcontrol": d.get("cut_by_costcontrol", False),
                      "billing_hold": d.get("billing_hold"),
                      "grade": d.get("grade", "none"),
                      "owed": yuan(recovery.owed(d["balance_uy"], d.get("debt_uy", 0))),
                      "days_in_arrears": self._arrears_days(d, self.clock()),
                      "debt": yuan(d.get("debt_uy", 0)),
                      "recovery_rate": str(acc.get("recovery_rate") or "0"),
                      "daily_recovery": str(acc.get("daily_recovery") or "0.00"),
                      "forecast": recovery.forecast_view(
                          d, self.policy["forecast_window_days"],
                          self.policy["forecast_min_days"]),
                      "stated_day": day_iso(d["stated_day"]) if "stated_day" in d else None}
        out["_breaker_tripped"] = self.breaker_tripped
        return out

    # ---------------------------------------------------------------- the thread

    def run(self):
        next_check = 0.0
        try:
            # statements left due by a restart first, from the documents as they were when
            # it stopped (nothing billed since), so a statement journalled just before a
            # kill is recognised, not made differently
            self.make_statements()
        except Exception:
            log.exception("cost control: statements")
        while not self._halt.is_set():
            self.heartbeat = time.monotonic()
            try:
                n = self.bill_once()
                due = set()
                while True:
                    try:
                        m = self._due.get_nowait()
                    except queue.Empty:
                        break
                    if m is not None:
                        due.add(m)
                for meter in sorted(due):
                    self.act(only=meter)
                if time.time() >= next_check:
                    next_check = time.time() + self.policy["check_interval_s"]
                    self.act()
                    self.housekeeping()
                if not n:
                    try:
                        m = self._due.get(timeout=0.5)
                        if m is not None:
                            self._due.put(m)
                    except queue.Empty:
                        pass
            except Exception:
                log.exception("cost control")
                self._halt.wait(2)

    def bill_once(self, limit=None):
        """Charge the energy readings after the billing cursor (at most `limit` rows of the
        journal's energy table, one per meter and time); one state write for the batch, read
        and written under the state's lock (no other writer's change is lost). Returns the
        number of energy rows consumed.

        Each account's readings are billed in the order of their time (a tie: in seq order)
        in one `apply_batch`. A reading's position is its seq (the seq of its last row in
        the readings); one at or below the account's `charged_to_seq` was charged before a
        restart: never twice. Events come out in the order of the readings that raised them
        (time, then seq), as billing them one by one would."""
        if not self.accounts:
            return 0
        with self._lock:
            n, last, per_meter = self.journal.read_energy(CONSUMER, limit=limit or BILL_ROWS)
            if not n:
                return 0
            accounts = self.accounts
            events = []
            with self.store.transaction() as tx:
                for meter, seqs, tss, *cols in per_meter:
                    if meter not in accounts:
                        continue
                    doc = tx.get(meter)
                    if doc is None:
                        continue
                    # (tag, seq, ts, values): the tag is the seq; values the registers'
                    # texts (total, t1, t2, t3, t4), None where the reading had none
                    items = list(zip(seqs, seqs, tss, zip(*cols)))
                    columns = [tss] + cols           # the same, as columns
                    if not all(map(operator.le, tss, tss[1:])):
                        items.sort(key=_time_then_seq)
                        seqs = list(map(_item_seq, items))
                        columns = None
                    charged = doc.get("charged_to_seq", 0)
                    if seqs[0] > charged and all(map(operator.lt, seqs, seqs[1:])):
                        todo = items                 # the usual batch: all new, in order
                        charged = seqs[-1]
                    else:
                        columns = None
                        todo = []
                        for item in items:
                            if item[1] > charged:    # charged before a restart: never twice
                                todo.append(item)
                                charged = item[1]
                        if not todo:
                            continue
                    evs = []
                    self._bill_days(doc, self.billing[meter], todo, evs,
                                    self._watch(meter, doc, evs), columns)
                    doc["charged_to_seq"] = charged
                    if evs:
                        ts_of = dict(zip(seqs, tss))
                        for tag, etype, fields in evs:
                            if "meter" not in fields:
                                fields = dict(fields, meter=meter)
                            events.append(((ts_of[tag], tag), etype, fields))
                    tx.put(meter, doc)
            events.sort(key=_event_tag)
            for _, etype, fields in events:
                self.events(etype, **fields)
            self.journal.ack(CONSUMER, ENERGY, last)
            return n

    @staticmethod
    def _bill_days(doc, billing, items, evs, watch, columns):
        """apply_batch over the readings, a local day at a time, each day's charges (per
        band) and readings added to the day's movements (for its statement)."""
        first = day_number(items[0][2])
        if first == day_number(items[-1][2]):
            chunks = [(first, 0, len(items))]
        else:
            chunks, start, cur = [], 0, first
            for k, item in enumerate(items):
                n = day_number(item[2])
                if n != cur:
                    chunks.append((cur, start, k))
                    start, cur = k, n
            chunks.append((cur, start, len(items)))
        for n, a, b in chunks:
            prev_ts = doc.get("register_ts")
            charges = doc["charges_uy"]
            part = items if (a, b) == (0, len(items)) else items[a:b]
            cols = columns if columns is None or part is items else [c[a:b] for c in columns]
            billing.apply_batch(doc, part, evs, watch, columns=cols)
            rec = day_record(doc, n)
            rec["charges_uy"] += doc["charges_uy"] - charges
            for band, (steps, cost) in billing.take_bands().items():
                got = rec["bands"].get(band)
                if got is None:
                    rec["bands"][band] = [steps, cost]
                else:
                    got[0] += steps
                    got[1] += cost
            rec["readings"] += len(part)
            tss = list(map(_item_ts, part))
            if rec["first_prev_ts"] is None:
                rec["first_prev_ts"] = prev_ts if prev_ts is not None else tss[0]
            gaps = [tss[0] - prev_ts] if prev_ts is not None else []
            gaps += map(operator.sub, tss[1:], tss[:-1])
            rec["max_gap_ms"] = max([rec.get("max_gap_ms", 0)] + gaps)
            rec["last_ts"] = tss[-1]

    def _watch(self, meter, doc, events):
        """apply_batch's watch: the balances (low, high] over which the account's state
        stays what it is, and the function that moves the state when a reading leaves them
        (its events tagged with the reading's tag)."""
        def moved(doc, tag):
            evs = []
            self._transition(meter, doc, evs)
            events.extend((tag, etype, fields) for etype, fields in evs)
            return self._same_state(meter, doc)
        return list(self._same_state(meter, doc)) + [moved]

    def _same_state(self, meter, doc):
        """(low, high): the balances over which the account's state, arrears grade (by
        amount) and forecast band stay what they are (see _same_state below)."""
        bal = doc["balance_uy"]
        low, high = _same_state(doc, self.accounts[meter])
        if low >= high:
            return low, high
        debt = doc.get("debt_uy", 0)
        if "stated_day" not in doc:
            return low, high
        if recovery.grade_of(recovery.owed(bal, debt), self._arrears_days(doc, self.clock()),
                             self._grades(meter)) != doc["grade"]:
            return (bal, bal - 1)
        fc = doc.get("forecast") or {}
        thresholds = self.policy["forecast_thresholds"]
        if recovery.forecast_band(bal, fc.get("avg_uy"), thresholds) != fc.get("band"):
            return (bal, bal - 1)
        for p in recovery.grade_points(debt, self._grades(meter)) + \
                recovery.forecast_points(fc.get("avg_uy"), thresholds):
            if p < bal:
                low = max(low, p)
            else:
                high = min(high, p)
        return low, high

    def _transition(self, meter, doc, events):
        acc = self.accounts[meter]
        now = self.clock()
        new = state_of(doc["balance_uy"], acc)
        if new != doc["state"]:
            old = doc["state"]
            doc["state"] = new
            doc["state_since"] = now
            etype, fields = EVENT_OF_STATE[new]
            if STATES.index(new) > STATES.index(old) or new == "normal":
                doc.setdefault("warned", {})[new] = now
                events.append((etype, dict(fields, meter=meter, previous=old,
                                           balance=str(micro_to_yuan(doc["balance_uy"])))))
        if "stated_day" in doc:
            self._grade(meter, doc, events, now)
            self._forecast(meter, doc, events)

    @staticmethod
    def _arrears_days(doc, now):
        since = doc.get("arrears_since")
        return int((now - since) // 86400) if since is not None and now > since else 0

    def _grade(self, meter, doc, events, now):
        """The arrears grade from what is owed and for how long; balance.grade on a change."""
        owed = recovery.owed(doc["balance_uy"], doc["debt_uy"])
        if owed <= 0:
            doc["arrears_since"] = None
        elif doc.get("arrears_since") is None:
            doc["arrears_since"] = now
        days = self._arrears_days(doc, now)
        grade = recovery.grade_of(owed, days, self._grades(meter))
        old = doc.get("grade", "none")
        if grade != old:
            doc["grade"] = grade
            events.append(("balance.grade", {"meter": meter, "grade": grade, "previous": old,
                                             "owed": yuan(owed), "days": days,
                                             "balance": yuan(doc["balance_uy"]),
                                             "debt": yuan(doc["debt_uy"])}))

    def _forecast(self, meter, doc, events):
        """The forecast band (days of credit left); balance.forecast when it changes."""
        fc = doc["forecast"]
        avg = fc.get("avg_uy")
        band = recovery.forecast_band(doc["balance_uy"], avg,
                                      self.policy["forecast_thresholds"])
        if band != fc.get("band"):
            old, fc["band"] = fc.get("band"), band
            events.append(("balance.forecast", {
                "meter": meter, "threshold_days": band, "previous": old,
                "days_left": recovery.days_left(doc["balance_uy"], avg),
                "average_daily": yuan(avg), "balance": yuan(doc["balance_uy"])}))

    # ---------------------------------------------------------------- top-ups

    def apply_topup(self, meter_id, amount, txn, command_id=None, channel=None):
        """A Topup (balance, applied, credit, recovered, debt, channel; money as yuan
        strings) -- a txn is applied once, whatever carries it; a duplicate reports how the
        first was split. With a debt, `recovery_rate` of the amount goes to it (split_topup)."""
        events = []
        acc = self.accounts[meter_id]
        channel = channel or recovery.NO_CHANNEL
        now = self.clock()

        def split(doc):
            recovery_fields(doc, now)
            return recovery.split_topup(yuan_to_micro(amount), doc["balance_uy"],
                                        doc["debt_uy"], acc.get("recovery_rate"),
                                        yuan_to_micro(acc["restore_threshold"]))[1]

        def change(doc, share):
            rec = day_record(doc, today_number(int(now * 1000)))
            rec["topups"][channel] = rec["topups"].get(channel, 0) + yuan_to_micro(amount)
            rec["recovered_uy"] += share
            self._transition(meter_id, doc, events)
        with self._lock:
            doc, applied = self.store.topup(meter_id, txn, yuan_to_micro(amount),
                                            command=command_id, on_change=change,
                                            channel=channel, split=split, at=now)
        balance = yuan(doc["balance_uy"])
        record = self.store.txn(txn) or {}
        share = record.get("recovered_uy", 0)
        result = Topup(balance, applied, yuan(record.get("amount_uy", 0) - share),
                       yuan(share), yuan(doc.get("debt_uy", 0)),
                       record.get("channel") or recovery.NO_CHANNEL)
        if not applied:
            return result
        for etype, fields in events:
            self.events(etype, **fields)
        self.events("balance.topup", meter=meter_id, amount=str(amount), txn=txn,
                    balance=balance, channel=channel, to_credit=result.credit,
                    to_debt=result.recovered, debt=result.debt)
        if share:
            self.events("debt.recovered", meter=meter_id, amount=result.recovered,
                        source="topup", txn=txn, debt=result.debt)
        self._due.put(meter_id)                 # restore now, at any hour
        return result

    # ---------------------------------------------------------------- the day's work

    def housekeeping(self, now=None):
        """Once per check: daily instalments of the new day, grades that a day in arrears
        moves, and the statements that are due. Returns the statements journalled."""
        now = self.clock() if now is None else now
        self._daily(now)
        return self.make_statements(now)

    def _daily(self, now):
        today = today_number(int(now * 1000))
        events = []
        with self._lock:
            docs = self.store.all()
            todo = []
            for meter, acc in self.accounts.items():
                doc = docs.get(meter)
                if doc is None or "stated_day" not in doc:
                    continue
                daily = acc.get("daily_recovery")
                takes = daily and doc["debt_uy"] > 0 and doc.get("recovery_day") != today
                owed = recovery.owed(doc["balance_uy"], doc["debt_uy"])
                regrade = owed > 0 and recovery.grade_of(
                    owed, self._arrears_days(doc, now), self._grades(meter)) != doc["grade"]
                if takes or regrade:
                    todo.append(meter)
            if not todo:
                return
            with self.store.transaction() as tx:
                for meter in todo:
                    doc = tx.get(meter)
                    acc = self.accounts[meter]
                    daily = acc.get("daily_recovery")
                    if daily and doc["debt_uy"] > 0 and doc.get("recovery_day") != today:
                        doc["recovery_day"] = today
                        key = "recovery:%s:%s" % (meter, day_iso(today))
                        share = recovery.daily_share(
                            yuan_to_micro(daily), doc["balance_uy"], doc["debt_uy"],
                            yuan_to_micro(acc["restore_threshold"]))
                        if share and tx.ledger(key, {"meter": meter, "kind": "daily_recovery",
                                                     "recovered_uy": share, "at": now}):
                            doc["balance_uy"] -= share
                            doc["debt_uy"] -= share
                            doc["recovered_uy"] += share
                            day_record(doc, today)["recovered_uy"] += share
                            events.append(("debt.recovered", {
                                "meter": meter, "amount": yuan(share), "source": "daily",
                                "day": day_iso(today), "debt": yuan(doc["debt_uy"])}))
                    self._transition(meter, doc, events)
                    tx.put(meter, doc)
        for etype, fields in events:
            self.events(etype, **fields)

    def make_statements(self, now=None):
        """The statements that are due: for each account, each day after its last statement
        whose statement hour has passed, once its billing has a reading of a later day and
        the meter's freeze at the day's end is in (or `statement_wait_h` later without
        them). Journalled first (once per account and day, whatever restarts), then the
        account's documents move on in one write. Returns the number journalled."""
        now = self.clock() if now is None else now
        lnow = local_ms(int(now * 1000))
        hour_ms = self.policy["statement_hour"] * 3600000
        wait_ms = self.policy["statement_wait_h"] * 3600000
        window = self.policy["forecast_window_days"]
        made = []                                # (meter, day, body, mismatch, state)
        with self._lock:
            docs = self.store.all()
            for meter, acc in self.accounts.items():
                doc = docs.get(meter)
                if doc is None or "stated_day" not in doc:
                    continue
                n = doc["stated_day"] + 1
                if lnow < (n + 1) * DAY_MS + hour_ms:
                    continue
                doc = copy.deepcopy(doc)
                while lnow >= (n + 1) * DAY_MS + hour_ms:
                    start = self._freeze(meter, n)
                    end = self._freeze(meter, n + 1)
                    ts = doc.get("register_ts")
                    billed = ts is not None and day_number(ts) > n
                    if not (billed and end is not None) and \
                            lnow < (n + 1) * DAY_MS + hour_ms + wait_ms:
                        break
                    body, mismatch, st = recovery.statement(meter, n, doc, (start, end),
                                                            acc["tariff"])
                    made.append((meter, n, body, mismatch, st))
                    _stated(doc, n, st, window)
                    n += 1
            if not made:
                return 0
            self.journal.append_statements([(m, day_iso(n), body)
                                            for m, n, body, _, _ in made])
            events = []
            with self.store.transaction() as tx:
                for meter, n, body, mismatch, st in made:
                    doc = tx.get(meter)
                    if doc["stated_day"] != n - 1:
                        continue                 # (cannot happen under the lock)
                    _stated(doc, n, st, window)
                    doc["forecast"]["avg_uy"] = recovery.average_daily(
                        doc["history"], window, self.policy["forecast_min_days"])
                    self._transition(meter, doc, events)
                    tx.put(meter, doc)
                    if mismatch:
                        events.append(("statement.mismatch", mismatch))
                    if not st["reconciled"]:
                        log.error("statement %s %s does not reconcile with the balance",
                                  meter, body["day"])
                        events.append(("statement.unreconciled",
                                       {"meter": meter, "day": body["day"]}))
        for etype, fields in events:
            self.events(etype, **fields)
        oldest = min(n for _, n, _, _, _ in made) - 100
        self.journal.forget_statements(day_iso(oldest))
        self.journal.forget_freezes(self._midnight_ms(oldest))
        return len(made)

    @staticmethod
    def _midnight_ms(n):
        """Unix ms of local midnight starting day n (what a meter stamps its freeze with)."""
        day = _dt.date.fromisoformat(day_iso(n))
        return int(_dt.datetime.combine(day, _dt.time()).timestamp()) * 1000

    def _freeze(self, meter, n):
        f = self.journal.freeze(meter, self._midnight_ms(n))
        if f is not None:
            f = dict(f, ts=_dt.datetime.fromtimestamp(self._midnight_ms(n) / 1000)
                     .astimezone().isoformat())
        return f

    # ---------------------------------------------------------------- actions

    now = staticmethod(_dt.datetime.now)      # local time; tests put a fixed one here

    def protected_now(self, now=None):
        """Inside a friendly-credit / protected window: no automatic cut-off."""
        return protected_reason(now or self.now(), self.policy,
                                self.store.flags().get("weather_hold"))

    def act(self, only=None):
        """Automatic cut-offs (local mode, every condition) and restores after top-ups.
        One at a time: the periodic check and a top-up's prompt restore never race."""
        if not self._act_lock.acquire(timeout=ACT_LOCK_WAIT_S):
            return                  # another instance is acting: next round
        try:
            self._act(only)
        finally:
            self._act_lock.release()

    def tick(self):
        self.heartbeat = time.monotonic()

    def _act(self, only):
        wanted_cut = []
        for meter, acc in self.accounts.items():
            if only and meter != only:
                continue
            doc = self.store.get(meter)
            if doc is None:
                continue
            restore_at = yuan_to_micro(acc["restore_threshold"])
            # cost control cut it (or meant to): restore once paid, whatever the mode now
            if doc.get("cut_by_costcontrol") and doc["balance_uy"] > restore_at:
                self.request_relay(meter, "restore", "balance above the restore threshold",
                                   tick=self.tick)
            elif acc["mode"] == "local" and doc["state"] == "exhausted" and \
                    not doc.get("cut_by_costcontrol"):
                wanted_cut.append(meter)
        if not wanted_cut or self.protected_now():
            return
        now = self.clock()
        window = self.policy["breaker_window_s"]
        limit = min(self.policy["breaker_max_count"],
                    max(1, int(self.policy["breaker_max_share"] * max(1, len(self.accounts)))))
        for meter in wanted_cut:
            if self.breaker_tripped or self._halt.is_set():
                return
            doc = self.store.get(meter)           # as it is now, not as it was a cut ago
            if doc is None or doc["state"] != "exhausted" or doc.get("cut_by_costcontrol"):
                continue
            if not notice_given(doc, now, self.policy["notice_s"]):
                continue                       # warnings first, with time to pay
            if self.store.guarantee_on(meter):
                continue
            if self._recent_cutoffs(now - window) >= limit:
                self._trip_breaker(len(wanted_cut), limit)
                return
            if self._cutoff_times is None:      # no ledger to count from (bare tests)
                self._cutoffs.append(self.clock())
            self.request_relay(meter, "cut_off", "balance exhausted", tick=self.tick)

    def _recent_cutoffs(self, since):
        since = max(since, self.store.flags().get("released_at") or 0)
        if self._cutoff_times is not None:
            return len(self._cutoff_times(since))
        self._cutoffs = [t for t in self._cutoffs if t >= since]
        return len(self._cutoffs)

    def _trip_breaker(self, wanted, limit):
        def trip(flags):
            flags["breaker_tripped"] = True
            flags["tripped_at"] = self.clock()
        self.store.update_flags(trip)
        log.error("mass cut-off breaker tripped: %d accounts due, limit %d per %d s; "
                  "holding all automatic cut-offs until the head-end confirms", wanted,
                  limit, self.policy["breaker_window_s"])
        self.events("costcontrol.breaker_tripped", due=wanted, limit=limit,
                    window_s=self.policy["breaker_window_s"])

    def release_breaker(self):
        # the count starts again from the release (the ledger still holds the cut-offs)
        self.store.update_flags(lambda flags: flags.update(breaker_tripped=False,
                                                           released_at=self.clock()))
        self._cutoffs = []
        self.events("costcontrol.breaker_released")

    def set_weather_hold(self, on):
        self.store.update_flags(lambda flags: flags.update(weather_hold=bool(on)))
        self.events("costcontrol.weather_hold", on=bool(on))


# ---------------------------------------------------------------- billing cycles

BILL_ROWS = 20000            # energy rows per billing cycle (one state write each)
_FAR = 10 ** 30              # beyond any balance in micro-yuan (an int: no float)


_time_then_seq = operator.itemgetter(2, 1)
_item_seq = operator.itemgetter(1)
_item_ts = operator.itemgetter(2)
_event_tag = operator.itemgetter(0)


def _same_state(doc, acc):
    """(low, high): while low < balance <= high, state_of gives the document's state (an
    empty range if it does not give it now, so the next reading moves it). state_of only
    compares the balance with -overdraft-1, 0, alarm2 and alarm1: between two neighbouring
    thresholds it cannot change."""
    bal = doc["balance_uy"]
    if state_of(bal, acc) != doc["state"]:
        return (bal, bal - 1)
    points = (-yuan_to_micro(acc["overdraft_limit"]) - 1, 0,
              yuan_to_micro(acc["alarm2"]), yuan_to_micro(acc["alarm1"]))
    low = max([p for p in points if p < bal], default=-_FAR)
    high = min([p for p in points if p >= bal], default=_FAR)
    return (low, high)


def _stated(doc, n, st, window):
    """An account document after its statement of day n."""
    doc["stated_day"] = n
    doc["stated_closing_uy"] = st["closing_uy"]
    doc["stated_debt_uy"] = st["debt_uy"]
    doc.get("days", {}).pop(day_iso(n), None)
    doc["history"] = (doc.get("history", []) + [[day_iso(n), st["charges_uy"],
                                                 st["online"]]])[-window:]


def notice_given(doc, now, notice_s):
    """Whether the first warning that led here is at least notice_s old."""
    warned = doc.get("warned", {})
    first = min([v for k, v in warned.items() if k in ("alarm2", "zero", "exhausted")]
                or [now])
    return now - first >= notice_s


def protected_reason(now, pol, weather_hold):
    """Why no automatic cut-off may happen at local time `now`, or None."""
    if weather_hold:
        return "extreme-weather hold set by the head-end"
    if pol.get("protected_weekends") and now.weekday() >= 5:
        return "weekend"
    if now.date() in pol.get("holiday_dates", set()):
        return "public holiday"
    minute = now.hour * 60 + now.minute
    for start, end in pol.get("protected_ranges", []):
        inside = start <= minute < end if start <= end else (minute >= start or minute < end)
        if inside:
            return "protected hours"
    return None


def json_text(value):
    import json
    try:
        return json.dumps(value, ensure_ascii=True)[:40]
    except (TypeError, ValueError):
        return "?"
