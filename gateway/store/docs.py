"""The account store's documents in SQLite (`<data_dir>/accounts.db`): accounts, the txn
ledger, head-end overrides, cost control's flags and guarantees.

They lived in the state file, which TinyDB rewrites whole on every write: with 1,000
accounts and a ledger that grows with every payment that was 1 MB or more rewritten for each
top-up and billing cycle (bench/recovery.py: 130 rewrites and 4.8 s of a simulated day, and
about 140 MB of flash written a day). Here a change writes only the documents it changed, in
one SQLite transaction (WAL, synchronous=FULL: a commit that returned is on disk through a
kill or a power cut, and a kill mid-commit leaves the previous state).

DocStore has StateStore's interface (get, put, delete, all, batch), so AccountStore stays the
one writer and does not know which store it has. Documents of the tables in CACHED are kept
in memory (the store is their only writer); the ledger (`txns`, one row per payment for
years) is read by key.

A file that is not this store's (not SQLite, another program's database, a newer format) or
that fails `PRAGMA quick_check` is refused in one line and left where it is: the money in it
is never replaced by an empty store. Nor is a missing one: the state file keeps this store's
id (`docs/marks`), and a start that finds the store gone, or another store in its place,
stops and says so.
"""

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import shutil
import sqlite3
import stat
import threading

from gateway.store.state import StateDiskFull, StateError, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TABLES = ("accounts", "txns", "account_overrides", "flags", "guarantee")
CACHED = frozenset(("accounts", "account_overrides", "flags", "guarantee"))
MARKS_TABLE, MARKS_KEY = "docs", "marks"
BACKUP_SUFFIX = ".bak"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (tbl TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL,
                                 PRIMARY KEY (tbl, key));
