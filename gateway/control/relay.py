"""The relay operation on a meter's line: read the relay state, send the relay command, read
the state back until it shows the effect. A timeout is not a success; the state read back is
what a result reports.

Whatever the meter's protocol: its driver (gateway.registry) builds the exchanges: the
status read and what its answer says (`status_exchange`, `relay_state`), the command
(`relay_exchange`: a DL/T 645 0x1C frame, or a DL/T 698.45 ACTION on 8000/8001, or the
master station's SECURITY-Request forwarded unchanged), whether the meter refused it
(`relay_refusal`), what the audit must not keep (`mask_secrets`) and, where the meter
may answer at length, how to follow the answer to its end (`transact`). The commands are the
gateway's RelayIntent words (TRIP, CLOSE_ALLOWED, DIRECT_CLOSE, GUARANTEE, ...), the
same for every protocol (protocols.exchange).

The line is reached through `Line`, a small interface over the port workers (one job on the
meter's line runs the whole operation, without a poll in between).
"""

import os
import signal
import threading
import time

from gateway.registry import NAMES
from gateway.line import reads
from gateway.line.port import RELAY
from protocols.exchange import RelayIntent

READBACK_TRIES = 4
READBACK_PAUSE_S = 0.3          # grows per try: a meter's relay takes a moment to move
LINE_JOB_TIMEOUT_S = 120        # a whole relay operation, queueing on a busy line included


