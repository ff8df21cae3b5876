"""The configuration file (TOML, CONTRACT.md): loaded and validated as a whole before
anything starts. Every problem is one line naming the file and the key; all of them are
reported at once. Defaults are documented in docs/configuration.md.
"""

import os
import re
from decimal import Decimal, InvalidOperation

try:
    import tomllib
except ImportError:        # Python < 3.11
    import tomli as tomllib

from protocols.modbus_profiles import PROFILES

DEFAULT_PATH = "/etc/meter-gateway/gateway.toml"

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
BAUDRATES = (600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)


class ConfigError(Exception):
    """All problems of a configuration file, one line each."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def config_path(explicit=None):
    return explicit or os.environ.get("MGW_CONFIG") or DEFAULT_PATH


class Section(dict):
    """A validated table: attribute access for the code that uses it."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Record:
    """A validated table with a fixed set of keys, for the thousand meters of a big
    concentrator: attribute access like Section, item access for the code that edits it,
    a fraction of a dict's memory."""

    __slots__ = ()
    FIELDS = ()

    def __getitem__(self, key):
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __setitem__(self, key, value):
        setattr(self, key, value)

    def __contains__(self, key):
        return key in self.FIELDS

    def get(self, key, default=None):
        return getattr(self, key, default)

    def keys(self):
        return self.FIELDS

    def items(self):
        return [(k, getattr(self, k)) for k in self.FIELDS]

    def __eq__(self, other):
        return isinstance(other, Record) and self.items() == other.items()

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join("%s=%r" % kv for kv in self.items()))


def record_type(name, fields):
    return type(name, (Record,), {"__slots__": tuple(fields), "FIELDS": tuple(fields)})


def as_record(cls, section):
    rec = cls.__new__(cls)
    for k in cls.FIELDS:
        setattr(rec, k, section[k])
    return rec


