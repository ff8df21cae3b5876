"""Remote configuration and SIGHUP end to end with real processes: Mosquitto, `mgw simulate`
(six meters on the line, four configured) and `mgw run`; commands signed with a key made by
`mgw keys gen`."""

import datetime as dt
import json
import os
import signal
import time
import uuid

from gateway.control.signing import load_private_key, sign
from mqtt_helpers import HeadEnd, unique_seqs
from test_e2e import ROOT, NotifySocket, Simulator, keys, mgw, write_config
from test_asyncapi import Spec


def validate_against_asyncapi(head):
    """Every meters list, config event and config_update result captured validates against
    its message in docs/asyncapi.yaml (the short session of test_asyncapi has no file)."""
    spec = Spec()
    with head.lock:
        captured = list(head.messages)
    keys = set()
    for topic, payload, _, _ in captured:
        suffix = topic.split("/", 3)[3]
        if suffix == "meters" or (suffix == "events" and payload.get("type", "").startswith(
                "config.")) or (suffix == "command-results" and
                                payload.get("action") == "config_update"):
            key = spec.message_for(suffix, payload)
            spec.validate(key, payload)
            keys.add(key)
    return keys


def command(key, params, action="config_update", meter="*"):
    now = dt.datetime.now().astimezone().replace(microsecond=0)
    return sign({"v": 1, "id": str(uuid.uuid4()), "meter": meter, "action": action,
                 "issued_at": now.isoformat(),
                 "expires_at": (now + dt.timedelta(seconds=600)).isoformat(),
                 "params": params}, key)


def send(head, cmd, timeout=40):
    """Publish a signed command; its final result."""
    head.publish("commands", json.dumps(cmd))
    return final_result(head, cmd, timeout)


def final_result(head, cmd, timeout=40):
    final = ("done", "failed", "rejected")
    head.wait(lambda: any(r.get("id") == cmd["id"] and r["status"] in final
                          for r in head.topic("command-results")), timeout=timeout)
    return [r for r in head.topic("command-results")
            if r.get("id") == cmd["id"] and r["status"] in final][-1]


def meters_list(head):
    msgs = head.topic("meters")
    return msgs[-1] if msgs else None


def meter_ids(head):
    m = meters_list(head)
    return sorted(e["id"] for e in m["meters"]) if m else None


def events(head, kind):
    return [e for e in head.topic("events") if e.get("type") == kind]


def meter(i):
    return {"id": "m%d" % i, "port": "rs485-1", "address": "%012d" % i, "interval_s": 10,
            "instant_interval_s": 0, "clock_interval_s": 0}


def readings_after(head, meter_id, t):
    return [r for r in head.readings() if r["meter"] == meter_id
            and dt.datetime.fromisoformat(r["ts"]).timestamp() >= t]


def stop(gw):
    gw.send_signal(signal.SIGTERM)
    gw.wait(15)
    err = gw.stderr.read()
    assert gw.returncode == 0 and "Traceback" not in err, err[-3000:]
    return err


class Rig:
    """Keys, a simulated line (`sim_meters` on it, four configured), the head-end and
    `mgw run` on the configuration file."""

    def __init__(self, tmp_path, broker, sim_meters, head=None, env=None):
        priv, pub = keys(tmp_path)
        self.key = load_private_key(priv)
        self.sim = Simulator(tmp_path, meters=sim_meters)
        self.path = write_config(tmp_path, self.sim.link, broker, pub, meters=4)
        self.original = open(self.path).read()
        self.head = head or HeadEnd(broker)
        self.gw = mgw("run", "--config", self.path, env=env or {})

    def close(self):
        if self.gw.poll() is None:
            self.gw.kill()
        self.head.close()
        self.sim.stop()


