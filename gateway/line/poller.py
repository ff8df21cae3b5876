"""Schedules: what to read from which meter when, and the meters' health.

One LinePoller per line is the poll source of that line's PortWorker: when nothing more
urgent is queued the worker asks it for the next job. Per meter and data class:

- energy registers every `interval_s`, aligned to the clock (block reads of total + tariffs
  where the meter supports them, single identifiers otherwise; prepaid money with them);
- instantaneous values and the status word (relay, guarantee) every `instant_interval_s`;
- the meter clock every `clock_interval_s`: drift is tracked, small drift corrected by
  broadcast time sync (never near midnight or the hour, never while the gateway clock is
  untrusted), large drift raised as an event;
- the daily freeze after midnight, and a missed day D backfilled from the N-th previous
  daily freeze only after that freeze's own timestamp says D.

A meter that fails `offline_after` transactions in a row is marked offline (event), then
probed with back-off instead of polled, so a dead meter cannot eat the line; it comes back
online by itself (event).
"""

import datetime as _dt
import heapq
import itertools
import logging
import time
from typing import Callable, List

from gateway.clock import near_the_hour
from gateway.line.reads import driver
from gateway.registry import DEFAULT_PROTOCOL
from gateway.store.journal import CLOCK_UNTRUSTED, GOOD, Reading

log = logging.getLogger(__name__)

SYNC_MAX_S = 300.0           # broadcast time sync corrects at most +-5 min (reference 1.7)
OFFLINE_PROBE_S = 60.0       # the first probe of an offline meter; doubles up to max_probe_s


class MeterSpec:
    """What the poller needs to know about a meter (filled from the configuration)."""

    # slots: a concentrator may carry a thousand of these
    __slots__ = ("id", "port", "protocol", "address", "unit", "profile", "interval_s",
                 "instant_interval_s", "clock_interval_s", "version", "prepaid",
                 "sync_threshold_s", "logical", "baudrate", "parity", "extra")

    def __init__(self, id, port, protocol=DEFAULT_PROTOCOL, address=None, unit=None,
                 profile=None,
                 interval_s=900, instant_interval_s=300, clock_interval_s=3600,
                 version=2007, prepaid=False, sync_threshold_s=30.0, logical=0,
                 baudrate=None, parity=None, **extra):
        self.id = id
        self.port = port
        self.protocol = protocol
        self.address = address
        self.unit = unit
        self.profile = profile
        self.interval_s = interval_s
        self.instant_interval_s = instant_interval_s
        self.clock_interval_s = clock_interval_s
        self.version = version
        self.prepaid = prepaid
        self.sync_threshold_s = sync_threshold_s
        self.logical = logical              # DL/T 698.45 logical address
        self.baudrate = baudrate          # None: the port's line settings
        self.parity = parity
        self.extra = extra or None

    @classmethod
    def from_config(cls, m):
        """From a validated [[meters]] entry."""
        return cls(m.id, m.port, protocol=m.protocol, address=m.address, unit=m.unit,
                   profile=m.profile, interval_s=m.interval_s,
                   instant_interval_s=m.instant_interval_s,
                   clock_interval_s=m.clock_interval_s, version=m.version, prepaid=m.prepaid,
                   logical=getattr(m, "logical_address", 0), baudrate=m.baudrate,
                   parity=m.parity)


class MeterHealth:
    __slots__ = ("online", "failures", "probe_backoff", "next_probe", "last_ok",
                 "last_error", "unsupported", "block_ok", "drift_s", "last_sync_day",
                 "last_drift_event_day", "last_freeze_day", "relay", "reads", "reads_ok")

    def __init__(self):
        self.online = True
        self.failures = 0
        self.probe_backoff = OFFLINE_PROBE_S
        self.next_probe = 0.0
        self.last_ok = None
        self.last_error = None
        self.unsupported = ()      # identifiers the meter said it lacks (a set once any)
        self.block_ok = True
        self.drift_s = None
        self.last_sync_day = None
        self.last_drift_event_day = None
        self.last_freeze_day = None
        self.relay = None           # last relay state read ("open" / "closed")
        self.reads = 0              # transactions asked of this meter (after retries)
        self.reads_ok = 0


