"""Uplink benchmark: readings per second from the journal to the broker's acknowledgement,
and CPU seconds per 10,000 readings, on loopback with a real Mosquitto.

Ours: the gateway's Uplink draining a journal of N readings (batches, QoS 1, bounded in
flight, cursor advanced on PUBACK). The peer: the same readings published by a plain
paho-mqtt loop, one message per reading, waiting for each acknowledgement (what a naive
gateway does to be sure nothing is lost).

Run: python bench/uplink.py [--readings N]. Needs mosquitto; prints figures only.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from decimal import Decimal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import paho.mqtt.client as mqtt  # noqa: E402

from gateway.service.config import validate  # noqa: E402
from gateway.store.journal import Journal, Reading  # noqa: E402
from gateway.uplink.mqtt import Uplink, rfc3339  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(folder):
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = os.path.join(folder, "m.conf")
    with open(conf, "w") as f:
        f.write("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\n"
                "max_queued_messages 1000000\n%s" % (port, "user root\n" if os.geteuid() == 0
                                                     else ""))
    proc = subprocess.Popen([binary, "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def readings(n):
    now = int(time.time() * 1000)
    return [Reading("m%03d" % (i % 256), "energy.import.total", Decimal(i).scaleb(-2), "kWh",
                    now, now) for i in range(n)]


def ours(folder, port, n):
    j = Journal(os.path.join(folder, "j.db"), quota_bytes=10 ** 10)
    rs = readings(n)
    for i in range(0, n, 5000):
        j.append_readings(rs[i:i + 5000])
    cfg = validate({"gateway": {"id": "bench"}, "uplink": {
        "host": "127.0.0.1", "port": port, "batch_max": 200, "batch_age_s": 0,
        "inflight_max": 16}}).uplink
    up = Uplink(cfg, "bench", j)
    cpu0, t0 = time.process_time(), time.perf_counter()
    up.start()
    while j.stats()["streams"]["readings"]["consumers"]["uplink"]["pending"]:
        time.sleep(0.01)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    up.stop()
    j.close()
    return n / dt, cpu * 10000 / n


def peer(port, n):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="peer",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    rs = readings(n)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i, r in enumerate(rs, 1):
        payload = json.dumps({"v": 1, "seq": i, "meter": r.meter, "ts": rfc3339(r.ts),
                              "q": r.quantity, "value": float(r.value), "unit": r.unit})
        client.publish("bench/readings", payload, qos=1).wait_for_publish(5)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    client.loop_stop()
    client.disconnect()
    return n / dt, cpu * 10000 / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=50000)
    ap.add_argument("--peer-readings", type=int, default=10000)
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="mgw-bench-uplink-")
    broker, port = start_broker(folder)
    try:
        print("meter-gateway uplink benchmark: loopback Mosquitto, QoS 1, Python %s"
              % sys.version.split()[0])
        r_ours, c_ours = ours(folder, port, args.readings)
        r_peer, c_peer = peer(port, args.peer_readings)
        print("\n  %-52s %14s %18s" % ("", "readings/s", "CPU s / 10,000"))
        print("  %-52s %14s %18.3f" % ("ours: journal -> batches -> PUBACK -> cursor (%d)"
                                       % args.readings, "{:,.0f}".format(r_ours), c_ours))
        print("  %-52s %14s %18.3f" % ("plain paho loop, one publish per reading, wait ack"
                                       " (%d)" % args.peer_readings, "{:,.0f}".format(r_peer),
                                       c_peer))
        print("  ratio: %.1fx the readings per second, %.1fx less CPU per reading"
              % (r_ours / r_peer, c_peer / c_ours))
    finally:
        broker.terminate()
        broker.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
