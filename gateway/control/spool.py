"""The technician's relay path (`mgw relay`): a spool folder, both sides of its file
protocol. The client writes `<rid>.req.json` (atomically, by rename), the service answers
with `<rid>.res.json`.

The folder is writable by the gateway's group, so anything in it is untrusted: requests are
opened without following links and without blocking (a FIFO must not hang the executor),
must be small regular files, and may ask for `cut_off`, `restore` or `status` only. Money,
accounts and guarantees need a signed command from the head-end. Results are created
exclusively (never through a planted link). A request is stale by its file's mtime, not by
anything it says about itself.
"""

import errno
import json
import logging
import os
import re
import stat
import time

from gateway.model import GatewayError

log = logging.getLogger(__name__)

LOCAL_ACTIONS = ("cut_off", "restore", "status")
RESTORE_MODES = ("direct", "close_allowed")
MAX_REQUEST_BYTES = 4096
MAX_RESULT_BYTES = 64 * 1024
# a scan answers at most this many requests, so remote commands are not starved by a
# folder full of status requests on a dead meter
REQUESTS_PER_SCAN = 4
STALE_AFTER_S = 120            # a request left from before a restart is never acted on late
FUTURE_SLACK_S = 60            # an mtime further ahead than this is not believed
_REQUEST_NAME = re.compile(r"([0-9a-f]{32})\.req\.json", re.ASCII)
_OPERATOR = re.compile(r"[\w .@-]{0,64}")


class BadRequest(GatewayError, ValueError):
    """A spool file that is not an acceptable request (one line)."""


def prepare(spool, group):
    """The folder: setgid, root and the gateway's group only. No socket, nothing reachable
    from the network."""
    try:
        os.makedirs(spool, exist_ok=True)
        os.chmod(spool, 0o2770)
        import grp
        try:
            os.chown(spool, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, PermissionError):
            pass
        return True
    except OSError as exc:
        log.warning("spool %s: %s (local relay operation unavailable)", spool, exc.strerror)
        return False


