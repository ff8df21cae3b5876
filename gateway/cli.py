"""`mgw`: the gateway's one command line (CONTRACT.md).

Every subcommand takes --config (default /etc/meter-gateway/gateway.toml or $MGW_CONFIG),
prints tables by default and JSON with --json, and exits 0 on success, 1 on a failed
operation (a meter did not answer, a command was rejected), 2 on a usage or configuration
error. Errors are one line on stderr naming the file, key or value at fault; never a
traceback.
"""

import argparse
import datetime as _dt
import json
import logging
import os
import signal
import sys
import time
from decimal import Decimal

from gateway import __version__
from gateway.config import ConfigError, config_path, load

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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


def _exact_json(obj):
    """JSON with meter values as numbers: a Decimal of up to 15 significant digits (every
    meter register) survives the trip through a JSON number exactly."""
    def conv(o):
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, Decimal):
            return float(o)
        return o
    return json.dumps(conv(obj), default=_json_default, ensure_ascii=False, indent=2)


def table(rows, headers):
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\n".join(out))


def setup_logging(level="info"):
    # journald adds time and unit; keep lines short and parseable
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def load_config(args, validators=()):
    path = config_path(args.config)
    try:
        return load(path, validators)
    except ConfigError as exc:
        for line in exc.problems:
            sys.stderr.write(line + "\n")
        raise CliError(None, EXIT_USAGE) from None


def find_meter(cfg, meter_id):
    for m in cfg.meters:
        if m.id == meter_id:
            return m
    raise CliError("%s: no meter %r in the configuration (meters: %s)" % (
        cfg.path, meter_id, ", ".join(m.id for m in cfg.meters) or "none"), EXIT_USAGE)


def find_port(cfg, name):
    for p in cfg.ports:
        if p.name == name or p.device == name:
            return p
    raise CliError("%s: no port %r in the configuration (ports: %s)" % (
        cfg.path, name, ", ".join(p.name for p in cfg.ports) or "none"), EXIT_USAGE)


def open_worker(port, protocol="dlt645", retries=None):
    from gateway.port import PortError, PortWorker
    w = PortWorker(port.name, port.device, baudrate=port.baudrate, parity=port.parity,
                   bytesize=port.bytesize, stopbits=port.stopbits,
                   retries=port.retries if retries is None else retries,
                   settle_s=port.settle_ms / 1000.0)
    try:
        w.open()
    except PortError as exc:
        msg = str(exc)
        if "in use" in msg:
            msg += " (is `mgw run` active on it? stop the service, or read through the head-end)"
        raise CliError(msg) from None
    return w


# ---------------------------------------------------------------- commands

def cmd_config(args):
    if args.action != "check":
        raise CliError("usage: mgw config check", EXIT_USAGE)
    from gateway.service import config_validators
    cfg = load_config(args, config_validators())
    summary = {"config": cfg.path, "ok": True, "gateway": cfg.gateway.id,
               "ports": len(cfg.ports), "meters": len(cfg.meters),
               "accounts": len(cfg.accounts), "uplink": cfg.uplink.host or "none"}
    emit(args, summary, lambda s: print(
        "%s: OK (gateway %s, %d ports, %d meters, %d accounts, uplink %s)" % (
            s["config"], s["gateway"], s["ports"], s["meters"], s["accounts"], s["uplink"])))
    return EXIT_OK


def cmd_simulate(args):
    from gateway.simulator import Faults, SimLine, make_meters
    faults = Faults(latency_s=args.latency_ms / 1000.0, drop_rate=args.drop,
                    corrupt_rate=args.corrupt)
    if args.protocol == "modbus":
        from gateway.simulator_modbus import ModbusSimLine, ModbusSimMeter
        meters = [ModbusSimMeter(args.first + i, args.profile,
                                 faults=Faults(**vars(faults)))
                  for i in range(args.meters)]
        line = ModbusSimLine(meters, baudrate=args.baudrate)
        names = ["unit %d" % m.unit for m in meters]
    else:
        meters = make_meters(args.meters, first_address=args.first, faults=faults,
                             prepaid=True)

        def on_relay(meter, state, command):
            # every relay movement, one line: drills and tests watch this
            print("relay %s %s %s" % (meter.address, state, command), flush=True)
        for m in meters:
            m.on_relay = on_relay
        line = SimLine(meters, baudrate=args.baudrate)
        names = [m.address for m in meters]
    path = args.port
    if path:
        if os.path.lexists(path):
            if not os.path.islink(path):
                raise CliError("%s exists and is not a link made by mgw simulate" % path,
                               EXIT_USAGE)
            os.unlink(path)
        try:
            os.symlink(line.device, path)
        except OSError as exc:
            raise CliError("cannot create %s: %s" % (path, exc.strerror), EXIT_USAGE) from None
    line.start()
    info = {"device": path or line.device, "pty": line.device, "protocol": args.protocol,
            "baudrate": args.baudrate, "meters": names}
    if args.json:
        print(_exact_json(info), flush=True)
    else:
        print("simulating %d %s meters at %d baud on %s%s" % (
            len(names), args.protocol, args.baudrate, info["device"],
            " (-> %s)" % line.device if path else ""), flush=True)
        print("addresses: %s" % (", ".join(names[:8]) + (" ..." if len(names) > 8 else "")),
              flush=True)
        print("stop with Ctrl-C", flush=True)
    stop = _wait_for_signal(args.seconds)
    line.stop()
    if path and os.path.islink(path):
        os.unlink(path)
    return EXIT_OK if stop else EXIT_OK


