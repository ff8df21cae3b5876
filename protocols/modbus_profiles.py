"""Register maps of Modbus RTU meters, decoded to the same quantity names as DL/T 645.

Two common families with public register maps (both input registers, function 4, IEEE-754
float32 in two registers, high word first), as the Tasmota energy drivers read them
(arendst/Tasmota xnrg_08_sdm120.ino and xnrg_11_ddsu666.ino):

- Eastron SDM120 / SDM220 family: 0x0000 voltage V, 0x0006 current A, 0x000C active power
  W, 0x001E power factor, 0x0046 frequency Hz, 0x0048 import kWh, 0x004A export kWh.
- Chint DDSU666: 0x2000 voltage V, 0x2002 current A, 0x2004 active power kW, 0x2006
  reactive power kvar, 0x200A power factor, 0x200E frequency Hz, 0x4000 import kWh,
  0x400A export kWh.

Float registers are rounded to the decimals each quantity is reported with; a value that is
not finite is dropped (a meter starting up), never reported.
"""

import math
import struct
from decimal import Decimal
from typing import NamedTuple, Optional, Tuple

from protocols.dlt645_values import Value


class Register(NamedTuple):
    quantity: str
    offset: int             # registers from the block start
    decimals: int
    unit: Optional[str]
    scale: Decimal = Decimal(1)


class Block(NamedTuple):
    function: int           # 3 holding, 4 input
    address: int
    count: int
    registers: Tuple[Register, ...]


class Profile(NamedTuple):
    name: str
    description: str
    groups: dict            # poll group ("energy", "instant") -> tuple of Blocks
    relay: Optional[dict] = None   # coil address for a relay, where the meter has one


KW_PER_W = Decimal("0.001")

PROFILES = {
    "eastron-sdm120": Profile(
        "eastron-sdm120", "Eastron SDM120/SDM220 single-phase (input registers, float32)",
        {
            "energy": (Block(4, 0x0048, 4, (
                Register("energy.import.total", 0, 2, "kWh"),
                Register("energy.export.total", 2, 2, "kWh"))),),
            "instant": (
                Block(4, 0x0000, 14, (
                    Register("voltage.a", 0, 1, "V"),
                    Register("current.a", 6, 3, "A"),
                    Register("power.active", 12, 4, "kW", KW_PER_W))),
                Block(4, 0x001E, 2, (Register("power.factor", 0, 3, None),)),
                Block(4, 0x0046, 2, (Register("frequency", 0, 2, "Hz"),)),
            ),
        }),
    "chint-ddsu666": Profile(
        "chint-ddsu666", "Chint DDSU666 single-phase (input registers, float32)",
        {
            "energy": (Block(4, 0x4000, 12, (
                Register("energy.import.total", 0, 2, "kWh"),
                Register("energy.export.total", 10, 2, "kWh"))),),
            "instant": (Block(4, 0x2000, 16, (
                Register("voltage.a", 0, 1, "V"),
                Register("current.a", 2, 3, "A"),
                Register("power.active", 4, 4, "kW"),
                Register("power.reactive", 6, 4, "kvar"),
                Register("power.factor", 10, 3, None),
                Register("frequency", 14, 2, "Hz"))),),
        }),
}


def float32(registers, offset):
    """IEEE-754 float from two registers, high word first."""
    return struct.unpack(">f", struct.pack(">HH", registers[offset], registers[offset + 1]))[0]


def float32_registers(value):
    hi, lo = struct.unpack(">HH", struct.pack(">f", float(value)))
    return [hi, lo]


def decode_block(block, registers):
    """Values of one block's answer registers."""
    out = []
    for reg in block.registers:
        if reg.offset + 1 >= len(registers):
            continue
        f = float32(registers, reg.offset)
        if not math.isfinite(f):
            continue
        value = (Decimal(repr(f)) * reg.scale).quantize(Decimal(1).scaleb(-reg.decimals))
        out.append(Value(reg.quantity, value, reg.unit))
    return out
