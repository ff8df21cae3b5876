"""Small mutable state in TinyDB, written crash-safe: meters, accounts and balances, the
command ledger, head-end configuration.

TinyDB's own JSONStorage rewrites its file in place: a kill or power cut mid-write leaves a
file it cannot open. AtomicStorage writes a temporary file, fsyncs it, keeps the previous
good copy as a hard link (`.prev`), renames the new file into place and fsyncs the folder,
so the file on disk is always either the old or the new state. Each file starts with a header
line (format version, SHA-256 and length of the body) so truncation and bit rot are detected,
not parsed into half a state. A file that cannot be read is kept aside and reported; it is
never replaced by an empty one.

StateStore is the one owner of a TinyDB instance: every access holds its lock, and `batch()`
turns several changes into one atomic write (a balance and the journal position it was
charged up to are written together).
"""

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import threading

from tinydb import TinyDB, where
from tinydb.storages import Storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# format migrations: version -> function(tables) returning the tables of version + 1
MIGRATIONS = {}


class StateError(Exception):
    """The state file cannot be used; the message is one line naming the file."""


def fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(raw, path):
    """Tables from file bytes; raises StateError naming what is wrong."""
    head, sep, body = raw.partition(b"\n")
    try:
        header = json.loads(head)
    except ValueError:
        header = None
    if not sep or not isinstance(header, dict) or "format" not in header:
        # a plain TinyDB file (format 0): accepted once, migrated on the next write
        try:
            tables = json.loads(raw)
        except ValueError as exc:
            raise StateError("%s: not a state file (%s)" % (path, exc)) from None
        if not isinstance(tables, dict):
            raise StateError("%s: not a state file (top level is not an object)" % path)
        return 0, tables
    if header.get("length") != len(body):
        raise StateError("%s: truncated (%d of %s body bytes)"
                         % (path, len(body), header.get("length")))
    if header.get("sha256") != hashlib.sha256(body).hexdigest():
        raise StateError("%s: checksum mismatch (file garbled)" % path)
    try:
        tables = json.loads(body)
    except ValueError as exc:
        raise StateError("%s: body is not JSON (%s)" % (path, exc)) from None
    version = header["format"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StateError("%s: format %r is newer than this gateway understands (%d)"
                         % (path, version, FORMAT_VERSION))
    return version, tables


def _migrate(version, tables):
    while version < FORMAT_VERSION:
        tables = MIGRATIONS.get(version, lambda t: t)(tables)
        version += 1
    return tables


def read_state_file(path):
    """Tables of a state file (migrated to the current format), None if it does not exist."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError("%s: cannot read (%s)" % (path, exc.strerror)) from None
    version, tables = _parse(raw, path)
    return _migrate(version, tables)


def write_state_file(path, tables):
    """Replace the file atomically, keeping the previous good copy at path + '.prev'."""
    body = json.dumps(tables, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    body = body.encode("utf-8")
    header = json.dumps({"format": FORMAT_VERSION, "sha256": hashlib.sha256(body).hexdigest(),
                         "length": len(body)}).encode()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header + b"\n" + body)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        # the previous good copy: a second name for the current inode, swapped in atomically
        prev_tmp = path + ".prev.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(prev_tmp)
        os.link(path, prev_tmp)
        os.replace(prev_tmp, path + ".prev")
    os.replace(tmp, path)
    fsync_dir(path)


class AtomicStorage(Storage):
    """TinyDB storage over read_state_file/write_state_file, with the tables cached.

    After a failed write the cache is reloaded from disk, so memory never runs ahead of
    what is stored.
    """

    def __init__(self, path, recover=False):
        super().__init__()
        self.path = path
        self.deferred = False
        self._dirty = False
        self._cache = self._load(recover)

    def _load(self, recover):
        try:
            return read_state_file(self.path)
        except StateError as exc:
            aside = "%s.bad-%s" % (self.path, _dt.datetime.now().strftime("%Y%m%dT%H%M%S"))
            prev = self.path + ".prev"
            try:
                prev_tables = read_state_file(prev)
            except StateError:
                prev_tables = None
            if recover and prev_tables is not None:
                os.replace(self.path, aside)
                log.warning("%s; kept aside as %s; recovered the previous good copy %s",
                            exc, aside, prev)
                write_state_file(self.path, prev_tables)
                return prev_tables
            hint = (" (a previous good copy exists: %s; start with state recovery to use it)"
                    % prev if prev_tables is not None else "")
            os.link(self.path, aside) if not os.path.exists(aside) else None
            raise StateError("%s; a copy is kept as %s%s" % (exc, aside, hint)) from None

    def read(self):
        return self._cache

    def write(self, data):
        self._cache = data
        if self.deferred:
            self._dirty = True
            return
        self.flush(force=True)

    def flush(self, force=False):
        if not (force or self._dirty):
            return
        try:
            write_state_file(self.path, self._cache)
            self._dirty = False
        except OSError as exc:
            self._dirty = False
            self._cache = read_state_file(self.path)
            raise StateError("%s: cannot write (%s)" % (self.path, exc.strerror or exc)) from None


class StateStore:
    """The one owner of a state file. Documents are keyed by a string per table."""

    def __init__(self, path, recover=False):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.RLock()
        self._db = TinyDB(path, storage=AtomicStorage, recover=recover)
        self._storage = self._db.storage
        self._batch_depth = 0

    def close(self):
        with self._lock:
            self._db.close()

    def get(self, table, key, default=None):
        with self._lock:
            doc = self._db.table(table).get(where("_key") == key)
            if doc is None:
                return default
            doc = dict(doc)
            doc.pop("_key", None)
            return doc

    def put(self, table, key, doc):
        with self._lock:
            self._db.table(table).upsert(dict(doc, _key=key), where("_key") == key)

    def delete(self, table, key):
        with self._lock:
            self._db.table(table).remove(where("_key") == key)

    def all(self, table):
        with self._lock:
            out = {}
            for doc in self._db.table(table).all():
                doc = dict(doc)
                out[doc.pop("_key")] = doc
            return out

    @contextlib.contextmanager
    def batch(self):
        """Several changes, one atomic write at the end (nothing written if it raises)."""
        with self._lock:
            self._batch_depth += 1
            self._storage.deferred = True
            ok = False
            try:
                yield self
                ok = True
            finally:
                self._batch_depth -= 1
                if self._batch_depth == 0:
                    self._storage.deferred = False
                    if ok:
                        self._storage.flush()
                    else:
                        self._storage._dirty = False
                        self._storage._cache = read_state_file(self.path)
                        for table in self._db._tables.values():
                            table.clear_cache()
