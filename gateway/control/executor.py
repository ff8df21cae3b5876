"""The command executor: signed remote commands, a technician's relay requests and cost
control's own cut-offs and restores, all through one path.

authenticate (verify.py) -> admission under one lock: replay/duplicate, window, meter and
params, policy (policy.py) -> the ledger entry written (with cost control's intent, in the
same write) -> the broker's PUBACK -> `accepted` -> executed at top priority on the meter's
line (relay.py) -> the state read back -> `done` or `failed`. The ledger entry comes first,
so a crash in the middle is resumed at start-up by reading the meter, never by sending the
frame again; and the broker redelivers whatever was not yet in the ledger. Every step goes
to the hash-chained audit trail (unauthenticated input only as a digest, aggregated).
"""

import collections
import datetime as _dt
import errno
import json
import logging
import os
import re
import threading
import time
from decimal import Decimal

from gateway import logs
from gateway.clock import near_the_hour
from gateway.control import policy, relay, spool as spool_mod, verify
from gateway.control.signing import KeyError_, load_public_key
from gateway.control.verify import (FINAL, GATEWAY_ACTIONS, RELAY_ACTIONS, Rejected,
                                    RejectCode)
from gateway.line import reads
from gateway.line.port import ON_DEMAND, RELAY
from gateway.model import DIAGNOSTIC_ACTIONS, GatewayError
from gateway.store import paths
from gateway.store.journal import JournalError
from gateway.store.state import StateError
from protocols.exchange import RelayIntent

log = logging.getLogger(__name__)

# unauthenticated input is answered at most this often (the rest is counted and audited)
UNAUTH_RESULTS_PER_MIN = 10
LEDGER_FORGET_S = 86400         # ids are forgotten a day after they expired
PRUNE_EVERY_S = 3600
LOCAL_VALIDITY_S = 900          # a local command's own validity window
READ_TIMEOUT_S = 60
TIME_SYNC_WAIT_S = 10
IDLE_WAIT_S = 0.3
DIAGNOSTICS_PER_MIN = 6         # each may read megabytes or hold a line for a while
LOG_LINES_DEFAULT = 100
LOG_LINES_MAX = 500
# below this much free disk (beside the reserve) no command starts: its audit entries,
# ledger writes and results need room, and a relay operation is never run unaudited
MIN_FREE_BYTES = 256 * 1024
# a final result up to this size is kept as published, so a repeat is the same bytes
REMEMBER_MAX_BYTES = 4096
# diagnostic results' bulk is not kept in the ledger (the state file stays small)
BULK_FIELDS = ("lines", "frames", "found", "answered_at")
# a command seen again is answered at most this often (QoS 1 redelivery and head-end retries
# are slower than this; a replay flood is not), remembering this many ids
DUPLICATE_ANSWER_S = 30.0
DUPLICATE_MEMORY = 4096

failpoint = relay.failpoint
_ADMISSION = threading.Lock()
# held for the whole of a relay operation; an update's installer takes it, so it never
# runs in the middle of one (gateway/ota)
RELAY_GATE = threading.Lock()


class StorageFull(GatewayError):
    """The ledger or the journal could not be written (a full or failing disk)."""


class WholeGateway:
    """What a gateway-wide command (meter "*") acts on, in place of a meter."""
    id = "*"
    protocol = None
    secured = False


