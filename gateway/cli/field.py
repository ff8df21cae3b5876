"""Field commands for the technician on site: `mgw simulate`, `mgw read`, `mgw scan`.
They open the port themselves (the service must not be running on it)."""

import os
import signal
import sys
import time

from gateway.cli.i18n import _, ngettext, pgettext
from gateway.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, _exact_json,
                                emit, find_meter, find_port, load_config, table)


def open_worker(port, retries=None):
    from gateway.line.port import PortError, PortWorker
    w = PortWorker(port.name, port.device, baudrate=port.baudrate, parity=port.parity,
                   bytesize=port.bytesize, stopbits=port.stopbits,
                   retries=port.retries if retries is None else retries,
                   settle_s=port.settle_ms / 1000.0)
    try:
        w.open()
    except PortError as exc:
        msg = str(exc)
        if exc.in_use:
            msg += _(" (is `mgw run` active on it? stop the service, or read through the "
                     "head-end)")
        raise CliError(msg) from None
    return w


def cmd_simulate(args):
    from gateway.sim import simulated_line
    from gateway.sim.dlt645 import Faults

    def on_relay(meter, state, command):
        # every relay movement, one line: drills and tests watch this
        print("relay %s %s %s" % (meter.address, state, command), flush=True)
    faults = Faults(latency_s=args.latency_ms / 1000.0, drop_rate=args.drop,
                    corrupt_rate=args.corrupt)
    extra = args.extra_meters
    count = args.meters if args.meters is not None else (0 if extra else 4)
    _check_extra_meters(args, count, extra)
    try:
        line, names = simulated_line(args.protocol, count, args.first, faults,
                                     args.baudrate, profile=args.profile, on_relay=on_relay,
                                     count_1997=args.meters_1997,
                                     baudrate_1997=args.baudrate_1997,
                                     button_required=args.button, meters=extra)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    path = args.port
    if path:
        if os.path.lexists(path):
            if not os.path.islink(path):
                raise CliError(_("%s exists and is not a link made by mgw simulate") % path,
                               EXIT_USAGE)
            os.unlink(path)
        try:
            os.symlink(line.device, path)
        except OSError as exc:
            raise CliError(_("cannot create %s: %s") % (path, exc.strerror),
                           EXIT_USAGE) from None
    line.start()
    meters = [m for m in getattr(line, "meters", {}).values()
              if hasattr(m, "awaiting_customer")]
    end_1997 = count + args.meters_1997
    # the line's meters by protocol, --protocol's first: {protocol: [address, ...]}
    groups = {args.protocol: names[:count]} if count else {}
    for proto, address in extra:
        groups.setdefault(proto, []).append(address)
    info = {"device": path or line.device, "pty": line.device, "protocol": args.protocol,
            "baudrate": args.baudrate, "meters": names[:count],
            "meters_1997": names[count:end_1997], "baudrate_1997": args.baudrate_1997,
            "line": groups}
    if args.json:
        print(_exact_json(info), flush=True)
    else:
        (lead, shown), others = list(groups.items())[0], list(groups.items())[1:]
        also = "".join(ngettext(" and %d %s meter", " and %d %s meters", len(a)) % (len(a), p)
                       for p, a in others)
        if args.meters_1997:
            also += ngettext(" and %d DL/T 645-1997 meter at %d baud",
                             " and %d DL/T 645-1997 meters at %d baud", args.meters_1997) % (
                args.meters_1997, args.baudrate_1997)
        print(_("simulating %d %s meters at %d baud%s on %s%s") % (
            len(shown), lead, args.baudrate, also, info["device"],
            " (-> %s)" % line.device if path else ""), flush=True)

        def listed(addresses):
            return ", ".join(addresses[:8]) + (" ..." if len(addresses) > 8 else "")
        if not others:
            print(_("addresses: %s") % listed(shown), flush=True)
        else:
            for proto, addresses in groups.items():
                print(_("%s addresses: %s") % (proto, listed(addresses)), flush=True)
        if args.meters_1997:
            print(_("1997 addresses: %s") % ", ".join(names[count:end_1997][:8]), flush=True)
        if args.button:
            print(_("restore with close allowed waits for the customer: type `press ADDRESS` "
                    "(or `press`) and Enter to press the meter's button"), flush=True)
        print(_("stop with Ctrl-C"), flush=True)
    if args.button and meters:
        import threading
        threading.Thread(target=_buttons, args=(meters,), daemon=True).start()
    stop = _wait_for_signal(args.seconds)
    line.stop()
    if path and os.path.islink(path):
        os.unlink(path)
    return EXIT_OK if stop else EXIT_OK