def read_request(path, now):
    """(request dict, uid of the file's owner) or BadRequest. Never follows a link, never
    blocks, never reads more than MAX_REQUEST_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadRequest("a symbolic link, not a request") from None
        raise BadRequest("cannot open (%s)" % exc.strerror) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRequest("not a regular file")
        if st.st_size > MAX_REQUEST_BYTES:
            raise BadRequest("too large (%d bytes, at most %d)" % (st.st_size,
                                                                  MAX_REQUEST_BYTES))
        raw = os.read(fd, MAX_REQUEST_BYTES + 1)
    finally:
        os.close(fd)
    age = now - st.st_mtime
    if age > STALE_AFTER_S or age < -FUTURE_SLACK_S:
        raise BadRequest("stale request (written %.0f s ago; requests expire after %d s)"
                         % (age, STALE_AFTER_S))
    try:
        req = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("not a JSON request") from None
    return check_request(req), st.st_uid


def check_request(req):
    """The request reduced to what a technician may ask, or BadRequest."""
    if not isinstance(req, dict):
        raise BadRequest("not a JSON object")
    action = req.get("action")
    if action not in LOCAL_ACTIONS:
        raise BadRequest("action %s is not a local operation (%s); money, accounts and "
                         "guarantees need a signed command from the head-end"
                         % (json.dumps(action)[:32], ", ".join(LOCAL_ACTIONS)))
    meter = req.get("meter")
    if not isinstance(meter, str) or not 1 <= len(meter) <= 64:
        raise BadRequest("missing or bad meter")
    params = req.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("params must be an object")
    extra = set(params) - ({"mode"} if action == "restore" else set())
    if extra:
        raise BadRequest("params not allowed for %s: %s" % (action, ", ".join(
            sorted(str(k)[:16] for k in extra))))
    if "mode" in params and params["mode"] not in RESTORE_MODES:
        raise BadRequest("restore mode is direct or close_allowed")
    operator = req.get("operator")
    if operator is not None and (not isinstance(operator, str) or
                                 not _OPERATOR.fullmatch(operator)):
        raise BadRequest("bad operator name")
    return {"meter": meter, "action": action, "params": dict(params), "operator": operator}


def write_result(spool, rid, body):
    """Create `<rid>.res.json` without following or replacing anything planted: a fresh
    temporary file (O_EXCL|O_NOFOLLOW), then a rename (which replaces a link, never
    writes through it)."""
    out = os.path.join(spool, "%s.res.json" % rid)
    tmp = os.path.join(spool, ".%s.%s.res.tmp" % (rid, os.urandom(4).hex()))
    data = json.dumps(body, default=str).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
    try:
        os.fchmod(fd, 0o660)
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, out)
    except OSError:
        os.unlink(tmp)
        raise


class SpoolServer:
    """The service's side: scan, read safely, hand each good request to `handle(req,
    operator)` which returns the result body, answer."""

    def __init__(self, spool, handle, reject):
        self.spool = spool
        self.handle = handle
        self.reject = reject            # (reason, operator) -> result body, audited
        self._reported = set()          # bad names that could not be removed: said once

    def scan(self, now=None):
        try:
            names = os.listdir(self.spool)
        except OSError:
            return 0
        done = 0
        for name in names:
            m = _REQUEST_NAME.fullmatch(name)
            if not m:
                continue
            rid = m.group(1)
            path = os.path.join(self.spool, name)
            try:
                req, uid = read_request(path, time.time() if now is None else now)
            except BadRequest as exc:
                operator = "uid %s" % _owner(path)
                body = self.reject(str(exc), operator)
                self._discard(path, name, str(exc))
                self._answer(rid, body)
                continue
            try:
                os.unlink(path)
            except OSError:
                pass
            operator = "%s (uid %d)" % (req.get("operator"), uid)
            self._answer(rid, self.handle(req, operator))
            done += 1
            if done >= REQUESTS_PER_SCAN:
                break
        return done

    def _discard(self, path, name, why):
        try:
            os.unlink(path)                       # removes a link itself, never its target
        except IsADirectoryError:
            try:
                os.rmdir(path)
            except OSError:
                pass
        except OSError:
            pass
        if os.path.lexists(path) and name not in self._reported:
            self._reported.add(name)
            log.warning("spool %s: %s (cannot remove it)", name, why)

    def _answer(self, rid, body):
        try:
            write_result(self.spool, rid, body)
        except OSError as exc:
            log.warning("spool: cannot answer %s (%s)", rid, exc.strerror)


def _owner(path):
    try:
        return os.lstat(path).st_uid
    except OSError:
        return "?"


# ---------------------------------------------------------------- the client (mgw relay)

def submit(spool, meter, action, params, operator):
    """Write a request atomically; returns its id."""
    rid = os.urandom(16).hex()            # 32 hex digits, as the request names need
    req = {"meter": meter, "action": action, "params": params, "operator": operator}
    check_request(req)
    tmp = os.path.join(spool, ".%s.tmp" % rid)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
    with os.fdopen(fd, "w") as f:
        json.dump(req, f)
    os.replace(tmp, os.path.join(spool, "%s.req.json" % rid))
    return rid


def wait_result(spool, rid, timeout):
    """The service's answer, or None after `timeout` (the request is then withdrawn if the
    service had not taken it; `taken` says which)."""
    out = os.path.join(spool, "%s.res.json" % rid)
    end = time.time() + timeout
    while time.time() < end:
        try:
            fd = os.open(out, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            time.sleep(0.2)
            continue
        except OSError as exc:
            raise BadRequest("%s: %s (someone put something there)" % (out, exc.strerror)) \
                from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadRequest("%s is not a result file (someone put it there)" % out)
            raw = os.read(fd, MAX_RESULT_BYTES + 1)
        finally:
            os.close(fd)
        os.unlink(out)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadRequest("%s is not a result the service wrote" % out) from None
        if not isinstance(body, dict) or len(raw) > MAX_RESULT_BYTES:
            raise BadRequest("%s is not a result the service wrote" % out)
        return body, True
    try:
        os.unlink(os.path.join(spool, "%s.req.json" % rid))
        return None, False
    except FileNotFoundError:
        return None, True
