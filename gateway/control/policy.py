"""Policy, pure: whether a relay action may go now. Everything it depends on is passed in
(guarantee flag, clock trust, the times of recent cut-offs), so it is tested with numbers.

Restores are never delayed by policy: a customer who paid gets supply back at any hour.
"""

from gateway.control.verify import Rejected, RejectCode

CUTOFF_WINDOW_S = 3600          # the cut-offs-per-hour limit counts this far back


def cut_off_refusal(meter_id, *, guarantee_on, clock_trusted, recent_cutoffs, limit):
    """None if a cut-off of `meter_id` may go now, else a Rejected saying why.
    `recent_cutoffs`: how many cut-offs this gateway admitted in the last hour."""
    if guarantee_on:
        return Rejected(RejectCode.GUARANTEE,
                        "meter %s is under guarantee (保电): no cut-off" % meter_id)
    if not clock_trusted:
        return Rejected(RejectCode.CLOCK_UNTRUSTED,
                        "the gateway clock is not synchronised: no cut-off")
    if recent_cutoffs >= limit:
        return Rejected(RejectCode.RATE_LIMIT,
                        "cut-off limit reached (%d per hour for this gateway)" % limit)
    return None


def recent_cutoffs(ledger_docs, now):
    """Cut-offs admitted (accepted, sent or concluded) in the last hour, from the ledger.
    Counted from admission, not from sending, so two threads cannot both pass the check."""
    since = now - CUTOFF_WINDOW_S
    return sum(1 for d in ledger_docs
               if d.get("action") == "cut_off" and d.get("state") != "rejected"
               and (d.get("received_at") or 0) > since)


class TokenBucket:
    """At most `rate` per `per_s` seconds, bursts up to `rate`; time passed in."""

    __slots__ = ("rate", "per_s", "tokens", "at", "refused")

    def __init__(self, rate, per_s):
        self.rate = float(rate)
        self.per_s = float(per_s)
        self.tokens = float(rate)
        self.at = None
        self.refused = 0

    def take(self, now):
        if self.at is not None:
            self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate / self.per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.refused += 1
        return False
