"""Simulated meters behind a pseudo-terminal, for tests, demos and commissioning drills.

A SimLine is one RS-485 line: a pty whose slave path pyserial opens like a real port, with
any number of meters on it. Only the addressed meter answers; a broadcast gets no answer;
several meters answering one wildcard request garble each other, as on a real bus. Bytes take
the time they take on the wire (11 bits per byte at 8E1) and a meter answers after its
latency, so timings measured against the simulator mean something.

DL/T 645-2007 and -1997 meters (SimMeter) are modelled here: energy that grows with a load
profile and
lands in the tariff register of the time of day, per-phase instantaneous values, a clock
that drifts, status words with the relay and guarantee state, relay control that checks
password, deadline and guarantee, prepaid money, and 62 daily freezes. Field faults a
technician meets can be practised: a meter with its own baud rate hears garbled bytes (and
stays silent) while the line runs at another rate; a restore with "close allowed" leaves the
relay open until the customer presses the button (`awaiting_customer`); long answers come in
follow-up frames (0xB1, then 0x12 with SEQ); some meters answer a wildcard read with the
wildcard as their address. Modbus meters are pymodbus' own server (gateway.sim.modbus).

Every answer a meter gives is logged with its values (`truth`), so tests compare what the
gateway reports with what the meter said at that moment.
"""

import collections
import copy
import datetime as _dt
import logging
import math
import os
import random
import select
import termios
import threading
import time
import tty
from decimal import Decimal

from protocols import dlt645
from protocols.dlt645_values import STATUS_WORD_3
from protocols.framing import Scanner

log = logging.getLogger(__name__)

BITS_PER_BYTE = 11          # 1 start, 8 data, parity, 1 stop (8E1)

# Default time-of-use schedule of the simulated meters: (start hour, tariff index)
# T1 sharp, T2 peak, T3 flat, T4 valley (reference 3.1)
TOU = ((0, 4), (7, 3), (8, 2), (11, 3), (17, 2), (19, 1), (21, 3), (23, 4))

MWH_PER_CENTI_KWH = 10000   # 0.01 kWh in milliwatt-hours


def wire_time(nbytes, baudrate, bits=BITS_PER_BYTE):
    return nbytes * bits / float(baudrate)


def tariff_at(hour):
    current = TOU[0][1]
    for start, t in TOU:
        if hour >= start:
            current = t
    return current


class Faults:
    """Per-meter fault injection. Rates are probabilities per answer."""

    def __init__(self, silent=False, latency_s=0.03, late_s=None, drop_rate=0.0,
                 corrupt_rate=0.0, bad_checksum_rate=0.0, garbage_rate=0.0,
                 wrong_address_rate=0.0):
        self.silent = silent
        self.latency_s = latency_s
        self.late_s = late_s
        self.drop_rate = drop_rate
        self.corrupt_rate = corrupt_rate
        self.bad_checksum_rate = bad_checksum_rate
        self.garbage_rate = garbage_rate
        self.wrong_address_rate = wrong_address_rate


