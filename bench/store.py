"""Store benchmark: cost of appending readings as the buffer grows, and bytes on disk.

Microseconds per appended reading (batches of 32, one durable transaction each) with 1,000
and with 1,000,000 readings already buffered; the ratio is the point (target <= 1.3). Bytes
on disk per reading. The peer is what this design replaces: a plain TinyDB table holding the
readings (measured at 1,000 and 100,000 buffered: at 1,000,000 one TinyDB insert rewrites a
file of ~150 MB and the prefill alone takes hours).

Run: python bench/store.py. It prints figures; it asserts nothing.
"""

import os
import shutil
import sys
import tempfile
import time
from decimal import Decimal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gateway.store.journal import Journal, Reading, value_json  # noqa: E402

BATCH = 32
QUANTITIES = ("energy.import.total", "energy.import.t1", "energy.import.t2",
              "energy.import.t3", "energy.import.t4", "voltage.a", "current.a", "power.active")


def readings(start, n):
    ts = 1795700000000
    return [Reading("m%03d" % ((start + i) % 256), QUANTITIES[(start + i) % 8],
                    Decimal(start + i).scaleb(-2), "kWh", ts + i, ts + i)
            for i in range(n)]


def journal_case(folder, buffered, batches=200):
    path = os.path.join(folder, "journal-%d.db" % buffered)
    j = Journal(path, quota_bytes=10 ** 12, consumers={"uplink": ["readings"]})
    done = 0
    while done < buffered:
        n = min(20000, buffered - done)
        j.append_readings(readings(done, n))
        done += n
    j._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    used_before = j.used_bytes()
    t0 = time.perf_counter()
    for b in range(batches):
        j.append_readings(readings(buffered + b * BATCH, BATCH))
    dt = time.perf_counter() - t0
    per_reading_bytes = j.used_bytes() / (buffered + batches * BATCH)
    j.close()
    del used_before
    return dt / (batches * BATCH) * 1e6, per_reading_bytes


def tinydb_case(folder, buffered, batches):
    from tinydb import TinyDB
    path = os.path.join(folder, "tinydb-%d.json" % buffered)
    db = TinyDB(path)
    table = db.table("readings")

    def docs(start, n):
        return [{"seq": start + i + 1, "meter": r.meter, "q": r.quantity,
                 "value": value_json(r.value), "unit": r.unit, "ts": r.ts, "gw_ts": r.gw_ts,
                 "quality": r.quality} for i, r in enumerate(readings(start, n))]
    table.insert_multiple(docs(0, buffered))
    t0 = time.perf_counter()
    for b in range(batches):
        table.insert_multiple(docs(buffered + b * BATCH, BATCH))  # one file write per batch
    dt = time.perf_counter() - t0
    size = os.path.getsize(path) / (buffered + batches * BATCH)
    db.close()
    return dt / (batches * BATCH) * 1e6, size


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  ".."),
                    help="where to put the files (use the data partition: fsync cost matters)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix=".mgw-bench-store-", dir=args.dir)
    try:
        print("meter-gateway store benchmark: append batches of %d readings, each one durable "
              "transaction (WAL, synchronous=FULL); %s" % (BATCH, folder))
        small = journal_case(folder, 1000)
        big = journal_case(folder, 1000000)
        print("\n  %-34s %14s %14s" % ("", "us/reading", "bytes/reading"))
        print("  %-34s %14.1f %14.1f" % ("journal, 1,000 buffered", small[0], small[1]))
        print("  %-34s %14.1f %14.1f" % ("journal, 1,000,000 buffered", big[0], big[1]))
        print("  journal ratio 1,000,000 / 1,000: %.2f  (target <= 1.3)" % (big[0] / small[0]))
        t_small = tinydb_case(folder, 1000, 50)
        t_big = tinydb_case(folder, 100000, 3)
        print("  %-34s %14.1f %14.1f" % ("TinyDB table, 1,000 buffered", t_small[0], t_small[1]))
        print("  %-34s %14.1f %14.1f" % ("TinyDB table, 100,000 buffered", t_big[0], t_big[1]))
        print("  TinyDB ratio 100,000 / 1,000: %.1f" % (t_big[0] / t_small[0]))
        print("  journal at 1,000,000 vs TinyDB at 100,000: %.0fx faster per reading"
              % (t_big[0] / big[0]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
