"""Commands through a real broker into a real `mgw run`: durable intake across SIGKILL,
floods of unauthenticated input, random kills under load."""

import datetime as dt
import json
import os
import random
import signal
import time
import uuid

import pytest

from gateway.store.audit import verify as verify_audit
from gateway.control.signing import generate, load_private_key, sign
from gateway.store.docs import read_tables
from mqtt_helpers import HeadEnd, unique_seqs
from test_e2e import Simulator, mgw, write_config

KILLS = int(os.environ.get("MGW_KILLS", "6"))      # the figure is 20: see docs


def signed(key, meter, action, params=None, cid=None):
    now = dt.datetime.now().astimezone().replace(microsecond=0)
    return json.dumps(sign({"v": 1, "id": cid or uuid.uuid4().hex, "meter": meter,
                            "action": action, "issued_at": now.isoformat(),
                            "expires_at": (now + dt.timedelta(seconds=900)).isoformat(),
                            "params": params or {}}, key))


def prepaid_config(tmp_path, link, broker, pub, meters=2, extra=""):
    cfg = write_config(tmp_path, link, broker, pub, meters=meters)
    with open(cfg, "a") as f:
        f.write('\n[tariffs.flat]\nkind = "flat"\nprice = "0.5000"\n\n'
                '[cost_control]\nprotected_hours = []\nprotected_weekends = false\n'
                'notice_s = 0\ncheck_interval_s = 1\n\n')
        for i in range(meters):
            f.write('[[accounts]]\nmeter = "m%d"\ntariff = "flat"\nopening_balance = '
                    '"500.00"\nmax_kw = "100"\n\n' % (i + 1))
        f.write(extra)
    return cfg


def finals(head):
    out = {}
    for r in head.topic("command-results"):
        if r.get("id") and r["status"] in ("done", "failed", "rejected"):
            out.setdefault(r["id"], r)
    return out


def stopped_state(tmp_path):
    """The account store's tables of a stopped gateway (accounts.db)."""
    return read_tables(str(tmp_path / "data" / "accounts.db"))


def docs(tables, table):
    return tables.get(table) or {}


@pytest.fixture
def setup(tmp_path, broker):
    priv, pub, _ = generate(str(tmp_path / "keys"))
    key = load_private_key(priv)
    sim = Simulator(tmp_path, meters=2)
    head = HeadEnd(broker)
    yield key, pub, sim, head
    head.close()
    sim.stop()


def start(cfg):
    gw = mgw("run", "--config", cfg)
    return gw


def wait_online(head, since=0):
    head.wait(lambda: len([s for s in head.topic("status") if s["state"] == "online"]) > since,
              timeout=30)


def test_topups_acknowledged_only_when_durable_survive_a_sigkill(tmp_path, broker, setup):
    key, pub, sim, head = setup
    cfg = prepaid_config(tmp_path, sim.link, broker, pub)
    gw = start(cfg)
    try:
        wait_online(head)
        cmds = [signed(key, "m1", "topup", {"amount": "1.00", "txn": "PAY-%d" % i})
                for i in range(60)]
        for c in cmds:
            head.client.publish(head.root + "/commands", c, qos=1)
        time.sleep(0.5)
        gw.send_signal(signal.SIGKILL)
        gw.wait(10)
        gw = start(cfg)
        ids = {json.loads(c)["id"] for c in cmds}
        head.wait(lambda: ids <= set(finals(head)), timeout=60)
        assert {finals(head)[i]["status"] for i in ids} == {"done"}
        gw.send_signal(signal.SIGTERM)
        gw.wait(10)
        tables = stopped_state(tmp_path)
        txns = docs(tables, "txns")
        assert sorted(txns) == sorted("PAY-%d" % i for i in range(60))
        acc = docs(tables, "accounts")["m1"]
        assert acc["topups_uy"] == 60 * 1000000                  # each applied once
        assert acc["opening_uy"] + acc["topups_uy"] - acc["charges_uy"] == acc["balance_uy"]
    finally:
        if gw.poll() is None:
            gw.kill()


def test_a_flood_of_unauthenticated_input_drops_no_signed_command(tmp_path, broker, setup):
    key, pub, sim, head = setup
    cfg = prepaid_config(tmp_path, sim.link, broker, pub)
    gw = start(cfg)
    audit = tmp_path / "data" / "audit.log"
    try:
        wait_online(head)
        # publish→done without a flood, measured in the same run
        quiet = signed(key, "m2", "topup", {"amount": "1.00", "txn": "QUIET"})
        audit_before = audit.stat().st_size
        signed_ids = []
        junk = [b"\x00\xff" * 40, b'{"v":1,"id":"x","sig":"AAAA"}', b"[" * 3000,
                json.dumps({"v": 1, "id": "fake", "meter": "m1", "action": "cut_off",
                            "issued_at": "x", "expires_at": "y", "sig": "A" * 88}).encode()]
        for i in range(6000):
            if i % 600 == 300:
                c = signed(key, "m1", "topup", {"amount": "1.00", "txn": "FLOOD-%d" % i})
                signed_ids.append(json.loads(c)["id"])
                head.client.publish(head.root + "/commands", c, qos=1)
            head.client.publish(head.root + "/commands", junk[i % len(junk)], qos=1)
            if i % 200 == 0:
                time.sleep(0.01)          # at the broker's pace, not a local burst
        head.wait(lambda: set(signed_ids) <= set(finals(head)), timeout=120)
        assert all(finals(head)[i]["status"] == "done" for i in signed_ids)
        assert not [r for r in head.topic("command-results")
                    if r.get("id") in ("x", "fake")]             # never in a claimed name
        t0 = time.time()
        head.client.publish(head.root + "/commands", quiet, qos=1)
        qid = json.loads(quiet)["id"]
        head.wait(lambda: qid in finals(head), timeout=30)
        growth = audit.stat().st_size - audit_before
        # 10 executed top-ups write their own entries; the 6000 others only aggregates
        per_command = 2500
        assert growth - 10 * per_command <= 2048 * 6, (growth, time.time() - t0)
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(10)