class SimMeter:
    """A DL/T 645-2007 meter."""

    protocol = "dlt645"
    serve_method = "_serve"          # the SimLine method that answers this framing

    def __init__(self, address, *, load_kw=None, seed=None, password="000000",
                 password_levels=(2, 4), start_kwh=None, clock_offset_s=0.0,
                 drift_ppm=0.0, prepaid=True, balance="100.00", price="0.5283",
                 button_required=False, faults=None, history_days=62, now=None,
                 version=2007, baudrate=None, max_payload=None, echo_wildcard=False):
        self.address = address
        self.version = version              # 2007, or 1997 (reads only, no relay)
        self.baudrate = baudrate            # None: the line's; else it answers only at this
        self.max_payload = max_payload      # longer answers come in follow-up frames
        self.echo_wildcard = echo_wildcard  # answers a wildcard read with the wildcard
        self._follow = {}                   # di -> the parts of a long answer
        self.rng = random.Random(seed if seed is not None else address)
        self.load_kw = self.rng.uniform(0.4, 4.0) if load_kw is None else load_kw
        self.password = password
        self.password_levels = tuple(password_levels)
        self.faults = faults or Faults()
        self.prepaid = prepaid
        self.price = Decimal(price)
        self.button_required = button_required
        self.lock = threading.RLock()
        now = time.time() if now is None else now
        self._t = now
        self._t0 = now
        self.clock_offset_s = clock_offset_s
        self.drift_ppm = drift_ppm
        start = self.rng.uniform(500, 20000) if start_kwh is None else float(start_kwh)
        base = int(start * 1e6)
        shares = (0.05, 0.3, 0.4, 0.25)
        self._mwh = [int(base * s) for s in shares]           # t1..t4, milliwatt-hours
        self._export_mwh = 0
        self._balance_fen = int(Decimal(balance) * 100)
        self._charged_mwh = sum(self._mwh)
        self.relay_open = False
        self.relay_command_trip = False
        self.guarantee = False
        self.relay_log = []          # (gateway time, "open"/"closed", command)
        self.on_relay = None         # callback(meter, state, command) on every movement
        self.truth = collections.deque(maxlen=100000)   # (time, di, values)
        self.requests = 0
        self.answers = 0
        self._freezes = collections.deque(maxlen=62)     # newest first: (datetime, [5 x Decimal])
        self._seed_history(history_days)

    # ---------------------------------------------------------------- model

    def meter_now(self, now=None):
        now = time.time() if now is None else now
        drift = (now - self._t0) * self.drift_ppm / 1e6
        return _dt.datetime.fromtimestamp(now + self.clock_offset_s + drift)

    def power_kw(self, now):
        """Load profile: a daily shape with noise, zero while the relay is open."""
        if self.relay_open:
            return 0.0
        hour = self.meter_now(now).hour + self.meter_now(now).minute / 60.0
        shape = 0.55 + 0.35 * math.sin((hour - 7) / 24.0 * 2 * math.pi) + \
            (0.4 if 18 <= hour < 22 else 0.0)
        return max(0.05, self.load_kw * shape)

    def advance(self, now=None):
        """Integrates energy up to `now` into the tariff register of each minute."""
        now = time.time() if now is None else now
        with self.lock:
            while self._t < now:
                step = min(60.0, now - self._t)
                mid = self._t + step / 2
                mwh = int(self.power_kw(mid) * 1e6 * step / 3600.0)
                before = self.meter_now(self._t)
                self._mwh[tariff_at(self.meter_now(mid).hour) - 1] += mwh
                self._t += step
                after = self.meter_now(self._t)
                if after.date() != before.date():
                    self._freeze(_dt.datetime.combine(after.date(), _dt.time()))
            if self.prepaid:
                used = sum(self._mwh) - self._charged_mwh
                steps = used // MWH_PER_CENTI_KWH              # per 0.01 kWh, as meters do
                if steps:
                    self._balance_fen -= int((self.price * steps).to_integral_value())
                    self._charged_mwh += steps * MWH_PER_CENTI_KWH

    def _seed_history(self, days):
        today = self.meter_now(self._t).date()
        daily = [int(self.load_kw * 24 * 0.6 * 1e6 * s) for s in (0.05, 0.3, 0.4, 0.25)]
        for n in range(1, days + 1):
            day = today - _dt.timedelta(days=n - 1)
            regs = [max(0, m - d * n) for m, d in zip(self._mwh, daily)]
            self._freezes.append((_dt.datetime.combine(day, _dt.time()), self._block(regs)))

    def _freeze(self, when):
        self._freezes.appendleft((when, self._block(self._mwh)))

    @staticmethod
    def _kwh(mwh):
        return Decimal(mwh // MWH_PER_CENTI_KWH).scaleb(-2)

    def _block(self, regs):
        return [self._kwh(sum(regs))] + [self._kwh(m) for m in regs]

    def status_word3(self):
        word = 0
        if self.relay_open:
            word |= 0x10
        if self.relay_command_trip:
            word |= 0x40
        if self.prepaid:
            word |= 0x0200               # money-type prepaid
        if self.guarantee:
            word |= 0x1000
        return word

    @property
    def awaiting_customer(self):
        """'close allowed' was accepted and the relay is still open: the customer has to
        press the meter's button (or insert the card)."""
        return self.relay_open and not self.relay_command_trip

    def values_1997(self, di, now):
        """Plain values for a 1997 DI, or None (reference 5)."""
        self.advance(now)
        mt = self.meter_now(now)
        with self.lock:
            block = self._block(self._mwh)
            volts = [Decimal(220 + self.rng.randint(-3, 3)) for _ in range(3)]
            table = {0x901F: block, 0xB61F: volts, 0xB630: [Decimal(round(min(
                self.power_kw(now), 79.9999), 4)).quantize(Decimal("0.0001"))],
                0xC010: [mt.date()], 0xC011: [mt.time().replace(microsecond=0)],
                0xC032: [int(self.address) if self.address.isdigit() else 0]}
            for i, v in enumerate(block):
                table[0x9010 + i] = [v]
            for i, v in enumerate(volts):
                table[0xB611 + i] = [v]
            amps = Decimal(round(min(self.power_kw(now) * 1000 / 220.0, 99.99), 2)).quantize(
                Decimal("0.01"))
            for i, a in enumerate((amps, Decimal("0.00"), Decimal("0.00"))):
                table[0xB621 + i] = [a]
        return table.get(di)

    def values(self, di, now):
        """Plain values for a DI in field order, or None if this meter does not have it."""
        self.advance(now)
        mt = self.meter_now(now)
        p = self.power_kw(now)
        volts = [Decimal("220.0") + Decimal(self.rng.randint(-30, 30)).scaleb(-1)
                 for _ in range(3)]
        # registers have a range (XXX.XXX A, XX.XXXX kW): a meter shows its maximum
        amps = Decimal(round(min(p * 1000 / 220.0, 799.999), 3)).quantize(Decimal("0.001"))
        kw = Decimal(round(min(p, 79.9999), 4)).quantize(Decimal("0.0001"))
        with self.lock:
            block = self._block(self._mwh)
            table = {
                0x00010000: [block[0]],
                0x0001FF00: block,
                0x00000000: [block[0]],
                0x00020000: [self._kwh(self._export_mwh)],
                0x0201FF00: volts,
                0x0202FF00: [amps, Decimal("0.000"), Decimal("0.000")],
                0x02030000: [kw],
                0x0203FF00: [kw, kw, Decimal("0.0000"), Decimal("0.0000")],
                0x02060000: [Decimal("0.950") if p else Decimal("1.000")],
                0x02800002: [Decimal("50.00")],
                0x0400010C: [mt.replace(microsecond=0)],
                0x04000101: [mt.date()],
                0x04000102: [mt.time().replace(microsecond=0)],
                0x04000402: [int(self.address) if self.address.isdigit() else 0],
                STATUS_WORD_3: [self.status_word3()],
            }
            for i, t in enumerate(block[1:], 1):
                table[0x00010000 | i << 8] = [t]
            for i in range(3):
                table[0x02010000 | (i + 1) << 8] = [volts[i]]
            table[0x02020100] = [amps]
            if self.prepaid:
                table[0x00900200] = [Decimal(max(0, self._balance_fen)).scaleb(-2)]
                table[0x00900201] = [Decimal(max(0, -self._balance_fen)).scaleb(-2)]
            if di in table:
                return table[di]
            if di >> 8 == 0x050600 and 1 <= di & 0xFF <= len(self._freezes):
                return [self._freezes[(di & 0xFF) - 1][0]]
            if di >> 8 == 0x050601 and 1 <= di & 0xFF <= len(self._freezes):
                return list(self._freezes[(di & 0xFF) - 1][1])
        return None

    # ---------------------------------------------------------------- protocol

    def matches(self, address):
        if address == self.address:
            return True
        if "A" in address:
            return all(w == "A" or w == g for w, g in zip(address, self.address))
        return False

    def handle(self, frame, now):
        """The answer frame (no preamble) to a request addressed to this meter, or None."""
        msg = dlt645.decode(frame)
        self.requests += 1
        if self.version == 1997:
            if isinstance(msg, dlt645.ReadRequest) and msg.version == 1997 and \
                    frame.function == dlt645.READ_DATA_1997:
                values = self.values_1997(msg.di, now)
                if values is None:
                    return dlt645.error_response(self.address, dlt645.READ_DATA_1997,
                                                 0x02)[4:]
                answer = dlt645.read_values_response(self.address, msg.di, values, 1997)[4:]
                self.truth.append((now, msg.di, dlt645.decode(
                    dlt645.frame_from_scanner(answer)).values))
                return answer
            return None                 # a 1997 meter knows no 2007 function codes
        if isinstance(msg, dlt645.ReadRequest) and msg.version == 2007 and msg.seq is None:
            values = self.values(msg.di, now)
            if values is None:
                return dlt645.error_response(self.address, dlt645.READ_DATA, 0x02)[4:]
            payload = dlt645.encode_values(msg.di, values)
            self.truth.append((now, msg.di, dlt645.decode_values(msg.di, payload)))
            if self.max_payload and len(payload) > self.max_payload:
                n = self.max_payload
                parts = [payload[i:i + n] for i in range(0, len(payload), n)]
                self._follow[msg.di] = parts
                return dlt645.read_response(self.address, msg.di, parts[0],
                                            follow_up=True)[4:]
            return dlt645.read_response(self.address, msg.di, payload)[4:]
        if isinstance(msg, dlt645.ReadRequest) and msg.version == 2007:
            parts = self._follow.get(msg.di)
            if not parts or not 1 <= msg.seq < len(parts):
                return dlt645.error_response(self.address, dlt645.READ_FOLLOW_UP, 0x02)[4:]
            return dlt645.read_response(self.address, msg.di, parts[msg.seq],
                                        follow_up=msg.seq < len(parts) - 1,
                                        seq=msg.seq)[4:]
        if isinstance(msg, dlt645.ReadAddressRequest):
            return dlt645.address_response(self.address)[4:]
        if isinstance(msg, dlt645.RelayControl):
            return self._relay(msg, now)
        return None                     # 1997 requests: this 2007 meter ignores them

    def _relay(self, msg, now):
        def refuse(err):
            return dlt645.error_response(self.address, dlt645.RELAY_CONTROL, err)[4:]
        if msg.secured or msg.password_level not in self.password_levels \
                or msg.password != self.password:
            return refuse(0x04)
        if msg.command is None:
            return refuse(0x01)
        if msg.valid_until is not None and \
                msg.valid_until < self.meter_now(now).replace(microsecond=0):
            return refuse(0x04)                       # deadline passed
        cmd = msg.command
        with self.lock:
            self.advance(now)
            if cmd == dlt645.RelayCommand.TRIP:
                if self.guarantee:
                    return refuse(0x01)
                self.relay_command_trip = True
                self._move(True, now, cmd)
            elif cmd == dlt645.RelayCommand.CLOSE_ALLOWED:
                self.relay_command_trip = False
                if not self.button_required:
                    self._move(False, now, cmd)
                elif self.relay_open and self.on_relay:
                    self.on_relay(self, "awaiting_customer", cmd.name)
            elif cmd == dlt645.RelayCommand.DIRECT_CLOSE:
                self.relay_command_trip = False
                self._move(False, now, cmd)
            elif cmd == dlt645.RelayCommand.GUARANTEE:
                self.guarantee = True
            elif cmd == dlt645.RelayCommand.GUARANTEE_RELEASE:
                self.guarantee = False
        return dlt645.ack_response(self.address, dlt645.RELAY_CONTROL)[4:]

    def _move(self, open_, now, cmd):
        if self.relay_open != open_:
            self.relay_open = open_
            self.relay_log.append((now, "open" if open_ else "closed", cmd.name))
            if self.on_relay:
                self.on_relay(self, "open" if open_ else "closed", cmd.name)

    def press_button(self):
        """The customer presses the meter's button after 'close allowed'."""
        with self.lock:
            if self.relay_open and not self.relay_command_trip:
                self._move(False, time.time(), dlt645.RelayCommand.CLOSE_ALLOWED)

    def time_sync(self, when, now):
        """Broadcast time: meters accept a correction of at most 5 minutes."""
        delta = (when - self.meter_now(now).replace(microsecond=0)).total_seconds()
        if abs(delta) <= 300:
            self.clock_offset_s += delta


class SimLine(threading.Thread):
    """One simulated RS-485 line on a pseudo-terminal. `device` is the path to open."""

    def __init__(self, meters=(), baudrate=2400, name="sim", noise_rate=0.0, seed=1):
        super().__init__(name="simline-%s" % name, daemon=True)
        self.baudrate = baudrate
        self.meters = {}
        for m in meters:
            self.add(m)
        self.noise_rate = noise_rate
        self.rng = random.Random(seed)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)       # no echo, no line discipline: bytes are bytes
        self.device = os.ttyname(self._slave)
        self._halt = threading.Event()
        # one scanner per framing its meters speak (DL/T 645 and 698.45 share lines); each
        # meter class names the line's method that answers its frames
        self._scanners = {}
        for m in self.meters.values():
            self._listen(m)
        self.stats = collections.Counter()
        self.start_time = None

    def add(self, meter):
        self.meters[meter.address] = meter
        if hasattr(self, "_scanners"):
            self._listen(meter)
        return meter

    def _listen(self, meter):
        if meter.protocol not in self._scanners:
            self._scanners[meter.protocol] = (Scanner(meter.protocol),
                                              getattr(self, meter.serve_method))

    def line_baudrate(self):
        return pty_baudrate(self._slave, self.baudrate)

    def hears(self, meter, baudrate):
        """A meter set to another rate than the line's hears garbled bytes: no frame."""
        return (meter.baudrate or self.baudrate) == baudrate

    def stop(self):
        self._halt.set()
        if self.is_alive():
            self.join(2)
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def run(self):
        self.start_time = time.time()
        pending = b""
        while not self._halt.is_set():
            r, _, _ = select.select([self._master], [], [], 0.05)
            if not r:
                continue
            try:
                data = os.read(self._master, 4096)
            except OSError:
                time.sleep(0.01)        # no reader on the other side yet
                continue
            now = time.time()
            self.stats["rx_bytes"] += len(data)
            pending += data
            for scanner, serve in list(self._scanners.values()):
                for raw in scanner.feed(data):
                    try:
                        serve(raw, now, len(pending) or len(raw))
                    except Exception:  # a simulator bug must not kill the line silently
                        log.exception("simulated line %s", self.name)
                    pending = b""

    def _meters_served_by(self, method):
        """The meters whose frames `method` of this line answers."""
        return [m for m in self.meters.values() if m.serve_method == method]

    def _serve698(self, raw, t_rx, request_bytes):
        from protocols import dlt698
        frame = dlt698.frame_from_scanner(raw)
        if frame.is_response:
            return
        self.stats["requests"] += 1
        answers = []
        for m in self._meters_served_by("_serve698"):
            if not m.matches698(frame.sa):
                continue
            f = m.faults
            if f.silent or (f.drop_rate and self.rng.random() < f.drop_rate):
                m.requests += 1
                continue
            ans = m.handle698(frame, t_rx)
            if ans is None:
                continue
            m.answers += 1
            answers.append((m, self._damage(m, ans)))
        self._reply(answers, t_rx, request_bytes)

    def _serve(self, raw, t_rx, request_bytes):
        frame = dlt645.frame_from_scanner(raw)
        if frame.is_response:
            return
        self.stats["requests"] += 1
        if frame.function == dlt645.TIME_SYNC:
            msg = dlt645.decode(frame)
            if isinstance(msg, dlt645.TimeSync):
                for m in self._meters_served_by("_serve"):
                    if frame.address == dlt645.BROADCAST or m.matches(frame.address):
                        m.time_sync(msg.when, t_rx)
            return
        if frame.address == dlt645.BROADCAST:
            return                                        # nobody answers a broadcast
        answers = []
        baud = self.line_baudrate()
        for m in self._meters_served_by("_serve"):
            if not m.matches(frame.address):
                continue
            if not self.hears(m, baud):
                self.stats["baud_mismatch"] += 1
                continue
            f = m.faults
            if f.silent or (f.drop_rate and self.rng.random() < f.drop_rate):
                m.requests += 1
                continue
            ans = m.handle(frame, t_rx)
            if ans is None:
                continue
            if m.echo_wildcard and "A" in frame.address:
                # a real meter does this: its answer keeps the wildcard address
                ans = bytearray(ans)
                ans[1:7] = dlt645.address_to_wire(frame.address)
                ans[-2] = sum(ans[:-2]) & 0xFF
                ans = bytes(ans)
            m.answers += 1
            answers.append((m, self._damage(m, ans)))
        self._reply(answers, t_rx, request_bytes)

    def _reply(self, answers, t_rx, request_bytes):
        """The answer(s) on the wire after the meter's latency; several garble each other."""
        if not answers:
            return
        meter = answers[0][0]
        out = answers[0][1]
        baud = self.line_baudrate()
        if len(answers) > 1:                               # a collision garbles the bytes
            self.stats["collisions"] += 1
            for _, other in answers[1:]:
                out = bytes(a & b for a, b in zip(out, other)) + out[len(other):] + \
                    other[len(out):]
        delay = wire_time(request_bytes, baud) + meter.faults.latency_s
        if meter.faults.late_s:
            delay += meter.faults.late_s
        if self.noise_rate and self.rng.random() < self.noise_rate:
            # line noise: a burst of garbage on the bus before the answer
            out = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 16))) + \
                b"\xFE\xFE\xFE\xFE" + out
            self.stats["noise_bursts"] += 1
            self._send(out, t_rx + delay, baud)
            return
        self._send(b"\xFE\xFE\xFE\xFE" + out, t_rx + delay, baud)

    def _damage(self, meter, ans):
        f = meter.faults
        rng = self.rng
        ans = bytearray(ans)
        if f.wrong_address_rate and rng.random() < f.wrong_address_rate and \
                meter.protocol == SimMeter.protocol:
            other = dlt645.address_to_wire("%012d" % rng.randint(1, 10 ** 12 - 1))
            ans[1:7] = other
            ans[-2] = sum(ans[:-2]) & 0xFF
        if f.corrupt_rate and rng.random() < f.corrupt_rate:
            i = rng.randrange(len(ans))
            ans[i] ^= 1 << rng.randrange(8)
        if f.bad_checksum_rate and rng.random() < f.bad_checksum_rate:
            ans[-2] ^= 0x5A
        if f.garbage_rate and rng.random() < f.garbage_rate:
            ans = bytearray(rng.getrandbits(8) for _ in range(rng.randint(1, 12))) + ans
        return bytes(ans)

    def _send(self, data, t_start, baudrate=None):
        self.stats["tx_bytes"] += pace_write(self._master, data, t_start,
                                             baudrate or self.baudrate, self._halt)


