"""A head-end stand-in for tests: subscribes to a gateway's topics and collects payloads."""

import json
import threading
import time

import paho.mqtt.client as mqtt


class HeadEnd:
    def __init__(self, broker, root="mgw/v1/gw-test", client_id="headend", clean=True,
                 **tls):
        self.root = root
        self.messages = []          # (topic, payload dict, retain)
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        if tls:
            self.client.tls_set(**tls)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(root + "/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        if clean:
            self.client.connect(broker.host, broker.port)
        else:
            # a persistent session: what arrives while the head-end is away is kept for it
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.client.connect(broker.host, broker.port, clean_start=False,
                                properties=props)
        self.client.loop_start()
        self.subscribed.wait(5)

    def _on_message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except (ValueError, RecursionError):      # the junk a flood test publishes
            payload = msg.payload
        with self.lock:
            self.messages.append((msg.topic, payload, msg.retain, msg.properties))

    def topic(self, suffix):
        with self.lock:
            return [p for t, p, _, _ in self.messages if t == self.root + "/" + suffix]

    def readings(self):
        out = []
        for batch in self.topic("readings"):
            assert batch["v"] == 1
            assert batch["first_seq"] == batch["readings"][0]["seq"]
            assert batch["last_seq"] == batch["readings"][-1]["seq"]
            out.extend(batch["readings"])
        return out

    def wait(self, cond, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return True
            time.sleep(0.05)
        raise AssertionError("head-end did not see it within %ss" % timeout)

    def publish(self, suffix, payload, **kw):
        info = self.client.publish(self.root + "/" + suffix, payload, qos=1, **kw)
        info.wait_for_publish(5)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def unique_seqs(readings):
    """seqs in arrival order with duplicates removed (delivery is at least once)."""
    seen = set()
    out = []
    for r in readings:
        if r["seq"] not in seen:
            seen.add(r["seq"])
            out.append(r["seq"])
    return out
