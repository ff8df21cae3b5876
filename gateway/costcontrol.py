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
import threading
import time
from decimal import Decimal, InvalidOperation

from gateway import tariff as T
from gateway.billing import ENERGY_TOTAL, TARIFF_QUANTITIES, Billing  # noqa: F401

log = logging.getLogger(__name__)

CONSUMER = "billing"
STATES = ("normal", "alarm1", "alarm2", "zero", "exhausted")
EVENT_OF_STATE = {"alarm1": ("balance.low", {"level": 1}), "alarm2": ("balance.low",
                                                                      {"level": 2}),
                  "zero": ("balance.zero", {}), "exhausted": ("balance.exhausted", {}),
                  "normal": ("balance.normal", {})}

ACCOUNT_DEFAULTS = {"mode": "local", "alarm1": "20.00", "alarm2": "10.00",
                    "overdraft_limit": "0.00", "restore_threshold": "0.00", "max_kw": "60",
                    "guarantee": False}
POLICY_DEFAULTS = {"notice_s": 86400, "protected_hours": ["18:00-08:00"],
                   "protected_weekends": True, "holidays": [], "breaker_max_count": 10,
                   "breaker_max_share": 0.2, "breaker_window_s": 3600,
                   "check_interval_s": 30}


# ---------------------------------------------------------------- configuration

def _money(chk, where, value):
    if not isinstance(value, str):
        chk.bad(where, "must be a decimal string such as \"10.00\" (money is never a float)")
        return None
    try:
        d = Decimal(value)
    except InvalidOperation:
        chk.bad(where, "is not a decimal number: %r" % value)
        return None
    if not d.is_finite() or d != d.quantize(Decimal("0.01")):
        chk.bad(where, "yuan with at most 2 decimals, not %r" % value)
        return None
    return d


def validate_config(cfg, chk):
    """Tariffs, accounts and [cost_control] of the configuration file."""
    tariffs = {}
    raw = cfg.get("tariffs") or {}
    if not isinstance(raw, dict):
        chk.bad("tariffs", "must be tables [tariffs.NAME]")
        raw = {}
    for name, doc in raw.items():
        if not isinstance(doc, dict):
            chk.bad("tariffs.%s" % name, "must be a table")
            continue
        try:
            tariffs[name] = T.from_config(name, doc)
        except T.TariffError as exc:
            chk.bad("tariffs.%s.%s" % (name, exc.key), exc.message)
    meters = {m.id: m for m in cfg.meters}
    accounts = []
    seen = set()
    raw_acc = cfg.get("accounts") or []
    if not isinstance(raw_acc, list):
        chk.bad("accounts", "must be a list of tables ([[accounts]])")
        raw_acc = []
    known = {"meter", "mode", "tariff", "opening_balance"} | set(ACCOUNT_DEFAULTS)
    for i, a in enumerate(raw_acc):
        where = "accounts[%d]" % i
        if not isinstance(a, dict):
            chk.bad(where, "must be a table")
            continue
        for k in a:
            if k not in known:
                chk.bad("%s.%s" % (where, k), "unknown key")
        acc = dict(ACCOUNT_DEFAULTS)
        acc.update(a)
        if acc.get("meter") not in meters:
            chk.bad(where + ".meter", "no meter %r" % (acc.get("meter"),))
        elif acc["meter"] in seen:
            chk.bad(where + ".meter", "a second account for meter %s" % acc["meter"])
        seen.add(acc.get("meter"))
        if acc.get("mode") not in ("local", "remote"):
            chk.bad(where + ".mode", "local or remote, not %r" % (acc.get("mode"),))
        if acc.get("tariff") not in tariffs:
            chk.bad(where + ".tariff", "no tariff %r (tariffs: %s)" % (
                acc.get("tariff"), ", ".join(sorted(tariffs)) or "none"))
        for key in ("opening_balance", "alarm1", "alarm2", "overdraft_limit",
                    "restore_threshold"):
            if key == "opening_balance" and key not in acc:
                chk.bad(where + "." + key, "is required")
                continue
            acc[key] = _money(chk, "%s.%s" % (where, key), acc[key])
        try:
            acc["max_kw"] = Decimal(str(acc["max_kw"]))
        except InvalidOperation:
            chk.bad(where + ".max_kw", "a number of kW")
        if not isinstance(acc.get("guarantee"), bool):
            chk.bad(where + ".guarantee", "true or false")
        if None not in (acc.get("alarm1"), acc.get("alarm2")) and acc["alarm2"] > acc["alarm1"]:
            chk.bad(where + ".alarm2", "must not be above alarm1")
        accounts.append(acc)
    pol = dict(POLICY_DEFAULTS)
    raw_pol = cfg.get("cost_control") or {}
    if not isinstance(raw_pol, dict):
        chk.bad("cost_control", "must be a table")
        raw_pol = {}
    for k, v in raw_pol.items():
        if k not in POLICY_DEFAULTS:
            chk.bad("cost_control.%s" % k, "unknown key")
            continue
        default = POLICY_DEFAULTS[k]
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        else:
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        if not ok:
            chk.bad("cost_control.%s" % k, "must be %s, not %r" % (
                "true or false" if isinstance(default, bool) else
                "a number >= 0" if isinstance(default, (int, float)) else
                "a list of strings", v))
            continue
        pol[k] = v
    try:
        pol["protected_ranges"] = [tuple(T.parse_hhmm(x) for x in r.split("-"))
                                   for r in pol["protected_hours"]]
    except (ValueError, AttributeError):
        chk.bad("cost_control.protected_hours", "a list of \"HH:MM-HH:MM\"")
        pol["protected_ranges"] = []
    try:
        pol["holiday_dates"] = {_dt.date.fromisoformat(d) for d in pol["holidays"]}
    except (ValueError, TypeError):
        chk.bad("cost_control.holidays", "a list of \"YYYY-MM-DD\"")
        pol["holiday_dates"] = set()
    cfg["tariff_objects"] = tariffs
    cfg["account_list"] = accounts
    cfg["cost_policy"] = pol


