"""Administration: `mgw config check`, `mgw status`, `mgw buffer`, `mgw audit verify`,
`mgw completion`."""

import datetime as _dt
import json
import os
import time

from gateway.cli.common import (EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, CliError,
                                emit, load_config, table)
from gateway.store import paths


def cmd_config(args):
    if args.action != "check":
        raise CliError("usage: mgw config check", EXIT_USAGE)
    if args.json:
        # the errors as JSON too: a commissioning tool reads them, not a person
        from gateway.config import ConfigError, config_path
        from gateway.service.config import load
        path = config_path(args.config)
        try:
            cfg = load(path)
        except ConfigError as exc:
            print(json.dumps({"config": path, "ok": False, "errors": exc.problems},
                             ensure_ascii=False, indent=2))
            return EXIT_USAGE
    else:
        cfg = load_config(args)
    warnings = config_warnings(cfg)
    summary = {"config": cfg.path, "ok": True, "gateway": cfg.gateway.id,
               "ports": len(cfg.ports), "meters": len(cfg.meters),
               "accounts": len(cfg.accounts), "uplink": cfg.uplink.host or "none",
               "warnings": warnings}

    def human(s):
        print("%s: OK (gateway %s, %d ports, %d meters, %d accounts, uplink %s)" % (
            s["config"], s["gateway"], s["ports"], s["meters"], s["accounts"], s["uplink"]))
        for w in s["warnings"]:
            print("warning: %s" % w)
    emit(args, summary, human)
    return EXIT_OK


def config_warnings(cfg):
    """What is valid but will not work as the technician expects: one line each, naming the
    key (the file is still OK: the device may be plugged in later, keys added later)."""
    out = []
    for i, port in enumerate(cfg.ports):
        if not os.path.exists(port.device):
            out.append("%s: ports[%d].device: %s does not exist (yet?): port %s cannot "
                       "open until it does" % (cfg.path, i, port.device, port.name))
    if not cfg.control.public_keys:
        out.append("%s: control.public_keys: no head-end key: every signed command (relay, "
                   "top-up, read) will be rejected" % cfg.path)
    return out


def cmd_buffer(args):
    from gateway.store.journal import readonly_stats
    cfg = load_config(args)
    path = paths.path(cfg.gateway.data_dir, paths.JOURNAL)
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
    path = paths.status_path(cfg.gateway)
    try:
        with open(path) as f:
            status = json.load(f)
    except FileNotFoundError:
        raise CliError("%s: no status yet: the service has not run with this data_dir "
                       "(start it with `mgw run`)" % path, EXIT_NOT_RUNNING) from None
    except (OSError, ValueError) as exc:
        raise CliError("%s: unreadable (%s)" % (path, exc)) from None
    now = time.time()
    status["running"] = paths.status_is_fresh(status, cfg.gateway.status_interval_s, now)
    status["age_s"] = round(now - paths.status_time(status.get("written_at")), 1)

    def human(s):
        if not s["running"]:
            # first, before any table that could be read as live
            print("NOT RUNNING: the service is not running; what follows is its last status, "
                  "%.0f s old (start it: systemctl start meter-gateway, or mgw run)"
                  % s["age_s"])
        print("gateway %s %s, %s (status %.0f s old)" % (
            s.get("gateway"), s.get("version"), "running" if s["running"] else
            "NOT RUNNING", s["age_s"]))
        if s.get("clock_trusted") is False:
            print("warning: the gateway clock is not synchronised: no cut-off and no meter "
                  "time sync until it is, readings are flagged; set up NTP (timedatectl "
                  "set-ntp true), or set require_synced_clock = false in [control] on a box "
                  "without NTP")
        up = s.get("uplink") or {}
        print("uplink: %s" % (("connected to %s" % up.get("broker")) if up.get("connected")
                              else ("disconnected (%s)" % (up.get("last_error") or "-")
                                    if up else "not configured")))
        ports = s.get("ports", [])
        table([(p["port"], p["device"], "open" if p["open"] else
                "ERROR" if p.get("last_error") else "closed", p["requests"],
                p["answers"], p["timeouts"], p["checksum_errors"],
                "%.0f%%" % (100 * p["utilisation"])) for p in ports],
              ["port", "device", "state", "requests", "answers", "timeouts", "bad frames",
               "busy"])
        dead = {p["port"] for p in ports if not p["open"]}
        for p in ports:
            if not p["open"] and p.get("last_error"):
                print("error: %s" % p["last_error"])
        print()
        # a meter on a port that cannot open is not known to be online or offline
        table([(m["id"], m["port"], "unknown" if m["port"] in dead else
                "online" if m["online"] else "OFFLINE",
                m.get("last_reading") or "-", m.get("relay") or "-",
                m.get("balance") if m.get("balance") is not None else "-")
               for m in s.get("meters", [])],
              ["meter", "port", "state", "last reading", "relay", "balance"])
        b = s.get("buffer") or {}
        print("\nbuffer: %s unsent readings, %s unsent events" % (
            b.get("readings", "-"), b.get("events", "-")))
    emit(args, status, human)
    # CONTRACT.md: exit 3 when the service is not running (scripts and monitors check it)
    return EXIT_OK if status["running"] else EXIT_NOT_RUNNING


def cmd_completion(args):
    """A bash completion script, made from the parser itself so it never goes stale."""
    parser = args.parser
    cases = []
    for name, p in parser.command_parsers.items():
        words = sorted(w for w in p.words if w.startswith("-")) + \
            sorted(w for w in p.words if not w.startswith("-"))
        cases.append('        %s) words="%s";;' % (name, " ".join(words)))
    print(_COMPLETION % {"commands": " ".join(parser.command_parsers),
                         "cases": "\n".join(cases)})
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



def cmd_audit(args):
    """Walk the audit trail's hash chain (audit.log and its rotated files)."""
    from gateway.store.audit import verify
    cfg = load_config(args)
    path = paths.path(cfg.gateway.data_dir, paths.AUDIT)
    try:
        entries, problem = verify(path)
    except FileNotFoundError:
        raise CliError("%s: no audit trail yet (the service has not run with this data_dir)"
                       % path) from None
    except OSError as exc:
        raise CliError("%s: %s" % (path, exc.strerror)) from None
    out = {"path": path, "entries": entries, "whole": problem is None, "broken_at": problem}
    emit(args, out, lambda o: print(
        "%s: %d entries, chain whole" % (path, entries) if o["whole"] else
        "%s: chain BROKEN at %s (%d entries before it verify)" % (path, problem, entries)))
    return EXIT_OK if problem is None else EXIT_FAILED
