"""The journal: readings, events, command results and daily statements, append-only, until
every consumer has them.

SQLite (standard library) in WAL mode with synchronous=FULL: an append that returned is on
disk, through a kill or a power cut. Each stream (readings, events, results, statements) has
its own gap-free sequence that continues across restarts (kept in the `streams` table in the
same transaction as the rows, never derived from what is left); a statement is appended at
most once per account and day (statement_keys). Consumers (the uplink, cost
control) each have a durable cursor per stream; rows every consumer is past are deleted.

Billing reads the `energy` table, not the readings: one row per energy reading (one meter at
one time: its total and T1..T4 register texts), keyed by the seq of the reading's last row,
written by the transaction that appends the readings (so exactly as durable), while some
consumer of it is registered. It is no stream of its own (nothing is published from it):
its consumers' cursors count readings seqs, and acknowledged rows are deleted.

A disk quota bounds the file: past it the oldest rows go first, counted, and reported as a
`journal.dropped` event, so the head-end sees both the count and the gap in `seq`. A full
disk is handled the same way; a disk that fails (read-only, I/O error) raises JournalError
with one line, and the caller keeps collecting into its bounded queue and retries.
"""

import contextlib
import itertools
import json
import logging
import operator
import os
import secrets
import sqlite3
import stat
import threading
import time
from decimal import Decimal
from typing import Any, NamedTuple, Optional

from gateway import logs
from gateway.model import GatewayError

log = logging.getLogger(__name__)

STREAMS = ("readings", "events", "results", "statements")

