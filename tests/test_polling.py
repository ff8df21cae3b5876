"""Polling against simulated meters on pseudo-terminals: real serial I/O, real timing."""

import datetime as dt
import threading
import time

import pytest
import serial

from gateway.store.journal import BACKFILLED, GOOD
from gateway.line.poller import LinePoller, MeterSpec, aligned
from gateway.line.port import PortError, PortWorker, RELAY
from gateway.model import TxError
from gateway.sim.dlt645 import Faults, SimLine, SimMeter, make_meters
from protocols import dlt645 as D


class Collector:
    def __init__(self):
        self.readings = []
        self.events = []
        self.lock = threading.Lock()

    def sink(self, readings):
        with self.lock:
            self.readings.extend(readings)

    def event(self, type_, **fields):
        with self.lock:
            self.events.append(dict(fields, type=type_))


def start_line(meters, baudrate=9600, specs_kw=None, offline_after=3, clock_trusted=True,
               sync_guard=lambda now: False, poller_kw=None, **line_kw):
    line = SimLine(meters, baudrate=baudrate, **line_kw)
    line.start()
    col = Collector()
    specs = [MeterSpec(m.address, "p", address=m.address, **(specs_kw or {})) for m in meters]
    poller = LinePoller(specs, col.sink, col.event, clock_trusted=lambda: clock_trusted,
                        offline_after=offline_after, sync_guard=sync_guard,
                        **(poller_kw or {}))
    worker = PortWorker("p", line.device, baudrate=baudrate, poll_source=poller)
    worker.start()
    return line, worker, poller, col


def stop(line, worker):
    worker.stop()
    line.stop()


def truth_value(meter, quantity, at):
    """What the simulated meter answered for `quantity` last before time `at`."""
    best = None
    for t, _di, values in list(meter.truth):
        if t > at:
            break
        for v in values or ():
            if v.quantity == quantity:
                best = v.value
    return best


def test_three_lines_of_16_meters_report_exactly_what_the_meters_said():
    setups = []
    for n in range(3):
        meters = make_meters(16, first_address=100 * (n + 1), prepaid=(n == 0),
                             faults=None)
        setups.append((meters,) + start_line(meters, baudrate=19200,
                                             specs_kw={"interval_s": 3600,
                                                       "instant_interval_s": 3600,
                                                       "clock_interval_s": 0,
                                                       "prepaid": n == 0}))
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            if all(len({r.meter for r in col.readings if r.quantity == "power.active"}) == 16
                   for _, _, _, _, col in setups):
                break
            time.sleep(0.2)
    finally:
        for meters, line, worker, _, _ in setups:
            stop(line, worker)
    checked = 0
    for meters, line, worker, poller, col in setups:
        by_addr = {m.address: m for m in meters}
        seen = {(r.meter, r.quantity) for r in col.readings}
        for m in meters:
            for q in ("energy.import.total", "energy.import.t1", "energy.import.t4",
                      "voltage.a", "current.a", "power.active", "relay.state"):
                assert (m.address, q) in seen, (m.address, q)
        for r in col.readings:
            assert r.quality == GOOD
            want = truth_value(by_addr[r.meter], r.quantity, r.gw_ts / 1000.0 + 0.001)
            assert want == r.value, r
            checked += 1
        assert worker.line_stats()["timeouts"] == 0
    assert checked >= 3 * 16 * 12


NOISY_READS = 700       # about 35 corrupted answers and 35 noise bursts at these rates


