"""`mgw run` and `mgw demo`: the whole gateway wired from one configuration.

Start-up validates the whole configuration before anything starts, opens the state file and
the journal (refusing to start on a damaged state file), then starts one worker per line,
the uplink and the command executor. The main thread supervises: it restarts a dead worker
or uplink thread (counted), pings systemd's watchdog only while every thread shows signs of
life, writes status.json for `mgw status`, and publishes a health event at the configured
interval. SIGTERM/SIGINT stop it cleanly within a few seconds; a SIGKILL loses nothing that
was appended to the journal. SIGHUP and a signed config_update reload the configuration in
place (service/reload.py): lines, meters, schedules, accounts and tariffs, on this thread.
"""

import collections
import contextlib
import datetime as _dt
import json
import logging
import os
import queue
import signal
import threading
import time

from gateway import __version__
from gateway.store.accounts import AccountStore
from gateway.store.audit import AuditTrail
from gateway.store.docs import open_docs
from gateway.clock import ClockPolicy, rfc3339
from gateway.store import paths
from gateway.store.journal import JournalError, open_journal, save_marks
from gateway.line.poller import LinePoller, MeterSpec
from gateway.line.port import PortWorker
from gateway.registry import keyed_by
from gateway.service.reload import Reloader
from gateway.service.sdnotify import Notifier
from gateway.service.sink import ReadingSink, log_event
from gateway.store.state import StateError, StateStore

log = logging.getLogger("gateway")

HUNG_AFTER_S = 120.0          # a thread without a heartbeat this long is hung