def test_config_update_adds_and_removes_meters_while_polling(tmp_path, broker):
    rig = Rig(tmp_path, broker, sim_meters=6)
    key, path, original, head, gw = rig.key, rig.path, rig.original, rig.head, rig.gw
    try:
        # the retained meters list names the configuration's version
        head.wait(lambda: meter_ids(head) == ["m1", "m2", "m3", "m4"], timeout=30)
        v0 = meters_list(head)["config_version"]
        assert len(v0) == 64
        assert meters_list(head)["meters"][0] == {
            "id": "m1", "protocol": "dlt645", "port": "rs485-1", "address": "000000000001",
            "account": None, "health": meters_list(head)["meters"][0]["health"]}
        head.wait(lambda: {r["meter"] for r in head.readings()} >= {"m1", "m2", "m3", "m4"},
                  timeout=30)
        patch = {"meters": {"add": [meter(5), meter(6)], "remove": ["m4"]}}

        # a dry run answers with the diff and changes nothing
        res = send(head, command(key, {"version": v0, "patch": patch, "dry_run": True}))
        assert res["status"] == "done" and res["dry_run"] is True, res
        assert res["changes"] == {"meters": {"added": ["m5", "m6"], "removed": ["m4"],
                                             "changed": {}}}
        assert res["new_version"] != v0 and res["version"] == v0
        assert open(path).read() == original
        assert not os.path.exists(path + ".prev")
        assert not events(head, "config.applied")

        # ... and a dry run of a configuration `mgw config check` refuses lists the problems
        bad = {"meters": {"add": [dict(meter(7), port="rs485-9"),
                                  dict(meter(8), address="12AB")]}}
        res = send(head, command(key, {"version": v0, "patch": bad, "dry_run": True}))
        assert res["status"] == "rejected" and res["code"] == "invalid_config", res
        assert any("meters[4].port" in p for p in res["problems"]), res
        assert any("meters[5].address" in p for p in res["problems"]), res

        # applied: two meters added, one removed, while the gateway polls
        t_apply = time.time()
        res = send(head, command(key, {"version": v0, "patch": patch}))
        t_done = time.time()
        assert res["status"] == "done", res
        v1 = res["version"]
        assert v1 != v0 and res["previous_version"] == v0
        assert res["changes"]["meters"]["added"] == ["m5", "m6"]
        # the new meters are read within one interval (10 s) of the change (the readings'
        # own times: delivery under load may take longer)
        head.wait(lambda: readings_after(head, "m5", t_apply) and
                  readings_after(head, "m6", t_apply), timeout=30)
        for mid in ("m5", "m6"):
            first = min(dt.datetime.fromisoformat(r["ts"]).timestamp()
                        for r in readings_after(head, mid, t_apply))
            assert first - t_done < 10, (mid, first - t_done)
        # the retained list follows the change, with the new version
        head.wait(lambda: meter_ids(head) == ["m1", "m2", "m3", "m5", "m6"])
        assert meters_list(head)["config_version"] == v1
        applied = events(head, "config.applied")
        assert len(applied) == 1 and applied[0]["version"] == v1 and \
            applied[0]["previous"] == v0 and applied[0]["source"] == "remote"
        # the file was replaced atomically; the old one kept beside it and in history/
        assert open(path + ".prev").read() == original
        history = os.listdir(tmp_path / "history")
        assert len(history) == 1 and open(tmp_path / "history" / history[0]).read() == original
        p = mgw("config", "check", "--config", path, "--json")
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0 and json.loads(out)["meters"] == 5, err
        p = mgw("status", "--config", path, "--json")
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0 and json.loads(out)["config_version"] == v1, err

        # a patch made against the old version is refused, and nothing moves
        res = send(head, command(key, {"version": v0, "patch": {
            "meters": {"remove": ["m1"]}}}))
        assert res["status"] == "rejected" and res["code"] == "stale_version", res
        # so are secrets in clear
        res = send(head, command(key, {"version": v1, "config": {
            "uplink": {"host": "x", "password": "hunter2"}}}))
        assert res["status"] == "rejected" and res["code"] == "secret_in_config", res

        # a configuration whose port cannot open rolls back by itself
        dead = {"ports": {"add": [{"name": "rs485-2", "device": str(tmp_path / "no-such-tty"),
                                   "baudrate": 19200}]},
                "meters": {"add": [dict(meter(9), port="rs485-2")]}}
        update = command(key, {"version": v1, "patch": dead, "health_timeout_s": 8})
        head.publish("commands", json.dumps(update))
        # ... and a cut-off sent while it waits for health is not kept waiting behind it
        time.sleep(0.5)
        t_cut = time.monotonic()
        cut = send(head, command(key, {}, action="cut_off", meter="m1"))
        assert cut["status"] == "done", cut
        assert time.monotonic() - t_cut < 5   # the update waits 8 s for health
        res = final_result(head, update)
        assert [r["id"] for r in head.topic("command-results") if r["status"] in (
            "done", "failed")].index(cut["id"]) < [
            r["id"] for r in head.topic("command-results")
            if r["status"] in ("done", "failed")].index(update["id"])
        assert res["status"] == "failed" and res["code"] == "rolled_back", res
        assert "no-such-tty" in res["reason"] and res["version"] == v1, res
        rolled = events(head, "config.rolled_back")
        assert len(rolled) == 1 and rolled[0]["restored"] == v1
        assert "no-such-tty" not in open(path).read()      # the file is back too
        head.wait(lambda: meters_list(head)["config_version"] == v1)
        assert meter_ids(head) == ["m1", "m2", "m3", "m5", "m6"]
        # still running the applied configuration: polled after the rollback
        t_back = time.time()
        head.wait(lambda: readings_after(head, "m5", t_back), timeout=15)

        # a whole interval after the removal, the others are read again, m4 no more (a
        # read in flight when it was removed may finish)
        head.wait(lambda: readings_after(head, "m1", t_done + 10), timeout=30)
        assert not readings_after(head, "m4", t_done + 1)
        assert validate_against_asyncapi(head) == {
            "meters", "event.config.applied", "event.config.rolled_back",
            "result.accepted", "result.done.config_update",
            "result.rejected.config_update", "result.failed.config_update"}
        # no reading lost, no stream renumbered across all of it
        err = stop(gw)
        assert "rolled back" in err
        rows = head.readings()
        seqs = sorted(unique_seqs(rows))
        assert seqs == list(range(1, seqs[-1] + 1))
        assert len({b["jid"] for b in head.topic("readings")}) == 1
    finally:
        rig.close()