class Executor(threading.Thread):
    def __init__(self, *, control_cfg, data_dir, intake, meter_of, spec_of, line, ledger,
                 accounts, journal, audit, events, clock, prepaid, notify=lambda: None,
                 reserve=None, local_group="meter-gateway", ports=lambda: (),
                 meters=lambda: (), republish=None, config=None, found=None,
                 updates=None):
        super().__init__(name="commands", daemon=True)
        self.cfg = control_cfg
        self.intake = intake                  # queue of uplink.Command
        self.meter_of = meter_of              # id -> meter config or None
        self.spec_of = spec_of                # meter config -> poller MeterSpec
        self.line = line                      # relay.Line
        self.ledger = ledger                  # the state store ("commands" table)
        self.accounts = accounts              # AccountStore
        self.journal = journal
        self.audit = audit
        self.events = events                  # sink.event(type, **fields)
        self.clock = clock
        self.prepaid = prepaid                # () -> cost control, or None
        self.notify = notify
        self.reserve = reserve                # paths.DiskReserve or None
        self.ports = ports                    # () -> the configured port names
        self.meters = meters                  # () -> the configured meters
        self.republish = republish            # (seq, ts, jid, body): a result sent again
        self.config = config                  # config_update: service.reload.Reloader
        self.found = found                    # (port, protocol, found): a scan's meters
        self.updates = updates                # gateway.ota Updater or None
        self.keys = []
        for path in self.cfg.public_keys:
            try:
                self.keys.append(load_public_key(path))
            except KeyError_ as exc:
                log.error("%s: commands signed with it will be rejected", exc)
        self.data_dir = data_dir
        self.spool_dir = paths.path(data_dir, paths.SPOOL)
        spool_mod.prepare(self.spool_dir, local_group)
        self.spool = spool_mod.SpoolServer(self.spool_dir, self._spool_request,
                                           self._spool_reject)
        self._halt = threading.Event()
        # policy check and ledger entry: one step, shared with a replaced executor
        self._admission = _ADMISSION
        self._unauth = policy.TokenBucket(UNAUTH_RESULTS_PER_MIN, 60)
        self._diagnostics = policy.TokenBucket(DIAGNOSTICS_PER_MIN, 60)
        self._callers = threading.local()
        self._answered = {}                   # id -> when a duplicate was last answered
        self._diag = None                     # diagnostics.Runner, from the first one
        self._rejections = logs.Aggregated(log, "rejected input")
        self.outcomes = collections.Counter()  # (action, status) of every result sent
        self.heartbeat = time.monotonic()
        self.counts = {"done": 0, "failed": 0, "rejected": 0, "unauthenticated": 0,
                       "unauthenticated_unanswered": 0, "internal_errors": 0,
                       "storage_failures": 0}

    # ---------------------------------------------------------------- lifecycle

    def stop(self, timeout=5.0):
        self._halt.set()
        if self._diag is not None:
            self._diag.stop()
        if self.is_alive():
            self.join(timeout)

    def tick(self):
        self.heartbeat = time.monotonic()

    def _caller_tick(self):
        """The heartbeat of whoever is waiting: the executor, or the thread that called
        local() (cost control), so a slow line never makes a busy thread look hung."""
        if threading.current_thread() is self:
            self.tick()
        else:
            tick = getattr(self._callers, "tick", None)
            if tick is not None:
                tick()

    def run(self):
        try:
            self.resume()
        except Exception:
            log.exception("resuming unfinished commands")
        last_prune = 0.0
        while not self._halt.is_set():
            self.tick()
            try:
                cmd = self.intake.get(timeout=IDLE_WAIT_S)
            except Exception:           # queue.Empty
                cmd = None
            try:
                if cmd is not None:
                    self.handle(cmd)
                self.spool.scan()
                self._flush_unauthenticated()
                self._rejections.flush()
                if time.time() - last_prune > PRUNE_EVERY_S:
                    last_prune = time.time()
                    self._prune()
            except Exception:
                # a bug must not stop command handling: log, count, carry on
                self.counts["internal_errors"] += 1
                log.exception("command executor")
        if self._diag is not None:
            self._diag.stop(0.1)           # a replaced executor leaves no thread behind

    # ---------------------------------------------------------------- results

    def _result(self, cmd_id, status, reason=None, meta=None, code=None, remember=False,
                **extra):
        body = {"id": cmd_id, "status": status}
        if code is not None:
            body["code"] = code.value if isinstance(code, RejectCode) else code
        if reason is not None:
            body["reason"] = reason
        body.update(extra)
        action = body.get("action")
        self.outcomes[(action if action in verify.ACTIONS else "other", status)] += 1
        if meta and cmd_id is not None:
            if meta.get("response_topic"):
                body["_response_topic"] = meta["response_topic"]
            if meta.get("correlation") is not None:
                body["_correlation_data"] = meta["correlation"]
        ts = int(time.time() * 1000)
        seq = self.journal.append_result(body, ts=ts)
        if remember and cmd_id is not None:
            self._remember(cmd_id, body, seq, ts)
        self.notify()
        return body

    def _remember(self, cid, body, seq, ts):
        """The final result as it was numbered, so that a repeated command is answered with
        the same bytes (same seq, ts, jid: a head-end's duplicate filter drops it where the
        first arrived). A large one (diagnostics) is not kept."""
        kept = json.loads(json.dumps(body, ensure_ascii=False, default=str))
        if len(json.dumps(kept)) > REMEMBER_MAX_BYTES:
            return
        try:
            with self.ledger.batch():
                doc = self.ledger.get("commands", cid)
                if doc is None or doc.get("published"):
                    return
                doc["published"] = {"seq": seq, "ts": ts, "body": kept,
                                    "jid": getattr(self.journal, "jid", None)}
                self.ledger.put("commands", cid, doc)
        except Exception as exc:
            if not _is_storage_error(exc):
                raise
            self._storage_failed(exc)     # the repeat is then answered as a new result

    # ---------------------------------------------------------------- remote commands

    def handle(self, message):
        """One message from the command topic. PUBACKed (message.done()) only once it is in
        the ledger or answered; a crash before that makes the broker deliver it again."""
        done = getattr(message, "done", None) or (lambda: None)
        try:
            self.handle_remote(message.payload, message.response_topic,
                               message.correlation_data)
        except Exception as exc:
            if not isinstance(exc, StorageFull) and not _is_storage_error(exc):
                done()            # a bug: logged by the caller; redelivery would repeat it
                raise
            # not durable, not answered: leave it unacknowledged, the broker keeps it
            self.counts["storage_failures"] += 1
            log.error("command not taken (the broker keeps it): %s", exc)
            return
        done()

    def handle_remote(self, payload, response_topic=None, correlation=None):
        try:
            cmd = verify.authenticate(payload, self.keys, self.cfg.max_command_bytes)
        except Rejected as rej:
            return self._unauthenticated(rej, payload)
        meta = {"response_topic": response_topic if verify.response_topic_ok(response_topic)
                else None,
                "correlation": bytes(correlation).hex() if verify.correlation_ok(correlation)
                else None}
        return self._admit_and_run(cmd, meta, source="remote")

    def _unauthenticated(self, rej, payload):
        """Cheap and harmless: audited as a digest (aggregated), answered without the id it
        claims and never on a response topic, at a bounded rate."""
        self.counts["unauthenticated"] += 1
        self.counts["rejected"] += 1
        # a claimed id proves nothing: in the text only, never as MGW_COMMAND_ID
        self._rejections.note("unauthenticated input rejected (%s): %s%s", rej.code.value,
                              rej.reason, " (claims id %s)" % rej.claimed_id
                              if getattr(rej, "claimed_id", None) else "")
        try:
            self.audit.unauthenticated(rej.code.value, bytes(payload))
        except OSError as exc:
            self._storage_failed(exc)
        if not self._unauth.take(time.monotonic()):
            self.counts["unauthenticated_unanswered"] += 1
            return None
        extra = {}
        if getattr(rej, "claimed_id", None):
            extra["claimed_id"] = rej.claimed_id
        try:
            return self._result(None, "rejected", rej.reason, None, code=rej.code, **extra)
        except Exception as exc:          # a full disk: nothing to answer with, nothing lost
            log.warning("cannot answer unauthenticated input: %s", exc)
            return None

    def _flush_unauthenticated(self):
        try:
            self.audit.flush_unauthenticated()
        except OSError as exc:
            self._storage_failed(exc)

    def _admit_and_run(self, cmd, meta, source):
        body = self._admit(cmd, meta, source)
        if body is not None:
            return body
        return self._run_accepted(cmd, self._target_of(cmd), meta, source)

    def _target_of(self, cmd):
        return WholeGateway() if cmd["meter"] == "*" and cmd["action"] in GATEWAY_ACTIONS \
            else self.meter_of(cmd["meter"])

    def _admit(self, cmd, meta, source):
        """Under one lock: replay and duplicate checks, window, meter and params, policy,
        then the ledger entry. Returns a final result body, or None if admitted."""
        cid = cmd["id"]
        digest = verify.digest(cmd)
        with self._admission:
            known = self.ledger.get("commands", cid)
            if known is not None and known.get("digest") not in (None, digest):
                return self._reject(cmd, meta, source, Rejected(
                    RejectCode.REPLAYED_ID, "replayed id (used before by a different "
                    "command)"), record=False)
            if known is not None:
                # the same command again (QoS 1 redelivery, a head-end retry, or a replay
                # by anyone who captured it): never executed twice, answered at most once
                # per DUPLICATE_ANSWER_S, and only where the first delivery asked
                res = known.get("result")
                if not self._may_answer_duplicate(cid):
                    self._note_unanswered(RejectCode.REPLAYED_ID, cmd)
                    return {"id": cid, "status": known.get("state")}
                self._audit("command.duplicate", id=cid, state=known.get("state"))
                pub = known.get("published")
                if pub and self.republish is not None:
                    self.republish(pub["seq"], pub["ts"], pub["jid"], pub["body"])
                    return pub["body"]
                if res:
                    return self._answer(cid, res, {
                        "response_topic": known.get("response_topic"),
                        "correlation": known.get("correlation")})
                return {"id": cid, "status": known.get("state")}   # running: result follows
            try:
                expires = verify.check_window(cmd, _dt.datetime.now(_dt.timezone.utc),
                                              self.cfg.clock_skew_s, self.cfg.max_validity_s)
            except Rejected as rej:
                # an old signed command is most likely a replay: nothing recorded, answered
                # and audited at the rate of unauthenticated input
                return self._reject_stale(cmd, rej)
            try:
                meter = self._check_meter_and_params(cmd)
                self._policy(cmd, meter)
            except Rejected as rej:
                return self._reject(cmd, meta, source, rej, record=True)
            try:
                if not self._storage_ok():
                    self._storage_failed("%s: no room for the ledger and audit" % self.data_dir)
                    raise StorageFull("no room left on the data folder's disk")
                self._record(cmd, "accepted", meta, source=source, digest=digest,
                             expires_at=expires, intent=source == "costcontrol")
            except StorageFull as exc:
                # the reserve is released now: room for a durable `failed`, so the
                # head-end hears why (and the same id is never run later)
                return self._fail_unstored(cmd, meta, source, digest, expires, exc)
        self._audit("command.accepted", id=cid, source=source, command=_public(cmd))
        log.info("command %s %s %s from %s accepted", cid, cmd["action"], cmd["meter"], source,
                 extra=logs.fields(command=cid, meter=cmd["meter"]))
        self._result(cid, "accepted", None, meta, meter=meter.id, action=cmd["action"])
        failpoint("after_ledger")
        return None

    def _may_answer_duplicate(self, cid):
        now = time.monotonic()
        last = self._answered.get(cid)
        if last is not None and now - last < DUPLICATE_ANSWER_S:
            return False
        if len(self._answered) >= DUPLICATE_MEMORY:
            self._answered.clear()            # bounded; forgetting only allows an answer
        self._answered[cid] = now
        return True

    def _note_unanswered(self, code, cmd):
        self.counts["duplicates_unanswered"] = self.counts.get("duplicates_unanswered", 0) + 1
        try:
            self.audit.unauthenticated(code.value, verify.digest(cmd).encode())
        except OSError as exc:
            self._storage_failed(exc)

    def _reject_stale(self, cmd, rej):
        self.counts["rejected"] += 1
        self._rejections.note("command %s %s %s rejected (%s): %s", cmd["id"],
                              cmd.get("action"), cmd.get("meter"), rej.code.value, rej.reason,
                              fields=logs.fields(command=cmd["id"], meter=cmd.get("meter")))
        self._note_unanswered(rej.code, cmd)
        if not self._unauth.take(time.monotonic()):
            return {"id": cmd["id"], "status": "rejected"}
        return self._result(cmd["id"], "rejected", rej.reason, None, code=rej.code,
                            meter=cmd.get("meter"), action=cmd.get("action"))

    def _fail_unstored(self, cmd, meta, source, digest, expires, exc):
        reason = "storage full: %s" % exc
        result = {"status": "failed", "code": "storage_full", "reason": reason}
        self._record(cmd, "failed", meta, source=source, digest=digest, result=result,
                     expires_at=expires, finished_at=time.time())
        self.counts["failed"] += 1
        self._audit("command.result", id=cmd["id"], result=result)
        return self._result(cmd["id"], "failed", reason, meta, code="storage_full",
                            remember=True, meter=cmd.get("meter"),
                            action=cmd.get("action"))

    def _reject(self, cmd, meta, source, rej, record):
        self.counts["rejected"] += 1
        log.warning("command %s %s %s from %s rejected (%s): %s", cmd["id"], cmd.get("action"),
                    cmd.get("meter"), source, rej.code.value, rej.reason,
                    extra=logs.fields(command=cmd["id"], meter=cmd.get("meter")))
        result = {"status": "rejected", "code": rej.code.value, "reason": rej.reason}
        if record:
            try:
                self._record(cmd, "rejected", meta, source=source,
                             digest=verify.digest(cmd), result=result,
                             expires_at=_epoch(cmd.get("expires_at")))
            except StorageFull:
                pass                      # answered all the same: a rejection moves nothing
        self._audit("command.rejected", id=cmd["id"], code=rej.code.value,
                    reason=rej.reason, command=_public(cmd))
        more = {"problems": rej.problems[:50]} if len(getattr(rej, "problems", ())) > 1 else {}
        return self._result(cmd["id"], "rejected", rej.reason, meta, code=rej.code,
                            remember=record, meter=cmd.get("meter"),
                            action=cmd.get("action"), **more)

    def _answer(self, cid, res, meta):
        extra = {k: v for k, v in res.items() if k not in ("id", "status", "reason", "code")}
        return self._result(cid, res["status"], res.get("reason"), meta, code=res.get("code"),
                            **extra)

    def _check_meter_and_params(self, cmd):
        action = cmd["action"]
        if action not in verify.ACTIONS:
            raise Rejected(RejectCode.UNKNOWN_ACTION, "unknown action %s" % action[:32])
        params = cmd.get("params") or {}
        if action in GATEWAY_ACTIONS:
            if cmd["meter"] != "*":
                raise Rejected(RejectCode.BAD_PARAMS, "%s applies to the whole gateway: "
                               "meter must be \"*\"" % action)
            if action == "weather_hold" and not isinstance(params.get("on"), bool):
                raise Rejected(RejectCode.BAD_PARAMS, "weather_hold needs params.on, true or "
                               "false")
            if action in DIAGNOSTIC_ACTIONS:
                self._check_diagnostic(action, params)
                return WholeGateway()
            if action == "config_update":
                self._check_config_update(params)
                return WholeGateway()
            if action == "software_update":
                why = self.updates.check(cmd["id"], params) if self.updates else \
                    "no updater on this gateway"
                if why:
                    raise Rejected(RejectCode.BAD_PARAMS, why)
                return WholeGateway()
            if self.prepaid() is None:
                raise Rejected(RejectCode.NO_ACCOUNT, "no cost control on this gateway")
            return WholeGateway()
        meter = self.meter_of(cmd["meter"])
        if meter is None:
            raise Rejected(RejectCode.UNKNOWN_METER, "unknown meter %s" % cmd["meter"][:64])
        cc = self.prepaid()
        if action in ("topup", "account_update"):
            if cc is None or not cc.has_account(meter.id):
                raise Rejected(RejectCode.NO_ACCOUNT, "meter %s has no prepaid account on "
                               "this gateway" % meter.id)
        if action == "topup":
            verify.parse_amount(params.get("amount"))
            if not verify.valid_txn(params.get("txn")):
                raise Rejected(RejectCode.BAD_PARAMS, "topup needs params.txn, the payment's "
                               "transaction id (letters, digits, _.:/-, at most 64)")
            why = cc.check_topup(params)          # params.channel
            if why:
                raise Rejected(RejectCode.BAD_PARAMS, why)
        elif action == "account_update":
            why = cc.check_update(params, meter.id)
            if why:
                raise Rejected(RejectCode.BAD_PARAMS, why)
        elif action == "read":
            qs = params.get("quantities", [])
            if not isinstance(qs, list) or len(qs) > 64 or \
                    not all(isinstance(q, str) and len(q) <= 64 for q in qs):
                raise Rejected(RejectCode.BAD_PARAMS, "read needs params.quantities, a list "
                               "of names")
            try:
                reads.check_quantities(self.spec_of(meter), qs)
            except reads.UnknownQuantity as exc:
                raise Rejected(RejectCode.BAD_PARAMS, str(exc)) from None
        elif action in RELAY_ACTIONS:
            if not reads.has_relay(meter):
                raise Rejected(RejectCode.NO_RELAY, "meter %s (%s) has no relay this gateway "
                               "can operate" % (meter.id, meter.profile))
            why = relay.params_problem(meter, action, params)
            if why:
                raise Rejected(RejectCode.BAD_PARAMS, why)
            if action == "restore" and params.get("mode") not in (None, "close_allowed",
                                                                  "direct"):
                raise Rejected(RejectCode.BAD_PARAMS, "restore mode is close_allowed or "
                               "direct")
        return meter

    def _policy(self, cmd, meter):
        if cmd["action"] != "cut_off":
            return                         # restores are never delayed by policy
        refusal = policy.cut_off_refusal(
            meter.id, guarantee_on=self.accounts.guarantee_on(meter.id),
            clock_trusted=self.clock.trusted(),
            recent_cutoffs=policy.recent_cutoffs(self.ledger.all("commands").values(),
                                                 time.time()),
            limit=self.cfg.cutoffs_per_hour)
        if refusal is not None:
            raise refusal

    # ---------------------------------------------------------------- the ledger

    def _record(self, cmd, state, meta=None, source="remote", intent=False, **fields):
        """The ledger entry, then cost control's intent to cut (the account store's). The
        ledger goes first: a kill between the two leaves an entry that a restart resumes and
        concludes (_conclude_intent sets the flag from the outcome), never a flag that says
        "cut" for a cut-off no ledger knows of (the meter would then never be cut)."""
        cid = cmd["id"]
        try:
            with self.ledger.batch():
                doc = self.ledger.get("commands", cid) or {
                    "meter": cmd.get("meter"), "action": cmd.get("action"),
                    "params": cmd.get("params") or {}, "source": source,
                    "received_at": time.time(),
                    "response_topic": (meta or {}).get("response_topic"),
                    "correlation": (meta or {}).get("correlation")}
                doc["state"] = state
                doc.update(fields)
                self.ledger.put("commands", cid, doc)
            if intent and cmd.get("action") == "cut_off":
                # why the relay will be open, known before the frame can leave
                self.accounts.set_cut(cmd["meter"], True, command=cid)
            return doc
        except Exception as exc:
            if _is_storage_error(exc):
                self._storage_failed(exc)
                raise StorageFull(str(exc)) from None
            raise

    def _storage_failed(self, exc):
        self.counts["storage_failures"] += 1
        if self.reserve is not None:
            self.reserve.release()        # room for the failed results and the ledger
        log.error("storage: %s", exc)

    def _storage_ok(self):
        """Room for a command's ledger, audit and results: the reserve is in place (or can
        be put back) and the disk has MIN_FREE_BYTES beside it. Otherwise commands fail
        with a reason, written into the reserve's room."""
        if self.reserve is None:
            return True
        if not self.reserve.present and not self.reserve.restore():
            return False
        try:
            st = os.statvfs(self.data_dir)
        except OSError:
            return True
        return st.f_bavail * st.f_frsize >= MIN_FREE_BYTES

    def _audit(self, kind, **data):
        try:
            return self.audit.append(kind, **data)
        except OSError as exc:
            self._storage_failed(exc)
            return None

    # ---------------------------------------------------------------- execution

    def _run_accepted(self, cmd, meter, meta, source):
        cid = cmd["id"]
        action = cmd["action"]
        try:
            if not self._storage_ok():
                self._storage_failed("%s: no room for the audit" % self.data_dir)
                raise StorageFull("no room left on the data folder's disk")
            if action in DIAGNOSTIC_ACTIONS:
                return self._run_diagnostic(cmd, meter, meta, source)
            if action == "config_update":
                return self._run_beside(cmd, meter, meta, source, self._gateway_action)
            if action in RELAY_ACTIONS:
                # the whole operation is one job on the line: its transactions follow each
                # other without a poll in between
                with RELAY_GATE:
                    status, reason, extra = self.line.run_job(
                        meter, lambda: self._relay(cmd, meter), tick=self._caller_tick)
            elif action == "topup":
                status, reason, extra = self._topup(cmd, meter)
            elif action == "read":
                status, reason, extra = self._read(cmd, meter)
            elif action in GATEWAY_ACTIONS:
                status, reason, extra = self._gateway_action(cmd)
            elif action == "account_update":
                account = self.prepaid().update_account(meter.id, cmd["params"])
                status, reason, extra = "done", None, {"account": account}
            else:
                status, reason, extra = self._sync_time(cmd, meter)
        except StorageFull as exc:
            status, reason, extra = "failed", "storage full: %s" % exc, {"code": "storage_full"}
        except Exception as exc:
            if _is_storage_error(exc):
                self._storage_failed(exc)
                status, reason, extra = "failed", "storage full: %s" % exc, \
                    {"code": "storage_full"}
            else:
                log.exception("command %s", cid)
                status, reason, extra = "failed", "internal error: %s" % exc, \
                    {"code": "internal_error"}
        return self._finish(cid, cmd, meter, meta, source, status, reason, extra)

    def _finish(self, cid, cmd, meter, meta, source, status, reason, extra):
        action = cmd.get("action")
        code = extra.pop("code", None)
        if status == "failed" and code is None:
            code = "failed"
        result = {"status": status}
        if code:
            result["code"] = code
        if reason:
            result["reason"] = reason
        result.update(extra)
        if action in DIAGNOSTIC_ACTIONS:
            result = {k: v for k, v in result.items() if k not in BULK_FIELDS}
        try:
            self._record(cmd, status, meta, source=source, result=result,
                         finished_at=time.time())
            self._conclude_intent(cmd, source, status, extra, cid)
        except StorageFull:
            pass                          # the result still goes out below, if it can
        self._audit("command.result", id=cid, result=result)
        self.counts[status] = self.counts.get(status, 0) + 1
        log.log(logging.INFO if status == "done" else logging.WARNING,
                "command %s %s %s: %s%s%s", cid, action, meter.id, status,
                " (%s)" % code if code else "", ": %s" % reason if reason else "",
                extra=logs.fields(command=cid, meter=meter.id))
        if status == "done" and action in ("cut_off", "restore") and extra.get("relay"):
            self.events("relay.opened" if extra["relay"] == "open" else "relay.closed",
                        meter=meter.id, command=cid, source=source,
                        **({"awaiting_customer": True}
                           if extra.get("awaiting_customer") else {}))
        return self._result(cid, status, reason, meta, code=code, remember=True,
                            meter=meter.id, action=action, **extra)

    def _conclude_intent(self, cmd, source, status, extra, cid):
        """What the outcome means for 'cut by cost control': a cut-off that may have opened
        the relay still counts (a top-up must restore it); one known not to have opened it
        does not (cost control may try again); a restore that closed it clears it."""
        meter = cmd.get("meter")
        action = cmd.get("action")
        if meter in (None, "*") or self.accounts.get(meter) is None:
            return
        if action == "cut_off" and source == "costcontrol":
            entry = self.ledger.get("commands", cid) or {}
            never_sent = entry.get("sent_at") is None
            opened = status == "done" or not (never_sent or extra.get("relay") == "closed")
            self.accounts.set_cut(meter, opened, command=cid)
        elif action == "restore" and status == "done":
            self.accounts.set_cut(meter, False, command=cid)

    def _relay(self, cmd, meter):
        rc = relay.command_for(cmd["action"], cmd.get("params") or {}, self.cfg.restore_mode)
        if rc == RelayIntent.GUARANTEE:
            # the gateway refuses cut-offs from here on, whatever the meter answers
            self.accounts.set_guarantee(meter.id, True, "command")

        def before_send():
            self._record(cmd, "sent", sent_at=time.time(), relay_command=rc.name)
        status, reason, extra = relay.operate(self.line, self.spec_of(meter), meter, rc,
                                              cmd.get("params") or {}, self, cmd["id"],
                                              before_send)
        if rc == RelayIntent.GUARANTEE_RELEASE and status == "done":
            self.accounts.set_guarantee(meter.id, False, "command")
        return status, reason, extra

    def append(self, kind, **data):
        """The audit interface relay.operate writes through (storage errors counted)."""
        return self._audit(kind, **data)

    def _topup(self, cmd, meter):
        params = cmd["params"]
        res = self.prepaid().apply_topup(meter.id, Decimal(params["amount"]), params["txn"],
                                         cmd["id"], channel=params.get("channel"))
        balance, applied = res.balance, res.applied
        # how the payment was split (a duplicate txn: how it was split the first time)
        extra = {"balance": str(balance), "txn": params["txn"], "channel": res.channel,
                 "to_credit": res.credit, "to_debt": res.recovered, "debt": res.debt}
        if not applied:
            extra["duplicate_txn"] = True
        return "done", None if applied else "txn already applied", extra

    def _read(self, cmd, meter):
        qs = (cmd.get("params") or {}).get("quantities", [])
        out = {}

        def job(w):
            try:
                out["values"] = reads.read_now(w, self.spec_of(meter), qs)
            except Exception as exc:
                out["error"] = str(exc)
        fut = self.line.worker_of(meter.port).submit_job(job, ON_DEMAND)
        end = time.monotonic() + READ_TIMEOUT_S
        while not fut.done() and time.monotonic() < end:
            self.tick()
            try:
                fut.result(1.0)
            except TimeoutError:
                pass
        if "error" in out:
            return "failed", out["error"], {}
        if "values" not in out:
            return "failed", "the read did not finish in %d s" % READ_TIMEOUT_S, \
                {"code": "timeout"}
        values, errors = out["values"]
        if not values:
            return "failed", "; ".join(errors) or "no answer", {"code": "no_answer"}
        return "done", "; ".join(errors) or None, {
            "values": [{"q": v.quantity, "value": _jsonable(v.value), "unit": v.unit}
                       for v in values]}

    def _check_diagnostic(self, action, params):
        from gateway.control import diagnostics   # on first use: most boxes never see one
        try:
            if action == "scan":
                diagnostics.check_scan(params, tuple(self.ports()))
            elif action == "trace":
                diagnostics.check_trace(params, tuple(self.ports()))
        except diagnostics.BadParams as exc:
            raise Rejected(RejectCode.BAD_PARAMS, str(exc)) from None
        if action == "logs":
            lines = params.get("lines", LOG_LINES_DEFAULT)
            if type(lines) is not int or not 1 <= lines <= LOG_LINES_MAX:
                raise Rejected(RejectCode.BAD_PARAMS, "logs: params.lines is 1 to %d"
                               % LOG_LINES_MAX)
            if params.get("level", "info") not in ("debug", "info", "warning", "error"):
                raise Rejected(RejectCode.BAD_PARAMS, "logs: params.level is debug, info, "
                               "warning or error")
        if not self._diagnostics.take(time.monotonic()):
            raise Rejected(RejectCode.RATE_LIMIT, "%s: at most %d diagnostic commands a "
                           "minute" % (action, DIAGNOSTICS_PER_MIN))

    def _check_config_update(self, params):
        why = self.config.check(params) if self.config is not None else (
            RejectCode.BAD_PARAMS, "this gateway was not started from a configuration file",
            [])
        if why is not None:
            rej = Rejected(why[0], why[1])
            rej.problems = why[2]
            raise rej

    def _run_diagnostic(self, cmd, meter, meta, source):
        """Handed to the diagnostics thread: the executor goes on with the next command
        (a cut-off behind a scan is not kept waiting); the result follows."""
        from gateway.control import diagnostics
        def run():
            try:
                status, reason, extra = self._diagnostic(cmd)
            except Exception as exc:
                log.exception("command %s", cmd["id"])
                status, reason, extra = "failed", "internal error: %s" % exc, \
                    {"code": "internal_error"}
            self._finish(cmd["id"], cmd, meter, meta, source, status, reason, extra)
        if self._diag is None:
            # started with the first diagnostic: a thread fewer on a box that never sees one
            self._diag = diagnostics.Runner()
            self._diag.start()
        if not self._diag.submit(run):
            return self._finish(cmd["id"], cmd, meter, meta, source, "failed",
                                "%d diagnostic commands are waiting already"
                                % diagnostics.QUEUE_MAX, {"code": "busy"})
        return {"id": cmd["id"], "status": "accepted"}

    def _run_beside(self, cmd, meter, meta, source, work):
        """A config_update waits for the reloaded gateway's health (up to its timeout) on a
        thread of its own: a cut-off arriving meanwhile is not kept waiting. The reloader
        applies one configuration at a time, in the order they came."""
        def run():
            try:
                status, reason, extra = work(cmd)
            except Exception as exc:
                log.exception("command %s", cmd["id"])
                status, reason, extra = "failed", "internal error: %s" % exc, \
                    {"code": "internal_error"}
            self._finish(cmd["id"], cmd, meter, meta, source, status, reason, extra)
        threading.Thread(target=run, name="config-update", daemon=True).start()
        return {"id": cmd["id"], "status": "accepted"}

    def _diagnostic(self, cmd):
        """Runs on the diagnostics thread."""
        from gateway.control import diagnostics
        params = cmd.get("params") or {}
        tick = self._diag.tick
        if cmd["action"] == "scan":
            port, protocol, opts = diagnostics.check_scan(params, tuple(self.ports()))
            configured = {reads.driver(m.protocol).key_of(m): m.id for m in self.meters()
                          if m.port == port and m.protocol == protocol}
            result = diagnostics.run_scan(self.line.worker_of, port, protocol, opts,
                                          configured, self._diag.halt, tick)
            if result[0] == "done" and self.found is not None:
                self.found(port, protocol, result[2].get("found", ()))
            return result
        if cmd["action"] == "trace":
            port, seconds = diagnostics.check_trace(params, tuple(self.ports()))
            return diagnostics.run_trace(self.line.worker_of, port, seconds, self._diag.halt,
                                         tick)
        if cmd["action"] == "audit_verify":
            entries, problem = self.audit.verify()
            return "done", None, {"entries": entries, "whole": problem is None,
                                  "broken_at": problem}
        lines = logs.recent_lines(params.get("lines", LOG_LINES_DEFAULT),
                                  params.get("level", "info"))
        return "done", None, {"lines": lines}     # the service never logs meter secrets

    def _gateway_action(self, cmd):
        if cmd["action"] == "config_update":
            return self.config.update(cmd["params"], cmd["id"], tick=self._caller_tick)
        if cmd["action"] == "software_update":
            return self.updates.start_update(cmd["id"], cmd["params"], signed=cmd)
        cc = self.prepaid()
        if cmd["action"] == "release_breaker":
            cc.release_breaker()
            return "done", None, {"breaker_tripped": False}
        on = cmd["params"]["on"]
        cc.set_weather_hold(on)
        return "done", None, {"weather_hold": on}

    def _sync_time(self, cmd, meter):
        if not self.clock.trusted():
            return "failed", "the gateway clock is not synchronised", {"code": "clock_untrusted"}
        now = _dt.datetime.now()
        if near_the_hour(now):
            return "failed", "not near the hour (meters freeze on the hour)", \
                {"code": "near_the_hour"}
        # the meter's own protocol's broadcast, at its line settings
        try:
            frame = reads.time_sync_frame(meter, now.replace(microsecond=0) +
                                          _dt.timedelta(seconds=1))
        except GatewayError as exc:
            return "failed", str(exc), {"code": "no_clock"}
        done = threading.Event()
        self.line.worker_of(meter.port).submit_job(
            lambda w: (w.broadcast(frame, meter.baudrate, meter.parity), done.set()), RELAY)
        done.wait(TIME_SYNC_WAIT_S)
        return "done", None, {"sent": now.astimezone().isoformat(timespec="seconds")}

    # ---------------------------------------------------------------- local & cost control

    def local(self, meter_id, action, params=None, source="local", operator=None, reason=None,
              tick=None):
        """A command from the box itself (a technician through the spool, cost control):
        the same path, no signature (the caller is trusted by the file system or is the
        gateway), audited. Runs in the caller's thread; admission is serialised with the
        executor's."""
        now = _dt.datetime.now(_dt.timezone.utc)
        cmd = {"v": 1, "id": "%s-%s" % (source, os.urandom(8).hex()), "meter": meter_id,
               "action": action, "params": params or {},
               "issued_at": now.isoformat(), "expires_at": (now + _dt.timedelta(
                   seconds=LOCAL_VALIDITY_S)).isoformat()}
        self._audit("command.local", id=cmd["id"], source=source, operator=operator,
                    reason=reason, command=_public(cmd))
        self._callers.tick = tick
        try:
            return self._admit_and_run(cmd, None, source)
        except StorageFull as exc:
            return {"id": cmd["id"], "status": "failed", "code": "storage_full",
                    "reason": "storage full: %s" % exc}
        finally:
            self._callers.tick = None

    def _spool_request(self, req, operator):
        meter = self.meter_of(req["meter"])
        if req["action"] == "status":
            if meter is None or not reads.has_relay(meter):
                return {"status": "failed", "reason": "unknown meter, or a meter without a "
                        "relay"}
            state, err, _ = relay.read_relay(self.line, self.spec_of(meter), meter, ON_DEMAND,
                                             tick=self.tick)
            return {"status": "done", **state} if state else {"status": "failed",
                                                               "reason": err}
        return self.local(req["meter"], req["action"], req["params"], source="local",
                          operator=operator)

    def _spool_reject(self, reason, operator):
        code = RejectCode.EXPIRED_LOCAL if reason.startswith("stale") else \
            RejectCode.NOT_ALLOWED_LOCALLY
        self.counts["rejected"] += 1
        log.warning("local request by %s rejected (%s): %s", operator, code.value,
                    reason[:200])
        self._audit("command.rejected", source="local", operator=operator, code=code.value,
                    reason=reason[:200])
        return {"status": "rejected", "code": code.value, "reason": "local request %s"
                % reason}

    # ---------------------------------------------------------------- restart recovery

    def resume(self):
        """Commands accepted but not finished when the gateway stopped (a crash, a power
        cut): relay commands are concluded from the meter's state, never sent again once
        the ledger says the frame may have gone."""
        for cid, doc in self.ledger.all("commands").items():
            if doc.get("state") not in ("accepted", "sent"):
                continue
            self.tick()
            meta = {"response_topic": doc.get("response_topic"),
                    "correlation": doc.get("correlation")}
            cmd = {"id": cid, "meter": doc.get("meter"), "action": doc.get("action"),
                   "params": doc.get("params") or {}}
            source = doc.get("source", "remote")
            self._audit("command.resume", id=cid, state=doc.get("state"))
            meter = WholeGateway() if doc.get("meter") == "*" else \
                self.meter_of(doc.get("meter"))
            if meter is None:
                self._finish(cid, cmd, WholeGateway(), meta, source, "failed",
                             "meter no longer configured", {"code": "unknown_meter"})
                continue
            if doc["action"] in RELAY_ACTIONS and doc["state"] == "sent":
                status, reason, extra = self.line.run_job(
                    meter, lambda: self._conclude_sent(cid, doc, meter), tick=self.tick)
            elif doc["state"] == "accepted" and (doc.get("expires_at") or 0) > time.time():
                # the frame never left: safe to run it now, once (the ledger says "sent"
                # before the frame goes)
                self._audit("command.resumed", id=cid)
                self._run_accepted(cmd, meter, meta, source)
                continue
            elif doc["action"] == "topup":
                # the top-up ledger (by txn) says whether it was applied: apply at most once
                status, reason, extra = self._topup(cmd, meter)
            else:
                status, reason, extra = "failed", "interrupted by a restart before it " \
                    "reached the meter; not repeated", {"code": "interrupted"}
            self._finish(cid, cmd, meter, meta, source, status, reason, extra)

    def _conclude_sent(self, cid, doc, meter):
        rc = RelayIntent[doc.get("relay_command", "TRIP")]
        after, err, frames = relay.read_relay(self.line, self.spec_of(meter), meter,
                                              ours=True)
        self._audit("relay.after", id=cid, state=after, error=err,
                    frames=relay.masked_hex(frames, self.spec_of(meter)))
        if after is None:
            return "failed", "interrupted by a restart; relay state unknown (%s); not " \
                "repeated" % err, {"code": "interrupted"}
        if relay.reached(rc, after):
            return "done", "completed before a restart", relay.public_state(after)
        return "failed", "interrupted by a restart; relay %s; not repeated" % \
            after.get("relay"), dict(relay.public_state(after), code="interrupted")

    def cutoff_times(self, since, source="costcontrol"):
        """When cut-offs from `source` were admitted since `since` (the ledger is the
        record: a restarted or replaced cost control counts what went before)."""
        # under way, or concluded after its frame may have gone (one that never left, or
        # was refused before it, moved no relay)
        return sorted(d.get("received_at") or 0 for d in self.ledger.all("commands").values()
                      if d.get("action") == "cut_off" and d.get("source") == source
                      and (d.get("state") in ("accepted", "sent") or d.get("sent_at"))
                      and (d.get("received_at") or 0) >= since)

    def _prune(self):
        """Forget ids a day after they expired: by then the window check rejects them."""
        cutoff = time.time() - LEDGER_FORGET_S
        old = [cid for cid, d in self.ledger.all("commands").items()
               if d.get("state") in FINAL and (d.get("expires_at") or 0) < cutoff]
        if old:
            with self.ledger.batch():
                for cid in old:
                    self.ledger.delete("commands", cid)


def _is_storage_error(exc):
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
    return isinstance(exc, (StateError, JournalError))


# a meter password in a config_update (a patch's field, or a line of a whole TOML file)
_SECRET_KEYS = frozenset(("password",))
_SECRET_LINE = re.compile(r'(?m)^(\s*password\s*=\s*)("[^"\n]*"|\'[^\'\n]*\'|[^\s#]+)')


def _masked(value):
    if isinstance(value, dict):
        return {k: "******" if k in _SECRET_KEYS and v is not None else _masked(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, str) and "password" in value:
        return _SECRET_LINE.sub(r'\1"******"', value)
    return value


def _public(cmd):
    """The command as the audit keeps it (and uploads in `audit` events): without the
    signature bytes, meter passwords masked."""
    return {k: _masked(v) if k == "params" else v for k, v in cmd.items() if k != "sig"}


def _epoch(value):
    try:
        return verify.parse_time(value, "t").timestamp()
    except (ValueError, TypeError):
        return None


def _jsonable(v):
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, (_dt.date, _dt.time, _dt.datetime)):
        return v.isoformat()
    return v


__all__ = ["Executor", "WholeGateway", "StorageFull"]