def _check_extra_meters(args, count, extra):
    """`--meter PROTOCOL:ADDRESS` entries that cannot go on the line: one line each."""
    from gateway.sim import shares_line
    if any(not shares_line(args.protocol, proto) for proto, _address in extra):
        raise CliError(_("--meter adds DL/T 645 or DL/T 698.45 meters to a line: not to a "
                         "--protocol %s line") % args.protocol, EXIT_USAGE)
    taken = {"%012d" % (args.first + i) for i in range(count + args.meters_1997)}
    for _proto, address in extra:
        if address in taken:
            raise CliError(_("two meters with address %s on the line: give --meter another "
                             "address, or --first another start") % address, EXIT_USAGE)
        taken.add(address)


def _buttons(meters):
    """`press [ADDRESS]` lines on stdin press the button of the meters awaiting their
    customer after a close-allowed restore."""
    for text in sys.stdin:
        words = text.split()
        if not words or words[0] != "press":
            continue
        waiting = [m for m in meters if m.awaiting_customer and
                   (len(words) < 2 or m.address == words[1].rjust(12, "0"))]
        if not waiting:
            print(_("no meter is waiting for its button"), flush=True)
        for m in waiting:
            m.press_button()


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


def line_settings(port, meter=None):
    """'2400 8E1' as a technician reads it: the meter's own settings where it has them."""
    baud = getattr(meter, "baudrate", None) or port.baudrate
    parity = getattr(meter, "parity", None) or port.parity
    return "%d %d%s%d" % (baud, port.bytesize, parity, port.stopbits)


def cmd_read(args):
    from gateway.line.reads import UnknownQuantity, read_now
    from gateway.model import TxError
    cfg = load_config(args)
    meter = find_meter(cfg, args.meter)
    port = find_port(cfg, meter.port)
    worker = open_worker(port)
    try:
        try:
            from gateway.line.poller import MeterSpec
            values, errors = read_now(worker, MeterSpec.from_config(meter), args.quantity)
        except UnknownQuantity as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    finally:
        worker.close()
    answered = bool(values) or any(getattr(e, "code", None) is None for e in errors)
    out = {"meter": meter.id, "ok": bool(values) and not errors,
           "values": [{"q": v.quantity, "value": v.value, "unit": v.unit} for v in values],
           "errors": list(errors)}
    if not answered:
        garbled = any(getattr(e, "code", None) == TxError.GARBLED for e in errors)
        who = (_("meter %s (address %s on %s, %s)") if meter.address else
               _("meter %s (unit %s on %s, %s)")) % (
            meter.id, meter.address or meter.unit, port.name, line_settings(port, meter))
        if garbled:
            why = _("answered with garbled bytes: check the baud rate and parity, then the "
                    "A/B wiring")
        else:
            why = _("did not answer: check the address, the A/B wiring, the baud rate and "
                    "the parity")
        out["error"] = _("%s %s") % (who, why)          # zh: no space between
        if args.json:
            print(_exact_json(out))
        raise CliError(out["error"], EXIT_FAILED)

    def human(o):
        if o["values"]:
            table([(v["q"], v["value"], v["unit"] or "") for v in o["values"]],
                  [_("quantity"), _("value"), _("unit")])
        for e in o["errors"]:
            sys.stderr.write(_("mgw read: meter %s: %s") % (meter.id, e) + "\n")
    emit(args, out, human)
    if not values:
        if not args.json:
            # the meter is there and answered: it has none of these values (no_data)
            sys.stderr.write(_("mgw read: meter %s answered but has none of the values "
                               "asked for") % meter.id + "\n")
        return EXIT_FAILED
    return EXIT_OK


# what `mgw scan --auto` tries, in this order: the DL/T 645 RS-485 default, the usual rate
# of 1997 meters, then what Modbus meters and some 645 meters use
AUTO_SETTINGS = ((2400, "E"), (1200, "E"), (9600, "E"), (9600, "N"))
PROGRESS_EVERY_S = 5.0              # a progress line this often when stderr is not a terminal


class _AdHocPort:
    """A device that is not (yet) in the configuration, with the port defaults."""

    def __init__(self, device, defaults):
        self.name = device
        self.device = device
        for key in ("baudrate", "parity", "bytesize", "stopbits", "retries", "settle_ms"):
            setattr(self, key, defaults[key])


def _port_with(port, baudrate, parity):
    ad = _AdHocPort(port.device, {k: getattr(port, k) for k in (
        "baudrate", "parity", "bytesize", "stopbits", "retries", "settle_ms")})
    ad.name = port.name
    ad.baudrate = baudrate or port.baudrate
    ad.parity = parity or port.parity
    return ad