# Reading quality flags (journal column `quality`)
GOOD = "good"
BACKFILLED = "backfilled"
ESTIMATED = "estimated"
CLOCK_UNTRUSTED = "clock_untrusted"
QUALITIES = (GOOD, BACKFILLED, ESTIMATED, CLOCK_UNTRUSTED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS streams (name TEXT PRIMARY KEY, next_seq INTEGER NOT NULL,
                                    dropped INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS cursors (consumer TEXT NOT NULL, stream TEXT NOT NULL,
                                    acked INTEGER NOT NULL, PRIMARY KEY (consumer, stream));
CREATE TABLE IF NOT EXISTS readings (seq INTEGER PRIMARY KEY, meter TEXT NOT NULL,
                                     q TEXT NOT NULL, value TEXT NOT NULL, unit TEXT,
                                     ts INTEGER NOT NULL, gw_ts INTEGER NOT NULL,
                                     quality TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL,
                                   body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL,
                                    body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS statements (seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL,
                                       body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS statement_keys (meter TEXT NOT NULL, day TEXT NOT NULL,
                                           seq INTEGER NOT NULL, PRIMARY KEY (meter, day));
CREATE TABLE IF NOT EXISTS freezes (meter TEXT NOT NULL, ts INTEGER NOT NULL, total TEXT,
                                    t1 TEXT, t2 TEXT, t3 TEXT, t4 TEXT,
                                    PRIMARY KEY (meter, ts));
CREATE TABLE IF NOT EXISTS energy (seq INTEGER PRIMARY KEY, meter TEXT NOT NULL,
                                   ts INTEGER NOT NULL, total TEXT, t1 TEXT, t2 TEXT,
                                   t3 TEXT, t4 TEXT);
"""
# statements (a stream: cost control's daily statements), statement_keys (which account's
# day is journalled: a statement is appended once, whatever restarts) and freezes (the
# meters' daily-freeze registers the statements are checked against) are additive too.
# the energy table is additive: a journal from before it gains it when opened (billing's
# cursor on the readings moves to it when billing registers, see register), and a gateway
# from before it opens a journal that has it (and bills from the readings again)
SCHEMA_VERSION = "1"

# billing's table: one row per energy reading, these quantities in its columns
ENERGY = "energy"
ENERGY_COLUMNS = ("energy.import.total", "energy.import.t1", "energy.import.t2",
                  "energy.import.t3", "energy.import.t4")
_ENERGY_INDEX = {q: k for k, q in enumerate(ENERGY_COLUMNS)}
_FILL_ROWS = 20000     # readings per window when the energy table is filled from them
                       # (the window billing read before the table existed)


class JournalError(GatewayError):
    """The journal cannot take or give records; one line naming the file and the cause.

    `damaged`: the file is not a sound SQLite database (as opposed to a disk or permission
    problem around it)."""

    def __init__(self, message, damaged=False):
        super().__init__(message)
        self.damaged = damaged


def new_jid():
    """A journal's id: short, random, never reused by a replacement journal."""
    return secrets.token_hex(6)


class Reading(NamedTuple):
    meter: str
    quantity: str
    value: Any                 # Decimal, int, str or bool; kept exact as JSON text
    unit: Optional[str]
    ts: int                    # the meter's timestamp, Unix milliseconds
    gw_ts: int                 # when the gateway took it, Unix milliseconds
    quality: str = GOOD


class StoredReading(NamedTuple):
    seq: int
    meter: str
    quantity: str
    value_json: str            # JSON text of the value: spliced into payloads as is
    unit: Optional[str]
    ts: int
    gw_ts: int
    quality: str

    @property
    def value(self):
        return json.loads(self.value_json, parse_float=Decimal)


class StoredRecord(NamedTuple):
    seq: int
    ts: int
    body: dict


def value_json(value):
    """Exact JSON text of a reading's value (Decimal keeps the meter's precision)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("not a finite number: %s" % value)
        text = str(value)
        if "E" in text or "e" in text:
            text = format(value, "f")
        return text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise TypeError("readings are exact: pass Decimal, not float (%r)" % value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _disk_full(exc):
    """SQLite said the disk is full (by its result code; Python < 3.11 has only the text)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF == getattr(sqlite3, "SQLITE_FULL", 13)
    return "full" in str(exc)


def now_ms():
    return int(time.time() * 1000)


class Journal:
    """One owner per file; every method is thread-safe (one connection, one lock)."""

    def __init__(self, path, quota_bytes=256 * 1024 * 1024, consumers=None,
                 on_drop=None, reserve_bytes=8 * 1024 * 1024, wal_pages=256,
                 seq_floor=None, first_event=None):
        """seq_floor: {stream: n}, no stream numbers below n (a journal that replaces a lost
        one continues its numbering). first_event: (type, fields) appended in the same
        transaction that creates the journal (ignored when the journal exists)."""
        self.path = path
        self.created = False        # True when this open created the journal's tables
        self.quota_bytes = int(quota_bytes)
        # free space the journal leaves on the file system for everything else (and for
        # its own WAL): below it, the journal stops growing and drops oldest-first instead
        self.reserve_bytes = int(reserve_bytes)
        self._lock = threading.Lock()
        self._on_drop = on_drop
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")   # durable commits (power cuts)
            self._db.execute("PRAGMA foreign_keys=OFF")
            # appends and reads near the tail: a small page cache is enough (the default
            # 2 MB is a lot on a 256 MB box)
            self._db.execute("PRAGMA cache_size=-256")
            # a short WAL: checkpoints often, and the file is cut back after each one
            self._db.execute("PRAGMA wal_autocheckpoint=%d" % int(wal_pages))
            self._db.execute("PRAGMA journal_size_limit=%d" % (int(wal_pages) * 4096))
            self._db.executescript(_SCHEMA)
            floor = {s: max(1, int((seq_floor or {}).get(s) or 1)) for s in STREAMS}
            with self._tx():
                self.created = self._db.execute(
                    "SELECT COUNT(*) FROM streams").fetchone()[0] == 0
                for s in STREAMS:
                    self._db.execute("INSERT OR IGNORE INTO streams (name, next_seq) "
                                     "VALUES (?, ?)", (s, floor[s]))
                    # an existing journal behind its mark (an old copy put back): new rows
                    # must not reuse numbers the head-end has already seen
                    raised = self._db.execute(
                        "UPDATE streams SET next_seq=? WHERE name=? AND next_seq<?",
                        (floor[s], s, floor[s])).rowcount
                    if raised:
                        log.warning("journal %s: %s continue at seq %d (the mark kept in "
                                    "the state file)", path, s, floor[s])
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                                 (SCHEMA_VERSION,))
                # journals from before jids get one on their first open
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('jid', ?)",
                                 (new_jid(),))
                if self.created and first_event:
                    event_type, fields = first_event
                    body = json.dumps(dict(fields, type=event_type), ensure_ascii=False,
                                      separators=(",", ":"), default=str)
                    seq = self._next_seqs("events", 1)
                    self._db.execute("INSERT INTO events VALUES (?, ?, ?)",
                                     (seq, now_ms(), body))
            (schema,) = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if schema != SCHEMA_VERSION:
                raise JournalError("%s: journal schema %s, this gateway knows %s"
                                   % (path, schema, SCHEMA_VERSION))
            (self.jid,) = self._db.execute("SELECT value FROM meta WHERE key='jid'").fetchone()
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            raise JournalError("%s: cannot open the journal (%s)" % (path, exc),
                               damaged=not isinstance(exc, sqlite3.OperationalError)) from None
        self._page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        self._energy_on = self._db.execute(
            "SELECT 1 FROM cursors WHERE stream=? LIMIT 1", (ENERGY,)).fetchone() is not None
        for consumer, streams in (consumers or {}).items():
            for stream in streams:
                self.register(consumer, stream)

    # ------------------------------------------------------------ plumbing

    def _tx(self):
        return _Transaction(self._db)

    def close(self):
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError:
                pass
            self._db.close()

    def next_seqs(self):
        """{stream: the seq its next row will get}."""
        with self._lock:
            try:
                return dict(self._db.execute("SELECT name, next_seq FROM streams").fetchall())
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "read") from None

    def quick_check(self):
        """None if SQLite finds the file sound, else the first problem it reports."""
        with self._lock:
            try:
                rows = self._db.execute("PRAGMA quick_check(1)").fetchall()
            except sqlite3.DatabaseError as exc:
                return str(exc)
        problem = rows[0][0] if rows else "no answer"
        return None if problem == "ok" else " ".join(problem.split())   # one line

    def _fail(self, exc, what):
        return JournalError("%s: cannot %s (%s)" % (self.path, what, exc))

    def register(self, consumer, stream):
        """A consumer starts at the oldest row still kept (or where it left off).

        stream "energy" (billing): the first consumer of the energy table fills it from the
        readings still kept after where it starts, grouped as billing grouped them before
        the table existed; a consumer that had a cursor on the readings (a journal from
        before the table) starts there and gives that cursor up, in the same transaction,
        so readings not yet billed are billed once, from the table."""
        if stream == ENERGY:
            with self._lock:
                try:
                    with self._tx():
                        self._register_energy(consumer)
                except sqlite3.DatabaseError as exc:
                    raise self._fail(exc, "register %s" % consumer) from None
            return
        if stream not in STREAMS:
            raise ValueError("unknown stream %r" % stream)
        with self._lock, self._tx():
            (nxt,) = self._db.execute("SELECT next_seq FROM streams WHERE name=?",
                                      (stream,)).fetchone()
            first = self._db.execute("SELECT MIN(seq) FROM %s" % stream).fetchone()[0]
            start = (first - 1) if first is not None else nxt - 1
            self._db.execute("INSERT OR IGNORE INTO cursors VALUES (?, ?, ?)",
                             (consumer, stream, start))

    def _register_energy(self, consumer):
        db = self._db
        row = db.execute("SELECT acked FROM cursors WHERE consumer=? AND stream='readings'",
                         (consumer,)).fetchone()
        moved = row[0] if row is not None else None
        if moved is not None:
            # the consumer read the readings until now (a journal from before the table,
            # or one a gateway from before it has used since): that cursor is the truth
            db.execute("DELETE FROM cursors WHERE consumer=? AND stream=?",
                       (consumer, ENERGY))
        if db.execute("SELECT 1 FROM cursors WHERE consumer=? AND stream=?",
                      (consumer, ENERGY)).fetchone() is None:
            (nxt,) = db.execute("SELECT next_seq FROM streams WHERE name='readings'"
                                ).fetchone()
            if db.execute("SELECT 1 FROM cursors WHERE stream=? LIMIT 1",
                          (ENERGY,)).fetchone() is None:
                # the first consumer: the table holds nothing yet (rows left by a consumer
                # that went are gone with it); fill it from the readings kept
                db.execute("DELETE FROM energy")
                if moved is not None:
                    start = moved
                else:
                    first = db.execute("SELECT MIN(seq) FROM readings").fetchone()[0]
                    start = first - 1 if first is not None else nxt - 1
                self._fill_energy(start)
            else:
                first = db.execute("SELECT MIN(seq) FROM energy").fetchone()[0]
                start = first - 1 if first is not None else nxt - 1
            db.execute("INSERT INTO cursors VALUES (?, ?, ?)", (consumer, ENERGY, start))
        # the consumer reads the energy table now, not the readings
        if db.execute("DELETE FROM cursors WHERE consumer=? AND stream='readings'",
                      (consumer,)).rowcount:
            self._delete_acked("readings")
        self._energy_on = True

    def _fill_energy(self, start):
        """Energy rows for the readings after seq `start`: windows of _FILL_ROWS readings
        from there, grouped as billing's read grouped them (so a reading's row has the seq
        it was billed under before, and charged_to_seq keeps its meaning)."""
        (nxt,) = self._db.execute("SELECT next_seq FROM streams WHERE name='readings'"
                                  ).fetchone()
        while start < nxt - 1:
            rows, last, groups = self._grouped_window(start, _FILL_ROWS, "energy.import.")
            if last is None:
                break
            out = []
            for meter, ts, _, seq, values in groups:
                cols = [None] * 5
                for q, v in values.items():
                    k = _ENERGY_INDEX.get(q)
                    if k is not None:
                        cols[k] = v
                if cols != [None] * 5:
                    out.append((seq, meter, ts, *cols))
            self._db.executemany("INSERT INTO energy VALUES (?, ?, ?, ?, ?, ?, ?, ?)", out)
            start = last

    def _delete_acked(self, stream):
        """Delete the rows of `stream` (or the energy table) every consumer is past; with no
        consumer left, the energy table is emptied (a stream keeps its rows)."""
        (low,) = self._db.execute("SELECT MIN(acked) FROM cursors WHERE stream=?",
                                  (stream,)).fetchone()
        if low is not None:
            self._db.execute("DELETE FROM %s WHERE seq <= ?" % stream, (low,))
        elif stream == ENERGY:
            self._db.execute("DELETE FROM energy")

    def unregister(self, consumer, stream):
        """A consumer that is gone (e.g. cost control with no accounts left) must not hold
        rows back for ever: its cursor goes, and rows the others are past are deleted."""
        with self._lock, self._tx():
            self._db.execute("DELETE FROM cursors WHERE consumer=? AND stream=?",
                             (consumer, stream))
            self._delete_acked(stream)
            if stream == ENERGY:
                self._energy_on = self._db.execute(
                    "SELECT 1 FROM cursors WHERE stream=? LIMIT 1",
                    (ENERGY,)).fetchone() is not None

    # ------------------------------------------------------------ appends

    def _next_seqs(self, stream, n):
        (nxt,) = self._db.execute("SELECT next_seq FROM streams WHERE name=?",
                                  (stream,)).fetchone()
        self._db.execute("UPDATE streams SET next_seq=? WHERE name=?", (nxt + n, stream))
        return nxt

    def append_readings(self, readings):
        """Append a batch in one transaction; returns (first_seq, last_seq)."""
        rows = []
        for r in readings:
            if r.quality not in QUALITIES:
                raise ValueError("unknown quality %r" % (r.quality,))
            rows.append((r.meter, r.quantity, value_json(r.value), r.unit, int(r.ts),
                         int(r.gw_ts), r.quality))
        if not rows:
            return None

        def write():
            first = self._next_seqs("readings", len(rows))
            self._db.executemany(
                "INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(first + i,) + row for i, row in enumerate(rows)])
            if self._energy_on:
                energy = _energy_rows(first, rows)
                if energy:
                    self._db.executemany(
                        "INSERT INTO energy VALUES (?, ?, ?, ?, ?, ?, ?, ?)", energy)
                freezes = _freeze_rows(rows)
                if freezes:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO freezes VALUES (?, ?, ?, ?, ?, ?, ?)", freezes)
            return first, first + len(rows) - 1
        return self._append(write)

    def append_event(self, event_type, ts=None, **fields):
        """An event ({type, meter, ...}); returns its seq."""
        body = dict(fields, type=event_type)
        return self._append_record("events", body, ts)

    def append_result(self, body, ts=None):
        return self._append_record("results", body, ts)

    def append_statements(self, statements, ts=None):
        """Daily statements [(meter, day, body)] in one transaction, each at most once: a
        (meter, day) already journalled is skipped (a restart between this and the account
        store's write makes the same statement again). Returns the seqs (None: skipped)."""
        ts = now_ms() if ts is None else int(ts)
        texts = [(meter, day, json.dumps(dict(body, type="statement"), ensure_ascii=False,
                                         separators=(",", ":"), default=str))
                 for meter, day, body in statements]

        def write():
            out = []
            for meter, day, text in texts:
                if self._db.execute("SELECT 1 FROM statement_keys WHERE meter=? AND day=?",
                                    (meter, day)).fetchone():
                    out.append(None)
                    continue
                seq = self._next_seqs("statements", 1)
                self._db.execute("INSERT INTO statements VALUES (?, ?, ?)", (seq, ts, text))
                self._db.execute("INSERT INTO statement_keys VALUES (?, ?, ?)",
                                 (meter, day, seq))
                out.append(seq)
            return out
        if not texts:
            return []
        return self._append(write)

    def forget_statements(self, before_day):
        """Drop the keys of statements of days before `before_day` (ISO) and freezes older
        than it: no account goes back that far."""
        with self._lock:
            try:
                with self._tx():
                    self._db.execute("DELETE FROM statement_keys WHERE day < ?", (before_day,))
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "prune statement keys") from None

    def freeze(self, meter, ts):
        """The meter's daily freeze stamped at ts (Unix ms): {"total": text, "t1"..}, or None."""
        with self._lock:
            try:
                row = self._db.execute("SELECT total, t1, t2, t3, t4 FROM freezes WHERE "
                                       "meter=? AND ts=?", (meter, int(ts))).fetchone()
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "read freezes") from None
        if row is None or row[0] is None:
            return None
        return {k: v for k, v in zip(("total", "t1", "t2", "t3", "t4"), row) if v is not None}

    def forget_freezes(self, before_ts):
        with self._lock:
            try:
                with self._tx():
                    self._db.execute("DELETE FROM freezes WHERE ts < ?", (int(before_ts),))
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "prune freezes") from None

    def _append_record(self, stream, body, ts):
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str)
        ts = now_ms() if ts is None else int(ts)

        def write():
            seq = self._next_seqs(stream, 1)
            self._db.execute("INSERT INTO %s VALUES (?, ?, ?)" % stream, (seq, ts, text))
            return seq
        return self._append(write)

    def _append(self, write):
        with self._lock:
            for attempt in (0, 1):
                try:
                    with self._tx():
                        result = write()
                    break
                except sqlite3.OperationalError as exc:
                    if _disk_full(exc) and attempt == 0:
                        # the disk is full: make room from the oldest rows, then retry once
                        try:
                            dropped = self._drop_oldest(max_rows=10000, reason="disk_full")
                        except sqlite3.DatabaseError:
                            dropped = 0
                        if not dropped:
                            raise self._fail(exc, "append") from None
                        continue
                    raise self._fail(exc, "append") from None
                except sqlite3.DatabaseError as exc:
                    raise self._fail(exc, "append") from None
            self._enforce_quota()
            return result

    # ------------------------------------------------------------ quota

    def used_bytes(self):
        pages, free = (self._db.execute("PRAGMA page_count").fetchone()[0],
                       self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self._page_size

    def _limit(self):
        """Bytes of pages the journal may use now: the quota, or less when the file
        system is running out (the file may only grow into free space above the reserve)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            free = st.f_bavail * st.f_frsize
        except OSError:
            return self.quota_bytes, "quota"
        room = pages * self._page_size + free - self.reserve_bytes
        if room < self.quota_bytes:
            return room, "disk_full"
        return self.quota_bytes, "quota"

    def _enforce_quota(self):
        limit, reason = self._limit()
        if self.used_bytes() <= limit:
            return
        try:
            while self.used_bytes() > limit * 0.95:
                if not self._drop_oldest(max_rows=2000, reason=reason):
                    break
        except sqlite3.DatabaseError as exc:
            raise self._fail(exc, "make room") from None

    def _drop_oldest(self, max_rows, reason):
        """Delete the oldest rows (readings first: they are the bulk), count them per
        stream and append a journal.dropped event. Returns the rows dropped.

        The energy table goes after the readings and before the events: its rows are
        billing's, and only pile up while billing stalls. Dropping them loses no money
        (the registers count on: the next reading billed charges the energy between), only
        the time it was used in; they are counted (meta `energy_dropped`, stats) and
        logged, not reported as journal.dropped (no published stream lost a seq)."""
        for stream in ("readings", ENERGY, "events", "statements", "results"):
            lo = self._db.execute("SELECT MIN(seq) FROM %s" % stream).fetchone()[0]
            if lo is None:
                continue
            top = self._db.execute("SELECT MAX(seq) FROM %s" % stream).fetchone()[0]
            if stream == ENERGY:
                # max_rows energy rows (their seqs are readings seqs, with gaps)
                hi = self._db.execute("SELECT MAX(seq) FROM (SELECT seq FROM energy ORDER "
                                      "BY seq LIMIT ?)", (max_rows,)).fetchone()[0]
                with self._tx():
                    n = self._db.execute("DELETE FROM energy WHERE seq <= ?", (hi,)).rowcount
                    self._db.execute(
                        "INSERT INTO meta VALUES ('energy_dropped', ?) ON CONFLICT(key) DO "
                        "UPDATE SET value = CAST(value AS INTEGER) + ?", (str(n), n))
                log.warning("journal %s: dropped %d oldest energy rows, not yet billed "
                            "(readings seq %d..%d, %s): billed at the next reading, by time",
                            self.path, n, lo, hi, reason)
                return n
            hi = min(top, lo + max_rows - 1)
            with self._tx():
                n = self._db.execute("DELETE FROM %s WHERE seq BETWEEN ? AND ?" % stream,
                                     (lo, hi)).rowcount
                self._db.execute("UPDATE streams SET dropped = dropped + ? WHERE name=?",
                                 (n, stream))
                body = {"type": "journal.dropped", "stream": stream, "count": n,
                        "first_seq": lo, "last_seq": hi, "reason": reason}
                seq = self._next_seqs("events", 1)
                self._db.execute("INSERT INTO events VALUES (?, ?, ?)",
                                 (seq, now_ms(), json.dumps(body, separators=(",", ":"))))
            log.warning("journal %s: dropped %d oldest %s (seq %d..%d, %s)",
                        self.path, n, stream, lo, hi, reason,
                        extra=logs.fields(event="journal.dropped"))
            if self._on_drop:
                self._on_drop(body)
            return n
        return 0

    # ------------------------------------------------------------ consumers

    def cursor(self, consumer, stream):
        row = self._db.execute("SELECT acked FROM cursors WHERE consumer=? AND stream=?",
                               (consumer, stream)).fetchone()
        if row is None:
            raise KeyError("consumer %r is not registered for %s" % (consumer, stream))
        return row[0]

    def read(self, consumer, stream, limit=500, after=None):
        """Rows after the consumer's cursor (or after `after`), oldest first."""
        with self._lock:
            try:
                start = self.cursor(consumer, stream) if after is None else after
                if stream == "readings":
                    rows = self._db.execute(
                        "SELECT * FROM readings WHERE seq > ? ORDER BY seq LIMIT ?",
                        (start, limit)).fetchall()
                    return [StoredReading(*r) for r in rows]
                rows = self._db.execute(
                    "SELECT seq, ts, body FROM %s WHERE seq > ? ORDER BY seq LIMIT ?" % stream,
                    (start, limit)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "read") from None
        return [StoredRecord(seq, ts, json.loads(body)) for seq, ts, body in rows]

    # the separator of billing's grouped read: JSON text never holds a raw control
    # character (value_json escapes them); a meter id or quantity that does is caught by the
    # count check and read row by row instead
    _SEP = "\x1f"

    def read_grouped(self, consumer, prefix="energy.import.", limit=10000):
        """The readings after the consumer's cursor, grouped as billing read them before the
        energy table (kept for the migration to it, see _fill_energy): the same window of
        at most `limit` rows that `read` gives, but only the rows whose quantity starts with
        `prefix` (filtered in SQL), grouped by (meter, ts).

        Returns (rows, last, groups): the number of rows in the window and the seq of its
        last row, of any quantity (0 and None if there are no rows after the cursor), and
        `groups`, a list of (meter, ts, first_seq, last_seq, {quantity: value_json}) in the
        order of each group's first row; a quantity repeated in a group keeps its last
        value."""
        with self._lock:
            try:
                return self._grouped_window(self.cursor(consumer, "readings"), limit, prefix)
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "read") from None

    def _grouped_window(self, start, limit, prefix):
        """read_grouped's answer for the window after seq `start`. Rows come back from
        SQLite as one text per column (group_concat), not as a tuple per row."""
        glob = prefix.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]") + "*"
        rows, last = self._db.execute(
            "SELECT COUNT(*), MAX(seq) FROM (SELECT seq FROM readings WHERE seq > ? "
            "ORDER BY seq LIMIT ?)", (start, limit)).fetchone()
        if last is None:
            return 0, None, []
        sep = self._SEP
        n, seqs, meters, tss, qs, vals = self._db.execute(
            "SELECT COUNT(*), group_concat(seq, ?1), group_concat(meter, ?1), "
            "group_concat(ts, ?1), group_concat(q, ?1), group_concat(value, ?1) "
            "FROM readings WHERE seq > ?2 AND seq <= ?3 AND q GLOB ?4",
            (sep, start, last, glob)).fetchone()
        if not n:
            return rows, last, []
        seqs = list(map(int, seqs.split(sep)))
        meters, tss, qs, vals = (meters.split(sep), tss.split(sep), qs.split(sep),
                                 vals.split(sep))
        if not (len(seqs) == len(meters) == len(tss) == len(qs) == len(vals) == n) \
                or not all(map(operator.lt, seqs, seqs[1:])):
            found = self._db.execute(
                "SELECT seq, meter, ts, q, value FROM readings WHERE seq > ? AND "
                "seq <= ? AND q GLOB ? ORDER BY seq", (start, last, glob)).fetchall()
            seqs, meters, tss, qs, vals = (list(c) for c in zip(*found))
        return rows, last, _group(seqs, meters, tss, qs, vals)

    def read_energy(self, consumer, limit=20000):
        """Billing's read: the energy rows after the consumer's cursor (at most `limit`),
        per meter, as texts from SQLite (group_concat: no tuple per row).

        Returns (count, last, per_meter): the number of rows and the seq of the last one
        (0 and None if there are none), and per_meter a list of
        (meter, seqs, tss, totals, t1s, t2s, t3s, t4s): lists of equal length, seqs and tss
        ints in seq order, the registers' JSON texts or None where the reading had none."""
        sep = self._SEP
        with self._lock:
            try:
                start = self.cursor(consumer, ENERGY)
                count, last = self._db.execute(
                    "SELECT COUNT(*), MAX(seq) FROM (SELECT seq FROM energy WHERE seq > ? "
                    "ORDER BY seq LIMIT ?)", (start, limit)).fetchone()
                if last is None:
                    return 0, None, []
                found = self._db.execute(
                    "SELECT meter, COUNT(*), group_concat(seq, ?1), group_concat(ts, ?1), "
                    "group_concat(ifnull(total, ''), ?1), group_concat(ifnull(t1, ''), ?1), "
                    "group_concat(ifnull(t2, ''), ?1), group_concat(ifnull(t3, ''), ?1), "
                    "group_concat(ifnull(t4, ''), ?1) FROM energy WHERE seq > ?2 AND "
                    "seq <= ?3 GROUP BY meter", (sep, start, last)).fetchall()
                out = []
                for meter, n, seqs, tss, *cols in found:
                    seqs = list(map(int, seqs.split(sep)))
                    tss = list(map(int, tss.split(sep)))
                    cols = [c.split(sep) for c in cols]
                    if len(seqs) != n or len(tss) != n or any(len(c) != n for c in cols) \
                            or not all(map(operator.lt, seqs, seqs[1:])):
                        # a text with the separator in it, or SQLite's own order: by rows
                        rows = self._db.execute(
                            "SELECT seq, ts, total, t1, t2, t3, t4 FROM energy WHERE "
                            "seq > ? AND seq <= ? AND meter=? ORDER BY seq",
                            (start, last, meter)).fetchall()
                        seqs, tss, *cols = (list(c) for c in zip(*rows))
                    else:
                        cols = [c if "" not in c else [v if v else None for v in c]
                                for c in cols]
                    out.append((meter, seqs, tss, *cols))
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "read") from None
        return count, last, out

    def ack(self, consumer, stream, upto):
        """The consumer has everything up to seq `upto`; durable when this returns. Rows
        every consumer of the stream is past are deleted in the same transaction."""
        with self._lock:
            try:
                with self._tx():
                    self._db.execute("UPDATE cursors SET acked=MAX(acked, ?) "
                                     "WHERE consumer=? AND stream=?", (upto, consumer, stream))
                    self._delete_acked(stream)
            except sqlite3.DatabaseError as exc:
                raise self._fail(exc, "acknowledge") from None

    # ------------------------------------------------------------ status

    def stats(self):
        """Pending rows per stream and consumer, oldest unsent, next seq, dropped, bytes."""
        with self._lock:
            jid = self._db.execute("SELECT value FROM meta WHERE key='jid'").fetchone()
            out = {"path": self.path, "jid": jid[0] if jid else None,
                   "used_bytes": self.used_bytes(),
                   "file_bytes": _file_bytes(self.path), "quota_bytes": self.quota_bytes,
                   "streams": {}}
            for name, nxt, dropped in self._db.execute(
                    "SELECT name, next_seq, dropped FROM streams").fetchall():
                # rows are only ever deleted from the front (acknowledged, or dropped oldest
                # first), so a stream's rows are the range MIN..MAX: two index lookups, no
                # COUNT(*) or scan (148 ms per call with a million readings buffered)
                # (separate statements: SQLite uses the index for a lone MIN or MAX only)
                lo = self._db.execute("SELECT MIN(seq) FROM %s" % name).fetchone()[0]
                hi = self._db.execute("SELECT MAX(seq) FROM %s" % name).fetchone()[0]
                count = hi - lo + 1 if hi is not None else 0
                oldest = None
                if lo is not None:
                    oldest = self._db.execute("SELECT %s FROM %s WHERE seq=?" % (
                        "gw_ts" if name == "readings" else "ts", name), (lo,)).fetchone()[0]
                consumers = {}
                for consumer, acked in self._db.execute(
                        "SELECT consumer, acked FROM cursors WHERE stream=?", (name,)):
                    pending = hi - max(acked, lo - 1) if hi is not None else 0
                    consumers[consumer] = {"acked": acked, "pending": max(0, pending)}
                out["streams"][name] = {"next_seq": nxt, "stored": count, "first_seq": lo,
                                        "last_seq": hi, "oldest_ts": oldest,
                                        "dropped": dropped, "consumers": consumers}
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                                "name=?", (ENERGY,)).fetchone():
                out[ENERGY] = self._energy_stats()
            return out

    def _energy_stats(self):
        """The energy table: its seq range, rows dropped, each consumer's cursor (no
        COUNT(*), a scan: its seqs have gaps, so the range is no count)."""
        lo = self._db.execute("SELECT MIN(seq) FROM energy").fetchone()[0]
        hi = self._db.execute("SELECT MAX(seq) FROM energy").fetchone()[0]
        dropped = self._db.execute("SELECT value FROM meta WHERE key='energy_dropped'"
                                   ).fetchone()
        consumers = {consumer: {"acked": acked} for consumer, acked in self._db.execute(
            "SELECT consumer, acked FROM cursors WHERE stream=?", (ENERGY,)).fetchall()}
        return {"first_seq": lo, "last_seq": hi,
                "dropped": int(dropped[0]) if dropped else 0, "consumers": consumers}


