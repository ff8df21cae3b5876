"""Command intake and what the uplink publishes for hostile or broken input, against a real
Mosquitto broker: manual acknowledgement, back-pressure, response topics, rows that cannot
be published, and the journal id in every payload."""

import queue
import threading
import time
import types
from decimal import Decimal

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.service.config import validate
from gateway.store.journal import Journal, Reading
from gateway.uplink import mqtt as uplink_mod
from gateway.uplink.mqtt import Command, Uplink, record_payload, valid_topic
from mqtt_helpers import HeadEnd, unique_seqs


def uplink_cfg(broker, **over):
    doc = {"gateway": {"id": "gw-test"}, "uplink": dict(host=broker.host, port=broker.port,
                                                        batch_age_s=0.1, **over)}
    return validate(doc).uplink


def readings(n, start=0, meter=None):
    now = int(time.time() * 1000)
    return [Reading(meter or "m%d" % (i % 5), "energy.import.total",
                    Decimal(start + i).scaleb(-2), "kWh", now, now) for i in range(n)]


def wait(cond, timeout=20, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("%s not met within %ss" % (what, timeout))


def started(up):
    up.start()
    wait(lambda: up.state["connected"], what="uplink connected")
    time.sleep(0.2)                     # the subscription is in place
    return up


def drain(q, seconds):
    """Commands that arrive in the queue within `seconds`."""
    out = []
    end = time.time() + seconds
    while time.time() < end:
        try:
            out.append(q.get(timeout=0.05))
        except queue.Empty:
            pass
    return out


# ---------------------------------------------------------------- durable intake

def test_command_is_not_acknowledged_before_done_so_a_crash_gets_it_redelivered(tmp_path,
                                                                                broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = started(Uplink(uplink_cfg(broker), "gw-test", j))
    try:
        head.publish("commands", b'{"v":1,"id":"c-durable"}')
        cmd = up.commands.get(timeout=10)
        assert cmd.payload == b'{"v":1,"id":"c-durable"}'
    finally:
        up.stop()                       # the executor never said done: as if it crashed
    up = started(Uplink(uplink_cfg(broker), "gw-test", j))
    try:
        again = up.commands.get(timeout=10)
        assert again.payload == b'{"v":1,"id":"c-durable"}'
        again.done()                    # durable now: PUBACK
        wait(lambda: up.state["commands_acked"] == 1, what="PUBACK sent")
    finally:
        up.stop()
    up = started(Uplink(uplink_cfg(broker), "gw-test", j))
    try:
        assert drain(up.commands, 1.5) == []     # acknowledged: not delivered a third time
    finally:
        up.stop()
        head.close()


def test_done_is_idempotent_thread_safe_and_optional():
    calls = []
    cmd = Command(b"{}", ack=lambda: calls.append(1))
    threads = [threading.Thread(target=lambda: [cmd.done() for _ in range(200)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    Command(b"{}").done()               # no ack (tests, QoS 0): nothing to do
    c = Command(b"x", "t/r", b"\x01")
    assert (c.payload, c.response_topic, c.correlation_data) == (b"x", "t/r", b"\x01")


def test_ack_for_an_older_connection_is_dropped(tmp_path):
    j = Journal(str(tmp_path / "j.db"))
    cfg = validate({"gateway": {"id": "gw-test"},
                    "uplink": {"host": "127.0.0.1"}}).uplink
    up = Uplink(cfg, "gw-test", j)
    sent = []
    client = types.SimpleNamespace(ack=lambda mid, qos: sent.append((mid, qos)))
    up._gen, up._connected = 3, True
    Command(b"{}", ack=lambda: up._ack_later(2, 7, 1)).done()    # an old connection's
    Command(b"{}", ack=lambda: up._ack_later(3, 8, 1)).done()
    up._send_acks(client)
    assert sent == [(8, 1)]
    up._connected = False               # connection gone: the broker redelivers
    Command(b"{}", ack=lambda: up._ack_later(3, 9, 1)).done()
    up._send_acks(client)
    assert sent == [(8, 1)] and not up._to_ack


# ---------------------------------------------------------------- back-pressure

def test_receive_maximum_bounds_unacknowledged_commands_and_none_is_lost(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = started(Uplink(uplink_cfg(broker), "gw-test", j))
    try:
        for i in range(100):
            head.client.publish(head.root + "/commands", b'{"n":%d}' % i, qos=1)
        got = drain(up.commands, 2.0)
        # the broker holds the rest until we acknowledge
        assert len(got) == uplink_mod.RECEIVE_MAXIMUM
        seen = set()
        while len(seen) < 100:
            for cmd in got:
                seen.add(cmd.payload)
                cmd.done()
            got = drain(up.commands, 0.5)
            assert got or len(seen) == 100, "commands stopped arriving at %d" % len(seen)
        assert up.state["connects"] == 1 and up.state["queue_full"] == 0
    finally:
        up.stop()
        head.close()


def test_full_command_queue_drops_no_command_the_broker_delivers_it_again(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = started(Uplink(uplink_cfg(broker, reconnect_max_s=1.0), "gw-test", j,
                        commands=queue.Queue(maxsize=2)))
    try:
        for i in range(6):
            head.client.publish(head.root + "/commands", b'{"n":%d}' % i, qos=1)
        wait(lambda: up.state["queue_full"] >= 1, what="queue full")
        time.sleep(0.5)
        assert up.commands.qsize() == 2
        seen = set()
        end = time.time() + 40
        while len(seen) < 6 and time.time() < end:     # a slow executor
            try:
                cmd = up.commands.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.add(cmd.payload)
            cmd.done()
            time.sleep(0.1)
        assert seen == {b'{"n":%d}' % i for i in range(6)}
        assert up.state["connects"] >= 2            # reconnected to get them again
    finally:
        up.stop()
        head.close()


# ---------------------------------------------------------------- malformed input

def test_oversized_command_is_acknowledged_and_dropped(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = started(Uplink(uplink_cfg(broker), "gw-test", j))
    try:
        head.publish("commands", b"x" * (64 * 1024 + 1))
        head.publish("commands", b'{"v":1}')
        cmd = up.commands.get(timeout=10)
        assert cmd.payload == b'{"v":1}' and up.state["oversize"] == 1
        cmd.done()
        wait(lambda: up.state["commands_acked"] == 2, what="both acknowledged")
    finally:
        up.stop()
    up = started(Uplink(uplink_cfg(broker), "gw-test", j))
    try:
        assert drain(up.commands, 1.0) == []
    finally:
        up.stop()
        head.close()


def test_malformed_incoming_message_does_not_end_the_session(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = started(Uplink(uplink_cfg(broker), "gw-test", j))
    try:
        class Broken:
            qos, mid, properties = 1, 60000, None

            @property
            def payload(self):
                raise ValueError("broken")
        up._on_message(None, None, Broken())          # must not raise
        assert up.state["malformed"] == 1
        # no properties, empty payload, a wildcard and an over-long response topic
        head.publish("commands", b"")
        for rt in ("evil/#", "a" * 300, "$SYS/x"):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = rt
            props.CorrelationData = b"c" * 300
            head.publish("commands", b"{}", properties=props)
        cmds = [up.commands.get(timeout=10) for _ in range(4)]
        assert [c.payload for c in cmds] == [b"", b"{}", b"{}", b"{}"]
        assert all(c.response_topic is None and c.correlation_data is None for c in cmds)
        assert up.state["connected"] and up.state["connects"] == 1
    finally:
        up.stop()
        head.close()


def test_mqtt_311_commands_without_properties_are_handed_over(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = started(Uplink(uplink_cfg(broker, mqtt_version="3.1.1"), "gw-test", j))
    try:
        head.publish("commands", b'{"v":1}')
        cmd = up.commands.get(timeout=10)
        assert cmd.payload == b'{"v":1}' and cmd.response_topic is None
        cmd.done()
        wait(lambda: up.state["commands_acked"] == 1, what="PUBACK sent")
    finally:
        up.stop()
        head.close()


# ---------------------------------------------------------------- what is published

def test_valid_topic_for_response_topics():
    assert valid_topic("headend/replies/42") == "headend/replies/42"
    for bad in (None, "", "evil/#", "a/+/b", "a\0b", "$SYS/x", "a" * 257, "\ud800", 42,
                b"bytes/topic"):
        assert valid_topic(bad) is None, bad
    assert valid_topic("é" * 128) is not None and valid_topic("é" * 129) is None


def test_result_of_unauthenticated_input_never_goes_to_a_response_topic():
    row = types.SimpleNamespace(seq=1, ts=0, body={
        "id": None, "status": "rejected", "_response_topic": "other-gw/command-results",
        "_correlation_data": "01"})
    payload, topic, props = record_payload(row, "results")
    assert topic is None and props is None and "_response_topic" not in payload


def test_correlation_data_bounded_valid_hex_or_dropped():
    def props_of(corr):
        row = types.SimpleNamespace(seq=1, ts=0, body={
            "id": "c-1", "status": "done", "_response_topic": "r/1",
            "_correlation_data": corr})
        payload, topic, props = record_payload(row, "results")
        assert topic == "r/1"
        return getattr(props, "CorrelationData", None)
    assert props_of("0102") == b"\x01\x02"
    assert props_of("ab" * 256) == b"\xab" * 256
    assert props_of("ab" * 257) is None
    assert props_of("zz") is None
    assert props_of(7) is None


def test_result_with_wildcard_response_topic_does_not_stop_the_uplink(tmp_path, broker):
    # the stored rejection of an unsigned MQTT 5 publish with Response Topic "evil/#" used to
    # make paho raise on every attempt: the session died and nothing left the gateway again
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    head.client.subscribe("evil/#", qos=1)
    j.append_result({"id": "x", "status": "rejected", "_response_topic": "evil/#"})
    j.append_result({"id": None, "status": "rejected", "_response_topic": "evil/a"})
    j.append_result({"id": "c-2", "status": "done"})
    j.append_event("meter.offline", meter="m1", reason="test")
    j.append_readings(readings(10))
    up = Uplink(uplink_cfg(broker), "gw-test", j)
    up.start()
    try:
        head.wait(lambda: len(head.topic("command-results")) >= 3 and head.topic("events")
                  and len(unique_seqs(head.readings())) == 10)
        ids = [r["id"] for r in head.topic("command-results")]
        assert ids[:3] == ["x", None, "c-2"]
        assert up.state["connects"] == 1
        time.sleep(0.3)
        assert not [t for t, _, _, _ in head.messages if t.startswith("evil/")]
    finally:
        up.stop()
        head.close()


class Poisoned(Uplink):
    """An uplink whose client cannot publish some payloads (as paho raises on a bad one)."""

    def _new_client(self):
        client = super()._new_client()
        publish = client.publish

        def picky(topic, payload=None, *a, **kw):
            if "poison" in payload:
                raise ValueError("cannot publish this")
            return publish(topic, payload, *a, **kw)
        client.publish = picky
        return client


def test_row_that_cannot_be_published_is_skipped_and_the_stream_moves_on(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    j.append_result({"id": "r-1", "status": "done"})
    j.append_result({"id": "r-2", "status": "failed", "reason": "poison"})
    j.append_result({"id": "r-3", "status": "done"})
    j.append_readings(readings(20))
    j.append_readings(readings(1, meter="poison"))          # seq 21
    j.append_readings(readings(20, 21))
    up = Poisoned(uplink_cfg(broker, batch_max=16), "gw-test", j)
    up.start()
    try:
        head.wait(lambda: [r["id"] for r in head.topic("command-results")][-1:] == ["r-3"]
                  and len(unique_seqs(head.readings())) == 40)
        assert [r["id"] for r in head.topic("command-results")] == ["r-1", "r-3"]
        assert sorted(unique_seqs(head.readings())) == \
            [s for s in range(1, 42) if s != 21]
        assert up.state["skipped"] == 2 and up.state["connects"] == 1
        wait(lambda: j.stats()["streams"]["readings"]["consumers"]["uplink"]["pending"] == 0
             and j.stats()["streams"]["results"]["consumers"]["uplink"]["pending"] == 0,
             what="journal acknowledged past the skipped rows")
    finally:
        up.stop()
        head.close()


@pytest.mark.parametrize("jid", [None, "j-5f3a"])
def test_jid_in_readings_events_and_results_payloads(tmp_path, broker, jid):
    j = Journal(str(tmp_path / "j.db"))
    if jid is not None:
        j.jid = jid
    head = HeadEnd(broker)
    j.append_readings(readings(3))
    j.append_event("meter.online", meter="m1", reason="test")
    j.append_result({"id": "c-1", "status": "done"})
    up = Uplink(uplink_cfg(broker), "gw-test", j)
    up.start()
    try:
        head.wait(lambda: head.topic("readings") and head.topic("events")
                  and head.topic("command-results"))
        for kind in ("readings", "events", "command-results"):
            payload = head.topic(kind)[0]
            assert "jid" in payload and payload["jid"] == (jid or j.jid), kind
            assert payload["v"] == 1
    finally:
        up.stop()
        head.close()
