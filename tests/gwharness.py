"""An in-process gateway on simulated meters, for command and cost-control tests."""

import datetime as dt
import json
import threading
import time
import uuid

from gateway.clock import ClockPolicy
from gateway.service.config import validate
from gateway.service.gateway import Gateway, serve
from gateway.control.signing import generate, load_private_key, sign
from gateway.sim.dlt645 import Faults, SimLine, make_meters


class Harness:
    def __init__(self, tmp_path, broker=None, meters=4, baudrate=115200, accounts=(),
                 tariffs=None, cost_control=None, control=None, clock_trusted=True,
                 meter_kw=None, sim_kw=None, interval_s=None, storage=None, data_dir=None):
        self.tmp = tmp_path
        self.keys = tmp_path / "keys"
        self.key_paths = generate(str(self.keys))
        self.key = load_private_key(self.key_paths[0])
        self.sim_meters = make_meters(meters, first_address=1,
                                      faults=Faults(latency_s=0.005), **(sim_kw or {}))
        self.line = SimLine(self.sim_meters, baudrate=baudrate)
        self.line.start()
        doc = {
            "gateway": {"id": "gw-test", "data_dir": str(data_dir or tmp_path / "data"),
                        "status_interval_s": 1},
            "ports": [{"name": "p1", "device": self.line.device, "baudrate": baudrate,
                       "retries": 1}],
            "meters": [dict({"id": "m%d" % (i + 1), "port": "p1", "address": m.address,
                             "interval_s": 10, "instant_interval_s": 0,
                             "clock_interval_s": 0}, **(meter_kw or {}))
                       for i, m in enumerate(self.sim_meters)],
            "control": dict({"public_keys": [self.key_paths[1]],
                             "require_synced_clock": True}, **(control or {})),
            "tariffs": tariffs or {"flat": {"kind": "flat", "price": "0.5000"}},
            "accounts": list(accounts),
        }
        if cost_control:
            doc["cost_control"] = cost_control
        if storage:
            doc["storage"] = storage
        if broker is not None:
            doc["uplink"] = {"host": broker.host, "port": broker.port, "batch_age_s": 0.1}
        self.doc = json.loads(json.dumps(doc))
        cfg = validate(doc, "<test>")
        if interval_s:                       # faster than the config allows: tests only
            cfg = cfg.replace(meters=tuple(m.replace(interval_s=interval_s)
                                           for m in cfg.meters))
        self.cfg = cfg
        self.clock = ClockPolicy(True, probe=lambda: self.clock_ok, cache_s=0)
        self.clock_ok = clock_trusted
        self.gw = None
        self._stop = None
        self._thread = None

    def start(self):
        self.gw = Gateway(self.cfg, clock_policy=self.clock)
        self._stop = threading.Event()
        started = threading.Event()
        self._thread = threading.Thread(target=serve, args=(self.gw, self._stop),
                                        kwargs={"on_started": lambda g: started.set()},
                                        daemon=True)
        self._thread.start()
        assert started.wait(10)
        return self

    def stop(self):
        if self._stop:
            self._stop.set()
            self._thread.join(15)
            self._stop = None

    def close(self):
        self.stop()
        self.line.stop()

    def command(self, meter, action, params=None, valid_s=600, issued_offset_s=0, key=None,
                **over):
        now = dt.datetime.now().astimezone().replace(microsecond=0) + \
            dt.timedelta(seconds=issued_offset_s)
        cmd = {"v": 1, "id": str(uuid.uuid4()), "meter": meter, "action": action,
               "issued_at": now.isoformat(),
               "expires_at": (now + dt.timedelta(seconds=valid_s)).isoformat(),
               "params": params or {}}
        cmd.update(over)
        return sign(cmd, key or self.key)

    def send(self, cmd):
        """Hand a command to the executor as the uplink would; returns its results."""
        payload = cmd if isinstance(cmd, bytes) else json.dumps(cmd).encode()
        from gateway.uplink.mqtt import Command
        self.gw.commands.put(Command(payload))

    def results(self, cmd_id=None):
        rows = self.gw.journal.read("uplink", "results", limit=100000) if self.gw.uplink \
            else self._all_results()
        out = [r.body for r in rows]
        return [r for r in out if cmd_id is None or r.get("id") == cmd_id]

    def _all_results(self):
        self.gw.journal.register("test", "results")
        return self.gw.journal.read("test", "results", limit=100000, after=0)

    def wait_result(self, cmd_id, statuses=("done", "failed", "rejected"), timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            for r in self.results(cmd_id):
                if r["status"] in statuses:
                    return r
            time.sleep(0.05)
        raise AssertionError("no final result for %s: %s" % (cmd_id, self.results(cmd_id)))

    def relay_moves(self):
        return [(m.address, s, c) for m in self.sim_meters for _, s, c in m.relay_log]
