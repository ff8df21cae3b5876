"""The SQLite journal: durable gap-free sequences, consumers, quota, kill safety, bad disks."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from decimal import Decimal

import pytest

from gateway.store.journal import (BACKFILLED, Journal, JournalError, Reading, value_json)

CONSUMERS = {"uplink": ["readings", "events", "results"], "billing": ["readings"]}

CHILD = r"""
import sys, time
from decimal import Decimal
from gateway.store.journal import Journal, Reading
j = Journal(sys.argv[1], consumers={"uplink": ["readings"]})
nxt = j.stats()["streams"]["readings"]["next_seq"]
print("ready", nxt, flush=True)
while True:
    batch = [Reading("m%d" % ((nxt + i) % 32), "energy.import.total",
                     Decimal(nxt + i).scaleb(-2), "kWh", 1000 * (nxt + i), 1)
             for i in range(32)]
    first, last = j.append_readings(batch)
    assert first == nxt, (first, nxt)
    nxt = last + 1
    print(last, flush=True)
"""


def r(meter="m1", value="1.00", q="energy.import.total", ts=1, quality="good"):
    return Reading(meter, q, Decimal(value) if isinstance(value, str) else value, "kWh",
                   ts, ts, quality)


def test_sequences_consumers_and_deletion(tmp_path):
    path = str(tmp_path / "journal.db")
    j = Journal(path, consumers=CONSUMERS)
    assert j.append_readings([r(value="1.00"), r(value="2.50")]) == (1, 2)
    assert j.append_event("meter.offline", meter="m1") == 1
    assert j.append_result({"id": "c1", "status": "done"}) == 1
    rows = j.read("uplink", "readings")
    assert [x.seq for x in rows] == [1, 2] and rows[1].value == Decimal("2.50")
    assert rows[1].value_json == "2.50"
    j.ack("uplink", "readings", 2)
    assert j.read("uplink", "readings") == []
    assert len(j.read("billing", "readings")) == 2      # billing has not acked: rows kept
    j.ack("billing", "readings", 1)
    assert j.stats()["streams"]["readings"]["stored"] == 1
    j.close()
    j = Journal(path, consumers=CONSUMERS)                # sequences survive restarts
    j.ack("billing", "readings", 2)
    assert j.stats()["streams"]["readings"]["stored"] == 0
    assert j.append_readings([r()]) == (3, 3)             # no reuse after deletion
    assert j.append_event("meter.online", meter="m1") == 2
    assert j.read("uplink", "events")[0].body == {"type": "meter.offline", "meter": "m1"}


def test_reading_fields_are_kept_exactly(tmp_path):
    j = Journal(str(tmp_path / "j.db"), consumers=CONSUMERS)
    j.append_readings([Reading("m9", "current.a", Decimal("-5.123"), "A", 111, 222, BACKFILLED),
                       Reading("m9", "relay.state", "open", None, 111, 222),
                       Reading("m9", "guarantee.state", False, None, 111, 222)])
    a, b, c = j.read("uplink", "readings")
    assert (a.meter, a.quantity, a.value, a.unit, a.ts, a.gw_ts, a.quality) == \
        ("m9", "current.a", Decimal("-5.123"), "A", 111, 222, "backfilled")
    assert b.value == "open" and c.value is False
    with pytest.raises(TypeError):
        j.append_readings([r(value=1.5)])                 # floats are refused: money is exact
    with pytest.raises(ValueError):
        j.append_readings([r(quality="nice")])
    assert value_json(Decimal("1E+2")) == "100"


def test_sigkill_loses_no_returned_append(tmp_path):
    path = str(tmp_path / "journal.db")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    rng = random.Random(7)
    kills = 0
    reported = 0
    for _ in range(50):
        child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                                 text=True, env=env)
        first_line = child.stdout.readline().split()
        assert first_line[0] == "ready", first_line
        # the sequence continues where the committed rows end: no gap, no reuse
        assert int(first_line[1]) >= reported + 1
        time.sleep(rng.uniform(0.0, 0.06))
        child.send_signal(signal.SIGKILL)
        out = child.communicate()[0].split()
        kills += 1
        if out:
            reported = int(out[-1])
        j = Journal(path)
        rows = j.read("uplink", "readings", limit=10 ** 9)
        seqs = [x.seq for x in rows]
        assert seqs == list(range(1, len(seqs) + 1))     # in order, no gap
        assert len(seqs) >= reported                     # every returned append is there
        for x in rows[-64:] + rows[:32]:                 # intact
            assert x.value == Decimal(x.seq).scaleb(-2) and x.meter == "m%d" % (x.seq % 32)
        assert j.stats()["streams"]["readings"]["next_seq"] == len(seqs) + 1
        j.close()
    assert kills == 50 and reported > 32


def test_quota_drops_oldest_first_and_reports_it(tmp_path):
    j = Journal(str(tmp_path / "j.db"), quota_bytes=256 * 1024, consumers=CONSUMERS)
    for i in range(300):
        j.append_readings([r(meter="m%d" % k, value=str(i)) for k in range(32)])
    s = j.stats()
    rs = s["streams"]["readings"]
    assert s["used_bytes"] <= 256 * 1024
    assert rs["dropped"] > 0 and rs["first_seq"] == rs["dropped"] + 1   # oldest went first
    assert rs["last_seq"] == 300 * 32                                   # newest all kept
    events = [e.body for e in j.read("uplink", "events", limit=1000)]
    dropped = [e for e in events if e["type"] == "journal.dropped"]
    assert sum(e["count"] for e in dropped) == rs["dropped"]
    assert dropped[0]["first_seq"] == 1


def _mount_tmpfs(path, size):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    os.makedirs(path, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", path],
                         capture_output=True)
    if res.returncode:
        pytest.skip("cannot mount tmpfs here: %s" % res.stderr.decode().strip())


def test_full_disk_keeps_collecting_and_read_only_disk_is_one_line(tmp_path):
    mnt = str(tmp_path / ("small-" + uuid.uuid4().hex[:6]))
    _mount_tmpfs(mnt, "400k")
    try:
        j = Journal(os.path.join(mnt, "j.db"), quota_bytes=100 * 1024 * 1024,
                    consumers=CONSUMERS, reserve_bytes=64 * 1024, wal_pages=16)
        for i in range(400):                     # far more than 320 KiB of readings
            j.append_readings([r(meter="m%d" % k, value=str(i)) for k in range(32)])
        s = j.stats()["streams"]["readings"]
        assert s["last_seq"] == 400 * 32 and s["dropped"] > 0
        events = [e.body for e in j.read("uplink", "events", limit=1000)]
        assert {e["reason"] for e in events if e["type"] == "journal.dropped"} == {"disk_full"}
        j.close()
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        with pytest.raises(JournalError) as err:
            j = Journal(os.path.join(mnt, "j.db"), consumers=CONSUMERS)
            j.append_readings([r()])
        assert "\n" not in str(err.value) and "j.db" in str(err.value)
    finally:
        subprocess.run(["umount", "-l", mnt])


def test_the_service_sink_keeps_readings_in_memory_while_the_journal_fails(tmp_path):
    """A failing disk: readings wait in a bounded queue, are stored when the journal is
    writable again, and whatever overflowed the queue is counted, not lost silently."""
    from gateway.service.sink import ReadingSink

    class FlakyJournal:
        """The real journal, failing while `broken` is set (a disk gone read-only)."""

        def __init__(self, journal):
            self.j = journal
            self.broken = True

        def __getattr__(self, name):
            attr = getattr(self.j, name)
            if name.startswith("append") and self.broken:
                def fail(*a, **k):
                    raise JournalError("%s: cannot append (disk I/O error)" % self.j.path)
                return fail
            return attr

    real = Journal(str(tmp_path / "j.db"), consumers=CONSUMERS)
    flaky = FlakyJournal(real)
    sink = ReadingSink(flaky, max_pending=50)
    for i in range(60):
        sink.readings([r(value=str(i))])
    sink.event("meter.offline", meter="m1")
    assert sink.pending == 51 and sink.lost == 10 and "I/O error" in sink.last_error
    assert real.stats()["streams"]["readings"]["stored"] == 0
    flaky.broken = False
    sink.flush()
    rows = real.read("uplink", "readings", limit=100)
    assert [x.value for x in rows] == [Decimal(i) for i in range(10, 60)]   # in order
    events = [e.body["type"] for e in real.read("uplink", "events", limit=10)]
    assert events == ["meter.offline", "gateway.storage_recovered"]
    assert sink.pending == 0 and sink.last_error is None


def test_a_consumer_that_is_gone_no_longer_holds_rows(tmp_path):
    j = Journal(str(tmp_path / "j.db"), consumers=CONSUMERS)
    j.append_readings([r(), r(), r()])
    j.ack("uplink", "readings", 3)
    assert j.stats()["streams"]["readings"]["stored"] == 3     # billing has not read them
    j.unregister("billing", "readings")
    st = j.stats()["streams"]["readings"]
    assert st["stored"] == 0 and "billing" not in st["consumers"]


def test_a_fresh_journal_numbers_each_stream_from_its_floor(tmp_path):
    j = Journal(str(tmp_path / "j.db"), consumers=CONSUMERS,
                seq_floor={"readings": 1000, "events": 7, "results": 0})
    assert j.created and j.next_seqs() == {"readings": 1000, "events": 7, "results": 1,
                                          "statements": 1}
    assert j.append_readings([r(), r()]) == (1000, 1001)
    assert j.append_event("meter.online", meter="m1") == 7
    assert j.append_result({"id": "c1"}) == 1
    assert [x.seq for x in j.read("uplink", "readings")] == [1000, 1001]
    assert j.stats()["streams"]["readings"]["stored"] == 2


def test_an_old_copy_behind_its_mark_never_reuses_numbers(tmp_path):
    path = str(tmp_path / "j.db")
    j = Journal(path, consumers=CONSUMERS)
    j.append_readings([r()] * 5)
    j.close()
    j = Journal(path, consumers=CONSUMERS, seq_floor={"readings": 50, "events": 1})
    assert not j.created
    assert j.append_readings([r()]) == (50, 50)          # not 6: the head-end has seen 6..49
    assert j.next_seqs()["events"] == 1


def test_every_journal_has_a_jid_and_one_from_before_jids_gets_one(tmp_path):
    import re
    import sqlite3
    path = str(tmp_path / "j.db")
    j = Journal(path, consumers=CONSUMERS)
    jid = j.jid
    assert re.fullmatch(r"[0-9a-f]{12}", jid) and j.stats()["jid"] == jid
    j.append_readings([r()])
    j.close()
    assert Journal(path).jid == jid                       # stable across opens
    other = Journal(str(tmp_path / "k.db"))
    assert other.jid != jid
    other.close()
    # a journal written before jids: no meta row, opens with its data and gets an id
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE key='jid'")
    db.commit()
    db.close()
    j = Journal(path, consumers=CONSUMERS)
    assert re.fullmatch(r"[0-9a-f]{12}", j.jid) and j.jid != jid
    assert [x.seq for x in j.read("uplink", "readings")] == [1]
    assert j.append_readings([r()]) == (2, 2)


def _grouped_by_read(j, consumer, prefix, limit):
    """read_grouped's answer built from read() (the row-per-tuple read billing used)."""
    rows = j.read(consumer, "readings", limit=limit)
    if not rows:
        return 0, None, []
    groups = {}
    for r in rows:
        if r.quantity.startswith(prefix):
            g = groups.setdefault((r.meter, r.ts), [r.meter, r.ts, r.seq, r.seq, {}])
            g[3] = r.seq
            g[4][r.quantity] = r.value_json
    return len(rows), rows[-1].seq, [tuple(g) for g in groups.values()]


