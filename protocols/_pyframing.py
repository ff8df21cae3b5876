"""Pure-Python twin of ext/_speedups.pyx: stream scanner, checksums, BCD, +0x33 offset.

Same names, signatures and results as the compiled module; protocols.framing picks one.
Keep both in step: tests/test_framing.py runs every test over both and compares them on
random streams.
"""

DLT645 = 0
MODBUS = 1
DLT698 = 2

_PROTOCOLS = {"dlt645": DLT645, "modbus": MODBUS, "dlt698": DLT698}
_NAMES = {v: k for k, v in _PROTOCOLS.items()}

# Largest frames: DL/T 645 is 12 + L (L <= 255); a Modbus RTU ADU is at most 256 bytes;
# a DL/T 698.45 link frame is L + 2 with L in bits 0-13 of its length field.
MAX_DLT645_FRAME = 12 + 255
MAX_MODBUS_FRAME = 256
MAX_DLT698_FRAME = 0x3FFF + 2


def _crc_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def _x25_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_X25_TABLE = _x25_table()

# DL/T 645 address bytes: packed BCD, or AA (the wildcard, and the padding of a short
# address: reference dlt645.md 1.3). A candidate header with any other byte is noise.
_ADDRESS_BYTE = bytes(1 if b == 0xAA or (b >> 4 <= 9 and b & 0x0F <= 9) else 0
                      for b in range(256))


def _octets(data, contiguous=False):
    """`data` as the compiled twin's typed memoryviews take it: a one-dimensional buffer of
    unsigned bytes. A list, a tuple or None is a TypeError, another item type or shape a
    ValueError, and (where `contiguous`) a strided or reversed view a BufferError."""
    m = memoryview(data)
    if m.ndim != 1 or m.format not in ("B", "c"):
        raise ValueError("Buffer dtype mismatch: a one-dimensional buffer of unsigned bytes "
                         "is required, not format %r in %d dimensions" % (m.format, m.ndim))
    if contiguous and not m.c_contiguous:
        raise BufferError("memoryview: underlying buffer is not C-contiguous")
    return m if m.format == "B" else memoryview(bytes(m))


def dlt645_checksum(data):
    """Sum mod 256 of the bytes (DL/T 645 CS covers first 0x68 .. last data byte)."""
    return sum(_octets(data)) & 0xFF


def crc16_modbus(data):
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for b in _octets(data, contiguous=True):
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


def crc16_x25(data):
    """CRC-16/X.25, the PPP FCS-16 (poly 0x1021 reflected, init 0xFFFF, xorout 0xFFFF):
    DL/T 698.45's HCS and FCS, sent low byte first. crc16_x25(b"123456789") == 0x906E."""
    crc = 0xFFFF
    table = _X25_TABLE
    for b in _octets(data, contiguous=True):
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFF


def add_33(data):
    """DL/T 645 transmit offset: every data byte + 0x33 mod 256."""
    return bytes((b + 0x33) & 0xFF for b in _octets(data))


def sub_33(data):
    """DL/T 645 receive offset: every data byte - 0x33 mod 256."""
    return bytes((b - 0x33) & 0xFF for b in _octets(data))


def bcd_to_int(data, signed=False):
    """Packed BCD, low byte first, to int. With signed, bit 7 of the last byte is the sign.

    Raises ValueError on a nibble above 9 (meters send FF for 'no data'; never guess).
    """
    data = _octets(data)
    value = 0
    n = len(data)
    negative = False
    for i in range(n - 1, -1, -1):
        b = data[i]
        if signed and i == n - 1:
            negative = bool(b & 0x80)
            b &= 0x7F
        hi = b >> 4
        lo = b & 0x0F
        if hi > 9 or lo > 9:
            raise ValueError("not BCD: %s" % bytes(data).hex(" "))
        value = value * 100 + hi * 10 + lo
    return -value if negative else value


