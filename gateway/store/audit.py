"""The audit trail of every command, remote or local: append-only JSON lines, each carrying
the SHA-256 of the one before, fsynced before the operation goes on. Removing or editing a
line breaks the chain, and `verify` says where.

The trail is bounded: past MAX_BYTES the file is rotated (audit.log -> audit.log.1 -> ... ->
audit.log.KEEP, the oldest beyond KEEP deleted) and the chain goes on across files (the first
entry of a new file carries the last hash of the one before). Every entry is also handed to
`on_entry`, which the gateway journals as an `audit` event for the head-end: the head-end,
not the box, keeps the whole history.

Input that failed authentication costs at most one entry per minute: counts per reason and a
few samples (digest and a printable prefix), never the payload itself.
"""

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import threading
import time

from gateway.clock import rfc3339
from gateway.store.state import fsync_dir

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAX_BYTES = 1024 * 1024         # per file
KEEP = 8                        # rotated files: audit.log.1 .. audit.log.8

UNAUTH_WINDOW_S = 60            # one aggregate entry per minute
UNAUTH_REASONS = 8              # distinct reasons kept apart; the rest count as "other"
UNAUTH_SAMPLES = 3              # samples per reason
UNAUTH_PREFIX = 64              # payload bytes shown per sample


def _digest(prev, entry):
    body = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256((prev + body).encode("utf-8")).hexdigest()


def _printable(raw, limit):
    # quotes and backslashes too: JSON would double them and the bound would not hold
    return "".join(chr(b) if 0x20 <= b < 0x7f and b not in (0x22, 0x5c) else "."
                   for b in raw[:limit])


def rotated_names(path, keep=KEEP):
    """The trail's files, oldest first, that exist."""
    names = ["%s.%d" % (path, i) for i in range(keep, 0, -1)] + [path]
    return [n for n in names if os.path.lexists(n)]


