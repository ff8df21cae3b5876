"""End to end with real processes: Mosquitto, `mgw simulate` and `mgw run`."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from mqtt_helpers import HeadEnd, unique_seqs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mgw(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "gateway"] + list(args), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


class Simulator:
    def __init__(self, tmp_path, meters=4, baud=19200):
        self.link = str(tmp_path / "ttyRS485-sim")
        self.proc = mgw("simulate", "--port", self.link, "--meters", str(meters),
                        "--baudrate", str(baud), "--latency-ms", "5")
        self.lines = []
        first = self.proc.stdout.readline()
        assert first.startswith("simulating"), first + self.proc.stderr.read()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def relays(self):
        return [line for line in self.lines if line.startswith("relay ")]

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)


def write_config(tmp_path, device, broker, pub, meters=4, data="data"):
    cfg = tmp_path / "gateway.toml"
    lines = ['[gateway]', 'id = "gw-test"', 'data_dir = "%s"' % (tmp_path / data),
             'status_interval_s = 1', '',
             '[[ports]]', 'name = "rs485-1"', 'device = "%s"' % device, 'baudrate = 19200',
             '']
    for i in range(meters):
        lines += ['[[meters]]', 'id = "m%d"' % (i + 1), 'port = "rs485-1"',
                  'address = "%012d"' % (i + 1), 'interval_s = 10', 'instant_interval_s = 0',
                  'clock_interval_s = 0', '']
    lines += ['[uplink]', 'host = "%s"' % broker.host, 'port = %d' % broker.port,
              'batch_age_s = 0.2', '',
              '[control]', 'public_keys = ["%s"]' % pub, 'require_synced_clock = false', '']
    cfg.write_text("\n".join(lines))
    return str(cfg)


class NotifySocket:
    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []
        self._stop = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return


def keys(tmp_path):
    out = tmp_path / "keys"
    p = mgw("keys", "gen", "--out", str(out), "--json")
    o, e = p.communicate(timeout=30)
    assert p.returncode == 0, e
    info = json.loads(o)
    return info["private_key"], info["public_key"]


def sign(key, meter, action, *params):
    args = ["command", "sign", "--key", key, "--meter", meter, "--action", action]
    for prm in params:
        args += ["--param", prm]
    p = mgw(*args)
    o, e = p.communicate(timeout=30)
    assert p.returncode == 0, e
    return o.strip()


def test_the_service_end_to_end(tmp_path, broker):
    priv, pub = keys(tmp_path)
    sim = Simulator(tmp_path)
    cfg = write_config(tmp_path, sim.link, broker, pub)
    notify = NotifySocket(tmp_path)
    head = HeadEnd(broker)
    env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
    try:
        gw = mgw("run", "--config", cfg, env=env)
        head.wait(lambda: {r["meter"] for r in head.readings()} >= {"m1", "m2", "m3", "m4"},
                  timeout=30)
        # a signed cut-off through the broker moves the simulated relay once
        cmd = sign(priv, "m2", "cut_off")
        head.publish("commands", cmd)
        cid = json.loads(cmd)["id"]
        head.wait(lambda: any(r.get("id") == cid and r["status"] == "done"
                              for r in head.topic("command-results")))
        done = [r for r in head.topic("command-results") if r.get("id") == cid
                and r["status"] == "done"][0]
        assert done["relay"] == "open"
        head.wait(lambda: sim.relays() == ["relay 000000000002 open TRIP"])
        # status and buffer from the technician's side while it runs
        st = mgw("status", "--config", cfg, "--json")
        out, err = st.communicate(timeout=30)
        assert st.returncode == 0, err
        status = json.loads(out)
        assert status["running"] and len(status["meters"]) == 4
        # SIGKILL, restart: nothing lost
        seen = len(unique_seqs(head.readings()))
        gw.send_signal(signal.SIGKILL)
        gw.wait(10)
        gw = mgw("run", "--config", cfg, env=env)
        time.sleep(0.5)
        sim_relays_before = list(sim.relays())
        trigger = sign(priv, "m1", "read", "quantities=energy.import.total")
        head.publish("commands", trigger)
        tid = json.loads(trigger)["id"]
        head.wait(lambda: any(r.get("id") == tid and r["status"] == "done"
                              for r in head.topic("command-results")), timeout=30)
        head.wait(lambda: len(unique_seqs(head.readings())) > seen, timeout=30)
        # SIGTERM: a clean stop within 5 seconds
        t0 = time.time()
        gw.send_signal(signal.SIGTERM)
        gw.wait(10)
        assert gw.returncode == 0 and time.time() - t0 < 5, gw.stderr.read()[-2000:]
        assert "Traceback" not in gw.stderr.read()
        seqs = sorted(unique_seqs(head.readings()))
        assert seqs == list(range(1, seqs[-1] + 1))          # no gap across the kill
        assert sim.relays() == sim_relays_before              # the cut-off was not repeated
        msgs = notify.messages
        assert msgs[0].startswith("READY=1")
        assert any(m == "WATCHDOG=1" for m in msgs)
        assert any(m.startswith("STATUS=") for m in msgs)
        assert msgs[-1] == "STOPPING=1" or "STOPPING=1" in msgs[-3:]
        head.wait(lambda: head.topic("status")[-1]["state"] == "offline")
    finally:
        head.close()
        sim.stop()


def test_a_broken_config_exits_2_with_the_key_named(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[gateway]\nid = "gw 1"\n[[ports]]\nname = "p"\ndevice = "/dev/x"\n'
                   'baudrate = 1234\n[[meters]]\nid = "m1"\nport = "q"\naddress = "12AB"\n')
    p = mgw("run", "--config", str(cfg))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2
    assert "Traceback" not in err
    for key in ("gateway.id", "ports[0].baudrate", "meters[0].port", "meters[0].address"):
        assert key in err, err
    assert all(line.startswith(str(cfg)) for line in err.strip().splitlines())
    p = mgw("config", "check", "--config", str(tmp_path / "missing.toml"))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "no such file" in err and "Traceback" not in err
    bad = tmp_path / "syntax.toml"
    bad.write_text("[gateway\nid=1")
    p = mgw("config", "check", "--config", str(bad))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "not valid TOML" in err and len(err.strip().splitlines()) == 1


def test_a_damaged_state_file_refuses_to_start(tmp_path, broker):
    priv, pub = keys(tmp_path)
    cfg = write_config(tmp_path, "/dev/null-port", broker, pub, meters=1)
    data = tmp_path / "data"
    data.mkdir()
    (data / "state.json").write_text('{"format": 1, "sha256": "00", "length": 2}\n{}')
    p = mgw("run", "--config", cfg)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "checksum mismatch" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_lost_account_store_refuses_to_start_instead_of_empty_balances(tmp_path, broker):
    """The real `mgw run`: once accounts.db exists, a start without it (deleted, a restore
    that forgot it) exits 2 in one line and creates nothing in its place."""
    priv, pub = keys(tmp_path)
    cfg = write_config(tmp_path, "/dev/null-port", broker, pub, meters=1)
    data = tmp_path / "data"
    data.mkdir()
    p = mgw("run", "--config", cfg)
    # started: the state file holds the store's id (status.json is written after that)
    deadline = time.time() + 30
    while not (data / "status.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    p.terminate()
    p.communicate(timeout=30)
    assert (data / "accounts.db").exists()
    for sfx in ("", "-wal", "-shm"):
        if (data / ("accounts.db" + sfx)).exists():
            (data / ("accounts.db" + sfx)).unlink()
    p = mgw("run", "--config", cfg)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "missing although the state file says" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (data / "accounts.db").exists()


def test_systemd_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    unit = open(os.path.join(ROOT, "systemd", "meter-gateway.service")).read()
    fake = tmp_path / "mgw"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    path = tmp_path / "meter-gateway.service"
    path.write_text(unit.replace("/usr/local/bin/mgw", str(fake)))
    p = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                       text=True, timeout=60)
    problems = [line for line in (p.stdout + p.stderr).splitlines()
                if "meter-gateway.service" in line]
    assert p.returncode == 0 and not problems, p.stdout + p.stderr
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=",
                "ConfigurationDirectory=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                "ProtectHome=yes", "PrivateTmp=yes", "DevicePolicy=closed",
                "SupplementaryGroups=dialout"):
        assert key in unit
