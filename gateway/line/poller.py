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

Catch-up ("补抄"): an energy or instantaneous task one of whose reads failed all its attempts
is run again later in the same interval (the registers are cumulative: a late read is as
good), after the rest of the line is served (a catch-up runs only when no scheduled task is
due; relay commands and on-demand reads come first as always) and with growing pauses
(`catch_up_s`, doubling). Only when the interval ends, or the meter goes offline, without
a complete run is the slot counted as missed (`missed_slots` per meter, in the health and
status data); `caught_up` counts the slots a catch-up saved. Slots skipped while a meter is
offline are not counted: its offline state says so.
"""

import datetime as _dt
import heapq
import itertools
import logging
import threading
import time
from typing import Callable, List

from gateway.clock import near_the_hour
from gateway.line.reads import driver
from gateway.registry import DEFAULT_PROTOCOL
from gateway.store.journal import CLOCK_UNTRUSTED, GOOD, Reading

log = logging.getLogger(__name__)

SYNC_MAX_S = 300.0           # broadcast time sync corrects at most +-5 min (reference 1.7)
OFFLINE_PROBE_S = 60.0       # the first probe of an offline meter; doubles up to max_probe_s
CATCH_UP_S = 1.0             # pause before a failed slot's first catch-up; doubles each time
CATCH_UP_TASKS = ("energy", "instant")   # interval slots (clock and freeze have their own)


class MeterSpec:
    """What the poller needs to know about a meter (filled from the configuration)."""

    # slots: a concentrator may carry a thousand of these
    __slots__ = ("id", "port", "protocol", "address", "unit", "profile", "interval_s",
                 "instant_interval_s", "clock_interval_s", "version", "prepaid",
                 "sync_threshold_s", "logical", "baudrate", "parity", "function_code",
                 "function_tried", "extra")

    def __init__(self, id, port, protocol=DEFAULT_PROTOCOL, address=None, unit=None,
                 profile=None,
                 interval_s=900, instant_interval_s=300, clock_interval_s=3600,
                 version=2007, prepaid=False, sync_threshold_s=30.0, logical=0,
                 baudrate=None, parity=None, function_code=None, **extra):
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
        # Modbus: the register-read function (None: the profile's); the driver sets it to
        # the one the meter answers after falling back once from the other
        self.function_code = function_code
        self.function_tried = False
        self.extra = extra or None

    @classmethod
    def from_config(cls, m):
        """From a validated [[meters]] entry."""
        return cls(m.id, m.port, protocol=m.protocol, address=m.address, unit=m.unit,
                   profile=m.profile, interval_s=m.interval_s,
                   instant_interval_s=m.instant_interval_s,
                   clock_interval_s=m.clock_interval_s, version=m.version, prepaid=m.prepaid,
                   logical=getattr(m, "logical_address", 0), baudrate=m.baudrate,
                   parity=m.parity, function_code=getattr(m, "function_code", None))


class MeterHealth:
    __slots__ = ("online", "failures", "probe_backoff", "next_probe", "last_ok",
                 "last_error", "unsupported", "block_ok", "drift_s", "last_sync_day",
                 "last_drift_event_day", "last_freeze_day", "relay", "reads", "reads_ok",
                 "slots", "missed_slots", "caught_up", "catch_ups")

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
        self.slots = 0              # interval slots (energy, instant) that ended
        self.missed_slots = 0       # ... without a complete read, catch-ups included
        self.caught_up = 0          # ... saved by a catch-up
        self.catch_ups = 0          # catch-up runs


class _Health(dict):
    """Meter id -> MeterHealth; a meter removed by a reload while its task was running
    gets a throwaway record instead of a KeyError on the line's thread."""

    def __missing__(self, meter_id):
        return MeterHealth()


def _spec_key(m):
    return tuple(getattr(m, k) for k in MeterSpec.__slots__)


