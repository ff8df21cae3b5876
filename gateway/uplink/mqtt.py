"""The MQTT uplink: store-and-forward from the journal to the head-end (CONTRACT.md).

The journal is the outbox (paho-mqtt keeps its queue in RAM only): readings, events and
command results are read from it in order, published at QoS 1 with a bounded number in
flight, and the journal cursor advances only when the broker has acknowledged (PUBACK).
After a disconnect, whatever was not acknowledged is sent again with the same `seq`.

One thread owns the paho client and runs its network loop itself (client.loop), so
callbacks only record what happened and never block; the same thread drains the journal
between loop calls. Each connection gets a fresh client: a persistent session at the broker
(clean start off, a session expiry for MQTT 5) keeps commands queued while the gateway was
away. Reconnects back off exponentially with jitter. Commands are handed to a queue with
their MQTT 5 response topic and correlation data.

Commands are acknowledged manually: a command is PUBACKed only when the executor calls
Command.done() (it is in the ledger or answered), so a crash before that makes the broker
deliver it again. The broker never hands us more than RECEIVE_MAXIMUM unacknowledged ones
(MQTT 5 Receive Maximum; Mosquitto's per-client inflight limit for 3.1.1): that is the
back-pressure. A command that finds the queue full anyway stays unacknowledged and is fetched
again by a reconnect once the queue has room.
"""

import collections
import functools
import json
import logging
import queue
import random
import socket
import ssl
import threading
import time
from typing import NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import __version__
from gateway.clock import rfc3339 as clock_rfc3339
from gateway.model import valid_topic

log = logging.getLogger(__name__)

CONSUMER = "uplink"
STREAMS = ("results", "events", "statements", "readings")   # results first: commands are urgent
RECORD_TOPICS = {"events": "/events", "results": "/command-results",
                 "statements": "/statements"}

RECEIVE_MAXIMUM = 64              # unacknowledged commands the broker may hand us
MAX_COMMAND_BYTES = 64 * 1024     # larger ones are acked and dropped (the executor's limit
                                  # is far lower); counted
MAX_PACKET_BYTES = 1024 * 1024    # MQTT 5: the broker drops anything larger for us
MAX_CORRELATION_BYTES = 256
STUCK_MAX = 16                    # unacked commands that found the queue full: reconnect
REPUBLISH_MAX = 64                # results waiting to be sent again (the oldest go first)

_done_lock = threading.Lock()     # Command.done() from any thread; shared, done() is rare


def valid_correlation(hex_text):
    """The bytes of a stored correlation (hex), or None when it is not bounded, valid hex."""
    if not isinstance(hex_text, str) or len(hex_text) > 2 * MAX_CORRELATION_BYTES:
        return None
    try:
        return bytes.fromhex(hex_text)
    except ValueError:
        return None


def rfc3339(ms):
    """Unix milliseconds as RFC 3339 with the gateway's UTC offset."""
    return clock_rfc3339(ms / 1000.0)


class Command:
    """A message from {root}/commands, with what is needed to answer it. `ack` is called
    once by done(); commands built without one (tests, QoS 0) need no acknowledgement."""

    __slots__ = ("payload", "response_topic", "correlation_data", "received_at", "_ack")

    def __init__(self, payload, response_topic=None, correlation_data=None, ack=None):
        self.payload = payload
        self.response_topic = response_topic
        self.correlation_data = correlation_data
        self.received_at = time.time()
        self._ack = ack

    def done(self):
        """The command is durable (in the ledger) or answered: let the broker forget it.
        Idempotent, thread-safe, never blocks (the uplink thread sends the PUBACK)."""
        with _done_lock:
            ack, self._ack = self._ack, None
        if ack is not None:
            ack()