def test_a_restart_during_the_health_check_concludes_it_at_start(tmp_path, broker):
    rig = Rig(tmp_path, broker, sim_meters=4)
    key, path, original, head, gw = rig.key, rig.path, rig.original, rig.head, rig.gw
    try:
        head.wait(lambda: meter_ids(head) == ["m1", "m2", "m3", "m4"], timeout=30)
        v0 = meters_list(head)["config_version"]
        dead = {"ports": {"add": [{"name": "rs485-2", "device": str(tmp_path / "no-such-tty"),
                                   "baudrate": 19200}]},
                "meters": {"add": [dict(meter(9), port="rs485-2")]}}
        cmd = command(key, {"version": v0, "patch": dead, "health_timeout_s": 6})
        head.publish("commands", json.dumps(cmd))
        # the new file is written and its health check under way: the power goes
        head.wait(lambda: "no-such-tty" in open(path).read(), timeout=30)
        gw.send_signal(signal.SIGKILL)
        gw.wait(10)
        assert os.path.exists(path + ".pending")
        gw = mgw("run", "--config", path)
        # at start the unconfirmed configuration is checked again, found unhealthy, undone
        head.wait(lambda: events(head, "config.rolled_back"), timeout=40)
        rolled = events(head, "config.rolled_back")[0]
        assert rolled["after_restart"] is True and rolled["restored"] == v0
        assert "no-such-tty" in rolled["reason"] and rolled["command"] == cmd["id"]
        # the interrupted command is concluded by that check, not applied a second time
        head.wait(lambda: any(r.get("id") == cmd["id"] and r["status"] == "failed"
                              for r in head.topic("command-results")), timeout=30)
        res = [r for r in head.topic("command-results") if r.get("id") == cmd["id"]
               and r["status"] == "failed"][0]
        assert res["code"] == "rolled_back" and res["version"] == v0, res
        assert open(path).read() == original and not os.path.exists(path + ".pending")
        head.wait(lambda: meters_list(head)["config_version"] == v0)
        assert meter_ids(head) == ["m1", "m2", "m3", "m4"]
        assert len(events(head, "config.rolled_back")) == 1
        assert "event.config.rolled_back" in validate_against_asyncapi(head)
        stop(gw)
    finally:
        rig.gw = gw                         # the one running now, after a restart
        rig.close()


