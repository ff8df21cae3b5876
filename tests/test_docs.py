"""The account store's SQLite file (gateway/store/docs.py): one owner, nothing lost, every
bad file refused in one line and left where it is."""

import os
import sqlite3
import subprocess
import sys

import pytest

from gateway.store.accounts import AccountStore
from gateway.store.docs import DocStore, open_docs, read_tables
from gateway.store.state import StateError, StateStore, write_state_file


def _open(tmp_path):
    state = StateStore(str(tmp_path / "state.json"))
    return state, open_docs(str(tmp_path / "accounts.db"), state)


def test_a_change_writes_only_the_documents_it_changed_and_survives_a_reopen(tmp_path):
    state, docs = _open(tmp_path)
    store = AccountStore(docs)
    for k in range(50):
        store.create("m%d" % k, {"balance_uy": k, "topups_uy": 0})
    doc, applied = store.topup("m7", "T1", 5, channel="bank")
    assert applied and doc["balance_uy"] == 12
    assert store.topup("m7", "T1", 5)[1] is False          # once, whatever carries it
    docs.close()
    state.close()
    state, docs = _open(tmp_path)
    assert docs.get("accounts", "m7")["balance_uy"] == 12 and len(docs.all("txns")) == 1
    assert docs.get("txns", "T1")["channel"] == "bank"
    assert len(docs.all("accounts")) == 50
    docs.close()
    state.close()


def test_a_batch_that_raises_writes_nothing_and_memory_follows_the_file(tmp_path):
    state, docs = _open(tmp_path)
    store = AccountStore(docs)
    store.create("m1", {"balance_uy": 100, "days": {"d": {"n": 1}}})
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            doc = tx.get("m1")
            doc["balance_uy"] = 0
            doc["days"]["d"]["n"] = 99          # a nested change, in place
            tx.put("m1", doc)
            raise RuntimeError("boom")
    assert store.get("m1") == {"balance_uy": 100, "days": {"d": {"n": 1}}}
    docs.close()
    state.close()


def test_accounts_kept_in_an_old_state_file_move_in_once(tmp_path):
    old = {"accounts": {"1": {"_key": "m1", "balance_uy": 4200}},
           "txns": {"1": {"_key": "PAY-1", "meter": "m1", "amount_uy": 4200}},
           "meters": {"1": {"_key": "all", "offline": []}}}
    write_state_file(str(tmp_path / "state.json"), old)
    state, docs = _open(tmp_path)
    assert docs.get("accounts", "m1") == {"balance_uy": 4200}
    assert docs.get("txns", "PAY-1")["amount_uy"] == 4200
    assert state.all("accounts") == {} and state.all("txns") == {}
    assert state.get("meters", "all") == {"offline": []}     # the rest stays
    AccountStore(docs).update("m1", lambda d: d.update(balance_uy=1))
    docs.close()
    state.close()
    # a state file put back from before the move (or a crash before it forgot them): the
    # store, not the stale copy, holds the money
    write_state_file(str(tmp_path / "state.json"), dict(old, docs={
        "1": {"_key": "marks", "id": read_id(tmp_path)}}))
    state, docs = _open(tmp_path)
    assert docs.get("accounts", "m1") == {"balance_uy": 1}
    assert state.all("accounts") == {}
    docs.close()
    state.close()


def read_id(tmp_path):
    db = sqlite3.connect(str(tmp_path / "accounts.db"))
    try:
        return db.execute("SELECT value FROM meta WHERE key='id'").fetchone()[0]
    finally:
        db.close()


def test_a_missing_or_swapped_store_stops_the_start_instead_of_empty_accounts(tmp_path):
    state, docs = _open(tmp_path)
    AccountStore(docs).create("m1", {"balance_uy": 5})
    docs.close()
    os.rename(tmp_path / "accounts.db", tmp_path / "saved.db")
    with pytest.raises(StateError, match="missing although the state file says"):
        open_docs(str(tmp_path / "accounts.db"), state)
    assert not os.path.exists(tmp_path / "accounts.db")        # nothing created in its place
    other = DocStore(str(tmp_path / "accounts.db"))            # another box's store
    other.close()
    with pytest.raises(StateError, match="another account store"):
        open_docs(str(tmp_path / "accounts.db"), state)
    os.replace(tmp_path / "saved.db", tmp_path / "accounts.db")
    docs = open_docs(str(tmp_path / "accounts.db"), state)
    assert docs.get("accounts", "m1") == {"balance_uy": 5}
    docs.close()
    state.close()


@pytest.mark.parametrize("kind", ["garbage", "foreign", "symlink", "fifo", "dir", "damaged",
                                  "not_json"])
