"""Files on disk that are not what the gateway wrote: refused in one line, or survived by a
documented recovery, never silently reset. One gateway per data folder. Room kept for a
full disk."""

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from decimal import Decimal

import pytest

from gateway.store.journal import Journal, Reading, open_journal, save_marks
from gateway.store.paths import DiskReserve, InstanceLocked, acquire_lock
from gateway.store.state import StateStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSUMERS = {"uplink": ["readings", "events", "results"]}


def readings(n, start=0):
    return [Reading("m1", "energy.import.total", Decimal(start + i), "kWh", 1, 1)
            for i in range(n)]


def used_journal(data, n_batches=20):
    """A journal with some history and its mark in the state file, as a gateway leaves it."""
    state = StateStore(str(data / "state.json"))
    j = open_journal(str(data / "journal.db"), state, consumers=CONSUMERS)
    for i in range(n_batches):
        j.append_readings(readings(32, 32 * i))
    j.append_event("meter.offline", meter="m1")
    j.append_result({"id": "c1", "status": "done"})
    save_marks(j, state)
    jid, nxt = j.jid, j.next_seqs()
    j.close()
    return state, jid, nxt


def asides(data):
    return sorted(n for n in os.listdir(data) if n.startswith("journal.db.bad-"))


def replaced_event(j):
    first = j.read("uplink", "events", limit=1)[0]
    assert first.body["type"] == "journal.replaced", first
    return first


# ---------------------------------------------------------------- journal damage

@pytest.mark.parametrize("damage", ["not_a_database", "quick_check"])
def test_a_damaged_journal_is_kept_aside_and_numbering_continues_from_the_mark(tmp_path,
                                                                               damage):
    state, jid, nxt = used_journal(tmp_path)
    path = str(tmp_path / "journal.db")
    with open(path, "r+b") as f:
        if damage == "not_a_database":
            f.write(b"this is no SQLite file at all..")
        else:   # a garbled b-tree page deep in the file: it opens, quick_check finds it
            f.seek(os.path.getsize(path) - 3 * 4096 + 100)
            f.write(os.urandom(3000))
    damaged = open(path, "rb").read()
    j = open_journal(path, state, consumers=CONSUMERS)
    kept = asides(tmp_path)
    assert len(kept) == 1 and re.fullmatch(r"journal\.db\.bad-\d{8}T\d{6}", kept[0])
    assert open(tmp_path / kept[0], "rb").read() == damaged        # kept as it was
    assert j.jid != jid and j.created
    # every stream goes on from the mark: nothing the head-end has seen is numbered again
    assert j.append_readings(readings(1)) == (nxt["readings"], nxt["readings"])
    assert j.append_result({"id": "c2"}) == nxt["results"]
    ev = replaced_event(j)
    assert ev.seq == nxt["events"]
    assert ev.body["previous_jid"] == jid and ev.body["aside"] == str(tmp_path / kept[0])
    assert ev.body["floors"] == nxt and ev.body["reason"]
    assert "\n" not in ev.body["reason"]
    assert state.get("journal", "marks")["jid"] == j.jid             # the mark follows
    j.close()
    j = open_journal(path, state, consumers=CONSUMERS)               # and it stays put
    assert asides(tmp_path) == kept and j.jid == state.get("journal", "marks")["jid"]


def test_a_missing_journal_continues_from_the_mark_and_its_stale_wal_goes_aside(tmp_path):
    state, jid, nxt = used_journal(tmp_path)
    path = str(tmp_path / "journal.db")
    os.unlink(path)
    with open(path + "-wal", "wb") as f:          # a stale WAL SQLite would replay
        f.write(b"\x37\x7f\x06\x82" + os.urandom(60))
    j = open_journal(path, state, consumers=CONSUMERS)
    assert j.append_readings(readings(1)) == (nxt["readings"], nxt["readings"])
    ev = replaced_event(j)
    assert ev.body["previous_jid"] == jid and "missing" in ev.body["reason"]
    assert [n for n in os.listdir(tmp_path) if n.endswith("-wal") and ".bad-" in n]


def test_a_first_start_and_an_old_journal_without_marks_are_no_damage(tmp_path):
    state = StateStore(str(tmp_path / "state.json"))
    path = str(tmp_path / "journal.db")
    j = open_journal(path, state, consumers=CONSUMERS)
    assert j.next_seqs() == {"readings": 1, "events": 1, "results": 1, "statements": 1}
    assert j.read("uplink", "events") == []
    j.append_readings(readings(3))
    j.close()
    state.delete("journal", "marks")             # a gateway from before the marks
    j = open_journal(path, state, consumers=CONSUMERS)
    assert j.append_readings(readings(1)) == (4, 4) and not asides(tmp_path)
    assert j.read("uplink", "events") == []


def test_a_journal_path_that_is_a_folder_is_kept_aside(tmp_path):
    state, jid, nxt = used_journal(tmp_path)
    path = str(tmp_path / "journal.db")
    os.unlink(path)
    os.mkdir(path)
    j = open_journal(path, state, consumers=CONSUMERS)
    assert os.path.isdir(tmp_path / asides(tmp_path)[0])
    assert j.append_readings(readings(1))[0] == nxt["readings"]