def _identity(m):
    """What makes a meter the same device on the line (its health carries over)."""
    return (m.port, m.protocol, m.address, m.unit, m.logical)


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
                 sync_guard=near_the_hour, catch_up_s=CATCH_UP_S):
        self.meters = {m.id: m for m in meters}
        self.sink = sink
        self.event = event
        self.clock_trusted = clock_trusted
        self.offline_after = offline_after
        self.max_probe_s = max_probe_s
        self.wall = wall
        self.sync_guard = sync_guard      # local time -> True where no time sync may go
        self.freeze_after_s = freeze_after_s
        self.health = _Health((m.id, MeterHealth()) for m in meters)
        self.catch_up_s = catch_up_s      # 0: no catch-up (a failed slot is missed at once)
        self._heap = []
        self._catch_up = []               # (due, seq, meter_id, task, slot_end, pause)
        # failed transactions per meter while its task runs (an on-demand read of another
        # meter may run between the task's transactions: it does not fail this slot)
        self._failed = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()     # the line's thread against a reload
        now = wall()
        for i, m in enumerate(meters):
            self._schedule(m, now, first_poll, i)

    def _schedule(self, m, now, first_poll=True, i=0):
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
            self._push(now if first_poll and due_today and self.clock_trusted() else
                       self._next_freeze_time(now), m.id, "freeze")

    def reconfigure(self, meters: List[MeterSpec]):
        """The line's meters replaced in place (a configuration reload): a meter kept as it
        was keeps its schedule and health; a new or changed one is polled now (a changed
        address or protocol starts with fresh health); a removed one is never polled again.
        Returns the ids (added, changed, removed)."""
        with self._lock:
            new = {m.id: m for m in meters}
            added = [mid for mid in new if mid not in self.meters]
            removed = [mid for mid in self.meters if mid not in new]
            changed = [mid for mid in new if mid in self.meters
                       and _spec_key(self.meters[mid]) != _spec_key(new[mid])]
            fresh = set(added) | set(changed)
            health = _Health()
            for mid, m in new.items():
                old = self.meters.get(mid)
                keep = old is not None and _identity(old) == _identity(m)
                health[mid] = self.health[mid] if keep else MeterHealth()
            # schedules and catch-ups of removed and changed meters go
            self._heap = [e for e in self._heap if e[2] in new and e[2] not in fresh]
            self._catch_up = [e for e in self._catch_up if e[2] in new and e[2] not in fresh]
            heapq.heapify(self._heap)
            heapq.heapify(self._catch_up)
            # rebound, not mutated: other threads iterate these dicts
            self.meters = new
            self.health = health
            now = self.wall()
            for mid in new:
                if mid in fresh:
                    self._schedule(new[mid], now)
            return added, changed, removed

    # ---------------------------------------------------------------- scheduling

    def _push(self, due, meter_id, task):
        heapq.heappush(self._heap, (due, next(self._seq), meter_id, task))

    def _next_freeze_time(self, now):
        today = _dt.datetime.fromtimestamp(now).date()
        t = time.mktime(today.timetuple()) + self.freeze_after_s
        return t if t > now else t + 86400

    def _reschedule(self, meter, task, now):
        """Schedules the task's next run; returns when that is (the end of this slot)."""
        if task == "energy":
            due = aligned(now, meter.interval_s)
        elif task == "instant":
            due = aligned(now, meter.instant_interval_s)
        elif task == "clock":
            due = aligned(now, meter.clock_interval_s)
        elif task == "freeze":
            due = self._next_freeze_time(now + 60)
        else:
            return None
        self._push(due, meter.id, task)
        return due

    def next_job(self, worker):
        """A job to run now on the worker's thread, or the seconds until one is due.
        Scheduled tasks first; a catch-up only when none is due."""
        with self._lock:
            return self._next_job()

    def _next_job(self):
        now = self.wall()
        wait = 5.0
        if self._heap:
            due, _, meter_id, task = self._heap[0]
            if due <= now:
                heapq.heappop(self._heap)
                meter = self.meters[meter_id]
                health = self.health[meter_id]
                if not health.online and now < health.next_probe:
                    self._push(health.next_probe, meter_id, task)  # skip, keep the line free
                    return 0.0
                slot_end = self._reschedule(meter, task, now)
                return lambda w: self._run_slot(w, meter, task, slot_end, None)
            wait = due - now
        while self._catch_up:
            due, _, meter_id, task, slot_end, pause = self._catch_up[0]
            if due > now:
                return min(wait, due - now)
            heapq.heappop(self._catch_up)
            meter = self.meters[meter_id]
            if now >= slot_end or not self.health[meter_id].online:
                self._slot_ended(meter, task, False)     # too late, or offline: missed
                continue
            return lambda w: self._run_slot(w, meter, task, slot_end, pause)
        return wait

    def pending(self):
        return len(self._heap) + len(self._catch_up)

    def _run_slot(self, worker, meter, task, slot_end, pause):
        """Runs a task for its slot (pause: None the first time, else the catch-up's); a run
        with a failed read is caught up later in the slot, or the slot is missed."""
        h = self.health[meter.id]
        if pause is not None:
            h.catch_ups += 1
        self._failed[meter.id] = 0
        try:
            self.run_task(worker, meter, task)
        finally:
            failed = self._failed.pop(meter.id, 0)
        if task not in CATCH_UP_TASKS or slot_end is None:
            return
        if not failed:
            self._slot_ended(meter, task, True, caught_up=pause is not None)
            return
        pause = self.catch_up_s if pause is None else pause * 2
        due = self.wall() + pause
        if not self.catch_up_s or not h.online or due >= slot_end:
            self._slot_ended(meter, task, False)
            return
        heapq.heappush(self._catch_up, (due, next(self._seq), meter.id, task, slot_end,
                                        pause))

    def _slot_ended(self, meter, task, collected, caught_up=False):
        h = self.health[meter.id]
        h.slots += 1
        if collected:
            if caught_up:
                h.caught_up += 1
            return
        h.missed_slots += 1
        log.info("meter %s: %s slot missed (%s)", meter.id, task,
                 h.last_error or "offline")

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
        if meter.id in self._failed:
            self._failed[meter.id] += 1
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

    def readings(self, meter, values, ts=None, quality=None, skip=()):
        """Readings of decoded values, stamped now (or at `ts`, the meter's own time); a
        relay state read is kept in the meter's health, the driver's `skip` quantities
        (status words, clocks) are not published."""
        now_ms = int(self.wall() * 1000)
        if quality is None:
            quality = GOOD if self.clock_trusted() else CLOCK_UNTRUSTED
        out = []
        for v in values:
            if v.quantity == "relay.state":
                self.relay_seen(meter.id, v.value)
            if v.quantity not in skip:
                out.append(Reading(meter.id, v.quantity, v.value, v.unit, ts or now_ms,
                                   now_ms, quality))
        return out

    def relay_seen(self, meter_id, state, ours=False):
        """A relay state read (by a poll, or by the control core: `ours` when read after a
        frame of ours went). A change nobody here commanded is reported once: the meter's
        own prepaid logic, its button, a technician, tampering."""
        h = self.health.get(meter_id)
        if h is None:
            return
        if not ours and h.relay is not None and state != h.relay:
            self.event("meter.relay_changed", meter=meter_id, relay=state, previous=h.relay)
        h.relay = state

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
            fn = self.meters[mid].function_code
            out[mid] = {"online": h.online, "failures": h.failures, "last_ok": h.last_ok,
                        "last_error": h.last_error, "drift_s": h.drift_s, "reads": h.reads,
                        "reads_ok": h.reads_ok, "slots": h.slots,
                        "missed_slots": h.missed_slots, "caught_up": h.caught_up}
            if fn is not None:
                out[mid]["function_code"] = fn       # Modbus: the read function in use
        return out