class Gateway:
    def __init__(self, cfg, clock_policy=None, notifier=None, simulators=(), config_file=None):
        self.cfg = cfg
        self.started_at = time.time()
        self.clock = clock_policy or ClockPolicy(cfg.control.require_synced_clock)
        self.notifier = notifier or Notifier()
        self.simulators = list(simulators)
        data_dir = cfg.gateway.data_dir
        try:
            os.makedirs(data_dir, exist_ok=True)
            if cfg.gateway.status_dir:
                os.makedirs(cfg.gateway.status_dir, exist_ok=True)
        except OSError as exc:
            raise StateError("%s: cannot create the data folder (%s)"
                             % (data_dir, exc.strerror)) from None
        # one process per data folder, before anything in it is opened
        self.instance_lock = paths.acquire_lock(data_dir)
        try:
            self.reserve = paths.DiskReserve(paths.path(data_dir, paths.RESERVE))
            self.reserve.restore()          # best effort: a full disk at start is no error
            self.state = StateStore(paths.path(data_dir, paths.STATE),
                                    recover=cfg.storage.recover_state, reserve=self.reserve)
            self.journal = open_journal(paths.path(data_dir, paths.JOURNAL), self.state,
                                        quota_bytes=cfg.storage.journal_quota_mb * 1024 * 1024,
                                        reserve_bytes=cfg.storage.reserve_mb * 1024 * 1024)
            self.docs = open_docs(paths.path(data_dir, paths.DOCS), self.state,
                                  reserve=self.reserve, recover=cfg.storage.recover_state)
        except BaseException:
            for opened in ("journal", "state"):
                if hasattr(self, opened):
                    with contextlib.suppress(Exception):
                        getattr(self, opened).close()
            self.instance_lock.release()
            raise
        self._marks_saved_at = time.monotonic()
        self._backup_at = None          # the account store's last backup (monotonic)
        self.uplink = None
        self.sink = ReadingSink(self.journal, on_appended=self._appended)
        self.commands = queue.Queue(maxsize=1000)
        self.workers = {}
        self.pollers = {}
        self.restarts = collections.Counter()
        self._halt = threading.Event()
        self._health_due = 0.0
        self.executor = None
        self.costcontrol = None
        self.audit = None
        self.accounts = None
        self.updater = None
        self._started = False
        self.metrics = None
        # config_update and SIGHUP need the file the configuration came from
        self.reloader = Reloader(self, config_file) if config_file is not None else None
        self.unconfigured = []          # meters a scan found that are not configured
        self._meters_sent = None        # what the last retained meters list showed
        self._build_lines()

    # ---------------------------------------------------------------- wiring

    def _specs(self, port_name):
        return [MeterSpec.from_config(m) for m in self.cfg.meters if m.port == port_name]

    def spec(self, meter):
        """The poller's MeterSpec of a configured meter (one per meter, shared)."""
        return self.pollers[meter.port].meters[meter.id]

    def _build_lines(self):
        saved = self.state.get("meters", "all") or {}
        for port in self.cfg.ports:
            self.pollers[port.name] = self._new_poller(port, saved)
            self.workers[port.name] = self._new_worker(port)

    def _relay_seen(self, meter, state, ours):
        poller = self.pollers.get(meter.port)
        if poller is not None:
            poller.relay_seen(meter.id, state, ours)

    def _new_poller(self, port, saved=None):
        poller = LinePoller(self._specs(port.name), self.sink.readings, self.sink.event,
                            clock_trusted=self.clock.trusted,
                            offline_after=port.offline_after, catch_up_s=port.catch_up_s)
        if saved:
            offline = set(saved.get("offline", ()))
            freeze_days = saved.get("last_freeze_day", {})
            relay_open = set(saved.get("relay_open", ()))
            for mid, h in poller.health.items():
                h.online = mid not in offline
                if mid in relay_open:
                    h.relay = "open"        # a meter found closed after a restart: said
                if freeze_days.get(mid):
                    h.last_freeze_day = _dt.date.fromisoformat(freeze_days[mid])
        return poller

    def reconfigure(self, cfg, billing=True):
        """Swap in a validated configuration whose sections read once at start ([gateway],
        [storage], [uplink], [control], [metrics]) are this one's (service/reload.py
        checks). Lines whose settings are kept
        keep their worker and, for kept meters, their schedules and health; a removed
        line's worker is stopped (what it read is in the journal already); cost control is
        replaced when accounts, tariffs or its policy changed. The journal is not touched:
        no seq restarts, and a removed meter's readings still go out. Supervisor's thread
        only."""
        old_ports = {p.name: p for p in self.cfg.ports}
        self.cfg = cfg
        workers, pollers = dict(self.workers), dict(self.pollers)
        retired, fresh = [], []
        for name in set(old_ports) - {p.name for p in cfg.ports}:
            retired.append(workers.pop(name))
            pollers.pop(name)
        for port in cfg.ports:
            poller = pollers.get(port.name)
            if poller is None:
                poller = pollers[port.name] = self._new_poller(port)
            else:
                poller.offline_after = port.offline_after
                poller.catch_up_s = port.catch_up_s
                poller.reconfigure(self._specs(port.name))
            if port.name in workers and old_ports[port.name] == port:
                continue
            if port.name in workers:
                retired.append(workers[port.name])
            workers[port.name] = self._new_worker(port, poller)
            fresh.append(workers[port.name])
        # rebound, not mutated (other threads iterate them), before the old workers stop:
        # a job queued from now on goes to a worker that will run it
        self.pollers, self.workers = pollers, workers
        for w in retired:
            w.stop(2.0)                         # frees the device for its successor
        for w in fresh:
            w.start()
        if billing:
            if self.costcontrol is not None:
                self.costcontrol.stop()
            self.costcontrol = self._new_costcontrol()
            if self.costcontrol is not None:
                self.costcontrol.start()
        self.save_meter_state()

    def health_marks(self):
        """What is healthy now: the lines open, whether the uplink is connected."""
        return {"open": {n for n, w in self.workers.items() if w.line_stats()["open"]},
                "uplink": bool(self.uplink and self.uplink.state["connected"])}

    def health_problems(self, before, touched=()):
        """Why the gateway is not healthy after a reload (one line each): a line that was
        open before, or is new or changed, is not open; the uplink was connected before and
        is not now."""
        out = []
        for name, w in self.workers.items():
            if (name in before["open"] or name in touched) and not w.line_stats()["open"]:
                out.append(w.last_error or "port %s: %s not open" % (name, w.device))
        if before["uplink"] and not (self.uplink and self.uplink.state["connected"]):
            out.append("uplink: not connected (%s)" % (
                (self.uplink.state["last_error"] if self.uplink else None) or "no CONNACK"))
        return out

    def _new_worker(self, port, poller=None):
        return PortWorker(port.name, port.device, baudrate=port.baudrate, parity=port.parity,
                          bytesize=port.bytesize, stopbits=port.stopbits,
                          retries=port.retries, settle_s=port.settle_ms / 1000.0,
                          poll_source=poller or self.pollers[port.name])

    def _appended(self):
        if self.uplink is not None:
            self.uplink.notify()

    def start(self):
        self.updater = self._new_updater()
        if self.cfg.uplink.host:
            self.uplink = self._new_uplink()
        self.audit = AuditTrail(paths.path(self.cfg.gateway.data_dir, paths.AUDIT),
                                on_entry=self._audit_event)
        self.accounts = AccountStore(self.docs)
        self.executor = self._new_executor()
        self.costcontrol = self._new_costcontrol()
        for w in self.workers.values():
            w.start()
        if self.uplink is not None:
            self.uplink.start()
        self.executor.start()
        if self.costcontrol is not None:
            self.costcontrol.start()
        self.updater.start()
        self._started = True
        if self.cfg.metrics.listen:
            from gateway.service import metrics       # prometheus-client only when on
            self.metrics = metrics.serve(self.cfg.metrics.listen, self)
        self.sink.event("gateway.started", version=__version__,
                        ports=len(self.cfg.ports), meters=len(self.cfg.meters))
        if self.docs.recovered:
            self.sink.event("accounts.recovered", **self.docs.recovered)
        # the first backup comes with the first status round, off the way to READY
        self.notifier.ready(self.summary())
        log.info("gateway %s started: %d ports, %d meters, uplink %s",
                 self.cfg.gateway.id, len(self.cfg.ports), len(self.cfg.meters),
                 self.cfg.uplink.host or "none")

    def _new_executor(self):
        from gateway.control.executor import Executor
        from gateway.control.relay import Line
        return Executor(control_cfg=self.cfg.control, data_dir=self.cfg.gateway.data_dir,
                        intake=self.commands, meter_of=self.meter, spec_of=self.spec,
                        line=Line(self.port_worker, on_relay=self._relay_seen),
                        ledger=self.state,
                        accounts=self.accounts, journal=self.journal, audit=self.audit,
                        events=self.sink.event, clock=self.clock,
                        prepaid=lambda: self.costcontrol, notify=self._appended,
                        reserve=self.reserve, local_group=self.cfg.control.local_group,
                        ports=lambda: [p.name for p in self.cfg.ports],
                        meters=lambda: self.cfg.meters,
                        republish=self._republish if self.cfg.uplink.host else None,
                        config=self.reloader, found=self.scan_found,
                        updates=self.updater)

    def _new_uplink(self):
        from gateway.uplink.mqtt import Uplink
        up = Uplink(self.cfg.uplink, self.cfg.gateway.id, self.journal, self.commands,
                    self.started_at)
        up.ota_chunks = lambda tail, payload: self.updater.on_chunk(tail, payload)
        return up

    def _new_updater(self):
        from gateway.control.executor import RELAY_GATE
        from gateway.ota.updater import Updater
        return Updater(self.cfg.ota, self.cfg.gateway.data_dir, version=__version__,
                       events=self.sink.event, relay_gate=RELAY_GATE,
                       publish=lambda sub, payload: self.uplink is not None and
                       self.uplink.publish_now(sub, payload),
                       healthy=self._healthy)

    def _healthy(self):
        """(healthy?, why not) for an update's check: started, lines open, uplink up."""
        if not self._started:
            return False, "not started"
        closed = [n for n, w in self.workers.items() if not w.line_stats()["open"]]
        if closed:
            return False, "line %s is not open" % closed[0]
        if self.uplink is None or not self.uplink.state["connected"]:
            return False, "the uplink is not connected"
        return True, None

    def _new_costcontrol(self):
        """Cost control, or None on a gateway without prepaid accounts: billing's modules
        then stay unloaded (about 1 MB resident)."""
        if not self.cfg.accounts:
            return None
        from gateway.billing import costcontrol
        return costcontrol.CostControl(
            accounts=self.cfg.accounts, tariffs=self.cfg.tariffs,
            policy=self.cfg.cost_control, store=self.accounts, journal=self.journal,
            events=self.sink.event, relay_states=self._relay_states,
            request_relay=lambda meter, action, reason, tick=None: self.executor.local(
                meter, action, source="costcontrol", reason=reason, tick=tick),
            cutoff_times=lambda since: self.executor.cutoff_times(since))

    def _relay_states(self):
        out = {}
        for p in self.pollers.values():
            for mid, h in p.health.items():
                if getattr(h, "relay", None):
                    out[mid] = h.relay
        return out

    def _audit_event(self, entry):
        # the trail is uploaded too: each entry as an event, hash included
        log_event("audit", {"entry": entry})
        try:
            self.journal.append_event("audit", entry=entry)
        except JournalError:
            log.exception("audit upload")

    def _republish(self, *result):
        if self.uplink is not None:
            self.uplink.republish(*result)

    def port_worker(self, port_name):
        return self.workers[port_name]

    def meter(self, meter_id):
        for m in self.cfg.meters:
            if m.id == meter_id:
                return m
        return None

    # ---------------------------------------------------------------- supervision

    def supervise_once(self):
        now = time.monotonic()
        healthy = True
        for name, w in list(self.workers.items()):
            if not w.is_alive():
                self.restarts[name] += 1
                log.error("port %s: worker thread died; restarting (%d restarts)", name,
                          self.restarts[name])
                w.stop(0.1)       # release the port (its lock) and answer what was queued
                port = next(p for p in self.cfg.ports if p.name == name)
                nw = self._new_worker(port)
                nw.stats.restarts = self.restarts[name]
                self.workers[name] = nw
                nw.start()
            elif now - w.heartbeat > HUNG_AFTER_S:
                healthy = False
                log.error("port %s: worker shows no sign of life for %.0f s", name,
                          now - w.heartbeat)
        if self.uplink is not None and not self.uplink.is_alive():
            self.restarts["uplink"] += 1
            log.error("uplink thread died; restarting (%d restarts)", self.restarts["uplink"])
            self.uplink = self._new_uplink()
            self.uplink.start()
        elif self.uplink is not None and now - self.uplink.heartbeat > HUNG_AFTER_S:
            healthy = False
        for attr, factory in (("executor", self._new_executor),
                              ("costcontrol", self._new_costcontrol),
                              ("updater", self._new_updater)):
            thread = getattr(self, attr)
            if thread is None:
                continue
            hung = now - thread.heartbeat > HUNG_AFTER_S
            if thread.is_alive() and not hung:
                continue
            # replaced by the supervisor (no component replaces itself); a hung thread is
            # told to stop and left behind: the watchdog is not pinged this round
            self.restarts[thread.name] += 1
            if hung:
                healthy = False
                log.error("%s thread shows no sign of life for %.0f s; replacing it",
                          thread.name, now - thread.heartbeat)
                thread._halt.set()
            else:
                log.error("%s thread died; restarting", thread.name)
            new = factory()
            setattr(self, attr, new)
            new.start()
        self.sink.flush()
        return healthy

    def run_forever(self, stop_event=None):
        stop_event = stop_event or self._halt
        interval = self.cfg.gateway.status_interval_s
        wd = self.notifier.watchdog_s
        next_status = 0.0
        while not stop_event.is_set():
            if self.reloader is not None:
                self.reloader.run_pending()
            healthy = self.supervise_once()
            if healthy and wd:
                self.notifier.watchdog()
            now = time.time()
            if now >= next_status:
                next_status = now + interval
                self.write_status()
                self.notifier.status(self.summary())
                self.trim_memory()
            if now >= self._health_due:
                if self._health_due:
                    self.sink.event("gateway.health", **self.health())
                self._health_due = now + self.cfg.uplink.health_interval_s
            self.publish_meters()
            stop_event.wait(min(1.0, wd / 3 if wd else 1.0))

    def stop(self, timeout=4.0):
        self.notifier.stopping()
        if self.reloader is not None:
            self.reloader.close()
        if self.metrics is not None:
            self.metrics.stop()
        deadline = time.monotonic() + timeout
        for w in self.workers.values():
            w._halt.set()
        for t in (self.executor, self.costcontrol):
            if t is not None:
                t.stop()
        if self.updater is not None:
            self.updater.stop(0.5)    # an installer it waits for goes on in its own session
        for w in self.workers.values():
            w.stop(max(0.1, deadline - time.monotonic()))
        self.sink.event("gateway.stopped")
        self.sink.flush()
        self.save_meter_state()
        if self.uplink is not None:
            self.uplink.stop(max(0.5, deadline - time.monotonic()))
        self.write_status(stopped=True)
        self.save_journal_marks(force=True)
        if self.audit is not None:
            self.audit.close()          # its last aggregate goes to the journal too
        self.journal.close()
        self.docs.close()
        self.state.close()
        self.instance_lock.release()

    # ---------------------------------------------------------------- status

    def meters_list(self):
        """The retained `{root}/meters` message: the configured meters (id, protocol,
        address or unit, port, account mode) and their health, the meters a scan found
        that are not configured, and the configuration's version."""
        return json.loads(self._meters_payload(self._meters_health()))

    def scan_found(self, port, protocol, found):
        """A scan's meters that are not configured, listed as `unconfigured` in the meters
        message (a later scan of the same port and protocol replaces them; any thread)."""
        keep = [u for u in self.unconfigured if (u["port"], u["protocol"]) != (port, protocol)]
        for f in found:
            if f.get("configured_as") is None:
                e = {"port": port, "protocol": protocol}
                e.update((k, f[k]) for k in ("address", "unit", "profile", "version",
                                             "baudrate", "parity") if f.get(k) is not None)
                keep.append(e)
        self.unconfigured = keep            # rebound: the supervisor reads it

    def _unconfigured(self):
        # one configured since (a config_update after the scan) is no longer listed
        have = {(m.port, m.protocol, m.address if m.unit is None else m.unit)
                for m in self.cfg.meters}
        return [u for u in self.unconfigured
                if (u["port"], u["protocol"], u.get("address", u.get("unit"))) not in have]

    def _meters_health(self):
        """One letter per configured meter: u(nknown, not answered yet), o(nline),
        x (offline); a small signature compared every round instead of the list."""
        out = []
        for m in self.cfg.meters:
            poller = self.pollers.get(m.port)
            h = poller.health.get(m.id) if poller is not None else None
            out.append("u" if h is None or (h.online and h.last_ok is None)
                       else "o" if h.online else "x")
        return "".join(out)

    def _grades(self):
        """{meter: arrears grade} of the meters with an account (none before billing)."""
        if self.costcontrol is None or self.accounts is None:
            return {}
        return self.accounts.field("grade")

    def _meters_payload(self, health, grades=None, ts=None):
        # written entry by entry: a thousand meters as dicts at once would stay in the
        # resident set (freed small objects fragment the heap)
        modes = {a.meter: a.mode for a in self.cfg.accounts}
        grades = self._grades() if grades is None else grades
        words = {"u": "unknown", "o": "online", "x": "offline"}

        def entry(m, letter):
            e = {"id": m.id, "protocol": m.protocol, "port": m.port}
            if keyed_by(m.protocol) == "unit":
                e.update(unit=m.unit, profile=m.profile)
            else:
                e["address"] = m.address
            e["account"] = modes.get(m.id)
            if e["account"] is not None:
                e["grade"] = grades.get(m.id) or "none"
            e["health"] = words[letter]
            return json.dumps(e, separators=(",", ":"), ensure_ascii=False)
        head = {"v": 1, "config_version": self.reloader.version if self.reloader else None}
        if ts:
            head["ts"] = ts
        return "%s,\"meters\":[%s],\"unconfigured\":%s}" % (
            json.dumps(head, separators=(",", ":"))[:-1],
            ",".join(entry(m, c) for m, c in zip(self.cfg.meters, health)),
            json.dumps(self._unconfigured(), separators=(",", ":"), ensure_ascii=False))

    def publish_meters(self, force=False):
        """Republish the retained meters list when it changed (or the uplink was
        replaced: a new one has not sent it)."""
        if self.uplink is None:
            return False
        health = self._meters_health()
        grades = self._grades()
        sig = (self.uplink, self.cfg, health, self.unconfigured, grades)
        if not force and self._meters_sent == sig:
            return False
        self._meters_sent = sig
        self.uplink.retain("meters", self._meters_payload(
            health, grades, ts=_dt.datetime.now().astimezone().isoformat(timespec="seconds")))
        return True

    BACKUP_EVERY_S = 86400.0

    def backup_accounts(self, force=False):
        """The account store's daily round (and once at start): txn ids older than
        [storage] txn_keep_days are forgotten, then the backup (`accounts.db.bak`) a
        damaged store is recovered from with [storage] recover_state."""
        now = time.monotonic()
        if not force and self._backup_at is not None and \
                now - self._backup_at < self.BACKUP_EVERY_S:
            return False
        self._backup_at = now
        try:
            forgotten = self.accounts.forget_txns(
                time.time() - self.cfg.storage.txn_keep_days * 86400)
            if forgotten:
                log.info("payment ledger: forgot %d txn ids older than %d days", forgotten,
                         self.cfg.storage.txn_keep_days)
            self.docs.backup()
        except StateError as exc:
            log.warning("%s", exc)
            return False
        return True

    MARKS_EVERY_S = 60.0

    def save_journal_marks(self, force=False):
        """Store the journal's next seqs in the state file (the high-water mark a replaced
        journal continues from). At most once a minute unless forced: each is a state-file
        write, and the journal id, not the mark, is what keeps a head-end from mistaking a
        new numbering for duplicates."""
        now = time.monotonic()
        if not force and now - self._marks_saved_at < self.MARKS_EVERY_S:
            return False
        self._marks_saved_at = now
        try:
            return save_marks(self.journal, self.state)
        except JournalError as exc:
            log.warning("cannot read the journal's marks: %s", exc)
            return False

    def save_meter_state(self):
        """Meters' online state, freeze progress and open relays: one small document (a
        thousand meters make one entry each only when offline, freezing or cut off),
        written only on change."""
        offline = []
        freeze = {}
        relay_open = []
        for poller in self.pollers.values():
            for mid, h in poller.health.items():
                if not h.online:
                    offline.append(mid)
                if h.last_freeze_day:
                    freeze[mid] = h.last_freeze_day.isoformat()
                if h.relay == "open":
                    relay_open.append(mid)
        # open relays only (few): the state file stays small, closed is the usual state
        doc = {"offline": sorted(offline), "last_freeze_day": freeze,
               "relay_open": sorted(relay_open)}
        if self.state.get("meters", "all") != doc:
            self.state.put("meters", "all", doc)

    def health(self):
        up = self.uplink.status() if self.uplink else None
        offline = [mid for p in self.pollers.values() for mid, h in p.health.items()
                   if not h.online]
        return {"uplink": {k: up[k] for k in ("connected", "backlog", "oldest_unsent_age_s",
                                              "last_ack")} if up else None,
                "meters_offline": offline, "restarts": dict(self.restarts),
                "missed_slots": {mid: h.missed_slots for p in self.pollers.values()
                                 for mid, h in p.health.items() if h.missed_slots},
                "memory_pending": self.sink.pending, "lost_in_memory": self.sink.lost,
                "events_lost_in_memory": self.sink.lost_events}

    def summary(self):
        online = sum(1 for p in self.pollers.values() for h in p.health.values() if h.online)
        total = sum(len(p.health) for p in self.pollers.values())
        up = "uplink up" if self.uplink and self.uplink.state["connected"] else \
            "uplink down" if self.uplink else "no uplink"
        try:
            pending = self.journal.stats()["streams"]["readings"]["consumers"].get(
                "uplink", {}).get("pending", 0)
        except JournalError:
            pending = "?"
        return "%d/%d meters online, %s, %s readings buffered" % (online, total, up, pending)

    def status(self):
        try:
            jstats = self.journal.stats()
        except JournalError:
            jstats = None
        meters = []
        balances = self.costcontrol.balances() if self.costcontrol else {}
        relays = self.costcontrol.relay_states() if self.costcontrol else {}
        last = self._last_readings()
        for port, poller in self.pollers.items():
            for mid, h in poller.health.items():
                meters.append({"id": mid, "port": port, "online": h.online,
                               "last_reading": last.get(mid), "last_error": h.last_error,
                               "drift_s": h.drift_s, "relay": relays.get(mid),
                               "balance": balances.get(mid),
                               "missed_slots": h.missed_slots, "caught_up": h.caught_up})
        buffer = {}
        if jstats:
            for s, st in jstats["streams"].items():
                buffer[s] = st["consumers"].get("uplink", {}).get("pending", st["stored"])
            buffer["bytes"] = jstats["file_bytes"]
            buffer["dropped"] = {s: st["dropped"] for s, st in jstats["streams"].items()}
        return {"v": 1, "gateway": self.cfg.gateway.id, "version": __version__,
                "config_version": self.reloader.version if self.reloader else None,
                "pid": os.getpid(), "started_at": rfc3339(self.started_at),
                "written_at": rfc3339(time.time()),
                "clock_trusted": self.clock.trusted(),
                "uplink": self.uplink.status(jstats) if self.uplink else None,
                "ports": [w.line_stats() for w in self.workers.values()],
                "meters": meters, "buffer": buffer,
                "accounts": self.costcontrol.accounts_status() if self.costcontrol else {},
                "update": self.updater.status() if self.updater else None,
                "restarts": dict(self.restarts)}

    def _last_readings(self):
        out = {}
        for p in self.pollers.values():
            for mid, h in p.health.items():
                if h.last_ok:
                    # RFC 3339, as everywhere else (+08:00, not +0800)
                    out[mid] = _dt.datetime.fromtimestamp(h.last_ok).astimezone().isoformat(
                        timespec="seconds")
        return out

    def trim_memory(self):
        """Give freed heap back to the kernel (glibc keeps it otherwise): the status and
        poll cycles allocate and free in bursts, and the box has little RAM to spare."""
        try:
            from gateway.clock import libc
            libc().malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def write_status(self, stopped=False):
        status = self.status()
        status["stopped"] = stopped
        path = paths.status_path(self.cfg.gateway)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(status, f, default=str)
            os.replace(tmp, path)   # no fsync: a status snapshot may be lost, never torn
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc.strerror)
        self.save_meter_state()
        self.save_journal_marks()
        self.backup_accounts()
        if not self.reserve.present:
            self.reserve.restore()          # the disk has room again: keep it back


# ---------------------------------------------------------------- entry points

def serve(gw, stop_event=None, on_started=None):
    stop_event = stop_event or threading.Event()

    def handler(signum, frame):
        log.info("signal %d: stopping", signum)
        stop_event.set()
    def reload(signum, frame):
        gw.reloader.request_file_reload()       # done by the main loop, not in here
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, handler)
        if gw.reloader is not None:
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        gw.start()
        if on_started:
            on_started(gw)
        gw.run_forever(stop_event)
    finally:
        gw.stop()
        for s, h in old.items():
            signal.signal(s, h)
    log.info("gateway stopped")
    return 0


__all__ = ["Gateway", "serve"]
