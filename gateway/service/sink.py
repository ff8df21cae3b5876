"""Readings and events into the journal, through a bounded queue in memory when the disk
fails."""

import collections
import logging
import threading
import time

from gateway import logs
from gateway.store.journal import JournalError

log = logging.getLogger("gateway")
event_log = logging.getLogger("gateway.events")

# how loud each published event is in the service's log (others: INFO; audit entries:
# DEBUG, since the command lines say the same)
EVENT_LEVELS = {"meter.offline": logging.WARNING, "relay.opened": logging.WARNING,
                "relay.closed": logging.WARNING, "balance.zero": logging.WARNING,
                "balance.exhausted": logging.WARNING, "freeze.missing": logging.WARNING,
                "meter.clock_drift": logging.WARNING, "meter.relay_changed": logging.WARNING,
                "journal.replaced": logging.ERROR,
                "costcontrol.breaker_tripped": logging.ERROR, "audit": logging.DEBUG}


def log_event(event_type, fields):
    """One line for a published event, with its journald fields."""
    level = EVENT_LEVELS.get(event_type, logging.INFO)
    if not event_log.isEnabledFor(level):
        return
    if event_type == "audit":
        entry = fields.get("entry") or {}
        text = "audit %s #%s" % (entry.get("kind"), entry.get("n", ""))
        command = entry.get("id")
        meter = None
    else:
        text = " ".join("%s=%s" % (k, v) for k, v in fields.items() if k != "meter")
        command = fields.get("command")
        meter = fields.get("meter")
    event_log.log(level, "%s%s%s", event_type, " meter=%s" % meter if meter else "",
                  " " + text if text else "",
                  extra=logs.fields(event=event_type, meter=meter, command=command))


class ReadingSink:
    """Readings and events into the journal. If the journal cannot take them (a failing
    disk), they wait in a bounded queue in memory and are retried; what overflows the queue
    is counted, and a health event says so once the disk is back."""

    def __init__(self, journal, on_appended=lambda: None, max_pending=100000):
        self.journal = journal
        self.on_appended = on_appended
        self._lock = threading.Lock()
        self._pending = collections.deque()
        self._pending_events = collections.deque(maxlen=10000)
        self.max_pending = max_pending
        self.lost = 0
        self.lost_events = 0
        self.last_error = None
        self.latest = None            # (meter, quantity) -> value, kept only for a live view
        self.recent = collections.deque(maxlen=50)  # recent events, one line each

    def readings(self, readings):
        if self.latest is not None:
            for r in readings:
                self.latest[(r.meter, r.quantity)] = r.value
        with self._lock:
            self._pending.extend(readings)
            while len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.lost += 1
            self._flush()

    def event(self, event_type, **fields):
        log_event(event_type, fields)
        if event_type != "audit":
            self.recent.append("%s %s %s" % (time.strftime("%H:%M:%S"), event_type, " ".join(
                "%s=%s" % kv for kv in fields.items())))
        with self._lock:
            if len(self._pending_events) == self._pending_events.maxlen:
                self.lost_events += 1      # the oldest waiting event falls out: counted
            self._pending_events.append((event_type, int(time.time() * 1000), fields))
            self._flush()

    def flush(self):
        with self._lock:
            self._flush()

    def _flush(self):
        try:
            while self._pending_events:
                event_type, ts, fields = self._pending_events[0]
                self.journal.append_event(event_type, ts=ts, **fields)
                self._pending_events.popleft()
            stored = 0
            if self._pending:
                batch = list(self._pending)
                self.journal.append_readings(batch)
                self._pending.clear()
                stored = len(batch)
            if self.last_error:
                log.warning("journal writable again: %d readings kept in memory were stored"
                            "%s", stored, ", %d lost" % self.lost if self.lost else "",
                            extra=logs.fields(event="gateway.storage_recovered"))
                self.last_error = None
                self.journal.append_event("gateway.storage_recovered", lost=self.lost,
                                          lost_events=self.lost_events)
            self.on_appended()
        except JournalError as exc:
            if str(exc) != self.last_error:
                log.error("%s; keeping readings in memory (%d) and retrying", exc,
                          len(self._pending))
            self.last_error = str(exc)

    @property
    def pending(self):
        return len(self._pending) + len(self._pending_events)