_SPEEDS = {getattr(termios, "B%d" % b): b for b in (600, 1200, 2400, 4800, 9600, 19200,
                                                  38400, 57600, 115200)}


def pace_write(fd, data, t_start, baudrate, halt):
    """Writes data so that byte i is complete on the wire at t_start + (i + 1) byte times,
    as a meter's UART sends it. Returns the bytes written."""
    bt = wire_time(1, baudrate)
    sent = 0
    while sent < len(data) and not halt.is_set():
        now = time.time()
        due = int((now - t_start) / bt)
        if due > sent:
            n = min(due, len(data))
            try:
                os.write(fd, data[sent:n])
            except OSError:
                return sent
            sent = n
        else:
            time.sleep(max(0.0, t_start + (sent + 1) * bt - now))
    return sent


def pty_baudrate(fd, default):
    """The baud rate the other side has set on a pty (it keeps it in its termios but carries
    bytes at any rate, so a simulator compares rates itself). Parity cannot be told: Linux
    clears PARENB on a pty, so 8E1 and 8N1 look alike."""
    try:
        speed = termios.tcgetattr(fd)[4]
    except (termios.error, OSError):
        return default
    return _SPEEDS.get(speed, default)


def make_meters(n, first_address=1, faults=None, **kwargs):
    """n meters with consecutive addresses 000000000001, ... (12 BCD digits); each gets its
    own copy of `faults`."""
    return [SimMeter("%012d" % (first_address + i), seed=first_address + i,
                     faults=copy.copy(faults) if faults else None, **kwargs)
            for i in range(n)]




LINE = SimLine               # DL/T 698.45 meters share it (gateway/sim/dlt698.py)


def simulated_line(count, first, faults, baudrate, profile=None, on_relay=None, count_1997=0,
                   baudrate_1997=1200, button_required=False):
    """`count` meters from address `first`, then `count_1997` DL/T 645-1997 meters at their
    own `baudrate_1997` (a mixed line: each answers only at its own rate)."""
    meters = make_meters(count, first_address=first, faults=faults, prepaid=True,
                         button_required=button_required)
    meters += make_meters(count_1997, first_address=first + count, faults=faults,
                          prepaid=False, version=1997,
                          baudrate=baudrate_1997 if baudrate_1997 != baudrate else None)
    for m in meters:
        m.on_relay = on_relay
    return SimLine(meters, baudrate=baudrate), [m.address for m in meters]


def one_meter(address, faults, on_relay=None, button_required=False):
    """One more meter for a line of LINE (`mgw simulate --meter dlt645:ADDRESS`)."""
    m = SimMeter(address, seed=int(address), faults=copy.copy(faults), prepaid=True,
                 button_required=button_required)
    m.on_relay = on_relay
    return m
