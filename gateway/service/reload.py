"""Reloading the configuration in place: a signed `config_update` from the head-end and
SIGHUP after a local edit go through one path.

    candidate (a whole document, or a patch of the running one, against its version)
    -> validated as `mgw config check` validates a file -> no secrets carried (remote)
    -> only sections that reload in place changed -> a dry run stops here with the diff
    -> gateway.toml written atomically (the old kept as gateway.toml.prev and in history/)
    -> ports, meters, schedules, accounts and tariffs swapped in place (Gateway.reconfigure)
    -> health (lines open, uplink connected) within a timeout
    -> `config.applied`, or the previous file and configuration put back by themselves and
       `config.rolled_back` with the reason.

The version of a configuration is the SHA-256 of its document (the parsed TOML as JSON with
sorted keys), so comments and layout do not change it. Everything that changes the running
configuration runs on the supervisor's thread (Reloader.run_pending), never beside it.
"""

import copy
import datetime as _dt
import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
import zlib

try:
    import tomllib
except ImportError:        # Python < 3.11
    import tomli as tomllib

from gateway.config import ConfigError, read
from gateway.model import GatewayError, RejectCode
from gateway.service.config import SCHEMA
from gateway.store.state import fsync_dir

log = logging.getLogger(__name__)

HISTORY_DIR = "history"          # beside gateway.toml: the last configurations replaced
PENDING = ".pending"             # PATH.pending: a reload written but not yet found healthy
HISTORY_KEEP = 10
HEALTH_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_MAX_S = 300.0
# sections swapped in place; the others ([gateway], [storage], [uplink], [control],
# [metrics], ...) are read once at start
RELOADABLE = ("ports", "meters", "tariffs", "accounts", "cost_control")
# the meter archive: list sections and the key naming an entry, then named tables
KEYED = {"ports": "name", "meters": "id", "accounts": "meter"}
OPS = ("remove", "replace", "update", "add")      # applied in this order


class ReloadError(GatewayError):
    """A configuration not taken: `code` (a RejectCode) for programs, the reason for
    people, and the problems one line each (file or patch key named)."""

    def __init__(self, code, reason, problems=()):
        super().__init__(reason)
        self.code = RejectCode(code)
        self.reason = reason
        self.problems = list(problems)


# ---------------------------------------------------------------- documents

