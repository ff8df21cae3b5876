"""Port workers: one thread owns one RS-485 line.

Transactions are taken relay control first, then on-demand reads, then scheduled polls.
Before each request the receive buffer is cleared (no stray bytes carry over), the line is
switched to the baud rate and parity the exchange asks for (a meter's own, when it differs
from the port's: 1997 meters at 1200 baud beside 2007 meters at 2400), and after an address
change the line settles for the configured pause. The answer timeout is derived from
the wire time of the request and of the expected answer at the line's baud rate plus a
per-meter latency budget that adapts to how the meter really answers (DL/T 645 allows
20-500 ms before the first byte). An answer is only accepted when its address, function
and identifier match the request; anything else on the line is counted and ignored.
"""

import errno
import heapq
import itertools
import logging
import os
import select
import termios
import threading
import time
from typing import Any, NamedTuple, Optional

import serial

from gateway.model import GatewayError, TxError
from protocols.framing import Scanner

log = logging.getLogger(__name__)

RELAY = 0
ON_DEMAND = 1
POLL = 2

PREAMBLE_ALLOWANCE = 4        # meters send up to 4 FE before an answer
MIN_BUDGET_S = 0.06
MAX_BUDGET_S = 1.0
INITIAL_BUDGET_S = 0.5        # DL/T 645 Td upper bound (reference 1.7)
SLACK_S = 0.02                # scheduling and USB-adapter latency on the gateway side


def wire_time(nbytes, baudrate, bits=11):
    return nbytes * bits / float(baudrate)


class PortError(GatewayError):
    """A port that cannot be used; one line naming the port and device. `in_use`: another
    process holds it (the service, most likely)."""

    def __init__(self, message, in_use=False):
        super().__init__(message)
        self.in_use = in_use


def open_error(name, device, exc):
    """One line for why a serial device cannot be opened."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOENT or "No such file" in text:
        why = "does not exist"
    elif code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        why = "permission denied (the gateway user needs the dialout group)"
    elif "exclusively lock" in text or code in (errno.EBUSY, errno.EAGAIN):
        return PortError("port %s: %s is in use by another process" % (name, device),
                         in_use=True)
    else:
        why = text.splitlines()[0] if text else type(exc).__name__
    return PortError("port %s: %s %s" % (name, device, why))


class Future:
    """The result of a queued request, waited for by another thread (a small stand-in for
    concurrent.futures.Future, which the gateway would import for nothing else)."""

    __slots__ = ("_done", "_value")

    def __init__(self):
        self._done = threading.Event()
        self._value = None

    def set_running_or_notify_cancel(self):
        return True

    def set_result(self, value):
        self._value = value
        self._done.set()

    def done(self):
        return self._done.is_set()

    def result(self, timeout=None):
        if not self._done.wait(timeout):
            raise TimeoutError("no result within %s s" % timeout)
        return self._value


class Result(NamedTuple):
    ok: bool
    answer: Any
    error: Optional[str]          # for people
    attempts: int
    elapsed: float
    frames: tuple = ()            # (sent, received) raw frames, for the audit trail
    code: Optional[TxError] = None   # for programs: why there is no answer


class LatencyBudget:
    """How long to wait for a meter's first byte: like TCP's RTO, a smoothed mean plus
    four mean deviations of what the meter really did, within DL/T 645's limits."""

    __slots__ = ("srtt", "rttvar")

    def __init__(self):
        self.srtt = None
        self.rttvar = None

    def budget(self):
        if self.srtt is None:
            return INITIAL_BUDGET_S
        return min(MAX_BUDGET_S, max(MIN_BUDGET_S, self.srtt + 4 * self.rttvar + 0.01))

    def observe(self, latency):
        latency = max(0.0, latency)
        if self.srtt is None:
            self.srtt, self.rttvar = latency, latency / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - latency)
            self.srtt = 0.875 * self.srtt + 0.125 * latency


class LineStats:
    FIELDS = ("requests", "answers", "timeouts", "retries", "foreign_frames", "errors",
              "restarts", "reopens", "line_switches")

    def __init__(self):
        self.started = time.monotonic()
        self.busy_s = 0.0
        for f in self.FIELDS:
            setattr(self, f, 0)

    def as_dict(self, scanners):
        d = {f: getattr(self, f) for f in self.FIELDS}
        d["checksum_errors"] = sum(s.checksum_errors + s.end_errors for s in scanners)
        d["garbage_bytes"] = sum(s.bytes_discarded for s in scanners)
        elapsed = max(1e-9, time.monotonic() - self.started)
        d["utilisation"] = round(min(1.0, self.busy_s / elapsed), 4)
        return d


