"""The head-end's diagnostics on a running gateway: `scan` (which meters answer on a port)
and `trace` (the raw bytes of a port for a few seconds), and the thread that runs them (and
`audit_verify`, `logs`) beside the executor, so a relay command queued behind one is never
kept waiting.

Both use the line through its worker: a scan is one job on the line whose every exchange
goes through `transact`, which runs any queued relay or on-demand job first; a trace only
listens (the worker's tap). Both are bounded in time and size.
"""

import logging
import queue
import threading
import time

from gateway.clock import rfc3339
from gateway.control.relay import masked_hex
from gateway.line import reads
from gateway.line.port import ON_DEMAND, Result
from gateway.model import TxError
from gateway.registry import DEFAULT_PROTOCOL, NAMES, PROTOCOLS

log = logging.getLogger(__name__)

BAUDRATES = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
PARITIES = ("N", "E", "O")
SCAN_DEFAULT_S = 120            # a scan stops here and says it is incomplete
SCAN_MAX_S = 600
TRACE_DEFAULT_S = 10
TRACE_MAX_S = 60
TRACE_MAX_CHARS = 32 * 1024     # hex characters kept; the rest is counted
RX_GAP_S = 0.05                 # received chunks closer than this are one entry
QUEUE_MAX = 4                   # diagnostics waiting to run; more are refused


class BadParams(ValueError):
    """One line naming the parameter at fault."""


def _int_param(params, name, default, low, high):
    value = params.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise BadParams("params.%s is a whole number from %d to %d" % (name, low, high))
    return value


def check_scan(params, ports):
    """(port, protocol, options) of a scan command, or BadParams."""
    port = params.get("port")
    if port not in ports:
        raise BadParams("scan: params.port names a configured port (%s)" % ", ".join(ports))
    protocol = params.get("protocol", DEFAULT_PROTOCOL)
    if protocol not in NAMES:
        raise BadParams("scan: params.protocol is one of %s" % ", ".join(NAMES))
    baudrate = params.get("baudrate")
    if baudrate is not None and baudrate not in BAUDRATES:
        raise BadParams("scan: params.baudrate is one of %s"
                        % ", ".join(map(str, BAUDRATES)))
    parity = params.get("parity")
    if parity is not None and parity not in PARITIES:
        raise BadParams("scan: params.parity is N, E or O")
    opts = {"baudrate": baudrate, "parity": parity,
            "max_s": _int_param(params, "max_s", SCAN_DEFAULT_S, 1, SCAN_MAX_S)}
    if PROTOCOLS[protocol].keyed_by == "unit":
        opts["first"] = _int_param(params, "first", 1, 1, 247)
        opts["last"] = _int_param(params, "last", 247, opts["first"], 247)
        profile = params.get("profile")
        if profile is not None and not isinstance(profile, str):
            raise BadParams("scan: params.profile is a register map's name")
        opts["profile"] = profile
    return port, protocol, opts


def check_trace(params, ports):
    port = params.get("port")
    if port not in ports:
        raise BadParams("trace: params.port names a configured port (%s)" % ", ".join(ports))
    return port, _int_param(params, "seconds", TRACE_DEFAULT_S, 1, TRACE_MAX_S)


class _LineAt:
    """The worker as a scan sees it: at the scan's line settings, one attempt per probe
    (a silent address is the common case), and nothing more once the time is up."""

    def __init__(self, worker, baudrate, parity, deadline):
        self._worker = worker
        self._line = (baudrate, parity)
        self.deadline = deadline
        self.cut_short = False

    def transact(self, exchange):
        if time.monotonic() >= self.deadline:
            self.cut_short = True
            return Result(False, None, "scan time limit", 0, 0.0, code=TxError.STOPPING)
        return self._worker.transact(exchange.on_line(*self._line), retries=0)

    def __getattr__(self, name):
        return getattr(self._worker, name)


def scan(worker, port, protocol, opts, configured, tick=lambda: None):
    """Runs on the line's thread: the result as `mgw scan --json` prints it, plus
    `complete` (false when the time limit cut it short). `configured`: scan key -> meter
    id of the meters configured on this port with this protocol."""
    baudrate = opts["baudrate"] or worker.baudrate
    parity = opts["parity"] or worker.parity
    line = _LineAt(worker, baudrate, parity, time.monotonic() + opts["max_s"])
    options = {k: opts[k] for k in ("first", "last", "profile") if k in opts}
    found = reads.scan(line, protocol, lambda done, total, n: tick(), **options)
    key = PROTOCOLS[protocol].keyed_by
    for f in found:
        f["baudrate"], f["parity"] = baudrate, parity
        f["configured_as"] = configured.get(str(f[key])) if f[key] is not None else None
    settings = "%d %d%s%d" % (baudrate, worker.bytesize, parity, worker.stopbits)  # as the CLI
    return {"port": port, "protocol": protocol, "found": found,
            "answered_at": ["%s (%d)" % (settings, len(found))] if found else [],
            "complete": not line.cut_short}


