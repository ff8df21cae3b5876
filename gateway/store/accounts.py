"""The account store: the one writer of prepaid accounts and everything that moves them.

It owns these tables of the state file: `accounts` (balance, charged-to position, account
state, "cut by cost control", debt, the day's movements for the statements), `txns` (the
ledger: payments applied, by transaction id, with their channel and the share that went to
the debt; and each daily debt recovery, by `recovery:METER:DAY`),
`account_overrides` (head-end changes to an account's settings), `flags` (cost control's
breaker and weather hold) and `guarantee` (保电, per meter). Every change is a function
applied to the current document under the state file's lock and written in the same atomic
write: no thread reads here and writes there, so no change is lost or resurrected by an
older copy written back (billing, cost control and the executor all run in their own
threads).
"""

import contextlib
import copy
import time

FLAGS_KEY = "costcontrol"


class AccountStore:
    def __init__(self, state):
        self.state = state

    # ---------------------------------------------------------------- accounts

    def get(self, meter):
        return self.state.get("accounts", meter)

    def all(self):
        return self.state.all("accounts")

    def field(self, name):
        """{meter: the account document's `name`}, as written."""
        field = getattr(self.state, "field", None)
        if field is not None:
            return field("accounts", name)
        return {m: d.get(name) for m, d in self.all().items()}

    def update(self, meter, fn):
        """fn(doc) changes the account's document in place (and may return a value, which
        update returns); the change is written atomically. None if there is no account."""
        with self.state.batch():
            doc = self.state.get("accounts", meter)
            if doc is None:
                return None
            out = fn(doc)
            self.state.put("accounts", meter, doc)
            return out

    def create(self, meter, doc):
        """A new account (kept if one exists); True if created."""
        with self.state.batch():
            if self.state.get("accounts", meter) is not None:
                return False
            self.state.put("accounts", meter, doc)
            return True

    @contextlib.contextmanager
    def transaction(self):
        """Several accounts read and changed under one lock, written in one atomic write
        (a billing cycle). Yields a view with get(meter) and put(meter, doc)."""
        with self.state.batch():
            yield _Tx(self.state)

    def set_cut(self, meter, cut, command=None):
        """Whether cost control is why the meter's relay is open (restored after payment)."""
        def change(doc):
            doc["cut_by_costcontrol"] = bool(cut)
            if command is not None:
                doc["cut_command"] = command
        return self.update(meter, change)

    # ---------------------------------------------------------------- payments

    def topup(self, meter, txn, amount_uy, command=None, on_change=None, channel=None,
              split=None, at=None):
        """Apply a payment once, whatever carries it: (account doc, applied?). The balance
        and the txn record are one write. `split(doc)` says how much of the amount goes to
        the account's debt (0 without); `on_change(doc, share)` runs inside the write
        (state moves, the day's movements). The txn record keeps the channel and the split."""
        with self.state.batch():
            doc = self.state.get("accounts", meter)
            if doc is None:
                return None, False
            if self.state.get("txns", txn) is not None:
                return doc, False
            share = split(doc) if split else 0
            doc["balance_uy"] += amount_uy - share
            doc["topups_uy"] += amount_uy
            if share:
                doc["debt_uy"] -= share
                doc["recovered_uy"] = doc.get("recovered_uy", 0) + share
            if on_change:
                on_change(doc, share)
            self.state.put("accounts", meter, doc)
            self.state.put("txns", txn, {"meter": meter, "amount_uy": amount_uy,
                                         "credit_uy": amount_uy - share,
                                         "recovered_uy": share, "channel": channel,
                                         "command": command,
                                         "at": time.time() if at is None else at})
            return doc, True

    def txn(self, txn):
        return self.state.get("txns", txn)

    def forget_txns(self, before):
        """Forget ledger entries recorded before `before` (seconds): a txn that old can no
        longer come back inside a valid command. The count."""
        prune = getattr(self.state, "prune", None)
        if prune is not None:
            return prune("txns", "at", before)
        old = [k for k, d in self.state.all("txns").items() if (d.get("at") or 0) < before]
        with self.state.batch():
            for k in old:
                self.state.delete("txns", k)
        return len(old)

    # ---------------------------------------------------------------- settings

    def overrides(self):
        return self.state.all("account_overrides")

    def update_settings(self, meter, params, fn=None):
        """Keep a head-end change of an account's settings; fn(doc) re-derives the
        account's state in the same write."""
        with self.state.batch():
            over = self.state.get("account_overrides", meter) or {}
            over.update(params)
            self.state.put("account_overrides", meter, over)
            doc = self.state.get("accounts", meter)
            out = None
            if doc is not None and fn is not None:
                out = fn(doc)
                self.state.put("accounts", meter, doc)
            return out

    # ---------------------------------------------------------------- flags

    def flags(self):
        return self.state.get("flags", FLAGS_KEY) or {}

    def update_flags(self, fn):
        with self.state.batch():
            flags = self.state.get("flags", FLAGS_KEY) or {}
            out = fn(flags)
            self.state.put("flags", FLAGS_KEY, flags)
            return out

    def guarantee_on(self, meter):
        return bool((self.state.get("guarantee", meter) or {}).get("on"))

    def set_guarantee(self, meter, on, source):
        with self.state.batch():
            old = self.state.get("guarantee", meter) or {}
            if bool(old.get("on")) == bool(on) and old.get("source") == source:
                return
            self.state.put("guarantee", meter, {"on": bool(on), "since": time.time(),
                                                "source": source})


class _Tx:
    __slots__ = ("state",)

    def __init__(self, state):
        self.state = state

    def get(self, meter):
        return self.state.get("accounts", meter)

    def put(self, meter, doc):
        self.state.put("accounts", meter, copy.copy(doc))

    def ledger(self, key, entry):
        """A ledger entry (a daily debt recovery) written with the accounts, once: False if
        the key is there already (the recovery was applied before a restart)."""
        if self.state.get("txns", key) is not None:
            return False
        self.state.put("txns", key, entry)
        return True
