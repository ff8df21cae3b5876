"""The technician's hour on site, as a technician goes through it, in English and in Chinese:
`mgw simulate` (a DL/T 645 line with 2007 meters at 2400 baud and a 1997 meter at 1200, and a
Modbus line), `scan --auto --toml`, `config check`, `read`, `mgw run`, `status`, `relay`.
The commissioning guide of each language quotes what the commands print, and this test
holds it to that, byte for byte (the configuration file's path aside)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_e2e import ROOT, mgw

GUIDES = {"en": os.path.join(ROOT, "docs", "commissioning.md"),
          "zh": os.path.join(ROOT, "docs", "zh", "commissioning.md")}
# LANGUAGE and LC_ALL would win over LANG: cleared, as on a technician's fresh login
LANG = {"en": {"LANG": "C.UTF-8", "LANGUAGE": "", "LC_ALL": "", "LC_MESSAGES": ""},
        "zh": {"LANG": "zh_CN.UTF-8", "LANGUAGE": "", "LC_ALL": "", "LC_MESSAGES": ""}}
GUIDE_CONFIG = "/etc/meter-gateway/gateway.toml"

# what each language says where the test checks a line's start, not the whole line
WORDS = {"en": {"running": "gateway gw-0001 0.1.0, running since ",
                "not_running": "NOT RUNNING: the service is not running",
                "online": "online", "progress": "scanning rs485-1 at 1200 8E1: 2/2, found 1\n"},
         "zh": {"running": "网关 gw-0001 0.1.0，运行中，启动于 ",
                "not_running": "未运行：服务没有在运行",
                "online": "在线",
                "progress": "正在搜表 rs485-1（1200 8E1）：2/2，已找到 1\n"}}


def run(lang, *args, timeout=300):
    p = mgw(*args, env=LANG[lang])
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def starts(line):
    """The terminal columns at which a table line's words start."""
    import unicodedata
    out, col, prev = [], 0, " "
    for c in line:
        if c != " " and prev == " ":
            out.append(col)
        col += 2 if unicodedata.east_asian_width(c) in "WF" else 1
        prev = c
    return out


