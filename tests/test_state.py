"""The TinyDB state store: atomic writes, kill safety, corrupt files refused or recovered."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from gateway.store.state import StateError, StateStore, read_state_file

CHILD = r"""
import sys
from gateway.store.state import StateStore
store = StateStore(sys.argv[1])
doc = store.get("accounts", "m1") or {"n": 0}
k = doc["n"]
print("ready", k, flush=True)
while True:
    k += 1
    with store.batch():
        store.put("accounts", "m1", {"n": k, "payload": [k] * 300, "check": k * 3})
        store.put("ledger", "c%d" % (k % 50), {"n": k})
    print(k, flush=True)
"""


def test_put_get_batch_and_rollback(tmp_path):
    path = str(tmp_path / "state.json")
    s = StateStore(path)
    s.put("accounts", "m1", {"balance_fen": 10000})
    with s.batch():
        s.put("accounts", "m1", {"balance_fen": 9000, "charged_to": 7})
        s.put("ledger", "cmd1", {"status": "done"})
    with pytest.raises(RuntimeError):
        with s.batch():
            s.put("accounts", "m1", {"balance_fen": 1})
            raise RuntimeError("billing bug")
    assert s.get("accounts", "m1") == {"balance_fen": 9000, "charged_to": 7}
    s.close()
    s2 = StateStore(path)
    assert s2.get("accounts", "m1") == {"balance_fen": 9000, "charged_to": 7}
    assert s2.all("ledger") == {"cmd1": {"status": "done"}}
    assert os.path.exists(path + ".prev")
    assert read_state_file(path + ".prev")["accounts"]  # the previous good copy


def test_sigkill_never_leaves_a_mixed_or_unreadable_file(tmp_path):
    path = str(tmp_path / "state.json")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    rng = random.Random(4)
    last_seen = 0
    for _ in range(50):
        child = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE,
                                 text=True, env=env)
        assert child.stdout.readline().startswith("ready")
        time.sleep(rng.uniform(0.005, 0.08))
        child.send_signal(signal.SIGKILL)
        out = child.communicate()[0].split()
        child.wait()
        returned = int(out[-1]) if out else last_seen
        store = StateStore(path)           # must open: old or new, never a mix
        doc = store.get("accounts", "m1")
        store.close()
        assert doc["check"] == doc["n"] * 3 and doc["payload"] == [doc["n"]] * 300
        assert returned <= doc["n"] <= returned + 1
        last_seen = doc["n"]
    assert last_seen > 50


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_damaged_file_is_refused_with_one_line_and_kept(tmp_path, damage):
    path = str(tmp_path / "state.json")
    s = StateStore(path)
    s.put("accounts", "m1", {"balance_fen": 5000})
    s.put("accounts", "m1", {"balance_fen": 4000})
    s.close()
    raw = open(path, "rb").read()
    if damage == "truncate":
        raw = raw[:len(raw) // 2]
    elif damage == "garble":
        raw = raw.replace(b"4000", b"9999")
    else:
        raw = b""
    open(path, "wb").write(raw)
    with pytest.raises(StateError) as err:
        StateStore(path)
    msg = str(err.value)
    assert "\n" not in msg and path in msg and "previous good copy" in msg
    kept = [n for n in os.listdir(tmp_path) if ".bad-" in n]
    assert kept and open(tmp_path / kept[0], "rb").read() == raw
    # never silently empty: the damaged file is still there, untouched
    assert open(path, "rb").read() == raw


def test_recovery_uses_the_previous_good_copy_and_says_so(tmp_path, caplog):
    path = str(tmp_path / "state.json")
    s = StateStore(path)
    s.put("accounts", "m1", {"balance_fen": 5000})
    s.put("accounts", "m1", {"balance_fen": 4000})
    s.close()
    open(path, "wb").write(b'{"format": 1, "sha256": "00", "length": 3}\nabc')
    s = StateStore(path, recover=True)
    assert s.get("accounts", "m1") == {"balance_fen": 5000}
    assert "recovered the previous good copy" in caplog.text


def test_plain_tinydb_file_is_migrated(tmp_path):
    path = str(tmp_path / "state.json")
    with open(path, "w") as f:
        json.dump({"accounts": {"1": {"_key": "m1", "balance_fen": 1}}}, f)
    s = StateStore(path)
    assert s.get("accounts", "m1") == {"balance_fen": 1}
    s.put("accounts", "m2", {"balance_fen": 2})
    assert open(path, "rb").read().startswith(b'{"format": 1')


def test_newer_format_is_refused(tmp_path):
    path = str(tmp_path / "state.json")
    body = b"{}"
    import hashlib
    header = json.dumps({"format": 99, "sha256": hashlib.sha256(body).hexdigest(),
                         "length": 2}).encode()
    open(path, "wb").write(header + b"\n" + body)
    with pytest.raises(StateError, match="newer"):
        StateStore(path)


# ---------------------------------------------------------------- files that are not ours

@pytest.mark.parametrize("text", [
    '{"status": "failed"}',                                   # any JSON object
    '{"accounts": {"m1": {"balance_fen": 1}}}',               # ids that are not decimal
    '{"accounts": {"1": 5}}',                                 # documents that are not objects
    '["accounts"]',
])
def test_a_json_file_that_is_not_tinydb_is_not_taken_for_state(tmp_path, text):
    path = str(tmp_path / "state.json")
    open(path, "w").write(text)
    with pytest.raises(StateError) as err:
        StateStore(path)
    msg = str(err.value)
    assert "\n" not in msg and path in msg and "not a state file" in msg
    assert open(path).read() == text                          # kept as it was


def test_a_plain_tinydb_file_is_refused_where_the_gateway_wrote_headed_files(tmp_path):
    path = str(tmp_path / "state.json")
    s = StateStore(path)
    s.put("accounts", "m1", {"balance_fen": 5000})
    s.put("ledger", "c1", {"state": "done"})                   # a headed .prev now exists
    s.close()
    with open(path, "w") as f:                                 # someone copies an old file in
        json.dump({"accounts": {"1": {"_key": "m1", "balance_fen": 1}}}, f)
    with pytest.raises(StateError) as err:
        StateStore(path)
    assert "\n" not in str(err.value) and "no header" in str(err.value)


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_a_state_path_that_is_not_a_regular_file_is_one_line_and_never_blocks(tmp_path, kind):
    import threading
    path = str(tmp_path / "state.json")
    target = tmp_path / "elsewhere.json"
    target.write_text('{"_default": {}}')
    if kind == "directory":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(str(target), path)
    out = {}

    def open_it():
        try:
            StateStore(path)
        except Exception as exc:            # noqa: BLE001 - the test looks at what it is
            out["exc"] = exc
    t = threading.Thread(target=open_it, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "opening the state file blocked"
    assert isinstance(out.get("exc"), StateError), out
    assert "\n" not in str(out["exc"]) and path in str(out["exc"])
    assert target.read_text() == '{"_default": {}}'            # a link's target is untouched
    assert not [n for n in os.listdir(tmp_path) if ".bad-" in n]


def _mount_tmpfs(path, size):
    import shutil
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    os.makedirs(path, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", path],
                         capture_output=True)
    if res.returncode:
        pytest.skip("cannot mount tmpfs here: %s" % res.stderr.decode().strip())


def _fill(path):
    """Fill the file system holding path; returns the filler's name."""
    filler = os.path.join(os.path.dirname(path), "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\xa5" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_leaves_memory_equal_to_disk_and_says_disk_full(tmp_path):
    from gateway.store.state import StateDiskFull
    mnt = str(tmp_path / "small")
    _mount_tmpfs(mnt, "1m")
    try:
        path = os.path.join(mnt, "state.json")
        s = StateStore(path)
        s.put("accounts", "m1", {"balance_fen": 5000})
        filler = _fill(path)
        with pytest.raises(StateError) as err:
            s.put("accounts", "m1", {"balance_fen": 4000, "pad": "x" * 200000})
        assert isinstance(err.value, StateDiskFull) and "disk full" in str(err.value)
        assert "\n" not in str(err.value)
        assert s.get("accounts", "m1") == {"balance_fen": 5000}       # memory == disk
        with pytest.raises(StateDiskFull):
            with s.batch():
                s.put("ledger", "c1", {"state": "done", "pad": "y" * 200000})
                s.put("accounts", "m1", {"balance_fen": 3000})
        assert s.get("ledger", "c1") is None and s.get("accounts", "m1")["balance_fen"] == 5000
        assert read_state_file(path) == read_state_file(path)         # readable
        assert not os.path.exists(path + ".tmp")                        # no half file left
        os.unlink(filler)                                               # space is back
        s.put("accounts", "m1", {"balance_fen": 4000})
        s.close()
        assert StateStore(path).get("accounts", "m1") == {"balance_fen": 4000}
    finally:
        subprocess.run(["umount", "-l", mnt])


def test_a_full_disk_write_gives_back_the_reserve_once_and_succeeds(tmp_path):
    from gateway.store.paths import DiskReserve
    mnt = str(tmp_path / "small")
    _mount_tmpfs(mnt, "2m")
    try:
        path = os.path.join(mnt, "state.json")
        reserve = DiskReserve(os.path.join(mnt, ".reserve"), 512 * 1024)
        assert reserve.restore()
        s = StateStore(path, reserve=reserve)
        s.put("accounts", "m1", {"balance_fen": 5000})
        _fill(path)
        s.put("ledger", "c1", {"state": "failed", "reason": "disk full", "pad": "z" * 100000})
        assert not reserve.present
        s.close()
        assert StateStore(path).get("ledger", "c1")["state"] == "failed"
    finally:
        subprocess.run(["umount", "-l", mnt])


def test_indexed_get_put_delete_write_what_tinydb_queries_wrote(tmp_path):
    """get/put/delete find documents through an index, not a query per access: the same
    operations through TinyDB's own upsert/remove by query give the same file, document
    ids included, through batches, rollbacks and a reopen."""
    from tinydb import where

    class QueryStore(StateStore):            # get/put/delete as they were before the index
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

    rng = random.Random(7)
    a = StateStore(str(tmp_path / "a.json"))
    b = QueryStore(str(tmp_path / "b.json"))
    for step in range(600):
        table = rng.choice(["accounts", "txns", "flags"])
        key = "k%d" % rng.randrange(12)
        op = rng.random()
        if op < 0.5:
            doc = {"n": step, rng.choice("xyz"): rng.randrange(3)}
            a.put(table, key, doc)
            b.put(table, key, doc)
        elif op < 0.65:
            a.delete(table, key)
            b.delete(table, key)
        elif op < 0.75:
            for s in (a, b):
                with pytest.raises(RuntimeError):
                    with s.batch():
                        s.put(table, key, {"n": -1})
                        s.delete(table, "k0")
                        raise RuntimeError("rolled back")
        elif op < 0.85:
            for s in (a, b):
                with s.batch():
                    s.put(table, key, {"n": -2})
                    s.delete(table, "k1")
                    s.put(table, "k1", {"n": -3})
        elif op < 0.9:
            a.close()
            b.close()
            a = StateStore(str(tmp_path / "a.json"))
            b = QueryStore(str(tmp_path / "b.json"))
        assert a.get(table, key) == b.get(table, key)
        assert read_state_file(str(tmp_path / "a.json")) == \
            read_state_file(str(tmp_path / "b.json")), step
    assert {t: a.all(t) for t in ("accounts", "txns", "flags")} == {
        t: {d["_key"]: {k: v for k, v in d.items() if k != "_key"}
            for d in b._db.table(t).all()} for t in ("accounts", "txns", "flags")}


def test_many_documents_cost_no_scan_per_access(tmp_path):
    """A cycle touching every one of 2,000 documents stays linear (was a query each)."""
    s = StateStore(str(tmp_path / "state.json"))
    with s.batch():
        for i in range(2000):
            s.put("accounts", "m%d" % i, {"balance_uy": i})
    t0 = time.perf_counter()
    with s.batch():
        for i in range(2000):
            doc = s.get("accounts", "m%d" % i)
            doc["balance_uy"] += 1
            s.put("accounts", "m%d" % i, doc)
    assert time.perf_counter() - t0 < 1.0
    assert s.get("accounts", "m1999") == {"balance_uy": 2000}
