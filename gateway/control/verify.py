"""Command verification, pure: bytes in, an authenticated command or a `Rejected` with a
code out. No I/O, no clock of its own (the caller passes `now`).

Order matters for hostile input: the size first, then the JSON (depth-bounded), then the
shape, then the Ed25519 signature. Only after the signature is anything in the command
believed: until then a rejection is `authenticated=False` and may not speak in the
command's name (no id, no response topic).
"""

import datetime as _dt
import hashlib
import json
import re

from gateway.control import signing
from gateway.model import GatewayError, RejectCode, valid_topic
from gateway.money import parse_yuan

from gateway.model import ACTIONS, GATEWAY_ACTIONS, RELAY_ACTIONS  # noqa: F401 (re-export)
FINAL = ("done", "failed", "rejected")

ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}", re.ASCII)
TXN_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]{1,64}", re.ASCII)
# JSON nesting a command needs: the object, params, a list of quantities
MAX_DEPTH = 8
MAX_CORRELATION_BYTES = 256


class Rejected(GatewayError):
    """A command refused; `authenticated` says whether its signature was good."""

    def __init__(self, code, reason, authenticated=True):
        super().__init__(reason)
        self.code = RejectCode(code)
        self.reason = reason
        self.authenticated = authenticated
        self.claimed_id = None


def _depth_guard(obj, depth=0):
    if depth > MAX_DEPTH:
        raise Rejected(RejectCode.MALFORMED, "malformed command: nested deeper than %d"
                       % MAX_DEPTH, authenticated=False)
    if isinstance(obj, dict):
        for v in obj.values():
            _depth_guard(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _depth_guard(v, depth + 1)


def _no_constants(name):
    raise ValueError("%s is not JSON" % name)


def parse_json(payload, max_bytes):
    """The command object of a payload, or Rejected (unauthenticated)."""
    if len(payload) > max_bytes:
        raise Rejected(RejectCode.OVERSIZED, "oversized command (%d bytes, at most %d)"
                       % (len(payload), max_bytes), authenticated=False)
    try:
        cmd = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constants)
    except RecursionError:
        raise Rejected(RejectCode.MALFORMED, "malformed JSON: nested too deep",
                       authenticated=False) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(RejectCode.MALFORMED, "malformed JSON: %s" % str(exc)[:80],
                       authenticated=False) from None
    if not isinstance(cmd, dict):
        raise Rejected(RejectCode.MALFORMED, "malformed command: not a JSON object",
                       authenticated=False)
    _depth_guard(cmd)
    return cmd


def check_shape(cmd):
    """The fields every command has, typed strictly (`v` is the integer 1, not true or 1.0;
    an id is matched whole, so "x\\n" is not "x")."""
    v = cmd.get("v")
    if type(v) is not int or v != 1:
        raise Rejected(RejectCode.BAD_VERSION, "unsupported version %s (v must be 1)"
                       % json.dumps(v)[:16], authenticated=False)
    cid = cmd.get("id")
    if not isinstance(cid, str) or not ID_PATTERN.fullmatch(cid):
        raise Rejected(RejectCode.BAD_ID, "missing or bad id", authenticated=False)
    for field in ("meter", "action", "issued_at", "expires_at"):
        if not isinstance(cmd.get(field), str):
            raise Rejected(RejectCode.MISSING_FIELD, "missing field %s" % field,
                           authenticated=False)
    if "params" in cmd and not isinstance(cmd["params"], dict):
        raise Rejected(RejectCode.BAD_PARAMS, "params must be an object", authenticated=False)


_SIGNING_CODES = {"missing signature": RejectCode.MISSING_SIGNATURE,
                  "no head-end keys configured": RejectCode.NO_KEYS}


def authenticate(payload, keys, max_bytes):
    """An authenticated command (a dict) from raw bytes, or Rejected(authenticated=False)."""
    cmd = parse_json(payload, max_bytes)
    try:
        check_shape(cmd)
        code, why = signing.check(cmd, keys)
        if code is not None:
            raise Rejected(code, why, authenticated=False)
    except Rejected as rej:
        rej.claimed_id = claimed_id(cmd)
        raise
    return cmd


def claimed_id(payload_cmd):
    """The id an unauthenticated input claims, if it is a well-formed one (shown to the
    head-end as `claimed_id`, never as `id`)."""
    cid = payload_cmd.get("id") if isinstance(payload_cmd, dict) else None
    return cid if isinstance(cid, str) and ID_PATTERN.fullmatch(cid) else None


def parse_time(value, field):
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError("%s must be an RFC 3339 time string" % field)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("%s is not an RFC 3339 time: %r" % (field, value[:40])) from None
    if t.tzinfo is None:
        raise ValueError("%s needs a UTC offset: %r" % (field, value[:40]))
    return t


def check_window(cmd, now, skew_s, max_validity_s):
    """Rejected unless `now` (aware datetime) is inside the command's validity window."""
    try:
        issued = parse_time(cmd["issued_at"], "issued_at")
        expires = parse_time(cmd["expires_at"], "expires_at")
    except ValueError as exc:
        raise Rejected(RejectCode.BAD_TIME, str(exc)) from None
    skew = _dt.timedelta(seconds=skew_s)
    if expires <= issued:
        raise Rejected(RejectCode.BAD_TIME, "expires_at is not after issued_at")
    length = (expires - issued).total_seconds()
    if length > max_validity_s:
        raise Rejected(RejectCode.WINDOW_TOO_LONG,
                       "validity window of %d s is longer than the allowed %d s"
                       % (length, max_validity_s))
    if issued > now + skew:
        raise Rejected(RejectCode.NOT_YET_VALID, "not yet valid (issued_at is in the future)")
    if now > expires + skew:
        raise Rejected(RejectCode.EXPIRED, "expired")
    return expires.timestamp()


def parse_amount(value):
    """A top-up amount: ASCII "123456.78" at most, positive."""
    try:
        amount = parse_yuan(value)
    except ValueError as exc:
        raise Rejected(RejectCode.BAD_PARAMS, "topup amount %s" % exc) from None
    if amount <= 0:
        raise Rejected(RejectCode.BAD_PARAMS, "topup amount must be positive")
    return amount


def valid_txn(value):
    return isinstance(value, str) and TXN_PATTERN.fullmatch(value) is not None


def response_topic_ok(topic):
    """A topic we may publish a result to (the rule of gateway.model.valid_topic)."""
    return valid_topic(topic) is not None


def correlation_ok(data):
    return isinstance(data, (bytes, bytearray)) and len(data) <= MAX_CORRELATION_BYTES


def digest(cmd):
    """The command's identity for replay detection (what the signature covers)."""
    return hashlib.sha256(signing.canonical(cmd)).hexdigest()[:32]


def payload_digest(payload):
    return hashlib.sha256(bytes(payload)).hexdigest()
