"""The relay operation on a meter's line: read status word 3, send the relay frame, read the
state back until it shows the effect. A timeout is not a success; the state read back is
what a result reports.

The line is reached through `Line`, a small interface over the port workers (one job on the
meter's line runs the whole operation, without a poll in between).
"""

import datetime as _dt
import os
import signal
import threading
import time

from gateway.line import reads
from gateway.line.port import RELAY
from protocols import dlt645

READBACK_TRIES = 4
READBACK_PAUSE_S = 0.3          # grows per try: a meter's relay takes a moment to move
LINE_JOB_TIMEOUT_S = 120        # a whole relay operation, queueing on a busy line included

# relay frame data (0x1C): PA, P0..P2 (password), C0..C3 (operator code), then the command.
# The audit keeps the frame but never the secrets: those 8 bytes are masked.
_SECRET_OFFSET = 10             # 68 A0..A5 68 C L, then data
_SECRET_BYTES = 8


def failpoint(name):
    """Crash here if MGW_FAILPOINT names this point: the restart-recovery tests kill the
    process at exact steps of the command path. Inert unless the variable is set."""
    if os.environ.get("MGW_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Line:
    """What the control core needs of the lines: a transaction, or a job, on the meter's
    line, with a bounded wait. `worker_of(port_name)` finds the current worker."""

    def __init__(self, worker_of):
        self.worker_of = worker_of

    def ask(self, meter, request, priority=RELAY, timeout=30, tick=None):
        worker = self.worker_of(meter.port)
        if threading.current_thread() is worker:
            return worker.transact(request)
        fut = worker.submit(request, priority)
        end = time.monotonic() + timeout
        while True:
            if tick:
                tick()
            try:
                return fut.result(min(1.0, max(0.01, end - time.monotonic())))
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


def read_relay(line, spec, meter, priority=RELAY, tick=None):
    """(status dict or None, error, frames) from status word 3."""
    res = line.ask(meter, reads.driver_of(spec).status_exchange(spec), priority, tick=tick)
    if not res.ok:
        return None, res.error, res.frames
    msg = res.answer
    if isinstance(msg, dlt645.ErrorResponse):
        return None, "meter says %s" % (", ".join(msg.flags) or msg.code), res.frames
    if not isinstance(msg, dlt645.ReadResponse) or not msg.values:
        return None, "unexpected answer to the status read", res.frames
    vals = {v.quantity: v.value for v in msg.values}
    return {"relay": vals.get("relay.state"), "relay_command": vals.get("relay.command"),
            "guarantee": vals.get("guarantee.state")}, None, res.frames


def command_for(action, params, default_restore_mode):
    if action == "cut_off":
        return dlt645.RelayCommand.TRIP
    if action == "restore":
        mode = params.get("mode")
        direct = mode == "direct" or (mode is None and default_restore_mode == "direct_close")
        return dlt645.RelayCommand.DIRECT_CLOSE if direct else dlt645.RelayCommand.CLOSE_ALLOWED
    if action == "guarantee_on":
        return dlt645.RelayCommand.GUARANTEE
    return dlt645.RelayCommand.GUARANTEE_RELEASE


def relay_frame(meter, rc, params, now=None):
    if meter.secured and rc in (dlt645.RelayCommand.TRIP, dlt645.RelayCommand.DIRECT_CLOSE,
                                dlt645.RelayCommand.CLOSE_ALLOWED):
        return dlt645.relay_control_secured(meter.address, bytes.fromhex(params["payload"]))
    valid_until = ((now or _dt.datetime.now()) + _dt.timedelta(seconds=meter.relay_valid_s)
                   ).replace(microsecond=0)
    return dlt645.relay_control(meter.address, rc, password_level=meter.password_level,
                           password=meter.password, operator_code=meter.operator_code,
                           valid_until=valid_until)


def reached(rc, state):
    if rc == dlt645.RelayCommand.TRIP:
        return state.get("relay") == "open"
    if rc == dlt645.RelayCommand.DIRECT_CLOSE:
        return state.get("relay") == "closed"
    if rc == dlt645.RelayCommand.CLOSE_ALLOWED:
        return state.get("relay_command") == "close"
    if rc == dlt645.RelayCommand.GUARANTEE:
        return state.get("guarantee") is True
    if rc == dlt645.RelayCommand.GUARANTEE_RELEASE:
        return state.get("guarantee") is False
    return False


def public_state(after):
    if not after:
        return {}
    return {"relay": after.get("relay"), "relay_command": after.get("relay_command"),
            "guarantee": after.get("guarantee")}


def masked_hex(frames):
    """Frames as hex for the audit trail, the password and operator code of a relay frame
    masked (they would otherwise sit in clear in audit.log and in the uploaded events)."""
    out = []
    for f in frames or ():
        raw = bytes(f)
        i = 0
        while i < len(raw) and raw[i] == 0xFE:
            i += 1
        text = raw.hex()
        if len(raw) >= i + _SECRET_OFFSET + _SECRET_BYTES and raw[i] == 0x68 and \
                raw[i + 8] & 0x1F == dlt645.RELAY_CONTROL and not raw[i + 8] & 0x80:
            a = 2 * (i + _SECRET_OFFSET)
            text = text[:a] + "*" * (2 * _SECRET_BYTES) + text[a + 2 * _SECRET_BYTES:]
        out.append(text)
    return out


def operate(line, spec, meter, rc, params, audit, cmd_id, before_send, restore_hint=None):
    """The relay operation (run on the meter's line). `before_send()` records in the ledger
    that the frame may go; a crash after it is resumed by reading, never by sending again.
    Returns (status, reason, extra)."""
    before, err, frames = read_relay(line, spec, meter)
    audit.append("relay.before", id=cmd_id, state=before, error=err, frames=masked_hex(frames))
    frame = relay_frame(meter, rc, params)
    before_send()
    res = line.ask(meter, dlt645.relay_exchange(frame, rc.name).for_meter(meter.id)
                   .on_line(meter.baudrate, meter.parity))
    failpoint("after_send")
    audit.append("relay.frame", id=cmd_id, command=rc.name, ok=res.ok, error=res.error,
                 frames=masked_hex(res.frames))
    if not res.ok:
        after, _, _ = read_relay(line, spec, meter)
        return "failed", "no answer from the meter (%s)" % res.error, \
            dict(public_state(after), code="no_answer")
    if isinstance(res.answer, dlt645.ErrorResponse):
        after, _, _ = read_relay(line, spec, meter)
        return "failed", "meter refused: %s" % (", ".join(res.answer.flags) or
                                                res.answer.code), \
            dict(public_state(after), code="meter_refused")
    return readback(line, spec, meter, rc, audit, cmd_id)


def readback(line, spec, meter, rc, audit, cmd_id):
    after = err = None
    for attempt in range(READBACK_TRIES):
        after, err, frames = read_relay(line, spec, meter)
        audit.append("relay.after", id=cmd_id, state=after, error=err,
                     frames=masked_hex(frames))
        if after is not None and reached(rc, after):
            break
        time.sleep(READBACK_PAUSE_S * (attempt + 1))
    if after is None:
        return "failed", "relay state could not be read back (%s)" % err, \
            {"code": "readback_failed"}
    if rc in (dlt645.RelayCommand.GUARANTEE, dlt645.RelayCommand.GUARANTEE_RELEASE):
        on = rc == dlt645.RelayCommand.GUARANTEE
        if after.get("guarantee") is not on:
            return "failed", "meter reports guarantee %s" % after.get("guarantee"), \
                dict(public_state(after), code="state_unchanged")
        return "done", None, public_state(after)
    if not reached(rc, after):
        return "failed", "state did not change (relay %s)" % after.get("relay"), \
            dict(public_state(after), code="state_unchanged")
    extra = public_state(after)
    if rc == dlt645.RelayCommand.CLOSE_ALLOWED and after.get("relay") == "open":
        extra["awaiting_customer"] = True    # the customer closes it at the meter
    return "done", None, extra
