"""DL/T 698.45 end to end with real processes: Mosquitto, `mgw run` and `mgw command sign`,
on one pseudo-terminal RS-485 line that carries DL/T 645 and DL/T 698.45 simulated meters
(the simulated line runs in this test's process, so the test can see what the meters said
and did): the same quantity names on MQTT for both protocols, a signed cut-off and restore
on a 698 test meter read back as done, a relay command without the master station's
SECURITY-Request refused for a real (secured) 698 meter and one with it forwarded byte for
byte, the head-end's sync_time on a 698 meter, the missed daily freezes of a 698
meter backfilled after the gateway was away, and a real-frame replay: the captured frames
of ../shared/vectors/dlt698-captures.json on the line before the meter's answers."""

import datetime as dt
import json
import os
import pathlib
import signal
from decimal import Decimal

import pytest

from gateway.sim.dlt645 import Faults, SimLine, SimMeter
from gateway.sim.dlt698 import SimMeter698
from gateway.store import paths
from gateway.store.state import StateStore
from protocols import dlt698 as D
from mqtt_helpers import HeadEnd, unique_seqs
from tests.test_e2e import keys, mgw, sign

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = pathlib.Path(os.environ.get("MGW_SHARED", ROOT.parent / "shared")) / "vectors" / \
    "dlt698-captures.json"
BAUD = 19200
NAMES = ("energy.import.total", "energy.import.t1", "voltage.a", "guarantee.state",
         "current.a", "power.active", "relay.state")


def write_config(tmp_path, device, broker, pub, meters, baudrate=BAUD):
    lines = ['[gateway]', 'id = "gw-test"', 'data_dir = "%s"' % (tmp_path / "data"),
             'status_interval_s = 1', '',
             '[[ports]]', 'name = "rs485-1"', 'device = "%s"' % device,
             'baudrate = %d' % baudrate, '']
    for mid, address, extra in meters:
        keys = dict(interval_s="10", instant_interval_s="10", clock_interval_s="0")
        keys.update(line.split(" = ", 1) for line in extra)
        lines += ['[[meters]]', 'id = "%s"' % mid, 'port = "rs485-1"',
                  'address = "%s"' % address] + ["%s = %s" % kv for kv in keys.items()] + ['']
    lines += ['[uplink]', 'host = "%s"' % broker.host, 'port = %d' % broker.port,
              'batch_age_s = 0.2', '',
              '[control]', 'public_keys = ["%s"]' % pub, 'require_synced_clock = false', '']
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("\n".join(lines))
    return str(cfg)


def said(meter):
    """Every value a simulated meter sent, by quantity."""
    out = {}
    for _t, _key, values in list(meter.truth):
        for v in values:
            if isinstance(v.value, Decimal):
                out.setdefault(v.quantity, set()).add(v.value)
    return out


def latest(head, meter, quantity):
    rs = [r for r in head.readings() if r["meter"] == meter and r["q"] == quantity]
    return rs[-1] if rs else None


def result(head, cid):
    rs = [r for r in head.topic("command-results") if r.get("id") == cid
          and r["status"] in ("done", "failed", "rejected")]
    return rs[-1] if rs else None


def stop(gw):
    gw.send_signal(signal.SIGTERM)
    gw.wait(15)
    err = gw.stderr.read()
    assert gw.returncode == 0 and "Traceback" not in err, err[-2000:]


