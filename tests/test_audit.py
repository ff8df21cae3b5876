"""The audit trail: a hash chain that survives power cuts, rotates within a bound, costs
little under a flood of unauthenticated input, and is never corrupted by a full disk."""

import errno
import json
import os
import subprocess
import uuid

import pytest

from gateway.store import audit
from gateway.store.audit import AuditTrail, verify


def test_rotation_bounds_the_trail_and_the_chain_goes_on_across_files(tmp_path):
    path = str(tmp_path / "audit.log")
    seen = []
    a = AuditTrail(path, on_entry=seen.append, max_bytes=4096, keep=3)
    for i in range(200):
        a.append("command.result", id="c%d" % i, result={"status": "done"})
    a.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    assert all(os.path.getsize(tmp_path / n) <= 4096 for n in names)
    first_of = {}
    for n in ("audit.log.1", "audit.log"):
        first_of[n] = json.loads(open(tmp_path / n).readline())
    last_of_1 = json.loads(open(tmp_path / "audit.log.1").read().splitlines()[-1])
    assert first_of["audit.log"]["prev"] == last_of_1["hash"]            # chain continues
    count, problem = verify(path, keep=3)
    assert problem is None and 0 < count < 200
    assert len(seen) == 200                     # the head-end was handed every entry
    # reopened: numbering and chain go on
    a = AuditTrail(path, max_bytes=4096, keep=3)
    e = a.append("command.accepted", id="x")
    assert e["n"] == 201 and e["prev"] == seen[-1]["hash"]
    a.close()
    assert verify(path, keep=3)[1] is None


def test_verify_finds_a_missing_or_edited_rotated_file(tmp_path):
    path = str(tmp_path / "audit.log")
    a = AuditTrail(path, max_bytes=2048, keep=8)
    for i in range(60):
        a.append("command.result", id="c%d" % i)
    a.close()
    assert verify(path)[1] is None
    os.unlink(path + ".2")
    n, problem = verify(path)
    assert problem and "audit.log.1 line 1" in problem and "chain broken" in problem
    # an unrotated trail must start at the genesis
    path2 = str(tmp_path / "b" / "audit.log")
    os.makedirs(os.path.dirname(path2))
    lines = open(path).read().splitlines()
    open(path2, "w").write("\n".join(lines[3:]) + "\n")
    assert "chain broken" in verify(path2)[1]


def test_a_torn_last_line_is_dropped_on_open(tmp_path):
    path = str(tmp_path / "audit.log")
    a = AuditTrail(path)
    a.append("command.accepted", id="a")
    good = a.append("command.result", id="a")
    a.close()
    with open(path, "ab") as f:
        f.write(b'{"kind": "command.acc')                 # a power cut mid-append
    a = AuditTrail(path)
    assert (a.n, a.last) == (2, good["hash"])
    a.append("command.accepted", id="b")
    a.close()
    assert verify(path) == (3, None)


def test_a_crash_inside_a_rotation_is_finished_on_open(tmp_path):
    path = str(tmp_path / "audit.log")
    a = AuditTrail(path)
    last = a.append("command.result", id="a")
    a.close()
    os.replace(path, path + ".1")                          # died after the shift
    open(path + ".new", "w").close()
    a = AuditTrail(path)
    assert (a.n, a.last) == (1, last["hash"])
    a.append("command.result", id="b")
    a.close()
    assert verify(path) == (2, None)


class FakeClock:
    def __init__(self, t=1_800_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def test_unauthenticated_input_costs_at_most_2_kb_per_1000_messages(tmp_path):
    path = str(tmp_path / "audit.log")
    clock = FakeClock()
    seen = []
    a = AuditTrail(path, on_entry=seen.append, clock=clock)
    reasons = ["bad signature", "malformed JSON", "unknown key"]
    junk = b'{"v":1,"id":"6f1c","sig":"' + b"\x00\x1b\"\\" * 3000 + b'"}'   # ~12 KB each
    for i in range(6000):                    # 6000 messages over about three minutes
        clock.t += 0.03
        a.unauthenticated(reasons[i % 3], junk + str(i).encode())
    a.flush_unauthenticated(force=True)
    a.close()
    size = os.path.getsize(path)
    assert size <= 2 * 1024 * 6, size
    entries = [json.loads(x) for x in open(path)]
    assert {e["kind"] for e in entries} == {"command.unauthenticated"}
    assert 3 <= len(entries) <= 5 and len(seen) == len(entries)
    assert sum(e["count"] for e in entries) == 6000
    assert sum(e["reasons"]["unknown key"] for e in entries) == 2000
    sample = entries[0]["samples"]["bad signature"][0]
    assert len(sample["sha256"]) == 64 and len(sample["prefix"]) == 64
    assert sample["prefix"].isprintable() and sample["prefix"].isascii()
    assert all(len(s) <= 3 for e in entries for s in e["samples"].values())
    assert verify(path)[1] is None


def test_many_distinct_reasons_stay_bounded(tmp_path):
    path = str(tmp_path / "audit.log")
    clock = FakeClock()
    a = AuditTrail(path, clock=clock)
    for i in range(1000):
        a.unauthenticated("reason %d with attacker text %s" % (i, "x" * 500), b"junk")
    entry = a.flush_unauthenticated(force=True)
    a.close()
    assert len(entry["reasons"]) == audit.UNAUTH_REASONS + 1 and entry["reasons"]["other"]
    assert os.path.getsize(path) <= 4096


def test_a_failed_append_leaves_the_chain_as_it_was(tmp_path, monkeypatch):
    path = str(tmp_path / "audit.log")
    a = AuditTrail(path)
    good = a.append("command.accepted", id="a")
    real_write = os.write

    def half_then_enospc(fd, data):
        if fd == a._fd:
            real_write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError) as err:
        a.append("command.result", id="a", result={"status": "done"})
    assert err.value.errno == errno.ENOSPC
    assert (a.n, a.last) == (1, good["hash"])
    monkeypatch.setattr(os, "write", real_write)
    a.append("command.result", id="a")
    a.close()
    assert verify(path) == (2, None)


def test_a_full_disk_raises_and_the_trail_goes_on_when_space_is_back(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = str(tmp_path / ("small-" + uuid.uuid4().hex[:6]))
    os.makedirs(mnt)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
                         capture_output=True)
    if res.returncode:
        pytest.skip("cannot mount tmpfs here: %s" % res.stderr.decode().strip())
    try:
        path = os.path.join(mnt, "audit.log")
        a = AuditTrail(path)
        a.append("command.accepted", id="a")
        filler = os.path.join(mnt, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\x01" * 4096)
        os.close(fd)
        failed = 0
        for i in range(20):
            try:
                a.append("command.result", id="c%d" % i, pad="p" * 3000)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                failed += 1
        assert failed
        os.unlink(filler)
        a.append("command.result", id="after")
        a.close()
        assert verify(path)[1] is None
    finally:
        subprocess.run(["umount", "-l", mnt])
