"""`mgw demo`: the whole gateway on a fresh machine, no hardware, no configuration.

Simulated meters on pseudo-terminals (a DL/T 645 line with a noisy meter, a dead one and a
prepaid household running low; a Modbus line served by pymodbus), a data folder of its own,
the uplink to a broker on 127.0.0.1:1883 if one is reachable (buffering otherwise), signing
keys for trying commands, and a live view of lines, meters, readings, balances and relays.
"""

import collections
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

from gateway import __version__
from gateway.config import ConfigError
from gateway.service.config import validate
from gateway.sim.dlt645 import Faults, SimLine, SimMeter


NOTICE_S = 10
HOUSEHOLD = "m4"
# what each demo meter is there to show (the live view labels them)
ROLES = {"m1": "prepaid, flat tariff", "m2": "noisy: drops 1 answer in 10, garbles 1 in 20",
         "m3": "prepaid, time-of-use tariff",
         HOUSEHOLD: "prepaid household running low: warned, then cut off",
         "m5": "plain meter", "m6": "dead: never answers (offline, probed with back-off)",
         "m7": "DL/T 698.45 on the DL/T 645 line",
         "mb1": "Modbus, Eastron SDM120", "mb2": "Modbus, Chint DDSU666"}


def _broker_reachable(host, port):
    try:
        socket.create_connection((host, port), 0.5).close()
        return True
    except OSError:
        return False


def build(data_dir, broker=("127.0.0.1", 1883)):
    """(config, simulators, keys folder) for the demo."""
    from gateway.control.signing import generate
    from gateway.sim.modbus import ModbusSimLine, ModbusSimMeter
    keys = os.path.join(data_dir, "keys")
    if not os.path.exists(os.path.join(keys, "headend.pub")):
        generate(keys)
    # m4's household draws an implausible 300 kW so that its balance runs out within a
    # minute of the demo (its account's max_kw says so, or the jump check would refuse it)
    meters = [SimMeter("%012d" % (1001 + i), load_kw=[1.2, 2.5, 0.8, 300.0, 1.5, 2.0][i],
                       balance="100.00", faults=Faults(latency_s=0.04))
              for i in range(6)]
    meters[1].faults.drop_rate = 0.1           # a meter that misses one answer in ten
    meters[1].faults.corrupt_rate = 0.05
    meters[5].faults.silent = True             # a dead meter: offline, probed with back-off
    dlt = SimLine(meters, baudrate=9600, name="demo-dlt645")
    from gateway.sim.dlt698 import SimMeter698    # a DL/T 698.45 meter on the same line
    m698 = dlt.add(SimMeter698("000000001007", load_kw=1.8, faults=Faults(latency_s=0.04)))
    mb = ModbusSimLine([ModbusSimMeter(1, "eastron-sdm120"),
                        ModbusSimMeter(2, "chint-ddsu666")], baudrate=9600,
                       name="demo-modbus")
    doc = {
        "gateway": {"id": "demo-gw", "data_dir": data_dir, "status_interval_s": 2},
        "ports": [{"name": "rs485-1", "device": dlt.device, "baudrate": 9600},
                  {"name": "rs485-2", "device": mb.device, "baudrate": 9600, "parity": "N"}],
        "meters": [{"id": "m%d" % (i + 1), "port": "rs485-1", "address": m.address,
                    "interval_s": 10, "instant_interval_s": 20, "clock_interval_s": 600,
                    "prepaid": True} for i, m in enumerate(meters)] +
                  [{"id": "m7", "port": "rs485-1", "protocol": "dlt698", "address": m698.address,
                    "interval_s": 10, "instant_interval_s": 20, "clock_interval_s": 600,
                    "prepaid": True, "relay_plaintext": True},
                   {"id": "mb1", "port": "rs485-2", "protocol": "modbus", "unit": 1,
                    "profile": "eastron-sdm120", "interval_s": 15, "instant_interval_s": 15},
                   {"id": "mb2", "port": "rs485-2", "protocol": "modbus", "unit": 2,
                    "profile": "chint-ddsu666", "interval_s": 15, "instant_interval_s": 15}],
        "uplink": {"host": broker[0], "port": broker[1], "topic_root": "mgw/v1",
                   "health_interval_s": 60},
        "control": {"public_keys": [os.path.join(keys, "headend.pub")],
                    "require_synced_clock": False},
        "tariffs": {
            "flat": {"kind": "flat", "price": "0.5283"},
            "tou": {"kind": "tiered_tou",
                    "prices": {"sharp": "1.0253", "peak": "0.8653", "flat": "0.5283",
                               "valley": "0.3015"},
                    "schedule": [{"from": "00:00", "to": "08:00", "rate": "valley"},
                                 {"from": "08:00", "to": "11:00", "rate": "peak"},
                                 {"from": "11:00", "to": "17:00", "rate": "flat"},
                                 {"from": "17:00", "to": "19:00", "rate": "peak"},
                                 {"from": "19:00", "to": "21:00", "rate": "sharp"},
                                 {"from": "21:00", "to": "24:00", "rate": "flat"}],
                    "ladder": [{"upto_kwh": "2760", "surcharge": "0"},
                               {"upto_kwh": "4800", "surcharge": "0.05"},
                               {"surcharge": "0.30"}]},
        },
        "accounts": [
            {"meter": "m1", "tariff": "flat", "opening_balance": "100.00"},
            {"meter": "m3", "tariff": "tou", "opening_balance": "50.00"},
            # a household about to run out: warnings, then cut-off after the notice time
            # its money falls by about 0.40 a reading (every 10 s): alarm 1, alarm 2, then
            # zero on successive readings
            {"meter": HOUSEHOLD, "tariff": "flat", "opening_balance": "0.90",
             "alarm1": "0.70", "alarm2": "0.30", "max_kw": "500", "restore_threshold": "1.00"},
        ],
        # short notice so the demo shows both warnings, then the cut-off, well within a
        # minute (measured: about 45 s from the start)
        "cost_control": {"notice_s": NOTICE_S, "protected_hours": [],
                         "protected_weekends": False, "check_interval_s": 5},
    }
    try:
        cfg = validate(doc, "<demo>")
    except ConfigError as exc:
        raise RuntimeError("demo configuration: %s" % "; ".join(exc.problems)) from None
    return cfg, [dlt, mb], keys