def test_a_mixed_line_end_to_end(tmp_path, broker):
    if dt.datetime.now().time() < dt.time(0, 7):
        pytest.skip("today's freeze is not due before 00:05 (and the test takes a minute)")
    priv, pub = keys(tmp_path)
    f = Faults(latency_s=0.005)
    m645 = [SimMeter("000000000001", faults=f), SimMeter("000000000002", faults=f)]
    test_meter = SimMeter698("000000000003", plaintext_relay=True, prepaid=True, faults=f)
    secured = SimMeter698("000000000004", plaintext_relay=False, faults=f, clock_offset_s=40)
    line = SimLine(m645 + [test_meter, secured], baudrate=BAUD)
    line.start()
    cfg = write_config(tmp_path, line.device, broker, pub, [
        ("m1", "000000000001", ()), ("m2", "000000000002", ()),
        ("m3", "000000000003", ('protocol = "dlt698"', "relay_plaintext = true",
                                "prepaid = true", "clock_interval_s = 3600")),
        ("m4", "000000000004", ('protocol = "dlt698"',))])
    head = HeadEnd(broker)
    gw = None
    try:
        gw = mgw("run", "--config", cfg)
        # the same quantity names from both protocols, one line
        head.wait(lambda: all(latest(head, m, q) for m in ("m1", "m2", "m3", "m4")
                              for q in NAMES), timeout=60)
        for q in NAMES:
            units = {latest(head, m, q)["unit"] for m in ("m1", "m3", "m4")}
            assert len(units) == 1, (q, units)
        assert latest(head, "m3", "balance.remaining")["unit"] == "CNY"
        # exactly what the 698 meters said
        for mid, meter in (("m3", test_meter), ("m4", secured)):
            truth = said(meter)
            for q in ("energy.import.total", "voltage.a", "current.a", "power.active"):
                got = Decimal(str(latest(head, mid, q)["value"]))
                assert got in truth[q], (mid, q, got)
        # today's day freeze of the 698 meter is read at start, stamped with its freeze time
        head.wait(lambda: latest(head, "m3", "freeze.daily.energy.import.total"), timeout=30)
        today = dt.date.today()
        first = latest(head, "m3", "freeze.daily.energy.import.total")
        assert dt.datetime.fromisoformat(first["ts"]).date() == today
        assert first["quality"] == "good"

        # a signed cut-off and restore on the 698 test meter, read back as done, and the
        # protection (保电, 8001) on and off
        for action, key, state in (("cut_off", "relay", "open"), ("restore", "relay", "closed"),
                                   ("guarantee_on", "guarantee", True),
                                   ("guarantee_off", "guarantee", False)):
            cmd = sign(priv, "m3", action)
            head.publish("commands", cmd)
            cid = json.loads(cmd)["id"]
            head.wait(lambda: result(head, cid), timeout=30)
            res = result(head, cid)
            assert res["status"] == "done" and res[key] == state, res
            assert test_meter.relay_open is False or action == "cut_off"
            assert test_meter.guarantee is (action == "guarantee_on")
        assert [(s, c) for _, s, c in test_meter.relay_log] == [("open", "TRIP"),
                                                               ("closed", "CLOSE_ALLOWED")]
        # a real 698 meter takes relay control only in the master station's
        # SECURITY-Request: without it the command is refused and nothing is sent
        cmd = sign(priv, "m4", "cut_off")
        head.publish("commands", cmd)
        cid = json.loads(cmd)["id"]
        head.wait(lambda: result(head, cid), timeout=30)
        res = result(head, cid)
        assert res["status"] == "rejected" and "SECURITY-Request" in res["reason"], res
        assert secured.security_requests == [] and not secured.relay_open
        # with the master station's SECURITY-Request in params.payload it goes through,
        # byte for byte (the simulator carries out a plaintext one: it has no ESAM)
        when = dt.datetime.now().replace(microsecond=0)
        inner = D.parse_frame(D.relay_action(secured.sa, D.RelayMethod.TRIP, when)).user_data
        payload = D.security_request_apdu(inner, sid=(0x107, b"\x01"), mac=b"\x5A\xA5\x3C\xC3")
        cmd = sign(priv, "m4", "cut_off", "payload=" + payload.hex())
        head.publish("commands", cmd)
        cid = json.loads(cmd)["id"]
        head.wait(lambda: result(head, cid), timeout=30)
        res = result(head, cid)
        assert res["status"] == "done" and res["relay"] == "open", res
        assert secured.security_requests == [payload] and secured.relay_open
        # the head-end's sync_time reaches a 698 meter with its protocol's broadcast
        cmd = sign(priv, "m4", "sync_time")
        head.publish("commands", cmd)
        cid = json.loads(cmd)["id"]
        head.wait(lambda: result(head, cid), timeout=30)
        res = result(head, cid)
        if res.get("code") != "near_the_hour":          # refused within minutes of the hour
            assert res["status"] == "done", res
            head.wait(lambda: abs(secured.clock_offset_s) < 3, timeout=10)
        stop(gw)

        # the gateway was away: its saved freeze progress says four days ago
        state = StateStore(paths.path(str(tmp_path / "data"), paths.STATE))
        doc = state.get("meters", "all")
        assert doc["last_freeze_day"]["m3"] == today.isoformat()
        doc["last_freeze_day"]["m3"] = (today - dt.timedelta(days=4)).isoformat()
        state.put("meters", "all", doc)
        state.close()
        seen = len(unique_seqs(head.readings()))
        gw = mgw("run", "--config", cfg)

        def backfilled():
            return {dt.datetime.fromisoformat(r["ts"]).date(): r for r in head.readings()
                    if r["meter"] == "m3" and r["q"] == "freeze.daily.energy.import.total"
                    and r["quality"] == "backfilled"}
        missed = [today - dt.timedelta(days=k) for k in (3, 2, 1)]
        head.wait(lambda: set(missed) <= set(backfilled()), timeout=60)
        frozen = {stamp.date(): block[0] for stamp, block in test_meter._freezes}
        for day, r in backfilled().items():
            assert Decimal(str(r["value"])) == frozen[day], day
            assert dt.datetime.fromisoformat(r["ts"]).replace(tzinfo=None) == \
                dt.datetime.combine(day, dt.time())        # the record's own freeze time
        stop(gw)
        gw = None
        seqs = sorted(unique_seqs(head.readings()))
        assert len(seqs) > seen and seqs == list(range(1, seqs[-1] + 1))
    finally:
        if gw is not None and gw.poll() is None:
            gw.kill()
            gw.wait(10)
        head.close()
        line.stop()


