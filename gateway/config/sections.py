"""The service's own sections of the configuration file ([gateway], [storage], [[ports]],
[[meters]], [uplink], [control]), declared as data. This is also the protocol registry
of the configuration: what each protocol (gateway/registry.py) needs in a [[meters]] entry.

Cost control declares its sections in gateway/billing/settings.py; gateway/service/config.py
puts the whole file together.
"""

import re

from protocols.modbus_profiles import PROFILES

from gateway.config.schema import Field, ListOfTables, Table
from gateway.registry import DEFAULT_PROTOCOL, keyed_by
from gateway.registry import PROTOCOLS as PROTOCOL_INFO
from gateway.registry import NAMES as PROTOCOLS

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
BAUDRATES = (600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)


def _unreadable(path):
    """Why the service could not read this file (it runs as its own user), or None."""
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return "file not found: %s" % path
    except IsADirectoryError:
        return "is a folder, not a file: %s" % path
    except OSError as exc:
        return "cannot read %s (%s)" % (path, exc.strerror)


def _pattern(regex, message):
    return lambda value: None if regex.match(value) else message


# ---------------------------------------------------------------- [gateway], [storage]

GATEWAY = Table("gateway", "GatewaySettings", [
    Field("id", str, required=True,
          check=_pattern(_ID, "use letters, digits, '.', '_' or '-' (it appears in topics)"),
          doc="letters, digits, `.`, `_`, `-`; the `{gateway}` part of every topic"),
    Field("data_dir", str, "/var/lib/meter-gateway",
          doc="journal, account store, state file, audit trail, status, spool"),
    Field("log_level", str, "info", choices=("debug", "info", "warning", "error"),
          doc="logs go to stderr; journald keeps them"),
    Field("status_interval_s", float, 5.0, minimum=1,
          doc="how often `status.json` (for `mgw status`) and systemd's STATUS line are "
              "refreshed"),
    # status.json is rewritten every few seconds: keep it off the flash (/run is tmpfs)
    Field("status_dir", str, None, doc_default="`data_dir`",
          doc="where `status.json` goes; `/run/meter-gateway` (tmpfs, the unit's "
              "RuntimeDirectory) keeps these frequent small writes off the flash"),
])

STORAGE = Table("storage", "StorageSettings", [
    Field("journal_quota_mb", float, 256.0, minimum=1,
          doc="past it the oldest rows are dropped first, counted, and reported "
              "(`journal.dropped`)"),
    Field("reserve_mb", float, 8.0, minimum=0,
          doc="free space left on the file system; below it the journal stops growing"),
    Field("recover_state", bool, False,
          doc="start from `state.json.prev` when `state.json` is damaged, and from the "
              "daily `accounts.db.bak` when `accounts.db` is damaged, lost or another "
              "box's (see storage.md)"),
    Field("txn_keep_days", int, 400, minimum=2, maximum=3650,
          doc="days the payment ledger keeps a txn id (a repeated one is applied once); "
              "older ones are forgotten daily, so the account store does not grow forever"),
])


# ---------------------------------------------------------------- [[ports]]

def _check_port(port, bad, context):
    if port["name"] in {p.name for p in context.earlier}:
        bad("name", "duplicate port name %r" % port["name"])