def version_of(doc):
    """The version hash of a configuration document."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def apply_patch(doc, patch):
    """The document with a meter-archive patch applied (the argument is not changed):

        {"meters": {"add": [{...}], "replace": [{...}], "update": [{"id": "m1",
                    "interval_s": 60}], "remove": ["m3"]},
         "ports": {...}, "accounts": {...} (keyed by meter),
         "tariffs": {"add": {"NAME": {...}}, "replace": {...}, "update": {...},
                     "remove": ["NAME"]},
         "cost_control": {"update": {...}}}

    `update` merges fields into an entry (a null removes the field: its default again).
    Raises ReloadError listing every problem."""
    problems = []
    if not isinstance(patch, dict) or not patch:
        raise ReloadError(RejectCode.BAD_PARAMS, "params.patch must be an object of "
                          "sections (meters, ports, accounts, tariffs, cost_control)")
    new = copy.deepcopy(doc)
    for section, ops in patch.items():
        where = "patch.%s" % section
        if section not in RELOADABLE:
            problems.append("%s: not part of the meter archive (%s); send the whole "
                            "configuration" % (where, ", ".join(RELOADABLE)))
            continue
        if not isinstance(ops, dict) or not ops or set(ops) - set(OPS):
            problems.append("%s: an object of %s" % (where, ", ".join(OPS)))
            continue
        if section in KEYED:
            _patch_list(new, section, KEYED[section], ops, where, problems)
        elif section == "tariffs":
            _patch_named(new, ops, where, problems)
        elif set(ops) != {"update"} or not isinstance(ops["update"], dict):
            problems.append("%s: only update, an object of fields" % where)
        else:
            _merge(new.setdefault(section, {}), ops["update"])
    if problems:
        raise ReloadError(RejectCode.BAD_PARAMS, problems[0], problems)
    return new


def _merge(table, fields):
    for k, v in fields.items():
        if v is None:
            table.pop(k, None)
        else:
            table[k] = v


def _patch_list(doc, section, key, ops, where, problems):
    entries = doc.setdefault(section, [])
    if not isinstance(entries, list):
        problems.append("%s: the running configuration's %s is not a list" % (where, section))
        return
    index = {e.get(key): i for i, e in enumerate(entries) if isinstance(e, dict)}
    for op in OPS:
        items = ops.get(op)
        if items is None:
            continue
        if not isinstance(items, list):
            problems.append("%s.%s: a list" % (where, op))
            continue
        for n, item in enumerate(items):
            at = "%s.%s[%d]" % (where, op, n)
            name = item if op == "remove" else (item.get(key) if isinstance(item, dict)
                                                else None)
            if not isinstance(name, str):
                problems.append("%s: %s" % (at, "a %s" % key if op == "remove" else
                                            "a table with its %s" % key))
                continue
            if op == "add":
                if name in index:
                    problems.append("%s: %s %s exists already (use replace or update)"
                                    % (at, section[:-1], name))
                    continue
                index[name] = len(entries)
                entries.append(dict(item))
                continue
            if name not in index:
                problems.append("%s: no %s %s in the running configuration"
                                % (at, section[:-1], name))
                continue
            i = index[name]
            if op == "remove":
                entries[i] = None
                del index[name]
            elif op == "replace":
                entries[i] = dict(item)
            else:
                _merge(entries[i], item)
    entries[:] = [e for e in entries if e is not None]


def _patch_named(doc, ops, where, problems):
    tables = doc.setdefault("tariffs", {})
    for op in OPS:
        items = ops.get(op)
        if items is None:
            continue
        if op == "remove":
            if not isinstance(items, list):
                problems.append("%s.remove: a list of names" % where)
                continue
            for name in items:
                if tables.pop(name if isinstance(name, str) else None, None) is None:
                    problems.append("%s.remove: no tariff %s" % (where, json.dumps(name)))
            continue
        if not isinstance(items, dict):
            problems.append("%s.%s: an object of tariffs by name" % (where, op))
            continue
        for name, table in items.items():
            at = "%s.%s.%s" % (where, op, name)
            if not isinstance(table, dict):
                problems.append("%s: a table" % at)
            elif op == "add" and name in tables:
                problems.append("%s: exists already (use replace or update)" % at)
            elif op != "add" and name not in tables:
                problems.append("%s: no such tariff" % at)
            elif op == "update":
                _merge(tables[name], table)
            else:
                tables[name] = dict(table)


_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def secrets_in(payload, where="params"):
    """Secrets a configuration from the network must not carry, one line each: a private
    key (reference a key file already on the box) or a broker password (password_file)."""
    out = []

    def walk(v, at):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, "%s.%s" % (at, k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, "%s[%d]" % (at, i))
        elif isinstance(v, str) and _PRIVATE_KEY.search(v):
            out.append("%s: carries a private key; reference a key file on the box" % at)
    walk(payload, where)
    up = payload.get("uplink") if isinstance(payload, dict) else None
    if isinstance(up, dict) and up.get("password") is not None:
        out.append("%s.uplink.password: a broker password is not sent over the network; "
                   "use uplink.password_file (a file already on the box)" % where)
    return out


def restart_needed(old, new):
    """`section.key` of every change that only a restart applies (every section but the
    meter archive's)."""
    out = []
    for section in old.FIELDS:
        if section == "path" or section in RELOADABLE:
            continue
        a, b = getattr(old, section), getattr(new, section)
        if hasattr(a, "FIELDS"):
            out.extend("%s.%s" % (section, f) for f in a.FIELDS
                       if getattr(a, f) != getattr(b, f))
        elif a != b:
            out.append(section)
    return out


def diff(old_cfg, new_cfg, old_doc, new_doc):
    """What a configuration changes, by entry (field names, never values: no secret
    leaves this way). Empty when nothing does."""
    out = {}
    for section, key in KEYED.items():
        a = {getattr(r, key): r for r in getattr(old_cfg, section)}
        b = {getattr(r, key): r for r in getattr(new_cfg, section)}
        changed = {k: [f for f in b[k].FIELDS if getattr(a[k], f) != getattr(b[k], f)]
                   for k in b if k in a and a[k] != b[k]}
        entry = {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
                 "changed": changed}
        if any(entry.values()):
            out[section] = entry
    a, b = old_doc.get("tariffs", {}), new_doc.get("tariffs", {})
    entry = {"added": sorted(set(b) - set(a)), "removed": sorted(set(a) - set(b)),
             "changed": sorted(k for k in b if k in a and a[k] != b[k])}
    if any(entry.values()):
        out["tariffs"] = entry
    a, b = old_cfg.cost_control, new_cfg.cost_control
    fields = [f for f in a.FIELDS if getattr(a, f) != getattr(b, f)]
    if fields:
        out["cost_control"] = {"changed": fields}
    return out


# ---------------------------------------------------------------- TOML out

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k):
    return k if _BARE.match(k) else json.dumps(k, ensure_ascii=False)


