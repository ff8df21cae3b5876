"""The parts of remote configuration: patches of the meter archive, the version hash, TOML
written back, secrets refused, sections that need a restart, the history kept, a line's
schedules swapped in place, and accounts and tariffs reloaded through a signed command on
an in-process gateway over simulated meters."""

import copy
import json
import os
import threading
import time

import pytest

try:
    import tomllib
except ImportError:
    import tomli as tomllib

from gateway.line.poller import LinePoller, MeterSpec
from gateway.model import RejectCode
from gateway.service import reload as rl
from gateway.service.gateway import Gateway, serve
from gwharness import Harness
from test_costcontrol import wait

DOC = {
    "gateway": {"id": "gw-1", "data_dir": "/tmp/x"},
    "ports": [{"name": "p1", "device": "/dev/ttyS1", "baudrate": 2400}],
    "meters": [{"id": "m%d" % i, "port": "p1", "address": "%012d" % i, "interval_s": 900}
               for i in (1, 2, 3)],
    "tariffs": {
        "flat": {"kind": "flat", "price": "0.5283"},
        "both": {"kind": "tiered_tou",
                 "prices": {"peak": "0.8653", "valley": "0.3015"},
                 "schedule": [{"from": "00:00", "to": "08:00", "rate": "valley"},
                              {"from": "08:00", "to": "24:00", "rate": "peak"}],
                 "ladder": [{"upto_kwh": "2760", "surcharge": "0"}, {"surcharge": "0.30"}]}},
    "accounts": [{"meter": "m1", "tariff": "flat", "opening_balance": "100.00"}],
    "uplink": {"host": "127.0.0.1", "topic_root": "mgw/v1"},
    "control": {"public_keys": [], "require_synced_clock": False},
}


def write(tmp_path, doc, name="gateway.toml"):
    path = tmp_path / name
    path.write_text(rl.to_toml(doc))
    return str(path)


# ---------------------------------------------------------------- documents

def test_the_toml_written_reads_back_as_the_same_document():
    doc = copy.deepcopy(DOC)
    doc["meters"][0]["note"] = 'quote " backslash \\ 中文 \t tab'
    doc["cost_control"] = {"protected_ranges": ["22:00-06:00"], "check_interval_s": 1.5,
                           "x": True}
    assert tomllib.loads(rl.to_toml(doc)) == doc


def test_the_version_is_the_document_not_its_layout():
    text = rl.to_toml(DOC)
    commented = "# a comment\n" + text.replace("\n[", "\n\n# here\n[")
    assert rl.version_of(tomllib.loads(commented)) == rl.version_of(tomllib.loads(text))
    other = copy.deepcopy(DOC)
    other["meters"][0]["interval_s"] = 60
    assert rl.version_of(other) != rl.version_of(DOC)


def test_a_patch_adds_replaces_updates_and_removes_entries():
    patch = {"meters": {"add": [{"id": "m4", "port": "p1", "address": "4"}],
                        "replace": [{"id": "m2", "port": "p1", "address": "22"}],
                        "update": [{"id": "m3", "interval_s": 60, "address": None}],
                        "remove": ["m1"]},
             "ports": {"update": [{"name": "p1", "baudrate": 9600}]},
             "accounts": {"remove": ["m1"]},
             "tariffs": {"add": {"new": {"kind": "flat", "price": "0.6"}},
                         "update": {"flat": {"price": "0.55"}}, "remove": ["both"]},
             "cost_control": {"update": {"check_interval_s": 30}}}
    before = copy.deepcopy(DOC)
    new = rl.apply_patch(DOC, patch)
    assert DOC == before                              # the running document is not touched
    assert [m["id"] for m in new["meters"]] == ["m2", "m3", "m4"]
    assert new["meters"][0] == {"id": "m2", "port": "p1", "address": "22"}
    assert new["meters"][1] == {"id": "m3", "port": "p1", "interval_s": 60}   # null: unset
    assert new["ports"][0]["baudrate"] == 9600 and new["accounts"] == []
    assert new["tariffs"] == {"flat": {"kind": "flat", "price": "0.55"},
                              "new": {"kind": "flat", "price": "0.6"}}
    assert new["cost_control"] == {"check_interval_s": 30}


