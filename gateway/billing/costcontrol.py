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
"""

import datetime as _dt
import logging
import operator
import queue
import threading
import time
from decimal import Decimal

from gateway.billing import settings
from gateway.billing.tariff import micro_to_yuan, yuan_to_micro
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
POLICY_DEFAULTS = {f.name: f.default for f in settings.COST_CONTROL.fields}


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


def new_account_doc(acc):
    opening = yuan_to_micro(acc["opening_balance"])
    return {"balance_uy": opening, "opening_uy": opening, "topups_uy": 0, "charges_uy": 0,
            "charged_to_seq": 0, "registers": {}, "register_ts": None, "tier_centi": 0,
            "tier_period": None, "state": state_of(opening, acc), "state_since": time.time(),
            "warned": {}, "cut_by_costcontrol": False, "txns": []}


class CostControl(threading.Thread):
    """The cost-control thread: bills the journal's readings into the account store, warns,
    and asks for cut-offs and restores through `request_relay(meter, action, reason)`
    (the command executor's local path). It owns no stored record itself: every account
    change goes through the account store."""

    def __init__(self, *, accounts, tariffs, policy, store, journal, events, request_relay,
                 relay_states=lambda: {}, cutoff_times=None):
        super().__init__(name="costcontrol", daemon=True)
        # accounts: AccountConfig records (or dicts); copied, as head-end updates change them
        self.accounts = {a["meter"]: dict(a) for a in accounts}
        self.tariffs = tariffs
        self.policy = dict(policy if policy is not None else
                           settings.COST_CONTROL.default())
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

    UPDATABLE_MONEY = ("alarm1", "alarm2", "overdraft_limit", "restore_threshold")

    def check_update(self, params):
        """Why an account_update's params are not acceptable, or None."""
        if not params:
            return "account_update needs params (mode, tariff, alarm1, alarm2, " \
                   "overdraft_limit, restore_threshold)"
        for key, value in params.items():
            if key in self.UPDATABLE_MONEY:
                try:
                    parse_yuan(value)
                except ValueError:
                    return "%s must be yuan as a decimal string, such as \"10.00\"" % key
            elif key == "mode":
                if value not in ("local", "remote"):
                    return "mode is local or remote"
            elif key == "tariff":
                if not isinstance(value, str) or value not in self.tariffs:
                    return "no tariff %s on this gateway" % json_text(value)
            else:
                return "%s cannot be updated (mode, tariff, %s)" % (
                    str(key)[:32], ", ".join(self.UPDATABLE_MONEY))
        return None

    def _apply_settings(self, meter, params):
        acc = self.accounts[meter]
        for key, value in params.items():
            acc[key] = Decimal(value) if key in self.UPDATABLE_MONEY else value
        if "tariff" in params:
            self.billing[meter] = Billing(acc, self.tariffs[acc["tariff"]])

    def update_account(self, meter, params):
        """Apply and keep (state file) a head-end update of an account's settings."""
        events = []
        with self._lock:
            self._apply_settings(meter, params)
            self.store.update_settings(meter, params,
                                       lambda doc: self._transition(meter, doc, events))
        for etype, fields in events:
            self.events(etype, **fields)
        self.events("account.updated", meter=meter, **params)
        self._due.put(meter)                    # a lower threshold may allow a restore
        acc = self.accounts[meter]
        return {k: str(v) if isinstance(v, Decimal) else v for k, v in acc.items()
                if k in ("mode", "tariff") + self.UPDATABLE_MONEY}

    def _init_accounts(self):
        for meter, overrides in self.store.overrides().items():
            if meter in self.accounts and not self.check_update(overrides):
                self._apply_settings(meter, overrides)
        events = []
        for mid, acc in self.accounts.items():
            doc = new_account_doc(acc)
            if doc["state"] != "normal":
                # an account that opens low is warned like one that runs low
                doc["warned"][doc["state"]] = time.time()
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
            out[m] = {"balance": str(micro_to_yuan(d["balance_uy"])), "state": d["state"],
                      "mode": self.accounts[m]["mode"], "tariff": self.accounts[m]["tariff"],
                      "cut_by_costcontrol": d.get("cut_by_costcontrol", False),
                      "billing_hold": d.get("billing_hold")}
        out["_breaker_tripped"] = self.breaker_tripped
        return out

    # ---------------------------------------------------------------- the thread

    def run(self):
        next_check = 0.0
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
                    self.billing[meter].apply_batch(doc, todo, evs,
                                                    self._watch(meter, doc, evs),
                                                    columns=columns)
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

    def _watch(self, meter, doc, events):
        """apply_batch's watch: the balances (low, high] over which the account's state
        stays what it is, and the function that moves the state when a reading leaves them
        (its events tagged with the reading's tag)."""
        acc = self.accounts[meter]

        def moved(doc, tag):
            evs = []
            self._transition(meter, doc, evs)
            events.extend((tag, etype, fields) for etype, fields in evs)
            return _same_state(doc, acc)
        return list(_same_state(doc, acc)) + [moved]

    def _transition(self, meter, doc, events):
        acc = self.accounts[meter]
        new = state_of(doc["balance_uy"], acc)
        if new != doc["state"]:
            old = doc["state"]
            doc["state"] = new
            doc["state_since"] = time.time()
            etype, fields = EVENT_OF_STATE[new]
            if STATES.index(new) > STATES.index(old) or new == "normal":
                doc.setdefault("warned", {})[new] = time.time()
                events.append((etype, dict(fields, meter=meter, previous=old,
                                           balance=str(micro_to_yuan(doc["balance_uy"])))))

    # ---------------------------------------------------------------- top-ups

    def apply_topup(self, meter_id, amount, txn, command_id=None):
        """(new balance in yuan, applied?) -- a txn is applied once, whatever carries it."""
        events = []
        with self._lock:
            doc, applied = self.store.topup(
                meter_id, txn, yuan_to_micro(amount), command=command_id,
                on_change=lambda d: self._transition(meter_id, d, events))
        balance = micro_to_yuan(doc["balance_uy"])
        if not applied:
            return balance, False
        for etype, fields in events:
            self.events(etype, **fields)
        self.events("balance.topup", meter=meter_id, amount=str(amount), txn=txn,
                    balance=str(balance))
        self._due.put(meter_id)                 # restore now, at any hour
        return balance, True

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
        now = time.time()
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
                self._cutoffs.append(time.time())
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
            flags["tripped_at"] = time.time()
        self.store.update_flags(trip)
        log.error("mass cut-off breaker tripped: %d accounts due, limit %d per %d s; "
                  "holding all automatic cut-offs until the head-end confirms", wanted,
                  limit, self.policy["breaker_window_s"])
        self.events("costcontrol.breaker_tripped", due=wanted, limit=limit,
                    window_s=self.policy["breaker_window_s"])

    def release_breaker(self):
        # the count starts again from the release (the ledger still holds the cut-offs)
        self.store.update_flags(lambda flags: flags.update(breaker_tripped=False,
                                                           released_at=time.time()))
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