def failpoint(name):
    """Crash here if MGW_FAILPOINT names this point: the restart-recovery tests kill the
    process at exact steps of the command path. Inert unless the variable is set."""
    if os.environ.get("MGW_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Line:
    """What the control core needs of the lines: a transaction, or a job, on the meter's
    line, with a bounded wait. `worker_of(port_name)` finds the current worker."""

    def __init__(self, worker_of, on_relay=None):
        self.worker_of = worker_of
        # on_relay(meter, relay, ours): every relay state read here (read_relay), on the
        # line's thread before its next poll: the poller reports a move that was not ours
        # (meter.relay_changed) and takes one that was without a word
        self.on_relay = on_relay

    def ask(self, meter, request, priority=RELAY, timeout=30, tick=None, via=None):
        """The line's Result for one exchange. `via(worker, request)`, where given, runs it
        instead of worker.transact, as one job on the line: a driver's transaction that
        follows a long answer (link-layer fragments, GET-Response-Next blocks) to its end."""
        worker = self.worker_of(meter.port)
        if threading.current_thread() is worker:
            return via(worker, request) if via else worker.transact(request)
        box = {}
        if via is None:
            fut = worker.submit(request, priority)
        else:
            fut = worker.submit_job(lambda w: box.update(result=via(w, request)), priority)
        end = time.monotonic() + timeout
        while True:
            if tick:
                tick()
            try:
                done = fut.result(min(1.0, max(0.01, end - time.monotonic())))
                return box.get("result", done)
            except TimeoutError:
                if time.monotonic() >= end:
                    raise

    def run_job(self, meter, fn, priority=RELAY, timeout=LINE_JOB_TIMEOUT_S, tick=None):
        """fn() on the meter's line thread; its value, or a failed triple if the line did
        not run it. `tick` is called while waiting (the executor's heartbeat)."""
        worker = self.worker_of(meter.port)
        box = {}

        def job(w):
            try:
                box["value"] = fn()
            except Exception as exc:             # reported as a failed command
                box["error"] = exc
        fut = worker.submit_job(job, priority)
        end = time.monotonic() + timeout
        while not fut.done() and time.monotonic() < end:
            if tick:
                tick()
            try:
                fut.result(1.0)
            except TimeoutError:
                pass
        if "error" in box:
            raise box["error"]
        if "value" not in box:
            return "failed", "the line did not run the command (port error or stopping)", {}
        return box["value"]


def read_relay(line, spec, meter, priority=RELAY, tick=None, ours=False):
    """(status dict or None, error, frames): the relay state the meter reports, told to
    `line.on_relay`; `ours`: read after a frame of ours went (a move is the command's)."""
    drv = reads.driver_of(spec)
    res = line.ask(meter, drv.status_exchange(spec), priority, tick=tick, via=_follow(drv))
    if not res.ok:
        return None, res.error, res.frames
    state, why = drv.relay_state(res.answer)
    if state and state.get("relay") and getattr(line, "on_relay", None) is not None:
        line.on_relay(meter, state["relay"], ours)
    return state, why, res.frames


def _follow(drv):
    """The driver's own transaction where it has one (`transact(worker, exchange)`: a
    DL/T 698.45 meter may answer the status read in link-layer fragments or GET-Response-Next
    blocks, which it asks for and joins), else None: the worker's."""
    return getattr(drv, "transact", None)


def command_for(action, params, default_restore_mode):
    if action == "cut_off":
        return RelayIntent.TRIP
    if action == "restore":
        mode = params.get("mode")
        direct = mode == "direct" or (mode is None and default_restore_mode == "direct_close")
        return RelayIntent.DIRECT_CLOSE if direct else RelayIntent.CLOSE_ALLOWED
    if action == "guarantee_on":
        return RelayIntent.GUARANTEE
    return RelayIntent.GUARANTEE_RELEASE


def reached(rc, state):
    if rc == RelayIntent.TRIP:
        return state.get("relay") == "open"
    if rc == RelayIntent.DIRECT_CLOSE:
        return state.get("relay") == "closed"
    if rc == RelayIntent.CLOSE_ALLOWED:
        return state.get("relay_command") == "close"
    if rc == RelayIntent.GUARANTEE:
        return state.get("guarantee") is True
    if rc == RelayIntent.GUARANTEE_RELEASE:
        return state.get("guarantee") is False
    return False


def public_state(after):
    if not after:
        return {}
    return {"relay": after.get("relay"), "relay_command": after.get("relay_command"),
            "guarantee": after.get("guarantee")}


def masked_hex(frames, spec=None):
    """Frames as hex for the audit trail, what the meter's driver says is secret masked
    (a DL/T 645 relay frame's password and operator code would otherwise sit in clear in
    audit.log and in the uploaded events)."""
    if spec is not None:
        masks = [getattr(reads.driver_of(spec), "mask_secrets", None)]
    else:
        # a frame of unknown origin (a trace of the line): every protocol's rule applies
        masks = [getattr(reads.driver(name), "mask_secrets", None) for name in NAMES]
    masks = [m for m in masks if m]
    out = []
    for f in frames or ():
        raw = bytes(f)
        text = plain = raw.hex()
        for mask in masks:
            text = mask(raw)
            if text != plain:
                break
        out.append(text)
    return out


def params_problem(meter, action, params):
    """Why a relay command's params cannot work for this meter (one line), or None: the
    meter's driver knows which meters take only the master station's payload."""
    return reads.driver_of(meter).relay_params_problem(meter, action, params or {})


def operate(line, spec, meter, rc, params, audit, cmd_id, before_send, restore_hint=None):
    """The relay operation (run on the meter's line). `before_send()` records in the ledger
    that the frame may go; a crash after it is resumed by reading, never by sending again.
    Returns (status, reason, extra)."""
    drv = reads.driver_of(spec)
    before, err, frames = read_relay(line, spec, meter)
    audit.append("relay.before", id=cmd_id, state=before, error=err,
                 frames=masked_hex(frames, spec))
    exchange = drv.relay_exchange(meter, rc, params)
    before_send()
    res = line.ask(meter, exchange, via=_follow(drv))
    failpoint("after_send")
    audit.append("relay.frame", id=cmd_id, command=rc.name, ok=res.ok, error=res.error,
                 frames=masked_hex(res.frames, spec))
    if not res.ok:
        after, _, _ = read_relay(line, spec, meter, ours=True)
        return "failed", "no answer from the meter (%s)" % res.error, \
            dict(public_state(after), code="no_answer")
    refusal = drv.relay_refusal(res.answer)
    if refusal:
        after, _, _ = read_relay(line, spec, meter, ours=True)
        return "failed", "meter refused: %s" % refusal, \
            dict(public_state(after), code="meter_refused")
    return readback(line, spec, meter, rc, audit, cmd_id)


def readback(line, spec, meter, rc, audit, cmd_id):
    after = err = None
    for attempt in range(READBACK_TRIES):
        after, err, frames = read_relay(line, spec, meter, ours=True)
        audit.append("relay.after", id=cmd_id, state=after, error=err,
                     frames=masked_hex(frames, spec))
        if after is not None and reached(rc, after):
            break
        time.sleep(READBACK_PAUSE_S * (attempt + 1))
    if after is None:
        return "failed", "relay state could not be read back (%s)" % err, \
            {"code": "readback_failed"}
    if rc in (RelayIntent.GUARANTEE, RelayIntent.GUARANTEE_RELEASE):
        on = rc == RelayIntent.GUARANTEE
        if after.get("guarantee") is not on:
            return "failed", "meter reports guarantee %s" % after.get("guarantee"), \
                dict(public_state(after), code="state_unchanged")
        return "done", None, public_state(after)
    if not reached(rc, after):
        return "failed", "state did not change (relay %s)" % after.get("relay"), \
            dict(public_state(after), code="state_unchanged")
    extra = public_state(after)
    if rc == RelayIntent.CLOSE_ALLOWED and after.get("relay") == "open":
        extra["awaiting_customer"] = True    # the customer closes it at the meter
    return "done", None, extra