# ---------------------------------------------------------------- one gateway per folder

def test_a_second_lock_on_a_data_folder_names_the_holder(tmp_path):
    lock = acquire_lock(str(tmp_path))
    with pytest.raises(InstanceLocked) as err:
        acquire_lock(str(tmp_path))
    assert err.value.pid == os.getpid() and str(os.getpid()) in str(err.value)
    assert "\n" not in str(err.value)
    lock.release()
    acquire_lock(str(tmp_path)).release()          # free again once released


def test_a_lock_file_that_is_a_symlink_is_refused(tmp_path):
    from gateway.store.state import StateError
    target = tmp_path / "victim"
    target.write_text("keep me")
    os.symlink(str(target), str(tmp_path / ".lock"))
    with pytest.raises(StateError, match="symbolic link"):
        acquire_lock(str(tmp_path))
    assert target.read_text() == "keep me"


# ---------------------------------------------------------------- `mgw run` as a process

def write_config(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("\n".join([
        '[gateway]', 'id = "gw-test"', 'data_dir = "%s"' % (tmp_path / "data"),
        'status_interval_s = 1', '',
        '[[ports]]', 'name = "rs485-1"', 'device = "%s"' % (tmp_path / "no-port"), '',
        '[[meters]]', 'id = "m1"', 'port = "rs485-1"', 'address = "000000000001"', '',
        '[control]', 'require_synced_clock = false', '']))
    return str(cfg)


def mgw(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "gateway"] + list(args), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_started(tmp_path, proc, timeout=30):
    status = tmp_path / "data" / "status.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if status.exists():
            return
        time.sleep(0.1)
    raise AssertionError("the gateway did not start")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_a_second_mgw_run_on_one_data_folder_exits_2_naming_the_pid(tmp_path):
    cfg = write_config(tmp_path)
    first = mgw("run", "--config", cfg)
    try:
        wait_started(tmp_path, first)
        second = mgw("run", "--config", cfg)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "pid %d" % first.pid in err
        # the second one wrote nothing into the first one's journal
        j = Journal(str(tmp_path / "data" / "journal.db"), consumers={"t": ["events"]})
        types = [e.body["type"] for e in j.read("t", "events", limit=100)]
        j.close()
        assert types.count("gateway.started") == 1 and "gateway.stopped" not in types
    finally:
        stop(first)


@pytest.mark.parametrize("content", ['{"status":"failed"}', "directory"])
def test_mgw_run_refuses_a_state_file_that_is_not_its_own_with_exit_2(tmp_path, content):
    cfg = write_config(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    if content == "directory":
        (data / "state.json").mkdir()
    else:
        (data / "state.json").write_text(content)
    p = mgw("run", "--config", cfg)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "state.json" in err


def test_mgw_run_survives_a_garbled_journal_and_numbers_on(tmp_path):
    cfg = write_config(tmp_path)
    p = mgw("run", "--config", cfg)
    wait_started(tmp_path, p)
    stop(p)
    data = tmp_path / "data"
    state = StateStore(str(data / "state.json"))
    marks = state.get("journal", "marks")
    state.close()
    assert marks["next_seq"]["events"] > 1                 # started/stopped were numbered
    with open(data / "journal.db", "r+b") as f:
        f.write(b"garbage" * 20)
    (data / "status.json").unlink()
    p = mgw("run", "--config", cfg)
    wait_started(tmp_path, p)
    err = stop(p)
    assert "kept aside" in err and "Traceback" not in err
    assert asides(data)
    j = Journal(str(data / "journal.db"), consumers={"t": ["events"]})
    first = j.read("t", "events", limit=1)[0]
    assert first.body["type"] == "journal.replaced" and first.seq == marks["next_seq"]["events"]
    assert j.jid != marks["jid"]
    j.close()


# ---------------------------------------------------------------- disk reserve

def test_the_disk_reserve_takes_real_room_gives_it_back_and_comes_back(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = str(tmp_path / ("small-" + uuid.uuid4().hex[:6]))
    os.makedirs(mnt)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt],
                         capture_output=True)
    if res.returncode:
        pytest.skip("cannot mount tmpfs here: %s" % res.stderr.decode().strip())
    try:
        reserve = DiskReserve(os.path.join(mnt, ".reserve"), 2 * 1024 * 1024)
        free0 = _free(mnt)
        assert reserve.restore() and reserve.present
        st = os.stat(reserve.path)
        assert st.st_blocks * 512 >= 2 * 1024 * 1024           # not sparse
        assert free0 - _free(mnt) >= 2 * 1024 * 1024
        filler = os.path.join(mnt, "filler")
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\x01" * 65536)
        assert reserve.release() and not reserve.present
        os.write(fd, b"\x01" * 65536)                          # room again
        os.close(fd)
        assert not reserve.restore()                           # no room for it yet
        assert not os.path.exists(reserve.path + ".tmp")       # and nothing half-made
        os.unlink(filler)
        assert reserve.restore() and reserve.present
        assert reserve.release() and not reserve.release()     # once: nothing left to give
    finally:
        subprocess.run(["umount", "-l", mnt])


def _free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