def test_sighup_after_a_local_edit_reloads_and_a_removed_meter_keeps_its_readings(
        tmp_path):
    from conftest import Broker
    # the broker keeps the head-end's session across its restart: what the gateway sends
    # before the head-end is back is kept for it
    broker = Broker(tmp_path, persistence=True).start()
    notify = NotifySocket(tmp_path)
    rig = Rig(tmp_path, broker, sim_meters=5, head=HeadEnd(broker, clean=False),
              env={"NOTIFY_SOCKET": notify.path})
    path, head, gw = rig.path, rig.head, rig.gw
    try:
        head.wait(lambda: meter_ids(head) == ["m1", "m2", "m3", "m4"], timeout=30)
        v0 = meters_list(head)["config_version"]
        head.wait(lambda: {r["meter"] for r in head.readings()} >= {"m1", "m2", "m3", "m4"},
                  timeout=30)
        # the broker goes away: readings (m4's among them) wait in the journal
        broker.stop()
        t_down = time.time()
        time.sleep(11)                      # longer than an interval: m4 is read meanwhile
        with open(path, "rb") as f:
            text = f.read().decode()
        edited = text.replace('id = "m4"', 'id = "m5"').replace(
            'address = "000000000004"', 'address = "000000000005"')
        assert edited != text
        # an edit `mgw config check` refuses is not loaded: the service goes on as it was
        with open(path, "w") as f:
            f.write(edited.replace("baudrate = 19200", "baudrate = 1234"))
        gw.send_signal(signal.SIGHUP)
        time.sleep(3)                       # the main loop takes it within a second
        assert gw.poll() is None
        # the technician fixes it: the same reload takes it
        with open(path, "w") as f:
            f.write(edited)
        gw.send_signal(signal.SIGHUP)
        t_edit = time.time()
        time.sleep(3)
        broker.start()
        head.wait(lambda: meter_ids(head) == ["m1", "m2", "m3", "m5"], timeout=60)
        v1 = meters_list(head)["config_version"]
        assert v1 != v0
        head.wait(lambda: events(head, "config.applied"), timeout=30)
        applied = events(head, "config.applied")[0]
        assert applied["source"] == "sighup" and applied["version"] == v1
        assert applied["changes"]["meters"] == {"added": ["m5"], "removed": ["m4"],
                                                "changed": {}}
        head.wait(lambda: readings_after(head, "m5", t_edit - 1), timeout=20)
        assert open(path + ".prev").read() == text
        # systemd hears the reload begin and end (sd_notify RELOADING=1, then READY=1)
        msgs = notify.messages
        reloading = [i for i, m in enumerate(msgs) if m.startswith("RELOADING=1")]
        assert len(reloading) == 1 and "MONOTONIC_USEC=" in msgs[reloading[0]]
        assert any(m.startswith("READY=1") for m in msgs[reloading[0] + 1:])
        assert "event.config.applied" in validate_against_asyncapi(head)
        err = stop(gw)
        assert "baudrate" in err            # the refused edit was named in the log
        # m4's readings buffered while the broker was away were still delivered
        rows = head.readings()
        seqs = sorted(unique_seqs(rows))
        assert seqs == list(range(1, seqs[-1] + 1))
        m4 = [r for r in rows if r["meter"] == "m4"]
        assert any(t_down < dt.datetime.fromisoformat(r["ts"]).timestamp() < t_edit + 1
                   for r in m4), m4
    finally:
        rig.close()
        broker.stop()


def test_systemctl_reload_checks_the_file_then_signals_the_service():
    unit = open(os.path.join(ROOT, "systemd", "meter-gateway.service")).read()
    reload = [line.split("=", 1)[1] for line in unit.splitlines()
              if line.startswith("ExecReload=")]
    # run in order, the first failing stops the rest: a file that fails the check never
    # reaches the running service
    assert reload == ["/usr/local/bin/mgw config check --config "
                      "/etc/meter-gateway/gateway.toml", "/bin/kill -HUP $MAINPID"]
    assert "ReadWritePaths=/etc/meter-gateway" in unit
    tmpfiles = open(os.path.join(ROOT, "systemd", "meter-gateway.tmpfiles.conf")).read()
    assert "d /etc/meter-gateway 0770 root meter-gateway -" in tmpfiles