def _value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if v == v and v not in (float("inf"), float("-inf")) else \
            ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)      # JSON's escapes are TOML's
    if isinstance(v, list):
        return "[%s]" % ", ".join(_value(x) for x in v)
    if isinstance(v, dict):
        return "{%s}" % ", ".join("%s = %s" % (_key(k), _value(x)) for k, x in v.items())
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    raise ValueError("cannot write %r as TOML" % (v,))


def _is_tables(v):
    return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)


def to_toml(doc):
    """A configuration document as TOML text (a patched document is written this way;
    the replaced file, comments and all, stays in gateway.toml.prev and history/)."""
    lines = ["# written by meter-gateway (config_update); the file it replaced is "
             "gateway.toml.prev"]

    def table(t, prefix):
        subs = []
        for k, v in t.items():
            if isinstance(v, dict) or _is_tables(v):
                subs.append((k, v))
            else:
                lines.append("%s = %s" % (_key(k), _value(v)))
        for k, v in subs:
            name = "%s.%s" % (prefix, _key(k)) if prefix else _key(k)
            if isinstance(v, dict):
                lines.extend(["", "[%s]" % name])
                table(v, name)
            else:
                for item in v:
                    lines.extend(["", "[[%s]]" % name])
                    table(item, name)
    table(doc, "")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the file