def _wait_for_signal(seconds=None):
    got = []

    def handler(signum, frame):
        got.append(signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        end = time.time() + seconds if seconds else None
        while not got and (end is None or time.time() < end):
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return got


def cmd_read(args):
    from gateway.meterio import UnknownQuantity, read_now
    cfg = load_config(args)
    meter = find_meter(cfg, args.meter)
    port = find_port(cfg, meter.port)
    worker = open_worker(port, meter.protocol)
    try:
        try:
            from gateway.poller import MeterSpec
            values, errors = read_now(worker, MeterSpec.from_config(meter), args.quantity)
        except UnknownQuantity as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    finally:
        worker.close()
    out = {"meter": meter.id, "ok": bool(values) and not errors,
           "values": [{"q": v.quantity, "value": v.value, "unit": v.unit} for v in values],
           "errors": errors}

    def human(o):
        if o["values"]:
            table([(v["q"], v["value"], v["unit"] or "") for v in o["values"]],
                  ["quantity", "value", "unit"])
        for e in o["errors"]:
            sys.stderr.write("mgw read: meter %s: %s\n" % (meter.id, e))
    emit(args, out, human)
    if not values:
        if not args.json:
            sys.stderr.write("mgw read: meter %s did not answer\n" % meter.id)
        return EXIT_FAILED
    return EXIT_OK


def cmd_scan(args):
    from gateway.meterio import search_dlt645, sweep_modbus
    cfg = load_config(args)
    port = find_port(cfg, args.port)
    protocol = args.protocol or next((m.protocol for m in cfg.meters if m.port == port.name),
                                     "dlt645")
    worker = open_worker(port, protocol, retries=0)

    def progress(done, total, found):
        if sys.stderr.isatty() or args.progress:
            width = 30
            filled = int(width * done / max(total, 1))
            sys.stderr.write("\rscanning %s: [%s%s] %d/%d, found %d" % (
                port.name, "#" * filled, " " * (width - filled), done, total, found))
            sys.stderr.flush()
    try:
        if protocol == "modbus":
            found = [{"unit": u, "profile": p} for u, p in sweep_modbus(
                worker, args.profile, args.first, args.last, progress)]
        else:
            found = [{"address": a} for a in search_dlt645(worker, progress)]
    finally:
        worker.close()
        if sys.stderr.isatty() or args.progress:
            sys.stderr.write("\n")
    configured = {(m.address if m.protocol == "dlt645" else str(m.unit)): m.id
                  for m in cfg.meters if m.port == port.name}
    for f in found:
        key = f.get("address") or str(f.get("unit"))
        f["configured_as"] = configured.get(key)
    emit(args, {"port": port.name, "protocol": protocol, "found": found},
         lambda o: table([(f.get("address") or f.get("unit"), f.get("profile") or "",
                           f["configured_as"] or "(not configured)") for f in o["found"]],
                         ["address" if protocol == "dlt645" else "unit", "profile",
                          "configured as"]) if o["found"] else print("no meters found"))
    return EXIT_OK if found else EXIT_FAILED


def cmd_buffer(args):
    from gateway.journal import readonly_stats
    cfg = load_config(args)
    path = os.path.join(cfg.gateway.data_dir, "journal.db")
    stats = readonly_stats(path)
    if stats is None:
        raise CliError("%s: no journal yet (the service has not run with this data_dir)"
                       % path)

    def human(s):
        rows = []
        for name, st in s["streams"].items():
            oldest = _fmt_ms(st["oldest_ts"]) if st["oldest_ts"] else "-"
            pending = max([c["pending"] for c in st["consumers"].values()] or [0])
            rows.append((name, pending, st["stored"], oldest, st["next_seq"] - 1,
                         st["dropped"]))
        table(rows, ["stream", "unsent", "stored", "oldest stored", "last seq", "dropped"])
        print("disk: %.1f MB used of %.0f MB quota (%s)" % (
            s["file_bytes"] / 1e6, cfg.storage.journal_quota_mb, s["path"]))
    emit(args, stats, human)
    return EXIT_OK


def _fmt_ms(ms):
    return _dt.datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds")


def cmd_status(args):
    cfg = load_config(args)
    path = os.path.join(cfg.gateway.status_dir or cfg.gateway.data_dir, "status.json")
    try:
        with open(path) as f:
            status = json.load(f)
    except FileNotFoundError:
        raise CliError("%s: no status yet: the service has not run with this data_dir "
                       "(start it with `mgw run`)" % path) from None
    except (OSError, ValueError) as exc:
        raise CliError("%s: unreadable (%s)" % (path, exc)) from None
    age = time.time() - status.get("written_at", 0)
    status["running"] = not status.get("stopped") and \
        age < 3 * cfg.gateway.status_interval_s + 5
    status["age_s"] = round(age, 1)

    def human(s):
        print("gateway %s %s, %s (status %.0f s old)" % (
            s.get("gateway"), s.get("version"), "running" if s["running"] else
            "NOT RUNNING", s["age_s"]))
        up = s.get("uplink") or {}
        print("uplink: %s" % (("connected to %s" % up.get("broker")) if up.get("connected")
                              else ("disconnected (%s)" % (up.get("last_error") or "-")
                                    if up else "not configured")))
        table([(p["port"], p["device"], "open" if p["open"] else "closed", p["requests"],
                p["answers"], p["timeouts"], p["checksum_errors"],
                "%.0f%%" % (100 * p["utilisation"])) for p in s.get("ports", [])],
              ["port", "device", "state", "requests", "answers", "timeouts", "bad frames",
               "busy"])
        print()
        table([(m["id"], m["port"], "online" if m["online"] else "OFFLINE",
                m.get("last_reading") or "-", m.get("relay") or "-",
                m.get("balance") if m.get("balance") is not None else "-")
               for m in s.get("meters", [])],
              ["meter", "port", "state", "last reading", "relay", "balance"])
        b = s.get("buffer") or {}
        print("\nbuffer: %s unsent readings, %s unsent events" % (
            b.get("readings", "-"), b.get("events", "-")))
    emit(args, status, human)
    return EXIT_OK


def cmd_completion(args):
    """A bash completion script, made from the parser itself so it never goes stale."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0]
    cases = []
    for name, p in sub.choices.items():
        opts = sorted({o for a in p._actions for o in a.option_strings})
        choices = sorted({c for a in p._actions if not a.option_strings and a.choices
                          for c in a.choices})
        cases.append('        %s) words="%s";;' % (name, " ".join(opts + choices)))
    print(_COMPLETION % {"commands": " ".join(sub.choices), "cases": "\n".join(cases)})
    return EXIT_OK


_COMPLETION = """# bash completion for mgw: mgw completion bash > /etc/bash_completion.d/mgw
_mgw() {
    local cur=${COMP_WORDS[COMP_CWORD]} words
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "%(commands)s --help --version" -- "$cur"))
        return
    fi
    case "${COMP_WORDS[COMP_CWORD-1]}" in
        --config|--out|--key|--port|--data-dir) COMPREPLY=($(compgen -f -- "$cur")); return;;
    esac
    case "${COMP_WORDS[1]}" in