def quoted(guide, command, output):
    """The guide shows `command` and then exactly `output`."""
    return (command + "\n" + output) in guide


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_commissioning_walk_through(tmp_path, lang):
    import gateway
    with open(GUIDES[lang], encoding="utf-8") as f:
        guide = f.read()
    words = WORDS[lang]
    words["running"] = words["running"].replace("0.1.0", gateway.__version__)
    env = LANG[lang]
    line645, line_mb = str(tmp_path / "tty645"), str(tmp_path / "ttyMB")
    sims = [mgw("simulate", "--port", line645, "--meters", "2", "--meters-1997", "1",
                "--latency-ms", "5", env=env),
            mgw("simulate", "--port", line_mb, "--meters", "1", "--protocol", "modbus",
                "--profile", "chint-ddsu666", "--baudrate", "9600", "--latency-ms", "5",
                env=env)]
    service = None
    try:
        first = sims[0].stdout.readline()
        # the pseudo-terminal's own name differs from run to run
        assert quoted(guide, "mgw simulate --port /tmp/ttyRS485 --meters 2 --meters-1997 1",
                      first.replace(line645, "/tmp/ttyRS485").split(" (->")[0]), first
        assert sims[1].stdout.readline()
        cfg = tmp_path / "gateway.toml"
        cfg.write_text('[gateway]\nid = "gw-0001"\ndata_dir = "%s"\nstatus_interval_s = 1\n\n'
                       '[[ports]]\nname = "rs485-1"\ndevice = "%s"\n\n'
                       '[[ports]]\nname = "rs485-2"\ndevice = "%s"\nbaudrate = 9600\n'
                       'parity = "N"\n\n[control]\nrequire_synced_clock = false\n'
                       % (tmp_path / "data", line645, line_mb))
        path = str(cfg)

        def as_in_guide(text):
            return text.replace(path, GUIDE_CONFIG)

        # find the meters: every usual line setting, entries ready to paste, added to the file
        code, out, err = run(lang, "scan", "--port", "rs485-1", "--config", path, "--auto",
                             "--toml", "--append", path)
        assert code == 0, err
        assert quoted(guide, "mgw scan --port rs485-1 --auto --toml --append "
                      "/etc/meter-gateway/gateway.toml", out), out
        assert words["progress"] in err                        # not a terminal: lines
        code, out, err = run(lang, "scan", "--port", "rs485-2", "--config", path,
                             "--protocol", "modbus", "--last", "3")
        assert code == 0 and quoted(guide, "mgw scan --port rs485-2 --protocol modbus "
                                    "--last 3", out), out
        code, out, err = run(lang, "scan", "--port", "rs485-2", "--config", path,
                             "--protocol", "modbus", "--last", "3", "--toml", "--append", path)
        assert code == 0 and 'unit = 1\nprofile = "chint-ddsu666"\n' in cfg.read_text(), err

        code, out, err = run(lang, "config", "check", "--config", path)
        assert code == 0, err
        assert quoted(guide, "mgw config check", as_in_guide(out)), out

        # a scan of the same line now: everything is configured, --toml has nothing to add
        code, out, err = run(lang, "scan", "--port", "rs485-1", "--config", path, "--toml",
                             "--baudrate", "1200")
        assert code == 0 and out == "", err

        # read each kind of meter
        code, out, err = run(lang, "read", "--meter", "m1", "--config", path, "energy")
        assert code == 0 and "energy.import.t4" in out, err
        code, out, err = run(lang, "read", "--meter", "m3", "--config", path)
        assert code == 0 and err == "" and "energy.import.total" in out, err
        code, out, err = run(lang, "read", "--meter", "u1", "--config", path, "instant")
        assert code == 0 and "frequency" in out and "Hz" in out, err
        header, rule = out.splitlines()[:2]
        assert starts(header) == starts(rule), out      # Chinese words take two columns
        # the guide's silent meter: a wrong address
        good = cfg.read_text()
        cfg.write_text(good.replace('"000000000002"', '"000000000009"'))
        code, out, err = run(lang, "read", "--meter", "m2", "--config", path)
        assert code == 1 and "```\n" + err + "```" in guide, err
        cfg.write_text(good)

        # the service, its status and the relay through it
        service = mgw("run", "--config", path, env=env)
        end = time.time() + 60
        while True:
            code, out, err = run(lang, "status", "--config", path, "--json")
            if code == 0 and len(json.loads(out)["meters"]) == 4 and \
                    all(m["online"] for m in json.loads(out)["meters"]):
                break
            assert time.time() < end, (code, out, err)
            time.sleep(0.5)
        code, out, err = run(lang, "status", "--config", path)
        lines = out.splitlines()
        assert code == 0 and lines[0].startswith(words["running"]), out
        assert sum(words["online"] in line.split() for line in lines) == 4, out
        for action, state in (("cut-off", "open"), ("restore", "closed")):
            code, out, err = run(lang, "relay", "--meter", "m1", action, "--config", path)
            assert code == 0, err
            assert quoted(guide, "mgw relay --meter m1 %s" % action, out), out
    finally:
        if service is not None:
            service.send_signal(signal.SIGTERM)
            service.wait(20)
        for s in sims:
            s.send_signal(signal.SIGINT)
            s.wait(10)
    code, out, err = run(lang, "status", "--config", path)
    assert code == 3 and out.splitlines()[0].startswith(words["not_running"]), out


