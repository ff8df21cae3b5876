"""Simulated Modbus RTU meters: pymodbus' own server behind a pseudo-terminal.

pymodbus' ModbusSerialServer opens one pty; the gateway opens another; a bridge thread
between them carries requests across and paces answers at the line's wire time after the
meter's latency, with the same fault injection as the DL/T 645 simulator. The registers
follow the meters' register-map profiles (protocols.modbus_profiles), filled from the same
energy and load model as the simulated DL/T 645 meters, so both protocols report the same
kind of quantities. Every answer is logged with its decoded values (`truth`).
"""

import asyncio
import collections
import logging
import os
import random
import select
import threading
import time
import tty

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gateway.sim.dlt645 import Faults, SimMeter, pace_write, pty_baudrate, wire_time
from protocols.framing import Scanner
from protocols.modbus_profiles import PROFILES, decode_block, float32_registers

log = logging.getLogger(__name__)


class ModbusSimMeter:
    """A Modbus meter of a given profile, with the DL/T 645 simulator's energy model."""

    protocol = "modbus"

    def __init__(self, unit, profile="eastron-sdm120", load_kw=None, faults=None, seed=None,
                 functions=(3, 4)):
        """`functions`: the register-read function codes this meter serves; the other one
        is answered with exception 01 (illegal function), as a DDSU666 that reads only
        holding (03) or only input (04) registers does."""
        if profile not in PROFILES:
            raise ValueError("unknown Modbus profile %r (known: %s)"
                             % (profile, ", ".join(sorted(PROFILES))))
        self.unit = unit
        self.address = str(unit)
        self.profile = PROFILES[profile]
        self.model = SimMeter("%012d" % unit, load_kw=load_kw, prepaid=False,
                              seed=seed if seed is not None else unit)
        self.faults = faults or Faults()
        self.truth = collections.deque(maxlen=100000)
        self.requests = 0
        self.answers = 0
        self.functions = tuple(functions)

    def quantity_values(self, now):
        m = self.model
        m.advance(now)
        p = m.power_kw(now)
        with m.lock:
            total = m._kwh(sum(m._mwh))
        return {
            "energy.import.total": total,
            "energy.export.total": m._kwh(m._export_mwh),
            "voltage.a": 230.0 + m.rng.uniform(-2, 2),
            "current.a": p * 1000 / 230.0,
            "power.active": p,
            "power.reactive": p * 0.3,
            "power.factor": 0.95,
            "frequency": 50.0,
        }

    def blocks(self):
        seen = {}
        for group in self.profile.groups.values():
            for b in group:
                seen[(b.function, b.address)] = b
        return list(seen.values())

    async def action(self, function_code, start_address, address, count, registers,
                     set_values):
        """pymodbus calls this on every access: fill the registers from the model."""
        if function_code in (3, 4) and function_code not in self.functions:
            self.answers += 1
            return ExcCodes.ILLEGAL_FUNCTION
        now = time.time()
        values = self.quantity_values(now)
        for b in self.blocks():
            for reg in b.registers:
                if reg.quantity not in values:
                    continue
                v = float(values[reg.quantity]) / float(reg.scale)
                hi, lo = float32_registers(v)
                i = b.address + reg.offset - start_address
                if 0 <= i < len(registers) - 1:
                    registers[i], registers[i + 1] = hi, lo
        if set_values is None:
            for b in self.blocks():
                if b.address == address and b.count == count:
                    regs = registers[address - start_address:address - start_address + count]
                    self.truth.append((now, (function_code, address),
                                       tuple(decode_block(b, regs))))
        self.answers += 1
        return None

    def device(self):
        lo = min(b.address for b in self.blocks())
        hi = max(b.address + b.count for b in self.blocks())
        return SimDevice(id=self.unit, simdata=[SimData(address=lo, count=hi - lo, values=0,
                                                        datatype=DataType.REGISTERS)],
                         action=self.action)