class ReplayMeter(SimMeter698):
    """A 698 meter on a line that also carries the captured frames: before each of its
    answers, the next `per_answer` real frames of the collection (valid or not), each
    followed by some garbage."""

    def __init__(self, address, frames, per_answer=11, **kw):
        super().__init__(address, **kw)
        self.frames = frames
        self.per_answer = per_answer
        self.replayed = 0

    def handle698(self, frame, now):
        answer = super().handle698(frame, now)
        if answer is None:
            return None
        out = b""
        for _ in range(self.per_answer):
            out += self.frames[self.replayed % len(self.frames)] + b"\x00\xFE\x68\x16"
            self.replayed += 1
        return out + answer


def test_real_frames_on_the_line_do_not_disturb_the_readings(tmp_path, broker):
    if not VECTORS.exists():
        pytest.skip("shared vectors not found at %s" % VECTORS)
    entries = json.loads(VECTORS.read_text(encoding="utf-8"))
    frames = [bytes.fromhex(e["hex"]) for e in entries]
    valid = sum(1 for e in entries if e["expect"].get("valid_fcs"))
    assert len(frames) == 55 and 0 < valid < 55
    priv, pub = keys(tmp_path)
    f = Faults(latency_s=0.005)
    replay = ReplayMeter("000000000007", frames, prepaid=True, faults=f)
    m645 = SimMeter("000000000006", faults=f)
    line = SimLine([m645, replay], baudrate=115200)
    line.start()
    cfg = write_config(tmp_path, line.device, broker, pub, [
        ("m6", "000000000006", ()), ("m7", "000000000007", ('protocol = "dlt698"',))],
        baudrate=115200)
    head = HeadEnd(broker)
    gw = mgw("run", "--config", cfg)
    try:
        # every captured frame went over the line before an answer of the meter
        head.wait(lambda: replay.replayed >= len(frames), timeout=60)
        n = len(head.readings())
        head.wait(lambda: len({r["q"] for r in head.readings()[n:] if r["meter"] == "m7"})
                  >= 8, timeout=30)                       # and the readings go on
        truth = said(replay)
        got = [r for r in head.readings() if r["meter"] == "m7"]
        assert {r["q"] for r in got} >= set(NAMES)
        for r in got:
            if r["q"] in truth:
                assert Decimal(str(r["value"])) in truth[r["q"]], r
        assert {r["q"] for r in head.readings() if r["meter"] == "m6"} >= set(NAMES)
        # the captured answers were found and set aside as foreign, the broken ones counted
        # (the service writes its status every second: wait for the one after the replay)

        def port():
            st = mgw("status", "--config", cfg, "--json")
            out, err = st.communicate(timeout=30)
            assert st.returncode == 0, err
            return json.loads(out)
        head.wait(lambda: port()["ports"][0]["foreign_frames"] >= valid, timeout=20)
        out = port()
        assert out["ports"][0]["checksum_errors"] > 0, out["ports"]
        status = {m["id"]: m for m in out["meters"]}
        assert status["m7"]["online"] and status["m6"]["online"], status
        stop(gw)
    finally:
        if gw.poll() is None:
            gw.kill()
            gw.wait(10)
        head.close()
        line.stop()