def test_a_bad_patch_lists_every_problem():
    with pytest.raises(rl.ReloadError) as e:
        rl.apply_patch(DOC, {"meters": {"add": [{"id": "m1"}], "remove": ["m9", 3],
                                        "update": [{"interval_s": 5}]},
                             "uplink": {"update": {"host": "x"}},
                             "tariffs": {"replace": {"nope": {}}}})
    problems = e.value.problems
    assert e.value.code == RejectCode.BAD_PARAMS
    for text in ("patch.meters.add[0]: meter m1 exists already",
                 "patch.meters.remove[0]: no meter m9",
                 "patch.meters.remove[1]: a id",
                 "patch.meters.update[0]: a table with its id",
                 "patch.uplink: not part of the meter archive",
                 "patch.tariffs.replace.nope: no such tariff"):
        assert any(p.startswith(text) for p in problems), (text, problems)


def test_secrets_in_clear_are_found():
    key = "-----BEGIN PRIVATE KEY-----\nMC4CAQ...\n-----END PRIVATE KEY-----"
    found = rl.secrets_in({"uplink": {"host": "h", "password": "pw"},
                           "control": {"keys": [key]}}, "params.config")
    assert found == [
        "params.config.control.keys[0]: carries a private key; reference a key file on "
        "the box",
        "params.config.uplink.password: a broker password is not sent over the network; "
        "use uplink.password_file (a file already on the box)"]
    assert rl.secrets_in({"uplink": {"password_file": "/etc/meter-gateway/pw"}}) == []


# ---------------------------------------------------------------- candidates

@pytest.fixture
def reloader(tmp_path):
    doc = copy.deepcopy(DOC)
    doc["gateway"]["data_dir"] = str(tmp_path / "data")
    return rl.Reloader(None, rl.ConfigFile.load(write(tmp_path, doc)))


def test_a_candidate_is_validated_like_config_check(reloader):
    v = reloader.version
    c = reloader.candidate({"version": v, "patch": {"meters": {"update": [
        {"id": "m2", "interval_s": 60}]}}}, remote=True)
    assert c.cfg.meters[1].interval_s == 60 and c.version != v
    assert reloader.changes(c) == {"meters": {"added": [], "removed": [],
                                              "changed": {"m2": ["interval_s"]}}}
    with pytest.raises(rl.ReloadError) as e:
        reloader.candidate({"version": v, "patch": {"meters": {"remove": ["m1"]}}},
                           remote=True)
    # the account of a removed meter is refused exactly as `mgw config check` refuses it
    assert e.value.code == RejectCode.INVALID_CONFIG
    assert e.value.problems == ["%s: accounts[0].meter: no meter 'm1'" % reloader.current.path]


@pytest.mark.parametrize("params, code, text", [
    ({"version": "0" * 64, "patch": {"meters": {"remove": ["m3"]}}},
     RejectCode.STALE_VERSION, "stale: made for configuration 000000000000"),
    ({"patch": {}}, RejectCode.BAD_PARAMS, "params.version"),
    ({"version": "V"}, RejectCode.BAD_PARAMS, "exactly one of"),
    ({"version": "V", "dry_run": "yes", "patch": {}}, RejectCode.BAD_PARAMS, "dry_run"),
    ({"version": "V", "toml": "[gateway\n"}, RejectCode.INVALID_CONFIG,
     "params.toml: not valid TOML"),
    ({"version": "V", "health_timeout_s": 0, "patch": {}}, RejectCode.BAD_PARAMS,
     "health_timeout_s"),
    ({"version": "V", "patch": {"meters": {"add": [{"id": "m1"}]}}}, RejectCode.BAD_PARAMS,
     "meter m1 exists already"),
])
def test_candidates_refused_with_a_code_and_a_reason(reloader, params, code, text):
    params = dict(params)
    if params.get("version") == "V":
        params["version"] = reloader.version
    with pytest.raises(rl.ReloadError) as e:
        reloader.candidate(params, remote=True)
    assert e.value.code == code and text in e.value.reason, e.value.reason