def test_billing_grouped_read_equals_grouping_the_rows(tmp_path):
    """read_grouped (one text per column from SQLite, runs grouped in C) gives exactly what
    grouping read()'s rows gives: the window, the filter, repeated quantities (last wins),
    a meter and time seen again later in the window, odd texts, acknowledged rows."""
    rng = random.Random(18)
    j = Journal(str(tmp_path / "j.db"), consumers={"billing": ["readings"]})
    qs = ["energy.import.total", "energy.import.t1", "energy.import.t4", "energy.import.x",
          "energy.export.total", "voltage.a", "energy.import[*?]"]
    meters = ["m1", "m2", "m\x1f3", "m 4"]
    values = [Decimal("12.34"), 5, True, "a\x1fb", "1 2", Decimal("-0.5"), "", None]
    for _ in range(60):
        batch = []
        ts = rng.randrange(1, 6) * 1000
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.3:
                ts = rng.randrange(1, 6) * 1000
            batch.append(Reading(rng.choice(meters[:2] if rng.random() < 0.8 else meters),
                                 rng.choice(qs), rng.choice(values), None, ts, ts))
        j.append_readings(batch)
        for prefix in ("energy.import.", "energy.import[*?]"):
            limit = rng.randrange(1, 80)
            assert j.read_grouped("billing", prefix, limit) == \
                _grouped_by_read(j, "billing", prefix, limit)
        if rng.random() < 0.5:
            _, last, _ = j.read_grouped("billing", limit=rng.randrange(1, 40))
            j.ack("billing", "readings", last)
    assert j.read_grouped("billing", limit=10 ** 6)[1] is not None
    j.ack("billing", "readings", j.read_grouped("billing", limit=10 ** 6)[1])
    assert j.read_grouped("billing") == (0, None, [])