PORTS = ListOfTables("ports", "PortConfig", [
    Field("name", str, required=True, doc="the line's name, used by `[[meters]]` `port`"),
    Field("device", str, required=True,
          doc="any path pyserial opens (`/dev/ttyS1`, `/dev/ttyUSB0`, a pseudo-terminal)"),
    Field("baudrate", int, 2400, choices=BAUDRATES,
          doc="DL/T 645 RS-485 default; 1997 meters often 1200"),
    Field("parity", str, "E", choices=("E", "N", "O"),
          doc="8E1 is the DL/T 645 frame format; most Modbus meters use 8N1"),
    Field("bytesize", int, 8, choices=(7, 8), doc="data bits"),
    Field("stopbits", int, 1, choices=(1, 2), doc="stop bits"),
    Field("retries", int, 2, minimum=0, maximum=5,
          doc="attempts after the first, per transaction"),
    Field("settle_ms", int, 0, minimum=0, maximum=2000,
          doc="pause when the next transaction is for another meter (some meters need "
              "20-50 ms)"),
    Field("offline_after", int, 3, minimum=1,
          doc="failed transactions in a row before a meter is marked offline"),
    Field("catch_up_s", float, 1.0, minimum=0, maximum=300,
          doc="catch-up (补抄): pause before a meter whose poll slot failed is read again "
              "in the same interval, after the rest of the line; doubles each time; 0 = a "
              "failed slot is missed at once"),
], check=_check_port)


# ---------------------------------------------------------------- [[meters]]

def _dlt645(meter):
    """Meters identified by a 12-digit address (the registry says which)."""
    return keyed_by(meter["protocol"]) == "address"


def _modbus(meter):
    """Meters identified by a unit id and a register profile."""
    return keyed_by(meter["protocol"]) == "unit"


def _check_meter(meter, bad, context):
    if meter["id"] in {m.id for m in context.earlier}:
        bad("id", "duplicate meter id %r" % meter["id"])
    if meter["id"] is not None and not _ID.match(meter["id"]):
        bad("id", "use letters, digits, '.', '_' or '-'")
    ports = {p.name for p in context.sections.get("ports", ())}
    if meter["port"] is not None and meter["port"] not in ports:
        bad("port", "no port named %r (ports: %s)"
            % (meter["port"], ", ".join(sorted(ports)) or "none"))
    if _dlt645(meter) and meter["address"] is not None:
        if not re.match(r"^[0-9]{1,12}$", meter["address"]):
            bad("address", "a %s address is up to 12 digits as on the nameplate, not %r"
                % (PROTOCOL_INFO[meter["protocol"]].label, meter["address"]))
            return
        meter["address"] = meter["address"].rjust(12, "0")
        if any(m.port == meter["port"] and m.address == meter["address"] and
               m.protocol == meter["protocol"] and m.logical_address ==
               meter["logical_address"] for m in context.earlier):
            bad("address", "two meters with address %s on port %s"
                % (meter["address"], meter["port"]))


METERS = ListOfTables("meters", "MeterConfig", [
    Field("id", str, required=True, doc="letters, digits, `.`, `_`, `-`"),
    Field("port", str, required=True, doc="the `[[ports]]` `name` of its line"),
    Field("protocol", str, DEFAULT_PROTOCOL, choices=PROTOCOLS, doc="the meter's protocol"),
    Field("address", str, required=_dlt645, doc_default="required for DL/T 645 and 698.45",
          doc="12 digits as on the nameplate (shorter ones are padded with 0)"),
    Field("logical_address", int, 0, minimum=0, maximum=255,
          doc="DL/T 698.45: the meter's logical address (0 management core, 1 metering "
              "core; 2-255 are sent as the extended logical address)"),
    Field("baudrate", int, None, choices=BAUDRATES, doc_default="the port's",
          doc="this meter's baud rate where it differs from its port's (1997 meters often "
              "1200 on a 2400 line); the line is switched between transactions"),
    Field("parity", str, None, choices=("E", "N", "O"), doc_default="the port's",
          doc="this meter's parity where it differs from its port's"),
    Field("version", int, 2007, choices=(2007, 1997),
          doc="`1997` for old meters (reads only; they have no relay control)"),
    Field("unit", int, required=_modbus, minimum=1, maximum=247,
          doc_default="required for Modbus", doc="Modbus unit id"),
    Field("profile", str, required=_modbus, choices=tuple(sorted(PROFILES)),
          doc_default="required for Modbus",
          doc="the meter's Modbus register map"),
    Field("function_code", int, None, choices=(3, 4), doc_default="the profile's",
          doc="Modbus: read the map's registers with 03 (holding) or 04 (input); public "
              "drivers disagree for the Chint DDSU666. On exception 01 the other is tried "
              "once and kept"),
    Field("interval_s", int, 900, minimum=10,
          doc="energy registers, aligned to the clock (every quarter hour at 900)"),
    Field("instant_interval_s", int, 300, minimum=0,
          doc="voltage, current, power, relay status (0 = never)"),
    Field("clock_interval_s", int, 3600, minimum=0,
          doc="meter clock read and drift check (0 = never)"),
    Field("prepaid", bool, False,
          doc="also read the meter's own remaining money and overdraft"),
    Field("password", str, "000000", check=_pattern(re.compile(r"^[0-9]{6}$"),
                                                    "a meter password is 6 digits"),
          doc="for relay control (0x1C): 6 digits"),
    Field("password_level", int, 2, minimum=0, maximum=0x98,
          doc="for relay control (0x1C)"),
    Field("operator_code", str, "00000000",
          check=_pattern(re.compile(r"^[0-9A-Fa-f]{8}$"), "an operator code is 8 hex digits"),
          doc="for relay control (0x1C): 8 hex digits"),
    Field("secured", bool, False,
          doc="ESAM-secured meter: relay commands must carry the master station's payload"),
    Field("relay_plaintext", bool, False,
          doc="DL/T 698.45 test meters and the simulator: relay commands as plaintext ACTION "
              "on 8000/8001; otherwise they must carry the master station's "
              "SECURITY-Request"),
    Field("relay_valid_s", int, 300, minimum=30, maximum=3600,
          doc="validity deadline written into relay frames (the meter refuses a late frame)"),
], check=_check_meter)


