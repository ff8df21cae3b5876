"""The command executor: signed remote commands, local technician operations and cost
control's own cut-offs and restores, all through one path.

Verify (size, JSON, fields, Ed25519 signature, validity window with clock-skew allowance and
a maximum length, meter known, action and params) -> policy (guarantee, cut-off rate limit,
trusted clock) -> ledger entry written -> `accepted` -> executed at top priority on the
meter's line -> the relay state read back -> `done` or `failed`. The ledger entry comes
first, so a crash in the middle is resumed at start-up by reading the meter, never by
sending the frame again. The same id twice (QoS 1 does that) is executed once and its
result sent again. Every step goes to the hash-chained audit trail.
"""

import collections
import datetime as _dt
import json
import logging
import os
import queue
import re
import threading
import time
from decimal import Decimal, InvalidOperation

from gateway import meterio
from gateway.audit import AuditTrail
from gateway.port import ON_DEMAND, RELAY, Request
from gateway.signing import KeyError_, load_public_key, verify
from protocols import dlt645 as D

log = logging.getLogger(__name__)

ACTIONS = ("cut_off", "restore", "guarantee_on", "guarantee_off", "topup", "read",
           "sync_time", "release_breaker", "weather_hold", "account_update")
# gateway-wide actions (an extension of the contract, docs/mqtt.md): meter is "*"
GATEWAY_ACTIONS = ("release_breaker", "weather_hold")
RELAY_ACTIONS = ("cut_off", "restore", "guarantee_on", "guarantee_off")
FINAL = ("done", "failed", "rejected")
MAX_TOPUP = Decimal("100000.00")
READBACK_TRIES = 4


def _failpoint(name):
    """Crash here if MGW_FAILPOINT names this point: the restart-recovery tests kill the
    process at exact steps of the command path. Inert unless the variable is set."""
    if os.environ.get("MGW_FAILPOINT") == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def parse_time(value, field):
    if not isinstance(value, str):
        raise ValueError("%s must be an RFC 3339 time string" % field)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("%s is not an RFC 3339 time: %r" % (field, value[:40])) from None
    if t.tzinfo is None:
        raise ValueError("%s needs a UTC offset: %r" % (field, value[:40]))
    return t


class Rejected(Exception):
    pass


