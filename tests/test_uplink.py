"""The MQTT uplink against a real Mosquitto broker started by the tests."""

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal


from gateway.service.config import validate
from gateway.store.journal import Journal, Reading
from gateway.uplink.mqtt import Uplink
from mqtt_helpers import HeadEnd, unique_seqs


def uplink_cfg(broker, **over):
    doc = {"gateway": {"id": "gw-test"}, "uplink": dict(host=broker.host, port=broker.port,
                                                        batch_age_s=0.1, **over)}
    return validate(doc).uplink


def readings(n, start=0):
    now = int(time.time() * 1000)
    return [Reading("m%d" % (i % 5), "energy.import.total", Decimal(start + i).scaleb(-2),
                    "kWh", now, now) for i in range(n)]


def test_readings_events_and_status_arrive_complete_and_in_order(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = Uplink(uplink_cfg(broker, batch_max=50), "gw-test", j)
    up.start()
    try:
        for k in range(10):
            j.append_readings(readings(37, k * 37))
            up.notify()
        j.append_event("meter.offline", meter="m3", reason="no answer")
        up.notify()
        head.wait(lambda: len(unique_seqs(head.readings())) == 370 and head.topic("events"))
        status = head.topic("status")
        assert status and status[-1]["state"] == "online" and status[-1]["v"] == 1
        got = head.readings()
        assert unique_seqs(got) == list(range(1, 371))
        assert got[0]["value"] == 0 and got[5]["value"] == 0.05
        assert got[0]["unit"] == "kWh" and got[0]["q"] == "energy.import.total"
        assert "+" in got[0]["ts"] or "Z" in got[0]["ts"] or "-" in got[0]["ts"][19:]
        ev = head.topic("events")[0]
        assert ev == {"v": 1, "jid": j.jid, "seq": 1, "ts": ev["ts"], "type": "meter.offline",
                      "meter": "m3", "reason": "no answer"}
        head.wait(lambda: j.stats()["streams"]["readings"]["stored"] == 0)   # acked, deleted
    finally:
        up.stop()
        head.close()
    # a clean stop leaves the retained status "offline"
    head2 = HeadEnd(broker, client_id="late")
    head2.wait(lambda: head2.topic("status"))
    assert head2.topic("status")[-1]["state"] == "offline"
    head2.close()


def test_broker_outage_collection_goes_on_and_everything_arrives(tmp_path):
    from conftest import Broker
    broker = Broker(tmp_path, persistence=True).start()
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker, clean=False)        # a head-end with a persistent session
    up = Uplink(uplink_cfg(broker, reconnect_max_s=1.0), "gw-test", j)
    up.start()
    try:
        j.append_readings(readings(20))
        up.notify()
        head.wait(lambda: len(unique_seqs(head.readings())) == 20)
        broker.stop()                          # the backhaul goes down
        for k in range(5):                     # collection goes on meanwhile
            j.append_readings(readings(20, 20 + 20 * k))
            time.sleep(0.1)
        assert j.stats()["streams"]["readings"]["consumers"]["uplink"]["pending"] == 100
        assert not up.status()["connected"]
        broker.start()
        up.notify()
        head.wait(lambda: j.stats()["streams"]["readings"]["consumers"]["uplink"]
                  ["pending"] == 0, timeout=30)
        head.wait(lambda: len(unique_seqs(head.readings())) == 120, timeout=30)
    finally:
        up.stop()
        head.close()
        broker.stop()
    seqs = unique_seqs(head.readings())
    assert seqs == list(range(1, 121))         # in order, no gap


CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[3])
from decimal import Decimal
from gateway.service.config import validate
from gateway.store.journal import Journal, Reading
from gateway.uplink.mqtt import Uplink
cfg = validate({"gateway": {"id": "gw-test"}, "uplink": {"host": "127.0.0.1",
               "port": int(sys.argv[2]), "batch_max": 20, "batch_age_s": 0.05,
               "inflight_max": 4}}).uplink