%(cases)s
        *) words="";;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F _mgw mgw"""


# ---------------------------------------------------------------- parser

def _profiles():
    from protocols.modbus_profiles import PROFILES
    return sorted(PROFILES)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a whole number, not %r" % text) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def _host_port(text):
    host, _, port = text.partition(":")
    try:
        port = int(port or 1883)
    except ValueError:
        raise argparse.ArgumentTypeError("HOST:PORT, such as 127.0.0.1:1883") from None
    return host or "127.0.0.1", port


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help="configuration file (default /etc/meter-gateway/gateway.toml "
                             "or $MGW_CONFIG)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    parser = argparse.ArgumentParser(
        prog="mgw", description="meter-gateway %s: electricity meter concentrator service. "
        "Exit codes: 0 ok, 1 operation failed, 2 usage or configuration error." % __version__)
    parser.add_argument("--version", action="version", version="mgw %s" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_text, func):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    add("run", "the service: poll, store, bill, control, sync (stops on SIGTERM/SIGINT)",
        lambda a: _service("run", a))
    p = add("demo", "the whole gateway on simulated meters, no hardware needed",
            lambda a: _service("demo", a))
    p.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    p.add_argument("--data-dir", help="where to keep the demo's data (default: a temp folder)")
    p.add_argument("--broker", type=_host_port, help="MQTT broker host:port (default "
                   "127.0.0.1:1883 if reachable)")
    p.add_argument("--no-view", action="store_true", help="no live view, log lines only")

    p = add("simulate", "simulated meters behind a pseudo-terminal; prints the device path",
            cmd_simulate)
    p.add_argument("--port", metavar="PATH", help="create this path as a link to the "
                   "simulated line (default: print the pseudo-terminal's own path)")
    p.add_argument("--meters", type=_positive, default=4, help="how many meters (default 4)")
    p.add_argument("--protocol", choices=("dlt645", "modbus"), default="dlt645")
    p.add_argument("--profile", default="eastron-sdm120", choices=_profiles(),
                   help="Modbus register map")
    p.add_argument("--baudrate", type=_positive, default=2400)
    p.add_argument("--first", type=int, default=1,
                   help="first address (DL/T 645) or unit id (Modbus)")
    p.add_argument("--latency-ms", type=float, default=30.0, help="meter answer latency")
    p.add_argument("--drop", type=float, default=0.0, help="share of answers dropped")
    p.add_argument("--corrupt", type=float, default=0.0, help="share of answers corrupted")
    p.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")

    p = add("config", "configuration: `mgw config check` validates it", cmd_config)
    p.add_argument("action", choices=("check",), help="check: list every problem by key")

    p = add("scan", "discover meters on an RS-485 port (DL/T 645 address search, Modbus "
            "unit-id sweep)", cmd_scan)
    p.add_argument("--port", required=True, help="port name (or device) from the config")
    p.add_argument("--protocol", choices=("dlt645", "modbus"))
    p.add_argument("--profile", choices=_profiles(), help="Modbus register map to probe with")
    p.add_argument("--first", type=int, default=1, help="Modbus: first unit id")
    p.add_argument("--last", type=int, default=247, help="Modbus: last unit id")
    p.add_argument("--progress", action="store_true", help="progress bar even when not a tty")

    p = add("read", "read values from one meter now", cmd_read)
    p.add_argument("--meter", required=True, help="meter id from the config")
    p.add_argument("quantity", nargs="*", help="quantities (energy.import.total, voltage.a, "
                   "...), groups (energy, instant, status, clock, balance) or a DI in hex")

    p = add("relay", "local relay operation by a technician (audited like a remote one)",
            lambda a: _control("relay", a))
    p.add_argument("--meter", required=True)
    p.add_argument("action", choices=("cut-off", "restore", "status"))
    p.add_argument("--direct", action="store_true", help="restore: close directly instead "
                   "of 'close allowed' (the customer presses the meter's button)")
    p.add_argument("--operator", default=os.environ.get("SUDO_USER") or
                   os.environ.get("USER") or "technician")

    add("status", "ports, meters online/offline, last reading, buffer, uplink, balances",
        cmd_status)
    add("buffer", "pending readings and events, oldest unsent, disk used", cmd_buffer)

    p = add("keys", "commissioning: `mgw keys gen --out DIR` makes an Ed25519 key pair",
            lambda a: _control("keys", a))
    p.add_argument("action", choices=("gen",))
    p.add_argument("--out", required=True, help="folder for headend.key and headend.pub")

    p = add("command", "commissioning: `mgw command sign` makes a signed command",
            lambda a: _control("command", a))
    p.add_argument("action", choices=("sign",))
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    p.add_argument("--meter", required=True)
    p.add_argument("--action", dest="cmd_action", required=True,
                   choices=("cut_off", "restore", "guarantee_on", "guarantee_off", "topup",
                            "read", "sync_time", "account_update", "release_breaker",
                            "weather_hold"))
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="command parameter (repeat), e.g. amount=50.00 txn=T1")
    p.add_argument("--valid", type=int, default=900, help="seconds the command is valid")
    p.add_argument("--id", help="command id (default: a random UUID)")
    p = sub.add_parser("completion", help="print a bash completion script",
                       description="mgw completion bash > /etc/bash_completion.d/mgw")
    p.add_argument("shell", choices=("bash",))
    p.set_defaults(func=cmd_completion, json=False)
    return parser


def _service(which, args):
    from gateway import service
    return service.main(which, args)


def _control(which, args):
    from gateway import control_cli
    return control_cli.main(which, args)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from protocols.framing import IMPLEMENTATION
        print("mgw %s (frame parser: %s)" % (__version__, IMPLEMENTATION))
        print("commands:")
        for action in parser._subparsers._group_actions[0]._choices_actions:
            print("  %-9s %s" % (action.dest, action.help))
        print("mgw COMMAND --help for each")
        return EXIT_OK
    if args.command not in ("run", "demo"):
        setup_logging("warning")
    try:
        return args.func(args)
    except CliError as exc:
        if exc.args and exc.args[0]:
            sys.stderr.write("mgw %s: %s\n" % (args.command, exc.args[0]))
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