# ---------------------------------------------------------------- the energy table

def _energy(j, consumer="billing"):
    """Every energy row after the consumer's cursor: {seq: (meter, ts, total, t1..t4)}."""
    _, _, per_meter = j.read_energy(consumer, limit=10 ** 6)
    return {seq: (meter, ts) + tuple(cols)
            for meter, seqs, tss, *columns in per_meter
            for seq, ts, cols in zip(seqs, tss, zip(*columns))}


def test_the_energy_table_has_a_row_per_energy_reading_while_billing_is_registered(tmp_path):
    """One row per meter and time with its total and T1..T4 texts, keyed by the seq of the
    reading's last row, written in the append's transaction; none while no one bills;
    acknowledged rows deleted; a consumer that goes takes the rows with it."""
    j = Journal(str(tmp_path / "j.db"), consumers={"uplink": ["readings"]})
    j.append_readings([r("m1", "1.00")])                       # seq 1: no one bills yet
    j.register("billing", "energy")                            # starts at the oldest kept
    assert _energy(j) == {1: ("m1", 1, "1.00", None, None, None, None)}
    batch = [r("m1", "5.00", ts=2), r("m1", "1.25", q="energy.import.t1", ts=2),
             r("m1", "3.75", q="energy.import.t4", ts=2), r("m1", "230.1", q="voltage.a", ts=2),
             r("m2", "7.5", ts=2), r("m1", "0.50", q="energy.import.a", ts=2),
             r("m2", "8.00", ts=3), r("m2", "2.00", q="energy.import.t2", ts=3),
             r("m3", "9.00", q="energy.export.total", ts=2)]
    assert j.append_readings(batch) == (2, 10)
    # (m1 at 2 ends with its energy.import.a row, seq 7: the seq billing gave it before)
    assert _energy(j) == {1: ("m1", 1, "1.00", None, None, None, None),
                          6: ("m2", 2, "7.5", None, None, None, None),
                          7: ("m1", 2, "5.00", "1.25", None, None, "3.75"),
                          9: ("m2", 3, "8.00", None, "2.00", None, None)}
    assert j.read_energy("billing", limit=2)[:2] == (2, 6)
    j.ack("billing", "energy", 6)
    assert sorted(_energy(j)) == [7, 9]
    st = j.stats()
    assert st["energy"]["first_seq"] == 7 and st["energy"]["last_seq"] == 9
    assert st["energy"]["consumers"] == {"billing": {"acked": 6}}
    assert st["streams"]["readings"]["stored"] == 10       # the readings are the uplink's
    assert "billing" not in st["streams"]["readings"]["consumers"]
    j.close()
    j = Journal(str(tmp_path / "j.db"))                     # kept across a restart
    assert sorted(_energy(j)) == [7, 9]
    j.unregister("billing", "energy")
    j.append_readings([r("m1", "6.00", ts=4)])
    assert j._db.execute("SELECT COUNT(*) FROM energy").fetchone()[0] == 0
    j.register("billing", "energy")                        # again: the readings kept
    assert sorted(_energy(j)) == [1, 6, 7, 9, 11]


