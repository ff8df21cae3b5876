"""The TinyDB state store: atomic writes, kill safety, corrupt files refused or recovered."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from gateway.state import StateError, StateStore, read_state_file

CHILD = r"""
import sys
from gateway.state import StateStore
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