def test_a_bad_file_is_refused_in_one_line_and_left_as_it_is(tmp_path, kind):
    path = str(tmp_path / "accounts.db")
    if kind == "garbage":
        with open(path, "wb") as f:
            f.write(b"\x00not a database" * 300)
    elif kind == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE orders (id INTEGER)")
        db.commit()
        db.close()
    elif kind == "symlink":
        target = tmp_path / "elsewhere.db"
        DocStore(str(target)).close()
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "not_json":
        docs = DocStore(path)
        AccountStore(docs).create("m1", {"balance_uy": 5})
        docs.close()
        db = sqlite3.connect(path)
        db.execute("UPDATE docs SET body='{\"balance_uy\": 5' WHERE key='m1'")
        db.commit()
        db.close()
    else:
        docs = DocStore(path)
        AccountStore(docs).create("m1", {"balance_uy": 5, "pad": "x" * 20000})
        docs.close()
        with open(path, "r+b") as f:          # bit rot in the b-tree pages
            for page in (1, 2, 3):
                f.seek(4096 * page)
                f.write(b"\x0b\xff\xff" * 30)
    before = os.lstat(path)
    with pytest.raises(StateError) as err:
        DocStore(path)
    message = str(err.value)
    assert "\n" not in message and path in message
    after = os.lstat(path)
    assert (before.st_mode, before.st_size, before.st_ino) == \
        (after.st_mode, after.st_size, after.st_ino)


def test_a_kill_mid_write_leaves_the_previous_or_the_new_balance(tmp_path):
    """SIGKILL a writer at random points: every reopen finds a consistent store whose
    balance equals the sum of the ledger (one write carries both)."""
    path = str(tmp_path / "accounts.db")
    child = r"""
import sys
sys.path.insert(0, %r)
from gateway.store.accounts import AccountStore
from gateway.store.docs import DocStore
store = AccountStore(DocStore(sys.argv[1]))
store.create("m1", {"balance_uy": 0, "topups_uy": 0, "pad": "x" * 3000})
k = 0
while True:
    store.topup("m1", "T%%d" %% k, 7)
    k += 1
    if k == 50:
        print("GO", flush=True)
""" % os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import random
    import time
    rnd = random.Random(5)
    for _ in range(5):
        p = subprocess.Popen([sys.executable, "-c", child, path], stdout=subprocess.PIPE)
        assert p.stdout.readline() == b"GO\n"
        time.sleep(rnd.uniform(0.0, 0.2))
        p.kill()
        p.wait()
        tables = read_tables(path)
        txns = tables.get("txns", {})
        assert tables["accounts"]["m1"]["balance_uy"] == 7 * len(txns) > 0


def test_a_full_disk_fails_the_payment_in_one_line_and_loses_nothing(tmp_path):
    """A top-up on a full disk: refused with "disk full", the balance in memory equals the
    file's, nothing half-written; the reserve is given back once; space back, it goes."""
    from test_state import _fill, _mount_tmpfs
    from gateway.store.paths import DiskReserve
    from gateway.store.state import StateDiskFull
    mnt = str(tmp_path / "small")
    _mount_tmpfs(mnt, "2m")
    try:
        path = os.path.join(mnt, "accounts.db")
        docs = DocStore(path)
        store = AccountStore(docs)
        store.create("m1", {"balance_uy": 100, "topups_uy": 0})
        filler = _fill(path)
        pad = "p" * 300000                      # a payment too large for what is left
        with pytest.raises(StateError) as err:
            store.topup("m1", "T-big", 5, command=pad)
        assert isinstance(err.value, StateDiskFull) and "disk full" in str(err.value)
        assert "\n" not in str(err.value)
        assert store.get("m1")["balance_uy"] == 100 and store.txn("T-big") is None
        docs.close()
        assert read_tables(path)["accounts"]["m1"]["balance_uy"] == 100
        # the reserve, given back once, lets the payment through
        os.unlink(filler)
        reserve = DiskReserve(os.path.join(mnt, ".reserve"), 700 * 1024)
        assert reserve.restore()
        docs = DocStore(path, reserve=reserve)
        store = AccountStore(docs)
        filler = _fill(path)
        doc, applied = store.topup("m1", "T-big", 5, command=pad)
        assert applied and doc["balance_uy"] == 105 and not reserve.present
        docs.close()
        assert read_tables(path)["txns"]["T-big"]["amount_uy"] == 5
        os.unlink(filler)
    finally:
        subprocess.run(["umount", "-l", mnt])


def _damage(path):
    with open(path, "r+b") as f:
        for page in (1, 2, 3):
            f.seek(4096 * page)
            f.write(b"\x0b\xff\xff" * 30)