def write_atomic(path, text):
    """Write a file whole or not at all (temporary file, fsync, rename, fsync the folder)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path)


def keep_previous(path, text, version):
    """The configuration being replaced, kept as PATH.prev and in history/."""
    write_atomic(path + ".prev", text)
    to_history(path, text, version)


def to_history(path, text, version, suffix=""):
    """A configuration kept in history/ beside PATH (the last HISTORY_KEEP there)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), HISTORY_DIR)
    os.makedirs(folder, mode=0o750, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    write_atomic(os.path.join(folder, "gateway-%s-%s%s.toml" % (stamp, version[:12], suffix)),
                 text)
    names = sorted(n for n in os.listdir(folder)
                   if n.startswith("gateway-") and n.endswith(".toml"))
    for name in names[:-HISTORY_KEEP]:
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


class ConfigFile:
    """The running configuration: its file, text, record and version. The text is kept
    compressed and the document parsed again when a change needs it: a thousand meters'
    worth of text and dicts is not kept in memory for the rare reload (the footprint
    budget is tight)."""

    __slots__ = ("path", "_text", "cfg", "version")

    def __init__(self, path, text, version, cfg):
        self.path, self.cfg, self.version = path, cfg, version
        self._text = zlib.compress(text.encode("utf-8"))

    @property
    def text(self):
        return zlib.decompress(self._text).decode("utf-8")

    @property
    def doc(self):
        return tomllib.loads(self.text)

    @classmethod
    def load(cls, path):
        """Read, parse and validate a file once (ConfigError as `load` raises it)."""
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
            doc = tomllib.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            read(path)      # the one-line error every command gives (missing, TOML, ...)
            raise ConfigError(["%s: changed while it was read; read it again" % path]) \
                from None
        version = version_of(doc)           # before the walk, which may change the dict
        return cls(path, text, version, SCHEMA.validate(doc, path, source=text))


# ---------------------------------------------------------------- the reloader

class _Request:
    __slots__ = ("fn", "done", "value")

    def __init__(self, fn):
        self.fn, self.done, self.value = fn, threading.Event(), None


class Reloader:
    """Takes configuration changes for a Gateway started from a file. `check` and
    `update` are the executor's (config_update); `reload_file` is SIGHUP's; the work is
    done on the supervisor's thread by `run_pending`."""

    def __init__(self, gw, current, health_timeout_s=HEALTH_TIMEOUT_S):
        self.gw = gw
        self.current = current              # ConfigFile
        self.health_timeout_s = health_timeout_s
        self._requests = queue.Queue()
        self._closed = False
        self._pending_command = None        # a config_update cut short by a restart
        self._file_reload = False           # SIGHUP seen, not yet done
        self._concluded = {}                # its id -> its result, once concluded
        self._pending_at_start()

    @property
    def version(self):
        return self.current.version

    # ------------------------------------------------------------ the executor's side

    def check(self, params):
        """Why a config_update is refused at admission: (RejectCode, reason, problems), or
        None. Validated against the running configuration as `mgw config check` would
        validate the resulting file."""
        try:
            self.candidate(params, remote=True)
        except ReloadError as exc:
            return exc.code, exc.reason, exc.problems
        return None

    def update(self, params, command_id=None, tick=lambda: None):
        """Run a config_update: (status, reason, extra) for the command's result."""
        if command_id is not None and command_id == self._pending_command:
            # resumed after a restart that came during its health check: its outcome is
            # that check's, concluded at start (queued before this), never a second apply
            req = self.submit(lambda: self._concluded.pop(command_id, (
                "failed", "interrupted by a restart", {"code": "interrupted"})))
            return self._wait(req, self.health_timeout_s, tick)
        try:
            cand = self.candidate(params, remote=True)
        except ReloadError as exc:
            return "failed", exc.reason, _failure(exc)
        if params.get("dry_run"):
            return "done", None, {"dry_run": True, "version": self.version,
                                  "new_version": cand.version,
                                  "changes": self.changes(cand)}
        timeout = params.get("health_timeout_s", self.health_timeout_s)
        req = self.submit(lambda: self._apply_checked(params, "remote", command_id, timeout))
        return self._wait(req, timeout, tick)

    def _wait(self, req, timeout, tick):
        # the supervisor does it; the wait is bounded (the executor's heartbeat goes on)
        end = time.monotonic() + timeout + 60
        while not req.done.wait(0.5):
            tick()
            if time.monotonic() > end:
                return "failed", "the reload did not finish", {"code": "timeout"}
        return req.value

    def submit(self, fn):
        req = _Request(fn)
        if self._closed:
            req.value = ("failed", "gateway stopping", {"code": "stopping"})
            req.done.set()
        else:
            self._requests.put(req)
        return req

    def request_file_reload(self):
        """SIGHUP: reload the file on the supervisor's thread. Only a flag is set here: a
        signal handler must not take a lock its own thread may hold."""
        self._file_reload = True

    # ------------------------------------------------------------ the supervisor's side

    def run_pending(self):
        if self._file_reload:
            self._file_reload = False
            self.submit(self.reload_file)
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                req.value = req.fn()
            except Exception as exc:
                log.exception("configuration reload")
                req.value = ("failed", "internal error: %s" % exc, {"code": "internal_error"})
            req.done.set()

    def close(self):
        self._closed = True
        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            req.value = ("failed", "gateway stopping", {"code": "stopping"})
            req.done.set()

    def candidate(self, params, remote):
        """The ConfigFile a config_update's params would make, or ReloadError."""
        if not isinstance(params, dict):
            raise ReloadError(RejectCode.BAD_PARAMS, "config_update needs params")
        given = [k for k in ("patch", "config", "toml") if k in params]
        if len(given) != 1:
            raise ReloadError(RejectCode.BAD_PARAMS, "config_update needs exactly one of "
                              "params.patch, params.config (a whole configuration as an "
                              "object) or params.toml (a whole file as text)")
        if not isinstance(params.get("dry_run", False), bool):
            raise ReloadError(RejectCode.BAD_PARAMS, "params.dry_run is true or false")
        t = params.get("health_timeout_s", self.health_timeout_s)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or \
                not 1 <= t <= HEALTH_TIMEOUT_MAX_S:
            raise ReloadError(RejectCode.BAD_PARAMS, "params.health_timeout_s is 1 to %d "
                              "seconds" % HEALTH_TIMEOUT_MAX_S)
        version = params.get("version")
        if not isinstance(version, str):
            raise ReloadError(RejectCode.BAD_PARAMS, "params.version: the version hash of "
                              "the configuration this applies to (the meters message's "
                              "config_version)")
        if version != self.version:
            raise ReloadError(RejectCode.STALE_VERSION, "stale: made for configuration %s, "
                              "the gateway runs %s" % (version[:12], self.version[:12]))
        path = self.current.path
        if "patch" in params:
            doc = apply_patch(self.current.doc, params["patch"])
            text = None
        elif "config" in params:
            if not isinstance(params["config"], dict):
                raise ReloadError(RejectCode.BAD_PARAMS, "params.config: a whole "
                                  "configuration, an object of sections")
            doc = copy.deepcopy(params["config"])
            text = None
        else:
            text = params["toml"]
            try:
                doc = tomllib.loads(text) if isinstance(text, str) else None
            except tomllib.TOMLDecodeError as exc:
                raise ReloadError(RejectCode.INVALID_CONFIG, "params.toml: not valid TOML: "
                                  "%s" % exc) from None
            if doc is None:
                raise ReloadError(RejectCode.BAD_PARAMS, "params.toml: the file as text")
        secrets = secrets_in(doc if "toml" in params else params[given[0]],
                             "params." + given[0]) if remote else []
        if secrets:
            raise ReloadError(RejectCode.SECRET_IN_CONFIG, secrets[0], secrets)
        return self._validated(path, text, doc)

    def _validated(self, path, text, doc):
        # problems name lines of a text that was sent or edited; of a generated one (a
        # patch, a whole configuration as an object) only the key
        source = text or ""
        try:
            if text is None:
                text = to_toml(doc)         # only what a TOML file can hold
                if tomllib.loads(text) != doc:
                    raise ValueError("it cannot be written as TOML as it is")
            version = version_of(doc)       # before the walk, which may change the dict
            cfg = SCHEMA.validate(doc, path, source=source)
        except ConfigError as exc:
            raise ReloadError(RejectCode.INVALID_CONFIG, "%d problem(s): %s" % (
                len(exc.problems), exc.problems[0]), exc.problems) from None
        except ValueError as exc:
            raise ReloadError(RejectCode.INVALID_CONFIG, str(exc)) from None
        restart = restart_needed(self.current.cfg, cfg)
        if restart:
            raise ReloadError(RejectCode.RESTART_REQUIRED, "%s changed: only a restart "
                              "applies [%s]" % (", ".join(restart), "], [".join(
                                  sorted({k.split(".")[0] for k in restart}))), restart)
        return ConfigFile(path, text, version, cfg)

    def changes(self, cand):
        return diff(self.current.cfg, cand.cfg, self.current.doc, cand.doc)

    def _apply_checked(self, params, source, command_id, timeout):
        # checked again here: a SIGHUP may have changed the running configuration since
        try:
            cand = self.candidate(params, remote=True)
        except ReloadError as exc:
            return "failed", exc.reason, _failure(exc)
        return self.apply(cand, source, command_id=command_id, timeout=timeout)

    def reload_file(self):
        """SIGHUP: the file as edited locally, through the same checks and rollback."""
        path = self.current.path
        log.info("reloading %s", path)
        try:
            cand = ConfigFile.load(path)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused: %s", line)
            return "failed", exc.problems[0], {"code": RejectCode.INVALID_CONFIG.value}
        except OSError as exc:
            log.error("reload refused: %s: %s", path, exc.strerror)
            return "failed", str(exc), {"code": "unreadable"}
        if cand.version == self.version:
            log.info("reload: %s unchanged (version %s)", path, self.version[:12])
            return "done", "unchanged", {"version": self.version}
        try:
            cand = self._validated(path, cand.text, cand.doc)
        except ReloadError as exc:
            for line in exc.problems or [exc.reason]:
                log.error("reload refused: %s", line)
            return "failed", exc.reason, _failure(exc)
        return self.apply(cand, "sighup", written=True)

    def apply(self, cand, source, command_id=None, timeout=None, written=False):
        """Write (unless the file is already the candidate), reconfigure, wait for health;
        keep it or roll back. Runs on the supervisor's thread."""
        gw = self.gw
        old = self.current
        changes = self.changes(cand)
        timeout = self.health_timeout_s if timeout is None else timeout
        if not changes and cand.version == old.version:
            return "done", "unchanged", {"version": old.version}
        marker = {"version": cand.version, "previous": old.version, "source": source,
                  "command": command_id, "timeout": timeout, "changes": changes}
        try:
            # a restart before the health check ends concludes it at start (see
            # _pending_at_start): no configuration is kept that was never found healthy
            write_atomic(old.path + PENDING, json.dumps(marker))
            keep_previous(old.path, old.text, old.version)
            if not written:
                write_atomic(old.path, cand.text)
        except OSError as exc:
            reason = "%s: cannot write (%s); nothing changed" % (
                exc.filename or old.path, exc.strerror)
            log.error("config_update: %s", reason)
            _remove(old.path + PENDING)
            return "failed", reason, {"code": "write_failed"}
        before = gw.health_marks()
        # systemd: reloading until READY=1 again (sd_notify(3))
        gw.notifier.send("RELOADING=1", "MONOTONIC_USEC=%d" % (time.monotonic() * 1e6))
        billing = any(k in changes for k in ("accounts", "tariffs", "cost_control"))
        self.current = cand
        try:
            gw.reconfigure(cand.cfg, billing=billing)
            problems = self._wait_healthy(before, changes, timeout)
        except Exception as exc:            # a bug must not leave half a configuration
            log.exception("configuration %s", cand.version[:12])
            problems = ["internal error: %s" % exc]
        if not problems:
            return self._applied(marker)
        return self._roll_back(old, marker, problems, billing)

    def _applied(self, marker, **more):
        cand = self.current
        _remove(cand.path + PENDING)
        fields = {"version": cand.version, "previous": marker["previous"],
                  "source": marker["source"], "changes": marker["changes"]}
        if marker.get("command"):
            fields["command"] = marker["command"]
        fields.update(more)
        self.gw.sink.event("config.applied", **fields)
        log.info("configuration %s applied (%s): %s", cand.version[:12], marker["source"],
                 json.dumps(marker["changes"], sort_keys=True))
        self.gw.notifier.ready(self.gw.summary())
        return "done", None, {"version": cand.version, "previous_version": marker["previous"],
                              "changes": marker["changes"]}

    def _roll_back(self, old, marker, problems, billing=True, **more):
        """Back to `old` (file and running configuration), saying why."""
        gw, cand = self.gw, self.current
        reason = "; ".join(problems)
        log.error("configuration %s rolled back (%s): %s", cand.version[:12],
                  marker["source"], reason)
        try:
            to_history(old.path, cand.text, cand.version, suffix=".rejected")
            write_atomic(old.path, old.text)
        except OSError as exc:
            log.error("rollback: cannot write %s back (%s)", old.path, exc.strerror)
        gw.reconfigure(old.cfg, billing=billing)
        self.current = old
        _remove(old.path + PENDING)
        fields = {"version": cand.version, "restored": old.version, "source": marker["source"],
                  "reason": reason, "changes": marker["changes"]}
        if marker.get("command"):
            fields["command"] = marker["command"]
        fields.update(more)
        gw.sink.event("config.rolled_back", **fields)
        gw.notifier.ready(gw.summary())
        return "failed", "rolled back to %s: %s" % (old.version[:12], reason), {
            "code": "rolled_back", "version": old.version, "rejected_version": cand.version}

    def _pending_at_start(self):
        """A reload the process did not live to confirm (a crash or power cut during its
        health check): if the file is that configuration, its health is checked now (the
        lines it added or changed must open; the uplink may still be connecting after a
        start) and it is rolled back to gateway.toml.prev if they do not."""
        path = self.current.path + PENDING
        try:
            with open(path, encoding="utf-8") as f:
                marker = json.load(f)
            marker["version"], marker["previous"], marker["source"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: unreadable (%s); removed", path, exc)
            _remove(path)
            return
        if marker["version"] != self.version:
            _remove(path)           # the file never changed, or was put back: nothing to do
            return
        self._pending_command = marker.get("command")
        self.submit(lambda: self._confirm(marker))

    def _confirm(self, marker):
        path = self.current.path
        timeout = marker.get("timeout") or self.health_timeout_s
        # what the reload added or changed must open (the uplink may still be connecting)
        problems = self._wait_healthy({"open": set(), "uplink": False}, marker["changes"],
                                      timeout)
        if not problems:
            result = self._applied(marker, after_restart=True)
        else:
            try:
                prev = ConfigFile.load(path + ".prev")
                prev = ConfigFile(path, prev.text, prev.version, prev.cfg)
                if prev.version != marker["previous"]:
                    raise ConfigError(["%s.prev: not configuration %s" % (
                        path, marker["previous"][:12])])
            except (ConfigError, OSError) as exc:
                why = exc.problems[0] if isinstance(exc, ConfigError) else str(exc)
                log.error("configuration %s is not healthy (%s) and cannot be rolled back: "
                          "%s", self.version[:12], "; ".join(problems), why)
                _remove(path + PENDING)
                result = ("failed", "not healthy after a restart, and no previous "
                          "configuration to go back to: %s" % why, {"code": "rolled_back"})
            else:
                result = self._roll_back(prev, marker, problems, after_restart=True)
        if marker.get("command"):
            self._concluded[marker["command"]] = result
        return result

    def _wait_healthy(self, before, changes, timeout):
        gw = self.gw
        touched = set()
        for k in ("added", "changed"):
            v = changes.get("ports", {}).get(k, ())
            touched.update(v)
        end = time.monotonic() + timeout
        while True:
            problems = gw.health_problems(before, touched)
            if not problems or time.monotonic() >= end:
                return problems
            # the supervisor's duties go on while it waits (restarts, the watchdog)
            if gw.supervise_once() and gw.notifier.watchdog_s:
                gw.notifier.watchdog()
            time.sleep(0.1)


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)


def _failure(exc):
    out = {"code": exc.code.value}
    if len(exc.problems) > 1:
        out["problems"] = exc.problems[:50]
    return out
