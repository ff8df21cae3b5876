"""DL/T 698.45 A-XDR data: the Data CHOICE and the small typed objects (OAD, OMD, ROAD, CSD,
RSD, TI, TSA, Scaler_Unit), decoded into exact Python values and encoded back.

Sans-I/O. Facts: ../shared/reference/dlt698.md section 4 (tags from freudshow/dlt698.45's
ASN.1 transcription `dlt698.45.asn1`, checked against the captures). Multi-byte integers are
big-endian inside the APDU; lengths are one byte below 0x80, else 0x81/0x82 + 1/2 bytes.
A value this module cannot interpret raises DataError (the codec turns it into
Unknown(reason)); it never guesses.
"""

import datetime as _dt
import struct
from typing import Any, NamedTuple, Optional, Tuple

# Data CHOICE tags (reference section 4)
NULL, ARRAY, STRUCTURE, BOOL, BIT_STRING = 0, 1, 2, 3, 4
DOUBLE_LONG, DOUBLE_LONG_UNSIGNED = 5, 6
OCTET_STRING, VISIBLE_STRING, UTF8_STRING = 9, 10, 12
INTEGER, LONG, UNSIGNED, LONG_UNSIGNED = 15, 16, 17, 18
LONG64, LONG64_UNSIGNED, ENUM, FLOAT32, FLOAT64 = 20, 21, 22, 23, 24
DATE_TIME, DATE, TIME, DATE_TIME_S = 25, 26, 27, 28
OI_T, OAD_T, ROAD_T, OMD_T, TI_T, TSA_T, MAC_T, RN_T = 80, 81, 82, 83, 84, 85, 86, 87
REGION_T, SCALER_UNIT_T, RSD_T, CSD_T, MS_T, SID_T, SID_MAC_T, COMDCB_T, RCSD_T = \
    88, 89, 90, 91, 92, 93, 94, 95, 96

MAX_DEPTH = 16                 # nested arrays/structures: hostile input stays cheap
MAX_ITEMS = 4096               # elements in one array/structure


class DataError(ValueError):
    """Bytes that are not the A-XDR data they should be (one line: what and where)."""


# ---------------------------------------------------------------- typed objects

class OAD(NamedTuple):
    """Object attribute descriptor: OI, attribute (bits 0-4 number, 5-7 feature), index."""
    oi: int
    attr: int = 2
    index: int = 0

    @classmethod
    def parse(cls, text):
        """'00100200' -> OAD(0x0010, 2, 0)."""
        t = str(text).strip()
        if len(t) != 8:
            raise ValueError("an OAD is 8 hex digits: %r" % (text,))
        v = int(t, 16)
        return cls(v >> 16, (v >> 8) & 0xFF, v & 0xFF)

    def encode(self):
        return bytes(((self.oi >> 8) & 0xFF, self.oi & 0xFF, self.attr & 0xFF,
                      self.index & 0xFF))

    @property
    def whole(self):
        """The same attribute without an element index."""
        return OAD(self.oi, self.attr, 0)

    def __str__(self):
        return "%04X%02X%02X" % (self.oi, self.attr, self.index)


class OMD(NamedTuple):
    """Object method descriptor: OI, method id, operation mode (0)."""
    oi: int
    method: int
    mode: int = 0

    def encode(self):
        return bytes(((self.oi >> 8) & 0xFF, self.oi & 0xFF, self.method & 0xFF,
                      self.mode & 0xFF))

    def __str__(self):
        return "%04X%02X%02X" % (self.oi, self.method, self.mode)


class ROAD(NamedTuple):
    oad: OAD
    oads: Tuple[OAD, ...]


class CSD(NamedTuple):
    """Column selector: an OAD, or a ROAD (record OAD with its related OADs)."""
    oad: OAD
    related: Optional[Tuple[OAD, ...]] = None     # set for the ROAD choice

    def encode(self):
        if self.related is None:
            return b"\x00" + self.oad.encode()
        return b"\x01" + self.oad.encode() + bytes((len(self.related),)) + \
            b"".join(o.encode() for o in self.related)


