"""`mgw ota serve`: the head-end's side of an update, for integrators to see it work end to
end (docs/mqtt.md "Software updates"). It signs a `software_update` command for one
gateway, answers the gateway's chunk requests from the package file, prints the update's
events, and exits 0 on `update.done`, 1 on a rejection, `update.failed` or
`update.rolled_back`, or when --timeout passes.

`mgw ota keep --package FILE`: on the box, keep the package of the running version for a
rollback (a box installed by hand has none until its first update over the air).

`mgw ota request --package FILE` and `mgw ota install-requested`: the installer under
systemd. The service runs unprivileged and may not run dpkg: its installer only leaves a
request; meter-gateway-update.path starts meter-gateway-update.service, which runs
`install-requested` as root, outside the service's cgroup (so restarting the service does
not kill dpkg). That checks the package against the head-end's signed manifest itself,
so the service user cannot have root install anything the head-end did not sign.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

from gateway.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, load_config

FINAL_EVENTS = {"update.done": EXIT_OK, "update.failed": EXIT_FAILED,
                "update.rolled_back": EXIT_FAILED}
HELPER = "install-requested"   # state.json's rollback_by when the root helper rolled back
HEALTH_GRACE_S = 30            # after health_timeout_s: the new version's restart
MAX_COUNT = 16                 # chunks answered per request (the gateway asks for fewer)


def register(add, host_port):
    p = add("ota", "software updates: serve (the head-end's side), keep, request and "
            "install-requested (on the box)", run)
    p.add_argument("what", choices=("serve", "keep", "request", "install-requested"))
    p.add_argument("--package", metavar="FILE", help="the .deb to send (serve), to keep as "
                   "the running version's (keep), to ask root to install (request)")
    p.add_argument("--key", metavar="FILE", help="serve: the head-end's private key")
    p.add_argument("--broker", type=host_port, default=("127.0.0.1", 1883),
                   help="serve: MQTT broker HOST:PORT (default 127.0.0.1:1883)")
    p.add_argument("--gateway", metavar="ID", help="serve: the gateway's id")
    p.add_argument("--topic-root", default="mgw/v1", help="serve: [uplink] topic_root")
    p.add_argument("--name", help="serve: package name (default: from the .deb)")
    p.add_argument("--version", dest="pkg_version",
                   help="serve: package version (default: from the .deb)")
    p.add_argument("--arch", help="serve: architecture (default: from the .deb)")
    p.add_argument("--sha256", help="serve: announce this digest instead of the file's "
                   "(to see a refusal)")
    p.add_argument("--allow-downgrade", action="store_true")
    p.add_argument("--chunk-size", type=int, default=32768)
    p.add_argument("--timeout", type=float, default=900, help="serve: give up after this "
                   "many seconds (default 900)")
    p.add_argument("--id", help="serve: the command id (default: a random UUID); the same "
                   "id resumes an update")
    p.add_argument("--no-health-wait", action="store_true",
                   help="install-requested: install and stop, without waiting for the new "
                        "version's health (a root filesystem where no service runs, e.g. "
                        "scripts/package-test)")
    return p


def run(args):
    if args.what == "install-requested":
        return install_requested(load_config(args), wait=not args.no_health_wait)
    if not args.package:
        raise CliError("ota %s needs --package FILE" % args.what, EXIT_USAGE)
    if args.what == "request":
        from gateway.ota.updater import request_install
        try:
            request_install(args.package)
        except OSError as exc:
            raise CliError("%s: %s" % (args.package, exc.strerror)) from None
        return EXIT_OK
    if args.what == "keep":
        from gateway.ota.updater import keep_current
        cfg = load_config(args)
        try:
            keep_current(cfg.gateway.data_dir, args.package)
        except OSError as exc:
            raise CliError("%s: %s" % (args.package, exc.strerror)) from None
        print("kept %s for a rollback in %s/ota" % (args.package, cfg.gateway.data_dir))
        return EXIT_OK
    if not args.key or not args.gateway:
        raise CliError("ota serve needs --key and --gateway", EXIT_USAGE)
    return Server(args).serve()


def deb_fields(path):
    """(name, version, arch) from a .deb's control file, or CliError."""
    try:
        out = subprocess.run(["dpkg-deb", "-f", path, "Package", "Version", "Architecture"],
                             capture_output=True, text=True, timeout=30)
    except OSError:
        out = None
    if out is None or out.returncode != 0:
        raise CliError("%s: not a Debian package dpkg-deb can read; give --name, "
                       "--version and --arch" % path, EXIT_USAGE)
    fields = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    return fields.get("Package"), fields.get("Version"), fields.get("Architecture")