def test_dead_meter_and_noise_do_not_hurt_other_lines_or_live_meters():
    # clean line alone: reference cycle time
    def cycle_time(line_meters, worker, poller, rounds=3):
        t0 = time.time()
        start = sum(h.reads for h in poller.health.values())
        target = start + rounds * len(line_meters)
        while sum(h.reads for h in poller.health.values()) < target:
            time.sleep(0.01)
        return (time.time() - t0) / rounds

    fast = {"interval_s": 0.05, "instant_interval_s": 0, "clock_interval_s": 0}
    clean_meters = make_meters(8, first_address=500, faults=Faults(latency_s=0.005))
    c_line, c_worker, c_poller, c_col = start_line(clean_meters, baudrate=115200,
                                                   specs_kw=fast)
    try:
        alone = cycle_time(clean_meters, c_worker, c_poller, rounds=10)
        noisy = make_meters(8, first_address=600,
                            faults=Faults(latency_s=0.005, corrupt_rate=0.05))
        noisy.append(SimMeter("000000000699", faults=Faults(silent=True)))
        n_line, n_worker, n_poller, n_col = start_line(noisy, baudrate=115200, specs_kw=fast,
                                                       noise_rate=0.05)
        try:
            together = cycle_time(clean_meters, c_worker, c_poller, rounds=10)
            deadline = time.time() + 120
            live = [m.address for m in noisy[:8]]
            while time.time() < deadline:
                if sum(n_poller.health[a].reads for a in live) >= NOISY_READS:
                    break
                time.sleep(0.1)
        finally:
            stop(n_line, n_worker)
    finally:
        stop(c_line, c_worker)
    reads = sum(n_poller.health[a].reads for a in live)
    ok = sum(n_poller.health[a].reads_ok for a in live)
    assert reads >= NOISY_READS
    assert reads - ok <= 1, (ok, reads, n_worker.line_stats())    # retries hide the noise
    stats = n_worker.line_stats()
    assert stats["checksum_errors"] > 0 and stats["retries"] > 0     # the noise was real
    assert stats["garbage_bytes"] > 0 and n_line.stats["noise_bursts"] > 15
    assert not n_poller.health["000000000699"].online
    assert {"type": "meter.offline", "meter": "000000000699"}.items() <= \
        [e for e in n_col.events if e["meter"] == "000000000699"][0].items()
    # the dead meter is probed, not polled: it asked for only a handful of transactions
    assert n_poller.health["000000000699"].reads <= 5
    assert together <= alone * 2.0 + 0.02, (alone, together)   # CPU is shared, lines are not


def test_meter_goes_offline_and_comes_back_online():
    meters = make_meters(2, first_address=700, faults=Faults(latency_s=0.005))
    line, worker, poller, col = start_line(
        meters, baudrate=115200, offline_after=2,
        specs_kw={"interval_s": 0.05, "instant_interval_s": 0, "clock_interval_s": 0})
    poller.health[meters[1].address].probe_backoff = 0.3
    try:
        meters[1].faults.silent = True
        _wait(lambda: any(e["type"] == "meter.offline" for e in col.events))
        meters[1].faults.silent = False
        _wait(lambda: any(e["type"] == "meter.online" for e in col.events))
    finally:
        stop(line, worker)
    types = [e["type"] for e in col.events if e["meter"] == meters[1].address]
    assert types[:2] == ["meter.offline", "meter.online"]


