"""`mgw`: the gateway's one command line (CONTRACT.md).

Every subcommand takes --config (default /etc/meter-gateway/gateway.toml or $MGW_CONFIG),
prints tables by default and JSON with --json, and exits 0 on success, 1 on a failed
operation (a meter did not answer, a command was rejected), 2 on a usage or configuration
error. Errors are one line on stderr naming the file, key or value at fault; never a
traceback.
"""

import argparse
import os
import sys

from gateway import __version__
from gateway import registry
from gateway.sim import PROTOCOLS as SIM_PROTOCOLS, meter_spec, shared_line_protocols
from gateway.cli.common import EXIT_FAILED, EXIT_OK, CliError
from gateway.model import ACTIONS
from gateway.config.sections import BAUDRATES
from gateway.logs import setup_logging
from gateway.cli.i18n import _, install as install_language

def _profiles():
    from protocols.modbus_profiles import PROFILES
    return sorted(PROFILES)


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(_("a whole number, not %r") % text) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(_("must be above 0"))
    return value


def _meter_spec(text):
    try:
        return meter_spec(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            _("%r: PROTOCOL:ADDRESS, such as dlt698:1001 (PROTOCOL one of %s, ADDRESS 1 to "
              "12 digits)") % (text, ", ".join(shared_line_protocols()))) from None


def _host_port(text):
    host, _, port = text.partition(":")
    try:
        port = int(port or 1883)
    except ValueError:
        raise argparse.ArgumentTypeError(_("HOST:PORT, such as 127.0.0.1:1883")) from None
    return host or "127.0.0.1", port


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that remembers its words (options and choices), so the bash
    completion is made from the parser itself without reaching into argparse."""

    def __init__(self, *args, **kwargs):
        self.words = set()               # before argparse adds -h through add_argument
        super().__init__(*args, **kwargs)
        for parent in kwargs.get("parents", ()):
            self.words |= getattr(parent, "words", set())

    def add_argument(self, *names, **kwargs):
        self.words.update(n for n in names if n.startswith("-"))
        if not any(n.startswith("-") for n in names) and kwargs.get("choices"):
            self.words.update(kwargs["choices"])
        return super().add_argument(*names, **kwargs)


def _lazy(module, name):
    """A subcommand's function, imported when it runs: `mgw run` then never loads the
    technician's commands (about 1 MB resident on a concentrator)."""
    def call(args):
        import importlib
        return getattr(importlib.import_module("gateway.cli." + module), name)(args)
    return call