class PortWorker(threading.Thread):
    """Owns one serial line. `transact` runs on this thread (poll jobs); `submit` queues a
    request from any thread and returns a Future of its Result."""

    def __init__(self, name, device, baudrate=2400, parity="E", bytesize=8, stopbits=1,
                 retries=2, settle_s=0.0, poll_source=None, serial_factory=serial.Serial):
        super().__init__(name="port-%s" % name, daemon=True)
        self.port_name = name
        self.device = device
        self.baudrate = baudrate
        self.parity = parity
        self.bytesize = bytesize
        self.stopbits = stopbits
        self.retries = retries
        self.settle_s = settle_s
        self.poll_source = poll_source
        self._serial_factory = serial_factory
        self._ser = None
        self._queue = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._halt = threading.Event()
        self._budgets = {}
        self._last_address = None
        self._line = None                   # (baudrate, parity) the open port is set to
        self._pty = False                   # a pseudo-terminal: parity is not set on it
        self.scanners = {}                  # one per framing met on this line
        self.stats = LineStats()
        self.last_error = None
        self._last_exception = None
        self.heartbeat = time.monotonic()   # the supervisor's sign of life
        self.tap = None                     # tap(direction, bytes): a remote `trace`

    # ---------------------------------------------------------------- public

    def open(self):
        """Open the device now (raises PortError with one line)."""
        parity = self.parity
        if os.path.realpath(self.device).startswith("/dev/pts/"):
            # a pseudo-terminal (the simulator) carries bytes, not bits: no parity to set,
            # and Linux ptys refuse PARENB on a re-open
            parity = serial.PARITY_NONE
        try:
            self._ser = self._serial_factory(
                self.device, self.baudrate, bytesize=self.bytesize, parity=parity,
                stopbits=self.stopbits, timeout=0.1, exclusive=True)
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise open_error(self.port_name, self.device, exc) from None
        self._pty = parity != self.parity
        self._line = (self.baudrate, self.parity)

    def use_line(self, baudrate=None, parity=None):
        """Switch the open port to these settings (None: the port's own) before the next
        transaction; returns the baud rate now in use."""
        want = (baudrate or self.baudrate, parity or self.parity)
        ser = self._ser
        if ser is not None and want != self._line:
            ser.baudrate = want[0]
            if not self._pty:
                ser.parity = want[1]
            self._line = want
            self.stats.line_switches += 1
        return want[0]

    def close(self):
        if self._ser is not None:
            try:
                self._ser.close()
            except Exception:
                pass
            self._ser = None

    def submit(self, request, priority=ON_DEMAND):
        fut = Future()
        with self._cv:
            heapq.heappush(self._queue, (priority, next(self._seq), request, fut))
            self._cv.notify()
        return fut

    def submit_job(self, job, priority=ON_DEMAND):
        """Queue a callable job(worker) run on this line's thread (a multi-step read)."""
        return self.submit(job, priority)

    def stop(self, timeout=5.0):
        self._halt.set()
        with self._cv:
            self._cv.notify_all()
        if self.is_alive():
            self.join(timeout)
        self.close()
        with self._cv:
            while self._queue:
                _, _, _, fut = heapq.heappop(self._queue)
                fut.set_result(Result(False, None, "gateway stopping", 0, 0.0,
                                      code=TxError.STOPPING))

    def line_stats(self):
        d = self.stats.as_dict(self.scanners.values())
        d.update(port=self.port_name, device=self.device, baudrate=self.baudrate,
                 open=self._ser is not None, last_error=self.last_error)
        return d

    def budget(self, meter):
        return self._budgets.setdefault(meter, LatencyBudget())

    # ---------------------------------------------------------------- the thread

    def run(self):
        backoff = 1.0
        while not self._halt.is_set():
            self.heartbeat = time.monotonic()
            if self._ser is None:
                try:
                    self.open()
                    backoff = 1.0
                    self.last_error = None
                except PortError as exc:
                    if str(exc) != self.last_error:
                        log.error("%s", exc)
                    self.last_error = str(exc)
                    self._fail_queued(str(exc))
                    self._halt.wait(backoff)
                    backoff = min(60.0, backoff * 2)
                    continue
            try:
                self._step()
            except (serial.SerialException, OSError, termios.error) as exc:
                self.stats.reopens += 1
                self.last_error = "port %s: %s" % (self.port_name, exc)
                log.error("%s; reopening", self.last_error)
                self.close()
            except Exception as exc:
                # a bug in a poll job must not stop the line: log, count, carry on
                self.stats.errors += 1
                key = "%s: %s" % (type(exc).__name__, exc)
                if key != self._last_exception:
                    log.exception("port %s: unexpected error", self.port_name)
                else:
                    log.error("port %s: unexpected error again (%s)", self.port_name, key)
                self._last_exception = key
                self._halt.wait(0.2)

    def _fail_queued(self, why):
        with self._cv:
            while self._queue and self._queue[0][0] <= ON_DEMAND:
                _, _, _, fut = heapq.heappop(self._queue)
                if not fut.done():
                    fut.set_result(Result(False, None, why, 0, 0.0,
                                          code=TxError.PORT_CLOSED))

    def _step(self):
        if self._run_queued():
            return
        src = self.poll_source
        wait = 1.0
        if src is not None:
            job = src.next_job(self)
            if callable(job):
                job(self)
                return
            wait = job if job is not None else 1.0
        with self._cv:
            if not self._queue and not self._halt.is_set():
                self._cv.wait(min(max(wait, 0.0), 1.0))

    def _run_queued(self, below=POLL + 1):
        """Runs queued requests with priority < below; True if it ran any."""
        ran = False
        while True:
            with self._cv:
                if not self._queue or self._queue[0][0] >= below:
                    return ran
                _, _, request, fut = heapq.heappop(self._queue)
            if fut.set_running_or_notify_cancel():
                try:
                    if not hasattr(request, "accept"):       # a job, not an exchange
                        request(self)
                        fut.set_result(None)
                        ran = True
                        continue
                    fut.set_result(self._execute(request))
                except Exception as exc:
                    fut.set_result(Result(False, None, "internal error: %s" % exc, 0, 0.0,
                                          code=TxError.NO_ANSWER))
                    raise
            ran = True

    def transact(self, exchange, retries=None):
        """Run one exchange now on this thread (poll jobs), after anything more urgent;
        `retries` None: the port's."""
        self._run_queued(below=POLL)
        return self._execute(exchange, retries)

    def broadcast(self, frame, baudrate=None, parity=None):
        """Send a frame no meter answers (broadcast time sync) at these line settings (None:
        the port's); waits its wire time."""
        ser = self._ser
        if ser is None:
            return False
        baud = self.use_line(baudrate, parity)
        ser.reset_input_buffer()
        t = time.monotonic()
        ser.write(frame)
        if self.tap is not None:
            self.tap("tx", frame)
        self._last_address = None
        time.sleep(wire_time(len(frame), baud) + SLACK_S)
        self.stats.busy_s += time.monotonic() - t
        return True

    # ---------------------------------------------------------------- one transaction

    def _execute(self, request, retries=None):
        """One exchange (protocols.exchange.Exchange) on the line, with retries."""
        ser = self._ser
        if self._halt.is_set():
            return Result(False, None, "gateway stopping", 0, 0.0, code=TxError.STOPPING)
        if ser is None:
            return Result(False, None, self.last_error or "port not open", 0, 0.0,
                          code=TxError.PORT_CLOSED)
        scanner = self.scanners.get(request.framing)
        if scanner is None:
            scanner = self.scanners[request.framing] = Scanner(request.framing)
        budget = self.budget(request.meter)
        t_start = time.monotonic()
        baud = self.use_line(getattr(request, "baudrate", None), getattr(request, "parity", None))
        if self.settle_s and self._last_address not in (None, request.address_key):
            time.sleep(self.settle_s)
        self._last_address = request.address_key
        req_wire = wire_time(len(request.frame), baud)
        ans_wire = wire_time(request.answer_len + PREAMBLE_ALLOWANCE, baud)
        why = "no answer"
        code = TxError.NO_ANSWER
        attempts = 0
        for attempt in range(1 + (self.retries if retries is None else retries)):
            attempts = attempt + 1
            if attempt:
                self.stats.retries += 1
            ser.reset_input_buffer()
            scanner.flush()
            self.stats.requests += 1
            t_write = time.monotonic()
            ser.write(request.frame)
            if self.tap is not None:
                self.tap("tx", request.frame)
            wait = budget.budget() * (2 if attempt else 1)
            deadline = t_write + req_wire + wait + ans_wire + SLACK_S
            # the budget is for the first byte: a meter that has not started by then will
            # not answer this attempt (no need to wait out the answer's wire time too)
            first_byte_by = t_write + req_wire + wait + SLACK_S
            fd = ser.fileno()
            bad_before = scanner.checksum_errors + scanner.end_errors
            garbled = False
            quiet = wire_time(4, baud) + SLACK_S
            last_rx = None
            while True:
                now = time.monotonic()
                if last_rx is None:
                    limit = first_byte_by
                elif garbled:
                    limit = min(deadline, last_rx + quiet)
                else:
                    limit = deadline
                if now >= limit:
                    break
                if not select.select([fd], [], [], limit - now)[0]:
                    continue
                data = ser.read(ser.in_waiting or 1)
                if not data:
                    continue
                last_rx = time.monotonic()
                if self.tap is not None:
                    self.tap("rx", data)
                frames = scanner.feed(data)
                if not garbled and scanner.checksum_errors + scanner.end_errors > bad_before:
                    # a garbled answer: retry once the line has gone quiet, not at the
                    # end of the whole budget (a real answer may still follow: keep reading)
                    garbled = True
                    why = "garbled answer"
                    code = TxError.GARBLED
                for raw in frames:
                    answer, mismatch = request.accept(raw)
                    if answer is None:
                        self.stats.foreign_frames += 1
                        why = "foreign frame: %s" % mismatch
                        code = TxError.FOREIGN
                        continue
                    t_done = time.monotonic()
                    budget.observe(t_done - t_write - req_wire - wire_time(len(raw), baud))
                    self.stats.answers += 1
                    self.stats.busy_s += t_done - t_write
                    return Result(True, answer, None, attempts, t_done - t_start,
                                  (request.frame, raw))
            self.stats.timeouts += 1
            self.stats.busy_s += time.monotonic() - t_write
            if not garbled and code == TxError.GARBLED:
                why, code = "no answer", TxError.NO_ANSWER
        return Result(False, None, "%s after %d attempts" % (why, attempts), attempts,
                      time.monotonic() - t_start, (request.frame,), code)


