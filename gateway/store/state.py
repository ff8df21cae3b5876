"""Small mutable state in TinyDB, written crash-safe: meters, accounts and balances, the
command ledger, head-end configuration.

TinyDB's own JSONStorage rewrites its file in place: a kill or power cut mid-write leaves a
file it cannot open. AtomicStorage writes a temporary file, fsyncs it, keeps the previous
good copy as a hard link (`.prev`), renames the new file into place and fsyncs the folder,
so the file on disk is always either the old or the new state. Each file starts with a header
line (format version, SHA-256 and length of the body) so truncation and bit rot are detected,
not parsed into half a state. A file that cannot be read is kept aside and reported; it is
never replaced by an empty one. A file without the header is accepted only when it is shaped
like TinyDB's own and no headed `.prev` says this gateway wrote headed files here. The file is
opened without following links or blocking (a symlink, folder or FIFO is refused in one line).

StateStore is the one owner of a TinyDB instance: every access holds its lock, and `batch()`
turns several changes into one atomic write (a balance and the journal position it was
charged up to are written together).
"""

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import stat
import threading

from tinydb import TinyDB
from tinydb.storages import Storage

from gateway.model import GatewayError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# format migrations: version -> function(tables) returning the tables of version + 1
MIGRATIONS = {}


class StateError(GatewayError):
    """The state file cannot be used; the message is one line naming the file."""


class StateDiskFull(StateError):
    """A write failed for lack of space; memory still equals what is on disk."""


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
        except (ValueError, RecursionError) as exc:
            raise StateError("%s: not a state file (%s)" % (path, exc)) from None
        problem = _not_tinydb(tables)
        if problem:
            raise StateError("%s: not a state file (no header, and %s)" % (path, problem))
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


def _not_tinydb(tables):
    """Why a header-less document is not a TinyDB file (None if it is one): tables of
    documents keyed by decimal ids. Any other JSON object (`{"status": "failed"}`) would
    otherwise start the gateway with empty ledgers."""
    if not isinstance(tables, dict):
        return "the top level is not an object"
    for name, table in tables.items():
        if not isinstance(table, dict):
            return "%r is not a table" % name[:40]
        for doc_id, doc in table.items():
            if not (doc_id.isdigit() and doc_id.isascii()) or not isinstance(doc, dict):
                return "table %r holds something other than documents" % name[:40]
    return None