def run_scan(worker_of, port, protocol, opts, configured, halt, tick=lambda: None):
    """A scan as one job on the port's line; waits for it (bounded)."""
    out = {}

    def job(w):
        out["result"] = scan(w, port, protocol, opts, configured, tick)
    fut = worker_of(port).submit_job(job, ON_DEMAND)
    end = time.monotonic() + opts["max_s"] + 30      # queueing on a busy line included
    while not fut.done() and time.monotonic() < end and not halt.is_set():
        tick()
        try:
            fut.result(0.5)
        except TimeoutError:
            pass
    if "result" not in out:
        failed = fut.result(0) if fut.done() else None
        why = getattr(failed, "error", None) or "the scan did not finish"
        return "failed", why, {"code": "timeout" if failed is None else "port_closed"}
    return "done", None, out["result"]


def _mask(raw):
    """Hex of received bytes with the secrets of any relay request in them masked (another
    master on the line may send one): masked_hex from every frame start on."""
    text = raw.hex()
    i = raw.find(0x68)
    while i >= 0:
        seg = masked_hex([raw[i:]])[0]
        if seg != raw[i:].hex():
            text = text[:2 * i] + seg
        i = raw.find(0x68, i + 1)
    return text


class Trace:
    """The tap on a port worker: entries of what was sent and received, time-stamped,
    bounded to TRACE_MAX_CHARS of hex (the rest counted)."""

    def __init__(self, max_chars=TRACE_MAX_CHARS):
        self.max_chars = max_chars
        self._lock = threading.Lock()
        self._entries = []          # [t, direction, bytearray, time of the last chunk]
        self._bytes = 0
        self.dropped = 0

    def __call__(self, direction, data):
        now = time.time()
        with self._lock:
            if (self._bytes + len(data)) * 2 > self.max_chars:
                self.dropped += 1
                return
            self._bytes += len(data)
            last = self._entries[-1] if self._entries else None
            if last and direction == "rx" == last[1] and now - last[3] < RX_GAP_S:
                last[2] += data
                last[3] = now
            else:
                self._entries.append([now, direction, bytearray(data), now])

    def frames(self):
        out, chars = [], 0
        with self._lock:
            entries = list(self._entries)
        for t, direction, data, _ in entries:
            text = masked_hex([bytes(data)])[0] if direction == "tx" else _mask(bytes(data))
            if chars + len(text) > self.max_chars:
                self.dropped += 1
                continue
            chars += len(text)
            out.append({"t": rfc3339(t), "dir": direction, "hex": text})
        return out


def run_trace(worker_of, port, seconds, halt, tick=lambda: None):
    """Listens on the port for `seconds` (the worker may be replaced meanwhile: the tap
    follows it)."""
    tap = Trace()
    started = time.time()
    end = time.monotonic() + seconds
    worker = None
    try:
        while time.monotonic() < end and not halt.is_set():
            current = worker_of(port)
            if current is not worker:
                if worker is not None and worker.tap is tap:
                    worker.tap = None
                worker = current
                if worker.tap is not None:
                    return "failed", "port %s is being traced already" % port, \
                        {"code": "busy"}
                worker.tap = tap
            tick()
            halt.wait(min(0.2, max(0.0, end - time.monotonic())))
    finally:
        if worker is not None and worker.tap is tap:
            worker.tap = None
    frames = tap.frames()
    return "done", None, {"port": port, "started": rfc3339(started),
                          "seconds": seconds, "frames": frames, "dropped": tap.dropped}


class Runner(threading.Thread):
    """One thread for diagnostics, beside the executor's; a bounded queue of them."""

    def __init__(self):
        super().__init__(name="diagnostics", daemon=True)
        self._queue = queue.Queue(maxsize=QUEUE_MAX)
        self.halt = threading.Event()
        self.heartbeat = time.monotonic()

    def submit(self, fn):
        """False when QUEUE_MAX diagnostics are waiting already."""
        try:
            self._queue.put_nowait(fn)
        except queue.Full:
            return False
        return True

    def tick(self):
        self.heartbeat = time.monotonic()

    def run(self):
        while not self.halt.is_set():
            self.tick()
            try:
                fn = self._queue.get(timeout=0.3)
            except queue.Empty:
                continue
            try:
                fn()
            except Exception:
                log.exception("diagnostic command")

    def stop(self, timeout=2.0):
        self.halt.set()
        if self.is_alive():
            self.join(timeout)


__all__ = ["BadParams", "Runner", "check_scan", "check_trace", "run_scan", "run_trace",
           "scan", "Trace"]