class Server:
    def __init__(self, args):
        from gateway.control.signing import KeyError_, load_private_key
        from gateway.cli.control import new_command
        try:
            self.key = load_private_key(args.key)
        except KeyError_ as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        try:
            self.file = open(args.package, "rb")
        except OSError as exc:
            raise CliError("%s: %s" % (args.package, exc.strerror), EXIT_USAGE) from None
        name, version, arch = args.name, args.pkg_version, args.arch
        if not (name and version and arch):
            n, v, a = deb_fields(args.package)
            name, version, arch = name or n, version or v, arch or a
        h = hashlib.sha256()
        for block in iter(lambda: self.file.read(65536), b""):
            h.update(block)
        self.size = self.file.tell()
        self.chunk = args.chunk_size
        self.manifest = {"name": name, "version": version, "arch": arch, "size": self.size,
                         "sha256": args.sha256 or h.hexdigest(), "chunk_size": self.chunk,
                         "allow_downgrade": args.allow_downgrade}
        self.cmd = new_command("*", "software_update", self.manifest, 900, args.id)
        self.root = "%s/%s" % (args.topic_root.rstrip("/"), args.gateway)
        self.args = args
        self.done = threading.Event()
        self.code = EXIT_FAILED
        self.sent = 0

    def serve(self):
        import paho.mqtt.client as mqtt
        from gateway.control.signing import sign
        cmd = sign(self.cmd, self.key)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id="mgw-ota-%s" % cmd["id"][:8], protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, u, f, rc, p: self._connected(c, cmd)
        client.on_message = self._message
        host, port = self.args.broker
        try:
            client.connect(host, port)
        except OSError as exc:
            raise CliError("cannot connect to %s:%d: %s" % (host, port, exc)) from None
        client.loop_start()
        print("update %s: %s %s (%s), %d bytes, sha256 %s" % (
            cmd["id"], self.manifest["name"], self.manifest["version"],
            self.manifest["arch"], self.size, self.manifest["sha256"]), flush=True)
        try:
            if not self.done.wait(self.args.timeout):
                print("no final event within %.0f s" % self.args.timeout, flush=True)
        finally:
            client.loop_stop()
            client.disconnect()
        return self.code

    def _connected(self, client, cmd):
        # on every (re)connect: the broker may have lost the subscriptions
        for t in ("ota/requests", "events", "command-results"):
            client.subscribe("%s/%s" % (self.root, t), qos=1)
        if not getattr(self, "_published", False):
            self._published = True
            client.publish(self.root + "/commands", json.dumps(cmd), qos=1)

    def _message(self, client, userdata, msg):
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        topic = msg.topic[len(self.root) + 1:]
        if topic == "ota/requests":
            self._answer(client, body)
        elif topic == "command-results" and body.get("status") in ("rejected", "failed") \
                and self.cmd["id"] in (body.get("id"), body.get("claimed_id")):
            # a claimed_id proves nothing, but an unauthenticated rejection of what we
            # sent has no other link to it
            print("%s: %s (%s)" % (body["status"], body.get("reason"), body.get("code")),
                  flush=True)
            self.code = EXIT_FAILED
            self.done.set()
        elif topic == "events" and str(body.get("type", "")).startswith("update.") \
                and body.get("id") == self.cmd["id"]:
            fields = {k: v for k, v in body.items()
                      if k not in ("v", "jid", "seq", "ts", "type", "id")}
            print("%s %s" % (body["type"], json.dumps(fields, sort_keys=True)), flush=True)
            if body["type"] in FINAL_EVENTS:
                self.code = FINAL_EVENTS[body["type"]]
                self.done.set()

    def _answer(self, client, req):
        n, count = req.get("n"), req.get("count")
        if req.get("id") != self.cmd["id"] or type(n) is not int or type(count) is not int:
            return
        for k in range(max(n, 0), min(n + min(count, MAX_COUNT),
                                      (self.size + self.chunk - 1) // self.chunk)):
            self.file.seek(k * self.chunk)
            client.publish("%s/ota/chunks/%s/%d" % (self.root, self.cmd["id"], k),
                           self.file.read(self.chunk), qos=0)
            self.sent += 1



# ---------------------------------------------------------------- the root helper

def _read_json(path, root_only=False):
    """A small JSON file, not through a link; with root_only, only one root owns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        if root_only and os.fstat(f.fileno()).st_uid != 0:
            return None
        try:
            doc = json.loads(f.read(1 << 20))
        except ValueError:
            return None
    return doc if isinstance(doc, dict) else None


def _signed_sha256(command, keys):
    """The package digest of a software_update command a configured key signed, or None."""
    from gateway.control.signing import check
    if not isinstance(command, dict) or command.get("action") != "software_update" or \
            command.get("meter") != "*" or not isinstance(command.get("params"), dict):
        return None
    if check(command, keys)[0] is not None:
        return None
    return command["params"].get("sha256")


def install_requested(cfg, wait=True):
    """As root: install the package the service asked for, only if its SHA-256 is one the
    head-end signed (the update's command, or the kept package's) and, for an update, it is
    not older than the installed version unless the manifest allows a downgrade; from a
    private copy. A refusal or a failed installer is left in ota/install-result for the
    service (which then rolls back); a success restarts the service (the package's
    postinst), and then the new version must report healthy within [ota] health_timeout_s,
    or this reinstalls the kept package itself: a version that cannot even start never
    runs its own health check."""
    from gateway.ota.updater import REQUEST, RESULT, _write_json
    d = os.path.join(cfg.gateway.data_dir, "ota")
    if not os.path.lexists(os.path.join(d, REQUEST)):
        print("no install request in %s" % d)
        return EXIT_OK
    try:
        rc, update = _install_requested(cfg, d)
    except CliError as exc:
        _write_json(os.path.join(d, RESULT), {"reason": str(exc)})
        raise
    if rc != 0:
        _write_json(os.path.join(d, RESULT), {"reason": "the installer exited %d" % rc})
        return EXIT_FAILED
    if update is None:                  # a rollback: nothing to fall back to
        return EXIT_OK
    if not wait:
        print("update %s: installed; not waiting for its health (--no-health-wait)"
              % update[0], flush=True)
        return EXIT_OK
    return _await_health(cfg, d, *update)


def _keys(cfg):
    from gateway.control.signing import KeyError_, load_public_key
    keys = []
    for path in cfg.control.public_keys:
        try:
            keys.append(load_public_key(path))
        except KeyError_:
            pass
    return keys


def _kept_sha256(d, keys):
    """The digest the kept package (current.pkg) must have: signed earlier, or recorded by
    `mgw ota keep` run as root; None when nothing vouches for it."""
    from gateway.ota.updater import CURRENT_INFO
    info = _read_json(os.path.join(d, CURRENT_INFO)) or {}
    expected = _signed_sha256(info.get("command"), keys)
    if expected is None:
        owned = _read_json(os.path.join(d, CURRENT_INFO), root_only=True) or {}
        expected = owned.get("sha256") if owned.get("command") is None else None
    return expected if isinstance(expected, str) else None


def _install_requested(cfg, d):
    """(installer's exit code, (the update's id, version) or None for a rollback), or
    CliError."""
    from gateway import __version__
    from gateway.ota import manifest as mf
    from gateway.ota.updater import CURRENT, REQUEST, STATE
    request = _read_json(os.path.join(d, REQUEST))
    if request is None:
        os.unlink(os.path.join(d, REQUEST))
        raise CliError("install request in %s: not readable" % d)
    os.unlink(os.path.join(d, REQUEST))
    name = request.get("package")
    if not isinstance(name, str) or os.path.basename(name) != name or \
            not name.endswith(".pkg"):
        raise CliError("install request: %r is not a package in %s" % (name, d))
    keys = _keys(cfg)
    update = None
    if name == CURRENT:       # a rollback: the kept package, signed earlier or kept by root
        expected = _kept_sha256(d, keys)
    else:
        state = _read_json(os.path.join(d, STATE)) or {}
        command = state.get("command") or {}
        expected = _signed_sha256(command, keys) \
            if name == "%s.pkg" % command.get("id") else None
        if isinstance(expected, str):
            # a package the head-end once signed may be asked for again: this helper is
            # the installed version's, so its own version is the one not to go below
            try:
                m = mf.parse(command["params"])
                why = mf.downgrade_refusal(m, __version__)
            except mf.BadManifest as exc:
                why = str(exc)
            if why:
                raise CliError("install request for %s: %s; not installed" % (name, why))
            update = (command["id"], m.version)
    if not isinstance(expected, str):
        raise CliError("install request for %s: no head-end signature vouches for it; "
                       "not installed" % name)
    return _install_checked(cfg, d, name, expected), update


def _install_checked(cfg, d, name, expected):
    """Run privileged_installer on a private copy of d/name whose SHA-256 is `expected`."""
    tmp = tempfile.mkdtemp(prefix="mgw-ota-")          # root's own, mode 0700
    try:
        copy = os.path.join(tmp, name)
        h = hashlib.sha256()
        try:
            src = os.open(os.path.join(d, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise CliError("%s: %s" % (os.path.join(d, name), exc.strerror)) from None
        with os.fdopen(src, "rb") as fin, open(copy, "wb") as fout:
            for block in iter(lambda: fin.read(65536), b""):
                h.update(block)
                fout.write(block)
        if h.hexdigest() != expected:
            raise CliError("%s: sha256 %s is not the signed %s; not installed"
                           % (name, h.hexdigest(), expected))
        argv = [a.replace("{package}", copy) for a in cfg.ota.privileged_installer]
        print("installing %s (sha256 %s): %s" % (name, expected, " ".join(argv)), flush=True)
        return subprocess.run(argv).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _await_health(cfg, d, uid, version):
    """After update `uid` is installed: wait for the new version to say it is healthy
    (state.json's phase "done"). A version that runs decides itself (done, or its own
    rollback); one that crashes at start never does, so after health_timeout_s (and a
    grace for the restart) this reinstalls the kept package and leaves the reason in
    state.json, where the restored version finds it and reports update.rolled_back."""
    from gateway.ota.updater import CURRENT, STATE
    health = cfg.ota.health_timeout_s
    grace = min(HEALTH_GRACE_S, health)
    installed_at = time.time()
    print("waiting up to %.0f s for the new version to report healthy" % (health + grace),
          flush=True)
    while True:
        state = _read_json(os.path.join(d, STATE)) or {}
        phase = state.get("phase")
        if state.get("id") != uid or phase not in ("installing", "checking"):
            print("update %s: %s" % (uid, phase), flush=True)
            return EXIT_OK if phase == "done" else EXIT_FAILED
        end = installed_at + health + grace
        deadline = state.get("deadline")
        if phase == "checking" and isinstance(deadline, (int, float)):
            # the new version started late: its own check runs first (bounded, as the
            # service user may write anything here)
            end = max(end, min(deadline + grace, installed_at + health + 2 * grace))
        if time.time() >= end:
            break
        time.sleep(1.0)
    reason = ("version %s did not report healthy within %.0f s of its installation "
              "(it may not even start); the previous package was reinstalled"
              % (version, health))
    print("update %s: %s" % (uid, reason), flush=True)
    expected = _kept_sha256(d, _keys(cfg))
    if expected is None:
        _save_state(d, state, phase="failed", reason=reason.split(";")[0] +
                    "; no kept package to reinstall")
        raise CliError("update %s: no kept package a signature vouches for; the new "
                       "version stays" % uid)
    # written before the installer restarts the service: the version that starts reads it
    _save_state(d, state, phase="rolling_back", reason=reason, rollback_by=HELPER)
    try:
        rc = _install_checked(cfg, d, CURRENT, expected)
    except CliError as exc:
        rc, why = None, str(exc)
    else:
        why = "the installer exited %d" % rc
    if rc != 0:
        _save_state(d, state, phase="failed", reason="rollback failed: %s" % why)
        raise CliError("update %s: rollback failed: %s" % (uid, why))
    return EXIT_FAILED


def _save_state(d, state, **changes):
    """state.json as root writes it, left to the service user who owns the folder."""
    from gateway.ota.updater import STATE, _write_json
    path = os.path.join(d, STATE)
    _write_json(path, dict(state, **changes))
    st = os.stat(d)
    if os.geteuid() == 0 and st.st_uid != 0:
        os.chown(path, st.st_uid, st.st_gid)