def test_the_catalogue_translates_every_message_and_is_compiled():
    """Every message the command line marks is in the Chinese catalogue, translated, with
    the same placeholders; the compiled catalogue is the .po's (setup.py compiles it)."""
    babel = pytest.importorskip("babel")      # noqa: F841  (test extra)
    from babel.messages.extract import extract_from_dir
    from babel.messages.pofile import read_po
    sys.path.insert(0, ROOT)
    from gateway.cli import i18n
    keywords = {"_": None, "N_": None, "ngettext": (1, 2), "pgettext": ((1, "c"), 2)}
    marked = set()
    for _file, _line, message, _comments, context in extract_from_dir(
            os.path.join(ROOT, "gateway", "cli"), keywords=keywords):
        marked.add((context, message if isinstance(message, str) else message[0]))
    po_path = os.path.join(i18n.LOCALE_DIR, "zh_CN", "LC_MESSAGES", "mgw.po")
    with open(po_path, "rb") as f:
        catalogue = read_po(f, locale="zh_CN")
    entries = {(m.context, m.id if isinstance(m.id, str) else m.id[0]): m
               for m in catalogue if m.id}
    assert marked - set(entries) == set(), "run python setup.py extract_messages " \
        "update_catalog and translate"
    untranslated = [k for k, m in entries.items() if k in marked and
                    (not m.string or "fuzzy" in m.flags or
                     (isinstance(m.string, tuple) and not all(m.string)))]
    assert untranslated == []
    problems = [(m.id, errors) for m, errors in catalogue.check() if errors]
    assert problems == []                       # placeholders agree (python-format)
    import gettext
    mo = gettext.translation(i18n.DOMAIN, i18n.LOCALE_DIR, languages=["zh_CN"],
                             fallback=False)
    for (context, msgid), m in entries.items():
        if context or not isinstance(m.id, str):
            continue
        assert mo.gettext(msgid) == m.string, "stale mgw.mo: python setup.py compile_catalog"


def test_the_language_comes_from_the_environment():
    def out_of(*args, **env):
        p = subprocess.run([sys.executable, "-m", "gateway"] + list(args),
                           env=dict(os.environ, **dict(
                               dict(PYTHONPATH=ROOT, LANGUAGE="", LC_ALL="", LC_MESSAGES="",
                                    LANG="C.UTF-8"), **env)),
                           capture_output=True, text=True)
        return p.returncode, p.stdout, p.stderr
    code, out, err = out_of("read", "--help")
    assert code == 0 and out.startswith("usage: mgw read") and "meter id from the config" in out
    for env in ({"LANG": "zh_CN.UTF-8"}, {"LC_MESSAGES": "zh_CN.UTF-8"},
                {"LC_ALL": "zh_CN.UTF-8"}):
        code, out, err = out_of("read", "--help", **env)
        assert code == 0 and out.startswith("用法：mgw read"), (env, out)
        assert "配置中的电表编号" in out and "显示此帮助并退出" in out
    # argparse's own errors too, and the exit code does not change with the language
    code, out, err = out_of("read", LANG="zh_CN.UTF-8")
    assert code == 2 and err.endswith("mgw read：错误：缺少必需的参数：--meter\n"), err
    # the field's own words for the relay and cost control
    code, out, err = out_of("relay", "--help", LANG="zh_CN.UTF-8")
    assert "合闸允许" in out
    code, out, err = out_of("--version", LANG="zh_CN.UTF-8")
    import gateway
    assert code == 0 and out.startswith("mgw %s（帧解析器：" % gateway.__version__)