def _energy_rows(first, rows):
    """The energy table's rows for readings rows appended from seq `first`: one per (meter,
    ts) with any of ENERGY_COLUMNS, keyed by the seq of its last energy.import.* row, as
    billing's read grouped them before the table (a quantity repeated keeps its last
    value)."""
    groups = {}
    index = _ENERGY_INDEX
    for i, (meter, q, value, _, ts, _, _) in enumerate(rows):
        k = index.get(q)
        if k is None:
            if not q.startswith("energy.import."):
                continue
            g = groups.get((meter, ts))
            if g is not None:
                g[0] = first + i
            else:
                groups[(meter, ts)] = [first + i, meter, ts, None, None, None, None, None]
            continue
        g = groups.get((meter, ts))
        if g is None:
            g = groups[(meter, ts)] = [0, meter, ts, None, None, None, None, None]
        g[0] = first + i
        g[3 + k] = value
    return [g for g in groups.values() if g[3:] != _NO_VALUES]


_NO_VALUES = [None] * 5
_FREEZE_PREFIX = "freeze.daily.energy.import."
_FREEZE_INDEX = {"total": 2, "t1": 3, "t2": 4, "t3": 5, "t4": 6}


def _freeze_rows(rows):
    """The freezes table's rows for readings rows: one per (meter, freeze time) with the
    daily freeze's import registers (the texts, exact)."""
    out = {}
    for meter, q, value, _, ts, _, _ in rows:
        if not q.startswith(_FREEZE_PREFIX):
            continue
        k = _FREEZE_INDEX.get(q[len(_FREEZE_PREFIX):])
        if k is None:
            continue
        row = out.get((meter, ts))
        if row is None:
            row = out[(meter, ts)] = [meter, ts, None, None, None, None, None]
        row[k] = value
    return list(out.values())