class Executor(threading.Thread):
    def __init__(self, gateway):
        super().__init__(name="commands", daemon=True)
        self.gw = gateway
        self.cfg = gateway.cfg
        self.state = gateway.state
        self.keys = []
        for path in self.cfg.control.public_keys:
            try:
                self.keys.append(load_public_key(path))
            except KeyError_ as exc:
                log.error("%s: commands signed with it will be rejected", exc)
        self.audit = AuditTrail(os.path.join(self.cfg.gateway.data_dir, "audit.log"),
                                on_entry=self._audit_event)
        self.spool = os.path.join(self.cfg.gateway.data_dir, "spool")
        self._prepare_spool()
        self._halt = threading.Event()
        self._local = queue.Queue()
        self._lock = threading.RLock()
        self.executed = collections.Counter()

    # ---------------------------------------------------------------- lifecycle

    def _prepare_spool(self):
        """The technician's path (`mgw relay`): a folder writable by root and the gateway's
        group only. No socket, nothing reachable from the network."""
        try:
            os.makedirs(self.spool, exist_ok=True)
            os.chmod(self.spool, 0o2770)
            import grp
            try:
                gid = grp.getgrnam(self.cfg.control.local_group).gr_gid
                os.chown(self.spool, -1, gid)
            except (KeyError, PermissionError):
                pass
        except OSError as exc:
            log.warning("spool %s: %s (local relay operation unavailable)", self.spool,
                        exc.strerror)

    def restart(self):
        new = Executor(self.gw)
        self.gw.executor = new
        new.start()

    def stop(self):
        self._halt.set()
        if self.is_alive():
            self.join(5)

    def run(self):
        try:
            self.resume()
        except Exception:
            log.exception("resuming unfinished commands")
        last_prune = 0.0
        while not self._halt.is_set():
            try:
                cmd = self.gw.commands.get(timeout=0.3)
            except queue.Empty:
                cmd = None
            try:
                if cmd is not None:
                    self.handle_remote(cmd.payload, cmd.response_topic, cmd.correlation_data)
                while not self._local.empty():
                    fn = self._local.get_nowait()
                    fn()
                self._scan_spool()
                if time.time() - last_prune > 3600:
                    last_prune = time.time()
                    self._prune()
            except Exception:
                # a bug must not stop command handling: log, count, carry on
                self.executed["internal_errors"] += 1
                log.exception("command executor")

    def submit_local(self, fn):
        self._local.put(fn)

    # ---------------------------------------------------------------- results

    def _audit_event(self, entry):
        # the trail is uploaded too: each entry as an event, hash included
        try:
            self.gw.journal.append_event("audit", entry=entry)
        except Exception:
            log.exception("audit upload")

    def _result(self, cmd_id, status, reason=None, meta=None, **extra):
        body = {"id": cmd_id, "status": status}
        if reason is not None:
            body["reason"] = reason
        body.update(extra)
        if meta:
            if meta.get("response_topic"):
                body["_response_topic"] = meta["response_topic"]
            if meta.get("correlation") is not None:
                body["_correlation_data"] = meta["correlation"]
        self.gw.journal.append_result(body)
        if self.gw.uplink is not None:
            self.gw.uplink.notify()
        return body

    # ---------------------------------------------------------------- remote commands

    def handle_remote(self, payload, response_topic=None, correlation=None):
        meta = {"response_topic": response_topic,
                "correlation": correlation.hex() if correlation else None}
        cmd_id = None
        try:
            cmd = self._parse(payload)
            cmd_id = cmd.get("id") if isinstance(cmd.get("id"), str) else None
            self._check_fields(cmd)
            why = verify(cmd, self.keys)
            if why:
                raise Rejected(why)
        except Rejected as exc:
            # unauthenticated: answered and audited, never stored in the ledger
            self.audit.append("command.rejected", id=cmd_id, reason=str(exc),
                              payload=payload[:2048].decode("utf-8", "replace"))
            self.executed["rejected"] += 1
            return self._result(cmd_id, "rejected", str(exc), meta)
        known = self.state.get("commands", cmd_id)
        if known is not None and known.get("digest") not in (None, _digest(cmd)):
            reason = "replayed id (used before by a different command)"
            self.audit.append("command.rejected", id=cmd_id, reason=reason, command=cmd)
            self.executed["rejected"] += 1
            return self._result(cmd_id, "rejected", reason, meta)
        if known is not None:
            # the same command again (QoS 1 redelivery, a head-end retry): never twice
            self.audit.append("command.duplicate", id=cmd_id, state=known.get("state"))
            if known.get("result"):
                return self._result(cmd_id, known["result"]["status"],
                                    known["result"].get("reason"), meta,
                                    **{k: v for k, v in known["result"].items()
                                       if k not in ("id", "status", "reason")})
            return None                       # still running: its result will come
        try:
            self._check_window(cmd)
            meter = self._check_meter_and_params(cmd)
            self._policy(cmd, meter)
        except Rejected as exc:
            self._record(cmd, "rejected", meta, source="remote", digest=_digest(cmd),
                         result={"status": "rejected", "reason": str(exc)})
            self.audit.append("command.rejected", id=cmd_id, reason=str(exc), command=cmd)
            self.executed["rejected"] += 1
            return self._result(cmd_id, "rejected", str(exc), meta)
        return self.execute(cmd, meter, meta, source="remote")

    def _parse(self, payload):
        if len(payload) > self.cfg.control.max_command_bytes:
            raise Rejected("oversized command (%d bytes, at most %d)"
                           % (len(payload), self.cfg.control.max_command_bytes))
        try:
            cmd = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise Rejected("malformed JSON: %s" % str(exc)[:80]) from None
        if not isinstance(cmd, dict):
            raise Rejected("malformed command: not a JSON object")
        return cmd

    def _check_fields(self, cmd):
        if cmd.get("v") != 1:
            raise Rejected("unsupported version %r (v must be 1)" % (cmd.get("v"),))
        cid = cmd.get("id")
        if not isinstance(cid, str) or not 1 <= len(cid) <= 128 or \
                not re.match(r"^[\w.:-]+$", cid):
            raise Rejected("missing or bad id")
        for field in ("meter", "action", "issued_at", "expires_at"):
            if not isinstance(cmd.get(field), str):
                raise Rejected("missing field %s" % field)
        if "params" in cmd and not isinstance(cmd["params"], dict):
            raise Rejected("params must be an object")

    def _check_window(self, cmd):
        try:
            issued = parse_time(cmd["issued_at"], "issued_at")
            expires = parse_time(cmd["expires_at"], "expires_at")
        except ValueError as exc:
            raise Rejected(str(exc)) from None
        now = _dt.datetime.now(_dt.timezone.utc)
        skew = _dt.timedelta(seconds=self.cfg.control.clock_skew_s)
        if expires <= issued:
            raise Rejected("expires_at is not after issued_at")
        if (expires - issued).total_seconds() > self.cfg.control.max_validity_s:
            raise Rejected("validity window of %d s is longer than the allowed %d s"
                           % ((expires - issued).total_seconds(),
                              self.cfg.control.max_validity_s))
        if issued > now + skew:
            raise Rejected("not yet valid (issued_at is in the future)")
        if now > expires + skew:
            raise Rejected("expired")

    def _check_meter_and_params(self, cmd):
        action = cmd["action"]
        if action not in ACTIONS:
            raise Rejected("unknown action %s" % action[:32])
        params = cmd.get("params") or {}
        if action in GATEWAY_ACTIONS:
            if cmd["meter"] != "*":
                raise Rejected("%s applies to the whole gateway: meter must be \"*\""
                               % action)
            if action == "weather_hold" and not isinstance(params.get("on"), bool):
                raise Rejected("weather_hold needs params.on, true or false")
            return GatewayTarget()
        meter = self.gw.meter(cmd["meter"])
        if meter is None:
            raise Rejected("unknown meter %s" % cmd["meter"][:64])
        if action == "topup":
            amount = params.get("amount")
            if not isinstance(amount, str):
                raise Rejected("topup needs params.amount as a decimal string")
            try:
                value = Decimal(amount)
            except InvalidOperation:
                raise Rejected("topup amount is not a decimal number") from None
            if not value.is_finite() or value <= 0 or value > MAX_TOPUP or \
                    value != value.quantize(Decimal("0.01")):
                raise Rejected("topup amount must be positive yuan with at most 2 decimals")
            if not isinstance(params.get("txn"), str) or not params["txn"]:
                raise Rejected("topup needs params.txn, the payment's transaction id")
            if self.gw.costcontrol is None or not self.gw.costcontrol.has_account(meter.id):
                raise Rejected("meter %s has no prepaid account on this gateway" % meter.id)
        elif action == "account_update":
            if self.gw.costcontrol is None or not self.gw.costcontrol.has_account(meter.id):
                raise Rejected("meter %s has no prepaid account on this gateway" % meter.id)
            why = self.gw.costcontrol.check_update(params)
            if why:
                raise Rejected(why)
        elif action == "read":
            qs = params.get("quantities", [])
            if not isinstance(qs, list) or not all(isinstance(q, str) for q in qs):
                raise Rejected("read needs params.quantities, a list of names")
            try:
                if meter.protocol == "dlt645":
                    meterio.dis_for(self._spec(meter), qs)
            except meterio.UnknownQuantity as exc:
                raise Rejected(str(exc)) from None
        elif action in RELAY_ACTIONS:
            if meter.protocol != "dlt645":
                raise Rejected("meter %s (%s) has no relay this gateway can operate"
                               % (meter.id, meter.profile))
            if meter.secured and action in ("cut_off", "restore"):
                payload = params.get("payload")
                if not isinstance(payload, str) or not re.match(r"^[0-9A-Fa-f]{32,}$",
                                                                 payload):
                    raise Rejected("meter %s is at the secured level: the command must "
                                   "carry the master station's relay payload (hex)"
                                   % meter.id)
            mode = params.get("mode")
            if action == "restore" and mode not in (None, "close_allowed", "direct"):
                raise Rejected("restore mode is close_allowed or direct")
        return meter

    def _policy(self, cmd, meter):
        action = cmd["action"]
        if action != "cut_off":
            return                         # restores are never delayed by policy
        flags = self.state.get("guarantee", meter.id) or {}
        if flags.get("on"):
            raise Rejected("meter %s is under guarantee (保电): no cut-off" % meter.id)
        if not self.gw.clock.trusted():
            raise Rejected("the gateway clock is not synchronised: no cut-off")
        limit = self.cfg.control.cutoffs_per_hour
        hour_ago = time.time() - 3600
        recent = sum(1 for d in self.state.all("commands").values()
                     if d.get("action") == "cut_off" and d.get("state") in ("sent", "done",
                                                                            "failed")
                     and (d.get("sent_at") or 0) > hour_ago)
        if recent >= limit:
            raise Rejected("cut-off limit reached (%d per hour for this gateway)" % limit)

    # ---------------------------------------------------------------- execution

    def _spec(self, meter):
        return self.gw.spec(meter)

    def _record(self, cmd, state, meta=None, source="remote", **fields):
        doc = {"meter": cmd.get("meter"), "action": cmd.get("action"),
               "params": cmd.get("params") or {}, "state": state, "source": source,
               "received_at": time.time(), "expires_at": _epoch(cmd.get("expires_at")),
               "response_topic": (meta or {}).get("response_topic"),
               "correlation": (meta or {}).get("correlation")}
        old = self.state.get("commands", cmd["id"]) or {}
        old.update({k: v for k, v in doc.items() if v is not None or k not in old})
        old.update(fields)
        self.state.put("commands", cmd["id"], old)
        return old

    def execute(self, cmd, meter, meta=None, source="remote"):
        """Ledger first, then the meter; returns the final result body."""
        cid = cmd["id"]
        self._record(cmd, "accepted", meta, source=source, digest=_digest(cmd))
        self.audit.append("command.accepted", id=cid, source=source, command=cmd)
        self._result(cid, "accepted", None, meta, meter=meter.id, action=cmd["action"])
        _failpoint("after_ledger")
        return self._run_accepted(cmd, meter, meta, source)

    def _run_accepted(self, cmd, meter, meta, source):
        cid = cmd["id"]
        action = cmd["action"]
        try:
            if action in RELAY_ACTIONS:
                # the whole operation is one job on the line: its transactions follow each
                # other without a poll in between
                status, reason, extra = self._on_line(meter, lambda: self._relay(cmd, meter))
            elif action == "topup":
                status, reason, extra = self._topup(cmd, meter)
            elif action == "read":
                status, reason, extra = self._read(cmd, meter)
            elif action in GATEWAY_ACTIONS:
                status, reason, extra = self._gateway_action(cmd)
            elif action == "account_update":
                account = self.gw.costcontrol.update_account(meter.id, cmd["params"])
                status, reason, extra = "done", None, {"account": account}
            else:
                status, reason, extra = self._sync_time(cmd, meter)
        except Exception as exc:
            log.exception("command %s", cid)
            status, reason, extra = "failed", "internal error: %s" % exc, {}
        result = {"status": status}
        if reason:
            result["reason"] = reason
        result.update(extra)
        self._record(cmd, status, meta, source=source, result=result, finished_at=time.time())
        self.audit.append("command.result", id=cid, result=result)
        self.executed[status] += 1
        if status == "done" and action in ("cut_off", "restore") and extra.get("relay"):
            self.gw.sink.event("relay.opened" if extra["relay"] == "open" else "relay.closed",
                               meter=meter.id, command=cid, source=source,
                               **({"awaiting_customer": True}
                                  if extra.get("awaiting_customer") else {}))
        return self._result(cid, status, reason, meta, meter=meter.id, action=action, **extra)

    def _ask(self, meter, request, priority=RELAY, timeout=30):
        worker = self.gw.port_worker(meter.port)
        if threading.current_thread() is worker:
            return worker.transact(request)
        return worker.submit(request, priority).result(timeout)

    def _on_line(self, meter, fn, priority=RELAY, timeout=120):
        """Run fn on the meter's line thread (as one job) and return what it returns."""
        worker = self.gw.port_worker(meter.port)
        box = {}

        def job(w):
            try:
                box["value"] = fn()
            except Exception as exc:             # reported as a failed command
                box["error"] = exc
        worker.submit_job(job, priority).result(timeout)
        if "error" in box:
            raise box["error"]
        if "value" not in box:
            return "failed", "the line did not run the command (port error or stopping)", {}
        return box["value"]

    def read_relay(self, meter, priority=RELAY):
        """(status dict or None, error, frames) from status word 3."""
        res = self._ask(meter, meterio.read_request(self._spec(meter), 0x04000503), priority)
        if not res.ok:
            return None, res.error, res.frames
        msg = res.answer
        if isinstance(msg, D.ErrorResponse):
            return None, "meter says %s" % (", ".join(msg.flags) or msg.code), res.frames
        if not isinstance(msg, D.ReadResponse) or not msg.values:
            return None, "unexpected answer to the status read", res.frames
        vals = {v.quantity: v.value for v in msg.values}
        return {"relay": vals.get("relay.state"), "relay_command": vals.get("relay.command"),
                "guarantee": vals.get("guarantee.state")}, None, res.frames

    def _relay(self, cmd, meter):
        action = cmd["action"]
        params = cmd.get("params") or {}
        before, err, frames = self.read_relay(meter)
        self.audit.append("relay.before", id=cmd["id"], state=before, error=err,
                          frames=_hex(frames))
        if action == "cut_off":
            rc = D.RelayCommand.TRIP
        elif action == "restore":
            direct = params.get("mode") == "direct" or (
                params.get("mode") is None and self.cfg.control.restore_mode == "direct_close")
            rc = D.RelayCommand.DIRECT_CLOSE if direct else D.RelayCommand.CLOSE_ALLOWED
        elif action == "guarantee_on":
            rc = D.RelayCommand.GUARANTEE
        else:
            rc = D.RelayCommand.GUARANTEE_RELEASE
        if meter.secured and action in ("cut_off", "restore"):
            frame = D.relay_control_secured(meter.address, bytes.fromhex(params["payload"]))
        else:
            valid_until = (_dt.datetime.now() + _dt.timedelta(seconds=meter.relay_valid_s)
                           ).replace(microsecond=0)
            frame = D.relay_control(meter.address, rc, password_level=meter.password_level,
                                    password=meter.password,
                                    operator_code=meter.operator_code,
                                    valid_until=valid_until)
        # the ledger says "sent" before the frame goes: a crash after this line is
        # resumed by reading the meter, never by sending again
        self._record(cmd, "sent", sent_at=time.time(), relay_command=rc.name)
        res = self._ask(meter, Request(meter.id, "dlt645", frame, 12 + 2, label=rc.name))
        _failpoint("after_send")
        self.audit.append("relay.frame", id=cmd["id"], command=rc.name, ok=res.ok,
                          error=res.error, frames=_hex(res.frames))
        if not res.ok:
            after, _, _ = self.read_relay(meter)
            return "failed", "no answer from the meter (%s)" % res.error, _state(after)
        if isinstance(res.answer, D.ErrorResponse):
            after, _, _ = self.read_relay(meter)
            return "failed", "meter refused: %s" % (", ".join(res.answer.flags) or
                                                    res.answer.code), _state(after)
        return self._readback(cmd, meter, rc)

    def _readback(self, cmd, meter, rc):
        after = err = None
        for attempt in range(READBACK_TRIES):
            after, err, frames = self.read_relay(meter)
            self.audit.append("relay.after", id=cmd["id"], state=after, error=err,
                              frames=_hex(frames))
            if after is not None and _reached(rc, after):
                break
            time.sleep(0.3 * (attempt + 1))
        if after is None:
            return "failed", "relay state could not be read back (%s)" % err, {}
        if rc in (D.RelayCommand.GUARANTEE, D.RelayCommand.GUARANTEE_RELEASE):
            on = rc == D.RelayCommand.GUARANTEE
            self.state.put("guarantee", meter.id, {"on": on, "since": time.time()})
            if after.get("guarantee") is not on:
                return "failed", "meter reports guarantee %s" % after.get("guarantee"), \
                    _state(after)
            return "done", None, _state(after)
        if not _reached(rc, after):
            return "failed", "state did not change (relay %s)" % after.get("relay"), \
                _state(after)
        extra = _state(after)
        if rc == D.RelayCommand.CLOSE_ALLOWED and after.get("relay") == "open":
            extra["awaiting_customer"] = True    # the customer closes it at the meter
        return "done", None, extra

    def _topup(self, cmd, meter):
        params = cmd["params"]
        balance, applied = self.gw.costcontrol.apply_topup(meter.id, Decimal(params["amount"]),
                                                           params["txn"], cmd["id"])
        extra = {"balance": str(balance), "txn": params["txn"]}
        if not applied:
            extra["duplicate_txn"] = True
        return "done", None if applied else "txn already applied", extra

    def _read(self, cmd, meter):
        qs = (cmd.get("params") or {}).get("quantities", [])
        worker = self.gw.port_worker(meter.port)
        box = {}

        def job(w):
            box["out"] = meterio.read_now(w, self._spec(meter), qs)
        done = threading.Event()
        req_errors = []

        class _Job:
            def __call__(self, w):
                try:
                    job(w)
                except Exception as exc:
                    req_errors.append(str(exc))
                finally:
                    done.set()
        worker.submit_job(_Job(), ON_DEMAND)
        if not done.wait(60):
            return "failed", "the read did not finish in 60 s", {}
        if req_errors:
            return "failed", req_errors[0], {}
        values, errors = box["out"]
        if not values:
            return "failed", "; ".join(errors) or "no answer", {}
        return "done", "; ".join(errors) or None, {
            "values": [{"q": v.quantity, "value": _jsonable(v.value), "unit": v.unit}
                       for v in values]}

    def _gateway_action(self, cmd):
        cc = self.gw.costcontrol
        if cmd["action"] == "release_breaker":
            cc.release_breaker()
            return "done", None, {"breaker_tripped": False}
        on = cmd["params"]["on"]
        flags = self.state.get("flags", "costcontrol") or {}
        flags["weather_hold"] = on
        self.state.put("flags", "costcontrol", flags)
        self.gw.sink.event("costcontrol.weather_hold", on=on)
        return "done", None, {"weather_hold": on}

    def _sync_time(self, cmd, meter):
        if not self.gw.clock.trusted():
            return "failed", "the gateway clock is not synchronised", {}
        now = _dt.datetime.now()
        if now.minute >= 55 or now.minute < 5:
            return "failed", "not near the hour (meters freeze on the hour)", {}
        worker = self.gw.port_worker(meter.port)
        frame = D.broadcast_time_sync(now.replace(microsecond=0) + _dt.timedelta(seconds=1))
        done = threading.Event()
        worker.submit_job(lambda w: (w.broadcast(frame), done.set()), RELAY)
        done.wait(10)
        return "done", None, {"sent": now.isoformat(timespec="seconds")}

    # ---------------------------------------------------------------- local & cost control

    def local(self, meter_id, action, params=None, source="local", operator=None, reason=None):
        """A command from the box itself (technician, cost control): same path, no
        signature (the caller is trusted by the file system or is the gateway), audited."""
        now = _dt.datetime.now(_dt.timezone.utc)
        cmd = {"v": 1, "id": "%s-%s" % (source, os.urandom(8).hex()), "meter": meter_id,
               "action": action, "params": params or {},
               "issued_at": now.isoformat(), "expires_at": (now + _dt.timedelta(
                   minutes=15)).isoformat()}
        self.audit.append("command.local", id=cmd["id"], source=source, operator=operator,
                          reason=reason, command=cmd)
        try:
            meter = self._check_meter_and_params(cmd)
            self._policy(cmd, meter)
        except Rejected as exc:
            self.audit.append("command.rejected", id=cmd["id"], reason=str(exc))
            return self._result(cmd["id"], "rejected", str(exc), None, meter=meter_id,
                                action=action, source=source)
        return self.execute(cmd, meter, None, source=source)

    def _scan_spool(self):
        try:
            names = os.listdir(self.spool)
        except OSError:
            return
        for name in names:
            if not name.endswith(".req.json"):
                continue
            path = os.path.join(self.spool, name)
            try:
                st = os.stat(path)
                with open(path) as f:
                    req = json.load(f)
            except (OSError, ValueError) as exc:
                log.warning("spool %s: %s", name, exc)
                os.replace(path, path + ".bad")
                continue
            os.unlink(path)
            operator = "%s (uid %d)" % (req.get("operator"), st.st_uid)
            created = req.get("created_at") if isinstance(req.get("created_at"), (int, float)) \
                else st.st_mtime
            if time.time() - created > 120:
                # a technician's request left from before a restart: never act on it late
                body = {"status": "rejected", "reason": "local request expired (older than "
                        "2 minutes)"}
                self.audit.append("command.rejected", source="local", operator=operator,
                                  reason=body["reason"], request=req)
            elif req.get("action") == "status":
                meter = self.gw.meter(req.get("meter"))
                if meter is None or meter.protocol != "dlt645":
                    body = {"status": "failed", "reason": "unknown or non-DL/T 645 meter"}
                else:
                    state, err, _ = self.read_relay(meter, ON_DEMAND)
                    body = {"status": "done", **state} if state else \
                        {"status": "failed", "reason": err}
            else:
                body = self.local(req.get("meter"), req.get("action"), req.get("params"),
                                  source="local", operator=operator)
            out = path[:-len(".req.json")] + ".res.json"
            tmp = out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(body, f, default=str)
            os.chmod(tmp, 0o660)
            os.replace(tmp, out)

    # ---------------------------------------------------------------- restart recovery

    def resume(self):
        """Commands accepted but not finished when the gateway stopped (a crash, a power
        cut): relay commands are concluded from the meter's state, never sent again once
        the ledger says the frame may have gone."""
        for cid, doc in self.state.all("commands").items():
            if doc.get("state") not in ("accepted", "sent"):
                continue
            meter = self.gw.meter(doc.get("meter"))
            meta = {"response_topic": doc.get("response_topic"),
                    "correlation": doc.get("correlation")}
            cmd = {"id": cid, "meter": doc.get("meter"), "action": doc.get("action"),
                   "params": doc.get("params") or {}}
            self.audit.append("command.resume", id=cid, state=doc.get("state"))
            if meter is None and doc.get("meter") == "*":
                meter = GatewayTarget()
            if meter is None:
                status, reason, extra = "failed", "meter no longer configured", {}
            elif doc["action"] in RELAY_ACTIONS and doc["state"] == "sent":
                rc = D.RelayCommand[doc.get("relay_command", "TRIP")]
                after, err, frames = self.read_relay(meter)
                self.audit.append("relay.after", id=cid, state=after, error=err,
                                  frames=_hex(frames))
                if after is None:
                    status, reason, extra = "failed", "interrupted by a restart; relay " \
                        "state unknown (%s); not repeated" % err, {}
                elif _reached(rc, after):
                    status, reason, extra = "done", "completed before a restart", \
                        _state(after)
                else:
                    status, reason, extra = "failed", "interrupted by a restart; relay %s; " \
                        "not repeated" % after.get("relay"), _state(after)
            elif doc["state"] == "accepted" and (doc.get("expires_at") or 0) > time.time():
                # the frame never left: safe to run it now, once (the ledger says "sent"
                # before the frame goes)
                self.audit.append("command.resumed", id=cid)
                self._run_accepted(cmd, meter, meta, doc.get("source", "remote"))
                continue
            elif doc["action"] == "topup":
                # the top-up ledger (by txn) says whether it was applied: apply at most once
                status, reason, extra = self._topup(cmd, meter)
            else:
                status, reason, extra = "failed", "interrupted by a restart before it " \
                    "reached the meter; not repeated", {}
            result = {"status": status}
            if reason:
                result["reason"] = reason
            result.update(extra)
            self.state.put("commands", cid, dict(doc, state=status, result=result,
                                                 finished_at=time.time()))
            self.audit.append("command.result", id=cid, result=result)
            self._result(cid, status, reason, meta, meter=doc.get("meter"),
                         action=doc.get("action"), **extra)

    def _prune(self):
        """Forget ids a day after they expired: by then the window check rejects them."""
        cutoff = time.time() - 86400
        old = [cid for cid, d in self.state.all("commands").items()
               if d.get("state") in FINAL and (d.get("expires_at") or 0) < cutoff]
        if old:
            with self.state.batch():
                for cid in old:
                    self.state.delete("commands", cid)