# ---------------------------------------------------------------- [uplink]

def _check_uplink(up, bad, context):
    if (up["tls_cert"] is None) != (up["tls_key"] is None):
        bad("tls_key", "tls_cert and tls_key go together")
    root = up["topic_root"]
    if not root.strip("/") or root.startswith("$") or any(c in root for c in "+#\0"):
        bad("topic_root", "must be a topic prefix such as \"mgw/v1\" (not empty, no '+', "
            "'#' or NUL, not starting with '$'), not %r" % (root,))
    if (up["password"] is not None or up["password_file"]) and not (
            up["tls"] or up["tls_ca"] or up["tls_cert"]) and not up["allow_insecure"]:
        bad("password", "would travel in clear: set tls = true (or tls_ca), or "
            "allow_insecure = true for a link that needs no protection")
    for key in ("tls_ca", "tls_cert", "tls_key", "password_file"):
        if up[key]:
            why = _unreadable(up[key])
            if why:
                bad(key, why)


UPLINK = Table("uplink", "UplinkSettings", [
    Field("host", str, None, doc="no host: no uplink (readings stay in the journal)"),
    Field("port", int, 1883, minimum=1, maximum=65535, doc="the broker's port"),
    Field("topic_root", str, "mgw/v1",
          doc="topics are `{topic_root}/{gateway.id}/...`; no `+`, `#` or NUL, not empty, "
              "not starting with `$`"),
    Field("mqtt_version", str, "5", choices=("5", "3.1.1"), doc_default='`"5"`',
          doc="a string in the file: `\"5\"` or `\"3.1.1\"`"),
    Field("client_id", str, None, doc_default="`mgw-{gateway.id}`", doc="MQTT client id"),
    Field("username", str, None, doc="broker user name"),
    Field("password", str, None,
          doc="broker password; prefer `password_file`; refused without TLS unless "
              "`allow_insecure = true`"),
    Field("password_file", str, None,
          doc="a file holding the broker password (mode 0640); refused without TLS unless "
              "`allow_insecure = true`"),
    Field("tls", bool, False,
          doc="TLS, verified against the system's CA store when no `tls_ca` is given"),
    Field("allow_insecure", bool, False,
          doc="allow a broker password over a connection without TLS (a trusted local "
              "link only)"),
    Field("tls_ca", str, None, doc="TLS with the broker's CA (turns TLS on)"),
    Field("tls_cert", str, None, doc="client certificate, optional (turns TLS on)"),
    Field("tls_key", str, None, doc="the client certificate's key (with `tls_cert`)"),
    Field("keepalive_s", int, 60, minimum=5, doc="MQTT keep-alive"),
    Field("session_expiry_s", int, 7 * 86400, minimum=0,
          doc="MQTT 5 session expiry: commands queued while away still arrive"),
    Field("batch_max", int, 200, minimum=1, maximum=5000,
          doc="a readings message is sent when it holds this many readings"),
    Field("batch_age_s", float, 1.0, minimum=0,
          doc="... or when its oldest reading is this old"),
    Field("inflight_max", int, 16, minimum=1, maximum=1000,
          doc="messages published and not yet acknowledged"),
    Field("health_interval_s", int, 300, minimum=10, doc="the `gateway.health` event"),
    Field("reconnect_max_s", float, 120.0, minimum=1,
          doc="reconnect back-off ceiling (jittered)"),
], check=_check_uplink)


