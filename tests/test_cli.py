"""The technician's command line against simulated meters: real processes, real exit codes."""

import json
import re
import time
import os
import signal
import subprocess
import sys

import pytest

from test_e2e import ROOT, Simulator, mgw


def config(tmp_path, device, meters=4, extra=""):
    lines = ['[gateway]', 'id = "gw-cli"', 'data_dir = "%s"' % (tmp_path / "data"), '',
             '[[ports]]', 'name = "rs485-1"', 'device = "%s"' % device, 'baudrate = 19200',
             'retries = 1', '']
    for i in range(meters):
        lines += ['[[meters]]', 'id = "m%d"' % (i + 1), 'port = "rs485-1"',
                  'address = "%012d"' % (i + 1), '']
    path = tmp_path / "gw.toml"
    path.write_text("\n".join(lines) + extra)
    return str(path)


def run(*args, timeout=120):
    p = mgw(*args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture
def sim(tmp_path):
    s = Simulator(tmp_path)
    yield s
    s.stop()


def test_config_check_ok_and_json(tmp_path, sim):
    code, out, err = run("config", "check", "--config", config(tmp_path, sim.link), "--json")
    assert code == 0, err
    assert json.loads(out)["meters"] == 4


def test_read_a_meter_now(tmp_path, sim):
    cfg = config(tmp_path, sim.link)
    code, out, err = run("read", "--meter", "m3", "--config", cfg, "--json")
    assert code == 0, err
    values = {v["q"]: v["value"] for v in json.loads(out)["values"]}
    assert values["energy.import.total"] > 0 and "voltage.a" in values
    assert values["relay.state"] == "closed"
    code, out, err = run("read", "--meter", "m3", "--config", cfg, "energy.import.t2")
    assert code == 0 and "energy.import.t2" in out and "kWh" in out
    code, out, err = run("read", "--meter", "m3", "--config", cfg, "no.such")
    assert code == 2 and "unknown quantity" in err and "Traceback" not in err
    code, out, err = run("read", "--meter", "m9", "--config", cfg)
    assert code == 2 and "no meter 'm9'" in err


def test_read_a_silent_meter_fails_with_one_line(tmp_path, sim):
    path = tmp_path / "gw.toml"
    cfg = config(tmp_path, sim.link, meters=4)
    text = path.read_text().replace('address = "000000000004"', 'address = "000000000099"')
    path.write_text(text)
    code, out, err = run("read", "--meter", "m4", "--config", cfg, "energy")
    assert code == 1 and "did not answer" in err and "Traceback" not in err


def test_port_errors_are_one_line(tmp_path, sim):
    cfg = config(tmp_path, "/dev/ttyNOPE")
    code, out, err = run("read", "--meter", "m1", "--config", cfg)
    assert code == 1
    assert err.strip() == "mgw read: port rs485-1: /dev/ttyNOPE does not exist"
    # the line is busy: another process holds it
    import serial
    holder = serial.Serial(os.path.realpath(sim.link), 19200, exclusive=True)
    try:
        code, out, err = run("read", "--meter", "m1", "--config", config(tmp_path, sim.link))
        assert code == 1 and "in use by another process" in err
    finally:
        holder.close()


def test_scan_finds_every_meter_by_wildcard_search(tmp_path, sim):
    cfg = config(tmp_path, sim.link, meters=2)
    code, out, err = run("scan", "--port", "rs485-1", "--config", cfg, "--json", timeout=300)
    assert code == 0, err
    found = json.loads(out)["found"]
    assert [f["address"] for f in found] == ["%012d" % i for i in range(1, 5)]
    assert [f["configured_as"] for f in found] == ["m1", "m2", None, None]


def test_keys_and_signed_commands_verify(tmp_path):
    code, out, err = run("keys", "gen", "--out", str(tmp_path / "k"), "--json")
    assert code == 0
    info = json.loads(out)
    assert oct(os.stat(info["private_key"]).st_mode & 0o777) == "0o600"
    code, out, err = run("keys", "gen", "--out", str(tmp_path / "k"))
    assert code == 1 and "refusing to overwrite" in err
    code, out, err = run("command", "sign", "--key", info["private_key"], "--meter", "m1",
                         "--action", "topup", "--param", "amount=50.00", "--param", "txn=T7")
    assert code == 0
    cmd = json.loads(out)
    assert cmd["params"] == {"amount": "50.00", "txn": "T7"} and cmd["v"] == 1
    sys.path.insert(0, ROOT)
    from gateway.control.signing import load_public_key, verify
    assert verify(cmd, [load_public_key(info["public_key"])]) is None
    cmd["params"]["amount"] = "5000.00"
    assert verify(cmd, [load_public_key(info["public_key"])]) == "bad signature"


def test_status_and_buffer_without_a_service(tmp_path):
    cfg = config(tmp_path, "/dev/null")
    code, out, err = run("status", "--config", cfg)
    assert code == 3 and "has not run" in err            # CONTRACT.md: 3, not running
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "status.json").write_text('{"v":1,"gateway":"gw-test","stopped":true,'
                                      '"written_at":%f}' % time.time())
    code, out, err = run("status", "--config", cfg)
    assert code == 3 and "NOT RUNNING" in out
    code, out, err = run("buffer", "--config", cfg)
    assert code == 1 and "no journal yet" in err


