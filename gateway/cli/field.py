"""Field commands for the technician on site: `mgw simulate`, `mgw read`, `mgw scan`.
They open the port themselves (the service must not be running on it)."""

import os
import signal
import sys
import time

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
            msg += " (is `mgw run` active on it? stop the service, or read through the head-end)"
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
    line, names = simulated_line(args.protocol, args.meters, args.first, faults,
                                 args.baudrate, profile=args.profile, on_relay=on_relay)
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
    from gateway.line.reads import UnknownQuantity, read_now
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
    from gateway.line import reads
    from gateway.registry import DEFAULT_PROTOCOL
    cfg = load_config(args)
    port = find_port(cfg, args.port)
    protocol = args.protocol or next((m.protocol for m in cfg.meters if m.port == port.name),
                                     DEFAULT_PROTOCOL)
    driver = reads.driver(protocol)
    worker = open_worker(port, retries=0)

    def progress(done, total, found):
        if sys.stderr.isatty() or args.progress:
            width = 30
            filled = int(width * done / max(total, 1))
            sys.stderr.write("\rscanning %s: [%s%s] %d/%d, found %d" % (
                port.name, "#" * filled, " " * (width - filled), done, total, found))
            sys.stderr.flush()
    try:
        found = reads.scan(worker, protocol, progress, profile=args.profile,
                           first=args.first, last=args.last)
    finally:
        worker.close()
        if sys.stderr.isatty() or args.progress:
            sys.stderr.write("\n")
    configured = {reads.driver(m.protocol).key_of(m): m.id
                  for m in cfg.meters if m.port == port.name and m.protocol == protocol}
    for f in found:
        f["configured_as"] = configured.get(str(f[driver.SCAN_KEY]))
    emit(args, {"port": port.name, "protocol": protocol, "found": found},
         lambda o: table([(f[driver.SCAN_KEY], f.get("profile") or "",
                           f["configured_as"] or "(not configured)") for f in o["found"]],
                         [driver.SCAN_KEY, "profile", "configured as"])
         if o["found"] else print("no meters found"))
    return EXIT_OK if found else EXIT_FAILED
