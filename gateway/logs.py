"""Logging for the service and the command line: one short line per record on stderr, or,
under systemd, one entry per record sent to journald by its native protocol with
structured fields (MGW_EVENT, MGW_METER, MGW_COMMAND_ID), so that
`journalctl -u meter-gateway MGW_METER=m4` finds a meter's lines. The last lines are kept in
memory for the head-end's `logs` command (bounded: RECENT_LINES).

The native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL, sd_journal_sendv): one datagram
per entry to /run/systemd/journal/socket, each field `KEY=value\\n`, or, for a value with a
newline, `KEY\\n`, its length as 64-bit little-endian, the value and `\\n`. No compiled
dependency is needed for that.
"""

import collections
import logging
import os
import socket
import struct
import sys
import threading
import time

RECENT_LINES = 500
MAX_LINE = 300                  # characters of one line kept (the message, truncated)
JOURNAL_SOCKET = "/run/systemd/journal/socket"
MAX_JOURNAL_MESSAGE = 48 * 1024  # a datagram must fit the socket's buffer: longer is cut
IDENTIFIER = "meter-gateway"
_recent = collections.deque(maxlen=RECENT_LINES)

# logging level -> syslog priority (journald's PRIORITY)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
             (logging.INFO, 6), (logging.DEBUG, 7))


def fields(event=None, meter=None, command=None):
    """`extra=` for a log call: the journald fields of one line (None: not set; meter "*",
    a gateway-wide command, names no meter)."""
    out = {}
    for key, value in (("MGW_EVENT", event), ("MGW_METER", None if meter == "*" else meter),
                       ("MGW_COMMAND_ID", command)):
        if value is not None and value != "":
            out[key] = str(value)[:128]
    return {"mgw_fields": out}


class _Recent(logging.Handler):
    def emit(self, record):
        try:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created))
            line = "%s:%s %s %s: %s" % (      # RFC 3339: +08:00, not +0800
                stamp[:-2], stamp[-2:], record.levelname, record.name, record.getMessage())
        except Exception:              # a bad format string must not break logging
            return
        _recent.append((record.levelno, line[:MAX_LINE]))


def _field(key, value):
    data = value.encode("utf-8", "replace") if isinstance(value, str) else bytes(value)
    if b"\n" in data:
        return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key.encode() + b"=" + data + b"\n"


def priority(levelno):
    for floor, prio in _PRIORITY:
        if levelno >= floor:
            return prio
    return 7


class JournalHandler(logging.Handler):
    """Each record as one journald entry (native protocol). A record the socket does not
    take goes to stderr instead, so nothing is lost silently."""

    def __init__(self, path=JOURNAL_SOCKET, identifier=IDENTIFIER):
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.failures = 0
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def entry(self, record):
        message = self.format(record)
        if len(message) > MAX_JOURNAL_MESSAGE:
            message = message[:MAX_JOURNAL_MESSAGE] + " [cut]"
        parts = [_field("MESSAGE", message), _field("PRIORITY", str(priority(record.levelno))),
                 _field("SYSLOG_IDENTIFIER", self.identifier), _field("LOGGER", record.name),
                 _field("CODE_FILE", record.pathname or ""),
                 _field("CODE_LINE", str(record.lineno)),
                 _field("CODE_FUNC", record.funcName or "")]
        for key, value in sorted((getattr(record, "mgw_fields", None) or {}).items()):
            parts.append(_field(key, value))
        return b"".join(parts)

    def emit(self, record):
        try:
            data = self.entry(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self.sock.sendto(data, self.path)
        except OSError:
            self.failures += 1
            try:
                sys.stderr.write("%s %s\n" % (record.levelname, self.format(record)))
            except Exception:
                pass

    def close(self):
        try:
            self.sock.close()
        finally:
            super().close()


def journal_socket(environ=None):
    """The journald socket to log to, or None when not running under systemd: stderr is
    the journal's stream (JOURNAL_STREAM names its device and inode) or systemd started
    us (INVOCATION_ID), and the socket exists. MGW_JOURNAL_SOCKET names another socket
    (tests)."""
    env = os.environ if environ is None else environ
    path = env.get("MGW_JOURNAL_SOCKET") or JOURNAL_SOCKET
    under = bool(env.get("INVOCATION_ID"))
    stream = env.get("JOURNAL_STREAM")
    if stream and not under:
        try:
            st = os.fstat(sys.stderr.fileno())
            under = stream == "%d:%d" % (st.st_dev, st.st_ino)
        except (OSError, ValueError, AttributeError):
            under = False
    if not under or not os.path.exists(path):
        return None
    return path


def setup_logging(level="info"):
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    path = journal_socket()
    if not any(isinstance(h, (JournalHandler, logging.StreamHandler)) and
               not isinstance(h, _Recent) for h in root.handlers):
        if path:
            root.addHandler(JournalHandler(path))
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
    if not any(isinstance(h, _Recent) for h in root.handlers):
        root.addHandler(_Recent())


def recent_lines(n, level="info"):
    """The last n lines at `level` or above, oldest first."""
    floor = getattr(logging, str(level).upper(), logging.INFO)
    lines = [line for lvl, line in list(_recent) if lvl >= floor]
    return lines[-n:] if n > 0 else []


class Aggregated:
    """Lines that can come in floods (rejected input): the first in each period is logged,
    the rest are counted and said in one line when the period is over (flush())."""

    def __init__(self, logger, what, period_s=60.0, level=logging.WARNING,
                 clock=time.monotonic):
        self.log = logger
        self.what = what
        self.period_s = period_s
        self.level = level
        self.clock = clock
        self._until = None
        self.unsaid = 0
        self._lock = threading.Lock()

    def note(self, msg, *args, fields=None):
        with self._lock:
            now = self.clock()
            if self._until is not None and now < self._until:
                self.unsaid += 1
                return
            self._flush_locked(force=True)
            self._until = now + self.period_s
        self.log.log(self.level, msg, *args, extra=fields or {})

    def flush(self, force=False):
        with self._lock:
            self._flush_locked(force)

    def _flush_locked(self, force):
        if not self.unsaid or (not force and self._until is not None and
                               self.clock() < self._until):
            return
        self.log.log(self.level, "%d more %s in the last %.0f s (not logged one by one)",
                     self.unsaid, self.what, self.period_s)
        self.unsaid = 0
        if not force:
            self._until = None