class _Checker:
    def __init__(self, path):
        self.path = path
        self.problems = []

    def bad(self, key, message):
        self.problems.append("%s: %s: %s" % (self.path, key, message))

    def take(self, table, key, where, kind, default=None, required=False, choices=None,
             minimum=None, maximum=None):
        full = "%s.%s" % (where, key) if where else key
        if key not in table:
            if required:
                self.bad(full, "is required")
            return default
        value = table[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.bad(full, "must be a whole number, not %r" % (value,))
            return default
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.bad(full, "must be a number, not %r" % (value,))
                return default
            value = float(value)
        if kind is str and not isinstance(value, str):
            self.bad(full, "must be a string, not %r" % (value,))
            return default
        if kind is bool and not isinstance(value, bool):
            self.bad(full, "must be true or false, not %r" % (value,))
            return default
        if kind is list and not isinstance(value, list):
            self.bad(full, "must be a list, not %r" % (value,))
            return default
        if kind == "money":
            if not isinstance(value, str):
                self.bad(full, "must be a decimal string such as \"50.00\" (money is never a "
                               "float), not %r" % (value,))
                return default
            try:
                value = Decimal(value)
            except InvalidOperation:
                self.bad(full, "is not a decimal number: %r" % (value,))
                return default
            if not value.is_finite():
                self.bad(full, "is not a finite number: %r" % (value,))
                return default
        if choices is not None and value not in choices:
            self.bad(full, "must be one of %s, not %r"
                     % (", ".join(repr(c) for c in choices), value))
            return default
        if minimum is not None and value < minimum:
            self.bad(full, "must be at least %s, not %r" % (minimum, value))
            return default
        if maximum is not None and value > maximum:
            self.bad(full, "must be at most %s, not %r" % (maximum, value))
            return default
        return value

    def unknown(self, table, known, where):
        for key in table:
            if key not in known:
                self.bad("%s.%s" % (where, key) if where else key, "unknown key")


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


def _table(chk, doc, key):
    value = doc.get(key, {})
    if not isinstance(value, dict):
        chk.bad(key, "must be a table ([%s])" % key)
        return {}
    return value


def load(path, validators=()):
    """The validated configuration, or ConfigError with every problem. `validators` are
    functions (cfg, checker) of other modules (tariffs, accounts) run on the same file."""
    doc = _read(path)
    cfg = validate(doc, path)
    for validator in validators:
        validator(cfg, cfg["_checker"])
    chk = cfg.pop("_checker")
    cfg.pop("_raw", None)
    if chk.problems:
        raise ConfigError(chk.problems)
    return cfg


def _read(path):
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(["%s: no such file (set --config or $MGW_CONFIG)" % path]) from None
    except PermissionError:
        raise ConfigError(["%s: permission denied" % path]) from None
    except IsADirectoryError:
        raise ConfigError(["%s: is a folder, not a file" % path]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(["%s: not valid TOML: %s" % (path, exc)]) from None
    except UnicodeDecodeError:
        raise ConfigError(["%s: not UTF-8 text" % path]) from None
    return doc


def validate(doc, path="<config>"):
    chk = _Checker(path)
    known_top = {"gateway", "storage", "ports", "meters", "uplink", "control", "tariffs",
                 "accounts", "cost_control"}
    chk.unknown(doc, known_top, "")

    g = _table(chk, doc, "gateway")
    gw = Section(
        id=chk.take(g, "id", "gateway", str, required=True),
        data_dir=chk.take(g, "data_dir", "gateway", str, "/var/lib/meter-gateway"),
        log_level=chk.take(g, "log_level", "gateway", str, "info",
                           choices=("debug", "info", "warning", "error")),
        status_interval_s=chk.take(g, "status_interval_s", "gateway", float, 5.0, minimum=1),
        # status.json is rewritten every few seconds: keep it off the flash (/run is tmpfs)
        status_dir=chk.take(g, "status_dir", "gateway", str, None),
    )
    chk.unknown(g, set(gw), "gateway")
    if gw.id is not None and not _ID.match(gw.id):
        chk.bad("gateway.id", "use letters, digits, '.', '_' or '-' (it appears in topics)")

    s = _table(chk, doc, "storage")
    storage = Section(
        journal_quota_mb=chk.take(s, "journal_quota_mb", "storage", float, 256.0, minimum=1),
        reserve_mb=chk.take(s, "reserve_mb", "storage", float, 8.0, minimum=0),
        recover_state=chk.take(s, "recover_state", "storage", bool, False),
    )
    chk.unknown(s, set(storage), "storage")

    ports = []
    names = set()
    raw_ports = doc.get("ports", [])
    if not isinstance(raw_ports, list):
        chk.bad("ports", "must be a list of tables ([[ports]])")
        raw_ports = []
    for i, p in enumerate(raw_ports):
        where = "ports[%d]" % i
        if not isinstance(p, dict):
            chk.bad(where, "must be a table")
            continue
        port = Section(
            name=chk.take(p, "name", where, str, required=True),
            device=chk.take(p, "device", where, str, required=True),
            baudrate=chk.take(p, "baudrate", where, int, 2400, choices=BAUDRATES),
            parity=chk.take(p, "parity", where, str, "E", choices=("E", "N", "O")),
            bytesize=chk.take(p, "bytesize", where, int, 8, choices=(7, 8)),
            stopbits=chk.take(p, "stopbits", where, int, 1, choices=(1, 2)),
            retries=chk.take(p, "retries", where, int, 2, minimum=0, maximum=5),
            settle_ms=chk.take(p, "settle_ms", where, int, 0, minimum=0, maximum=2000),
            offline_after=chk.take(p, "offline_after", where, int, 3, minimum=1),
        )
        chk.unknown(p, set(port), where)
        if port.name in names:
            chk.bad(where + ".name", "duplicate port name %r" % port.name)
        names.add(port.name)
        ports.append(port)

    meters = []
    ids = set()
    raw_meters = doc.get("meters", [])
    if not isinstance(raw_meters, list):
        chk.bad("meters", "must be a list of tables ([[meters]])")
        raw_meters = []
    seen_addr = set()
    for i, m in enumerate(raw_meters):
        where = "meters[%d]" % i
        if not isinstance(m, dict):
            chk.bad(where, "must be a table")
            continue
        protocol = chk.take(m, "protocol", where, str, "dlt645", choices=("dlt645", "modbus"))
        meter = Section(
            id=chk.take(m, "id", where, str, required=True),
            port=chk.take(m, "port", where, str, required=True),
            protocol=protocol,
            address=chk.take(m, "address", where, str, required=protocol == "dlt645"),
            version=chk.take(m, "version", where, int, 2007, choices=(2007, 1997)),
            unit=chk.take(m, "unit", where, int, required=protocol == "modbus", minimum=1,
                          maximum=247),
            profile=chk.take(m, "profile", where, str, required=protocol == "modbus",
                             choices=tuple(sorted(PROFILES))),
            interval_s=chk.take(m, "interval_s", where, int, 900, minimum=10),
            instant_interval_s=chk.take(m, "instant_interval_s", where, int, 300, minimum=0),
            clock_interval_s=chk.take(m, "clock_interval_s", where, int, 3600, minimum=0),
            prepaid=chk.take(m, "prepaid", where, bool, False),
            password=chk.take(m, "password", where, str, "000000"),
            password_level=chk.take(m, "password_level", where, int, 2, minimum=0,
                                    maximum=0x98),
            operator_code=chk.take(m, "operator_code", where, str, "00000000"),
            secured=chk.take(m, "secured", where, bool, False),
            relay_valid_s=chk.take(m, "relay_valid_s", where, int, 300, minimum=30,
                                   maximum=3600),
        )
        chk.unknown(m, set(meter), where)
        if meter.id in ids:
            chk.bad(where + ".id", "duplicate meter id %r" % meter.id)
        ids.add(meter.id)
        if meter.id is not None and not _ID.match(meter.id):
            chk.bad(where + ".id", "use letters, digits, '.', '_' or '-'")
        if meter.port is not None and meter.port not in names:
            chk.bad(where + ".port", "no port named %r (ports: %s)"
                    % (meter.port, ", ".join(sorted(names)) or "none"))
        if protocol == "dlt645" and meter.address is not None:
            if not re.match(r"^[0-9]{1,12}$", meter.address):
                chk.bad(where + ".address", "a DL/T 645 address is up to 12 digits as on the "
                        "nameplate, not %r" % meter.address)
            else:
                meter["address"] = meter.address.rjust(12, "0")
                key = (meter.port, meter.address)
                if key in seen_addr:
                    chk.bad(where + ".address", "two meters with address %s on port %s"
                            % (meter.address, meter.port))
                seen_addr.add(key)
        if not re.match(r"^[0-9]{6}$", meter.password or ""):
            chk.bad(where + ".password", "a meter password is 6 digits")
        if not re.match(r"^[0-9A-Fa-f]{8}$", meter.operator_code or ""):
            chk.bad(where + ".operator_code", "an operator code is 8 hex digits")
        meters.append(meter)
    if meters:
        MeterConfig = record_type("MeterConfig", list(meters[0].keys()))
        meters = [as_record(MeterConfig, m) for m in meters]

    u = _table(chk, doc, "uplink")
    uplink = Section(
        host=chk.take(u, "host", "uplink", str, None),
        port=chk.take(u, "port", "uplink", int, 1883, minimum=1, maximum=65535),
        topic_root=chk.take(u, "topic_root", "uplink", str, "mgw/v1"),
        mqtt_version=chk.take(u, "mqtt_version", "uplink", str, "5", choices=("5", "3.1.1")),
        client_id=chk.take(u, "client_id", "uplink", str, None),
        username=chk.take(u, "username", "uplink", str, None),
        password=chk.take(u, "password", "uplink", str, None),
        password_file=chk.take(u, "password_file", "uplink", str, None),
        tls=chk.take(u, "tls", "uplink", bool, False),
        allow_insecure=chk.take(u, "allow_insecure", "uplink", bool, False),
        tls_ca=chk.take(u, "tls_ca", "uplink", str, None),
        tls_cert=chk.take(u, "tls_cert", "uplink", str, None),
        tls_key=chk.take(u, "tls_key", "uplink", str, None),
        keepalive_s=chk.take(u, "keepalive_s", "uplink", int, 60, minimum=5),
        session_expiry_s=chk.take(u, "session_expiry_s", "uplink", int, 7 * 86400, minimum=0),
        batch_max=chk.take(u, "batch_max", "uplink", int, 200, minimum=1, maximum=5000),
        batch_age_s=chk.take(u, "batch_age_s", "uplink", float, 1.0, minimum=0),
        inflight_max=chk.take(u, "inflight_max", "uplink", int, 16, minimum=1, maximum=1000),
        health_interval_s=chk.take(u, "health_interval_s", "uplink", int, 300, minimum=10),
        reconnect_max_s=chk.take(u, "reconnect_max_s", "uplink", float, 120.0, minimum=1),
    )
    chk.unknown(u, set(uplink), "uplink")
    if (uplink.tls_cert is None) != (uplink.tls_key is None):
        chk.bad("uplink.tls_key", "tls_cert and tls_key go together")
    root = uplink.topic_root
    if root is not None and (not root.strip("/") or root.startswith("$") or
                             any(c in root for c in "+#\0")):
        chk.bad("uplink.topic_root", "must be a topic prefix such as \"mgw/v1\" (not empty, "
                "no '+', '#' or NUL, not starting with '$'), not %r" % (root,))
    if (uplink.password is not None or uplink.password_file) and not (
            uplink.tls or uplink.tls_ca or uplink.tls_cert) and not uplink.allow_insecure:
        chk.bad("uplink.password", "would travel in clear: set tls = true (or tls_ca), or "
                "allow_insecure = true for a link that needs no protection")
    for key in ("tls_ca", "tls_cert", "tls_key", "password_file"):
        if uplink[key]:
            why = _unreadable(uplink[key])
            if why:
                chk.bad("uplink." + key, why)

    c = _table(chk, doc, "control")
    control = Section(
        public_keys=chk.take(c, "public_keys", "control", list, []),
        require_synced_clock=chk.take(c, "require_synced_clock", "control", bool, True),
        max_validity_s=chk.take(c, "max_validity_s", "control", int, 3600, minimum=60),
        clock_skew_s=chk.take(c, "clock_skew_s", "control", int, 120, minimum=0),
        max_command_bytes=chk.take(c, "max_command_bytes", "control", int, 8192,
                                   minimum=512),
        cutoffs_per_hour=chk.take(c, "cutoffs_per_hour", "control", int, 60, minimum=0),
        restore_mode=chk.take(c, "restore_mode", "control", str, "close_allowed",
                              choices=("close_allowed", "direct_close")),
        local_group=chk.take(c, "local_group", "control", str, "meter-gateway"),
    )
    chk.unknown(c, set(control), "control")
    for i, k in enumerate(control.public_keys or []):
        if not isinstance(k, str):
            chk.bad("control.public_keys[%d]" % i, "must be a path")
        elif _unreadable(k):
            chk.bad("control.public_keys[%d]" % i, _unreadable(k))
        else:
            # the header only: the executor parses the key (cryptography costs memory to
            # load, and is loaded once, there)
            with open(k, "rb") as f:
                head = f.read(64)
            if not head.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----"):
                chk.bad("control.public_keys[%d]" % i, "%s: not a PEM public key" % k)

    return Section(path=path, gateway=gw, storage=storage, ports=ports, meters=meters,
                   uplink=uplink, control=control, tariffs=doc.get("tariffs", {}),
                   accounts=doc.get("accounts", []), cost_control=doc.get("cost_control", {}),
                   _checker=chk, _raw=doc)
