"""Logs and metrics of a real `mgw run`: a fake journald (a real unix datagram socket) gets one
entry with structured fields for every event, command and rejection of a short session, and
the Prometheus endpoint is scraped while it runs."""

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

from mqtt_helpers import HeadEnd
from test_e2e import ROOT, Simulator, keys, sign, write_config

from gateway import logs


class FakeJournald:
    """A unix datagram socket that parses the native protocol, as journald would."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.entries = []
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            self.entries.append(parse_native(data))

    def close(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close()

    def find(self, **want):
        return [e for e in list(self.entries) if all(e.get(k) == v for k, v in want.items())]


def parse_native(data):
    out = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            value = data[nl + 9:nl + 9 + n]
            assert data[nl + 9 + n:nl + 10 + n] == b"\n"
            i = nl + 10 + n
        out[key.decode()] = value.decode()
    return out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_native_protocol_fields_and_multiline_values(tmp_path):
    journal = FakeJournald(tmp_path / "journal.sock")
    handler = logs.JournalHandler(journal.path)
    logger = logging.getLogger("test.journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("meter %s went\nsilent", "m4", extra=logs.fields(event="meter.offline",
                                                                         meter="m4"))
        end = time.time() + 5
        while time.time() < end and not journal.entries:
            time.sleep(0.02)
        e = journal.entries[0]
        assert e["MESSAGE"] == "test.journal: meter m4 went\nsilent"
        assert e["PRIORITY"] == "4" and e["MGW_METER"] == "m4"
        assert e["MGW_EVENT"] == "meter.offline" and e["SYSLOG_IDENTIFIER"] == "meter-gateway"
        assert e["CODE_FUNC"] == "test_native_protocol_fields_and_multiline_values"
    finally:
        logger.removeHandler(handler)
        handler.close()
        journal.close()
    # journald gone: the line goes to stderr instead of being lost
    handler = logs.JournalHandler(str(tmp_path / "gone.sock"))
    import io
    import sys
    old, sys.stderr = sys.stderr, io.StringIO()
    try:
        handler.emit(logging.LogRecord("x", logging.ERROR, "f", 1, "kept", (), None))
        assert "kept" in sys.stderr.getvalue() and handler.failures == 1
    finally:
        sys.stderr = old
        handler.close()


def test_journal_is_used_only_under_systemd(tmp_path):
    sock = tmp_path / "j.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(sock))
    try:
        assert logs.journal_socket({"MGW_JOURNAL_SOCKET": str(sock)}) is None
        assert logs.journal_socket({"MGW_JOURNAL_SOCKET": str(sock),
                                    "INVOCATION_ID": "abc"}) == str(sock)
        assert logs.journal_socket({"MGW_JOURNAL_SOCKET": str(sock),
                                    "JOURNAL_STREAM": "1:2"}) is None    # not our stderr
        assert logs.journal_socket({"MGW_JOURNAL_SOCKET": str(tmp_path / "none"),
                                    "INVOCATION_ID": "abc"}) is None
    finally:
        s.close()


def test_a_session_of_mgw_run_logs_every_event_command_and_rejection_and_serves_metrics(
        tmp_path, broker):
    priv, pub = keys(tmp_path)
    sim = Simulator(tmp_path)
    cfg = write_config(tmp_path, sim.link, broker, pub)
    port = free_port()
    text = open(cfg).read().replace('[gateway]\n', '[gateway]\nlog_level = "debug"\n')
    # a fifth meter that is not on the line: it goes offline
    text += ('\n[[meters]]\nid = "m5"\nport = "rs485-1"\naddress = "000000000099"\n'
             'interval_s = 10\ninstant_interval_s = 0\nclock_interval_s = 0\n'
             '\n[metrics]\nlisten = "127.0.0.1:%d"\n' % port)
    open(cfg, "w").write(text)
    journal = FakeJournald(tmp_path / "journal.sock")
    head = HeadEnd(broker)
    stderr = open(tmp_path / "stderr.log", "w")
    st = os.fstat(stderr.fileno())
    env = {"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino),
           "MGW_JOURNAL_SOCKET": journal.path}
    # stderr is the "journal stream" (a file whose device and inode JOURNAL_STREAM names)
    gw = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", cfg],
                          env=dict(os.environ, PYTHONPATH=ROOT, **env),
                          stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        head.wait(lambda: {r["meter"] for r in head.readings()} >= {"m1", "m2", "m3", "m4"},
                  timeout=30)
        cut = sign(priv, "m2", "cut_off")
        unknown = sign(priv, "m9", "cut_off")
        for c in (cut, unknown):
            head.publish("commands", c)
        head.publish("commands", '{"v":1,"id":"forged","meter":"m1"}')
        cid, uid = json.loads(cut)["id"], json.loads(unknown)["id"]
        head.wait(lambda: any(r.get("id") == cid and r["status"] == "done"
                              for r in head.topic("command-results")))
        head.wait(lambda: any(r.get("id") == uid for r in head.topic("command-results")))
        head.wait(lambda: any(e["type"] == "meter.offline" for e in head.topic("events")),
                  timeout=60)

        # metrics of the running service
        body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                      timeout=10).read().decode()
        metric = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                metric[name] = float(value)
        assert metric['mgw_line_requests_total{port="rs485-1"}'] > 0
        assert metric['mgw_line_answers_total{port="rs485-1"}'] > 0
        assert metric['mgw_line_timeouts_total{port="rs485-1"}'] > 0       # m5
        assert 'mgw_line_garbled_frames_total{port="rs485-1"}' in metric
        assert 0 < metric['mgw_line_busy_ratio{port="rs485-1"}'] <= 1
        assert metric['mgw_meters{state="online"}'] == 4
        assert metric['mgw_meters{state="offline"}'] == 1
        assert metric['mgw_meter_online{meter="m5",port="rs485-1"}'] == 0
        assert metric["mgw_uplink_connected"] == 1
        assert 'mgw_uplink_backlog{stream="readings"}' in metric
        assert "mgw_uplink_oldest_unsent_age_seconds" in metric
        assert metric['mgw_command_results_total{action="cut_off",status="done"}'] == 1
        assert metric['mgw_command_results_total{action="cut_off",status="rejected"}'] == 1
        assert metric['mgw_command_results_total{action="other",status="rejected"}'] == 1
        assert metric["mgw_clock_trusted"] in (0, 1)
        assert metric["mgw_journal_bytes"] > 0
        assert metric['mgw_journal_dropped_total{stream="readings"}'] == 0
        assert metric["process_resident_memory_bytes"] > 0
    finally:
        gw.terminate()
        gw.wait(15)
        stderr.close()
    time.sleep(0.5)
    journal.close()
    assert gw.returncode == 0

    # one journal entry for every event published (audit entries included, at debug)
    events = head.topic("events")
    assert {"gateway.started", "meter.offline", "relay.opened", "audit"} <= \
        {e["type"] for e in events}
    for e in events:
        found = journal.find(MGW_EVENT=e["type"])
        if e.get("meter"):
            found = [j for j in found if j.get("MGW_METER") == e["meter"]]
        assert found, e
    offline = journal.find(MGW_EVENT="meter.offline", MGW_METER="m5")
    assert offline[0]["PRIORITY"] == "4"
    # every command with its outcome, every rejection
    assert [j["MESSAGE"] for j in journal.find(MGW_COMMAND_ID=cid)
            if "cut_off m2: done" in j["MESSAGE"]]
    assert [j for j in journal.find(MGW_EVENT="relay.opened", MGW_METER="m2")
            if j.get("MGW_COMMAND_ID") == cid]
    rej = [j for j in journal.find(MGW_COMMAND_ID=uid) if "rejected (unknown_meter)" in
           j["MESSAGE"]]
    assert rej and rej[0]["PRIORITY"] == "4"
    assert [j for j in journal.entries if "unauthenticated input rejected" in j["MESSAGE"]]
    # under systemd nothing goes to stderr (journald would keep every line twice)
    assert open(tmp_path / "stderr.log").read() == ""
    sim.stop()


def test_a_repeated_command_is_answered_with_the_first_results_bytes(tmp_path, broker):
    import paho.mqtt.client as mqtt
    from gwharness import Harness
    h = Harness(tmp_path, broker=broker, meters=1).start()
    raw = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw",
                      protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: raw.append(bytes(m.payload))
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("mgw/v1/gw-test/command-results", 1)
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    head = HeadEnd(broker, client_id="headend-repeat")
    try:
        def finals(cid):
            return [r for r in raw if json.loads(r)["id"] == cid and
                    json.loads(r)["status"] in ("done", "rejected")]

        def wait_for(cond, timeout=20):
            end = time.time() + timeout
            while time.time() < end and not cond():
                time.sleep(0.05)
            return cond()
        cut = h.command("m1", "cut_off")
        unknown = h.command("m7", "read")
        for cmd in (cut, unknown):
            head.publish("commands", json.dumps(cmd))
            assert wait_for(lambda: finals(cmd["id"]))
        time.sleep(0.5)
        for cmd in (cut, unknown):
            head.publish("commands", json.dumps(cmd))           # a head-end's retry
            assert wait_for(lambda: len(finals(cmd["id"])) == 2), raw
            first, second = finals(cmd["id"])
            assert first == second                               # byte for byte
        assert len(h.relay_moves()) == 1
    finally:
        sub.loop_stop()
        sub.disconnect()
        head.close()
        h.close()


def test_a_flood_of_rejected_input_is_logged_once_and_then_counted(tmp_path, caplog):
    from gwharness import Harness
    h = Harness(tmp_path, meters=1).start()
    try:
        now = [1000.0]
        agg = h.gw.executor._rejections
        agg.clock = lambda: now[0]
        agg._until = None
        with caplog.at_level(logging.WARNING, logger="gateway.control.executor"):
            for i in range(50):
                h.gw.executor.handle_remote(b'{"v":1,"id":"junk-%d"}' % i)
            lines = [r.getMessage() for r in caplog.records
                     if "rejected" in r.getMessage()]
            assert len(lines) == 1 and lines[0].startswith("unauthenticated input rejected")
            now[0] += 61                      # the minute is over: one line says the rest
            agg.flush()
            lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
            assert lines[1] == "49 more rejected input in the last 60 s (not logged one " \
                "by one)"
            agg.flush()                       # said once
            assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 2
    finally:
        h.close()


def test_the_logs_command_lines_carry_rfc3339_times():
    import datetime as dt
    logger = logging.getLogger("test.recent")
    handler = logs._Recent()
    logger.addHandler(handler)
    try:
        logger.warning("meter %s silent", "m4")
    finally:
        logger.removeHandler(handler)
    line = logs.recent_lines(1, "warning")[-1]
    stamp, rest = line.split(" ", 1)
    assert rest == "WARNING test.recent: meter m4 silent"
    assert dt.datetime.fromisoformat(stamp).tzinfo is not None and stamp[-3] == ":"