class ModbusSimLine(threading.Thread):
    """A line of Modbus meters; `device` is the path the gateway opens."""

    def __init__(self, meters, baudrate=9600, name="modbus-sim", seed=1):
        super().__init__(name="simline-%s" % name, daemon=True)
        self.meters = {m.unit: m for m in meters}
        self.baudrate = baudrate
        self.rng = random.Random(seed)
        self._gm, self._gs = os.openpty()          # the gateway's side
        self._sm, self._ss = os.openpty()          # pymodbus' side
        for fd in (self._gs, self._ss):
            tty.setraw(fd)
        self.device = os.ttyname(self._gs)
        self._server_path = os.ttyname(self._ss)
        self._halt = threading.Event()
        self._loop = None
        self._server = None
        self._ready = threading.Event()
        self._server_thread = threading.Thread(target=self._serve, daemon=True,
                                               name="%s-server" % name)
        self.stats = collections.Counter()

    def _serve(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def main():
            # pymodbus binds its transport to the running loop: build it inside
            self._server = ModbusSerialServer([m.device() for m in self.meters.values()],
                                              port=self._server_path, baudrate=self.baudrate,
                                              timeout=0.05)
            await self._server.serve_forever(background=True)
            self._ready.set()
            while not self._halt.is_set():
                await asyncio.sleep(0.05)
            await self._server.shutdown()
        try:
            self._loop.run_until_complete(main())
        except Exception:
            log.exception("pymodbus simulator")
        finally:
            self._ready.set()

    def start(self):
        self._server_thread.start()
        self._ready.wait(5)
        super().start()

    def stop(self):
        self._halt.set()
        if self.is_alive():
            self.join(2)
        self._server_thread.join(3)
        for fd in (self._gm, self._gs, self._sm, self._ss):
            try:
                os.close(fd)
            except OSError:
                pass

    def run(self):
        req_scanner = Scanner("modbus", requests=True)
        ans_scanner = Scanner("modbus")
        current = None                 # (meter, request time, request length)
        while not self._halt.is_set():
            r, _, _ = select.select([self._gm, self._sm], [], [], 0.05)
            now = time.time()
            if self._gm in r:
                try:
                    data = os.read(self._gm, 4096)
                except OSError:
                    data = b""
                for frame in req_scanner.feed(data):
                    meter = self.meters.get(frame[0])
                    self.stats["requests"] += 1
                    if meter is None:
                        continue
                    if pty_baudrate(self._gs, self.baudrate) != self.baudrate:
                        # the meters hear garbled bytes at another rate: silence
                        self.stats["baud_mismatch"] += 1
                        continue
                    meter.requests += 1
                    f = meter.faults
                    if f.silent or (f.drop_rate and self.rng.random() < f.drop_rate):
                        continue
                    current = (meter, now, len(frame))
                    os.write(self._sm, frame)
            if self._sm in r:
                try:
                    data = os.read(self._sm, 4096)
                except OSError:
                    data = b""
                for frame in ans_scanner.feed(data):
                    if current is None or frame[0] != current[0].unit:
                        continue
                    meter, t_rx, nreq = current
                    current = None
                    out = self._damage(meter, frame)
                    start = t_rx + wire_time(nreq, self.baudrate) + meter.faults.latency_s + \
                        (meter.faults.late_s or 0)
                    self._send(out, start)

    def _damage(self, meter, frame):
        f = meter.faults
        out = bytearray(frame)
        if f.corrupt_rate and self.rng.random() < f.corrupt_rate:
            out[self.rng.randrange(len(out))] ^= 1 << self.rng.randrange(8)
        if f.garbage_rate and self.rng.random() < f.garbage_rate:
            out = bytearray(self.rng.getrandbits(8) for _ in range(5)) + out
        return bytes(out)

    def _send(self, data, t_start):
        pace_write(self._gm, data, t_start, self.baudrate, self._halt)


LINE = ModbusSimLine


def simulated_line(count, first, faults, baudrate, profile=None, on_relay=None, count_1997=0,
                   baudrate_1997=1200, button_required=False):
    if count_1997 or button_required:
        raise ValueError("--meters-1997 and --button simulate DL/T 645 meters "
                         "(--protocol dlt645)")
    meters = [ModbusSimMeter(first + i, profile, faults=Faults(**vars(faults)))
              for i in range(count)]
    return ModbusSimLine(meters, baudrate=baudrate), ["unit %d" % m.unit for m in meters]