def _group(seqs, meters, tss, qs, vals):
    """[(meter, ts, first_seq, last_seq, {quantity: value})] of rows in seq order, grouped by
    (meter, ts) in the order of each group's first row. The rows of one reading are
    consecutive: runs of one key are found in C, and when no key comes back in a later run
    (the usual window) the groups are built in C too, without a Python step per row."""
    keys = list(zip(meters, tss))
    n = len(keys)
    starts = [0]
    starts += itertools.compress(range(1, n), map(operator.ne, keys[1:], keys))
    if len(set(keys)) == len(starts):
        if len(starts) == n:                       # one row a group
            values = map(dict, zip(zip(qs, vals)))
            return list(zip(meters, map(int, tss), seqs, seqs, values))
        ends = starts[1:] + [n]
        spans = list(map(slice, starts, ends))
        values = map(dict, map(zip, map(qs.__getitem__, spans), map(vals.__getitem__, spans)))
        return list(zip(map(meters.__getitem__, starts), map(int, map(tss.__getitem__, starts)),
                        map(seqs.__getitem__, starts),
                        map(seqs.__getitem__, map(operator.sub, ends, itertools.repeat(1))),
                        values))
    groups = {}
    ends = starts[1:] + [n]
    for a, b in zip(starts, ends):
        key = keys[a]
        values = dict(zip(qs[a:b], vals[a:b]))
        g = groups.get(key)
        if g is None:
            groups[key] = [key[0], key[1], seqs[a], seqs[b - 1], values]
        else:                         # the same meter and time again later in the window
            g[3] = seqs[b - 1]
            g[4].update(values)
    return [(m, int(ts), first, last, values) for m, ts, first, last, values in
            groups.values()]


