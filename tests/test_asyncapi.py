"""docs/asyncapi.yaml against what the gateway really publishes: one session on simulated
meters and a real Mosquitto makes every documented message (bar the ones marked
`x-mgw-not-captured`), a head-end captures them, and each payload validates against the
schema of the message its `x-mgw-match` picks."""

import datetime as dt
import json
import os
import time
from decimal import Decimal

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from gateway.control import executor as executor_mod
from gateway.line import poller as poller_mod
from gateway.store.journal import JournalError, Reading
from gateway.store.state import StateStore
from gwharness import Harness
from mqtt_helpers import HeadEnd
from test_control_core import wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "docs", "asyncapi.yaml")
URI = "urn:mgw:asyncapi"


def load_spec():
    with open(SPEC, encoding="utf-8") as f:
        return yaml.safe_load(f)


def rfc3339(value):
    """What the documents mean by date-time: RFC 3339, with a T and an offset."""
    if not isinstance(value, str) or "T" not in value:
        return False
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None
    except ValueError:
        return False


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("date-time")(rfc3339)


def _resolve(spec, ref):
    node = spec
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _key(ref):
    return ref.rsplit("/", 1)[1]


def matches(match, payload):
    for field, want in match.items():
        have = payload.get(field) if isinstance(payload, dict) else None
        if isinstance(want, list) and have not in want:
            return False
        if not isinstance(want, list) and have != want:
            return False
    return True


class Spec:
    def __init__(self):
        self.doc = load_spec()
        resource = Resource.from_contents(self.doc, default_specification=DRAFT7)
        self.registry = Registry().with_resource(URI, resource)

    def channel_of(self, suffix):
        for name, ch in self.doc["channels"].items():
            if ch["address"] == "{root}/" + suffix:
                return name, ch
        raise KeyError(suffix)

    def message_for(self, suffix, payload):
        """The one message of the channel whose x-mgw-match fits the payload."""
        _, ch = self.channel_of(suffix)
        fits = []
        for ref in ch["messages"].values():
            key = _key(ref["$ref"])
            msg = self.doc["components"]["messages"][key]
            if matches(msg["x-mgw-match"], payload):
                fits.append((len(msg["x-mgw-match"]), key))
        assert fits, "no documented message on %s fits %s" % (suffix, payload)
        fits.sort(reverse=True)
        assert len(fits) == 1 or fits[0][0] > fits[1][0], (suffix, fits, payload)
        return fits[0][1]

    def validate(self, key, payload):
        schema = {"$ref": URI + "#/components/messages/%s/payload" % key}
        jsonschema.Draft7Validator(schema, registry=self.registry,
                                   format_checker=FORMATS).validate(payload)


def test_the_document_is_asyncapi_3_and_every_reference_resolves():
    spec = load_spec()
    assert spec["asyncapi"].startswith("3.")
    messages = spec["components"]["messages"]
    for name, ch in spec["channels"].items():
        assert ch["address"].startswith("{root}/")
        for key, ref in ch["messages"].items():
            assert _key(ref["$ref"]) == key and key in messages
    for op, body in spec["operations"].items():
        assert body["action"] in ("send", "receive")
        ch = _resolve(spec, body["channel"]["$ref"])
        for ref in body["messages"]:
            # an operation's messages are its channel's
            assert ref["$ref"].startswith(body["channel"]["$ref"] + "/messages/")
            assert _key(ref["$ref"]) in ch["messages"]
    in_channels = {k for ch in spec["channels"].values() for k in ch["messages"]}
    assert set(messages) == in_channels
    for key, msg in messages.items():
        assert msg.get("name") and isinstance(msg.get("x-mgw-match"), dict), key
        jsonschema.Draft7Validator.check_schema(msg["payload"])
    text = json.dumps(spec)
    for ref in {r for r in _refs(spec)}:
        _resolve(spec, ref)              # raises on a dangling $ref
    assert "$ref" in text


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


