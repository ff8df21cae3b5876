"""`mgw run` and `mgw demo`: the service from a configuration file, or on simulated
meters. Configuration problems are listed with their keys and exit 2 before anything starts;
a state file that is not ours, or another instance on the data folder, exit 2 too."""

import sys

from gateway.cli.common import EXIT_FAILED, EXIT_USAGE, CliError
from gateway.cli.i18n import _
from gateway.logs import setup_logging


def _no_json(args):
    # the service logs to stderr and has no result to print: `mgw status --json` is the
    # machine-readable view of a running service
    if getattr(args, "json", False):
        raise CliError(_("--json is not for `mgw %s` (it logs; use `mgw status --json` "
                         "for its state)") % args.command, EXIT_USAGE)


def _config_file(args):
    """The configuration, read once and validated, with the text and version that
    `config_update` and SIGHUP reloads start from."""
    from gateway.config import ConfigError, config_path
    from gateway.service.reload import ConfigFile
    path = config_path(args.config)
    try:
        return ConfigFile.load(path)
    except ConfigError as exc:
        for line in exc.problems:
            sys.stderr.write(line + "\n")
        raise CliError(None, EXIT_USAGE) from None


def run(args):
    _no_json(args)
    from gateway.service.gateway import Gateway, serve
    from gateway.store.journal import JournalError
    from gateway.store.state import StateError
    source = _config_file(args)
    cfg = source.cfg
    setup_logging(cfg.gateway.log_level)
    try:
        gw = Gateway(cfg, config_file=source)
    except (StateError, JournalError) as exc:
        # a state file that is not ours or a second instance: exit 2, no restart loop
        raise CliError(str(exc), EXIT_USAGE if isinstance(exc, StateError) else EXIT_FAILED)
    except OSError as exc:
        raise CliError("%s: %s" % (exc.filename or cfg.gateway.data_dir, exc.strerror),
                       EXIT_FAILED)
    return serve(gw)


def demo(args):
    _no_json(args)
    from gateway.sim import demo as demo_mod
    return demo_mod.run(args)