def _read_regular(path):
    """Bytes of a regular file, None if absent. Never follows a link nor blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError("%s: is a symbolic link, not the gateway's file" % path) from None
        raise StateError("%s: cannot read (%s)" % (path, exc.strerror)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError("%s: not a regular file (%s)" % (path, _kind(st.st_mode)))
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except OSError as exc:
        raise StateError("%s: cannot read (%s)" % (path, exc.strerror)) from None
    finally:
        os.close(fd)


def _kind(mode):
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")


def _headed(path):
    """True if the file at path starts with a state-file header line."""
    try:
        raw = _read_regular(path)
    except StateError:
        return False
    try:
        header = json.loads((raw or b"").partition(b"\n")[0])
    except ValueError:
        return False
    return isinstance(header, dict) and "format" in header


def read_state_file(path):
    """Tables of a state file (migrated to the current format), None if it does not exist."""
    raw = _read_regular(path)
    if raw is None:
        return None
    version, tables = _parse(raw, path)
    if version == 0 and _headed(path + ".prev"):
        # this gateway has written headed files here: a plain one is not its own
        raise StateError("%s: no header although the previous copy %s has one "
                         "(not the file this gateway wrote)" % (path, path + ".prev"))
    return _migrate(version, tables)


def write_state_file(path, tables):
    """Replace the file atomically, keeping the previous good copy at path + '.prev'."""
    body = json.dumps(tables, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    body = body.encode("utf-8")
    header = json.dumps({"format": FORMAT_VERSION, "sha256": hashlib.sha256(body).hexdigest(),
                         "length": len(body)}).encode()
    tmp = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)          # whatever is there (a link planted by someone) is not ours
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o640)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header + b"\n" + body)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            # the previous good copy: a second name for the current inode, swapped in
            # atomically
            prev_tmp = path + ".prev.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(prev_tmp)
            os.link(path, prev_tmp)
            os.replace(prev_tmp, path + ".prev")
        os.replace(tmp, path)
    except OSError:
        # a half-written temporary file only takes room a full disk needs
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path)


class AtomicStorage(Storage):
    """TinyDB storage over read_state_file/write_state_file, with the tables cached.

    After a failed write the cache is reloaded from disk, so memory never runs ahead of
    what is stored.
    """

    def __init__(self, path, recover=False, reserve=None):
        super().__init__()
        self.path = path
        self.reserve = reserve
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
            try:
                st = os.lstat(self.path)
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                # a link, folder or FIFO is not a damaged state: nothing to keep a copy of
                raise StateError("%s%s" % (exc, hint)) from None
            try:
                if not os.path.lexists(aside):
                    os.link(self.path, aside, follow_symlinks=False)
            except OSError as link_exc:
                raise StateError("%s; cannot keep a copy as %s (%s)%s" % (
                    exc, aside, link_exc.strerror, hint)) from None
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
            try:
                write_state_file(self.path, self._cache)
            except OSError as exc:
                # a full disk: give back the reserved room once, so the ledger can still
                # record what happened to a command
                if not (exc.errno == errno.ENOSPC and self.reserve is not None
                        and self.reserve.release()):
                    raise
                log.warning("%s: disk full; released the reserve %s to write",
                            self.path, self.reserve.path)
                write_state_file(self.path, self._cache)
            self._dirty = False
        except OSError as exc:
            self._dirty = False
            self._cache = read_state_file(self.path)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StateDiskFull("%s: cannot write (disk full)" % self.path) from None
            raise StateError("%s: cannot write (%s)" % (self.path, exc.strerror or exc)) from None


class StateStore:
    """The one owner of a state file. Documents are keyed by a string per table."""

    def __init__(self, path, recover=False, reserve=None):
        """reserve: a paths.DiskReserve released once when a write finds the disk full."""
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.RLock()
        self._db = TinyDB(path, storage=AtomicStorage, recover=recover, reserve=reserve)
        self._storage = self._db.storage
        self._batch_depth = 0
        self._index = {}            # table -> (its cached documents, {key: [doc ids]})

    def close(self):
        with self._lock:
            self._db.close()

    # Documents are found through an index {key: [doc ids]} per table, built from the cached
    # tables in one pass and kept in step with every change made here, so get and put cost
    # O(1) instead of a query over the whole table (a billing cycle over 1,000 accounts was
    # O(accounts^2)). Changes are made to the cached tables the way TinyDB's upsert and
    # remove make them (fields merged into the stored document in place, new documents under
    # TinyDB's next id, every document of a key changed), so the file written is the same.
    # The index belongs to one table object of the cache: when the cache is replaced (a
    # failed write or a rolled-back batch reloads it from disk) it is rebuilt.

    def _tables(self):
        tables = self._storage.read()
        if tables is None:
            tables = {}
            self._storage._cache = tables
        return tables

    def _ids(self, tables, table):
        """(the table's documents {doc id: doc}, index {key: [doc ids]}); the table may be
        absent (then an empty dict not yet in `tables`)."""
        raw = tables.get(table)
        if raw is None:
            return {}, {}
        entry = self._index.get(table)
        if entry is not None and entry[0] is raw:
            return raw, entry[1]
        index = {}
        for doc_id, doc in raw.items():
            try:
                index.setdefault(doc["_key"], []).append(doc_id)
            except (KeyError, TypeError):
                pass                # no key, or one no get could ask for (a list)
        self._index[table] = (raw, index)
        return raw, index

    def get(self, table, key, default=None):
        with self._lock:
            raw, index = self._ids(self._tables(), table)
            ids = index.get(key)
            if not ids:
                return default
            doc = dict(raw[ids[0]])
            doc.pop("_key", None)
            return doc

    def put(self, table, key, doc):
        with self._lock:
            tables = self._tables()
            raw, index = self._ids(tables, table)
            fields = dict(doc, _key=key)
            ids = index.get(key)
            if ids:
                for doc_id in ids:
                    raw[doc_id].update(fields)
            else:
                doc_id = str(self._db.table(table)._get_next_id())
                if table not in tables:
                    tables[table] = raw
                    self._index[table] = (raw, index)
                raw[doc_id] = fields
                index[key] = [doc_id]
            self._write(tables)

    def delete(self, table, key):
        with self._lock:
            tables = self._tables()
            raw, index = self._ids(tables, table)
            ids = index.pop(key, None)
            if table not in tables:
                # TinyDB writes the empty table of a remove that finds nothing
                tables[table] = raw
                self._index[table] = (raw, index)
            for doc_id in ids or ():
                del raw[doc_id]
            self._write(tables)

    def drop(self, table):
        """Forget a whole table (written only if it was there)."""
        with self._lock:
            tables = self._tables()
            if table not in tables:
                return
            del tables[table]
            self._index.pop(table, None)
            self._db._tables.pop(table, None)
            self._write(tables)

    def _write(self, tables):
        try:
            self._storage.write(tables)
        except StateError:
            self._clear_caches()
            raise

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
                        try:
                            self._storage.flush()
                        except StateError:
                            self._clear_caches()    # the cache was reloaded from disk
                            raise
                    else:
                        self._storage._dirty = False
                        self._storage._cache = read_state_file(self.path)
                        self._clear_caches()

    def _clear_caches(self):
        self._index.clear()
        for table in self._db._tables.values():
            table.clear_cache()