def test_help_for_every_command():
    for cmd in ("run", "demo", "simulate", "config", "scan", "read", "relay", "status",
                "buffer", "keys", "command"):
        code, out, err = run(cmd, "--help")
        assert code == 0 and "--config" in out and "--json" in out


def test_relay_by_a_technician_goes_through_the_service_and_is_audited(tmp_path, sim):
    cfg = config(tmp_path, sim.link, extra='\n[control]\nrequire_synced_clock = false\n')
    gw = mgw("run", "--config", cfg)
    try:
        import time
        end = time.time() + 20
        while time.time() < end and not os.path.exists(tmp_path / "data" / "status.json"):
            time.sleep(0.1)
        code, out, err = run("relay", "--meter", "m1", "cut-off", "--config", cfg)
        assert code == 0, err
        assert out.strip() == "meter m1: relay open"
        code, out, err = run("relay", "--meter", "m1", "status", "--config", cfg, "--json")
        assert code == 0 and json.loads(out)["relay"] == "open"
        code, out, err = run("relay", "--meter", "m1", "restore", "--config", cfg)
        assert code == 0 and "relay closed" in out
        assert [l for l in sim.relays() if "000000000001" in l] == [
            "relay 000000000001 open TRIP", "relay 000000000001 closed CLOSE_ALLOWED"]
        audit = (tmp_path / "data" / "audit.log").read_text()
        assert '"source": "local"' in audit and "uid" in audit
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(10)
    code, out, err = run("relay", "--meter", "m1", "status", "--config", cfg)
    assert code == 1 and "not running" in err


def test_bash_completion_is_valid_and_knows_the_commands(tmp_path):
    code, out, err = run("completion", "bash")
    assert code == 0 and "complete -F _mgw mgw" in out
    script = tmp_path / "c.sh"
    script.write_text(out)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for word in ("scan", "relay", "cut-off", "--meter", "--protocol"):
        assert word in out


BROKEN = [
    '[gateway]\nid = 5\n',
    'gateway = 3\n',
    '[gateway]\nid = "g"\nports = 1\n',
    '[gateway]\nid = "g"\n[[ports]]\nname = 1\ndevice = []\n',
    '[gateway]\nid = "g"\n[[meters]]\nid = "m"\nport = "x"\naddress = 12\n',
    '[gateway]\nid = "g"\nmeters = ["a"]\n',
    '[gateway]\nid = "g"\n[uplink]\nport = "1883"\ntls_cert = "/nope"\n',
    '[gateway]\nid = "g"\n[control]\npublic_keys = "k.pub"\n',
    '[gateway]\nid = "g"\n[tariffs.t]\nkind = "tou"\nprices = {peak = 1}\n',
    '[gateway]\nid = "g"\n[tariffs.t]\nkind = "tiered"\nprice = "0.5"\nladder = [{upto_kwh = "x"}]\n',
    '[gateway]\nid = "g"\n[[accounts]]\nmeter = 3\nopening_balance = 1.5\n',
    '[gateway]\nid = "g"\naccounts = 7\ntariffs = 2\ncost_control = "x"\n',
    '[gateway]\nid = "g"\n[cost_control]\nprotected_hours = ["25:00-26:00"]\n',
]