def build_parser():
    common = _CommandParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help=_("configuration file (default /etc/meter-gateway/gateway.toml "
                             "or $MGW_CONFIG)"))
    common.add_argument("--json", action="store_true", help=_("machine-readable output"))

    from protocols.framing import IMPLEMENTATION
    parser = argparse.ArgumentParser(
        prog="mgw", description=_("meter-gateway %s (frame parser: %s): electricity meter "
                                  "concentrator service. Exit codes: 0 ok, 1 operation "
                                  "failed, 2 usage or configuration error, 3 (`mgw status`) "
                                  "the service is not running.")
        % (__version__, IMPLEMENTATION))
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=_CommandParser)
    parser.command_parsers = {}          # name -> parser, in the order of `mgw --help`
    parser.command_help = {}

    def add(name, help_text, func):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        parser.command_parsers[name] = p
        parser.command_help[name] = help_text
        return p

    add("run", _("the service: poll, store, bill, control, sync (stops on SIGTERM/SIGINT)"),
        _lazy("run", "run"))
    p = add("demo", _("the whole gateway on simulated meters, no hardware needed"),
            _lazy("run", "demo"))
    p.add_argument("--seconds", type=float, help=_("stop after this long (default: Ctrl-C)"))
    p.add_argument("--data-dir", help=_("where to keep the demo's data (default: a temp folder)"))
    p.add_argument("--broker", type=_host_port, help=_("MQTT broker host:port (default "
                   "127.0.0.1:1883 if reachable)"))
    p.add_argument("--no-view", action="store_true", help=_("no live view, log lines only"))

    p = add("simulate", _("simulated meters behind a pseudo-terminal; prints the device path"),
            _lazy("field", "cmd_simulate"))
    p.add_argument("--port", metavar="PATH", help=_("create this path as a link to the "
                   "simulated line (default: print the pseudo-terminal's own path)"))
    p.add_argument("--meters", type=_positive, help=_("how many meters of --protocol "
                   "(default 4, or none beside --meter)"))
    p.add_argument("--protocol", choices=SIM_PROTOCOLS, default=SIM_PROTOCOLS[0])
    p.add_argument("--meter", action="append", type=_meter_spec, default=[],
                   metavar="PROTOCOL:ADDRESS", dest="extra_meters",
                   help=_("also this meter on the same line, such as dlt698:1001 (DL/T 645 "
                          "and DL/T 698.45 meters share a line); repeat for more"))
    p.add_argument("--profile", default="eastron-sdm120", choices=_profiles(),
                   help=_("Modbus register map"))
    p.add_argument("--baudrate", type=_positive, default=2400,
                   help=_("the line's baud rate (default 2400, the DL/T 645 RS-485 default)"))
    p.add_argument("--meters-1997", type=int, default=0, metavar="N",
                   help=_("also N DL/T 645-1997 meters on the same line, at --baudrate-1997"))
    p.add_argument("--baudrate-1997", type=_positive, default=1200, metavar="RATE",
                   help=_("the 1997 meters' own baud rate (default 1200); a meter answers "
                        "only when the line runs at its rate"))
    p.add_argument("--button", action="store_true",
                   help=_("a close-allowed restore leaves the relay open until the customer "
                        "presses the button (type `press ADDRESS` on stdin)"))
    p.add_argument("--first", type=int, default=1,
                   help=_("first address (DL/T 645) or unit id (Modbus)"))
    p.add_argument("--latency-ms", type=float, default=30.0, help=_("meter answer latency"))
    p.add_argument("--drop", type=float, default=0.0, help=_("share of answers dropped"))
    p.add_argument("--corrupt", type=float, default=0.0, help=_("share of answers corrupted"))
    p.add_argument("--seconds", type=float, help=_("stop after this long (default: Ctrl-C)"))

    p = add("config", _("configuration: `mgw config check` validates it"),
            _lazy("admin", "cmd_config"))
    p.usage = "mgw config check [--config PATH] [--json]"
    p.add_argument("action", choices=("check",), help=_("check: list every problem by key"))

    p = add("scan", _("discover meters on an RS-485 port (DL/T 645 address search, Modbus "
            "unit-id sweep)"), _lazy("field", "cmd_scan"))
    p.add_argument("--port", required=True, help=_("port name (or device) from the config, "
                   "or the path of a device not configured yet (scanned with the port "
                   "defaults)"))
    p.add_argument("--protocol", choices=registry.NAMES)
    p.add_argument("--baudrate", type=int, choices=BAUDRATES, metavar="RATE",
                   help=_("scan at this baud rate instead of the port's"))
    p.add_argument("--parity", choices=("E", "N", "O"),
                   help=_("scan with this parity instead of the port's"))
    p.add_argument("--auto", action="store_true",
                   help=_("try the usual line settings in turn (2400 8E1, 1200 8E1, 9600 8E1, "
                        "9600 8N1) and say which answered"))
    p.add_argument("--toml", action="store_true",
                   help=_("print ready-to-paste [[meters]] entries for the meters not "
                        "configured yet"))
    p.add_argument("--append", metavar="FILE",
                   help=_("add those [[meters]] entries to FILE, if it still passes "
                        "`mgw config check` with them"))
    p.add_argument("--profile", choices=_profiles(), help=_("Modbus register map to probe with"))
    p.add_argument("--first", type=int, default=1, help=_("Modbus: first unit id"))
    p.add_argument("--last", type=int, default=247, help=_("Modbus: last unit id"))
    p.add_argument("--expect", type=_positive, metavar="N",
                   help=_("stop as soon as N meters have answered (the rest of the address "
                          "space is not asked); Ctrl-C also stops a scan and shows what it "
                          "found"))
    p.add_argument("--progress", action="store_true", help=_("progress bar even when not a tty "
                   "(otherwise a progress line every few seconds)"))

    p = add("read", _("read values from one meter now"), _lazy("field", "cmd_read"))
    p.add_argument("--meter", required=True, help=_("meter id from the config"))
    p.add_argument("quantity", nargs="*", help=_("quantities (energy.import.total, voltage.a, "
                   "...), groups (energy, instant, status, clock, balance) or a DI in hex"))

    p = add("relay", _("local relay operation by a technician (audited like a remote one)"),
            lambda a: _control("relay", a))
    p.add_argument("--meter", required=True)
    p.add_argument("action", choices=("cut-off", "restore", "status"))
    p.add_argument("--direct", action="store_true", help=_("restore: close directly instead "
                   "of 'close allowed' (the customer presses the meter's button)"))
    p.add_argument("--operator", default=os.environ.get("SUDO_USER") or
                   os.environ.get("USER") or "technician",
                   help=_("who operates the relay, recorded in the audit trail (default: your "
                        "user name)"))

    add("status", _("ports, meters online/offline, last reading, buffer, uplink, balances"),
        _lazy("admin", "cmd_status"))
    add("buffer", _("pending readings and events, oldest unsent, disk used"),
        _lazy("admin", "cmd_buffer"))

    p = add("audit", _("`mgw audit verify`: walk the audit trail's hash chain"),
            _lazy("admin", "cmd_audit"))
    p.add_argument("action", choices=("verify",))

    p = add("keys", _("commissioning: `mgw keys gen --out DIR` makes an Ed25519 key pair"),
            lambda a: _control("keys", a))
    p.add_argument("action", choices=("gen",))
    p.add_argument("--out", required=True, help=_("folder for headend.key and headend.pub"))

    p = add("command", _("commissioning: `mgw command sign` makes a signed command"),
            lambda a: _control("command", a))
    p.add_argument("action", choices=("sign",))
    p.add_argument("--key", required=True, help=_("Ed25519 private key (PEM)"))
    p.add_argument("--meter", required=True)
    p.add_argument("--action", dest="cmd_action", required=True,
                   choices=ACTIONS)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help=_("command parameter (repeat), e.g. amount=50.00 txn=T1; KEY:=JSON "
                          "for a table, list, number or true/false"))
    p.add_argument("--valid", type=_positive, default=900,
                   help=_("seconds the command is valid (above 0; default 900)"))
    p.add_argument("--id", help=_("command id (default: a random UUID)"))
    p.add_argument("--publish", type=_host_port, metavar="HOST:PORT",
                   help=_("also publish it to this MQTT broker (QoS 1), on --topic: no "
                          "mosquitto_pub needed"))
    p.add_argument("--topic", help=_("the gateway's command topic, "
                                     "{topic_root}/{gateway id}/commands"))
    from gateway.cli import ota as ota_cli
    ota_cli.register(add, _host_port)
    p = sub.add_parser("completion", help=_("print a bash completion script"),
                       description="mgw completion bash > /etc/bash_completion.d/mgw")
    p.add_argument("shell", choices=("bash",))
    p.set_defaults(func=_lazy("admin", "cmd_completion"), json=False)
    parser.command_parsers["completion"] = p
    parser.command_help["completion"] = _("print a bash completion script")
    return parser


def _control(which, args):
    from gateway.cli import control as control_cli
    return control_cli.main(which, args)


def version_line():
    from protocols.framing import implementation
    return _("mgw %s (frame parser: %s)") % (__version__, implementation())


def main(argv=None):
    install_language()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parser = parser                  # `mgw completion` is made from it
    if args.command is None:
        print(version_line())
        print(_("commands:"))
        for name, help_text in parser.command_help.items():
            print("  %-9s %s" % (name, help_text))
        print(_("mgw COMMAND --help for each"))
        return EXIT_OK
    if args.command not in ("run", "demo"):
        setup_logging("warning")
    try:
        return args.func(args)
    except CliError as exc:
        if exc.args and exc.args[0]:
            sys.stderr.write(_("mgw %s: %s") % (args.command, exc.args[0]) + "\n")
        return exc.code
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK



if __name__ == "__main__":
    sys.exit(main())
