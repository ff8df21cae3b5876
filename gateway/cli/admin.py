"""Administration: `mgw config check`, `mgw status`, `mgw buffer`, `mgw audit verify`,
`mgw completion`."""

import datetime as _dt
import json
import os
import time

from gateway.cli.common import (EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, CliError,
                                emit, load_config, table)
from gateway.cli.i18n import _, pgettext
from gateway.store import paths


def cmd_config(args):
    if args.action != "check":
        raise CliError(_("usage: mgw config check"), EXIT_USAGE)
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
        print(_("%s: OK (gateway %s, %d ports, %d meters, %d accounts, uplink %s)") % (
            s["config"], s["gateway"], s["ports"], s["meters"], s["accounts"],
            _("none") if s["uplink"] == "none" else s["uplink"]))
        for w in s["warnings"]:
            print(_("warning: %s") % w)
    emit(args, summary, human)
    return EXIT_OK


def config_warnings(cfg):
    """What is valid but will not work as the technician expects: one line each, naming the
    key (the file is still OK: the device may be plugged in later, keys added later)."""
    out = []
    for i, port in enumerate(cfg.ports):
        if not os.path.exists(port.device):
            out.append(_("%s: ports[%d].device: %s does not exist (yet?): port %s cannot "
                         "open until it does") % (cfg.path, i, port.device, port.name))
    if not cfg.control.public_keys:
        out.append(_("%s: control.public_keys: no head-end key: every signed command "
                     "(relay, top-up, read) will be rejected") % cfg.path)
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
    return rfc3339(ms / 1000.0)


def rfc3339(seconds):
    """Unix seconds as RFC 3339 with the box's UTC offset (+08:00), as MQTT writes times."""
    return _dt.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def status_view(raw, interval_s, now):
    """What `mgw status` shows, text and JSON alike, from the service's status.json: every
    time in RFC 3339 (older versions' files kept Unix seconds), and each map holds one kind of thing
    (the file mixes totals and flags into its per-stream and per-meter maps)."""
    out = dict(raw)
    out["running"] = paths.status_is_fresh(raw, interval_s, now)
    out["age_s"] = round(now - paths.status_time(raw.get("written_at")), 1)
    for key in ("started_at", "written_at"):
        if isinstance(raw.get(key), (int, float)):
            out[key] = rfc3339(raw[key])
    buffer = dict(raw.get("buffer") or {})
    if "unsent" not in buffer:
        extra = {k: buffer.pop(k) for k in ("bytes", "dropped") if k in buffer}
        buffer = dict(extra, unsent=buffer)
    out["buffer"] = buffer
    accounts = dict(raw.get("accounts") or {})
    for key in [k for k in accounts if k.startswith("_")]:
        # cost control's breaker is a flag of the whole gateway, not an account
        out[key.lstrip("_")] = accounts.pop(key)
    out["accounts"] = accounts
    return out


def cmd_status(args):
    cfg = load_config(args)
    path = paths.status_path(cfg.gateway)
    try:
        with open(path) as f:
            status = json.load(f)
    except FileNotFoundError:
        raise CliError(_("%s: no status yet: the service has not run with this data_dir "
                         "(start it with `mgw run`)") % path, EXIT_NOT_RUNNING) from None
    except (OSError, ValueError) as exc:
        raise CliError(_("%s: unreadable (%s)") % (path, exc)) from None
    status = status_view(status, cfg.gateway.status_interval_s, time.time())

    def human(s):
        if not s["running"]:
            # first, before any table that could be read as live
            print(_("NOT RUNNING: the service is not running; what follows is its last "
                    "status, %.0f s old (start it: systemctl start meter-gateway, or mgw run)")
                  % s["age_s"])
        print(_("gateway %s %s, %s since %s (status %.0f s old)") % (
            s.get("gateway"), s.get("version"), _("running") if s["running"] else
            _("NOT RUNNING"), s.get("started_at") or "-", s["age_s"]))
        if s.get("clock_trusted") is False:
            print(_("warning: the gateway clock is not synchronised: no cut-off and no meter "
                    "time sync until it is, readings are flagged; set up NTP (timedatectl "
                    "set-ntp true), or set require_synced_clock = false in [control] on a "
                    "box without NTP"))
        if s.get("breaker_tripped"):
            print(_("warning: cost control's breaker is tripped: no automatic cut-off until "
                    "it is reset"))
        up = s.get("uplink") or {}
        print(_("uplink: %s") % ((_("connected to %s") % up.get("broker"))
                                 if up.get("connected") else
                                 (_("disconnected (%s)") % (up.get("last_error") or "-")
                                  if up else _("not configured"))))
        ports = s.get("ports", [])
        table([(p["port"], p["device"], pgettext("port", "open") if p["open"] else
                _("ERROR") if p.get("last_error") else pgettext("port", "closed"),
                p["requests"], p["answers"], p["timeouts"], p["checksum_errors"],
                "%.0f%%" % (100 * p["utilisation"])) for p in ports],
              [_("port"), _("device"), _("state"), _("requests"), _("answers"),
               _("timeouts"), _("bad frames"), _("busy")])
        dead = {p["port"] for p in ports if not p["open"]}
        for p in ports:
            if not p["open"] and p.get("last_error"):
                print(_("error: %s") % p["last_error"])
        print()
        # a meter on a port that cannot open is not known to be online or offline
        meters = s.get("meters", [])
        # the poller's catch-up (补抄): slots read again later in their interval, and slots
        # missed even so; shown where the service counts them
        slots = any("missed_slots" in m for m in meters)
        table([(m["id"], m["port"], _("unknown") if m["port"] in dead else
                _("online") if m["online"] else _("OFFLINE"),
                m.get("last_reading") or "-", relay_word(m.get("relay")),
                m.get("balance") if m.get("balance") is not None else "-") +
               ((m.get("caught_up", "-"), m.get("missed_slots", "-")) if slots else ())
               for m in meters],
              [_("meter"), _("port"), _("state"), _("last reading"), _("relay"),
               _("balance")] + ([_("caught up"), _("missed")] if slots else []))
        unsent = s["buffer"].get("unsent") or {}
        print("\n" + _("buffer: %s unsent readings, %s unsent events") % (
            unsent.get("readings", "-"), unsent.get("events", "-")))
    emit(args, status, human)
    # CONTRACT.md: exit 3 when the service is not running (scripts and monitors check it)
    return EXIT_OK if status["running"] else EXIT_NOT_RUNNING


def relay_word(state):
    """A relay state as the technician says it (跳闸 is the meter's own word for open)."""
    return {"open": pgettext("relay", "open"), "closed": pgettext("relay", "closed"),
            "awaiting_customer": pgettext("relay", "awaiting_customer")}.get(state, state or "-")


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