class RSD(NamedTuple):
    """Row selector. selector 0: none; 1: column `oad` == values[0]; 2: `oad` in
    [values[0], values[1]) step values[2]; 9: the last values[0] records. Values are
    (tag, value) pairs for 1 and 2 so they re-encode exactly."""
    selector: int
    oad: Optional[OAD] = None
    values: tuple = ()

    def encode(self):
        if self.selector == 0:
            return b"\x00"
        if self.selector == 9:
            return bytes((9, self.values[0] & 0xFF))
        if self.selector == 1:
            return b"\x01" + self.oad.encode() + encode_data(*self.values[0])
        if self.selector == 2:
            return b"\x02" + self.oad.encode() + b"".join(encode_data(*v)
                                                          for v in self.values[:3])
        raise ValueError("RSD selector %d is not built here" % self.selector)


class TI(NamedTuple):
    """Time interval: unit (0 s, 1 min, 2 h, 3 day, 4 month, 5 year) and count."""
    unit: int
    value: int


class TSA(NamedTuple):
    flag: int
    address: bytes               # as on the wire (low byte first)


class ScalerUnit(NamedTuple):
    scaler: int
    unit: int


class BitString(NamedTuple):
    """`nbits` bits; bit k (k = 0 first) is bit 7 - k % 8 of byte k // 8 (ASN.1 order)."""
    nbits: int
    data: bytes

    def bit(self, k):
        if not 0 <= k < self.nbits:
            raise IndexError("bit %d of a %d-bit string" % (k, self.nbits))
        return bool(self.data[k // 8] >> (7 - k % 8) & 1)


class Raw(NamedTuple):
    """A value whose bytes are well-formed but whose meaning is not a valid value (a
    date_time_s of FF bytes, a visible-string that is not ASCII): kept, with the reason."""
    tag: int
    data: bytes
    reason: str


class DAR(int):
    """A data-access result (reference section 3): an int with its name."""

    def __repr__(self):
        return "DAR(%d %s)" % (self, dar_name(self))


DAR_NAMES = {
    0: "success", 1: "hardware failure", 2: "temporarily unavailable",
    3: "read/write refused", 4: "object undefined", 5: "interface class mismatch",
    6: "object does not exist", 7: "type mismatch", 8: "out of range",
    9: "data block unavailable", 10: "segmented transfer cancelled",
    11: "not in segmented-transfer state", 12: "block write cancelled",
    13: "no block-write state", 14: "invalid block sequence number",
    15: "password wrong / not authorised", 16: "baud rate cannot be changed",
    17: "year time-zone count exceeded", 18: "daily period count exceeded",
    19: "tariff count exceeded", 20: "security authentication mismatch",
    21: "duplicate recharge", 22: "ESAM verification failed",
    23: "security authentication failed", 24: "customer number mismatch",
    25: "recharge count error", 26: "purchase exceeds hoarding limit",
    27: "address exception", 28: "symmetric decryption error",
    29: "asymmetric decryption error", 30: "signature error", 31: "meter suspended",
    32: "time tag invalid",
    # vendor firmware codes seen on the wire (P698 in the reference)
    252: "no reply (vendor)", 253: "bad APDU (vendor)", 254: "service unsupported (vendor)",
    255: "other",
}


def dar_name(code):
    return DAR_NAMES.get(int(code), "reserved %d" % int(code))


# ---------------------------------------------------------------- reading

class Reader:
    """A cursor over APDU bytes; every read is bounds-checked (DataError past the end)."""

    __slots__ = ("data", "pos")

    def __init__(self, data, pos=0):
        self.data = bytes(data)
        self.pos = pos

    @property
    def left(self):
        return len(self.data) - self.pos

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise DataError("needs %d bytes at offset %d, %d left" % (n, self.pos, self.left))
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self):
        if self.pos >= len(self.data):
            raise DataError("needs 1 byte at offset %d, none left" % self.pos)
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uint(self, n):
        return int.from_bytes(self.take(n), "big")

    def sint(self, n):
        return int.from_bytes(self.take(n), "big", signed=True)

    def length(self):
        """A-XDR length: one byte below 0x80, else 0x80|k and k big-endian bytes (k 1..2)."""
        b = self.u8()
        if b < 0x80:
            return b
        k = b & 0x7F
        if k == 0 or k > 2:
            raise DataError("length form %02X not supported" % b)
        return self.uint(k)

    def oad(self):
        v = self.uint(4)
        return OAD(v >> 16, (v >> 8) & 0xFF, v & 0xFF)

    def omd(self):
        v = self.uint(4)
        return OMD(v >> 16, (v >> 8) & 0xFF, v & 0xFF)

    def csd(self):
        choice = self.u8()
        if choice == 0:
            return CSD(self.oad())
        if choice == 1:
            oad = self.oad()
            n = self.length()
            return CSD(oad, tuple(self.oad() for _ in range(n)))
        raise DataError("CSD choice %d" % choice)

    def rcsd(self):
        n = self.length()
        if n > MAX_ITEMS:
            raise DataError("RCSD of %d columns" % n)
        return tuple(self.csd() for _ in range(n))

    def rsd(self):
        sel = self.u8()
        if sel == 0:
            return RSD(0)
        if sel == 1:
            return RSD(1, self.oad(), (self.tagged(),))
        if sel == 2:
            return RSD(2, self.oad(), (self.tagged(), self.tagged(), self.tagged()))
        if sel == 9:
            return RSD(9, None, (self.u8(),))
        raise DataError("RSD selector %d not interpreted" % sel)

    def tagged(self):
        """One Data as (tag, value): what RSD keeps so it re-encodes exactly."""
        start = self.pos
        tag = self.data[start] if start < len(self.data) else None
        value = self.data_value()
        return tag, value

    def date_time_s(self):
        b = self.take(7)
        return _date_time_s(b)

    def _same_ints(self, n):
        """n elements that are all the same integer type (energy by tariff, voltages by
        phase: the usual arrays) in one struct call, or None to read them one by one."""
        data, pos = self.data, self.pos
        if not n or pos >= len(data):
            return None
        fmt = _INT_FORMATS.get(data[pos])
        if fmt is None:
            return None
        step = _STRUCT_SIZES[fmt] + 1
        end = pos + n * step
        if end > len(data) or data[pos:end:step] != bytes((data[pos],)) * n:
            return None
        items = list(_struct_for(fmt, n).unpack_from(data, pos))
        self.pos = end
        return items

    def data_value(self, depth=0):
        """One Data (tag + content) as a Python value."""
        if depth > MAX_DEPTH:
            raise DataError("data nested deeper than %d" % MAX_DEPTH)
        tag = self.u8()
        if tag == NULL:
            return None
        if tag in (ARRAY, STRUCTURE):
            n = self.length()
            if n > MAX_ITEMS or n > self.left:
                raise DataError("%s of %d elements with %d bytes left"
                                % ("array" if tag == ARRAY else "structure", n, self.left))
            items = self._same_ints(n)
            if items is None:
                items = [self.data_value(depth + 1) for _ in range(n)]
            return items if tag == ARRAY else tuple(items)
        fixed = _FIXED.get(tag)
        if fixed is not None:
            size, conv = fixed
            return conv(self.take(size))
        if tag == BIT_STRING:
            nbits = self.length()
            return BitString(nbits, self.take((nbits + 7) // 8))
        if tag in (OCTET_STRING, MAC_T, RN_T):
            return self.take(self.length())
        if tag in (VISIBLE_STRING, UTF8_STRING):
            b = self.take(self.length())
            try:
                return b.decode("ascii" if tag == VISIBLE_STRING else "utf-8")
            except UnicodeDecodeError:
                return Raw(tag, b, "not %s text" % ("ASCII" if tag == VISIBLE_STRING
                                                    else "UTF-8"))
        if tag == DATE_TIME:
            b = self.take(10)
            return _date_time(b)
        if tag == DATE:
            b = self.take(5)
            try:
                return _dt.date(int.from_bytes(b[:2], "big"), b[2], b[3])
            except ValueError:
                return Raw(tag, b, "not a valid date")
        if tag == TIME:
            b = self.take(3)
            try:
                return _dt.time(b[0], b[1], b[2])
            except ValueError:
                return Raw(tag, b, "not a valid time")
        if tag == DATE_TIME_S:
            return self.date_time_s()
        if tag == ROAD_T:
            oad = self.oad()
            n = self.length()
            return ROAD(oad, tuple(self.oad() for _ in range(n)))
        if tag == TI_T:
            unit = self.u8()
            return TI(unit, self.uint(2))
        if tag == TSA_T:
            n = self.length()
            b = self.take(n)
            if not b:
                raise DataError("empty TSA")
            return TSA(b[0], b[1:])
        if tag == SCALER_UNIT_T:
            return ScalerUnit(self.sint(1), self.u8())
        if tag == CSD_T:
            return self.csd()
        if tag == RCSD_T:
            return self.rcsd()
        if tag == RSD_T:
            return self.rsd()
        if tag == SID_T:
            return (self.uint(4), self.take(self.length()))
        if tag == SID_MAC_T:
            return ((self.uint(4), self.take(self.length())), self.take(self.length()))
        if tag == COMDCB_T:
            return tuple(self.take(5))
        if tag == REGION_T:
            unit = self.u8()
            return (unit, self.data_value(depth + 1), self.data_value(depth + 1))
        raise DataError("data type %d not interpreted" % tag)


def _date_time_s(b):
    try:
        return _dt.datetime(int.from_bytes(b[:2], "big"), b[2], b[3], b[4], b[5], b[6])
    except ValueError:
        return Raw(DATE_TIME_S, bytes(b), "not a valid date_time_s")


def _date_time(b):
    # year(2) month day weekday hour minute second milliseconds(2)
    try:
        ms = int.from_bytes(b[8:10], "big")
        if ms > 999:
            raise ValueError
        return _dt.datetime(int.from_bytes(b[:2], "big"), b[2], b[3], b[5], b[6], b[7],
                            ms * 1000)
    except ValueError:
        return Raw(DATE_TIME, bytes(b), "not a valid date_time")


def _signed(n):
    return lambda b: int.from_bytes(b, "big", signed=True)


def _unsigned(n):
    return lambda b: int.from_bytes(b, "big")


_FIXED = {
    BOOL: (1, lambda b: bool(b[0])),
    DOUBLE_LONG: (4, _signed(4)), DOUBLE_LONG_UNSIGNED: (4, _unsigned(4)),
    INTEGER: (1, _signed(1)), LONG: (2, _signed(2)), UNSIGNED: (1, _unsigned(1)),
    LONG_UNSIGNED: (2, _unsigned(2)), LONG64: (8, _signed(8)),
    LONG64_UNSIGNED: (8, _unsigned(8)), ENUM: (1, _unsigned(1)),
    FLOAT32: (4, lambda b: struct.unpack(">f", b)[0]),
    FLOAT64: (8, lambda b: struct.unpack(">d", b)[0]),
    OI_T: (2, _unsigned(2)),
    OAD_T: (4, lambda b: Reader(b).oad()),
    OMD_T: (4, lambda b: Reader(b).omd()),
}


# integer types read several at a time by Reader._same_ints (struct codes, big-endian)
_INT_FORMATS = {DOUBLE_LONG: "i", DOUBLE_LONG_UNSIGNED: "I", INTEGER: "b", LONG: "h",
                UNSIGNED: "B", LONG_UNSIGNED: "H", LONG64: "q", LONG64_UNSIGNED: "Q",
                ENUM: "B"}
_STRUCT_SIZES = {"i": 4, "I": 4, "b": 1, "h": 2, "B": 1, "H": 2, "q": 8, "Q": 8}
_STRUCTS = {}


def _struct_for(fmt, n):
    """struct for n tagged elements: skip the tag byte, then the value, n times."""
    key = (fmt, n)
    st = _STRUCTS.get(key)
    if st is None:
        st = struct.Struct(">" + ("x" + fmt) * n)
        if len(_STRUCTS) < 256:              # the usual shapes only: bounded memory
            _STRUCTS[key] = st
    return st


def decode_data(data):
    """(value, bytes used) of one Data at the start of `data`."""
    r = Reader(data)
    return r.data_value(), r.pos


# ---------------------------------------------------------------- writing

def encode_length(n):
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((0x81, n))
    if n <= 0xFFFF:
        return bytes((0x82, n >> 8, n & 0xFF))
    raise ValueError("A-XDR length %d too large" % n)


_INT_SIZES = {DOUBLE_LONG: (4, True), DOUBLE_LONG_UNSIGNED: (4, False), INTEGER: (1, True),
              LONG: (2, True), UNSIGNED: (1, False), LONG_UNSIGNED: (2, False),
              LONG64: (8, True), LONG64_UNSIGNED: (8, False), ENUM: (1, False),
              OI_T: (2, False)}


def encode_data(tag, value=None):
    """One Data of an explicit type: encode_data(DOUBLE_LONG_UNSIGNED, 123456). Arrays and
    structures take a list of (tag, value) pairs."""
    if tag == NULL:
        return b"\x00"
    if tag in (ARRAY, STRUCTURE):
        items = list(value)
        return bytes((tag,)) + encode_length(len(items)) + b"".join(encode_data(*i)
                                                                     for i in items)
    if tag in _INT_SIZES:
        size, signed = _INT_SIZES[tag]
        return bytes((tag,)) + int(value).to_bytes(size, "big", signed=signed)
    if tag == BOOL:
        return bytes((tag, 1 if value else 0))
    if tag in (OCTET_STRING, MAC_T, RN_T):
        b = bytes(value)
        return bytes((tag,)) + encode_length(len(b)) + b
    if tag in (VISIBLE_STRING, UTF8_STRING):
        b = value.encode("ascii" if tag == VISIBLE_STRING else "utf-8")
        return bytes((tag,)) + encode_length(len(b)) + b
    if tag == BIT_STRING:
        bs = value if isinstance(value, BitString) else BitString(len(value) * 8, value)
        return bytes((tag,)) + encode_length(bs.nbits) + bytes(bs.data)
    if tag == DATE_TIME_S:
        return bytes((tag,)) + encode_date_time_s(value)
    if tag == DATE_TIME:
        v = value
        return bytes((tag,)) + v.year.to_bytes(2, "big") + bytes(
            (v.month, v.day, v.isoweekday() % 7, v.hour, v.minute, v.second)) + \
            (v.microsecond // 1000).to_bytes(2, "big")
    if tag in (OAD_T, OMD_T):
        return bytes((tag,)) + value.encode()
    if tag == SCALER_UNIT_T:
        return bytes((tag,)) + value.scaler.to_bytes(1, "big", signed=True) + \
            bytes((value.unit,))
    if tag == TI_T:
        return bytes((tag, value.unit)) + value.value.to_bytes(2, "big")
    raise ValueError("encoding data type %d is not supported" % tag)


def encode_date_time_s(when):
    if not isinstance(when, _dt.datetime):
        raise TypeError("date_time_s needs a datetime")
    if not 0 <= when.year <= 0xFFFF:
        raise ValueError("year out of range")
    return when.year.to_bytes(2, "big") + bytes((when.month, when.day, when.hour, when.minute,
                                                 when.second))


Value = Any       # what data_value returns: None, int, bool, bytes, str, list, tuple, ...