"""
# A rowid table updated in place: documents of about 1 kB are too large for WITHOUT ROWID
# (SQLite advises rows under 1/20 of a page there); a billing cycle's 1,000 accounts commit
# in half the time (11 ms against 24 ms on this machine).
_UPSERT = ("INSERT INTO docs VALUES (?, ?, ?) "
           "ON CONFLICT (tbl, key) DO UPDATE SET body = excluded.body")


# no circular check: documents are trees built from JSON (a third faster on 1 kB accounts)
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                          check_circular=False).encode


class DocStore:
    """The one owner of accounts.db. Documents are keyed by a string per table."""

    def __init__(self, path, reserve=None):
        """reserve: a paths.DiskReserve released once when a write finds the disk full."""
        self.path = path
        self.reserve = reserve
        self._lock = threading.RLock()
        self._cache = {}            # table -> {key: doc} (tables in CACHED, once loaded)
        self._pending = None        # {(table, key): doc or None} while a batch is open
        self._depth = 0
        self.recovered = None       # open_docs: {reason, backup, backup_time, aside}
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise StateError("%s: cannot open (%s)" % (path, exc.strerror)) from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise StateError("%s: not a regular file (a link, folder or FIFO is never "
                             "opened as the account store)" % path)
        if st is None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=10)
        except sqlite3.Error as exc:
            raise StateError("%s: cannot open (%s)" % (path, exc)) from None
        try:
            self._open()
            for table in CACHED:
                self._table(table)      # read now: a document that is no JSON stops the start
        except sqlite3.Error as exc:
            self._db.close()
            raise StateError("%s: not the gateway's account store (%s); it is left as it is"
                             % (path, exc)) from None
        except StateError:
            self._db.close()
            raise

    def _open(self):
        db = self._db
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if names and not {"meta", "docs"} <= names:
            raise StateError("%s: an SQLite database of something else (tables %s); it is "
                             "left as it is" % (self.path, ", ".join(sorted(names))[:80]))
        problem = db.execute("PRAGMA quick_check").fetchone()[0]
        if problem != "ok":
            raise StateError("%s: damaged (quick_check: %s); it is left as it is"
                             % (self.path, str(problem)[:120]))
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")      # a commit that returned survives a power cut
        db.execute("PRAGMA cache_size=-512")      # 2 MB cost 1.5 MB resident, no speed
        # a billing cycle writes every account (about 1 MB for 1,000): checkpoint after
        # about two of them and cut the WAL back, so the file does not sit at its peak
        db.execute("PRAGMA wal_autocheckpoint=512")
        db.execute("PRAGMA journal_size_limit=%d" % (4 * 1024 * 1024))
        db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (secrets.token_hex(8),))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if not str(meta.get("format", "")).isdigit() or int(meta["format"]) > FORMAT_VERSION:
            raise StateError("%s: format %r is newer than this gateway understands (%d)"
                             % (self.path, meta.get("format"), FORMAT_VERSION))
        self.id = meta["id"]
        self.meta = meta

    def close(self):
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    # ---------------------------------------------------------------- reads

    def _table(self, table):
        docs = self._cache.get(table)
        if docs is None:
            rows = self._db.execute("SELECT key, body FROM docs WHERE tbl=?",
                                    (table,)).fetchall()
            # one parse for the whole table: the decoder then shares each key's string
            # among all the documents (1,000 accounts: 4.9 MB instead of 7.4)
            try:
                bodies = json.loads("[%s]" % ",".join(body for _, body in rows))
            except (ValueError, RecursionError):
                raise StateError("%s: a document of table %s is not JSON (written by "
                                 "something else); it is left as it is"
                                 % (self.path, table)) from None
            docs = {key: body for (key, _), body in zip(rows, bodies)}
            self._cache[table] = docs
        return docs

    def get(self, table, key, default=None):
        with self._lock:
            if self._pending is not None and (table, key) in self._pending:
                doc = self._pending[(table, key)]
                return default if doc is None else dict(doc)
            if table in CACHED:
                doc = self._table(table).get(key)
                return default if doc is None else dict(doc)
            row = self._db.execute("SELECT body FROM docs WHERE tbl=? AND key=?",
                                   (table, key)).fetchone()
            if row is None:
                return default
            try:
                return json.loads(row[0])
            except (ValueError, RecursionError):
                raise StateError("%s: %s %s is not JSON (written by something else)"
                                 % (self.path, table, str(key)[:40])) from None

    def all(self, table):
        with self._lock:
            if table in CACHED:
                out = {k: dict(v) for k, v in self._table(table).items()}
            else:
                out = {key: json.loads(body) for key, body in self._db.execute(
                    "SELECT key, body FROM docs WHERE tbl=?", (table,))}
            for (t, key), doc in (self._pending or {}).items():
                if t == table:
                    if doc is None:
                        out.pop(key, None)
                    else:
                        out[key] = dict(doc)
            return out

    def field(self, table, name):
        """{key: doc[name]} of a cached table as written, without copying documents (read
        every second for the retained meters list)."""
        with self._lock:
            return {k: d.get(name) for k, d in self._table(table).items()}

    def prune(self, table, field, before):
        """Delete the documents of `table` whose `field` (a number) is below `before`, in
        one transaction; the count."""
        with self._lock:
            if self._depth:
                raise RuntimeError("prune inside a batch")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    n = self._db.execute(
                        "DELETE FROM docs WHERE tbl=? AND json_extract(body, ?) < ?",
                        (table, "$." + field, before)).rowcount
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._cache.clear()
                raise StateError("%s: cannot write (%s)" % (self.path, exc)) from None
            self._cache.pop(table, None)
            return n

    def backup(self, path=None):
        """A consistent copy of the store at `path` (default `<store>.bak`), written to a
        temporary file, fsynced and renamed: the copy a damaged store is recovered from.
        Returns the copy's path; StateError (one line) if it cannot be written."""
        path = path or self.path + BACKUP_SUFFIX
        tmp = path + ".tmp"
        with self._lock:
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                dest = sqlite3.connect(tmp)
                try:
                    self._db.backup(dest)
                    dest.execute("PRAGMA journal_mode=DELETE")     # one self-contained file
                finally:
                    dest.close()
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
                fsync_dir(path)
            except (OSError, sqlite3.Error) as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise StateError("%s: cannot write the backup %s (%s)"
                                 % (self.path, path, getattr(exc, "strerror", None) or exc)) \
                    from None
        return path

    # ---------------------------------------------------------------- writes

    def put(self, table, key, doc):
        with self.batch():
            self._pending[(table, key)] = dict(doc)

    def delete(self, table, key):
        with self.batch():
            self._pending[(table, key)] = None

    def put_meta(self, key, value):
        """A meta value, written at once (outside any batch)."""
        with self._lock:
            self._commit({}, {key: str(value)})
            self.meta[key] = str(value)

    @contextlib.contextmanager
    def batch(self):
        """Several changes, one transaction at the end (nothing written if it raises)."""
        with self._lock:
            if self._depth == 0:
                self._pending = {}
            self._depth += 1
            ok = False
            try:
                yield self
                ok = True
            finally:
                self._depth -= 1
                if self._depth == 0:
                    pending, self._pending = self._pending, None
                    if ok and pending:
                        self._commit(pending)
                    elif not ok:
                        # the caller may have changed cached documents in place
                        self._cache.clear()

    def _commit(self, pending, meta=None):
        try:
            try:
                self._write(pending, meta)
            except sqlite3.OperationalError as exc:
                if not (_disk_full(exc) and self.reserve is not None
                        and self.reserve.release()):
                    raise
                log.warning("%s: disk full; released the reserve %s to write", self.path,
                            self.reserve.path)
                self._write(pending, meta)
        except sqlite3.Error as exc:
            self._cache.clear()             # memory never runs ahead of the file
            if _disk_full(exc):
                raise StateDiskFull("%s: cannot write (disk full)" % self.path) from None
            raise StateError("%s: cannot write (%s)" % (self.path, exc)) from None
        for (table, key), doc in pending.items():
            docs = self._cache.get(table)
            if docs is not None:
                if doc is None:
                    docs.pop(key, None)
                else:
                    docs[key] = doc

    def _write(self, pending, meta):
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            puts = [(t, k, _dumps(d)) for (t, k), d in pending.items() if d is not None]
            dels = [(t, k) for (t, k), d in pending.items() if d is None]
            if puts:
                db.executemany(_UPSERT, puts)
            if dels:
                db.executemany("DELETE FROM docs WHERE tbl=? AND key=?", dels)
            for key, value in (meta or {}).items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise


def _disk_full(exc):
    code = getattr(exc, "sqlite_errorcode", None)
    return code == 13 or "disk is full" in str(exc)      # SQLITE_FULL


def open_docs(path, state, reserve=None, recover=False):
    """The account store at `path`, checked against the mark the state file keeps, with the
    documents an older gateway kept in the state file moved in (once, and then removed from
    the state file). A store that is missing, damaged or another box's is refused in one
    line naming the backup (`<path>.bak`, written daily) if there is a good one; with
    `recover` that backup takes its place (the damaged file moved aside) and `recovered`
    says so on the store."""
    marks = state.get(MARKS_TABLE, MARKS_KEY) or {}
    try:
        docs = _open_marked(path, marks, reserve)
    except StateError as exc:
        backup = path + BACKUP_SUFFIX
        taken = _backup_time(backup, marks.get("id"))
        if taken is None:
            raise
        if not recover:
            raise StateError("%s (a backup of %s exists: %s; start with [storage] "
                             "recover_state = true to use it)" % (exc, taken, backup)) \
                from None
        aside = _move_aside(path)
        _copy_file(backup, path)
        log.warning("%s; %srecovered the backup of %s (%s): balances as they were then, the "
                    "next reading bills the energy since; payments since then must be sent "
                    "again (their txn ids apply each once)", exc,
                    "kept aside as %s; " % aside if aside else "", taken, backup)
        docs = _open_marked(path, marks, reserve)
        docs.recovered = {"reason": str(exc), "backup": backup, "backup_time": taken,
                          "aside": aside}
    if docs.meta.get("migrated") is None:
        moved = {t: state.all(t) for t in TABLES}
        with docs.batch():
            for table, items in moved.items():
                for key, doc in items.items():
                    docs.put(table, key, doc)
        docs.put_meta("migrated", sum(len(v) for v in moved.values()))
        if any(moved.values()):
            log.info("%s: moved %d accounts and %d ledger entries in from the state file",
                     path, len(moved["accounts"]), len(moved["txns"]))
    with state.batch():
        # the copies are in the store (migrated is set): the state file forgets them
        for table in TABLES:
            state.drop(table)
        if marks.get("id") != docs.id:
            state.put(MARKS_TABLE, MARKS_KEY, {"id": docs.id})
    return docs


def _open_marked(path, marks, reserve):
    if marks.get("id") and not os.path.lexists(path):
        raise StateError("%s: missing although the state file says it existed (id %s); "
                         "the balances are in it: put it back (the gateway does not start "
                         "with empty accounts)" % (path, marks["id"]))
    docs = DocStore(path, reserve=reserve)
    if marks.get("id") and marks["id"] != docs.id:
        docs.close()
        raise StateError("%s: another account store (id %s) than the one this gateway wrote "
                         "(id %s); it is left as it is" % (path, docs.id, marks["id"]))
    return docs


def _backup_time(path, want_id):
    """When the backup at `path` was taken (RFC 3339), if it is a good copy of this
    gateway's store (its id, quick_check ok); else None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
        try:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                return None
            meta = dict(db.execute("SELECT key, value FROM meta"))
            json.loads("[%s]" % ",".join(b for (b,) in db.execute("SELECT body FROM docs")))
        finally:
            db.close()
    except (OSError, sqlite3.Error, ValueError):
        return None
    if want_id and meta.get("id") != want_id:
        return None
    return _dt.datetime.fromtimestamp(st.st_mtime).astimezone().isoformat(timespec="seconds")


def _move_aside(path):
    """paths.move_aside, its failure one StateError line."""
    from gateway.store.paths import move_aside
    try:
        return move_aside(path)
    except OSError as exc:
        raise StateError("%s: cannot move it aside (%s)" % (path, exc.strerror)) from None


def _copy_file(src, dst):
    """src copied to dst through a temporary file, fsynced, renamed."""
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)
    fsync_dir(dst)


def read_tables(path):
    """{table: {key: doc}} of a store no gateway holds (a stopped one's, for tools and
    checks), opened read-only; {} if there is none."""
    if not os.path.lexists(path):
        return {}
    try:
        db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
        try:
            rows = db.execute("SELECT tbl, key, body FROM docs").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StateError("%s: cannot read (%s)" % (path, exc)) from None
    out = {}
    for table, key, body in rows:
        try:
            out.setdefault(table, {})[key] = json.loads(body)
        except (ValueError, RecursionError):
            raise StateError("%s: %s %s is not JSON (written by something else)"
                             % (path, table, str(key)[:40])) from None
    return out