def int_to_bcd(value, nbytes, signed=False):
    """int to packed BCD of nbytes, low byte first; the sign goes to bit 7 of the last byte."""
    negative = value < 0
    if negative and not signed:
        raise ValueError("negative value for an unsigned field")
    v = -value if negative else value
    out = bytearray(nbytes)
    for i in range(nbytes):
        v, r = divmod(v, 100)
        out[i] = ((r // 10) << 4) | (r % 10)
    if v or (signed and nbytes and out[-1] & 0x80):
        raise ValueError("%d does not fit in %d BCD bytes" % (value, nbytes))
    if negative:
        out[-1] |= 0x80
    return bytes(out)


class Scanner:
    """Yields complete, checked frames from a byte stream that arrives in arbitrary pieces.

    DL/T 645: frames are found by `68 a0..a5 68` with every address byte BCD or AA and
    positioned from the length byte only (data bytes are +0x33 and can be 0x68 or 0x16); CS
    and the 0x16 end byte are checked.
    Modbus RTU: the length comes from the function code (and byte count); the CRC is checked.
    DL/T 698.45: `68 L L C AF A.. CA HCS HCS`, positioned from the 14-bit length field (bit 14,
    the kilobyte unit, and bit 15 refuse the candidate: see docs/frame-layer.md), the
    function code (1 or 3) and the address length nibble; the HCS is checked as soon as the
    header is in (so a bogus 0x68 never makes the scanner wait for a long body), then the
    FCS and the 0x16 end byte. 0xFE wake-up bytes before it are counted as preamble.
    A candidate that fails its check costs one byte, never the valid frame after it. A
    candidate still waiting for bytes does not hold back a complete valid frame that starts
    inside it. Returned frames are bytes without preamble. Memory stays bounded.
    """

    def __init__(self, protocol="dlt645", requests=False):
        try:
            self._proto = _PROTOCOLS[protocol]
        except KeyError:
            raise ValueError("unknown protocol %r (dlt645, dlt698 or modbus)"
                             % (protocol,)) from None
        self._requests = bool(requests)
        self._buf = bytearray()
        self.frames = 0
        self.bytes_discarded = 0
        self.preamble_bytes = 0
        self.checksum_errors = 0
        self.end_errors = 0

    @property
    def protocol(self):
        return _NAMES[self._proto]

    @property
    def pending(self):
        return len(self._buf)

    def stats(self):
        return {
            "frames": self.frames,
            "bytes_discarded": self.bytes_discarded,
            "preamble_bytes": self.preamble_bytes,
            "checksum_errors": self.checksum_errors,
            "end_errors": self.end_errors,
        }

    def flush(self):
        """Drops the bytes still waiting (end of a transaction); counts and returns them."""
        n = len(self._buf)
        self._discard(self._buf, 0, n)
        del self._buf[:]
        return n

    def _discard(self, buf, start, stop):
        if stop > start:
            fe = buf.count(0xFE, start, stop)
            self.preamble_bytes += fe
            self.bytes_discarded += stop - start - fe

    # -- per-protocol checks: 1 = valid frame of length n, 0 = need more bytes, -1 = not a frame

    def _check_dlt645(self, buf, i, end):
        if end - i < 8:
            return 0, 0
        if buf[i + 7] != 0x68:
            return -1, 0
        addr = _ADDRESS_BYTE
        for k in range(i + 1, i + 7):
            if not addr[buf[k]]:
                return -1, 0        # noise: no meter has this address
        if end - i < 10:
            return 0, 0
        n = buf[i + 9] + 12
        if end - i < n:
            return 0, n
        if sum(buf[i:i + n - 2]) & 0xFF != buf[i + n - 2]:
            return -2, n
        if buf[i + n - 1] != 0x16:
            return -3, n
        return 1, n

    def _check_dlt698(self, buf, i, end):
        if end - i < 5:
            return 0, 0
        length = buf[i + 1] | buf[i + 2] << 8
        if length & 0xC000 or buf[i + 3] & 0x07 not in (1, 3):
            return -1, 0            # length unit bit / reserved bit, or no function code
        alen = (buf[i + 4] & 0x0F) + 1
        n = length + 2
        if n < 12 + alen:           # 68 L L C AF A.. CA HCS HCS, >= 1 byte, FCS FCS 16
            return -1, 0
        if end - i < 8 + alen:
            return 0, 0
        hcs = crc16_x25(buf[i + 1:i + 6 + alen])
        if buf[i + 6 + alen] != hcs & 0xFF or buf[i + 7 + alen] != hcs >> 8:
            return -2, n
        if end - i < n:
            return 0, n
        fcs = crc16_x25(buf[i + 1:i + n - 3])
        if buf[i + n - 3] != fcs & 0xFF or buf[i + n - 2] != fcs >> 8:
            return -2, n
        if buf[i + n - 1] != 0x16:
            return -3, n
        return 1, n

    def _modbus_length(self, buf, i, end):
        """Expected ADU length at i, 0 if more bytes are needed, -1 if no frame starts here."""
        if end - i < 2:
            return 0
        unit = buf[i]
        fn = buf[i + 1]
        if unit == 0 or unit > 247:
            return -1
        if fn & 0x80:
            return 5 if (fn & 0x7F) in (1, 2, 3, 4, 5, 6, 15, 16) else -1
        if self._requests:
            if fn in (1, 2, 3, 4, 5, 6):
                return 8
            if fn in (15, 16):
                if end - i < 7:
                    return 0
                count = buf[i + 6]
                if count == 0 or count > 246:   # 123 registers or 1968 coils at most
                    return -1
                return 9 + count
            return -1
        if fn in (1, 2, 3, 4):
            if end - i < 3:
                return 0
            count = buf[i + 2]
            if count == 0 or count > 250:
                return -1
            return 5 + count
        if fn in (5, 6, 15, 16):
            return 8
        return -1

    def _check_modbus(self, buf, i, end):
        n = self._modbus_length(buf, i, end)
        if n <= 0:
            return n, 0
        if end - i < n:
            return 0, n
        crc = crc16_modbus(buf[i:i + n - 2])
        if buf[i + n - 2] != crc & 0xFF or buf[i + n - 1] != crc >> 8:
            return -2, n
        return 1, n

    def _next_start(self, buf, i, end):
        if self._proto != MODBUS:
            j = buf.find(0x68, i, end)
            return end if j < 0 else j
        return i

    def feed(self, data):
        buf = self._buf
        buf += data
        end = len(buf)
        out = []
        proto = self._proto
        check = (self._check_dlt645 if proto == DLT645 else
                 self._check_dlt698 if proto == DLT698 else self._check_modbus)
        pos = 0
        while pos < end:
            i = self._next_start(buf, pos, end)
            if i > pos:
                self._discard(buf, pos, i)
                pos = i
                if i >= end:
                    break
            status, n = check(buf, i, end)
            if status == 1:
                out.append(bytes(buf[i:i + n]))
                self.frames += 1
                pos = i + n
            elif status == 0:
                # Waiting for more bytes: unless a complete valid frame starts inside.
                j = self._lookahead(buf, i + 1, end, check)
                if j < 0:
                    break
                self._discard(buf, i, j)
                pos = j
            else:
                if status == -2:
                    self.checksum_errors += 1
                elif status == -3:
                    self.end_errors += 1
                self._discard(buf, i, i + 1)
                pos = i + 1
        del buf[:pos]
        return out

    def _lookahead(self, buf, start, end, check):
        j = start
        while j < end:
            j = self._next_start(buf, j, end)
            if j >= end:
                return -1
            if check(buf, j, end)[0] == 1:
                return j
            j += 1
        return -1
