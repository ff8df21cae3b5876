"""`mgw ota serve`: the head-end's side of an update, for integrators to see it work end to
end (docs/mqtt.md "Software updates"). It signs a `software_update` command for one
gateway, answers the gateway's chunk requests from the package file, prints the update's
events, and exits 0 on `update.done`, 1 on a rejection, `update.failed` or
`update.rolled_back`, or when --timeout passes.

`mgw ota keep FILE`: on the box, keep the package of the running version for a rollback
(a box installed by hand has none until its first update over the air).
"""

import hashlib
import json
import subprocess
import threading

from gateway.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, load_config

FINAL_EVENTS = {"update.done": EXIT_OK, "update.failed": EXIT_FAILED,
                "update.rolled_back": EXIT_FAILED}
MAX_COUNT = 16                 # chunks answered per request (the gateway asks for fewer)


def register(add, host_port):
    p = add("ota", "software updates: `ota serve` (head-end side), `ota keep` (on the box)",
            run)
    p.add_argument("what", choices=("serve", "keep"))
    p.add_argument("--package", required=True, metavar="FILE", help="the .deb to send "
                   "(serve) or to keep as the running version's (keep)")
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
    return p


def run(args):
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