class GatewayTarget:
    """The target of a gateway-wide command."""
    id = "*"
    protocol = None
    secured = False


def _reached(rc, state):
    if rc == D.RelayCommand.TRIP:
        return state.get("relay") == "open"
    if rc == D.RelayCommand.DIRECT_CLOSE:
        return state.get("relay") == "closed"
    if rc == D.RelayCommand.CLOSE_ALLOWED:
        return state.get("relay_command") == "close"
    if rc == D.RelayCommand.GUARANTEE:
        return state.get("guarantee") is True
    if rc == D.RelayCommand.GUARANTEE_RELEASE:
        return state.get("guarantee") is False
    return False


def _state(after):
    if not after:
        return {}
    return {"relay": after.get("relay"), "relay_command": after.get("relay_command"),
            "guarantee": after.get("guarantee")}


def _hex(frames):
    return [f.hex() for f in frames or ()]


def _digest(cmd):
    import hashlib
    body = json.dumps({k: v for k, v in cmd.items() if k != "sig"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:32]


def _epoch(value):
    try:
        return parse_time(value, "t").timestamp()
    except (ValueError, TypeError):
        return None


def _jsonable(v):
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, (_dt.date, _dt.time, _dt.datetime)):
        return v.isoformat()
    return v


__all__ = ["Executor", "Rejected", "parse_time"]