class _ScanLine:
    """The port worker as a scan sees it. Once the scan is to stop (the meters expected have
    answered, or Ctrl-C), every further request ends at once as `stopping` without touching
    the line: the driver finishes its walk quickly and returns what it found."""

    def __init__(self, worker):
        self.worker = worker
        self.stopped = None              # None, "expected" or "interrupted"

    def stop(self, why):
        self.stopped = self.stopped or why

    def transact(self, *args, **kwargs):
        from gateway.line.port import Result
        from gateway.model import TxError
        if not self.stopped:
            try:
                return self.worker.transact(*args, **kwargs)
            except KeyboardInterrupt:
                self.stop("interrupted")
        return Result(False, None, "scan stopped", 0, 0.0, code=TxError.STOPPING)

    def __getattr__(self, name):
        return getattr(self.worker, name)


def _scan_config(args):
    """(config or None, port): a device path not in the configuration (or with no
    configuration file yet) is scanned with the port defaults."""
    from gateway.config import config_path
    from gateway.config.sections import PORTS
    defaults = {f.name: f.default for f in PORTS.fields}
    is_path = "/" in args.port
    if is_path and not os.path.exists(config_path(args.config)):
        return None, _AdHocPort(args.port, defaults)
    cfg = load_config(args)
    try:
        return cfg, find_port(cfg, args.port)
    except CliError:
        if not is_path:
            raise
        return cfg, _AdHocPort(args.port, defaults)


def _progress_printer(name, args):
    state = {"last": 0.0, "drawn": False}
    tty = sys.stderr.isatty() or args.progress

    def progress(done, total, found):
        if tty:
            width = 30
            filled = int(width * done / max(total, 1))
            sys.stderr.write("\r" + _("scanning %s: [%s%s] %d/%d, found %d") % (
                name, "#" * filled, " " * (width - filled), done, total, found))
            sys.stderr.flush()
            state["drawn"] = True
        elif time.monotonic() - state["last"] >= PROGRESS_EVERY_S or done == total:
            # not a terminal (a log, a pipe): whole lines, now and then
            state["last"] = time.monotonic()
            sys.stderr.write(_("scanning %s: %d/%d, found %d") % (name, done, total, found)
                             + "\n")
            sys.stderr.flush()

    def end():
        if state["drawn"]:
            sys.stderr.write("\n")
            state["drawn"] = False
    return progress, end


def cmd_scan(args):
    from gateway.line import reads
    from gateway.registry import DEFAULT_PROTOCOL, PROTOCOLS
    cfg, port = _scan_config(args)
    meters = cfg.meters if cfg else ()
    protocol = args.protocol or next((m.protocol for m in meters if m.port == port.name),
                                     DEFAULT_PROTOCOL)
    driver = reads.driver(protocol)
    key = PROTOCOLS[protocol].keyed_by           # what a scan reports a meter by
    if args.auto:
        settings = AUTO_SETTINGS
    else:
        settings = ((args.baudrate or port.baudrate, args.parity or port.parity),)
    found, answered = [], []
    also = {}                                   # other protocols' meters answering the line
    stopped = None
    for baudrate, parity in settings:
        if stopped:
            break                               # --auto: the other settings are not tried
        line = _port_with(port, baudrate, parity)
        printer, end = _progress_printer(_("%s at %s") % (port.name, line_settings(line)),
                                         args)
        worker = _ScanLine(open_worker(line, retries=0))

        def progress(done, total, count, worker=worker):
            if args.expect and len(found) + count >= args.expect:
                worker.stop("expected")
            printer(done, total, count)
        try:
            got = reads.scan(worker, protocol, progress, profile=args.profile,
                             first=args.first, last=args.last)
            hint = None
            if not got and not args.auto and not worker.stopped:
                hint = _other_protocols_answer(worker, reads, protocol)
            elif got and not worker.stopped and not also:
                # a mixed line (DL/T 645 and 698.45 meters): say what else answers on it
                also = dict(_answering(worker, reads, protocol))
        finally:
            worker.close()
            end()
        stopped = worker.stopped
        for f in got:
            f["baudrate"], f["parity"] = baudrate, parity
        if got:
            answered.append("%s (%d)" % (line_settings(line), len(got)))
        found += [f for f in got if f[key] is None or
                  f[key] not in {g[key] for g in found}]
    configured = {reads.driver(m.protocol).key_of(m): m.id
                  for m in meters if m.port == port.name and m.protocol == protocol}
    for f in found:
        f["configured_as"] = configured.get(str(f[key]))
    out = {"port": port.name, "protocol": protocol, "found": found,
           "answered_at": answered, "stopped": stopped,
           "also_answering": {p: [str(k) for k in keys] for p, keys in also.items()}}
    also_lines = [_also_line(other, keys) for other, keys in also.items()]
    if stopped == "interrupted":
        # what was found is shown (and may be appended), but the line was not all asked
        sys.stderr.write(_("mgw scan: interrupted: the rest of the line was not asked") + "\n")
    if args.toml or args.append:
        blocks = toml_blocks(port, protocol, driver, [f for f in found if not
                                                      f["configured_as"] and
                                                      f[key] is not None])
        if args.append:
            _append(args.append, blocks)
        if args.toml:
            if args.auto and stopped != "interrupted":
                # a TOML comment: the output stays ready to paste
                print("# " + _("answered at: %s") % (", ".join(answered) or _("none")))
            for text in also_lines:
                print("# " + text)
            if blocks and (also_lines or args.auto and stopped != "interrupted"):
                print()
            print(blocks, end="")
            return EXIT_OK if found and stopped != "interrupted" else EXIT_FAILED

    def human(o):
        if not o["found"]:
            print(_("no meters found at %s") % ", ".join(
                line_settings(_port_with(port, b, p)) for b, p in settings))
            if hint:
                print(hint)
            return
        table([(f[key] or _("(answered with the wildcard; address unreadable)"),
                f.get("version") or "", "%d 8%s1" % (f["baudrate"], f["parity"]),
                f.get("profile") or "", f["configured_as"] or _("(not configured)"))
               for f in o["found"]],
              [_key_header(key), _("version"), _("line"), _("profile"),
               _("configured as")])
        if args.auto:
            print(_("answered at: %s") % ", ".join(o["answered_at"]))
        for text in also_lines:
            print(text)
    if not found and hint:
        out["hint"] = hint
    emit(args, out, human)
    return EXIT_OK if found and stopped != "interrupted" else EXIT_FAILED


