"""DL/T 645 data identifiers (DI) and their value formats, 2007 and 1997.

Sources: ../shared/reference/dlt645.md sections 2, 3 and 5 (tables gathered from public
implementations: Kelu DL645V07.cpp, libdlt645, fdxxw/go-dlt645 comments). Vendor DIs
(e.g. 028011FF) are deliberately not here: they decode to raw bytes, never to a guess.

A DI maps to a list of fields; a block DI (DI1 or DI0 = FF) repeats its field. Values are
exact: BCD numbers become Decimal with the meter's own number of decimals.
"""

import datetime as _dt
import functools
from decimal import Decimal
from typing import Any, List, NamedTuple, Optional

from protocols.framing import bcd_to_int, int_to_bcd


class Value(NamedTuple):
    quantity: str          # dotted name from the contract, e.g. energy.import.total
    value: Any             # Decimal, int, str, date, time or datetime
    unit: Optional[str]


class Field:
    """One item in a payload: how many bytes and how to turn them into a Value."""

    __slots__ = ("quantity", "size", "decimals", "signed", "unit", "kind")

    def __init__(self, quantity, size, decimals=0, signed=False, unit=None, kind="num"):
        self.quantity = quantity
        self.size = size
        self.decimals = decimals
        self.signed = signed
        self.unit = unit
        self.kind = kind

    def decode(self, b):
        kind = self.kind
        if kind == "num":
            n = bcd_to_int(b, self.signed)
            return Value(self.quantity, Decimal(n).scaleb(-self.decimals), self.unit)
        if kind == "int":                       # BCD counter, no decimals
            return Value(self.quantity, bcd_to_int(b), self.unit)
        if kind == "word":                      # binary status word, low byte first
            return Value(self.quantity, int.from_bytes(b, "little"), None)
        if kind == "digits":                    # meter number, as printed
            bcd_to_int(b)                       # validates nibbles
            return Value(self.quantity, bytes(reversed(b)).hex(), None)
        if kind == "date":                      # WW DD MM YY on the wire
            return Value(self.quantity, _dt.date(2000 + _b(b[3]), _b(b[2]), _b(b[1])), None)
        if kind == "time":                      # ss mm hh
            return Value(self.quantity, _dt.time(_b(b[2]), _b(b[1]), _b(b[0])), None)
        if kind == "datetime7":                 # ss mm hh WW DD MM YY
            return Value(self.quantity, _dt.datetime(2000 + _b(b[6]), _b(b[5]), _b(b[4]),
                                                     _b(b[2]), _b(b[1]), _b(b[0])), None)
        if kind == "ymdhm":                     # mm hh DD MM YY
            return Value(self.quantity, _dt.datetime(2000 + _b(b[4]), _b(b[3]), _b(b[2]),
                                                     _b(b[1]), _b(b[0])), None)
        if kind == "ymdhms":                    # ss mm hh DD MM YY
            return Value(self.quantity, _ymdhms(b), None)
        raise AssertionError(kind)

    def encode(self, value):
        kind = self.kind
        if kind == "num":
            scaled = Decimal(value).scaleb(self.decimals)
            if scaled != scaled.to_integral_value():
                raise ValueError("%s: %s has more than %d decimals"
                                 % (self.quantity, value, self.decimals))
            return int_to_bcd(int(scaled), self.size, self.signed)
        if kind == "int":
            return int_to_bcd(int(value), self.size)
        if kind == "word":
            return int(value).to_bytes(self.size, "little")
        if kind == "digits":
            return int_to_bcd(int(value), self.size)
        if kind == "date":
            weekday = (value.isoweekday()) % 7  # 0 = Sunday
            return bytes(_h(x) for x in (weekday, value.day, value.month, value.year - 2000))
        if kind == "time":
            return bytes(_h(x) for x in (value.second, value.minute, value.hour))
        if kind == "datetime7":
            weekday = value.isoweekday() % 7
            return bytes(_h(x) for x in (value.second, value.minute, value.hour, weekday,
                                         value.day, value.month, value.year - 2000))
        if kind == "ymdhm":
            return bytes(_h(x) for x in (value.minute, value.hour, value.day, value.month,
                                         value.year - 2000))
        if kind == "ymdhms":
            return encode_ymdhms(value)
        raise AssertionError(kind)