ACCOUNT = {"tariff": "flat", "max_kw": "20000", "restore_threshold": "1.00"}
FAST = {"notice_s": 0, "protected_hours": [], "protected_weekends": False,
        "check_interval_s": 1, "breaker_max_count": 2, "breaker_max_share": 0.5}


@pytest.fixture
def session(tmp_path, broker, monkeypatch):
    """A short life of a gateway in which everything documented happens once."""
    monkeypatch.setattr(executor_mod, "near_the_hour", lambda now: False)
    monkeypatch.setattr(poller_mod, "OFFLINE_PROBE_S", 1.0)     # m4 back within seconds
    data = tmp_path / "data"
    data.mkdir()
    (data / "journal.db").write_bytes(b"not a database" * 100)     # journal.replaced
    accounts = [dict(ACCOUNT, meter="m%d" % i, opening_balance="0.00") for i in (1, 2, 3)]
    accounts += [dict(ACCOUNT, meter="m4", opening_balance="0.00", overdraft_limit="5.00"),
                 dict(ACCOUNT, meter="m5", opening_balance="1.50", alarm1="2.00",
                      alarm2="1.00")]
    h = Harness(tmp_path, broker=broker, meters=5, accounts=accounts, cost_control=FAST,
                sim_kw={"load_kw": 0.001, "start_kwh": 1000}, data_dir=data,
                meter_kw={"clock_interval_s": 1, "instant_interval_s": 1},
                storage={"journal_quota_mb": 1})
    h.sim_meters[1].clock_offset_s = 900.0          # m2: beyond a broadcast sync
    h.sim_meters[4].clock_offset_s = 60.0           # m5: synced by broadcast
    h.cfg = h.cfg.replace(uplink=h.cfg.uplink.replace(health_interval_s=10))
    head = HeadEnd(broker)
    sent = []

    def send(meter, action, params=None):
        cmd = h.command(meter, action, params)
        sent.append(cmd)
        head.publish("commands", json.dumps(cmd))
        return cmd

    def result(cmd, statuses=("done", "failed", "rejected"), timeout=30):
        return wait(lambda: next((r for r in head.topic("command-results")
                                  if r.get("id") == cmd["id"] and r["status"] in statuses),
                                 None), timeout)

    def seen(etype, timeout=30, **fields):
        return wait(lambda: [e for e in head.topic("events") if e["type"] == etype and
                             all(e.get(k) == v for k, v in fields.items())], timeout)

    h.start()
    for p in h.gw.pollers.values():
        p.sync_guard = lambda now: False
    try:
        seen("gateway.started")
        seen("journal.replaced")
        seen("costcontrol.breaker_tripped", timeout=40)
        seen("relay.opened", source="costcontrol")
        seen("balance.low", meter="m5")
        seen("balance.zero", meter="m4")
        seen("meter.clock_drift", meter="m2")
        seen("meter.time_synced", meter="m5")
        result(send("*", "release_breaker"))
        result(send("*", "weather_hold", {"on": True}))
        topup = send("m1", "topup", {"amount": "500.00", "txn": "PAY-1"})
        assert result(topup)["status"] == "done"
        seen("balance.normal", meter="m1")
        seen("relay.closed", meter="m1")
        again = send("m1", "topup", {"amount": "500.00", "txn": "PAY-1"})   # duplicate txn
        assert result(again).get("duplicate_txn") is True
        result(send("m5", "account_update", {"alarm1": "1.00"}))
        seen("account.updated", meter="m5")
        assert result(send("m2", "read", {"quantities": ["energy.import.total",
                                                         "voltage.a"]}))["values"]
        assert result(send("m3", "sync_time"))["status"] == "done"
        cut = send("m5", "cut_off")
        assert result(cut)["relay"] == "open"
        assert result(send("m5", "restore"))["status"] == "done"
        h.sim_meters[4].relay_open = True                # m5 trips by itself
        seen("meter.relay_changed", meter="m5", relay="open")
        m2 = h.sim_meters[1]
        with m2.lock:
            m2._mwh = [x // 2 for x in m2._mwh]           # a reset meter
        seen("meter.register_decrease", meter="m2")
        with m2.lock:
            m2._mwh[0] += 10 ** 11                       # 100,000 kWh in seconds
        seen("meter.register_jump", meter="m2")
        # the disk fails for a while: readings wait in memory, then storage_recovered
        def failing(rows):
            raise JournalError("%s: disk I/O error (the test's)" % h.gw.journal.path)
        h.gw.journal.append_readings = failing
        time.sleep(2)
        del h.gw.journal.append_readings
        seen("gateway.storage_recovered")
        assert result(send("m9", "cut_off"))["code"] == "unknown_meter"
        head.publish("commands", '{"v":1,"id":"forged-1","meter":"m1","action":"cut_off"}')
        wait(lambda: [r for r in head.topic("command-results") if r["id"] is None])
        for c in (send("*", "audit_verify"), send("*", "logs", {"lines": 5}),
                  send("*", "scan", {"port": "p1", "max_s": 60}),
                  send("*", "trace", {"port": "p1", "seconds": 2})):
            assert result(c, timeout=90)["status"] == "done"
        h.sim_meters[3].faults.silent = True                             # m4
        seen("meter.offline", meter="m4", timeout=40)
        assert result(send("m4", "read", {"quantities": ["energy.import.total"]}),
                      timeout=90)["status"] == "failed"
        h.sim_meters[3].faults.silent = False
        seen("meter.online", meter="m4", timeout=40)
        seen("gateway.health", timeout=30)
        # more readings than the 1 MB quota holds, through the sink: the oldest are dropped
        stamp = int(time.time() * 1000)
        for i in range(40):
            h.gw.sink.readings([Reading("m1", "voltage.a", Decimal("230.%d" % (k % 10)), "V",
                                        stamp, stamp) for k in range(1000)])
        seen("journal.dropped", timeout=30)
        # status.json (the service's; `mgw status` reads it) has RFC 3339 times too
        from gateway.store import paths
        with open(paths.status_path(h.cfg.gateway)) as f:
            status = json.load(f)
        assert rfc3339(status["started_at"]) and rfc3339(status["written_at"])
        assert rfc3339(status["uplink"]["last_ack"])
        stopped_at = time.time()
        h.stop()
        # m3's freezes last read 64 days ago: the two the meter no longer keeps are missing
        state = StateStore(os.path.join(str(data), "state.json"))
        saved = state.get("meters", "all") or {}
        saved["last_freeze_day"] = dict(saved.get("last_freeze_day") or {}, m3=(
            dt.date.today() - dt.timedelta(days=64)).isoformat())
        state.put("meters", "all", saved)
        state.close()
        off = wait(lambda: [s for s in head.topic("status") if s["state"] == "offline"])
        # offline since the stop, not since the start
        since = dt.datetime.fromisoformat(off[-1]["since"]).timestamp()
        assert stopped_at - 0.1 <= since <= time.time()
        h.start()                    # what the stop left in the journal goes out now
        seen("gateway.stopped")
        seen("freeze.missing", meter="m3", reason="older than the meter keeps")
        wait(lambda: len([s for s in head.topic("status") if s["state"] == "online"]) >= 2)
        yield head, sent
    finally:
        h.close()
        head.close()


def test_every_documented_message_is_published_and_validates(session):
    head, sent = session
    spec = Spec()
    seen = {}
    with head.lock:
        captured = list(head.messages)
    assert captured
    for topic, payload, _, _ in captured:
        suffix = topic.split("/", 3)[3]
        if suffix == "commands":
            continue                  # ours; checked below as the head-end signed them
        key = spec.message_for(suffix, payload)
        spec.validate(key, payload)
        seen.setdefault(key, payload)
    for cmd in sent:
        spec.validate(spec.message_for("commands", cmd), cmd)
        seen.setdefault("command", cmd)
    documented = {k for k, m in spec.doc["components"]["messages"].items()
                  if "x-mgw-not-captured" not in m}
    assert documented - set(seen) == set()
