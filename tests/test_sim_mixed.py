"""`mgw simulate` with DL/T 645 and DL/T 698.45 meters on one pseudo-terminal (`--meter
PROTOCOL:ADDRESS`), as concentrator lines carry them in the field: a real simulator process,
`mgw scan` finding each kind (and saying the other kind answers too), `mgw read` reading
each."""

import json
import signal

import pytest

from test_cli import run
from test_e2e import mgw


def test_simulate_a_mixed_line_scan_and_read_both_kinds(tmp_path):
    link = str(tmp_path / "ttyMixed")
    sim = mgw("simulate", "--port", link, "--meters", "2", "--meter", "dlt698:1001",
              "--meter", "dlt698:1002", "--baudrate", "9600", "--latency-ms", "5", "--json")
    try:
        info = json.loads("".join(iter(sim.stdout.readline, "}\n")) + "}")
        assert info["line"] == {"dlt645": ["000000000001", "000000000002"],
                                "dlt698": ["000000001001", "000000001002"]}
        cfg = tmp_path / "gw.toml"
        cfg.write_text('[gateway]\nid = "gw-mixed"\ndata_dir = "%s"\n\n[[ports]]\n'
                       'name = "rs485-1"\ndevice = "%s"\nbaudrate = 9600\nretries = 0\n'
                       % (tmp_path / "data", link))
        path = str(cfg)
        # a scan of one protocol says the other answers too (here: two at once, colliding)
        code, out, err = run("scan", "--port", "rs485-1", "--config", path)
        assert code == 0, err
        assert out.splitlines()[-1] == "DL/T 698.45 address (several) answered too (a mixed " \
            "line): scan again with --protocol dlt698", out
        # one scan per protocol on the same line, each adding what it found
        code, out, err = run("scan", "--port", "rs485-1", "--config", path, "--protocol",
                             "dlt645", "--json", "--append", path)
        assert code == 0, err
        assert [f["address"] for f in json.loads(out)["found"]] == ["000000000001",
                                                                    "000000000002"]
        assert json.loads(out)["also_answering"] == {"dlt698": ["(several)"]}
        # the two 698 meters answer the wildcard together: the scan narrows it
        code, out, err = run("scan", "--port", "rs485-1", "--config", path, "--protocol",
                             "dlt698", "--expect", "2", "--json", "--append", path)
        assert code == 0, err
        assert [f["address"] for f in json.loads(out)["found"]] == ["000000001001",
                                                                    "000000001002"]
        assert json.loads(out)["also_answering"] == {}      # --expect: stopped, not probed
        text = cfg.read_text()
        assert text.count('protocol = "dlt698"') == 2 and \
            text.count('protocol = "dlt645"') == 2, text
        code, out, err = run("config", "check", "--config", path)
        assert code == 0, err
        # and each kind reads, with the same quantity names
        for meter in ("m1", "m1002"):
            code, out, err = run("read", "--meter", meter, "--config", path, "--json",
                                 "energy")
            assert code == 0, err
            values = {v["q"]: v["value"] for v in json.loads(out)["values"]}
            assert values["energy.import.total"] > 0, values
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(10)


def test_simulate_says_what_is_on_a_mixed_line(tmp_path):
    link = str(tmp_path / "ttyMixed")
    sim = mgw("simulate", "--port", link, "--meter", "dlt698:7", "--meters-1997", "1",
              "--meters", "1", "--meter", "dlt645:0099", "--meter", "dlt698:8")
    try:
        lines = [sim.stdout.readline() for _ in range(5)]
        assert lines[0].startswith("simulating 2 dlt645 meters at 2400 baud and 2 dlt698 "
                                   "meters and 1 DL/T 645-1997 meter at 1200 baud on %s"
                                   % link), lines
        assert lines[1:4] == ["dlt645 addresses: 000000000001, 000000000099\n",
                              "dlt698 addresses: 000000000007, 000000000008\n",
                              "1997 addresses: 000000000002\n"]
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(10)


def test_simulate_refuses_a_meter_it_cannot_put_on_the_line(tmp_path):
    for args, why in (
            (["--meter", "dlt698:2"], "two meters with address 000000000002 on the line"),
            (["--meter", "dlt698:1001", "--meter", "dlt645:1001"],
             "two meters with address 000000001001"),
            (["--protocol", "modbus", "--meter", "dlt698:5"], "not to a --protocol modbus"),
            (["--meter", "dlt697:5"], "'dlt697:5': PROTOCOL:ADDRESS"),
            (["--meter", "dlt698:1234567890123"], "ADDRESS 1 to 12 digits")):
        code, out, err = run("simulate", "--meters", "2", "--seconds", "0.1", *args)
        assert code == 2 and why in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()[-1]) > 0


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_the_guides_show_what_simulate_prints_for_a_mixed_line(tmp_path, lang):
    from test_commissioning import GUIDES, LANG
    with open(GUIDES[lang], encoding="utf-8") as f:
        guide = f.read()
    command = "mgw simulate --port /tmp/ttyRS485 --meters 2 --meter dlt698:1001 " \
        "--meter dlt698:1002"
    assert command in guide
    link = str(tmp_path / "ttyRS485")
    sim = mgw(*command.replace("/tmp/ttyRS485", link).split()[1:], env=LANG[lang])
    try:
        lines = [sim.stdout.readline() for _ in range(3)]
        pty = lines[0].rsplit("(-> ", 1)[1].rstrip(")\n")
        shown = "".join("  " + line.replace(link, "/tmp/ttyRS485").replace(pty, "/dev/pts/3")
                        for line in lines)
        assert shown in guide, shown
        # and what a scan of its DL/T 645 meters says of the 698 ones
        cfg = tmp_path / "gw.toml"
        cfg.write_text('[gateway]\nid = "gw-mixed"\ndata_dir = "%s"\n\n[[ports]]\n'
                       'name = "rs485-1"\ndevice = "%s"\nretries = 0\n'
                       % (tmp_path / "data", link))
        scan = mgw("scan", "--port", "rs485-1", "--config", str(cfg), env=LANG[lang])
        out, err = scan.communicate(timeout=120)
        assert scan.returncode == 0, err
        assert " " + out.splitlines()[-1] + "\n" in guide or \
            "\n" + out.splitlines()[-1] + "\n" in guide, out
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(10)