class Uplink(threading.Thread):
    def __init__(self, cfg, gateway_id, journal, commands=None, started_at=None):
        super().__init__(name="uplink", daemon=True)
        self.cfg = cfg
        self.gateway_id = gateway_id
        self.root = "%s/%s" % (cfg.topic_root.rstrip("/"), gateway_id)
        self.journal = journal
        self.commands = commands if commands is not None else queue.Queue(maxsize=1000)
        self.started_at = started_at or time.time()
        self.v5 = cfg.mqtt_version == "5"
        self._halt = threading.Event()
        self._connect_refused = False        # the last CONNACK said no
        self._client = None
        self._connected = False
        self._lock = threading.Lock()
        self._acked = []                  # mids acknowledged, recorded by on_publish
        self._inflight = {}               # mid -> (stream, last_seq)
        self._pending = {s: [] for s in STREAMS}   # published, in order: [last_seq, mid, acked]
        self._sent_upto = {}
        self._wake = threading.Event()
        self._gen = 0                     # which client (connection) a command came with
        self._to_ack = collections.deque()    # (gen, mid, qos) from Command.done()
        self._stuck = 0                   # unacked commands of this connection not queued
        self._logged = set()              # conditions logged once (until they clear)
        self._retained = {}               # sub-topic -> payload, sent again on each connect
        self._retain_due = set()
        self.ota_chunks = None            # (topic tail, payload) -> None: gateway/ota
        self._again = collections.deque(maxlen=REPUBLISH_MAX)   # results to send again
        self.heartbeat = time.monotonic()
        self.state = {"connected": False, "broker": "%s:%d" % (cfg.host, cfg.port),
                      "last_ack": None, "last_error": None, "connects": 0,
                      "published": 0, "acked": 0,
                      "skipped": 0,          # rows that could not be published, passed over
                      "refused": 0,          # messages the broker's PUBACK refused
                      "commands_acked": 0,
                      "queue_full": 0,       # commands left unacked for a reconnect
                      "oversize": 0,         # commands above MAX_COMMAND_BYTES, dropped
                      "dropped_qos0": 0,     # QoS 0 commands dropped on a busy queue
                      "malformed": 0}        # incoming messages that broke intake
        self._password = cfg.password
        if cfg.password_file:
            with open(cfg.password_file) as f:
                self._password = f.read().strip()
        for s in STREAMS:
            journal.register(CONSUMER, s)

    # ---------------------------------------------------------------- public

    def stop(self, timeout=5.0):
        self._halt.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def notify(self):
        """New rows in the journal: wake the sender."""
        self._wake.set()

    def retain(self, subtopic, payload):
        """Publish `{root}/{subtopic}` retained (QoS 1) now if connected, and again on every
        connect; a newer payload replaces an unsent one (any thread)."""
        self._retained[subtopic] = payload
        self._retain_due.add(subtopic)
        self._wake.set()

    def _send_retained(self, client):
        while self._retain_due:
            sub = self._retain_due.pop()
            client.publish("%s/%s" % (self.root, sub), self._retained[sub], qos=1,
                           retain=True)

    def republish(self, seq, ts, jid, body):
        """A command result published before (seq, ts in ms, jid, body as journalled), sent
        again as the same bytes, where it went the first time, for a repeated command. Not
        journalled: if it is lost, the head-end asks again."""
        self._again.append((seq, ts, jid, body))
        self._wake.set()

    def status(self, journal_stats=None):
        """Connection state, backlog per stream and the age of the oldest unsent reading
        (pass the journal's stats when the caller has them already)."""
        out = dict(self.state)
        try:
            stats = (journal_stats or self.journal.stats())["streams"]
            backlog = {s: stats[s]["consumers"].get(CONSUMER, {}).get("pending", 0)
                       for s in STREAMS}
            # the oldest reading the head-end has not acknowledged (rows before it may still
            # be kept for cost control)
            first = self.journal.read(CONSUMER, "readings", limit=1)
            oldest = first[0].gw_ts if first else None
        except Exception:      # a failing disk must not break status reports
            backlog, oldest = {}, None
        out["backlog"] = backlog
        out["last_ack"] = clock_rfc3339(out["last_ack"])    # RFC 3339, as in every payload
        out["oldest_unsent_age_s"] = round(time.time() - oldest / 1000.0, 1) if oldest else 0
        return out

    def publish_now(self, subtopic, payload):
        """A message outside the journal (an update's chunk requests), at QoS 0: sent now
        if connected, else False and the caller asks again later."""
        client = self._client
        if not self._connected or client is None:
            return False
        return client.publish("%s/%s" % (self.root, subtopic), payload,
                              qos=0).rc == mqtt.MQTT_ERR_SUCCESS

    # ---------------------------------------------------------------- client

    def _status_payload(self, state, since, **extra):
        """online: since this connection; offline after a clean stop: since the stop; the
        Last Will (`"unclean": true`): since the connection it ends began, since the
        gateway cannot know when the broker will notice the loss (its arrival says that)."""
        return json.dumps(dict({"v": 1, "state": state, "version": __version__,
                                "since": clock_rfc3339(since)}, **extra),
                          separators=(",", ":"))

    def _new_client(self):
        cfg = self.cfg
        client_id = cfg.client_id or "mgw-%s" % self.gateway_id
        if self.v5:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv5, reconnect_on_failure=False,
                                 manual_ack=True)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                 clean_session=False, protocol=mqtt.MQTTv311,
                                 reconnect_on_failure=False, manual_ack=True)
        client.max_inflight_messages_set(cfg.inflight_max)
        client.max_queued_messages_set(0)
        if cfg.username:
            client.username_pw_set(cfg.username, self._password)
        if cfg.get("tls") or cfg.tls_ca or cfg.tls_cert:
            # ca_certs None: the system's CA store
            client.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key,
                           cert_reqs=ssl.CERT_REQUIRED)
        client.will_set(self.root + "/status", self._status_payload(
            "offline", time.time(), unclean=True), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = lambda *a, **k: None
        return client

    # callbacks: record and return (they run inside client.loop on this thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._connect_refused = True
            self.state["last_error"] = "broker refused the connection: %s" % reason_code
            return
        self._connected = True
        self.state["connected"] = True
        self.state["connects"] += 1
        self.state["last_error"] = None
        # subscribe on every connect: a reconnect may have lost the subscription
        client.subscribe(self.root + "/commands", qos=1)
        if self.ota_chunks is not None:
            # QoS 0: the updater asks again for what does not come
            client.subscribe(self.root + "/ota/chunks/+/+", qos=0)
        client.publish(self.root + "/status", self._status_payload("online", time.time()),
                       qos=1, retain=True)
        self._retain_due.update(self._retained)
        log.info("uplink connected to %s (%s)", self.state["broker"],
                 "MQTT 5" if self.v5 else "MQTT 3.1.1")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected = False
        self.state["connected"] = False
        if not self._connect_refused and reason_code is not None and \
                getattr(reason_code, "is_failure", False):
            self.state["last_error"] = "disconnected: %s" % reason_code

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            # the broker refused it (too large, not authorised): it is passed over, since
            # sending it again would be refused again
            self._log_once("refused", logging.ERROR, "uplink: the broker refused a message "
                           "(%s); passed over", reason_code)
            self.state["refused"] += 1
        with self._lock:
            self._acked.append(mid)

    def _log_once(self, key, level, msg, *args, **kw):
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args, **kw)

    def _ack_later(self, gen, mid, qos):
        # any thread (Command.done): the uplink thread sends it
        self._to_ack.append((gen, mid, qos))
        self._wake.set()

    def _send_acks(self, client):
        while True:
            try:
                gen, mid, qos = self._to_ack.popleft()
            except IndexError:
                return
            # an ack for an older connection is dropped: the broker redelivers on resume
            if gen == self._gen and self._connected:
                client.ack(mid, qos)
                self.state["commands_acked"] += 1

    def _on_message(self, client, userdata, message):
        prefix = self.root + "/ota/chunks/"
        if self.ota_chunks is not None and message.topic.startswith(prefix):
            self.ota_chunks(message.topic[len(prefix):], message.payload)
            return
        try:
            self._intake(message)
        except Exception:
            # a message that breaks intake must not end the session (and would break it
            # again on every redelivery): count it, acknowledge it, forget it
            self.state["malformed"] += 1
            self._log_once("malformed", logging.WARNING, "uplink: malformed incoming "
                           "message dropped", exc_info=True)
            qos, mid = getattr(message, "qos", 0), getattr(message, "mid", None)
            if qos in (1, 2) and isinstance(mid, int):
                self._ack_later(self._gen, mid, qos)

    def _intake(self, message):
        qos = message.qos
        ack = functools.partial(self._ack_later, self._gen, message.mid, qos) if qos else None
        payload = message.payload
        if len(payload) > MAX_COMMAND_BYTES:
            self.state["oversize"] += 1
            self._log_once("oversize", logging.WARNING, "uplink: a command of %d bytes "
                           "dropped (more than %d)", len(payload), MAX_COMMAND_BYTES)
            if ack:
                ack()
            return
        props = message.properties
        response_topic = valid_topic(getattr(props, "ResponseTopic", None))
        correlation = getattr(props, "CorrelationData", None)
        if not isinstance(correlation, (bytes, bytearray)) or \
                len(correlation) > MAX_CORRELATION_BYTES:
            correlation = None
        cmd = Command(bytes(payload), response_topic,
                      bytes(correlation) if correlation is not None else None, ack)
        maxsize = getattr(self.commands, "maxsize", 0)
        if not qos and maxsize and self.commands.qsize() >= maxsize // 2:
            # QoS 0 is never redelivered anyway; keep the room for QoS 1
            self.state["dropped_qos0"] += 1
            self._log_once("qos0", logging.WARNING, "uplink: QoS 0 commands dropped while "
                           "the command queue is busy")
            return
        try:
            self.commands.put_nowait(cmd)
        except queue.Full:
            if not qos:
                self.state["dropped_qos0"] += 1
                return
            # not acknowledged: the broker keeps it and delivers it again after a reconnect
            self._stuck += 1
            self.state["queue_full"] += 1
            self._log_once("queue_full", logging.WARNING, "uplink: command queue full; "
                           "commands left unacknowledged until it has room")

    def _must_refetch(self):
        """Commands were left unacked on a full queue: reconnect so the broker delivers them
        again, once the queue has room for them (sooner would only leave them stuck again),
        or when so many are stuck that the broker's window is clogged."""
        if not self._stuck:
            return False
        maxsize = getattr(self.commands, "maxsize", 0)
        room = not maxsize or self.commands.qsize() <= maxsize // 2
        return room or (self._stuck > STUCK_MAX and
                        self.commands.qsize() < maxsize - STUCK_MAX)

    # ---------------------------------------------------------------- the thread

    def run(self):
        backoff = 1.0
        while not self._halt.is_set():
            self.heartbeat = time.monotonic()
            try:
                self._session()
                backoff = 1.0 if self.state["connects"] else backoff
            except (OSError, ssl.SSLError, socket.error) as exc:
                self.state["last_error"] = "cannot connect to %s: %s" % (
                    self.state["broker"], getattr(exc, "strerror", None) or exc)
            except Exception:
                log.exception("uplink: unexpected error")
                self.state["last_error"] = "internal error (see log)"
            self._connected = False
            self.state["connected"] = False
            self._reset_inflight()
            if self._halt.is_set():
                break
            if self.state["last_error"]:
                log.warning("uplink: %s; retrying in about %.0f s", self.state["last_error"],
                            backoff)
            # jittered exponential back-off: thousands of boxes must not reconnect in step
            self._halt.wait(backoff * random.uniform(0.5, 1.5))
            backoff = min(self.cfg.reconnect_max_s, backoff * 2)

    def _session(self):
        cfg = self.cfg
        self._gen += 1
        self._stuck = 0
        self._logged.discard("queue_full")
        client = self._new_client()
        self._client = client
        self.state["last_error"] = None
        self._connect_refused = False
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry_s
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            props.MaximumPacketSize = MAX_PACKET_BYTES
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s, clean_start=False,
                           properties=props)
        else:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        deadline = time.monotonic() + 15
        while not self._connected and not self._halt.is_set():
            rc = client.loop(timeout=0.2)
            if self._connect_refused:
                client.disconnect()
                return
            if rc != mqtt.MQTT_ERR_SUCCESS or time.monotonic() > deadline:
                self.state["last_error"] = self.state["last_error"] or \
                    "no CONNACK from %s" % self.state["broker"]
                return
        try:
            while self._connected and not self._halt.is_set():
                self.heartbeat = time.monotonic()
                self._send_acks(client)
                self._collect_acks()
                self._send_retained(client)
                self._send()
                rc = client.loop(timeout=0.02 if self._has_work() else 0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    self.state["last_error"] = "connection lost (%s)" % mqtt.error_string(rc)
                    break
                if self._must_refetch():
                    log.warning("uplink: reconnecting to fetch %d unacknowledged commands "
                                "again", self._stuck)
                    self.state["last_error"] = "reconnecting to fetch %d commands left " \
                        "unacknowledged on a full queue" % self._stuck
                    break
            if self._halt.is_set() and self._connected:
                self._drain(client)
        finally:
            try:
                client.disconnect()
                client.loop(timeout=0.1)
            except Exception:
                pass

    def _drain(self, client, seconds=2.0):
        """On a clean stop: let acknowledgements of what is in flight arrive, publish the
        retained offline status (the Will is only for an unclean end)."""
        end = time.monotonic() + seconds
        self._send_acks(client)
        while self._inflight and time.monotonic() < end:
            client.loop(timeout=0.05)
            self._collect_acks()
            self._send_acks(client)
        info = client.publish(self.root + "/status", self._status_payload(
            "offline", time.time()), qos=1, retain=True)
        end = time.monotonic() + 1.0
        while not info.is_published() and time.monotonic() < end:
            client.loop(timeout=0.05)

    def _has_work(self):
        return bool(self._inflight) or self._wake.is_set() or bool(self._to_ack) or \
            bool(self._again)

    def _reset_inflight(self):
        with self._lock:
            self._acked.clear()
        self._inflight.clear()
        for s in STREAMS:
            self._pending[s] = []
        self._sent_upto.clear()

    def _collect_acks(self):
        with self._lock:
            acked, self._acked = self._acked, []
        for mid in acked:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue                      # the status message, or a stale mid
            stream, _ = entry
            for item in self._pending[stream]:
                if item[1] == mid:
                    item[2] = True
            self.state["acked"] += 1
        for stream in STREAMS:
            pend = self._pending[stream]
            upto = None
            while pend and pend[0][2]:
                upto = pend.pop(0)[0]
            if upto is not None:
                self.journal.ack(CONSUMER, stream, upto)
                self.state["last_ack"] = time.time()

    def _send_again(self):
        while self._again:
            seq, ts, jid, body = self._again.popleft()
            try:
                payload, extra_topic, props = record_payload(_Row(seq, ts, body), "results",
                                                             jid)
                self._client.publish(self.root + "/command-results", payload, qos=1)
                if extra_topic:
                    self._client.publish(extra_topic, payload, qos=1, properties=props)
            except Exception as exc:          # a bad stored body: it was sent once already
                self._log_once("again", logging.WARNING, "uplink: result %d not sent again: "
                               "%s", seq, exc)

    def _send(self):
        self._wake.clear()
        self._send_again()
        jid = getattr(self.journal, "jid", None)
        for stream in STREAMS:
            limit = self.cfg.batch_max
            while len(self._inflight) < self.cfg.inflight_max:
                after = self._sent_upto.get(stream)
                if after is None:
                    after = self.journal.cursor(CONSUMER, stream)
                extra_topic = props = None
                if stream == "readings":
                    rows = self.journal.read(CONSUMER, stream, limit=limit, after=after)
                    if not rows:
                        break
                    age = time.time() - rows[0].gw_ts / 1000.0
                    if len(rows) < limit and age < self.cfg.batch_age_s and \
                            limit == self.cfg.batch_max:
                        self._wake.set()      # come back when the batch is old enough
                        break
                    topic = self.root + "/readings"
                    last = rows[-1].seq
                else:
                    rows = self.journal.read(CONSUMER, stream, limit=1, after=after)
                    if not rows:
                        break
                    topic = self.root + RECORD_TOPICS[stream]
                    last = rows[0].seq
                try:
                    if stream == "readings":
                        payload = readings_payload(rows, jid)
                    else:
                        payload, extra_topic, props = record_payload(rows[0], stream, jid)
                    info = self._client.publish(topic, payload, qos=1)
                except Exception as exc:     # ValueError, TypeError, too large, a bad row
                    if len(rows) > 1:
                        limit = max(1, len(rows) // 2)    # a batch too large: smaller
                        continue
                    self._skip(stream, last, exc)
                    continue
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    return                    # the connection's trouble, not the row's
                if extra_topic:
                    # MQTT 5 request/response: the result also goes where it was asked;
                    # best effort, the contract topic carries it in any case
                    try:
                        self._client.publish(extra_topic, payload, qos=1, properties=props)
                    except Exception as exc:
                        self._log_once("response_topic", logging.WARNING,
                                       "uplink: result %s/%d not sent to its response "
                                       "topic: %s", stream, last, exc)
                self._inflight[info.mid] = (stream, last)
                self._pending[stream].append([last, info.mid, False])
                self._sent_upto[stream] = last
                self.state["published"] += 1

    def _skip(self, stream, seq, why):
        """A row that cannot be published: counted, logged, and treated as delivered so the
        stream behind it moves on (it would fail the same way for ever)."""
        log.error("uplink: %s row %d cannot be published (%s); skipped", stream, seq,
                  str(why).splitlines()[0] if str(why) else type(why).__name__)
        self.state["skipped"] += 1
        self._pending[stream].append([seq, None, True])
        self._sent_upto[stream] = seq


class _Row(NamedTuple):
    """A journal row as record_payload reads it."""
    seq: int
    ts: int
    body: dict


def readings_payload(rows, jid=None):
    """The contract's readings batch; values are spliced as the journal's exact JSON.
    `jid` names the journal that numbered the rows."""
    parts = []
    for r in rows:
        unit = json.dumps(r.unit) if r.unit is not None else "null"
        parts.append('{"seq":%d,"meter":%s,"ts":"%s","q":%s,"value":%s,"unit":%s,'
                     '"gw_ts":"%s","quality":"%s"}' % (
                         r.seq, json.dumps(r.meter, ensure_ascii=False), rfc3339(r.ts),
                         json.dumps(r.quantity), r.value_json, unit, rfc3339(r.gw_ts),
                         r.quality))
    return '{"v":1,"jid":%s,"first_seq":%d,"last_seq":%d,"readings":[%s]}' % (
        json.dumps(jid), rows[0].seq, rows[-1].seq, ",".join(parts))


def record_payload(row, stream, jid=None):
    """(payload, response topic or None, MQTT 5 properties) of an event or a result. A
    response topic is used only for an authenticated command's result (id not null) and
    only when it is a topic we may publish to."""
    body = dict(row.body)
    response_topic = valid_topic(body.pop("_response_topic", None))
    correlation = valid_correlation(body.pop("_correlation_data", None))
    out = {"v": 1, "jid": jid, "seq": row.seq, "ts": rfc3339(row.ts)}
    out.update(body)
    payload = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
    try:
        payload.encode("utf-8")
    except UnicodeEncodeError:     # lone surrogates from hostile JSON: escape them
        payload = json.dumps(out, separators=(",", ":"))
    if stream != "results" or body.get("id") is None:
        return payload, None, None
    props = None
    if response_topic:
        props = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            props.CorrelationData = correlation
    return payload, response_topic, props