@pytest.mark.parametrize("text", BROKEN)
def test_broken_configs_are_one_line_per_problem_never_a_traceback(tmp_path, capsys, text):
    sys.path.insert(0, ROOT)
    from gateway.cli.main import main
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code = main(["config", "check", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() and all(line.startswith(str(path)) for line in err.strip().splitlines())


# ---------------------------------------------------------------- issue 14: the technician's hour

def test_a_silent_meter_is_reported_after_one_timeout_with_the_hint(tmp_path, sim):
    path = tmp_path / "gw.toml"
    cfg = config(tmp_path, sim.link, meters=4)
    path.write_text(path.read_text().replace('address = "000000000004"',
                                             'address = "000000000099"'))
    t = time.monotonic()
    code, out, err = run("read", "--meter", "m4", "--config", cfg)   # every group asked
    elapsed = time.monotonic() - t
    assert code == 1 and out == ""
    assert err == ("mgw read: meter m4 (address 000000000099 on rs485-1, 19200 8E1) did not "
                   "answer: check the address, the A/B wiring, the baud rate and the "
                   "parity\n")
    assert elapsed < 4.0, elapsed            # one quantity's timeout, not every group's


def test_read_tells_a_meter_without_the_value_from_a_silent_one(tmp_path, sim):
    cfg = config(tmp_path, sim.link)
    code, out, err = run("read", "--meter", "m1", "--config", cfg, "04000B01")
    assert code == 1 and "did not answer" not in err
    assert "meter says no_data" in err and "answered but has none" in err


def test_read_json_keeps_the_meters_precision_and_a_bare_0001_is_no_di(tmp_path, sim):
    cfg = config(tmp_path, sim.link)
    code, out, err = run("read", "--meter", "m1", "--config", cfg, "--json", "energy",
                         "frequency")
    assert code == 0, err
    # XXXXXX.XX and XX.XX as the meter sent them: 50.00 Hz is not 50.0
    assert '"value": 50.00,' in out
    energy = [line for line in out.splitlines() if '"value"' in line][0]
    assert re.search(r'"value": \d+\.\d\d,$', energy), energy
    code, out, err = run("read", "--meter", "m1", "--config", cfg, "0001")
    assert code == 2 and "'0001' is not a data identifier" in err and "00010000" in err
    code, out, err = run("read", "--meter", "m1", "--config", cfg, "0x00010000")
    assert code == 0 and "energy.import.total" in out


# the commissioning walk-through, in English and Chinese: tests/test_commissioning.py


def test_the_simulator_practises_the_customers_button(tmp_path):
    import datetime as dt
    import serial
    from protocols import dlt645 as D
    from protocols.framing import Scanner
    link = str(tmp_path / "tty")
    sim = mgw("simulate", "--port", link, "--meters", "1", "--latency-ms", "5",
              "--baudrate", "19200", "--button", stdin=subprocess.PIPE)
    lines = []
    try:
        while not lines or not lines[-1].startswith("stop with"):
            line = sim.stdout.readline()
            assert line, "mgw simulate ended: %s" % sim.stderr.read()
            lines.append(line.strip())
        assert any("type `press ADDRESS`" in line for line in lines), lines
        port = serial.Serial(os.path.realpath(link), 19200, timeout=2)

        def send(command):
            port.write(D.relay_control("000000000001", command, password_level=2,
                                       password="000000", operator_code="00000000",
                                       valid_until=dt.datetime.now() + dt.timedelta(
                                           minutes=5)))
            frames = Scanner().feed(port.read(12 + 4))
            assert D.decode(D.frame_from_scanner(frames[0])).__class__ is D.Ack
        send(D.RelayCommand.TRIP)
        assert sim.stdout.readline().strip() == "relay 000000000001 open TRIP"
        send(D.RelayCommand.CLOSE_ALLOWED)
        assert sim.stdout.readline().strip() == \
            "relay 000000000001 awaiting_customer CLOSE_ALLOWED"
        sim.stdin.write("press 1\n")
        sim.stdin.flush()
        assert sim.stdout.readline().strip() == "relay 000000000001 closed CLOSE_ALLOWED"
        port.close()
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(10)


def test_config_check_hints_warnings_and_json_errors(tmp_path):
    cfg = config(tmp_path, str(tmp_path / "ttyUSB7"), meters=1)
    code, out, err = run("config", "check", "--config", cfg)
    assert code == 0, err
    assert out.splitlines()[1:] == [
        "warning: %s: ports[0].device: %s does not exist (yet?): port rs485-1 cannot open "
        "until it does" % (cfg, tmp_path / "ttyUSB7"),
        "warning: %s: control.public_keys: no head-end key: every signed command (relay, "
        "top-up, read) will be rejected" % cfg]
    with open(cfg, "a") as f:
        f.write('baud = 1200\n')
    code, out, err = run("config", "check", "--config", cfg)
    # the line the key is on (line 15: the file's last line), as a compiler says it
    assert code == 2 and err == "%s:15: meters[0].baud: unknown key (did you mean " \
        "'baudrate'?)\n" % cfg
    code, out, err = run("config", "check", "--config", cfg, "--json")
    assert code == 2 and json.loads(out) == {
        "config": cfg, "ok": False,
        "errors": ["%s:15: meters[0].baud: unknown key (did you mean 'baudrate'?)" % cfg]}


def test_status_says_not_running_first_and_names_a_dead_port_and_the_clock(tmp_path):
    cfg = config(tmp_path, "/dev/null", meters=1)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    port = {"port": "rs485-1", "device": "/dev/ttyUSB7", "open": False,
            "last_error": "port rs485-1: /dev/ttyUSB7 does not exist", "requests": 0,
            "answers": 0, "timeouts": 0, "checksum_errors": 0, "utilisation": 0.0}
    meter = {"id": "m1", "port": "rs485-1", "online": True}
    (data / "status.json").write_text(json.dumps({
        "v": 1, "gateway": "gw-cli", "stopped": True, "written_at": time.time(),
        "clock_trusted": False, "ports": [port], "meters": [meter]}))
    code, out, err = run("status", "--config", cfg)
    assert code == 3
    lines = out.splitlines()
    assert lines[0].startswith("NOT RUNNING: the service is not running")
    assert any(line.startswith("warning: the gateway clock is not synchronised") and
               "NTP" in line and "require_synced_clock = false" in line for line in lines)
    assert "error: port rs485-1: /dev/ttyUSB7 does not exist" in lines
    assert any(line.split()[:3] == ["rs485-1", "/dev/ttyUSB7", "ERROR"] for line in lines)
    assert any(line.split()[:3] == ["m1", "rs485-1", "unknown"] for line in lines)


def test_run_and_demo_reject_json_in_one_line():
    for cmd in ("run", "demo"):
        code, out, err = run(cmd, "--json", "--config", "/nonexistent.toml")
        assert code == 2 and err == "mgw %s: --json is not for `mgw %s` (it logs; use " \
            "`mgw status --json` for its state)\n" % (cmd, cmd)


def test_a_dlt645_scan_of_a_modbus_line_says_modbus_answered(tmp_path):
    link = str(tmp_path / "ttyMB")
    sim = mgw("simulate", "--port", link, "--meters", "1", "--protocol", "modbus",
              "--profile", "chint-ddsu666", "--baudrate", "19200", "--latency-ms", "5")
    try:
        assert sim.stdout.readline().startswith("simulating")
        cfg = config(tmp_path, link, meters=0)
        code, out, err = run("scan", "--port", "rs485-1", "--config", cfg)
        assert code == 1
        assert out == ("no meters found at 19200 8E1\nno DL/T 645 meter answered, but Modbus "
                       "unit 1 did: scan with --protocol modbus\n")
        code, out, err = run("scan", "--port", "rs485-1", "--config", cfg, "--protocol",
                             "modbus", "--last", "2", "--toml")
        assert code == 0 and out == ('[[meters]]\nid = "u1"\nport = "rs485-1"\n'
                                     'protocol = "modbus"\nunit = 1\n'
                                     'profile = "chint-ddsu666"\n')
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(10)


def test_status_speaks_rfc3339_and_keeps_each_map_one_kind(tmp_path):
    """status.json keeps Unix seconds and mixes totals and flags into its maps; `mgw status`
    shows one time format and maps of one kind of thing, in text and JSON."""
    cfg = config(tmp_path, "/dev/null", meters=2)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    now = time.time()
    port = {"port": "rs485-1", "device": "/dev/null", "open": True, "last_error": None,
            "requests": 10, "answers": 9, "timeouts": 1, "checksum_errors": 0,
            "utilisation": 0.1}
    meters = [{"id": "m1", "port": "rs485-1", "online": True, "missed_slots": 0,
               "caught_up": 2},
              {"id": "m2", "port": "rs485-1", "online": False, "missed_slots": 3,
               "caught_up": 0}]
    (data / "status.json").write_text(json.dumps({
        "v": 1, "gateway": "gw-cli", "version": "0.1.0", "stopped": False,
        "started_at": now - 3600.5, "written_at": now, "clock_trusted": True,
        "ports": [port], "meters": meters,
        "buffer": {"readings": 12, "events": 2, "results": 0, "bytes": 40960,
                   "dropped": {"readings": 0, "events": 0, "results": 0}},
        "accounts": {"m1": {"balance": "12.50", "state": "normal"},
                     "_breaker_tripped": True}}))
    rfc3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")
    code, out, err = run("status", "--config", cfg, "--json")
    assert code == 0, err
    s = json.loads(out)
    assert rfc3339.match(s["started_at"]) and rfc3339.match(s["written_at"]), s
    assert s["buffer"] == {"unsent": {"readings": 12, "events": 2, "results": 0},
                           "bytes": 40960,
                           "dropped": {"readings": 0, "events": 0, "results": 0}}
    assert s["accounts"] == {"m1": {"balance": "12.50", "state": "normal"}}
    assert s["breaker_tripped"] is True
    code, out, err = run("status", "--config", cfg)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("gateway gw-cli 0.1.0, running since ") and \
        rfc3339.match(first.split(" since ")[1].split(" (")[0]), first
    assert "buffer: 12 unsent readings, 2 unsent events" in out
    assert any(line.startswith("warning: cost control's breaker is tripped")
               for line in out.splitlines())
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:2] in
            ("m1", "m2")}
    assert rows["m2"][-2:] == ["0", "3"] and rows["m1"][-2:] == ["2", "0"]  # 补抄, missed
    assert "caught up" in out and "missed" in out