def test_sections_read_at_start_need_a_restart(reloader):
    doc = copy.deepcopy(reloader.current.doc)
    doc["uplink"]["host"] = "10.0.0.9"
    doc["control"]["require_synced_clock"] = True
    with pytest.raises(rl.ReloadError) as e:
        reloader.candidate({"version": reloader.version, "config": doc}, remote=True)
    assert e.value.code == RejectCode.RESTART_REQUIRED
    assert e.value.problems == ["uplink.host", "control.require_synced_clock"]
    assert "only a restart applies [control], [uplink]" in e.value.reason


def test_a_whole_file_as_text_keeps_its_comments(reloader):
    text = "# the technician's note\n" + reloader.current.text.replace(
        'interval_s = 900', 'interval_s = 600', 1)
    c = reloader.candidate({"version": reloader.version, "toml": text}, remote=True)
    assert c.text == text and c.cfg.meters[0].interval_s == 600


def test_the_previous_file_and_the_last_n_are_kept(tmp_path):
    path = str(tmp_path / "gateway.toml")
    for i in range(rl.HISTORY_KEEP + 3):
        rl.keep_previous(path, "n = %d\n" % i, "%064d" % i)
    assert open(path + ".prev").read() == "n = %d\n" % (rl.HISTORY_KEEP + 2)
    kept = sorted(os.listdir(tmp_path / "history"))
    assert len(kept) == rl.HISTORY_KEEP
    assert [open(tmp_path / "history" / k).read() for k in kept] == \
        ["n = %d\n" % i for i in range(3, rl.HISTORY_KEEP + 3)]


# ---------------------------------------------------------------- a line's schedules

def test_a_line_keeps_its_schedules_and_health_across_a_reload():
    now = [1000.0]
    specs = [MeterSpec("m%d" % i, "p1", address="%012d" % i, interval_s=900,
                       instant_interval_s=0, clock_interval_s=0) for i in (1, 2, 3)]
    poller = LinePoller(specs, lambda *a: [], lambda *a, **k: None, wall=lambda: now[0])
    for _ in range(3):                       # every meter's first poll, due now
        assert callable(poller.next_job(None))
    kept = poller.health["m1"]
    due = poller.next_job(None)
    assert isinstance(due, float) and due > 0          # nothing due before the interval
    new = [specs[0], MeterSpec("m2", "p1", address="%012d" % 2, interval_s=60,
                               instant_interval_s=0, clock_interval_s=0),
           MeterSpec("m4", "p1", address="%012d" % 4, instant_interval_s=0,
                     clock_interval_s=0)]
    assert poller.reconfigure(new) == (["m4"], ["m2"], ["m3"])
    assert poller.health["m1"] is kept        # same meter: same health, same schedule
    jobs = []
    while True:
        job = poller.next_job(None)
        if not callable(job):
            break
        jobs.append(job)
    # the changed and the new meter are polled now, the kept one at its interval, the
    # removed one never again
    due_ids = sorted(mid for _, _, mid, _ in poller._heap)
    assert len(jobs) == 2 and due_ids == ["m1", "m2", "m4"]
    assert "m3" not in poller.health
    # a task of the removed meter that was still running finds no KeyError
    poller.outcome(specs[2], type("R", (), {"ok": False, "error": "x"})())


# ---------------------------------------------------------------- accounts and tariffs

