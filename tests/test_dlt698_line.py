"""DL/T 698.45 meters on a real (pseudo-terminal) line with the real port worker and poller,
mixed with DL/T 645 meters: the same quantity names, what the meters said, read_now, the
wildcard scan, the clock and the day-freeze backfill."""

import datetime as dt

from gateway.line import dlt698 as drv
from gateway.line.poller import LinePoller, MeterSpec
from gateway.line.port import PortWorker
from gateway.sim.dlt645 import SimLine, SimMeter
from gateway.sim.dlt698 import SimMeter698
from gateway.store.journal import BACKFILLED
from tests.test_polling import Collector, _wait


def _line(meters, specs, **poller_kw):
    line = SimLine(meters, baudrate=9600)
    line.start()
    col = Collector()
    poller = LinePoller(specs, col.sink, col.event, **poller_kw)
    worker = PortWorker("p", line.device, baudrate=9600, poll_source=poller)
    worker.start()
    return line, worker, poller, col


def _spec(m, **kw):
    return MeterSpec("m" + m.address[-3:], "p", protocol=m.protocol, address=m.address,
                     **kw)


def test_mixed_line_polls_both_protocols_with_the_same_names():
    m645 = SimMeter("000000000101", prepaid=True)
    m698 = [SimMeter698("000000000201", prepaid=True), SimMeter698("000000000202",
                                                                   prepaid=False)]
    specs = [_spec(m, prepaid=m.prepaid, clock_interval_s=0) for m in [m645] + m698]
    line, worker, poller, col = _line([m645] + m698, specs)
    try:
        def have_all():
            got = {(r.meter, r.quantity) for r in col.readings}
            return all((s.id, q) in got for s in specs
                       for q in ("energy.import.total", "voltage.a", "current.a",
                                 "power.active"))
        _wait(have_all, 20)
    finally:
        worker.stop()
        line.stop()
    by = {}
    for r in col.readings:
        by.setdefault(r.meter, {})[r.quantity] = r
    names645 = set(by["m101"])
    for mid in ("m201", "m202"):
        names = set(by[mid])
        assert {"energy.import.total", "energy.import.t1", "energy.import.t4",
                "energy.export.total", "voltage.a", "voltage.c", "current.a",
                "power.active", "power.factor", "frequency", "relay.state"} <= names, names
        assert {"energy.import.total", "voltage.a", "current.a", "power.active",
                "relay.state"} <= names645
    assert "balance.remaining" in by["m201"] and "balance.remaining" not in by["m202"]
    assert by["m201"]["energy.import.total"].unit == by["m101"]["energy.import.total"].unit
    assert by["m201"]["power.active"].unit == by["m101"]["power.active"].unit == "kW"
    # exactly what the 698 meter said
    meter = m698[0]
    said = {}
    for _t, _oad, values in list(meter.truth):
        for v in values:
            said.setdefault(v.quantity, []).append(v.value)
    for q in ("energy.import.total", "voltage.a", "balance.remaining"):
        assert by["m201"][q].value in said[q], q
    assert worker.scanners["dlt698"].frames >= 4 and worker.scanners["dlt645"].frames >= 2
    assert poller.health["m201"].relay == "closed"


def test_read_now_scan_and_a_meter_that_refuses_lists():
    m = SimMeter698("000000000301", prepaid=True)
    old = SimMeter698("000000000302", prepaid=False)
    old.list_ok = False
    line = SimLine([m], baudrate=9600)
    line.start()
    worker = PortWorker("p", line.device, baudrate=9600, retries=0)
    worker.open()
    try:
        spec = _spec(m, prepaid=True)
        values, errors = drv.read_now(worker, spec, ["energy", "clock", "00100201", "4001"
                                                     "0200"])
        names = {v.quantity: v.value for v in values}
        assert not errors
        assert names["energy.import.total"] > 0 and isinstance(names["meter.clock"],
                                                                dt.datetime)
        assert names["meter.address"] == "000000000301"
        values, errors = drv.read_now(worker, spec, ["EEEE0200"])
        assert values == [] and "DAR 6" in errors[0]
        found = drv.scan(worker)
        assert found == [{"address": "000000000301"}]
        line.add(old)
        values, errors = drv.read_now(worker, _spec(old), ["voltage.a", "frequency"])
        assert {v.quantity for v in values} == {"voltage.a", "frequency"} and not errors
    finally:
        worker.stop()
        line.stop()