def aligned(now, interval, offset=0.0):
    """The next multiple of `interval` seconds after `now` (wall clock), plus offset."""
    return (int(now // interval) + 1) * interval + offset


def local_ms(naive):
    """A meter's local naive time as Unix milliseconds (the gateway's time zone)."""
    return int(time.mktime(naive.timetuple()) * 1000)


class LinePoller:
    def __init__(self, meters: List[MeterSpec], sink: Callable, event: Callable,
                 clock_trusted: Callable[[], bool] = lambda: True, offline_after=3,
                 max_probe_s=3600.0, wall=time.time, first_poll=True, freeze_after_s=300,
                 sync_guard=near_the_hour):
        self.meters = {m.id: m for m in meters}
        self.sink = sink
        self.event = event
        self.clock_trusted = clock_trusted
        self.offline_after = offline_after
        self.max_probe_s = max_probe_s
        self.wall = wall
        self.sync_guard = sync_guard      # local time -> True where no time sync may go
        self.freeze_after_s = freeze_after_s
        self.health = {m.id: MeterHealth() for m in meters}
        self._heap = []
        self._seq = itertools.count()
        now = wall()
        for i, m in enumerate(meters):
            stagger = 0.0 if first_poll else i * 0.5
            self._push(now + stagger if first_poll else aligned(now, m.interval_s), m.id,
                       "energy")
            if m.instant_interval_s:
                self._push(now if first_poll else aligned(now, m.instant_interval_s),
                           m.id, "instant")
            extra = driver(m.protocol).tasks(m)
            if "clock" in extra:
                self._push(now if first_poll else aligned(now, m.clock_interval_s), m.id,
                           "clock")
            if "freeze" in extra:
                # at start, once today's freeze is due (by a trusted clock): a restart after
                # an outage backfills the missed days now, not after the next midnight
                due_today = self._next_freeze_time(now) > now + self.freeze_after_s
                self._push(now if first_poll and due_today and clock_trusted() else
                           self._next_freeze_time(now), m.id, "freeze")

    # ---------------------------------------------------------------- scheduling

    def _push(self, due, meter_id, task):
        heapq.heappush(self._heap, (due, next(self._seq), meter_id, task))

    def _next_freeze_time(self, now):
        today = _dt.datetime.fromtimestamp(now).date()
        t = time.mktime(today.timetuple()) + self.freeze_after_s
        return t if t > now else t + 86400

    def _reschedule(self, meter, task, now):
        if task == "energy":
            self._push(aligned(now, meter.interval_s), meter.id, task)
        elif task == "instant":
            self._push(aligned(now, meter.instant_interval_s), meter.id, task)
        elif task == "clock":
            self._push(aligned(now, meter.clock_interval_s), meter.id, task)
        elif task == "freeze":
            self._push(self._next_freeze_time(now + 60), meter.id, task)

    def next_job(self, worker):
        """A job to run now on the worker's thread, or the seconds until one is due."""
        if not self._heap:
            return 5.0
        now = self.wall()
        due, _, meter_id, task = self._heap[0]
        if due > now:
            return due - now
        heapq.heappop(self._heap)
        meter = self.meters[meter_id]
        health = self.health[meter_id]
        if not health.online and now < health.next_probe:
            self._push(health.next_probe, meter_id, task)    # skip, keep the line free
            return 0.0
        self._reschedule(meter, task, now)
        return lambda w: self.run_task(w, meter, task)

    def pending(self):
        return len(self._heap)

    # ---------------------------------------------------------------- health

    def outcome(self, meter, result):
        """Count a transaction in the meter's health (online/offline, back-off); True if
        it was answered."""
        h = self.health[meter.id]
        now = self.wall()
        h.reads += 1
        if result.ok:
            h.reads_ok += 1
            h.failures = 0
            h.last_ok = now
            h.last_error = None
            if not h.online:
                h.online = True
                h.probe_backoff = OFFLINE_PROBE_S
                self.event("meter.online", meter=meter.id)
            return True
        h.failures += 1
        h.last_error = result.error
        if h.online and h.failures >= self.offline_after:
            h.online = False
            h.next_probe = now + h.probe_backoff
            self.event("meter.offline", meter=meter.id, reason=result.error)
        elif not h.online:
            h.probe_backoff = min(self.max_probe_s, h.probe_backoff * 2)
            h.next_probe = now + h.probe_backoff
        return False

    # ---------------------------------------------------------------- jobs

    def run_task(self, worker, meter, task):
        """One poll task of a meter now, on the worker's thread (its driver does it)."""
        driver(meter.protocol).poll(self, worker, meter, task)

    def readings(self, meter, values, ts=None, quality=None):
        """Readings of decoded values, stamped now (or at `ts`, the meter's own time)."""
        now_ms = int(self.wall() * 1000)
        if quality is None:
            quality = GOOD if self.clock_trusted() else CLOCK_UNTRUSTED
        return [Reading(meter.id, v.quantity, v.value, v.unit, ts or now_ms, now_ms, quality)
                for v in values]

    local_ms = staticmethod(local_ms)

    def clock_checked(self, worker, meter, meter_time, t0, t1, broadcast):
        """Drift of a meter clock read between t0 and t1 (the meter stamped its answer about
        mid-way), the drift event, and, within the +-5 min a broadcast sync corrects, one
        broadcast a day (`broadcast(when)` sends the protocol's frame) when the gateway clock
        is trusted and it is not near the hour."""
        h = self.health[meter.id]
        gw_time = _dt.datetime.fromtimestamp((t0 + t1) / 2)
        drift = (meter_time - gw_time).total_seconds()
        if abs(drift) < 1.0 + (t1 - t0) / 2:
            drift = 0.0
        h.drift_s = drift
        today = gw_time.date()
        if abs(drift) < meter.sync_threshold_s:
            return
        if abs(drift) > SYNC_MAX_S:
            if h.last_drift_event_day != today:
                h.last_drift_event_day = today
                self.event("meter.clock_drift", meter=meter.id, drift_s=round(drift, 1),
                           action="none: beyond broadcast sync range, needs a technician")
            return
        if not self.clock_trusted() or h.last_sync_day == today:
            return
        now = _dt.datetime.fromtimestamp(self.wall())
        if self.sync_guard(now):
            return                  # never near the hour or midnight: it would hit freezes
        h.last_sync_day = today
        broadcast(now.replace(microsecond=0) + _dt.timedelta(seconds=1))
        self.event("meter.time_synced", meter=meter.id, drift_s=round(drift, 1))

    # ---------------------------------------------------------------- status

    def status(self):
        out = {}
        for mid, h in self.health.items():
            out[mid] = {"online": h.online, "failures": h.failures, "last_ok": h.last_ok,
                        "last_error": h.last_error, "drift_s": h.drift_s, "reads": h.reads,
                        "reads_ok": h.reads_ok}
        return out