MARKS_TABLE, MARKS_KEY = "journal", "marks"


def open_journal(path, state, **kwargs):
    """The journal at `path`, opened so that damage is survived, never a silent reset.

    `state` is the state store; its document journal/marks ({"jid", "next_seq"}) is the
    high-water mark of every stream. A journal that SQLite cannot open as a database or
    that fails `PRAGMA quick_check` is moved aside as `<path>.bad-<time>` (with its -wal and
    -shm); so is anything at `path` that is not a regular file. A fresh journal then takes
    its place, numbering every stream on from the mark (a missing journal.db while the mark
    says one existed is treated the same), and its first event is `journal.replaced`.
    Problems of the disk around the journal (permissions, read-only, I/O) raise
    JournalError as before. Writes the mark of the journal it returns.
    """
    marks = state.get(MARKS_TABLE, MARKS_KEY) or {}
    floor = {s: int(n) for s, n in (marks.get("next_seq") or {}).items()
             if s in STREAMS and isinstance(n, int)}
    previous_jid = marks.get("jid")
    reason = None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise JournalError("%s: cannot open the journal (%s)" % (path, exc.strerror)) from None
    if st is None:
        if marks:
            reason = "%s: missing although the state file says a journal existed" % path
    elif not stat.S_ISREG(st.st_mode):
        reason = "%s: not a regular file" % path
    else:
        try:
            journal = Journal(path, seq_floor=floor, **kwargs)
        except JournalError as exc:
            if not exc.damaged:
                raise
            reason = str(exc)
        else:
            problem = journal.quick_check()
            if problem is None:
                _check_jid(journal, previous_jid, floor)
                save_marks(journal, state)
                return journal
            reason = "%s: quick_check: %s" % (path, problem)
            with contextlib.suppress(Exception):
                previous_jid = journal.jid
                for s, n in journal.next_seqs().items():   # what it had numbered, if legible
                    floor[s] = max(floor.get(s, 1), int(n))
            with contextlib.suppress(Exception):
                journal._db.close()
    if reason is None:
        # a first start: nothing to continue from (stray -wal/-shm still go aside)
        aside = _move_aside(path)
        journal = Journal(path, **kwargs)
        save_marks(journal, state)
        return journal
    aside = _move_aside(path)
    log.error("%s; %sa fresh journal continues every stream from its mark %s", reason,
              "kept aside as %s; " % aside if aside else "", floor or "(none)",
              extra=logs.fields(event="journal.replaced"))
    fields = {"reason": reason, "aside": aside, "previous_jid": previous_jid,
              "floors": {s: max(1, floor.get(s, 1)) for s in STREAMS}}
    journal = Journal(path, seq_floor=floor, first_event=("journal.replaced", fields),
                      **kwargs)
    save_marks(journal, state)
    return journal