def readable(event_type, fields):
    """An event as one line a person reads ("m4 balance low (alarm 2): 0.19 yuan left")."""
    f = dict(fields)
    meter = f.pop("meter", None)
    text = {
        "gateway.started": lambda: "gateway started: %s meters on %s lines" % (
            f.get("meters"), f.get("ports")),
        "meter.offline": lambda: "offline: %s" % f.get("reason", "no answer"),
        "meter.online": lambda: "back online",
        "balance.low": lambda: "balance low (alarm %s): %s yuan left" % (
            f.get("level"), f.get("balance")),
        "balance.exhausted": lambda: "money ran out (%s yuan): cut-off after %d s notice" % (
            f.get("balance"), NOTICE_S),
        "balance.zero": lambda: "balance at zero (%s yuan)" % f.get("balance"),
        "balance.topup": lambda: "topped up %s yuan: balance %s yuan" % (
            f.get("amount"), f.get("balance")),
        "balance.normal": lambda: "balance back to normal (%s yuan)" % f.get("balance"),
        "meter.relay_changed": lambda: (
            "relay closed by the meter (the customer's button, or on site)"
            if f.get("relay") == "closed" else
            "relay opened by the meter itself (its own prepaid logic, or on site)"),
        "relay.opened": lambda: "relay OPEN: supply cut off (by %s)" % f.get("source", "?"),
        "relay.closed": lambda: ("relay close allowed: the customer presses the button"
                                 if f.get("awaiting_customer") else
                                 "relay closed: supply restored (by %s)" % f.get("source")),
    }.get(event_type)
    if text is None:
        if event_type == "gateway.health":
            return None                      # a periodic report for the head-end
        text = lambda: "%s %s" % (event_type, " ".join("%s=%s" % kv for kv in f.items()))
    return ("%s: %s" % (meter, text())) if meter else text()


class EventLog:
    """The demo's own record of the gateway's events (the sink's `event`, wrapped): readable
    lines for the view, and when the household was cut off."""

    def __init__(self, sink, started, clock=time.time):
        self.lines = collections.deque(maxlen=50)
        self.started = started
        self.clock = clock
        self.cut_off_after_s = None
        original = sink.event

        def event(event_type, **fields):
            self.add(event_type, fields)
            return original(event_type, **fields)
        sink.event = event

    def add(self, event_type, fields):
        now = self.clock()
        if event_type == "relay.opened" and fields.get("meter") == HOUSEHOLD and \
                self.cut_off_after_s is None:
            self.cut_off_after_s = now - self.started
        line = readable(event_type, fields)
        if line:
            self.lines.append("%s  %s" % (time.strftime("%H:%M:%S", time.localtime(now)),
                                          line))