def _last_entry(path, repair):
    """(n, hash) of the last whole entry of a file, or None. With repair, a torn tail (a
    power cut mid-append: never acknowledged) is cut off the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    good = len(raw) if raw.endswith(b"\n") else raw.rfind(b"\n") + 1
    found = None
    while good > 0:
        start = raw.rfind(b"\n", 0, good - 1) + 1
        try:
            rec = json.loads(raw[start:good])
            found = (rec["n"], rec["hash"])
            break
        except (ValueError, KeyError, TypeError):
            good = start
    if repair and good < len(raw):
        log.warning("%s: dropped a torn last entry (%d bytes)", path, len(raw) - good)
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return found


def _open_append(path, extra=0):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                 | extra, 0o640)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd, st.st_size


class AuditTrail:
    def __init__(self, path, on_entry=None, clock=time.time, max_bytes=MAX_BYTES, keep=KEEP):
        self.path = path
        self._lock = threading.Lock()
        self.on_entry = on_entry
        self._clock = clock
        self.max_bytes = int(max_bytes)
        self.keep = int(keep)
        self._recover_rotation()
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(path).st_mode):    # a link planted in its place
                raise OSError(errno.EINVAL, "not a regular file", path)
        self.n, self.last = _last_entry(path, repair=True) or \
            _last_entry(path + ".1", repair=False) or (0, GENESIS)
        self._fd, self._size = _open_append(path)
        self._unauth = None

    def verify(self):
        """verify() of this trail, with appends held off (no torn last line is read)."""
        with self._lock:
            return verify(self.path, self.keep)

    def _recover_rotation(self):
        """A crash inside _rotate leaves audit.log.new: finish or undo the rotation."""
        new = self.path + ".new"
        if not os.path.lexists(new):
            return
        if os.path.lexists(self.path):
            os.unlink(new)                  # the shift had not started
        else:
            os.replace(new, self.path)      # the old file is already audit.log.1

    # ------------------------------------------------------------ appends

    def append(self, kind, **data):
        """Write one entry and fsync it. On failure (a full disk) raises OSError and the
        trail is as it was: nothing half-written, the chain unchanged."""
        with self._lock:
            entry = self._append_locked(kind, data)
        if self.on_entry:
            self.on_entry(entry)
        return entry

    def _append_locked(self, kind, data):
        # RFC 3339, as in every payload (older entries carry epoch seconds; the hash
        # covers whatever an entry holds, so both verify)
        entry = dict(data, kind=kind, n=self.n + 1, ts=rfc3339(self._clock()), prev=self.last)
        entry["hash"] = _digest(self.last, entry)
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=False, default=str)
                + "\n").encode("utf-8")
        if self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        start = self._size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write (%d of %d bytes)"
                              % (written, len(line)), self.path)
            os.fsync(self._fd)
        except OSError:
            # a torn line would break the chain for every later entry: cut it off
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self._size = start + len(line)
        self.n, self.last = entry["n"], entry["hash"]
        return entry

    def _rotate(self):
        new = self.path + ".new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(new)
        fd, _ = _open_append(new, os.O_EXCL)    # first: nothing moves if this fails
        try:
            for i in range(self.keep - 1, 0, -1):
                older = "%s.%d" % (self.path, i)
                if os.path.lexists(older):
                    os.replace(older, "%s.%d" % (self.path, i + 1))
            os.replace(self.path, self.path + ".1")
            os.replace(new, self.path)
            fsync_dir(self.path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(new)
            raise
        os.close(self._fd)
        self._fd, self._size = fd, 0

    # ------------------------------------------------------------ unauthenticated input

    def unauthenticated(self, reason, payload_bytes, now=None):
        """Count one input that failed authentication. Writes at most one entry a minute
        (`command.unauthenticated`: count, counts per reason, up to UNAUTH_SAMPLES samples
        per reason as {sha256, prefix}); returns that entry when one was written. Raises
        OSError like append, and then keeps the counts for the next try."""
        now = self._clock() if now is None else now
        reason = _printable(str(reason).encode("utf-8", "replace"), 80)
        payload = bytes(payload_bytes or b"")
        with self._lock:
            entry = None
            if self._unauth and self._due(now):
                entry = self._write_unauth_locked()
            agg = self._unauth
            if agg is None:
                agg = self._unauth = {"since": now, "count": 0,
                                      "reasons": collections.Counter(), "samples": {}}
            if reason not in agg["reasons"] and len(agg["reasons"]) >= UNAUTH_REASONS:
                reason = "other"
            agg["until"] = now
            agg["count"] += 1
            agg["reasons"][reason] += 1
            samples = agg["samples"].setdefault(reason, [])
            if len(samples) < UNAUTH_SAMPLES:
                samples.append({"sha256": hashlib.sha256(payload).hexdigest(),
                                "prefix": _printable(payload, UNAUTH_PREFIX)})
        if entry and self.on_entry:
            self.on_entry(entry)
        return entry

    def _due(self, now):
        return int(now // UNAUTH_WINDOW_S) != int(self._unauth["since"] // UNAUTH_WINDOW_S)

    def _write_unauth_locked(self):
        agg = self._unauth
        entry = self._append_locked("command.unauthenticated", {
            "since": rfc3339(agg["since"]), "until": rfc3339(agg["until"]),
            "count": agg["count"],
            "reasons": dict(agg["reasons"]), "samples": agg["samples"]})
        self._unauth = None
        return entry

    def flush_unauthenticated(self, now=None, force=False):
        """Write the aggregate once its minute is over (or now, with force); call it from a
        periodic loop so a burst followed by silence is recorded within a minute or so."""
        now = self._clock() if now is None else now
        with self._lock:
            if not self._unauth or not (force or self._due(now)):
                return None
            entry = self._write_unauth_locked()
        if self.on_entry:
            self.on_entry(entry)
        return entry

    def close(self):
        try:
            self.flush_unauthenticated(force=True)
        except OSError as exc:
            log.warning("%s: unauthenticated-input counts not written: %s", self.path, exc)
        os.close(self._fd)


def verify(path, keep=KEEP):
    """(entries, None) if the chain is whole across the rotated set (audit.log.KEEP ..
    audit.log.1, audit.log), else (entries checked, the problem). The first file may start
    after the genesis only when the set is full (older files were rotated away)."""
    names = rotated_names(path, keep)
    prev = None if names and names[0] == "%s.%d" % (path, keep) else GENESIS
    n = 0
    for name in names:
        with open(name, "rb") as f:
            for i, raw in enumerate(f, 1):
                where = "%s line %d" % (os.path.basename(name), i)
                try:
                    entry = json.loads(raw)
                except ValueError:
                    return n, "%s: not JSON" % where
                if not isinstance(entry, dict):
                    return n, "%s: not an entry" % where
                h = entry.pop("hash", None)
                if prev is not None and entry.get("prev") != prev:
                    return n, "%s: chain broken (prev does not match)" % where
                if _digest(entry.get("prev", ""), entry) != h:
                    return n, "%s: hash mismatch (edited)" % where
                prev = h
                n += 1
    return n, None
