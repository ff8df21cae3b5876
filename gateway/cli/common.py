"""What every `mgw` command shares: exit codes, the one-line error, output as a table or
as exact JSON, loading the configuration, finding a meter or a port in it."""

import datetime as _dt
import json
import re
import sys
from decimal import Decimal

from gateway.config import ConfigError, config_path
from gateway.cli.i18n import _, ljust, width

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NOT_RUNNING = 3          # `mgw status`: the service is not running


class CliError(Exception):
    """One line for stderr, and the exit code."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


def _json_default(o):
    if isinstance(o, (_dt.datetime, _dt.date, _dt.time)):
        return o.isoformat()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def emit(args, obj, human):
    if args.json:
        print(_exact_json(obj))
    else:
        human(obj)


_NUMBER = "\x00decimal:"
_NUMBER_JSON = re.compile(r'"\\u0000decimal:([^"]*)"')


def _exact_json(obj):
    """JSON with meter values as numbers written with the meter's own precision, as MQTT
    sends them (12345.60 stays 12345.60, never a float's 12345.6)."""
    def conv(o):
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, Decimal) and o.is_finite():
            text = str(o)
            if "E" in text or "e" in text:
                text = format(o, "f")
            return _NUMBER + text
        return o
    text = json.dumps(conv(obj), default=_json_default, ensure_ascii=False, indent=2)
    return _NUMBER_JSON.sub(lambda m: m.group(1), text)


def table(rows, headers):
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    # columns by display width: a Chinese header or word takes two columns per character
    widths = [max([width(h)] + [width(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(ljust(h, w) for h, w in zip(headers, widths))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(ljust(c, w) for c, w in zip(r, widths)).rstrip())
    print("\n".join(out))


def load_config(args):
    """The whole configuration file, validated (every section, cost control's included)."""
    from gateway.service.config import load
    path = config_path(args.config)
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.problems:
            sys.stderr.write(line + "\n")
        raise CliError(None, EXIT_USAGE) from None


def find_meter(cfg, meter_id):
    for m in cfg.meters:
        if m.id == meter_id:
            return m
    raise CliError(_("%s: no meter %r in the configuration (meters: %s)") % (
        cfg.path, meter_id, ", ".join(m.id for m in cfg.meters) or _("none")), EXIT_USAGE)


def find_port(cfg, name):
    for p in cfg.ports:
        if p.name == name or p.device == name:
            return p
    raise CliError(_("%s: no port %r in the configuration (ports: %s)") % (
        cfg.path, name, ", ".join(p.name for p in cfg.ports) or _("none")), EXIT_USAGE)