class LiveView:
    def __init__(self, gw, keys, events, out=sys.stdout, broker=("127.0.0.1", 1883)):
        self.gw = gw
        self.keys = keys
        self.events = events
        self.out = out
        self.broker = broker
        self.tty = out.isatty()

    def household(self):
        """How the prepaid household's cut-off goes, and how long it took."""
        after = self.events.cut_off_after_s
        if after is not None:
            return "household %s: cut off %.0f s after the start (money ran out, then %d s " \
                   "notice); top it up to restore" % (HOUSEHOLD, after, NOTICE_S)
        return "household %s: running low; cut off within about 60 s of the start (when " \
               "its money runs out, after %d s notice)" % (HOUSEHOLD, NOTICE_S)

    def suggestion(self, connected):
        """A top-up for the household, as a command that works as printed."""
        mgw = _mgw_command()
        topic = "mgw/v1/%s/commands" % self.gw.cfg.gateway.id
        cmd = "%s command sign --key %s --meter %s --action topup --param amount=20.00 " \
              "--param txn=T1 --publish %s:%d --topic %s" % (
                  mgw, os.path.join(self.keys, "headend.key"), HOUSEHOLD, self.broker[0],
                  self.broker[1], topic)
        if connected:
            return "try: " + cmd
        return "try, with an MQTT broker on %s:%d (apt-get install mosquitto, then restart " \
               "the demo): %s" % (self.broker[0], self.broker[1], cmd)

    def render(self):
        gw = self.gw
        st = gw.status()
        lines = []
        up = st["uplink"] or {}
        lines.append("meter-gateway %s demo  %s  data: %s" % (
            __version__, time.strftime("%H:%M:%S"), gw.cfg.gateway.data_dir))
        lines.append("uplink %s: %s" % (up.get("broker"), "connected" if up.get("connected")
                                         else "not connected, buffering (%s)" % (
                                             up.get("last_error") or "connecting")))
        lines.append("")
        lines.append("%-9s %-8s %8s %8s %8s %6s %6s" % ("line", "state", "requests",
                                                         "answers", "timeouts", "bad", "busy"))
        for p in st["ports"]:
            lines.append("%-9s %-8s %8d %8d %8d %6d %5.0f%%" % (
                p["port"], "open" if p["open"] else "closed", p["requests"], p["answers"],
                p["timeouts"], p["checksum_errors"], 100 * p["utilisation"]))
        lines.append("")
        lines.append("%-5s %-8s %12s %9s %-7s %10s %-9s  %s" % (
            "meter", "state", "energy kWh", "power kW", "relay", "balance", "account",
            "role"))
        latest = gw.sink.latest
        accounts = st.get("accounts") or {}
        for m in st["meters"]:
            mid = m["id"]
            energy = latest.get((mid, "energy.import.total"))
            power = latest.get((mid, "power.active"))
            acc = accounts.get(mid) or {}
            if not isinstance(acc, dict):
                acc = {}
            lines.append("%-5s %-8s %12s %9s %-7s %10s %-9s  %s" % (
                mid, "online" if m["online"] else "OFFLINE", energy if energy is not None
                else "-", power if power is not None else "-", m.get("relay") or "-",
                acc.get("balance", "-"), acc.get("state", ""), ROLES.get(mid, "")))
        b = st["buffer"]
        lines.append("")
        lines.append("journal: %s readings, %s events waiting for the head-end; %.1f kB" % (
            b.get("readings", "-"), b.get("events", "-"), b.get("bytes", 0) / 1000.0))
        lines.append(self.household())
        lines.append("recent events:")
        for e in list(self.events.lines)[-6:]:
            lines.append("  " + e)
        lines.append("")
        lines.append(self.suggestion(up.get("connected")))
        lines.append("Ctrl-C stops the demo")
        text = "\n".join(lines)
        if self.tty:
            self.out.write("\x1b[H\x1b[2J" + text + "\n")
        else:
            self.out.write(text + "\n\n")
        self.out.flush()


def _mgw_command():
    """How this very program is started again from the current folder: `.venv/bin/mgw`
    from a checkout (`mgw` alone is not on the PATH there), `python -m gateway` otherwise."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "mgw" and os.path.exists(argv0):
        if os.sep not in argv0:
            return argv0                     # found on the PATH
        rel = os.path.relpath(os.path.abspath(argv0))
        return rel if not rel.startswith("..") else os.path.abspath(argv0)
    return "%s -m gateway" % sys.executable


def run(args):
    from gateway.logs import setup_logging
    from gateway.service.gateway import Gateway, serve
    own_dir = args.data_dir is None
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="mgw-demo-")
    broker = args.broker or ("127.0.0.1", 1883)
    setup_logging("warning" if not args.no_view else "info")
    cfg, sims, keys = build(data_dir, broker)
    for s in sims:
        s.start()
    if not _broker_reachable(*broker):
        sys.stderr.write("no MQTT broker on %s:%d: readings are buffered in the journal "
                         "until one is there\n" % broker)
    gw = Gateway(cfg)
    gw.sink.latest = {}                     # the live view shows the latest values
    events = EventLog(gw.sink, time.time())
    stop = threading.Event()
    view = None if args.no_view else LiveView(gw, keys, events, broker=broker)

    def ticker(gw_):
        def loop():
            while not stop.is_set():
                if view:
                    try:
                        view.render()
                    except Exception as exc:       # the view must never stop the demo
                        sys.stderr.write("view: %s\n" % exc)
                stop.wait(1.0)
        threading.Thread(target=loop, daemon=True, name="view").start()
        if args.seconds:
            timer = threading.Timer(args.seconds, stop.set)
            timer.daemon = True         # Ctrl-C before the time is up ends the demo at once
            timer.start()
    try:
        serve(gw, stop, on_started=ticker)
    finally:
        stop.set()
        for s in sims:
            s.stop()
        if own_dir and not os.environ.get("MGW_DEMO_KEEP"):
            shutil.rmtree(data_dir, ignore_errors=True)
    print("demo stopped")
    return 0


__all__ = ["build", "run"]