def _b(byte):
    """One BCD byte to int, checked."""
    hi, lo = byte >> 4, byte & 0x0F
    if hi > 9 or lo > 9:
        raise ValueError("not BCD: %02X" % byte)
    return hi * 10 + lo


def _h(n):
    if not 0 <= n <= 99:
        raise ValueError("%d does not fit one BCD byte" % n)
    return ((n // 10) << 4) | (n % 10)


def _ymdhms(b):
    return _dt.datetime(2000 + _b(b[5]), _b(b[4]), _b(b[3]), _b(b[2]), _b(b[1]), _b(b[0]))


def decode_ymdhms(b):
    """ss mm hh DD MM YY (broadcast time, relay deadlines, event times) to a naive datetime."""
    if len(b) != 6:
        raise ValueError("a date-time needs 6 bytes, got %d" % len(b))
    return _ymdhms(b)


def encode_ymdhms(when):
    return bytes(_h(x) for x in (when.second, when.minute, when.hour, when.day, when.month,
                                 when.year - 2000))


# ---------------------------------------------------------------- DL/T 645-2007 table

_ENERGY_KINDS = {
    # DI2: (name, unit, signed) -- reference 3.1; combined quantities carry a sign
    0x00: ("energy.combined", "kWh", True),
    0x01: ("energy.import", "kWh", False),
    0x02: ("energy.export", "kWh", False),
    0x03: ("energy.reactive.combined1", "kvarh", True),
    0x04: ("energy.reactive.combined2", "kvarh", True),
    0x05: ("energy.reactive.q1", "kvarh", False),
    0x06: ("energy.reactive.q2", "kvarh", False),
    0x07: ("energy.reactive.q3", "kvarh", False),
    0x08: ("energy.reactive.q4", "kvarh", False),
    0x09: ("energy.apparent.import", "kVAh", False),
    0x0A: ("energy.apparent.export", "kVAh", False),
}

# Per-phase energies (DL/T 645-2007 appendix A, the DI2 layout of Kelu DL645V07.cpp):
# phase A from DI2 0x15, B from 0x29, C from 0x3D, each 0x14 apart, the same order as the
# totals above. The combined reactive energies are signed like their totals (reference 2).
_PHASE_ENERGY = (
    ("energy.import", "kWh", False),
    ("energy.export", "kWh", False),
    ("energy.reactive.combined1", "kvarh", True),
    ("energy.reactive.combined2", "kvarh", True),
    ("energy.reactive.q1", "kvarh", False),
    ("energy.reactive.q2", "kvarh", False),
    ("energy.reactive.q3", "kvarh", False),
    ("energy.reactive.q4", "kvarh", False),
    ("energy.apparent.import", "kVAh", False),
    ("energy.apparent.export", "kVAh", False),
)
PHASE_ENERGY_BASE = {"a": 0x15, "b": 0x29, "c": 0x3D}
for _phase, _base in PHASE_ENERGY_BASE.items():
    for _k, (_name, _unit, _signed) in enumerate(_PHASE_ENERGY):
        _ENERGY_KINDS[_base + _k] = ("%s.%s" % (_name, _phase), _unit, _signed)

TARIFF_NAMES = ("total", "t1", "t2", "t3", "t4")

_F = Field
_PHASES = ("a", "b", "c")

_ITEMS_2007 = {
    # prepaid money and energy (reference 3.6)
    0x00900200: [_F("balance.remaining", 4, 2, False, "CNY")],
    0x00900201: [_F("balance.overdraft", 4, 2, False, "CNY")],
    0x00900100: [_F("prepaid.energy.remaining", 4, 2, False, "kWh")],
    0x00900101: [_F("prepaid.energy.overdraft", 4, 2, False, "kWh")],
    # instantaneous (reference 3.2)
    0x02030000: [_F("power.active", 3, 4, True, "kW")],
    0x02040000: [_F("power.reactive", 3, 4, True, "kvar")],
    0x02050000: [_F("power.apparent", 3, 4, True, "kVA")],
    0x02060000: [_F("power.factor", 2, 3, True, None)],
    0x02800001: [_F("current.n", 3, 3, True, "A")],
    0x02800002: [_F("frequency", 2, 2, False, "Hz")],
    0x02800007: [_F("meter.temperature", 2, 1, True, "Cel")],
    0x0280000A: [_F("meter.battery_runtime", 4, 0, False, "min", kind="int")],
    0x0280000B: [_F("price.current_step", 4, 4, False, "CNY/kWh")],
    # clock and identity (reference 3.3)
    0x04000101: [_F("meter.date", 4, kind="date")],
    0x04000102: [_F("meter.time", 3, kind="time")],
    0x0400010C: [_F("meter.clock", 7, kind="datetime7")],
    0x04000401: [_F("meter.address", 6, kind="digits")],
    0x04000402: [_F("meter.number", 6, kind="digits")],
    # prepaid limits (reference 3.6)
    0x04001001: [_F("prepaid.alarm1", 4, 2, False, "CNY")],
    0x04001002: [_F("prepaid.alarm2", 4, 2, False, "CNY")],
    0x04001003: [_F("prepaid.overdraft_limit", 4, 2, False, "CNY")],
    0x04001004: [_F("prepaid.hoarding_limit", 4, 2, False, "CNY")],
    0x04001005: [_F("prepaid.close_allowed_limit", 4, 2, False, "CNY")],
    # events (reference 3.6)
    0x03110000: [_F("events.power_down.count", 3, kind="int")],
    0x1D000001: [_F("events.trip.count", 3, kind="int")],
    0x1E000001: [_F("events.close.count", 3, kind="int")],
}

for _i, _ph in enumerate(_PHASES, 1):
    _ITEMS_2007[0x02010000 | _i << 8] = [_F("voltage." + _ph, 2, 1, False, "V")]
    _ITEMS_2007[0x02020000 | _i << 8] = [_F("current." + _ph, 3, 3, True, "A")]
    _ITEMS_2007[0x02030000 | _i << 8] = [_F("power.active." + _ph, 3, 4, True, "kW")]
    _ITEMS_2007[0x02040000 | _i << 8] = [_F("power.reactive." + _ph, 3, 4, True, "kvar")]
    _ITEMS_2007[0x02050000 | _i << 8] = [_F("power.apparent." + _ph, 3, 4, True, "kVA")]
    _ITEMS_2007[0x02060000 | _i << 8] = [_F("power.factor." + _ph, 2, 3, True, None)]
    _ITEMS_2007[0x02070000 | _i << 8] = [_F("phase_angle." + _ph, 2, 1, False, "deg")]
_ITEMS_2007[0x0201FF00] = [_ITEMS_2007[0x02010000 | i << 8][0] for i in (1, 2, 3)]
_ITEMS_2007[0x0202FF00] = [_ITEMS_2007[0x02020000 | i << 8][0] for i in (1, 2, 3)]
for _base in (0x02030000, 0x02040000, 0x02050000, 0x02060000):
    _ITEMS_2007[_base | 0xFF00] = [_ITEMS_2007[_base | i << 8][0] for i in (0, 1, 2, 3)]

_STATUS_WORDS = {0x04000500 | i: [_F("status.word%d" % i, 2, kind="word")] for i in range(1, 8)}
_ITEMS_2007.update(_STATUS_WORDS)
_ITEMS_2007[0x040005FF] = [_STATUS_WORDS[0x04000500 | i][0] for i in range(1, 8)]

STATUS_WORD_3 = 0x04000503


def status_word3_values(word):
    """Reference 3.4: bit4 physical relay (1 = tripped), bit6 commanded trip, bit7 pre-trip
    alarm, bits 8-9 prepaid type, bit12 guarantee (保电)."""
    prepaid = ("none", "energy", "money", "reserved")[(word >> 8) & 3]
    return [
        Value("relay.state", "open" if word & 0x10 else "closed", None),
        Value("relay.command", "trip" if word & 0x40 else "close", None),
        Value("relay.prealarm", bool(word & 0x80), None),
        Value("meter.prepaid_type", prepaid, None),
        Value("guarantee.state", bool(word & 0x1000), None),
    ]


def _energy_fields(di):
    di2, di1, di0 = (di >> 16) & 0xFF, (di >> 8) & 0xFF, di & 0xFF
    kind = _ENERGY_KINDS.get(di2)
    if kind is None:
        # an energy-class DI the tables do not name: its sign and unit are unknown, so it
        # stays raw bytes (a guess would turn -12.34 into 800012.34)
        return None, False
    name, unit, signed = kind
    suffix = "" if di0 == 0 else ".settlement%d" % di0 if di0 <= 0x0C else None
    if suffix is None:
        return None, False
    if di2 >= PHASE_ENERGY_BASE["a"]:
        # per-phase energies have no tariff registers: one value, named by its phase
        if di1 != 0:
            return None, False
        return [_F(name + suffix, 4, 2, signed, unit)], False
    if di1 == 0xFF:
        return [_F("%s.%s%s" % (name, "total" if k == 0 else "t%d" % k, suffix), 4, 2, signed,
                   unit) for k in range(64)], True
    if di1 > 0x3F:
        return None, False
    return [_F("%s.%s%s" % (name, "total" if di1 == 0 else "t%d" % di1, suffix), 4, 2, signed,
               unit)], False


def _freeze_fields(di):
    """Daily freeze n (05060001..0506003E time, 05060101.. import, 05060201.. export)."""
    item, n = (di >> 8) & 0xFF, di & 0xFF
    if not 1 <= n <= 0x3E:
        return None, False
    if item == 0x00:
        return [_F("freeze.daily.time", 5, kind="ymdhm")], False
    if item in (0x01, 0x02):
        name = "freeze.daily.energy.%s" % ("import" if item == 1 else "export")
        return [_F("%s.%s" % (name, "total" if k == 0 else "t%d" % k), 4, 2, False, "kWh")
                for k in range(64)], True
    return None, False


@functools.lru_cache(maxsize=2048)  # the block lists are built once per DI
def fields_2007(di):
    """(fields, repeating) for a 2007 DI, or (None, False) if unknown. With repeating, the
    payload holds any number (>= 1) of whole fields from the front of the list."""
    fields = _ITEMS_2007.get(di)
    if fields is not None:
        return fields, False
    di3 = di >> 24
    if di3 == 0x00:
        return _energy_fields(di)
    if di >> 16 == 0x0506:
        return _freeze_fields(di)
    if di >> 8 == 0x1D0001 and 1 <= di & 0xFF <= 10:
        return [_F("events.trip.time", 6, kind="ymdhms")], False
    if di >> 8 == 0x1E0001 and 1 <= di & 0xFF <= 10:
        return [_F("events.close.time", 6, kind="ymdhms")], False
    if di >> 8 == 0x031100 and 1 <= di & 0xFF <= 10:
        return [_F("events.power_down.start", 6, kind="ymdhms"),
                _F("events.power_down.end", 6, kind="ymdhms")], False
    return None, False


# ---------------------------------------------------------------- DL/T 645-1997 table

_ITEMS_1997 = {
    0xB630: [_F("power.active", 3, 4, True, "kW")],
    0xB650: [_F("power.factor", 2, 3, True, None)],
    0xC010: [_F("meter.date", 4, kind="date")],
    0xC011: [_F("meter.time", 3, kind="time")],
    0xC020: [_F("status.word", 1, kind="word")],
    0xC030: [_F("meter.constant.active", 3, 0, False, "imp/kWh", kind="int")],
    0xC031: [_F("meter.constant.reactive", 3, 0, False, "imp/kvarh", kind="int")],
    0xC032: [_F("meter.number", 6, kind="digits")],
}
for _i, _ph in enumerate(_PHASES, 1):
    _ITEMS_1997[0xB610 + _i] = [_F("voltage." + _ph, 2, 0, False, "V")]
    _ITEMS_1997[0xB620 + _i] = [_F("current." + _ph, 2, 2, False, "A")]
    _ITEMS_1997[0xB630 + _i] = [_F("power.active." + _ph, 3, 4, True, "kW")]
    _ITEMS_1997[0xB650 + _i] = [_F("power.factor." + _ph, 2, 3, True, None)]
_ITEMS_1997[0xB61F] = [_ITEMS_1997[0xB610 + i][0] for i in (1, 2, 3)]
_ITEMS_1997[0xB62F] = [_ITEMS_1997[0xB620 + i][0] for i in (1, 2, 3)]
_ITEMS_1997[0xB63F] = [_ITEMS_1997[0xB630][0]] + [_ITEMS_1997[0xB630 + i][0] for i in (1, 2, 3)]

_ENERGY_1997 = {
    # DI high byte: (name, unit); DI0 high nibble 1 = forward, 2 = reverse (reference 5)
    0x90: ("energy", "kWh", ""),
    0x91: ("energy.reactive", "kvarh", ""),
    0x94: ("energy", "kWh", ".settlement1"),
    0x95: ("energy.reactive", "kvarh", ".settlement1"),
}


@functools.lru_cache(maxsize=2048)
def fields_1997(di):
    fields = _ITEMS_1997.get(di)
    if fields is not None:
        return fields, False
    hi, lo = di >> 8, di & 0xFF
    if hi >> 4 != 0x9:
        return None, False
    kind = _ENERGY_1997.get(hi)
    direction = {1: "import", 2: "export"}.get(lo >> 4)
    if kind is None or direction is None:
        # an energy-class DI (9xxx) the tables do not name: 1997 energies are unsigned
        # XXXXXX.XX (1997 has no signed combined energy), so the number is safe; it keeps
        # the identifier as its name and a unit only where the DI says kWh
        unit = "kWh" if hi in (0x90, 0x94, 0x98) else None
        return [_F("di.%04X" % di, 4, 2, False, unit)], False
    name, unit, suffix = kind
    tariff = lo & 0x0F
    if tariff == 0x0F:
        return [_F("%s.%s.%s%s" % (name, direction, TARIFF_NAMES[k], suffix), 4, 2, False,
                   unit) for k in range(5)], True
    if tariff > 4:
        return None, False
    return [_F("%s.%s.%s%s" % (name, direction, TARIFF_NAMES[tariff], suffix), 4, 2, False,
               unit)], False


# ---------------------------------------------------------------- decode and encode

def lookup(di, version=2007):
    return fields_2007(di) if version == 2007 else fields_1997(di)


def payload_length(di, version=2007, tariffs=4):
    """Expected payload bytes of a normal answer (for timeouts), or None if unknown."""
    fields, repeating = lookup(di, version)
    if fields is None:
        return None
    if repeating:
        return sum(f.size for f in fields[:tariffs + 1])
    return sum(f.size for f in fields)


def decode_values(di, payload, version=2007) -> Optional[List[Value]]:
    """Values of a read answer's payload (DI removed, -0x33 applied).

    None when the DI is unknown or the payload does not fit its format (vendor variants,
    wrong length, 'no data' FF fillers); the caller keeps the raw bytes then.
    """
    fields, repeating = lookup(di, version)
    if fields is None:
        return None
    n = len(payload)
    if repeating:
        size = fields[0].size
        count = n // size
        if n == 0 or n % size or count > len(fields):
            return None
        fields = fields[:count]
    elif n != sum(f.size for f in fields):
        return None
    out = []
    pos = 0
    try:
        for f in fields:
            out.append(f.decode(payload[pos:pos + f.size]))
            pos += f.size
    except ValueError:
        return None
    if version == 2007 and di == STATUS_WORD_3:
        out.extend(status_word3_values(out[0].value))
    elif version == 2007 and di == 0x040005FF:
        out.extend(status_word3_values(out[2].value))
    return out


def encode_values(di, values, version=2007):
    """The payload for a list of plain values in field order (the meter side: simulator)."""
    fields, repeating = lookup(di, version)
    if fields is None:
        raise KeyError("unknown DI %08X" % di)
    if repeating:
        if not 1 <= len(values) <= len(fields):
            raise ValueError("DI %08X takes 1..%d values" % (di, len(fields)))
        fields = fields[:len(values)]
    elif len(values) != len(fields):
        raise ValueError("DI %08X takes %d values" % (di, len(fields)))
    return b"".join(f.encode(v) for f, v in zip(fields, values))
