"""The updater thread: one software update at a time, from the signed manifest to a
healthy new version (or the previous one back).

Stages, each an event on {root}/events and each persisted in {data_dir}/ota/state.json
before it is acted on, so a power cut or a SIGKILL resumes where it was:

  downloading  chunks asked for on {root}/ota/requests, answered on
               {root}/ota/chunks/<id>/<n>, appended in order to <id>.part; the file's
               length is the progress (a torn last chunk is cut off at resume)
  verified     size and SHA-256 of the whole file match the manifest
  installing   the installer runs in its own session (it outlives this process, which
               it restarts); never while a relay operation runs (relay_gate)
  checking     the process that starts next reads the state: the new version must be
               healthy within health_timeout_s
  done | failed (reason) | rolled_back (the kept previous package reinstalled)

Under systemd the root helper (`mgw ota install-requested`) also waits for "done" after
installing, and rolls back itself when it does not come (a version that cannot start
never checks its own health): it leaves rolling_back with rollback_by and the reason.

Memory stays bounded: at most `window` chunks wait in a queue, one is written at a time,
and the hash is computed by streaming the file.
"""

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import threading
import time

from gateway.ota import manifest as mf

log = logging.getLogger(__name__)

STATE = "state.json"
CURRENT = "current.pkg"           # the package of the running version, kept for rollback
CURRENT_INFO = "current.json"
REQUEST = "install-request"        # read by the root helper (mgw ota install-requested)
IDLE_S = 0.5
PROGRESS_STEP = 10                # a downloading event every 10 %
MIN_FREE_MARGIN = 4 * 1024 * 1024
RESULT = "install-result"         # what the root helper says when it did not install
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def debian_arch():
    try:
        out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf",
            "armv6l": "armel"}.get(machine, machine)


def _write_json(path, doc):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(65536), b""):
            h.update(block)
    return h.hexdigest()