class _OneJob:
    def __init__(self, job):
        self.job = job

    def next_job(self, worker):
        job, self.job = self.job, None
        return job if job else 1.0


def test_clock_drift_is_synced_by_broadcast_and_freezes_backfilled():
    m = SimMeter698("000000000401", clock_offset_s=40.0)
    spec = _spec(m, clock_interval_s=3600)
    line = SimLine([m], baudrate=9600)
    line.start()
    col = Collector()
    poller = LinePoller([spec], col.sink, col.event, sync_guard=lambda now: False,
                        first_poll=False)
    worker = PortWorker("p", line.device, baudrate=9600)
    worker.open()
    try:
        drv.poll(poller, worker, spec, "clock")
        assert any(e["type"] == "meter.time_synced" for e in col.events), col.events
        assert abs(m.clock_offset_s) < 3
        # the gateway was away three days: the missed freezes come back, backfilled,
        # stamped with the meter's own freeze time
        today = dt.date.today()
        poller.health[spec.id].last_freeze_day = today - dt.timedelta(days=4)
        drv.poll(poller, worker, spec, "freeze")
        frozen = [r for r in col.readings if r.quantity == "freeze.daily.energy.import.total"]
        days = sorted(dt.datetime.fromtimestamp(r.ts / 1000).date() for r in frozen)
        assert days == [today - dt.timedelta(days=k) for k in (3, 2, 1, 0)], days
        assert {r.quality for r in frozen if dt.datetime.fromtimestamp(
            r.ts / 1000).date() < today} == {BACKFILLED}
        truth = {stamp.date(): block[0] for stamp, block in m._freezes}
        for r in frozen:
            assert r.value == truth[dt.datetime.fromtimestamp(r.ts / 1000).date()]
    finally:
        worker.stop()
        line.stop()


def test_config_takes_dlt698_meters_beside_dlt645_meters_on_one_port():
    from gateway.service.config import validate
    doc = {"gateway": {"id": "gw"}, "ports": [{"name": "p", "device": "/dev/null"}],
           "meters": [{"id": "a", "port": "p", "address": "123456"},
                      {"id": "b", "port": "p", "protocol": "dlt698", "address": "123456"},
                      {"id": "c", "port": "p", "protocol": "dlt698", "address": "7",
                       "logical_address": 3}]}
    cfg = validate(doc, "gw.toml")
    b, c = cfg.meters[1], cfg.meters[2]
    assert (b.protocol, b.address, b.logical_address) == ("dlt698", "000000123456", 0)
    spec = MeterSpec.from_config(c)
    assert spec.logical == 3
    assert drv.server_address(spec).field == bytes.fromhex("26 03 07 00 00 00 00 00")
    bad = dict(doc, meters=doc["meters"] + [{"id": "d", "port": "p", "protocol": "dlt698",
                                             "address": "12AB"}])
    import pytest
    from gateway.config import ConfigError
    with pytest.raises(ConfigError, match="DL/T 698.45 address"):
        validate(bad, "gw.toml")


def test_a_freeze_due_today_is_read_at_start_by_a_trusted_clock():
    """A gateway started after today's freeze time reads (and backfills) at once, instead
    of waiting for the next midnight; not before the freeze time, not by an untrusted
    clock, not when the poller does not poll at start."""
    import time as _time
    spec = MeterSpec("m1", "p", protocol="dlt698", address="000000000001",
                     clock_interval_s=3600)
    midnight = _time.mktime(dt.date(2026, 11, 27).timetuple())

    def freeze_due(now, **kw):
        poller = LinePoller([spec], lambda r: None, lambda *a, **k: None,
                            wall=lambda: now, **kw)
        return min(due for due, _, _, task in poller._heap if task == "freeze")
    ten = midnight + 10 * 3600
    assert freeze_due(ten) == ten                                     # now
    assert freeze_due(ten, clock_trusted=lambda: False) == midnight + 86400 + 300
    assert freeze_due(ten, first_poll=False) == midnight + 86400 + 300
    assert freeze_due(midnight + 120) == midnight + 300               # not before 00:05