def test_the_demo_labels_roles_cuts_the_household_off_within_a_minute_and_its_hint_works(
        tmp_path, broker):
    """`mgw demo` (not a terminal: a frame of the view every second): each meter says what
    it is there to show, events read as sentences, the household is cut off within 60 s
    and the view says after how long, and the top-up it suggests works as printed."""
    import shlex
    import threading
    demo = mgw("demo", "--seconds", "120", "--data-dir", str(tmp_path / "demo"),
               "--broker", "%s:%d" % (broker.host, broker.port),
               env={"LANG": "C.UTF-8", "LANGUAGE": "", "LC_ALL": ""})
    lines = []
    threading.Thread(target=lambda: lines.extend(demo.stdout), daemon=True).start()

    def seen(pred, timeout):
        end = time.time() + timeout
        while time.time() < end:
            found = [line for line in list(lines) if pred(line)]
            if found:
                return found[-1]
            time.sleep(0.2)
        raise AssertionError("not seen in %d s: %s" % (timeout, "".join(lines[-40:])))
    try:
        assert "dead: never answers" in seen(lambda l: l.startswith("m6 "), 30)
        assert "noisy" in seen(lambda l: l.startswith("m2 "), 5)
        assert "prepaid household running low" in seen(lambda l: l.startswith("m4 "), 5)
        assert seen(lambda l: "m4: balance low (alarm 1):" in l and "yuan left" in l, 60)
        cut = seen(lambda l: l.startswith("household m4: cut off "), 70)
        took = float(cut.split("cut off ")[1].split(" s after")[0])
        assert took < 60, cut
        assert seen(lambda l: "m4: relay OPEN: supply cut off (by costcontrol)" in l, 5)
        hint = seen(lambda l: l.startswith("try: "), 5).strip()
        p = subprocess.run(shlex.split(hint[len("try: "):]), capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
        assert p.returncode == 0, p.stderr
        assert seen(lambda l: "m4: topped up" in l, 30)
        assert seen(lambda l: "m4: relay closed: supply restored" in l, 60)
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(30)


def test_a_simulated_modbus_meter_answers_only_at_its_own_baud_rate(tmp_path):
    """And `mgw scan` takes a device that is in no configuration yet."""
    link = str(tmp_path / "ttyMB")
    sim = mgw("simulate", "--port", link, "--meters", "1", "--protocol", "modbus",
              "--baudrate", "9600", "--latency-ms", "5")
    try:
        assert sim.stdout.readline().startswith("simulating")
        base = ("scan", "--port", link, "--config", str(tmp_path / "none.toml"),
                "--protocol", "modbus", "--last", "1", "--parity", "N")
        code, out, err = run("en", *base, "--baudrate", "19200")
        assert code == 1 and out.startswith("no meters found at 19200 8N1"), out + err
        code, out, err = run("en", *base, "--baudrate", "9600", "--json")
        assert code == 0 and [f["unit"] for f in json.loads(out)["found"]] == [1], err
    finally:
        sim.send_signal(signal.SIGINT)
        sim.wait(10)


def test_command_sign_publishes_itself(tmp_path, broker):
    """No mosquitto_pub needed: `--publish` sends the signed command at QoS 1."""
    from mqtt_helpers import HeadEnd
    code, out, err = run("en", "keys", "gen", "--out", str(tmp_path / "k"), "--json")
    keys = json.loads(out)
    head = HeadEnd(broker, root="mgw/v1/gw-0001")
    try:
        code, out, err = run("en", "command", "sign", "--key", keys["private_key"], "--meter",
                             "m1", "--action", "read", "--param", "quantities=energy",
                             "--publish", "%s:%d" % (broker.host, broker.port), "--topic",
                             "mgw/v1/gw-0001/commands")
        assert code == 0 and err == "published to mgw/v1/gw-0001/commands on %s:%d\n" % (
            broker.host, broker.port), err
        head.wait(lambda: head.topic("commands"))
        assert head.topic("commands") == [json.loads(out)]
    finally:
        head.close()
    code, out, err = run("en", "command", "sign", "--key", keys["private_key"], "--meter",
                         "m1", "--action", "read", "--publish", "127.0.0.1:1")
    assert code == 2 and "--publish needs --topic" in err
    code, out, err = run("en", "command", "sign", "--key", keys["private_key"], "--meter",
                         "m1", "--action", "read", "--publish", "127.0.0.1:1", "--topic", "t")
    assert code == 1 and err.startswith("mgw command: cannot reach the MQTT broker 127.0.0.1:1")


def test_scripts_demo_starts_a_warm_checkout_without_pip(tmp_path):
    """A second `scripts/demo` on an unchanged checkout goes straight to `mgw demo`; a change
    to what the install is built from (here a Cython source) sets up again."""
    import shutil
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in ("demo", "env.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), root / "scripts" / name)
    for name in ("pyproject.toml", "setup.py", "setup.cfg"):
        shutil.copy(os.path.join(ROOT, name), root / name)
    (root / "ext").mkdir()
    (root / "ext" / "x.pyx").write_text("# one\n")
    calls = tmp_path / "calls"
    fake = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> %s\n" % calls
    (root / ".venv" / "bin").mkdir(parents=True)
    for name, body in (("python", fake), ("mgw", fake + "echo \"mgw $*\"\n")):
        (root / ".venv" / "bin" / name).write_text(body)
        os.chmod(root / ".venv" / "bin" / name, 0o755)
    (tmp_path / "python3").write_text(fake)            # the system Python env.sh asks
    os.chmod(tmp_path / "python3", 0o755)
    env = dict(os.environ, PYTHON=str(tmp_path / "python3"))

    def demo():
        if calls.exists():
            calls.unlink()
        p = subprocess.run([str(root / "scripts" / "demo"), "--seconds", "1"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout == "mgw demo --seconds 1\n", p.stderr
        return [line.split()[:3] for line in calls.read_text().splitlines()]
    assert ["python", "-m", "pip"] in demo()                  # cold: sets up
    assert demo() == [["mgw", "demo", "--seconds"]]           # warm: nothing but the demo
    (root / "ext" / "x.pyx").write_text("# two\n")
    assert ["python", "-m", "pip"] in demo()                  # changed: sets up again
    assert demo() == [["mgw", "demo", "--seconds"]]


def test_a_scan_stops_early(tmp_path):
    """--expect N: once N meters answered, neither the rest of the address space nor the
    other --auto settings are asked; Ctrl-C stops a sweep and shows what it found."""
    link = str(tmp_path / "tty645")
    sim = mgw("simulate", "--port", link, "--meters", "2", "--meters-1997", "1",
              "--latency-ms", "5")
    mb = str(tmp_path / "ttyMB")
    simmb = mgw("simulate", "--port", mb, "--meters", "1", "--protocol", "modbus",
                "--baudrate", "9600", "--latency-ms", "5")
    try:
        assert sim.stdout.readline().startswith("simulating")
        assert simmb.stdout.readline().startswith("simulating")
        none = str(tmp_path / "none.toml")
        code, out, err = run("en", "scan", "--port", link, "--config", none, "--auto",
                             "--expect", "2", "--json")
        result = json.loads(out)
        assert code == 0 and result["stopped"] == "expected", err
        assert [f["address"] for f in result["found"]] == ["000000000001", "000000000002"]
        assert "at 2400 8E1" in err and "at 1200 8E1" not in err      # not tried
        # a whole Modbus sweep (247 unit ids), stopped by the technician
        p = mgw("scan", "--port", mb, "--config", none, "--protocol", "modbus",
                "--baudrate", "9600", "--parity", "N", env=LANG["en"])
        time.sleep(4)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 1, err
        assert "mgw scan: interrupted: the rest of the line was not asked\n" in err
        assert out.splitlines()[2].split()[:1] == ["1"], out           # unit 1 is listed
    finally:
        for s in (sim, simmb):
            s.send_signal(signal.SIGINT)
            s.wait(10)


def test_the_demo_says_what_a_relay_moved_by_the_meter_means():
    from gateway.sim.demo import readable
    assert readable("meter.relay_changed", {"meter": "m3", "relay": "open",
                                            "previous": "closed"}) == \
        "m3: relay opened by the meter itself (its own prepaid logic, or on site)"
    assert readable("meter.relay_changed", {"meter": "m4", "relay": "closed",
                                            "previous": "open"}) == \
        "m4: relay closed by the meter (the customer's button, or on site)"