def start_from_file(h, tmp_path):
    """The harness's gateway, started from its configuration written as a file."""
    path = write(tmp_path, json.loads(json.dumps(h.doc)))
    source = rl.ConfigFile.load(path)
    h.gw = Gateway(source.cfg, clock_policy=h.clock, config_file=source)
    h._stop = threading.Event()
    started = threading.Event()
    h._thread = threading.Thread(target=serve, args=(h.gw, h._stop),
                                 kwargs={"on_started": lambda g: started.set()}, daemon=True)
    h._thread.start()
    assert started.wait(10)
    return path, source


def test_accounts_and_tariffs_reload_through_a_signed_command(tmp_path):
    h = Harness(tmp_path, meters=2, accounts=[
        {"meter": "m1", "tariff": "flat", "opening_balance": "50.00"}])
    try:
        path, source = start_from_file(h, tmp_path)
        top = h.command("m1", "topup", {"amount": "10.00", "txn": "PAY-1"})
        h.send(top)
        assert h.wait_result(top["id"])["balance"] == "60.00"
        old_cc = h.gw.costcontrol
        cmd = h.command("*", "config_update", {"version": source.version, "patch": {
            "tariffs": {"add": {"night": {"kind": "flat", "price": "0.3000"}}},
            "accounts": {"add": [{"meter": "m2", "tariff": "night",
                                  "opening_balance": "20.00"}],
                         "update": [{"meter": "m1", "alarm1": "30.00"}]}}})
        h.send(cmd)
        res = h.wait_result(cmd["id"])
        assert res["status"] == "done", res
        assert res["changes"] == {
            "accounts": {"added": ["m2"], "removed": [], "changed": {"m1": ["alarm1"]}},
            "tariffs": {"added": ["night"], "removed": [], "changed": []}}
        cc = h.gw.costcontrol
        assert cc is not old_cc and cc.is_alive() and not old_cc.is_alive()
        assert cc.balances() == {"m1": "60.00", "m2": "20.00"}   # nothing reset
        assert cc.accounts["m2"]["tariff"] == "night"
        assert h.gw.status()["config_version"] == res["version"]
        # a top-up of the new account goes through the same executor, no restart
        top = h.command("m2", "topup", {"amount": "5.00", "txn": "PAY-2"})
        h.send(top)
        assert h.wait_result(top["id"])["balance"] == "25.00"
        assert tomllib.loads(open(path).read())["tariffs"]["night"]["price"] == "0.3000"
        # without a file behind it (the demo) the command says so
        h.gw.executor.config = None
        cmd = h.command("*", "config_update", {"version": res["version"], "patch": {}})
        h.send(cmd)
        r = h.wait_result(cmd["id"])
        assert r["status"] == "rejected" and "not started from a configuration file" in \
            r["reason"]
    finally:
        h.close()


def test_a_local_edit_whose_port_cannot_open_is_rolled_back(tmp_path):
    h = Harness(tmp_path, meters=2)
    try:
        path, source = start_from_file(h, tmp_path)
        h.gw.reloader.health_timeout_s = 1.5
        original = open(path).read()
        wait(lambda: h.gw.workers["p1"].line_stats()["open"])
        doc = json.loads(json.dumps(h.doc))
        doc["ports"].append({"name": "p2", "device": str(tmp_path / "gone")})
        doc["meters"].append({"id": "m9", "port": "p2", "address": "9"})
        edited = rl.to_toml(doc)
        with open(path, "w") as f:
            f.write(edited)
        h.gw.reloader.request_file_reload()
        wait(lambda: [e for e in h.gw.sink.recent if "config.rolled_back" in e])
        line = [e for e in h.gw.sink.recent if "config.rolled_back" in e][0]
        assert "gone does not exist" in line and "source=sighup" in line
        assert open(path).read() == original            # the previous file written back
        assert open(path + ".prev").read() == original
        rejected = [n for n in os.listdir(tmp_path / "history") if n.endswith(".rejected.toml")]
        assert len(rejected) == 1
        assert open(tmp_path / "history" / rejected[0]).read() == edited
        assert sorted(h.gw.workers) == ["p1"] and h.gw.reloader.version == source.version
        assert [m["id"] for m in h.gw.meters_list()["meters"]] == ["m1", "m2"]
        # the line that was there goes on being read
        before = h.gw.pollers["p1"].health["m1"].reads
        wait(lambda: h.gw.pollers["p1"].health["m1"].reads > before, timeout=20)
    finally:
        h.close()