def test_random_sigkills_under_load_lose_and_repeat_nothing(tmp_path, broker, setup):
    key, pub, sim, head = setup
    cfg = prepaid_config(tmp_path, sim.link, broker, pub)
    rng = random.Random(11)
    sent = []
    gw = start(cfg)
    try:
        wait_online(head)              # its session (and subscription) exists from here on
        for k in range(KILLS):
            for _ in range(rng.randint(2, 6)):
                meter = rng.choice(["m1", "m2"])
                action = rng.choice(["topup", "topup", "cut_off", "restore"])
                params = {"amount": "0.50", "txn": uuid.uuid4().hex} if action == "topup" \
                    else ({"mode": "direct"} if action == "restore" else {})
                c = signed(key, meter, action, params)
                sent.append(json.loads(c))
                head.client.publish(head.root + "/commands", c, qos=1)
            time.sleep(rng.uniform(0.2, 1.5))
            gw.send_signal(signal.SIGKILL)
            gw.wait(10)
            gw = start(cfg)
        ids = {c["id"] for c in sent}
        try:
            head.wait(lambda: ids <= set(finals(head)), timeout=60)
        except AssertionError:
            missing = ids - set(finals(head))
            seen = {i: [r["status"] for r in head.topic("command-results") if r.get("id") == i]
                    for i in missing}
            raise AssertionError("no final result: %s; %s" % (
                seen, [(c["action"], c["meter"]) for c in sent if c["id"] in missing]))
        time.sleep(2)
        gw.send_signal(signal.SIGTERM)
        gw.wait(10)
        assert gw.returncode == 0
        tables = stopped_state(tmp_path)
        txns = docs(tables, "txns")
        topups = [c for c in sent if c["action"] == "topup"]
        applied = [c for c in topups if c["params"]["txn"] in txns]
        done = [c for c in topups if finals(head)[c["id"]]["status"] == "done"]
        assert len(applied) == len(done) == len(topups)
        for meter in ("m1", "m2"):
            acc = docs(tables, "accounts")[meter]
            paid = sum(500000 for c in topups if c["meter"] == meter)
            assert acc["topups_uy"] == paid                       # no txn applied twice
            assert acc["opening_uy"] + acc["topups_uy"] - acc["charges_uy"] == \
                acc["balance_uy"]
        data = tmp_path / "data"
        n, problem = verify_audit(str(data / "audit.log"))
        assert problem is None, problem
        frames = {}
        for line in open(data / "audit.log"):
            e = json.loads(line)
            if e["kind"] == "relay.frame":
                frames[e["id"]] = frames.get(e["id"], 0) + 1
        assert frames and max(frames.values()) == 1              # never sent twice
        seqs = sorted(unique_seqs(head.readings()))
        assert seqs == list(range(seqs[0], seqs[-1] + 1))
        for topic in ("events", "command-results"):
            s = sorted({p["seq"] for p in head.topic(topic)})
            assert s == list(range(s[0], s[-1] + 1)), topic
    finally:
        if gw.poll() is None:
            gw.kill()


def test_one_unsigned_message_with_a_wildcard_response_topic_stops_nothing(tmp_path, broker,
                                                                           setup):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    key, pub, sim, head = setup
    cfg = prepaid_config(tmp_path, sim.link, broker, pub)
    gw = start(cfg)
    try:
        wait_online(head)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "evil/#"
        props.CorrelationData = b"x"
        info = head.client.publish(head.root + "/commands",
                                   b'{"v":1,"id":"evil","sig":"garbage"}', qos=1,
                                   properties=props)
        info.wait_for_publish(5)
        seen = len(unique_seqs(head.readings()))
        gw.send_signal(signal.SIGTERM)                  # and across a restart
        gw.wait(10)
        gw = start(cfg)
        c = signed(key, "m1", "read", {"quantities": ["energy.import.total"]})
        head.client.publish(head.root + "/commands", c, qos=1)
        cid = json.loads(c)["id"]
        head.wait(lambda: cid in finals(head), timeout=30)
        assert finals(head)[cid]["status"] == "done"
        head.wait(lambda: len(unique_seqs(head.readings())) > seen, timeout=30)
        anon = [r for r in head.topic("command-results") if r.get("id") is None]
        assert anon and anon[0]["claimed_id"] == "evil" and anon[0]["code"] == "missing_field"
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(10)
