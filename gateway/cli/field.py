"""Field commands for the technician on site: `mgw simulate`, `mgw read`, `mgw scan`.
They open the port themselves (the service must not be running on it)."""

import os
import signal
import sys
import time

from gateway.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CliError, _exact_json,
                                emit, find_meter, find_port, load_config, table)


def open_worker(port, protocol="dlt645", retries=None):
    from gateway.line.port import PortError, PortWorker
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


def cmd_simulate(args):
    from gateway.sim.dlt645 import Faults, SimLine, make_meters
    faults = Faults(latency_s=args.latency_ms / 1000.0, drop_rate=args.drop,
                    corrupt_rate=args.corrupt)
    if args.protocol == "modbus":
        from gateway.sim.modbus import ModbusSimLine, ModbusSimMeter
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
    from gateway.line.reads import UnknownQuantity, read_now
    cfg = load_config(args)
    meter = find_meter(cfg, args.meter)
    port = find_port(cfg, meter.port)
    worker = open_worker(port, meter.protocol)
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
    from gateway.line.reads import search_dlt645, sweep_modbus
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