def test_a_damaged_store_names_its_backup_and_recovers_from_it_when_asked(tmp_path):
    state, docs = _open(tmp_path)
    store = AccountStore(docs)
    store.create("m1", {"balance_uy": 100, "topups_uy": 0, "pad": "x" * 9000})
    backup = docs.backup()
    assert backup == str(tmp_path / "accounts.db.bak")
    store.topup("m1", "T-after", 50)                  # after the backup
    docs.close()
    path = str(tmp_path / "accounts.db")
    _damage(path)
    with pytest.raises(StateError) as err:
        open_docs(path, state)
    msg = str(err.value)
    assert "\n" not in msg and "a backup of" in msg and "recover_state = true" in msg
    docs = open_docs(path, state, recover=True)
    assert docs.get("accounts", "m1")["balance_uy"] == 100     # as it was at the backup
    assert docs.get("txns", "T-after") is None                  # to be sent again
    assert docs.recovered["backup"] == backup and docs.recovered["aside"].startswith(
        path + ".bad-") and os.path.exists(docs.recovered["aside"])
    doc, applied = AccountStore(docs).topup("m1", "T-after", 50)   # sent again: applied
    assert applied and doc["balance_uy"] == 150
    docs.close()
    state.close()


def test_a_lost_store_is_recovered_only_from_this_gateways_backup(tmp_path):
    state, docs = _open(tmp_path)
    AccountStore(docs).create("m1", {"balance_uy": 7})
    docs.backup()
    docs.close()
    path = str(tmp_path / "accounts.db")
    other = DocStore(str(tmp_path / "other.db"))       # another box's store as the backup
    AccountStore(other).create("m1", {"balance_uy": 999})
    other.backup(path + ".bak.other")
    other.close()
    os.unlink(path)
    os.replace(path + ".bak.other", path + ".bak")
    with pytest.raises(StateError) as err:
        open_docs(path, state, recover=True)
    assert "missing although" in str(err.value) and "backup" not in str(err.value)
    assert not os.path.exists(path)
    state.close()


def test_the_gateway_backs_its_accounts_up_and_recovers_them_when_told(tmp_path, broker):
    """The real gateway: a backup at start; a damaged accounts.db with [storage]
    recover_state = true starts from it and says so on MQTT (accounts.recovered, as
    documented); the balance is the backup's."""
    import time
    from gwharness import Harness
    from mqtt_helpers import HeadEnd
    from test_asyncapi import Spec
    head = HeadEnd(broker)
    h = Harness(tmp_path, broker=broker, meters=1, storage={"recover_state": True},
                accounts=[{"meter": "m1", "tariff": "flat", "opening_balance": "50.00"}])
    try:
        h.start()
        data = tmp_path / "data"
        end = time.time() + 20                          # taken with the first status
        while time.time() < end and not (data / "accounts.db.bak").exists():
            time.sleep(0.1)
        assert (data / "accounts.db.bak").exists()
        h.stop()
        _damage(str(data / "accounts.db"))
        h.start()
        end = time.time() + 30
        while time.time() < end and not [e for e in head.topic("events")
                                         if e.get("type") == "accounts.recovered"]:
            time.sleep(0.1)
        ev = [e for e in head.topic("events") if e.get("type") == "accounts.recovered"][0]
        spec = Spec()
        spec.validate(spec.message_for("events", ev), ev)
        assert ev["aside"].startswith(str(data / "accounts.db.bad-"))
        assert h.gw.accounts.get("m1")["balance_uy"] == 50 * 10 ** 6
    finally:
        h.close()
        head.close()


def test_old_txn_ids_are_forgotten_so_the_ledger_does_not_grow_forever(tmp_path):
    state, docs = _open(tmp_path)
    store = AccountStore(docs)
    store.create("m1", {"balance_uy": 0, "topups_uy": 0})
    day = 86400
    now = 1_800_000_000
    for k in range(10):
        store.topup("m1", "T%d" % k, 1, at=now - (500 - k * 50) * day)   # 500 .. 50 days ago
    store.topup("m1", "T-today", 1, at=now)
    assert store.forget_txns(now - 400 * day) == 2                      # 500 and 450 days
    assert store.txn("T0") is None and store.txn("T1") is None
    assert store.txn("T2") is not None and store.txn("T-today") is not None
    assert store.get("m1")["balance_uy"] == 11                          # money untouched
    # the same on the state-file store (older tests and tools use it)
    plain = AccountStore(StateStore(str(tmp_path / "plain.json")))
    plain.create("m1", {"balance_uy": 0, "topups_uy": 0})
    plain.topup("m1", "OLD", 1, at=now - 500 * day)
    plain.topup("m1", "NEW", 1, at=now)
    assert plain.forget_txns(now - 400 * day) == 1 and plain.txn("NEW") is not None
    docs.close()
    state.close()


def test_a_stopped_stores_tables_read_by_a_tool_say_what_is_wrong_in_one_line(tmp_path):
    path = str(tmp_path / "accounts.db")
    docs = DocStore(path)
    AccountStore(docs).create("m1", {"balance_uy": 5})
    docs.close()
    assert read_tables(path)["accounts"]["m1"] == {"balance_uy": 5}
    db = sqlite3.connect(path)
    db.execute("UPDATE docs SET body='{' WHERE key='m1'")
    db.commit()
    db.close()
    with pytest.raises(StateError) as err:
        read_tables(path)
    assert "is not JSON" in str(err.value) and "\n" not in str(err.value)