def _key_header(key):
    """The scan table's first column: what the protocol's meters are found by."""
    return {"address": pgettext("scan", "address"),
            "unit": pgettext("scan", "unit")}.get(key, key)


def _answering(worker, reads, protocol):
    """(other protocol, keys) for each other protocol whose meters answer a quick probe on
    this line (Modbus units 1-3, a DL/T 645 or DL/T 698.45 wildcard read), one by one."""
    from gateway.registry import NAMES
    for other in NAMES:
        if other == protocol:
            continue
        try:
            keys = reads.driver(other).quick_probe(worker)
        except Exception:      # a driver's library missing or the like: no hint, no error
            continue
        if keys:
            yield other, keys


def _other_protocols_answer(worker, reads, protocol):
    """A line where none of `protocol`'s meters answers may carry another protocol's: the
    first other protocol whose meters answer a quick probe says so."""
    from gateway.registry import PROTOCOLS
    for other, keys in _answering(worker, reads, protocol):
        return _("no %s meter answered, but %s %s %s did: scan with --protocol %s") % (
            PROTOCOLS[protocol].label, PROTOCOLS[other].label,
            PROTOCOLS[other].keyed_by, ", ".join(str(k) for k in keys), other)
    return None


def _also_line(other, keys):
    """One line for another protocol's meters answering on a line a scan found meters on."""
    from gateway.registry import PROTOCOLS
    return _("%s %s %s answered too (a mixed line): scan again with --protocol %s") % (
        PROTOCOLS[other].label, PROTOCOLS[other].keyed_by, ", ".join(str(k) for k in keys),
        other)


def toml_blocks(port, protocol, driver, found):
    """Ready-to-paste [[meters]] entries for meters found and not configured."""
    out = []
    for f in found:
        lines = ["[[meters]]", 'id = "%s"' % driver.suggested_id(f),
                 'port = "%s"' % port.name, 'protocol = "%s"' % protocol]
        lines += driver.toml_lines(f)
        if f.get("baudrate") and f["baudrate"] != port.baudrate:
            lines.append("baudrate = %d" % f["baudrate"])
        if f.get("parity") and f["parity"] != port.parity:
            lines.append('parity = "%s"' % f["parity"])
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _append(path, blocks):
    """Adds the blocks to a configuration file only if the result passes `config check`."""
    from gateway.config import ConfigError, tomllib
    from gateway.service.config import SCHEMA
    if not blocks:
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise CliError("%s: %s" % (path, exc.strerror), EXIT_USAGE) from None
    new = text + ("" if text.endswith("\n") else "\n") + "\n" + blocks
    try:
        SCHEMA.validate(tomllib.loads(new), path, source=new)
    except ConfigError as exc:
        raise CliError(_("%s: not changed, the new meters would not pass config check: %s")
                       % (path, exc.problems[0]), EXIT_USAGE) from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(_("%s: not changed: %s") % (path, exc), EXIT_USAGE) from None
    with open(path, "a", encoding="utf-8") as f:
        f.write(new[len(text):])