def test_a_changed_port_gets_a_new_worker_on_the_same_device(tmp_path):
    h = Harness(tmp_path, meters=2)
    try:
        path, source = start_from_file(h, tmp_path)
        wait(lambda: h.gw.pollers["p1"].health["m1"].reads_ok > 0)
        old_worker, kept = h.gw.workers["p1"], h.gw.pollers["p1"].health["m1"]
        cmd = h.command("*", "config_update", {"version": source.version, "patch": {
            "ports": {"update": [{"name": "p1", "retries": 3, "settle_ms": 5}]}}})
        h.send(cmd)
        res = h.wait_result(cmd["id"])
        assert res["status"] == "done", res
        assert res["changes"] == {"ports": {"added": [], "removed": [],
                                            "changed": {"p1": ["retries", "settle_ms"]}}}
        new = h.gw.workers["p1"]
        assert new is not old_worker and not old_worker.is_alive()
        assert new.retries == 3 and new.line_stats()["open"]
        # the meters on it keep their health and go on being read by the new worker
        assert h.gw.pollers["p1"].health["m1"] is kept
        before = new.stats.answers
        wait(lambda: new.stats.answers > before, timeout=20)
        assert new.last_error is None
    finally:
        h.close()


def test_the_retained_meters_list_follows_the_meters_health(tmp_path, broker, monkeypatch):
    from gateway.line import poller
    from mqtt_helpers import HeadEnd
    monkeypatch.setattr(poller, "OFFLINE_PROBE_S", 1.0)     # an offline meter probed soon
    head = HeadEnd(broker)
    h = Harness(tmp_path, broker=broker, meters=2, interval_s=1, accounts=[
        {"meter": "m2", "tariff": "flat", "opening_balance": "5.00", "mode": "remote"}])
    h.start()

    def health():
        msgs = head.topic("meters")
        return {m["id"]: m["health"] for m in msgs[-1]["meters"]} if msgs else {}
    try:
        wait(lambda: health() == {"m1": "online", "m2": "online"})
        first = head.topic("meters")[-1]
        assert first["meters"][1] == {"id": "m2", "protocol": "dlt645", "port": "p1",
                                      "address": "000000000002", "account": "remote",
                                      "grade": "none", "health": "online"}
        assert first["unconfigured"] == [] and first["v"] == 1
        h.sim_meters[1].faults.silent = True
        wait(lambda: health() == {"m1": "online", "m2": "offline"}, timeout=40)
        h.sim_meters[1].faults.silent = False
        wait(lambda: health() == {"m1": "online", "m2": "online"}, timeout=40)
        # retained: a head-end that comes later gets the current list at once
        late = HeadEnd(broker, client_id="late")
        late.wait(lambda: late.topic("meters"))
        assert {m["id"]: m["health"] for m in late.topic("meters")[-1]["meters"]} == \
            {"m1": "online", "m2": "online"}
        late.close()
        # published on change only, not at every supervision round
        n = len(head.topic("meters"))
        time.sleep(3)
        assert len(head.topic("meters")) == n
    finally:
        h.close()
        head.close()