def _check_jid(journal, previous_jid, floor):
    if previous_jid and journal.jid != previous_jid:
        # not the journal the mark was written for (a copy from elsewhere, or a crash
        # right after a replacement): its own jid tells the head-end it numbers anew
        log.warning("%s: journal id %s, the state file last saw %s", journal.path,
                    journal.jid, previous_jid, extra=logs.fields(event="journal.replaced"))
        journal.append_event("journal.replaced", reason="different journal", aside=None,
                             previous_jid=previous_jid, floors=floor)


def save_marks(journal, state):
    """Store the journal's id and next seqs as the high-water mark in the state file.
    Returns False (logged) if the state file cannot be written now."""
    from gateway.store.state import StateError
    doc = {"jid": journal.jid, "next_seq": journal.next_seqs()}
    try:
        if state.get(MARKS_TABLE, MARKS_KEY) != doc:
            state.put(MARKS_TABLE, MARKS_KEY, doc)
    except StateError as exc:
        log.warning("cannot store the journal marks: %s", exc)
        return False
    return True


def _move_aside(path):
    """paths.move_aside, its failure one JournalError line."""
    from gateway.store.paths import move_aside
    try:
        return move_aside(path)
    except OSError as exc:
        raise JournalError("%s: damaged, and cannot move it aside (%s)"
                           % (path, exc.strerror)) from None


def readonly_stats(path):
    """Journal.stats() without writing anything (for `mgw buffer` beside a running service);
    None if there is no journal."""
    if not os.path.exists(path):
        return None
    try:
        db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=5)
    except sqlite3.DatabaseError as exc:
        raise JournalError("%s: cannot open (%s)" % (path, exc)) from None
    try:
        j = Journal.__new__(Journal)
        j.path = path
        j._db = db
        j._lock = threading.Lock()
        j._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        j.quota_bytes = None
        return j.stats()
    except sqlite3.DatabaseError as exc:
        raise JournalError("%s: cannot read (%s)" % (path, exc)) from None
    finally:
        db.close()


def _file_bytes(path):
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(path + suffix)
        except OSError:
            pass
    return total


class _Transaction:
    def __init__(self, db):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass
        return False
