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

from gateway.store.journal import BACKFILLED, CLOCK_UNTRUSTED, GOOD, Reading
from gateway.line.reads import (ENERGY_BLOCK, ENERGY_SINGLE, INSTANT, PREPAID, SKIP_QUANTITIES,
                             read_request)
from gateway.line.port import Request
from protocols import dlt645 as D
from protocols import modbus as M
from protocols.modbus_profiles import PROFILES, decode_block

log = logging.getLogger(__name__)

CLOCK_DI = 0x0400010C
FREEZE_TIME = 0x05060000
FREEZE_IMPORT = 0x05060100

SYNC_MAX_S = 300.0           # broadcast time sync corrects at most +-5 min (reference 1.7)


class MeterSpec:
    """What the poller needs to know about a meter (filled from the configuration)."""

    # slots: a concentrator may carry a thousand of these
    __slots__ = ("id", "port", "protocol", "address", "unit", "profile", "interval_s",
                 "instant_interval_s", "clock_interval_s", "version", "prepaid",
                 "sync_threshold_s", "extra")

    def __init__(self, id, port, protocol="dlt645", address=None, unit=None, profile=None,
                 interval_s=900, instant_interval_s=300, clock_interval_s=3600,
                 version=2007, prepaid=False, sync_threshold_s=30.0, **extra):
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
        self.extra = extra or None

    @classmethod
    def from_config(cls, m):
        """From a validated [[meters]] entry."""
        return cls(m.id, m.port, protocol=m.protocol, address=m.address, unit=m.unit,
                   profile=m.profile, interval_s=m.interval_s,
                   instant_interval_s=m.instant_interval_s,
                   clock_interval_s=m.clock_interval_s, version=m.version, prepaid=m.prepaid)