def _wait(cond, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in %ss" % timeout)


def test_relay_requests_jump_the_poll_queue_and_answers_are_matched():
    meters = make_meters(4, first_address=800, faults=Faults(latency_s=0.005))
    line, worker, poller, col = start_line(
        meters, baudrate=115200,
        specs_kw={"interval_s": 0.05, "instant_interval_s": 0, "clock_interval_s": 0})
    try:
        target = meters[2]
        frame = D.relay_control(target.address, D.RelayCommand.TRIP, password_level=2,
                                password="000000", operator_code="00000001",
                                valid_until=dt.datetime.now() + dt.timedelta(minutes=5))
        t0 = time.time()
        result = worker.submit(D.relay_exchange(frame).for_meter(target.address),
                               RELAY).result(5)
        elapsed = time.time() - t0
    finally:
        stop(line, worker)
    assert result.ok and isinstance(result.answer, D.Ack)
    assert target.relay_open and target.relay_log[0][1] == "open"
    assert elapsed < 0.5


def test_wrong_address_and_garbage_answers_are_never_taken():
    m = SimMeter("000000000901", faults=Faults(latency_s=0.005, wrong_address_rate=1.0))
    line = SimLine([m], baudrate=115200)
    line.start()
    worker = PortWorker("p", line.device, baudrate=115200, retries=1)
    worker.start()
    try:
        req = D.read_exchange(m.address, 0x00010000).for_meter(m.address)
        result = worker.submit(req).result(5)
    finally:
        stop(line, worker)
    assert not result.ok and result.code == TxError.FOREIGN
    assert "foreign frame" in result.error
    assert worker.line_stats()["foreign_frames"] == 2


def test_daily_freeze_backfill_checks_the_freeze_timestamp():
    m = SimMeter("000000000950", faults=Faults(latency_s=0.005))
    line = SimLine([m], baudrate=115200)
    line.start()
    col = Collector()
    spec = MeterSpec(m.address, "p", address=m.address, interval_s=3600,
                     instant_interval_s=0, clock_interval_s=3600)
    poller = LinePoller([spec], col.sink, col.event)
    worker = PortWorker("p", line.device, baudrate=115200)
    worker.start()
    try:
        today = dt.date.today()
        poller.health[m.address].last_freeze_day = today - dt.timedelta(days=4)
        done = threading.Event()
        job = lambda w: (poller.run_task(w, spec, "freeze"), done.set())   # noqa: E731
        worker.poll_source = _OneJob(job)
        assert done.wait(10)
    finally:
        stop(line, worker)
    freezes = [r for r in col.readings if r.quantity == "freeze.daily.energy.import.total"]
    days = sorted(dt.date.fromtimestamp(r.ts / 1000) for r in freezes)
    assert days == [today - dt.timedelta(days=k) for k in (3, 2, 1, 0)]
    for r in freezes:
        day = dt.date.fromtimestamp(r.ts / 1000)
        assert r.quality == (GOOD if day == today else BACKFILLED)
        want = [total for stamp, total in _freeze_truth(m) if stamp.date() == day][0]
        assert r.value == want
    assert poller.health[m.address].last_freeze_day == today


def _freeze_truth(meter):
    return [(stamp, block[0]) for stamp, block in meter._freezes]


class _OneJob:
    def __init__(self, job):
        self.job = job

    def next_job(self, worker):
        job, self.job = self.job, None
        return job if job else 1.0


def test_clock_drift_small_is_synced_large_raises_event():
    small = SimMeter("000000000961", clock_offset_s=40, faults=Faults(latency_s=0.005))
    large = SimMeter("000000000962", clock_offset_s=900, faults=Faults(latency_s=0.005))
    line, worker, poller, col = start_line(
        [small, large], baudrate=115200,
        specs_kw={"interval_s": 3600, "instant_interval_s": 0, "clock_interval_s": 3600})
    try:
        _wait(lambda: all(h.drift_s is not None for h in poller.health.values()))
        time.sleep(0.3)
    finally:
        stop(line, worker)
    assert abs(poller.health[large.address].drift_s - 900) < 3
    assert any(e["type"] == "meter.clock_drift" and e["meter"] == large.address
               for e in col.events)
    # the near-the-hour guard is injected (never near here): the test runs at any minute
    assert any(e["type"] == "meter.time_synced" for e in col.events)
    assert abs(small.clock_offset_s) < 3          # the broadcast reached the meter
    assert abs(large.clock_offset_s - 900) < 1    # beyond +-5 min: untouched


def test_no_time_sync_while_the_gateway_clock_is_untrusted():
    m = SimMeter("000000000971", clock_offset_s=40, faults=Faults(latency_s=0.005))
    line, worker, poller, col = start_line(
        [m], baudrate=115200, clock_trusted=False,
        specs_kw={"interval_s": 3600, "instant_interval_s": 0, "clock_interval_s": 3600})
    try:
        _wait(lambda: poller.health[m.address].drift_s is not None)
        _wait(lambda: col.readings)
    finally:
        stop(line, worker)
    assert abs(m.clock_offset_s - 40) < 1
    assert not any(e["type"] == "meter.time_synced" for e in col.events)
    assert all(r.quality == "clock_untrusted" for r in col.readings)


def test_port_errors_are_one_line():
    w = PortWorker("rs485-9", "/dev/does-not-exist")
    with pytest.raises(PortError) as err:
        w.open()
    assert str(err.value) == "port rs485-9: /dev/does-not-exist does not exist"
    line = SimLine([], baudrate=9600)
    try:
        first = serial.Serial(line.device, 9600, exclusive=True)
        w2 = PortWorker("rs485-1", line.device)
        with pytest.raises(PortError, match="in use by another process"):
            w2.open()
        first.close()
    finally:
        line.stop()


def test_modbus_meters_through_pymodbus_server_report_what_they_said():
    from gateway.sim.modbus import ModbusSimLine, ModbusSimMeter
    meters = [ModbusSimMeter(1, "eastron-sdm120", faults=Faults(latency_s=0.005)),
              ModbusSimMeter(2, "chint-ddsu666", faults=Faults(latency_s=0.005)),
              ModbusSimMeter(3, "eastron-sdm120", faults=Faults(silent=True))]
    line = ModbusSimLine(meters, baudrate=38400)
    line.start()
    col = Collector()
    specs = [MeterSpec("mb%d" % m.unit, "p", protocol="modbus", unit=m.unit,
                       profile=m.profile.name, interval_s=3600, instant_interval_s=3600)
             for m in meters]
    poller = LinePoller(specs, col.sink, col.event, offline_after=1)
    worker = PortWorker("p", line.device, baudrate=38400, poll_source=poller)
    worker.start()
    try:
        _wait(lambda: {"mb1", "mb2"} <= {r.meter for r in col.readings
                                          if r.quantity == "frequency"}
              and any(e["type"] == "meter.offline" for e in col.events))
    finally:
        worker.stop()
        line.stop()
    seen = {(r.meter, r.quantity) for r in col.readings}
    for meter in ("mb1", "mb2"):
        for q in ("energy.import.total", "voltage.a", "current.a", "power.active",
                  "frequency", "power.factor"):
            assert (meter, q) in seen
    assert ("mb2", "power.reactive") in seen
    for r in col.readings:
        m = meters[int(r.meter[2:]) - 1]
        want = truth_value(m, r.quantity, r.gw_ts / 1000.0 + 0.001)
        assert want == r.value, r
    assert [e["meter"] for e in col.events if e["type"] == "meter.offline"] == ["mb3"]


# ---------------------------------------------------------------- issue 14: field-true lines

def _on_worker(worker, fn, timeout=20):
    box = {}
    worker.submit_job(lambda w: box.update(value=fn(w))).result(timeout)
    return box["value"]


def test_a_long_answer_is_read_through_its_follow_up_frames():
    from gateway.line.reads import read_now
    # the meter sends at most 8 data bytes a frame: 0xB1, then 0x12 SEQ 1 (0xB2), SEQ 2 (0x92)
    m = SimMeter("000000000981", max_payload=8, faults=Faults(latency_s=0.005))
    line = SimLine([m], baudrate=115200)
    line.start()
    worker = PortWorker("p", line.device, baudrate=115200)
    worker.start()
    spec = MeterSpec(m.address, "p", address=m.address)
    try:
        values, errors = _on_worker(worker, lambda w: read_now(w, spec, ["energy"]))
    finally:
        stop(line, worker)
    assert errors == []
    got = {v.quantity: v.value for v in values}
    _, di, truth = m.truth[-1]
    assert di == 0x0001FF00
    assert got == {v.quantity: v.value for v in truth}
    assert set(got) == {"energy.import.total", "energy.import.t1", "energy.import.t2",
                        "energy.import.t3", "energy.import.t4"}
    assert worker.line_stats()["requests"] == 3           # the read and two follow-ups


def test_scan_reads_the_real_address_of_a_meter_that_answers_with_the_wildcard():
    from gateway.line import dlt645 as driver
    m = SimMeter("000000000982", echo_wildcard=True, faults=Faults(latency_s=0.005))
    line = SimLine([m], baudrate=115200)
    line.start()
    worker = PortWorker("p", line.device, baudrate=115200, retries=0)
    worker.start()
    try:
        found = _on_worker(worker, lambda w: driver.scan(w))
    finally:
        stop(line, worker)
    assert found == [{"address": "000000000982", "version": 2007}]


def test_1997_and_2007_meters_at_their_own_baud_rates_share_one_line():
    from gateway.line.reads import read_now
    new = SimMeter("000000000983", faults=Faults(latency_s=0.005))             # line's 2400
    old = SimMeter("000000000984", version=1997, baudrate=1200,
                   faults=Faults(latency_s=0.005))
    line = SimLine([new, old], baudrate=2400)
    line.start()
    worker = PortWorker("p", line.device, baudrate=2400, retries=0)
    worker.start()
    spec_new = MeterSpec("new", "p", address=new.address)
    spec_old = MeterSpec("old", "p", address=old.address, version=1997, baudrate=1200)
    at_port_rate = MeterSpec("old", "p", address=old.address, version=1997)
    try:
        for _ in range(2):                          # the line switches both ways, twice
            v_new, e_new = _on_worker(worker, lambda w: read_now(w, spec_new, ["energy"]))
            v_old, e_old = _on_worker(worker, lambda w: read_now(w, spec_old, ["energy"]))
            assert not e_new and not e_old, (e_new, e_old)
            assert {v.quantity for v in v_new} >= {"energy.import.total", "energy.import.t4"}
            assert {v.quantity for v in v_old} >= {"energy.import.total", "energy.import.t4"}
        # at the port's 2400 baud the 1997 meter hears garbled bytes and stays silent
        v, e = _on_worker(worker, lambda w: read_now(w, at_port_rate, ["energy"]))
        assert v == [] and "no answer" in e[0]
    finally:
        stop(line, worker)
    assert worker.line_stats()["line_switches"] == 4
    assert line.stats["baud_mismatch"] >= 1


def test_modbus_scan_names_the_profile_each_unit_matches():
    from gateway.line import modbus as driver
    from gateway.sim.modbus import ModbusSimLine, ModbusSimMeter
    meters = [ModbusSimMeter(1, "chint-ddsu666", faults=Faults(latency_s=0.005)),
              ModbusSimMeter(2, "eastron-sdm120", faults=Faults(latency_s=0.005)),
              ModbusSimMeter(3, "chint-ddsu666", faults=Faults(silent=True))]
    line = ModbusSimLine(meters, baudrate=38400)
    line.start()
    worker = PortWorker("p", line.device, baudrate=38400, retries=0)
    worker.start()
    try:
        found = _on_worker(worker, lambda w: driver.scan(w, first=1, last=4), timeout=60)
    finally:
        worker.stop()
        line.stop()
    assert found == [{"unit": 1, "profile": "chint-ddsu666"},
                     {"unit": 2, "profile": "eastron-sdm120"}]


# ---------------------------------------------------------------- catch-up (补抄)

ENERGY_ONLY = {"instant_interval_s": 0, "clock_interval_s": 0}


def _energy_answers(meter):
    """Times the simulated meter answered an energy read."""
    return [t for t, di, values in list(meter.truth)
            if values and any(v.quantity == "energy.import.total" for v in values)]


def _slot_start(interval):
    """Wait until just after a multiple of `interval` (slots are aligned to the clock)."""
    now = time.time()
    time.sleep(aligned(now, interval) - now + 0.05)


def test_a_meter_that_fails_its_slot_is_caught_up_later_in_the_interval():
    interval = 6
    meters = make_meters(4, first_address=1400, faults=Faults(latency_s=0.005))
    flaky = meters[1]
    flaky.faults.silent = True                 # silent through its slot's three attempts
    _slot_start(interval)
    line, worker, poller, col = start_line(
        meters, baudrate=9600, specs_kw=dict(ENERGY_ONLY, interval_s=interval),
        poller_kw={"catch_up_s": 0.3})
    slot_end = aligned(time.time(), interval)
    try:
        _wait(lambda: flaky.requests >= 3)
        flaky.faults.silent = False            # back a moment later, within the interval
        _wait(lambda: poller.health[flaky.address].slots >= 1 and
              all(poller.health[m.address].slots >= 1 for m in meters), timeout=interval)
    finally:
        stop(line, worker)
    h = poller.health[flaky.address]
    assert (h.slots, h.missed_slots, h.caught_up) == (1, 0, 1)
    got = [r for r in col.readings if r.meter == flaky.address
           and r.quantity == "energy.import.total"]
    assert got and got[0].gw_ts / 1000.0 < slot_end
    # after the rest of the line was served: the others answered before the catch-up
    caught = _energy_answers(flaky)[0]
    assert all(_energy_answers(m)[0] < caught for m in meters if m is not flaky)
    status = poller.status()[flaky.address]
    assert status["missed_slots"] == 0 and status["caught_up"] == 1
    assert all(poller.status()[m.address]["missed_slots"] == 0 for m in meters)


def test_a_slot_is_missed_only_when_its_catch_ups_fail_and_it_is_counted():
    interval = 4
    meters = make_meters(3, first_address=1500, faults=Faults(latency_s=0.005))
    dead = meters[2]
    dead.faults.silent = True
    _slot_start(interval)
    line, worker, poller, col = start_line(
        meters, baudrate=9600, specs_kw=dict(ENERGY_ONLY, interval_s=interval),
        offline_after=10, poller_kw={"catch_up_s": 0.4})
    try:
        _wait(lambda: poller.health[dead.address].slots >= 1, timeout=2 * interval)
    finally:
        stop(line, worker)
    h = poller.health[dead.address]
    assert h.missed_slots == 1 and h.caught_up == 0
    assert 1 <= h.catch_ups <= 3                  # 0.4, 0.8, 1.6 s pauses fit in 4 s
    assert poller.status()[dead.address]["missed_slots"] == 1
    assert h.reads == 1 + h.catch_ups
    for m in meters[:2]:
        assert poller.health[m.address].missed_slots == 0


class _ScriptedLine:
    """The worker side of a poll job with an injected clock: each transaction takes
    `cost` seconds and is answered or not as `answers` says (the driver and poller are the
    real ones; the timing rules are tested in milliseconds)."""

    def __init__(self, clock, answers, cost=2.5):
        self.clock, self.answers, self.cost = clock, list(answers), cost
        self.times = []

    def transact(self, exchange):
        from gateway.line.port import Result
        self.times.append(self.clock[0])
        self.clock[0] += self.cost
        if self.answers.pop(0):
            ans = D.read_response("000000001800", 0x00010000, bytes(4))
            return Result(True, D.decode(D.parse_frame(ans)), None, 1, self.cost,
                          (exchange.frame, ans))
        return Result(False, None, "no answer after 3 attempts", 3, self.cost,
                      code=TxError.NO_ANSWER)


def _run_due(poller, line, clock, until):
    """Runs the poller's jobs as a worker would, the clock jumping to each due time."""
    while clock[0] < until:
        job = poller.next_job(line)
        if callable(job):
            job(line)
        else:
            clock[0] += max(job, 0.001)


def _scripted(answers, offline_after=100, catch_up_s=2.0):
    """A poller of one meter (energy every 60 s) on a scripted line, the clock just after a
    slot boundary: (clock, poller, line, collector, spec)."""
    clock = [6000.0 + 0.5]
    col = Collector()
    spec = MeterSpec("000000001800", "p", address="000000001800", interval_s=60,
                     **ENERGY_ONLY)
    poller = LinePoller([spec], col.sink, col.event, wall=lambda: clock[0],
                        offline_after=offline_after, catch_up_s=catch_up_s)
    return clock, poller, _ScriptedLine(clock, answers, cost=2.5), col, spec


def test_catch_ups_wait_growing_pauses_and_stop_at_the_slot_end():
    clock, poller, line, col, spec = _scripted([False] * 20)
    _run_due(poller, line, clock, 6060.0)
    # the slot's run, then catch-ups after pauses of 2, 4, 8, 16 s (each counted from the
    # end of the failed run); the next (32 s) would end after the slot: missed
    starts = [t - 6000.0 for t in line.times]
    assert starts == [0.5, 5.0, 11.5, 22.0, 40.5]
    h = poller.health[spec.id]
    assert (h.slots, h.missed_slots, h.caught_up, h.catch_ups) == (1, 1, 0, 4)


def test_catch_up_that_answers_saves_the_slot_and_is_not_a_miss():
    clock, poller, line, col, spec = _scripted([False, False, True, True])
    _run_due(poller, line, clock, 6119.0)            # this slot and the next
    h = poller.health[spec.id]
    assert (h.slots, h.missed_slots, h.caught_up, h.catch_ups) == (2, 0, 1, 2)
    assert [r.quantity for r in col.readings].count("energy.import.total") == 2


def test_catch_up_is_off_with_zero_and_a_failed_slot_is_missed_at_once():
    clock, poller, line, col, spec = _scripted([False, True], catch_up_s=0)
    _run_due(poller, line, clock, 6059.0)
    assert len(line.times) == 1
    assert poller.health[spec.id].missed_slots == 1


def test_an_offline_meter_gets_no_catch_up():
    clock, poller, line, col, spec = _scripted([False] * 5, offline_after=1)
    _run_due(poller, line, clock, 6059.0)
    assert len(line.times) == 1 and not poller.health[spec.id].online
    assert poller.health[spec.id].missed_slots == 1


def test_catch_ups_do_not_delay_a_relay_command():
    interval = 6
    meters = make_meters(2, first_address=1600, faults=Faults(latency_s=0.005))
    dead = meters[0]
    dead.faults.silent = True
    line, worker, poller, col = start_line(
        meters, baudrate=9600, specs_kw=dict(ENERGY_ONLY, interval_s=interval),
        offline_after=20, poller_kw={"catch_up_s": 0.05})
    try:
        _wait(lambda: poller.health[dead.address].catch_ups >= 1)
        req = D.read_exchange(meters[1].address, 0x00010000).for_meter(meters[1].address)
        t0 = time.time()
        result = worker.submit(req, priority=RELAY).result(5)
        waited = time.time() - t0
    finally:
        stop(line, worker)
    assert result.ok
    # at most the transaction on the line when it was queued (3 attempts at a silent
    # meter: 0.5 + 2 x 1.0 s budgets at worst), never a whole catch-up round
    assert waited < 3.0


def test_collection_under_heavy_noise_keeps_every_slot():
    """Issue 14: 20% corrupted and 5% dropped answers. Without catch-up a meter that fails
    its three attempts misses its slot (about 1.5% of slots); with it, none is missed."""
    interval = 3
    meters = make_meters(16, first_address=1700,
                         faults=Faults(latency_s=0.005, corrupt_rate=0.2, drop_rate=0.05))
    _slot_start(interval)
    line, worker, poller, col = start_line(
        meters, baudrate=19200, specs_kw=dict(ENERGY_ONLY, interval_s=interval),
        offline_after=5, poller_kw={"catch_up_s": 0.2}, seed=14)
    try:
        _wait(lambda: sum(h.slots for h in poller.health.values()) >= 16 * 6,
              timeout=interval * 10)
    finally:
        stop(line, worker)
    slots = sum(h.slots for h in poller.health.values())
    missed = sum(h.missed_slots for h in poller.health.values())
    assert missed == 0 and slots >= 96, poller.status()
    assert sum(h.caught_up for h in poller.health.values()) >= 1   # the noise did bite
    # each meter's readings: one energy reading in every slot that ended
    for m in meters:
        h = poller.health[m.address]
        got = {int(r.gw_ts / 1000 // interval) for r in col.readings
               if r.meter == m.address and r.quantity == "energy.import.total"}
        assert len(got) >= h.slots
    assert line.stats["requests"] > sum(h.reads for h in poller.health.values())  # retries


# ---------------------------------------------------------------- Modbus read function (03/04)

def _modbus_line(meters, baudrate=38400):
    from gateway.sim.modbus import ModbusSimLine
    line = ModbusSimLine(meters, baudrate=baudrate)
    line.start()
    worker = PortWorker("p", line.device, baudrate=baudrate, retries=0)
    worker.start()
    return line, worker


def _ddsu(unit, functions):
    from gateway.sim.modbus import ModbusSimMeter
    return ModbusSimMeter(unit, "chint-ddsu666", functions=functions,
                          faults=Faults(latency_s=0.005))


def _ddsu_spec(unit, **kw):
    return MeterSpec("mb%d" % unit, "p", protocol="modbus", unit=unit,
                     profile="chint-ddsu666", interval_s=3600, instant_interval_s=3600, **kw)


def test_a_meter_refusing_function_04_is_read_with_03_once_and_it_is_said(caplog):
    from gateway.line.reads import read_now
    meter = _ddsu(1, functions=(3,))              # answers holding registers only
    spec = _ddsu_spec(1)
    line, worker = _modbus_line([meter])
    try:
        with caplog.at_level("WARNING", logger="gateway.line.modbus"):
            values, errors = _on_worker(worker, lambda w: read_now(w, spec))
        before = meter.requests
        values2, errors2 = _on_worker(worker, lambda w: read_now(w, spec))
        second = meter.requests - before
    finally:
        worker.stop()
        line.stop()
    assert not errors and not errors2, (errors, errors2)
    assert {v.quantity for v in values} >= {"energy.import.total", "voltage.a", "frequency"}
    assert spec.function_code == 3
    # the fallback costs one extra request once; afterwards each block is one request
    assert second == 2
    said = [r.getMessage() for r in caplog.records]
    assert any("refuses function 04" in m and "function_code = 3" in m for m in said), said


def test_configured_function_code_is_used_without_a_fallback():
    from gateway.line.reads import read_now
    meter = _ddsu(2, functions=(3,))
    spec = _ddsu_spec(2, function_code=3)
    line, worker = _modbus_line([meter])
    try:
        values, errors = _on_worker(worker, lambda w: read_now(w, spec))
    finally:
        worker.stop()
        line.stop()
    assert not errors and values
    assert meter.requests == 2 and not spec.function_tried     # energy + instant blocks


def test_a_meter_refusing_both_functions_is_not_asked_again_and_again():
    from gateway.line.reads import read_now
    meter = _ddsu(3, functions=())
    spec = _ddsu_spec(3)
    line, worker = _modbus_line([meter])
    try:
        values, errors = _on_worker(worker, lambda w: read_now(w, spec))
        before = meter.requests
        _on_worker(worker, lambda w: read_now(w, spec))
        second = meter.requests - before
    finally:
        worker.stop()
        line.stop()
    assert values == [] and errors and all("illegal_function" in e for e in errors)
    assert spec.function_code is None and spec.function_tried
    assert second == 2                               # no second fallback


def test_polled_meter_reports_the_function_that_worked_in_its_status():
    meter = _ddsu(4, functions=(3,))
    spec = _ddsu_spec(4)
    line, worker = _modbus_line([meter])
    col = Collector()
    poller = LinePoller([spec], col.sink, col.event)
    worker.poll_source = poller
    try:
        _wait(lambda: {"energy.import.total", "voltage.a"} <= {r.quantity
                                                               for r in col.readings})
    finally:
        worker.stop()
        line.stop()
    assert poller.status()["mb4"]["function_code"] == 3
    assert poller.health["mb4"].missed_slots == 0


def test_modbus_scan_finds_a_ddsu666_that_reads_with_03_and_suggests_it():
    from gateway.line import modbus as driver
    meters = [_ddsu(1, functions=(3,)), _ddsu(2, functions=(4,))]
    line, worker = _modbus_line(meters)
    try:
        found = _on_worker(worker, lambda w: driver.scan(w, first=1, last=3), timeout=60)
    finally:
        worker.stop()
        line.stop()
    assert found == [{"unit": 1, "profile": "chint-ddsu666", "function_code": 3},
                     {"unit": 2, "profile": "chint-ddsu666"}]
    assert driver.toml_lines(found[0]) == ["unit = 1", 'profile = "chint-ddsu666"',
                                           "function_code = 3"]
    assert driver.toml_lines(found[1]) == ["unit = 2", 'profile = "chint-ddsu666"']


def test_function_code_in_the_configuration():
    from gateway.config import ConfigError
    from gateway.service.config import validate
    base = {"gateway": {"id": "g"}, "ports": [{"name": "p", "device": "/dev/null"}]}
    meter = {"id": "u1", "port": "p", "protocol": "modbus", "unit": 1,
             "profile": "chint-ddsu666"}
    cfg = validate(dict(base, meters=[dict(meter, function_code=3)]))
    assert cfg.meters[0].function_code == 3
    assert MeterSpec.from_config(cfg.meters[0]).function_code == 3
    assert validate(dict(base, meters=[meter])).meters[0].function_code is None
    with pytest.raises(ConfigError, match="function_code"):
        validate(dict(base, meters=[dict(meter, function_code=6)]))
    assert validate(base).ports[0].catch_up_s == 1.0