j = Journal(sys.argv[1])
up = Uplink(cfg, "gw-test", j)
up.start()
n = j.stats()["streams"]["readings"]["next_seq"]
print("ready", flush=True)
while True:
    now = int(time.time() * 1000)
    j.append_readings([Reading("m1", "energy.import.total", Decimal(n + i), "kWh", now, now)
                       for i in range(10)])
    n += 10
    up.notify()
    time.sleep(0.01)
"""


def test_sigkill_while_publishing_loses_nothing_and_duplicates_keep_their_seq(tmp_path,
                                                                             broker):
    path = str(tmp_path / "j.db")
    head = HeadEnd(broker)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, path, str(broker.port), root],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1.0 + 0.3 * round_)
        child.send_signal(signal.SIGKILL)
        child.wait()
    # a last run without kill drains what is left
    j = Journal(path)
    total = j.stats()["streams"]["readings"]["next_seq"] - 1
    up = Uplink(uplink_cfg(broker), "gw-test", j)
    up.start()
    try:
        head.wait(lambda: len(unique_seqs(head.readings())) == total, timeout=30)
    finally:
        up.stop()
        head.close()
    got = head.readings()
    assert sorted(unique_seqs(got)) == list(range(1, total + 1))      # nothing lost
    by_seq = {}
    for r in got:                                                     # duplicates identical
        assert by_seq.setdefault(r["seq"], r) == r
    assert total > 100


def _make_pki(tmp_path):
    import datetime as dt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(__import__("ipaddress")
                                                                       .ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {}
    for label, obj in (("ca.crt", ca), ("server.crt", cert)):
        paths[label] = tmp_path / label
        paths[label].write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    paths["server.key"] = tmp_path / "server.key"
    paths["server.key"].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    return paths


def test_tls_on_loopback(tmp_path):
    from conftest import Broker, free_port
    pki = _make_pki(tmp_path)
    tls_port = free_port()
    b = Broker(tmp_path, extra_conf="listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n"
               "allow_anonymous true\n" % (tls_port, pki["ca.crt"], pki["server.crt"],
                                           pki["server.key"])).start()
    try:
        j = Journal(str(tmp_path / "j.db"))
        head = HeadEnd(b)                          # plain listener for the observer
        cfg = uplink_cfg(b, tls_ca=str(pki["ca.crt"]))
        cfg = cfg.replace(port=tls_port)
        up = Uplink(cfg, "gw-test", j)
        up.start()
        j.append_readings(readings(5))
        up.notify()
        head.wait(lambda: len(unique_seqs(head.readings())) == 5)
        assert up.status()["connected"]
        up.stop()
        head.close()
    finally:
        b.stop()


def test_wrong_password_gives_a_clear_error_and_retries(tmp_path):
    from conftest import Broker
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "gw", "right"], check=True,
                   capture_output=True)
    b = Broker(tmp_path, extra_conf="password_file %s\n" % pwfile)
    b.conf.write_text(b.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    b.start()
    try:
        j = Journal(str(tmp_path / "j.db"))
        up = Uplink(uplink_cfg(b, username="gw", password="wrong", reconnect_max_s=1.0,
                               allow_insecure=True),
                    "gw-test", j)
        up.start()
        end = time.time() + 10
        while time.time() < end and up.state["connects"] == 0 and \
                "refused" not in (up.state["last_error"] or ""):
            time.sleep(0.05)
        first_error = up.state["last_error"]
        time.sleep(2.5)
        assert not up.state["connected"]
        assert "broker refused the connection" in first_error
        assert "\n" not in first_error
        assert "password" in first_error.lower() or "authori" in first_error.lower()
        up.stop()
    finally:
        b.stop()


def test_mqtt_311_by_configuration(tmp_path, broker):
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = Uplink(uplink_cfg(broker, mqtt_version="3.1.1"), "gw-test", j)
    up.start()
    try:
        j.append_readings(readings(30))
        up.notify()
        head.wait(lambda: len(unique_seqs(head.readings())) == 30)
        assert up.status()["connected"] and not up.v5
    finally:
        up.stop()
        head.close()


def test_commands_are_handed_over_with_response_topic_and_correlation(tmp_path, broker):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    j = Journal(str(tmp_path / "j.db"))
    head = HeadEnd(broker)
    up = Uplink(uplink_cfg(broker), "gw-test", j)
    up.start()
    try:
        head.wait(lambda: up.status()["connected"])
        time.sleep(0.3)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "headend/replies/42"
        props.CorrelationData = b"\x01\x02corr"
        head.client.subscribe("headend/replies/#", qos=1)
        head.publish("commands", b'{"v":1}', properties=props)
        cmd = up.commands.get(timeout=10)
        assert cmd.payload == b'{"v":1}' and cmd.response_topic == "headend/replies/42"
        assert cmd.correlation_data == b"\x01\x02corr"
        # a result recorded for it goes to the contract topic and to the response topic
        j.append_result({"id": "c-1", "status": "rejected", "reason": "test",
                         "_response_topic": cmd.response_topic,
                         "_correlation_data": cmd.correlation_data.hex()})
        up.notify()
        head.wait(lambda: any(t == "headend/replies/42" for t, _, _, _ in head.messages))
        reply = [(p, pr) for t, p, _, pr in head.messages if t == "headend/replies/42"][0]
        assert reply[0]["id"] == "c-1" and reply[1].CorrelationData == b"\x01\x02corr"
        contract = head.topic("command-results")
        assert contract and contract[0]["status"] == "rejected"
        assert "_response_topic" not in contract[0]
    finally:
        up.stop()
        head.close()


def _uplink_problems(**uplink):
    from gateway.config import ConfigError
    try:
        validate({"gateway": {"id": "gw-test"}, "uplink": dict(host="127.0.0.1", **uplink)})
    except ConfigError as exc:
        return exc.problems
    return []


def test_wildcard_or_reserved_topic_root_is_refused_by_config_check():
    for bad in ("mgw/+", "mgw/#", "#", "mgw\0x", "", "/", "$SYS/mgw"):
        problems = _uplink_problems(topic_root=bad)
        assert len(problems) == 1 and "uplink.topic_root" in problems[0], (bad, problems)
        assert "\n" not in problems[0]
    assert _uplink_problems(topic_root="utility/mgw/v1") == []


def test_broker_password_without_tls_needs_allow_insecure(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    for creds in ({"password": "x"}, {"password_file": str(pw)}):
        problems = _uplink_problems(username="gw", **creds)
        assert len(problems) == 1 and "uplink.password" in problems[0], problems
        assert _uplink_problems(username="gw", allow_insecure=True, **creds) == []
        assert _uplink_problems(username="gw", tls=True, **creds) == []
    assert _uplink_problems(tls="yes")          # a bool, not a string
    assert _uplink_problems(username="gw") == []


def test_tls_true_uses_the_system_ca_store(tmp_path, monkeypatch):
    from conftest import Broker, free_port
    pki = _make_pki(tmp_path)
    # OpenSSL's default verify paths (the "system store") honour SSL_CERT_FILE
    monkeypatch.setenv("SSL_CERT_FILE", str(pki["ca.crt"]))
    tls_port = free_port()
    b = Broker(tmp_path, extra_conf="listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n"
               "allow_anonymous true\n" % (tls_port, pki["ca.crt"], pki["server.crt"],
                                           pki["server.key"])).start()
    try:
        j = Journal(str(tmp_path / "j.db"))
        head = HeadEnd(b)
        cfg = uplink_cfg(b, tls=True)
        cfg = cfg.replace(port=tls_port)
        up = Uplink(cfg, "gw-test", j)
        up.start()
        try:
            j.append_readings(readings(5))
            up.notify()
            head.wait(lambda: len(unique_seqs(head.readings())) == 5)
        finally:
            up.stop()
            head.close()
    finally:
        b.stop()