class MeterHealth:
    __slots__ = ("online", "failures", "probe_backoff", "next_probe", "last_ok",
                 "last_error", "unsupported", "block_ok", "drift_s", "last_sync_day",
                 "last_drift_event_day", "last_freeze_day", "relay", "reads", "reads_ok")

    def __init__(self):
        self.online = True
        self.failures = 0
        self.probe_backoff = 60.0
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
                 max_probe_s=3600.0, wall=time.time, first_poll=True, freeze_after_s=300):
        self.meters = {m.id: m for m in meters}
        self.sink = sink
        self.event = event
        self.clock_trusted = clock_trusted
        self.offline_after = offline_after
        self.max_probe_s = max_probe_s
        self.wall = wall
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
            if m.protocol == "dlt645" and m.version == 2007 and m.clock_interval_s:
                self._push(now if first_poll else aligned(now, m.clock_interval_s), m.id,
                           "clock")
                self._push(self._next_freeze_time(now), m.id, "freeze")

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
        return lambda w: self._run(w, meter, task)

    def pending(self):
        return len(self._heap)

    # ---------------------------------------------------------------- health

    def _outcome(self, meter, result):
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
                h.probe_backoff = 60.0
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

    def _run(self, worker, meter, task):
        if meter.protocol == "modbus":
            return self._run_modbus(worker, meter, task)
        if task == "energy":
            self._energy(worker, meter)
        elif task == "instant":
            self._read_dis(worker, meter, INSTANT[meter.version])
        elif task == "clock":
            self._clock(worker, meter)
        elif task == "freeze":
            self._freeze(worker, meter)

    def read_di(self, worker, meter, di):
        """One DL/T 645 read through the worker; (Result, message)."""
        result = worker.transact(read_request(meter, di))
        if not self._outcome(meter, result):
            return result, None
        return result, result.answer

    def _values_to_readings(self, meter, values, ts=None, quality=None):
        now_ms = int(self.wall() * 1000)
        if quality is None:
            quality = GOOD if self.clock_trusted() else CLOCK_UNTRUSTED
        for v in values:
            if v.quantity == "relay.state":
                self.health[meter.id].relay = v.value
        return [Reading(meter.id, v.quantity, v.value, v.unit, ts or now_ms, now_ms, quality)
                for v in values if v.quantity not in SKIP_QUANTITIES]

    def _read_dis(self, worker, meter, dis):
        readings = []
        h = self.health[meter.id]
        for di in dis:
            if di in h.unsupported:
                continue
            result, msg = self.read_di(worker, meter, di)
            if msg is None:
                if not h.online:
                    break                       # offline: stop this round, probe later
                continue
            if isinstance(msg, D.ErrorResponse):
                if "no_data" in msg.flags or "wrong_di" in msg.flags:
                    h.unsupported = set(h.unsupported) | {di}
                continue
            if isinstance(msg, D.ReadResponse) and msg.values:
                readings += self._values_to_readings(meter, msg.values)
        if readings:
            self.sink(readings)
        return readings

    def _energy(self, worker, meter):
        h = self.health[meter.id]
        prepaid = PREPAID if meter.prepaid and meter.version == 2007 else []
        if h.block_ok:
            result, msg = self.read_di(worker, meter, ENERGY_BLOCK[meter.version])
            if msg is None:
                return
            if isinstance(msg, D.ReadResponse) and msg.values:
                self.sink(self._values_to_readings(meter, msg.values))
                if prepaid:
                    self._read_dis(worker, meter, prepaid)
                return
            h.block_ok = False                   # no block reads: single identifiers
        self._read_dis(worker, meter, ENERGY_SINGLE[meter.version] + prepaid)

    def _clock(self, worker, meter):
        h = self.health[meter.id]
        t0 = self.wall()
        result, msg = self.read_di(worker, meter, CLOCK_DI)
        if not isinstance(msg, D.ReadResponse) or not msg.values:
            return
        t1 = self.wall()
        meter_time = msg.values[0].value
        # the meter stamped its answer about mid-way through the transaction
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
        if now.minute >= 55 or now.minute < 5:
            return                  # never near the hour or midnight: it would hit freezes
        h.last_sync_day = today
        frame = D.broadcast_time_sync(_dt.datetime.fromtimestamp(self.wall()).replace(
            microsecond=0) + _dt.timedelta(seconds=1))
        worker.broadcast(frame)
        self.event("meter.time_synced", meter=meter.id, drift_s=round(drift, 1))

    def _freeze(self, worker, meter):
        """Today's daily freeze, and any missed day backfilled, timestamp checked."""
        h = self.health[meter.id]
        today = _dt.datetime.fromtimestamp(self.wall()).date()
        if h.last_freeze_day is None:
            h.last_freeze_day = today - _dt.timedelta(days=1)
        day = h.last_freeze_day + _dt.timedelta(days=1)
        while day <= today:
            n = (today - day).days + 1
            if n > 62:
                self.event("freeze.missing", meter=meter.id, day=day.isoformat(),
                           reason="older than the meter keeps")
                day += _dt.timedelta(days=1)
                continue
            found = None
            for k in (n, n - 1, n + 1):      # the meter's clock may have shifted its freezes
                if not 1 <= k <= 62:
                    continue
                result, msg = self.read_di(worker, meter, FREEZE_TIME | k)
                if msg is None:
                    return                    # no answer: try again at the next round
                if isinstance(msg, D.ReadResponse) and msg.values and \
                        msg.values[0].value.date() == day:
                    found = (k, msg.values[0].value)
                    break
            if found is None:
                self.event("freeze.missing", meter=meter.id, day=day.isoformat(),
                           reason="no freeze with that date")
            else:
                k, stamp = found
                result, msg = self.read_di(worker, meter, FREEZE_IMPORT | k)
                if msg is None:
                    return
                if isinstance(msg, D.ReadResponse) and msg.values:
                    quality = GOOD if day == today else BACKFILLED
                    self.sink(self._values_to_readings(meter, msg.values,
                                                       ts=local_ms(stamp), quality=quality))
            h.last_freeze_day = day
            day += _dt.timedelta(days=1)

    # ---------------------------------------------------------------- Modbus

    def _run_modbus(self, worker, meter, task):
        profile = PROFILES[meter.profile]
        readings = []
        for block in profile.groups.get(task, ()):
            if block.function == 4:
                frame = M.read_input_registers(meter.unit, block.address, block.count)
            else:
                frame = M.read_holding_registers(meter.unit, block.address, block.count)
            req = Request(meter.id, "modbus", frame, M.answer_length(frame),
                          label="%d:%04X" % (block.function, block.address))
            result = worker.transact(req)
            if not self._outcome(meter, result):
                if not self.health[meter.id].online:
                    break
                continue
            if result.answer.exception is not None:
                continue
            readings += self._values_to_readings(meter, decode_block(block,
                                                                     result.answer.registers))
        if readings:
            self.sink(readings)

    # ---------------------------------------------------------------- status

    def status(self):
        out = {}
        for mid, h in self.health.items():
            out[mid] = {"online": h.online, "failures": h.failures, "last_ok": h.last_ok,
                        "last_error": h.last_error, "drift_s": h.drift_s, "reads": h.reads,
                        "reads_ok": h.reads_ok}
        return out