class Updater(threading.Thread):
    def __init__(self, cfg, data_dir, *, version, events, publish, healthy,
                 relay_gate=None, arch=None):
        super().__init__(name="ota", daemon=True)
        self.cfg = cfg
        self.dir = os.path.join(data_dir, "ota")
        os.makedirs(self.dir, exist_ok=True)
        self.version = version                # the running version
        self.events = events                  # sink.event(type, **fields)
        self.publish = publish                # (subtopic, bytes) -> sent?
        self.healthy = healthy                # () -> (bool, why not)
        self.relay_gate = relay_gate or threading.Lock()
        self.arch = arch or cfg.arch or debian_arch()
        self.chunks = queue.Queue(maxsize=cfg.window * 2)
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.heartbeat = time.monotonic()
        self.state = self._load()
        self.counts = {"chunks": 0, "dropped": 0, "requests": 0}

    # ---------------------------------------------------------------- state

    def _path(self, name):
        return os.path.join(self.dir, name)

    def _load(self):
        try:
            with open(self._path(STATE)) as f:
                doc = json.load(f)
            return doc if isinstance(doc, dict) and "phase" in doc else {}
        except (OSError, ValueError):
            return {}

    def _save(self, **changes):
        with self._lock:
            state = dict(self.state, **changes)
            _write_json(self._path(STATE), state)
            self.state = state

    def status(self):
        s = self.state
        out = {"running_version": self.version, "phase": s.get("phase"),
               "id": s.get("id"), "target": s.get("manifest", {}).get("version")}
        if s.get("phase") == "downloading":
            out["received"] = self._received_bytes()
        return out

    # ---------------------------------------------------------------- the command

    def check(self, cmd_id, params):
        """Why this update cannot start (text), or None: called at admission."""
        if not self.cfg.enabled:
            return "over-the-air updates are disabled on this gateway ([ota] enabled)"
        try:
            m = mf.parse(params)
        except mf.BadManifest as exc:
            return str(exc)
        why = mf.refusal(m, running=self.version, arch=self.arch,
                         max_bytes=int(self.cfg.max_package_mb * 1024 * 1024))
        if why:
            return why
        busy = self.state.get("phase") in ("downloading", "verified", "installing",
                                           "checking", "rolling_back")
        if busy and self.state.get("id") != cmd_id:
            return "update %s is in progress" % self.state.get("id")
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        have = self._received_bytes() if self.state.get("id") == cmd_id else 0
        # the package and, after installation, its kept copy: twice its size
        need = 2 * m.size - have + MIN_FREE_MARGIN
        if free < need:
            return "not enough free space in %s: %d bytes free, %d needed" % (
                self.dir, free, need)
        return None

    def start_update(self, cmd_id, params, signed=None):
        """Admitted: start (or, for the same id delivered again, go on with) the update.
        `signed`: the whole signed command, kept so that a privileged installer can check
        the package against the head-end's signature itself (`mgw ota install-requested`).
        Returns the command's result (status, reason, extra)."""
        m = mf.parse(params)
        if self.state.get("id") != cmd_id or self.state.get("phase") in (None, "done",
                                                                       "failed",
                                                                       "rolled_back"):
            if self.state.get("id") != cmd_id:
                self._remove_part()
            self._save(id=cmd_id, phase="downloading", manifest=m.as_dict(),
                       previous=self.version, started_at=time.time(), reason=None,
                       command=signed)
            self.events("update.downloading", id=cmd_id, version=m.version,
                        received=0, size=m.size, percent=0)
        self._wake.set()
        return "done", None, {"update": cmd_id, "version": m.version,
                              "running_version": self.version}

    def on_chunk(self, topic_tail, payload):
        """From the uplink's network thread: ota/chunks/<id>/<n>. Never blocks: a full
        queue drops the chunk (it is asked for again)."""
        parts = topic_tail.split("/")
        if len(parts) != 2 or not parts[1].isdigit() or not _ID.fullmatch(parts[0]):
            return
        try:
            self.chunks.put_nowait((parts[0], int(parts[1]), bytes(payload)))
        except queue.Full:
            self.counts["dropped"] += 1
        self._wake.set()

    # ---------------------------------------------------------------- the thread

    def stop(self, timeout=5.0):
        self._halt.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self):
        try:
            self._after_restart()
        except Exception:
            log.exception("ota: resuming")
        while not self._halt.is_set():
            self.heartbeat = time.monotonic()
            try:
                phase = self.state.get("phase")
                if phase == "downloading":
                    self._download()
                elif phase == "verified":
                    self._install()
                elif phase == "checking":
                    self._check_health()
                else:
                    self._wake.wait(IDLE_S)
                    self._wake.clear()
            except Exception as exc:
                log.exception("ota")
                self._fail("internal error: %s" % exc)

    def _after_restart(self):
        """What the state says after a start: an installation this process came from."""
        phase = self.state.get("phase")
        m = self.state.get("manifest") or {}
        if phase == "installing":
            if self._same_version(m.get("version")):
                deadline = time.time() + self.cfg.health_timeout_s
                self._save(phase="checking", deadline=deadline)
                log.info("ota: running %s after the update; healthy within %.0f s?",
                         self.version, self.cfg.health_timeout_s)
            else:
                self._fail("the installer did not install %s (running %s)"
                           % (m.get("version"), self.version))
        elif phase == "rolling_back":
            if self.state.get("rollback_by") and self._same_version(m.get("version")):
                # the root helper is reinstalling the previous package (this version did
                # not report healthy in time): it restarts us, the previous one reports
                log.warning("ota: %s is being rolled back by the root helper: %s",
                            self.version, self.state.get("reason"))
            elif self._same_version(self.state.get("previous")):
                self._save(phase="rolled_back")
                self.events("update.rolled_back", id=self.state.get("id"),
                            version=self.version, reason=self.state.get("reason"))
            else:
                self._save(phase="failed")
                self.events("update.failed", id=self.state.get("id"),
                            reason="rollback did not bring back %s (running %s)"
                            % (self.state.get("previous"), self.version))
        elif phase == "checking":
            # restarted while checking (the new version crashed, or a power cut): the
            # deadline stays; the next health checks decide
            pass

    def _same_version(self, version):
        if not version:
            return False
        return mf.compare(version if "-" in self.version else mf._split(version)[1],
                          self.version) == 0

    def _fail(self, reason, rollback=False):
        log.error("ota: update %s failed: %s", self.state.get("id"), reason)
        self.events("update.failed", id=self.state.get("id"), reason=reason)
        if rollback and os.path.exists(self._path(CURRENT)):
            self._save(phase="rolling_back", reason=reason)
            self._run_installer(self._path(CURRENT), rollback=True)
            return
        self._save(phase="failed", reason=reason)
        self._remove_part()

    # ---------------------------------------------------------------- transfer

    def _part(self):
        return self._path("%s.part" % self.state["id"])

    def _pkg(self):
        return self._path("%s.pkg" % self.state["id"])

    def _received_bytes(self):
        try:
            return os.path.getsize(self._part())
        except (OSError, KeyError):
            return 0

    def _remove_part(self):
        for name in os.listdir(self.dir):
            if name.endswith((".part", ".pkg")) and name != CURRENT:
                try:
                    os.unlink(self._path(name))
                except OSError:
                    pass

    def _download(self):
        m = mf.Manifest(**self.state["manifest"])
        uid = self.state["id"]
        part = self._part()
        # whole chunks only: a power cut may have torn the last one
        with open(part, "ab") as f:
            have = f.tell() // m.chunk_size * m.chunk_size
            f.truncate(have)
        n = have // m.chunk_size
        asked_upto, asked_at = n, 0.0
        last_percent = -1
        f = open(part, "ab")
        try:
            while n < m.chunks and not self._halt.is_set() and \
                    self.state.get("phase") == "downloading":
                self.heartbeat = time.monotonic()
                now = time.monotonic()
                if asked_upto <= n or now - asked_at > self.cfg.chunk_timeout_s:
                    # (again) from the first one not stored: a lost request or chunk, a
                    # broker outage, a restart
                    count = min(self.cfg.window, m.chunks - n)
                    if self.publish("ota/requests", json.dumps(
                            {"v": 1, "id": uid, "n": n, "count": count},
                            separators=(",", ":")).encode()):
                        self.counts["requests"] += 1
                        asked_upto, asked_at = n + count, now
                    else:
                        asked_at = now - self.cfg.chunk_timeout_s + 1.0   # retry in 1 s
                try:
                    cid, k, data = self.chunks.get(timeout=0.5)
                except queue.Empty:
                    continue
                expected = min(m.chunk_size, m.size - k * m.chunk_size) if k < m.chunks \
                    else -1
                if cid != uid or k != n or len(data) != expected:
                    continue          # another update's, a duplicate, or out of order
                f.write(data)
                n += 1
                self.counts["chunks"] += 1
                if n % 16 == 0 or n == m.chunks:
                    f.flush()
                    os.fsync(f.fileno())
                if n >= asked_upto:
                    asked_at = 0.0      # ask for the next window now
                percent = n * 100 // m.chunks
                if percent // PROGRESS_STEP != last_percent // PROGRESS_STEP and n < m.chunks:
                    last_percent = percent
                    self.events("update.downloading", id=uid, version=m.version,
                                received=min(n * m.chunk_size, m.size), size=m.size,
                                percent=percent)
                if self.cfg.pace_ms:
                    self._halt.wait(self.cfg.pace_ms / 1000.0)
        finally:
            f.close()
        if n >= m.chunks:
            self._verify(m)

    def _verify(self, m):
        part = self._part()
        size = os.path.getsize(part)
        if size != m.size:
            return self._fail("size %d is not the manifest's %d" % (size, m.size))
        digest = _sha256(part)
        if digest != m.sha256:
            return self._fail("sha256 %s does not match the manifest" % digest)
        os.replace(part, self._pkg())
        self._save(phase="verified")
        self.events("update.verified", id=self.state["id"], version=m.version,
                    sha256=digest)

    # ---------------------------------------------------------------- installation

    def _install(self):
        m = self.state["manifest"]
        pkg = self._pkg()
        if not os.path.exists(pkg):
            return self._fail("the verified package %s is gone" % pkg)
        if _sha256(pkg) != m["sha256"]:
            return self._fail("the stored package no longer matches its sha256")
        self.events("update.installing", id=self.state["id"], version=m["version"])
        self._save(phase="installing")
        self._run_installer(pkg)

    def _run_installer(self, pkg, rollback=False):
        argv = [a.replace("{package}", pkg) for a in self.cfg.installer]
        # never in the middle of a relay operation: the gate is held until the installer
        # ends (or this process is stopped by it)
        with self.relay_gate:
            log.warning("ota: %s %s with: %s", "rolling back to" if rollback else
                        "installing", os.path.basename(pkg), " ".join(argv))
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                out, _ = proc.communicate(timeout=self.cfg.installer_timeout_s)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                proc.kill()
                out, rc = b"timeout", -1
            except OSError as exc:
                out, rc = str(exc).encode(), -1
        if self._halt.is_set():
            return                  # the installer is stopping us: the next start decides
        last = (out or b"").decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        if rc != 0:
            if rollback:
                self._save(phase="failed")
                self.events("update.failed", id=self.state.get("id"),
                            reason="rollback installer exited %s: %s" % (rc, last[0][:200]))
                return
            self._fail("installer exited %s: %s" % (rc, last[0][:200]), rollback=True)
            return
        # the installer (or the root helper it asked) restarts the service: wait for it.
        # Never stop ourselves: a clean exit is not restarted by Restart=on-failure.
        end = time.monotonic() + self.cfg.installer_timeout_s
        while time.monotonic() < end:
            self.heartbeat = time.monotonic()
            result = self._take_result()
            if result is not None:
                why = "the root helper did not install it: %s" % result
                if rollback:
                    self._save(phase="failed")
                    self.events("update.failed", id=self.state.get("id"),
                                reason="rollback failed: " + why)
                else:
                    self._fail(why, rollback=True)
                return
            if self._halt.wait(1.0):
                return
        self._save(phase="failed")
        self.events("update.failed", id=self.state.get("id"),
                    reason="the installer ended but did not restart the service within "
                           "%.0f s" % self.cfg.installer_timeout_s)

    def _take_result(self):
        """The root helper's refusal or failure (text), taken once, or None."""
        path = self._path(RESULT)
        try:
            with open(path) as f:
                doc = json.load(f)
            os.unlink(path)
        except (OSError, ValueError):
            return None
        return str(doc.get("reason"))[:300] if isinstance(doc, dict) else "unreadable result"

    def _check_health(self):
        ok, why = self.healthy()
        if ok:
            pkg = self._pkg()
            if os.path.exists(pkg):
                os.replace(pkg, self._path(CURRENT))
            _write_json(self._path(CURRENT_INFO), {"version": self.version,
                                                  "sha256": self.state["manifest"]["sha256"],
                                                  "command": self.state.get("command")})
            self._save(phase="done", reason=None)
            self.events("update.done", id=self.state["id"], version=self.version,
                        previous=self.state.get("previous"))
            log.info("ota: update to %s done", self.version)
            return
        if time.time() > self.state.get("deadline", 0):
            self._fail("version %s not healthy within %.0f s: %s" % (
                self.version, self.cfg.health_timeout_s, why), rollback=True)
            return
        self._wake.wait(1.0)
        self._wake.clear()


def keep_current(data_dir, package):
    """`mgw ota keep FILE`: the package of the running version, kept for a rollback (a box
    installed by hand has none until its first update over the air). Its digest goes to
    current.json, which a privileged installer trusts only when root wrote it."""
    d = os.path.join(data_dir, "ota")
    os.makedirs(d, exist_ok=True)
    shutil.copyfile(package, os.path.join(d, CURRENT + ".tmp"))
    os.replace(os.path.join(d, CURRENT + ".tmp"), os.path.join(d, CURRENT))
    _write_json(os.path.join(d, CURRENT_INFO), {"version": None,
                                               "sha256": _sha256(os.path.join(d, CURRENT)),
                                               "command": None})


def request_install(package):
    """The installer under systemd (`mgw ota request --package {package}`): the service
    user may not run dpkg, so it leaves the package's path in ota/install-request, which
    meter-gateway-update.path hands to `mgw ota install-requested`, run as root."""
    d = os.path.dirname(os.path.abspath(package))
    try:
        os.unlink(os.path.join(d, RESULT))        # an old answer is not this one's
    except OSError:
        pass
    _write_json(os.path.join(d, REQUEST), {"package": os.path.basename(package)})
