"""A full disk under the data folder: signed commands fail with a reason (never silence),
and succeed again without a restart once there is room."""

import os
import subprocess

import pytest

from gwharness import Harness


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "data"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 4 MB tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % r.stderr.strip())
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder):
    """Fill the file system; returns the filler's path."""
    path = folder / "filler"
    chunk = os.urandom(64 * 1024)
    with open(path, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    try:
        with open(path, "ab") as f:        # the last few bytes
            while True:
                f.write(b"x" * 512)
                f.flush()
    except OSError:
        pass
    return path


def test_commands_on_a_full_disk_fail_with_a_reason_and_recover_without_restart(tmpfs,
                                                                               tmp_path):
    h = Harness(tmp_path, meters=2, data_dir=tmpfs,
                accounts=[{"meter": "m1", "tariff": "flat", "opening_balance": "50.00"}],
                storage={"journal_quota_mb": 1, "reserve_mb": 0.25},
                cost_control={"check_interval_s": 3600}).start()
    try:
        ok = h.command("m1", "topup", {"amount": "1.00", "txn": "BEFORE"})
        h.send(ok)
        assert h.wait_result(ok["id"])["status"] == "done"
        filler = fill(tmpfs)
        for action, params in (("topup", {"amount": "5.00", "txn": "FULL-1"}),
                               ("cut_off", {}), ("topup", {"amount": "5.00", "txn": "FULL-2"})):
            cmd = h.command("m1", action, params)
            h.send(cmd)
            r = h.wait_result(cmd["id"])
            assert r["status"] == "failed" and r["code"] == "storage_full", r
            assert "storage full" in r["reason"]
        assert h.relay_moves() == []
        assert h.gw.accounts.txn("FULL-1") is None
        os.unlink(filler)                                   # room again: no restart
        again = h.command("m1", "topup", {"amount": "5.00", "txn": "AFTER"})
        h.send(again)
        r = h.wait_result(again["id"])
        assert r["status"] == "done", r
        cut = h.command("m2", "cut_off")
        h.send(cut)
        assert h.wait_result(cut["id"])["status"] == "done"
        assert h.gw.reserve.present
    finally:
        h.close()