def test_the_retained_meters_list_carries_each_accounts_arrears_grade(tmp_path, broker):
    """A signed account_update that records a debt moves the grade; the retained list is
    republished with it (the head-end's dunning sees it without asking)."""
    from mqtt_helpers import HeadEnd
    head = HeadEnd(broker)
    h = Harness(tmp_path, broker=broker, meters=2, interval_s=1, accounts=[
        {"meter": "m2", "tariff": "flat", "opening_balance": "50.00", "mode": "local"}])
    h.start()

    def grades():
        msgs = head.topic("meters")
        return {m["id"]: m.get("grade") for m in msgs[-1]["meters"]} if msgs else {}
    try:
        wait(lambda: grades() == {"m1": None, "m2": "none"})
        assert "grade" not in head.topic("meters")[-1]["meters"][0]   # no account: no grade
        def done(cmd):
            # with a broker, delivered results leave the journal: the head-end has them
            wait(lambda: [r for r in head.topic("command-results")
                          if r.get("id") == cmd["id"] and r["status"] == "done"])
        cmd = h.command("m2", "account_update", {"debt": "250.00"})
        h.send(cmd)
        done(cmd)
        wait(lambda: grades() == {"m1": None, "m2": "moderate"})
        cmd = h.command("m2", "account_update", {"debt": "0.00"})
        h.send(cmd)
        done(cmd)
        wait(lambda: grades() == {"m1": None, "m2": "none"})
    finally:
        h.close()
        head.close()


def test_a_scan_lists_meters_found_but_not_configured_until_they_are(tmp_path, broker):
    from mqtt_helpers import HeadEnd
    head = HeadEnd(broker)
    h = Harness(tmp_path, broker=broker, meters=3)
    h.doc["meters"] = h.doc["meters"][:2]            # m3 is on the line, not configured
    try:
        path, source = start_from_file(h, tmp_path)
        def result(cmd, timeout=30):
            # from the head-end: with a broker, delivered results leave the journal
            def final():
                return [r for r in head.topic("command-results") if r.get("id") == cmd["id"]
                        and r["status"] in ("done", "failed", "rejected")]
            wait(final, timeout=timeout)
            return final()[0]
        scan = h.command("*", "scan", {"port": "p1", "protocol": "dlt645", "max_s": 60})
        h.send(scan)
        res = result(scan, timeout=90)
        assert res["status"] == "done", res

        def unconfigured():
            msgs = head.topic("meters")
            return msgs[-1]["unconfigured"] if msgs else None
        wait(lambda: unconfigured())
        found = unconfigured()
        assert [(u["port"], u["protocol"], u["address"]) for u in found] == \
            [("p1", "dlt645", "000000000003")]
        from test_asyncapi import Spec
        spec = Spec()
        spec.validate("meters", head.topic("meters")[-1])     # as docs/asyncapi.yaml says
        # configured now: it leaves the unconfigured list and joins the meters
        cmd = h.command("*", "config_update", {"version": source.version, "patch": {
            "meters": {"add": [{"id": "m3", "port": "p1", "address": "000000000003"}]}}})
        h.send(cmd)
        assert result(cmd)["status"] == "done"
        wait(lambda: unconfigured() == [] and
             [m["id"] for m in head.topic("meters")[-1]["meters"]] == ["m1", "m2", "m3"])
    finally:
        h.close()
        head.close()


def test_meter_passwords_in_a_config_update_are_masked_in_the_audit():
    """The audit keeps (and uploads) every command's params: a meter's relay password sent
    in a patch or in a whole file must not sit there in clear."""
    from gateway.control.executor import _public
    cmd = {"v": 1, "id": "c1", "meter": "*", "action": "config_update", "sig": "AAAA",
           "params": {"version": "v",
                      "patch": {"meters": {"add": [{"id": "m9", "password": "123456",
                                                    "password_level": 2}]}},
                      "config": {"meters": [{"id": "m1", "password": "222222"}]},
                      "toml": '[[meters]]\nid = "m1"\npassword = "654321"  # site code\n'
                              "  password=111111\npassword_level = 2\n"}}
    text = json.dumps(_public(cmd))
    for secret in ("123456", "222222", "654321", "111111", "AAAA"):
        assert secret not in text
    assert '"password_level": 2' in text and "password_level = 2" in text
    assert cmd["params"]["patch"]["meters"]["add"][0]["password"] == "123456"   # a copy
