"""Command benchmark: time from publishing a signed cut-off (or restore) to its `done`
result, at 2400 baud, with the line busy polling 32 meters, next to the wire-time minimum
of the transactions the command needs (status read, relay frame, status read back); then
the same while a flood of 6000 unauthenticated messages arrives on the command topic (the
issue's bound: no more than twice the quiet figure, measured in the same run).

The gateway runs in this process on simulated meters behind a pseudo-terminal; commands go
through a real Mosquitto broker both ways. Run: python bench/control.py. Prints figures only.
"""

import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from bench.uplink import start_broker  # noqa: E402
from gwharness import Harness  # noqa: E402
from mqtt_helpers import HeadEnd  # noqa: E402
from protocols import dlt645  # noqa: E402

BAUD = 2400
LATENCY_S = 0.03


def wire(n):
    return n * 11 / BAUD


def minimum():
    status_req = len(dlt645.read_data("000000000001", 0x04000503))
    status_ans = 4 + 12 + 4 + 2
    relay_req = 4 + 12 + 16
    relay_ans = 4 + 12
    return (2 * (wire(status_req + status_ans) + LATENCY_S) +
            wire(relay_req + relay_ans) + LATENCY_S)


class _Broker:
    def __init__(self, port):
        self.host, self.port = "127.0.0.1", port


def run_commands(h, head, first_meter):
    times = []
    for i in range(6):
        action = "cut_off" if i % 2 == 0 else "restore"
        params = {} if action == "cut_off" else {"mode": "direct"}
        cmd = h.command("m%d" % (first_meter + i // 2), action, params)
        t0 = time.perf_counter()
        head.publish("commands", json.dumps(cmd))
        head.wait(lambda: any(r.get("id") == cmd["id"] and r["status"] in ("done", "failed")
                              for r in head.topic("command-results")), timeout=60)
        times.append(time.perf_counter() - t0)
        res = [r for r in head.topic("command-results") if r.get("id") == cmd["id"]][-1]
        assert res["status"] == "done", res
    return times


class Flood(threading.Thread):
    """Junk on the command topic at the broker's pace (QoS 1, waiting for each PUBACK
    window), as anyone on the APN with broker access could send."""

    def __init__(self, broker, topic, total):
        super().__init__(daemon=True)
        import paho.mqtt.client as mqtt
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood",
                                  protocol=mqtt.MQTTv5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.topic = topic
        self.total = total
        self.sent = 0
        self.t0 = self.t1 = None

    def run(self):
        junk = [b"\x00\xff" * 40, b'{"v":1,"id":"x","sig":"AAAA"}',
                json.dumps({"v": 1, "id": "fake", "meter": "m1", "action": "cut_off",
                            "issued_at": "x", "expires_at": "y", "sig": "A" * 88}).encode()]
        self.t0 = time.perf_counter()
        for i in range(self.total):
            info = self.client.publish(self.topic, junk[i % len(junk)], qos=1)
            if i % 50 == 0:
                info.wait_for_publish(5)
            self.sent += 1
        self.t1 = time.perf_counter()
        self.client.loop_stop()
        self.client.disconnect()

    def rate(self):
        end = self.t1 or time.perf_counter()
        return self.sent / max(1e-9, end - (self.t0 or end))


def main():
    folder = tempfile.mkdtemp(prefix="mgw-bench-control-")
    proc, port = start_broker(folder)
    broker = _Broker(port)
    from pathlib import Path
    h = Harness(Path(folder), broker=broker, meters=32, baudrate=BAUD,
                meter_kw={"instant_interval_s": 0}, interval_s=1,
                control={"require_synced_clock": False})
    for m in h.sim_meters:
        m.faults.latency_s = LATENCY_S
    h.start()
    head = HeadEnd(broker, root="mgw/v1/gw-test")
    try:
        time.sleep(3)                                   # the line is busy polling
        busy = h.gw.workers["p1"].line_stats()["utilisation"]
        times = run_commands(h, head, first_meter=5)
        flood = Flood(broker, "mgw/v1/gw-test/commands", total=6000)
        flood.start()
        flooded = run_commands(h, head, first_meter=15)
        flood.join(120)
        executor = h.gw.executor.counts
        mn = minimum()
        print("meter-gateway command benchmark: %d baud, 32 meters polled continuously "
              "(line %.0f%% busy), meter latency %d ms" % (BAUD, 100 * busy,
                                                           LATENCY_S * 1000))
        print("\n  wire-time minimum of the command's 3 transactions: %.3f s" % mn)
        print("  publish -> done, median of %d: %.3f s (min %.3f, max %.3f)" % (
            len(times), statistics.median(times), min(times), max(times)))
        print("  overhead over the minimum: %.3f s (includes finishing the poll transaction "
              "on the line and two broker hops)" % (statistics.median(times) - mn))
        print("\n  during a flood of %d unauthenticated messages (%d sent while measuring, "
              "%.0f/s):" % (flood.total, flood.sent, flood.rate()))
        print("  publish -> done, median of %d: %.3f s (min %.3f, max %.3f): %.2fx quiet" % (
            len(flooded), statistics.median(flooded), min(flooded), max(flooded),
            statistics.median(flooded) / statistics.median(times)))
        print("  executor: %d unauthenticated inputs seen, %d answered (rate-limited), "
              "%d storage failures" % (executor["unauthenticated"], executor[
                  "unauthenticated"] - executor["unauthenticated_unanswered"],
                                      executor["storage_failures"]))
    finally:
        head.close()
        h.close()
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
