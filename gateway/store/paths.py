"""The data folder: what lives where, one gateway per folder, and room kept for a full disk.

    <data_dir>/state.json (+ .prev)     meters, command ledger, journal and store marks (state.py)
    <data_dir>/accounts.db (+ -wal/-shm) accounts, txn ledger, overrides, flags (docs.py)
    <data_dir>/journal.db (+ -wal/-shm) readings, events, results (journal.py)
    <data_dir>/audit.log (+ .1 .. .8)   hash-chained audit trail (audit.py)
    <data_dir>/.lock                    held by the running gateway; holds its pid
    <data_dir>/.reserve                 room given back when a write finds the disk full
    <data_dir>/spool/                   technicians' relay requests
"""

import contextlib
import datetime as _dt
import errno
import fcntl
import logging
import os
import stat

from gateway.store.state import StateError, fsync_dir

log = logging.getLogger(__name__)

STATE = "state.json"
JOURNAL = "journal.db"
DOCS = "accounts.db"
AUDIT = "audit.log"
LOCK = ".lock"
RESERVE = ".reserve"
SPOOL = "spool"

RESERVE_BYTES = 2 * 1024 * 1024


def path(data_dir, name):
    return os.path.join(data_dir, name)


def move_aside(path):
    """Rename an SQLite file and its -wal/-shm to <path>.bad-<time>[-k] and fsync the
    folder; the new name, or None if there was nothing to move. A stale -wal must go too:
    SQLite would replay it into a new file. Raises OSError."""
    parts = [sfx for sfx in ("", "-wal", "-shm") if os.path.lexists(path + sfx)]
    if not parts:
        return None
    base = "%s.bad-%s" % (path, _dt.datetime.now().strftime("%Y%m%dT%H%M%S"))
    aside, k = base, 1
    while any(os.path.lexists(aside + sfx) for sfx in ("", "-wal", "-shm")):
        k += 1
        aside = "%s-%d" % (base, k)
    for sfx in parts:
        os.rename(path + sfx, aside + sfx)
    fsync_dir(path)
    return aside if "" in parts else aside + parts[0]


class InstanceLocked(StateError):
    """Another process holds the data folder (exit 2: a second instance is a setup error)."""

    def __init__(self, message, pid=None):
        super().__init__(message)
        self.pid = pid


class InstanceLock:
    """An exclusive flock on <data_dir>/.lock, held while the file descriptor is open.

    The kernel drops it when the process dies (SIGKILL, power cut): no stale lock to clean.
    """

    def __init__(self, path, fd):
        self.path = path
        self._fd = fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)      # closing drops the flock
            self._fd = None

    @property
    def held(self):
        return self._fd is not None


def acquire_lock(data_dir):
    """Take the data folder for this process; raises InstanceLocked naming the holder's pid,
    or StateError when the lock file cannot be used."""
    lock_path = path(data_dir, LOCK)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        what = ("is a symbolic link" if exc.errno == errno.ELOOP
                else "cannot open (%s)" % exc.strerror)
        raise StateError("%s: %s" % (lock_path, what)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError("%s: not a regular file" % lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StateError("%s: cannot lock (%s)" % (lock_path, exc.strerror)) from None
            pid = _read_pid(fd)
            raise InstanceLocked(
                "%s: another gateway (pid %s) is running on this data folder (it holds %s)"
                % (data_dir, pid if pid is not None else "unknown", lock_path), pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    except BaseException:
        os.close(fd)
        raise
    return InstanceLock(lock_path, fd)


def _read_pid(fd):
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class DiskReserve:
    """A file that only takes room, so that room can be given back when the disk is full.

    The bytes are random, not zeros: UBIFS and JFFS2 (raw-NAND concentrators) and btrfs/ZFS
    with compression would store a file of zeros in almost no space, and a sparse file
    reserves nothing anywhere.
    """

    CHUNK = 64 * 1024

    def __init__(self, path, size_bytes=RESERVE_BYTES):
        self.path = path
        self.size_bytes = int(size_bytes)

    @property
    def present(self):
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size >= self.size_bytes

    def release(self):
        """Delete the reserve; True if that freed room (it was there)."""
        if not self.present:
            return False
        try:
            os.unlink(self.path)
        except OSError as exc:
            log.warning("%s: cannot release the disk reserve (%s)", self.path, exc.strerror)
            return False
        log.warning("%s: disk full; released %d bytes of reserve", self.path, self.size_bytes)
        return True

    def restore(self):
        """Recreate the reserve if it is missing and there is room; True if it is in place."""
        if self.present:
            return True
        tmp = self.path + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.debug("%s: cannot create the reserve (%s)", tmp, exc.strerror)
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                left = self.size_bytes
                while left > 0:
                    n = min(left, self.CHUNK)
                    f.write(os.urandom(n))     # fresh bytes: no repeat a compressor finds
                    left -= n
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.debug("%s: no room for the reserve yet (%s)", self.path, exc.strerror)
            return False
        return True


STATUS = "status.json"
# `mgw status` and `mgw relay` trust status.json while it is this many status cycles old
# (plus a few seconds): older, and the service is taken to be not running
STATUS_FRESH_CYCLES = 3
STATUS_FRESH_SLACK_S = 5.0


def status_path(gateway):
    """status.json of a [gateway] section (status_dir may be a tmpfs, RuntimeDirectory)."""
    return os.path.join(gateway.status_dir or gateway.data_dir, STATUS)


def status_time(value):
    """Unix seconds of a time in status.json: RFC 3339 (what the service writes), or the
    epoch number older versions wrote; 0 when absent or unreadable."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        import datetime as _dt
        return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def status_is_fresh(status, interval_s, now):
    """Whether a status.json document says the service is running now."""
    age = now - status_time(status.get("written_at"))
    return not status.get("stopped") and \
        age < STATUS_FRESH_CYCLES * interval_s + STATUS_FRESH_SLACK_S