# ---------------------------------------------------------------- [control]

def _check_control(control, bad, context):
    for i, k in enumerate(control["public_keys"]):
        key = "public_keys[%d]" % i
        if not isinstance(k, str):
            bad(key, "must be a path")
        elif _unreadable(k):
            bad(key, _unreadable(k))
        else:
            # the header only: the executor parses the key (control/signing.py, a layer
            # above this one) and says what is wrong with it
            with open(k, "rb") as f:
                head = f.read(64)
            if not head.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----"):
                bad(key, "%s: not a PEM public key" % k)


CONTROL = Table("control", "ControlSettings", [
    Field("public_keys", list, [],
          doc="head-end Ed25519 public keys (PEM); without one every command is rejected"),
    Field("require_synced_clock", bool, True,
          doc="no cut-off, no meter time sync, readings flagged while the clock is not "
              "NTP-synchronised; `false` on boxes without NTP"),
    Field("max_validity_s", int, 3600, minimum=60,
          doc="longest `expires_at - issued_at` accepted"),
    Field("clock_skew_s", int, 120, minimum=0,
          doc="tolerance on `issued_at` / `expires_at`"),
    Field("max_command_bytes", int, 8192, minimum=512,
          doc="larger command payloads are rejected unread"),
    Field("cutoffs_per_hour", int, 60, minimum=0,
          doc="cut-offs this gateway makes per hour at most (restores are never limited)"),
    Field("restore_mode", str, "close_allowed", choices=("close_allowed", "direct_close"),
          doc="how a restore closes the relay; a command may ask for `\"mode\": \"direct\"`"),
    Field("local_group", str, "meter-gateway",
          doc="the group whose members may use `mgw relay`"),
], check=_check_control)


# ---------------------------------------------------------------- [metrics]

def parse_listen(text):
    """(host, port) of "host:port" ("[::1]:9108" for IPv6), or ValueError."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("use host:port, such as 127.0.0.1:9108")
    return host.strip("[]"), int(port)


def _listen(value):
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


METRICS = Table("metrics", "MetricsSettings", [
    Field("listen", str, None, check=_listen,
          doc="`host:port` of a Prometheus endpoint (needs the `metrics` extra, "
              "prometheus-client); none: no endpoint"),
])


SECTIONS = (GATEWAY, STORAGE, PORTS, METERS, UPLINK, CONTROL, METRICS)

GatewaySettings = GATEWAY.record
StorageSettings = STORAGE.record
PortConfig = PORTS.record
MeterConfig = METERS.record
UplinkSettings = UPLINK.record
ControlSettings = CONTROL.record
MetricsSettings = METRICS.record
for _record in (GatewaySettings, StorageSettings, PortConfig, MeterConfig, UplinkSettings,
                ControlSettings, MetricsSettings):
    _record.__module__ = __name__        # where pickle and readers find them