def _as_schema_1(path, billing_acked):
    """Make the journal at `path` one written before the energy table: billing's cursor on
    the readings at `billing_acked` (schema 1 still: the table is additive)."""
    import sqlite3
    db = sqlite3.connect(path)
    db.execute("DROP TABLE energy")
    db.execute("DELETE FROM cursors WHERE stream='energy'")
    db.execute("INSERT OR REPLACE INTO cursors VALUES ('billing', 'readings', ?)",
               (billing_acked,))
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.commit()
    db.close()


@pytest.mark.parametrize("history", ["from before", "downgraded and back"])
def test_a_journal_from_before_the_energy_table_moves_billing_to_it(tmp_path, history):
    """Opened by this version, a journal from before the table gains it; billing's cursor on
    the readings moves to it when billing registers, and the readings after that cursor
    become energy rows exactly as billing grouped them before (windows of 20,000 rows from
    the cursor, a meter and time seen again later in a window joined, its last row's seq),
    in one transaction; the uplink's cursor is untouched. "downgraded and back": a gateway
    from before the table ran on this journal for a while (it billed from the readings and
    wrote no energy rows): its readings cursor is the truth, the stale rows and cursor go."""
    import gateway.store.journal as journal
    path = str(tmp_path / "j.db")
    rng = random.Random(7)
    j = Journal(path, consumers={"uplink": ["readings"], "billing": ["readings"]})
    if history == "downgraded and back":
        j.register("billing", "energy")            # this version first ...
        j.register("billing", "readings")          # ... then an older one again
    for k in range(40):
        ts = 1000 * (k // 3)
        batch = []
        for m in ("m1", "m2"):
            for q in ("energy.import.total", "energy.import.t1", "energy.import.t2",
                      "energy.import.t3", "energy.import.t4", "voltage.a")[:rng.randrange(1, 7)]:
                batch.append(r(m, "%d.%02d" % (k, rng.randrange(100)), q=q, ts=ts))
        if k == 20:
            j._energy_on = False                   # the older version writes no rows
        j.append_readings(batch)
    j.ack("uplink", "readings", 50)
    j.ack("billing", "readings", 30)
    assert j.stats()["streams"]["readings"]["first_seq"] == 31
    last = j.next_seqs()["readings"] - 1
    j.close()
    if history == "from before":
        _as_schema_1(path, 30)
    old = Journal(path)
    assert old._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("1",)
    expected, start = {}, 30
    orig = journal._FILL_ROWS
    journal._FILL_ROWS = 25                                   # several windows
    try:
        while True:
            n, end, groups = old._grouped_window(start, journal._FILL_ROWS, "energy.import.")
            if end is None:
                break
            for meter, ts, _, seq, values in groups:
                cols = tuple(values.get(q) for q in journal.ENERGY_COLUMNS)
                if cols != (None,) * 5:
                    expected[seq] = (meter, ts) + cols
            start = end
        old.register("billing", "energy")
    finally:
        journal._FILL_ROWS = orig
    assert _energy(old) == expected and max(expected) <= last and min(expected) > 30
    assert old._db.execute("SELECT MIN(seq) FROM energy").fetchone()[0] == min(expected)
    assert old.cursor("billing", "energy") == 30
    with pytest.raises(KeyError):
        old.cursor("billing", "readings")                      # moved: no longer held
    assert old.cursor("uplink", "readings") == 50
    # the readings the uplink has are deleted once billing no longer holds them
    assert old.stats()["streams"]["readings"]["first_seq"] == 51
    old.close()


def test_the_quota_drops_unbilled_energy_rows_after_the_readings(tmp_path):
    """Billing stalls while the uplink sends everything: the energy table is what grows, and
    past the quota its oldest rows go (counted, logged; no journal.dropped: no published
    stream lost a seq), after the readings still kept and before any event."""
    j = Journal(str(tmp_path / "j.db"), quota_bytes=256 * 1024,
                consumers={"uplink": ["readings", "events"], "billing": ["energy"]})
    for i in range(400):
        j.append_readings([r(meter="m%d" % k, value=str(i), ts=i) for k in range(32)])
        j.ack("uplink", "readings", j.next_seqs()["readings"] - 1)
    s = j.stats()
    assert s["used_bytes"] <= 256 * 1024
    assert s["energy"]["dropped"] >= 2000 and s["streams"]["events"]["dropped"] == 0
    assert s["energy"]["last_seq"] == 400 * 32                  # the newest kept
    rows = _energy(j)
    assert min(rows) > s["energy"]["dropped"] and len(rows) == 400 * 32 - s["energy"]["dropped"]
    dropped = [e.body for e in j.read("uplink", "events", limit=1000)
               if e.body["type"] == "journal.dropped"]
    assert {e["stream"] for e in dropped} == {"readings"}        # (the batch not yet sent)
    assert sum(e["count"] for e in dropped) == s["streams"]["readings"]["dropped"]