def test_small_ones_from_the_trial():
    code, out, err = run("--help")
    assert code == 0 and re.search(r"frame parser: (compiled|python)", out)
    code, out, err = run("config", "--help")
    assert out.startswith("usage: mgw config check ")
    code, out, err = run("relay", "--help")
    assert re.search(r"--operator OPERATOR\s+who operates the relay", out), out
    code, out, err = run("command", "sign", "--key", "/nonexistent", "--meter", "m1",
                         "--action", "read", "--valid", "0")
    assert code == 2 and "--valid: must be above 0" in err
    code, out, err = run("config")
    assert code == 2 and "usage: mgw config check" in err


def test_config_problems_name_their_line():
    """Tables, arrays of tables, quoted keys and named tables: each problem points at the
    line its key is set on (tomllib keeps no positions; the text is read for them)."""
    sys.path.insert(0, ROOT)
    from gateway.config import ConfigError, tomllib
    from gateway.service.config import SCHEMA
    text = ('[gateway]\nid = "g"\nbogus = 1\n\n'
            '[[ports]]\nname = "a"\ndevice = "/dev/x"\nbaudrate = 1234\n\n'
            '[[ports]]\nname = "b"\n"device" = "/dev/y"\nparity = "X"\n\n'
            '# a comment\n[tariffs.t]\nkind = "flat"\nprice = "abc"\n')
    with pytest.raises(ConfigError) as exc:
        SCHEMA.validate(tomllib.loads(text), "f.toml", source=text)
    assert [p.split(": ")[0] for p in exc.value.problems] == [
        "f.toml:3", "f.toml:8", "f.toml:13", "f.toml:18"]
    # without the text (a document built in code), no line numbers
    with pytest.raises(ConfigError) as exc:
        SCHEMA.validate(tomllib.loads(text), "f.toml")
    assert exc.value.problems[0] == "f.toml: gateway.bogus: unknown key"