# ---------------------------------------------------------------- the engine

def state_of(balance_uy, acc):
    """The account state for a balance (micro-yuan)."""
    if balance_uy < -T.yuan_to_micro(acc["overdraft_limit"]) or \
            (balance_uy <= 0 and acc["overdraft_limit"] == 0):
        return "exhausted"
    if balance_uy <= 0:
        return "zero"
    if balance_uy <= T.yuan_to_micro(acc["alarm2"]):
        return "alarm2"
    if balance_uy <= T.yuan_to_micro(acc["alarm1"]):
        return "alarm1"
    return "normal"


def new_account_doc(acc):
    opening = T.yuan_to_micro(acc["opening_balance"])
    return {"balance_uy": opening, "opening_uy": opening, "topups_uy": 0, "charges_uy": 0,
            "charged_to_seq": 0, "registers": {}, "register_ts": None, "tier_centi": 0,
            "tier_period": None, "state": state_of(opening, acc), "state_since": time.time(),
            "warned": {}, "cut_by_costcontrol": False, "txns": []}


class CostControl(threading.Thread):
    def __init__(self, gateway):
        super().__init__(name="costcontrol", daemon=True)
        self.gw = gateway
        cfg = gateway.cfg
        self.accounts = {a["meter"]: a for a in cfg.get("account_list", [])}
        self.tariffs = cfg.get("tariff_objects", {})
        self.policy = cfg.get("cost_policy") or dict(POLICY_DEFAULTS, protected_ranges=[],
                                                     holiday_dates=set())
        self.billing = {m: Billing(a, self.tariffs[a["tariff"]])
                        for m, a in self.accounts.items()}
        self._lock = threading.RLock()
        self._act_lock = threading.Lock()
        self._halt = threading.Event()
        self._cutoffs = []                      # times of automatic cut-offs (breaker)
        self.breaker_tripped = False
        self.journal = gateway.journal
        if self.accounts:
            self.journal.register(CONSUMER, "readings")
        else:
            # nothing to bill: read nothing, and hold no readings back for billing
            self.journal.unregister(CONSUMER, "readings")
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
                    d = Decimal(value) if isinstance(value, str) else None
                except InvalidOperation:
                    d = None
                if d is None or not d.is_finite() or d < 0 or \
                        d != d.quantize(Decimal("0.01")):
                    return "%s must be yuan as a decimal string, such as \"10.00\"" % key
            elif key == "mode":
                if value not in ("local", "remote"):
                    return "mode is local or remote"
            elif key == "tariff":
                if value not in self.tariffs:
                    return "no tariff %r on this gateway" % (value,)
            else:
                return "%s cannot be updated (mode, tariff, %s)" % (
                    key, ", ".join(self.UPDATABLE_MONEY))
        return None

    def update_account(self, meter, params):
        """Apply and keep (state file) a head-end update of an account's settings."""
        with self._lock:
            acc = self.accounts[meter]
            for key, value in params.items():
                acc[key] = Decimal(value) if key in self.UPDATABLE_MONEY else value
            if "tariff" in params:
                self.billing[meter] = Billing(acc, self.tariffs[acc["tariff"]])
            overrides = self.gw.state.get("account_overrides", meter) or {}
            overrides.update(params)
            self.gw.state.put("account_overrides", meter, overrides)
            doc = self.gw.state.get("accounts", meter)
            events = []
            self._transition(meter, doc, events)        # thresholds may move the state
            self.gw.state.put("accounts", meter, doc)
        for etype, fields in events:
            self.gw.sink.event(etype, **fields)
        self.gw.sink.event("account.updated", meter=meter, **params)
        return {k: str(v) if isinstance(v, Decimal) else v for k, v in acc.items()
                if k in ("mode", "tariff") + self.UPDATABLE_MONEY}

    def _init_accounts(self):
        for meter, overrides in self.gw.state.all("account_overrides").items():
            if meter in self.accounts and not self.check_update(overrides):
                acc = self.accounts[meter]
                for key, value in overrides.items():
                    acc[key] = Decimal(value) if key in self.UPDATABLE_MONEY else value
                self.billing[meter] = Billing(acc, self.tariffs[acc["tariff"]])
        events = []
        with self.gw.state.batch():
            for mid, acc in self.accounts.items():
                if self.gw.state.get("accounts", mid) is None:
                    doc = new_account_doc(acc)
                    if doc["state"] != "normal":
                        # an account that opens low is warned like one that runs low
                        doc["warned"][doc["state"]] = time.time()
                        etype, fields = EVENT_OF_STATE[doc["state"]]
                        events.append((etype, dict(fields, meter=mid, previous=None,
                                                   balance=str(acc["opening_balance"]))))
                    self.gw.state.put("accounts", mid, doc)
                if acc.get("guarantee") and not (self.gw.state.get("guarantee", mid) or {}
                                                 ).get("on"):
                    self.gw.state.put("guarantee", mid, {"on": True, "since": time.time(),
                                                         "source": "config"})
            flags = self.gw.state.get("flags", "costcontrol") or {}
            self.breaker_tripped = bool(flags.get("breaker_tripped"))
        for etype, fields in events:
            self.gw.sink.event(etype, **fields)

    def restart(self):
        new = CostControl(self.gw)
        self.gw.costcontrol = new
        new.start()

    def stop(self):
        self._halt.set()
        if self.is_alive():
            self.join(5)

    # ---------------------------------------------------------------- queries

    def has_account(self, meter_id):
        return meter_id in self.accounts

    def doc(self, meter_id):
        return self.gw.state.get("accounts", meter_id)

    def balances(self):
        return {m: str(T.micro_to_yuan(d["balance_uy"]))
                for m, d in self.gw.state.all("accounts").items() if m in self.accounts}

    def relay_states(self):
        out = {}
        for p in self.gw.pollers.values():
            for mid, h in p.health.items():
                if getattr(h, "relay", None):
                    out[mid] = h.relay
        return out

    def accounts_status(self):
        out = {}
        for m, d in self.gw.state.all("accounts").items():
            if m not in self.accounts:
                continue
            out[m] = {"balance": str(T.micro_to_yuan(d["balance_uy"])), "state": d["state"],
                      "mode": self.accounts[m]["mode"], "tariff": self.accounts[m]["tariff"],
                      "cut_by_costcontrol": d.get("cut_by_costcontrol", False)}
        out["_breaker_tripped"] = self.breaker_tripped
        return out

    # ---------------------------------------------------------------- the thread

    def run(self):
        next_check = 0.0
        while not self._halt.is_set():
            try:
                n = self.bill_once()
                if time.time() >= next_check:
                    next_check = time.time() + self.policy["check_interval_s"]
                    self.act()
                if not n:
                    self._halt.wait(0.5)
            except Exception:
                log.exception("cost control")
                self._halt.wait(2)

    def bill_once(self, limit=10000):
        """Charge the readings after the billing cursor; one state write for the batch."""
        if not self.accounts:
            return 0
        with self._lock:
            rows = self.journal.read(CONSUMER, "readings", limit=limit)
            if not rows:
                return 0
            groups = {}
            last_seq = {}                  # the highest seq of each group, in one pass
            for r in rows:
                if r.meter in self.accounts and r.quantity.startswith("energy.import."):
                    groups.setdefault((r.meter, r.ts), {})[r.quantity] = (r.value_json, r.ts)
                    last_seq[(r.meter, r.ts)] = r.seq
            last = rows[-1].seq
            events = []
            changed = {}
            for (meter, ts), group in sorted(groups.items(), key=lambda kv: kv[0][1]):
                doc = changed.get(meter) or self.gw.state.get("accounts", meter)
                seq = last_seq[(meter, ts)]
                if seq <= doc.get("charged_to_seq", 0):
                    continue                  # charged before a restart: never twice
                evs = []
                self.billing[meter].apply(doc, group, evs, seq=seq)   # holds, never raises
                doc["charged_to_seq"] = seq
                events += [(t, dict(f, meter=meter)) for t, f in evs]
                self._transition(meter, doc, events)
                changed[meter] = doc
            if changed:
                with self.gw.state.batch():
                    for meter, doc in changed.items():
                        self.gw.state.put("accounts", meter, doc)
            for etype, fields in events:
                self.gw.sink.event(etype, **fields)
            self.journal.ack(CONSUMER, "readings", last)
            return len(rows)

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
                                           balance=str(T.micro_to_yuan(doc["balance_uy"])))))

    # ---------------------------------------------------------------- top-ups

    def apply_topup(self, meter_id, amount, txn, command_id=None):
        """(new balance in yuan, applied?) -- a txn is applied once, whatever carries it."""
        with self._lock:
            done = self.gw.state.get("txns", txn)
            doc = self.gw.state.get("accounts", meter_id)
            if done is not None:
                return T.micro_to_yuan(doc["balance_uy"]), False
            uy = T.yuan_to_micro(amount)
            doc["balance_uy"] += uy
            doc["topups_uy"] += uy
            events = []
            self._transition(meter_id, doc, events)
            with self.gw.state.batch():       # the balance and the txn record: one write
                self.gw.state.put("accounts", meter_id, doc)
                self.gw.state.put("txns", txn, {"meter": meter_id, "amount_uy": uy,
                                                "command": command_id, "at": time.time()})
            for etype, fields in events:
                self.gw.sink.event(etype, **fields)
            self.gw.sink.event("balance.topup", meter=meter_id, amount=str(amount), txn=txn,
                               balance=str(T.micro_to_yuan(doc["balance_uy"])))
        self.gw.executor.submit_local(lambda: self.act(only=meter_id))
        return T.micro_to_yuan(doc["balance_uy"]), True

    # ---------------------------------------------------------------- actions

    def protected_now(self, now=None):
        """Inside a friendly-credit / protected window: no automatic cut-off."""
        now = now or _dt.datetime.now()
        pol = self.policy
        flags = self.gw.state.get("flags", "costcontrol") or {}
        if flags.get("weather_hold"):
            return "extreme-weather hold set by the head-end"
        if pol.get("protected_weekends") and now.weekday() >= 5:
            return "weekend"
        if now.date() in pol.get("holiday_dates", set()):
            return "public holiday"
        minute = now.hour * 60 + now.minute
        for start, end in pol.get("protected_ranges", []):
            inside = start <= minute < end if start <= end else (minute >= start or
                                                                minute < end)
            if inside:
                return "protected hours"
        return None

    def act(self, only=None):
        """Automatic cut-offs (local mode, every condition) and restores after top-ups.
        One at a time: the periodic check and a top-up's prompt restore never race."""
        with self._act_lock:
            self._act(only)

    def _act(self, only):
        wanted_cut = []
        for meter, acc in self.accounts.items():
            if only and meter != only:
                continue
            doc = self.gw.state.get("accounts", meter)
            if acc["mode"] != "local" or doc is None:
                continue
            restore_at = T.yuan_to_micro(acc["restore_threshold"])
            if doc.get("cut_by_costcontrol") and doc["balance_uy"] > restore_at:
                self._restore(meter, doc)
            elif doc["state"] == "exhausted" and not doc.get("cut_by_costcontrol"):
                wanted_cut.append((meter, doc))
        if not wanted_cut:
            return
        reason = self.protected_now()
        if reason:
            return
        now = time.time()
        window = self.policy["breaker_window_s"]
        self._cutoffs = [t for t in self._cutoffs if now - t < window]
        limit = min(self.policy["breaker_max_count"],
                    max(1, int(self.policy["breaker_max_share"] * max(1, len(self.accounts)))))
        for meter, doc in wanted_cut:
            if self.breaker_tripped:
                return
            notice = self.policy["notice_s"]
            warned = doc.get("warned", {})
            first_warning = min([v for k, v in warned.items() if k in ("alarm2", "zero",
                                                                       "exhausted")] or [now])
            if now - first_warning < notice:
                continue                       # warnings first, with time to pay
            guarantee = (self.gw.state.get("guarantee", meter) or {}).get("on")
            if guarantee:
                continue
            if len(self._cutoffs) >= limit:
                self._trip_breaker(len(wanted_cut), limit)
                return
            self._cutoffs.append(now)
            self._cut(meter, doc)

    def _trip_breaker(self, wanted, limit):
        self.breaker_tripped = True
        flags = self.gw.state.get("flags", "costcontrol") or {}
        flags["breaker_tripped"] = True
        flags["tripped_at"] = time.time()
        self.gw.state.put("flags", "costcontrol", flags)
        log.error("mass cut-off breaker tripped: %d accounts due, limit %d per %d s; "
                  "holding all automatic cut-offs until the head-end confirms", wanted,
                  limit, self.policy["breaker_window_s"])
        self.gw.sink.event("costcontrol.breaker_tripped", due=wanted, limit=limit,
                           window_s=self.policy["breaker_window_s"])

    def release_breaker(self):
        self.breaker_tripped = False
        flags = self.gw.state.get("flags", "costcontrol") or {}
        flags["breaker_tripped"] = False
        self.gw.state.put("flags", "costcontrol", flags)
        self._cutoffs = []
        self.gw.sink.event("costcontrol.breaker_released")

    def _cut(self, meter, doc):
        self._operate(meter, "cut_off", "balance exhausted", cut=True)

    def _restore(self, meter, doc):
        self._operate(meter, "restore", "balance above the restore threshold", cut=False)

    def _operate(self, meter, action, reason, cut):
        """Through the command path (ledger, read-back, audit, result); the account
        remembers that cost control cut it, so only those are restored automatically."""
        result = self.gw.executor.local(meter, action, source="costcontrol", reason=reason)
        if result and result.get("status") == "done":
            doc = self.gw.state.get("accounts", meter)
            doc["cut_by_costcontrol"] = cut
            self.gw.state.put("accounts", meter, doc)
