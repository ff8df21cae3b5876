"""`mgw`: the gateway's one command line (CONTRACT.md).

Exit codes: 0 success, 1 failed operation, 2 usage or configuration error. Errors are one
line on stderr, never a traceback.
"""

import argparse
import sys

from gateway import __version__

SUBCOMMANDS = [
    ("run", "the service: poll, store, bill, control, sync"),
    ("demo", "the whole gateway on simulated meters, no hardware needed"),
    ("simulate", "simulated meters behind a pseudo-terminal"),
    ("config", "validate the configuration (config check)"),
    ("scan", "discover meters on an RS-485 port"),
    ("read", "read values from one meter now"),
    ("relay", "local relay operation by a technician (audited)"),
    ("status", "ports, meters, readings, buffer, uplink, balances"),
    ("buffer", "pending readings and events, oldest unsent, disk used"),
    ("keys", "generate command-signing keys"),
    ("command", "sign a command for testing and commissioning"),
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mgw", description="meter-gateway %s: electricity meter concentrator service"
        % __version__)
    parser.add_argument("--version", action="version", version="mgw %s" % __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="configuration file (default "
                       "/etc/meter-gateway/gateway.toml or $MGW_CONFIG)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv=None):
    parser = build_parser()
    args, _rest = parser.parse_known_args(argv)
    if args.command is None:
        from protocols.framing import IMPLEMENTATION
        print("mgw %s (frame parser: %s)" % (__version__, IMPLEMENTATION))
        print("commands:")
        for name, help_text in SUBCOMMANDS:
            print("  %-9s %s" % (name, help_text))
        return 0
    sys.stderr.write("mgw %s: not available in this version yet\n" % args.command)
    return 2


if __name__ == "__main__":
    sys.exit(main())
