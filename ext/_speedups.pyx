# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of protocols/_pyframing.py: same names, signatures and results.

The hot path of the gateway: every byte from every RS-485 line goes through Scanner.feed.
"""

from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memchr, memcpy, memmove
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from protocols._pyframing import bcd_to_int as _py_bcd_to_int

cdef enum:
    DLT645 = 0
    MODBUS = 1
    DLT698 = 2

MAX_DLT645_FRAME = 12 + 255
MAX_MODBUS_FRAME = 256
MAX_DLT698_FRAME = 0x3FFF + 2

cdef unsigned short CRC_TABLE[256]
# X.25 slicing-by-8: X25_SLICE[k][b] is byte b's contribution with k more bytes after it
# (X25_SLICE[0] is the byte-wise table); 8 bytes per step instead of one dependent lookup
# per byte (the DL/T 698.45 scanner checks HCS and FCS of every frame)
cdef unsigned short X25_SLICE[8][256]
# DL/T 645 address bytes: packed BCD or AA (wildcard, short-address padding)
cdef unsigned char ADDRESS_BYTE[256]


cdef void _init_crc_table():
    cdef int i, k
    cdef unsigned short crc
    for i in range(256):
        crc = i
        for k in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc = crc >> 1
        CRC_TABLE[i] = crc
        crc = i
        for k in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0x8408
            else:
                crc = crc >> 1
        X25_SLICE[0][i] = crc
        ADDRESS_BYTE[i] = 1 if (i == 0xAA or ((i >> 4) <= 9 and (i & 0x0F) <= 9)) else 0
    for k in range(1, 8):
        for i in range(256):
            crc = X25_SLICE[k - 1][i]
            X25_SLICE[k][i] = (crc >> 8) ^ X25_SLICE[0][crc & 0xFF]


_init_crc_table()


cdef inline unsigned short _crc(const unsigned char* p, Py_ssize_t n) nogil:
    cdef unsigned short crc = 0xFFFF
    cdef Py_ssize_t i
    for i in range(n):
        crc = (crc >> 8) ^ CRC_TABLE[(crc ^ p[i]) & 0xFF]
    return crc


cdef inline unsigned short _x25_run(unsigned short crc, const unsigned char* p,
                                   Py_ssize_t n) nogil:
    """The X.25 register after n more bytes (no final xor): HCS and FCS share a prefix."""
    cdef unsigned long long v
    cdef Py_ssize_t i = 0
    while n - i >= 8:
        v = (<unsigned long long>p[i] | <unsigned long long>p[i + 1] << 8 |
             <unsigned long long>p[i + 2] << 16 | <unsigned long long>p[i + 3] << 24 |
             <unsigned long long>p[i + 4] << 32 | <unsigned long long>p[i + 5] << 40 |
             <unsigned long long>p[i + 6] << 48 | <unsigned long long>p[i + 7] << 56) ^ crc
        crc = (X25_SLICE[7][v & 0xFF] ^ X25_SLICE[6][(v >> 8) & 0xFF] ^
               X25_SLICE[5][(v >> 16) & 0xFF] ^ X25_SLICE[4][(v >> 24) & 0xFF] ^
               X25_SLICE[3][(v >> 32) & 0xFF] ^ X25_SLICE[2][(v >> 40) & 0xFF] ^
               X25_SLICE[1][(v >> 48) & 0xFF] ^ X25_SLICE[0][v >> 56])
        i += 8
    while i < n:
        crc = (crc >> 8) ^ X25_SLICE[0][(crc ^ p[i]) & 0xFF]
        i += 1
    return crc


cdef inline unsigned short _x25(const unsigned char* p, Py_ssize_t n) nogil:
    return _x25_run(0xFFFF, p, n) ^ 0xFFFF


def dlt645_checksum(const unsigned char[:] data not None):
    """Sum mod 256 of the bytes (DL/T 645 CS covers first 0x68 .. last data byte)."""
    cdef unsigned int s = 0
    cdef Py_ssize_t i
    for i in range(data.shape[0]):
        s += data[i]
    return s & 0xFF


def crc16_modbus(const unsigned char[::1] data not None):
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF); sent low byte first."""
    if data.shape[0] == 0:
        return 0xFFFF
    return _crc(&data[0], data.shape[0])


def crc16_x25(const unsigned char[::1] data not None):
    """CRC-16/X.25, the PPP FCS-16 (poly 0x1021 reflected, init 0xFFFF, xorout 0xFFFF):
    DL/T 698.45's HCS and FCS, sent low byte first. crc16_x25(b"123456789") == 0x906E."""
    if data.shape[0] == 0:
        return 0x0000
    return _x25(&data[0], data.shape[0])


def add_33(const unsigned char[:] data not None):
    """DL/T 645 transmit offset: every data byte + 0x33 mod 256."""
    cdef Py_ssize_t i, n = data.shape[0]
    cdef bytearray out = bytearray(n)
    cdef unsigned char* o = out
    for i in range(n):
        o[i] = <unsigned char>(data[i] + 0x33)
    return bytes(out)


def sub_33(const unsigned char[:] data not None):
    """DL/T 645 receive offset: every data byte - 0x33 mod 256."""
    cdef Py_ssize_t i, n = data.shape[0]
    cdef bytearray out = bytearray(n)
    cdef unsigned char* o = out
    for i in range(n):
        o[i] = <unsigned char>(data[i] - 0x33)
    return bytes(out)


def bcd_to_int(const unsigned char[:] data not None, bint signed=False):
    """Packed BCD, low byte first, to int. With signed, bit 7 of the last byte is the sign.

    Raises ValueError on a nibble above 9 (meters send FF for 'no data'; never guess).
    """
    cdef Py_ssize_t n = data.shape[0], i
    cdef unsigned char b, hi, lo
    cdef bint negative = False
    cdef unsigned long long v = 0
    if n > 9:
        # beyond 18 digits (never a meter value): the twin's arbitrary-precision path
        return _py_bcd_to_int(bytes(data), signed)
    for i in range(n - 1, -1, -1):
        b = data[i]
        if signed and i == n - 1:
            negative = (b & 0x80) != 0
            b &= 0x7F
        hi = b >> 4
        lo = b & 0x0F
        if hi > 9 or lo > 9:
            raise ValueError("not BCD: %s" % bytes(data).hex(" "))
        v = v * 100 + hi * 10 + lo
    if negative:
        return -<long long>v
    return v


def int_to_bcd(value, Py_ssize_t nbytes, bint signed=False):
    """int to packed BCD of nbytes, low byte first; the sign goes to bit 7 of the last byte."""
    negative = value < 0
    if negative and not signed:
        raise ValueError("negative value for an unsigned field")
    v = -value if negative else value
    cdef bytearray out = bytearray(nbytes)
    cdef Py_ssize_t i
    for i in range(nbytes):
        v, r = divmod(v, 100)
        out[i] = ((r // 10) << 4) | (r % 10)
    if v or (signed and nbytes and out[nbytes - 1] & 0x80):
        raise ValueError("%d does not fit in %d BCD bytes" % (value, nbytes))
    if negative:
        out[nbytes - 1] |= 0x80
    return bytes(out)


cdef class Scanner:
    """Yields complete, checked frames from a byte stream that arrives in arbitrary pieces.

    See protocols/_pyframing.py for the rules; this is the same algorithm over a C buffer.
    """
    cdef unsigned char* _buf
    cdef Py_ssize_t _start, _end, _cap
    cdef int _proto
    cdef bint _requests
    cdef readonly unsigned long long frames, bytes_discarded, preamble_bytes
    cdef readonly unsigned long long checksum_errors, end_errors

    def __cinit__(self, protocol="dlt645", requests=False):
        if protocol == "dlt645":
            self._proto = DLT645
        elif protocol == "modbus":
            self._proto = MODBUS
        elif protocol == "dlt698":
            self._proto = DLT698
        else:
            raise ValueError("unknown protocol %r (dlt645, dlt698 or modbus)" % (protocol,))
        self._requests = bool(requests)
        self._cap = 1024
        self._buf = <unsigned char*>malloc(self._cap)
        if self._buf == NULL:
            raise MemoryError()
        self._start = 0
        self._end = 0

    def __dealloc__(self):
        free(self._buf)

    @property
    def protocol(self):
        if self._proto == DLT645:
            return "dlt645"
        if self._proto == DLT698:
            return "dlt698"
        return "modbus"

    @property
    def pending(self):
        return self._end - self._start

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
        cdef Py_ssize_t n = self._end - self._start
        self._discard(self._start, self._end)
        self._start = 0
        self._end = 0
        return n

    cdef inline void _discard(self, Py_ssize_t start, Py_ssize_t stop):
        cdef Py_ssize_t k, fe = 0
        for k in range(start, stop):
            if self._buf[k] == 0xFE:
                fe += 1
        self.preamble_bytes += fe
        self.bytes_discarded += stop - start - fe

    cdef inline int _check_dlt645(self, Py_ssize_t i, Py_ssize_t end, Py_ssize_t* n):
        cdef const unsigned char* p = self._buf + i
        cdef Py_ssize_t avail = end - i, k, m
        cdef unsigned int s = 0
        if avail < 8:
            return 0
        if p[7] != 0x68:
            return -1
        for k in range(1, 7):
            if not ADDRESS_BYTE[p[k]]:
                return -1       # noise: no meter has this address
        if avail < 10:
            return 0
        m = p[9] + 12
        n[0] = m
        if avail < m:
            return 0
        for k in range(m - 2):
            s += p[k]
        if (s & 0xFF) != p[m - 2]:
            return -2
        if p[m - 1] != 0x16:
            return -3
        return 1

    cdef inline int _check_dlt698(self, Py_ssize_t i, Py_ssize_t end, Py_ssize_t* n):
        cdef const unsigned char* p = self._buf + i
        cdef Py_ssize_t avail = end - i, alen, m
        cdef unsigned int length
        cdef unsigned short crc, head
        if avail < 5:
            return 0
        length = p[1] | (<unsigned int>p[2] << 8)
        if (length & 0xC000) or ((p[3] & 0x07) != 1 and (p[3] & 0x07) != 3):
            return -1
        alen = (p[4] & 0x0F) + 1
        m = length + 2
        if m < 12 + alen:
            return -1
        if avail < 8 + alen:
            return 0
        head = _x25_run(0xFFFF, p + 1, 5 + alen)
        crc = head ^ 0xFFFF
        n[0] = m
        if p[6 + alen] != (crc & 0xFF) or p[7 + alen] != (crc >> 8):
            return -2
        if avail < m:
            return 0
        # the FCS covers the header too: carry on from the header's register
        crc = _x25_run(head, p + 6 + alen, m - 9 - alen) ^ 0xFFFF
        if p[m - 3] != (crc & 0xFF) or p[m - 2] != (crc >> 8):
            return -2
        if p[m - 1] != 0x16:
            return -3
        return 1

    cdef inline Py_ssize_t _modbus_length(self, Py_ssize_t i, Py_ssize_t end):
        cdef const unsigned char* p = self._buf + i
        cdef Py_ssize_t avail = end - i
        cdef unsigned char unit, fn, base, count
        if avail < 2:
            return 0
        unit = p[0]
        fn = p[1]
        if unit == 0 or unit > 247:
            return -1
        if fn & 0x80:
            base = fn & 0x7F
            if (1 <= base <= 6) or base == 15 or base == 16:
                return 5
            return -1
        if self._requests:
            if 1 <= fn <= 6:
                return 8
            if fn == 15 or fn == 16:
                if avail < 7:
                    return 0
                count = p[6]
                if count == 0 or count > 246:   # 123 registers or 1968 coils at most
                    return -1
                return 9 + count
            return -1
        if 1 <= fn <= 4:
            if avail < 3:
                return 0
            count = p[2]
            if count == 0 or count > 250:
                return -1
            return 5 + count
        if fn == 5 or fn == 6 or fn == 15 or fn == 16:
            return 8
        return -1

    cdef inline int _check_modbus(self, Py_ssize_t i, Py_ssize_t end, Py_ssize_t* n):
        cdef Py_ssize_t m = self._modbus_length(i, end)
        cdef unsigned short crc
        cdef const unsigned char* p
        if m <= 0:
            return <int>m
        n[0] = m
        if end - i < m:
            return 0
        p = self._buf + i
        crc = _crc(p, m - 2)
        if p[m - 2] != (crc & 0xFF) or p[m - 1] != (crc >> 8):
            return -2
        return 1

    cdef inline int _check(self, Py_ssize_t i, Py_ssize_t end, Py_ssize_t* n):
        if self._proto == DLT645:
            return self._check_dlt645(i, end, n)
        if self._proto == DLT698:
            return self._check_dlt698(i, end, n)
        return self._check_modbus(i, end, n)

    cdef inline Py_ssize_t _next_start(self, Py_ssize_t i, Py_ssize_t end):
        cdef const unsigned char* hit
        if self._proto != MODBUS and i < end:
            hit = <const unsigned char*>memchr(self._buf + i, 0x68, end - i)
            return end if hit == NULL else hit - self._buf
        return i

    cdef Py_ssize_t _lookahead(self, Py_ssize_t j, Py_ssize_t end):
        cdef Py_ssize_t n = 0
        while j < end:
            j = self._next_start(j, end)
            if j >= end:
                return -1
            if self._check(j, end, &n) == 1:
                return j
            j += 1
        return -1

    cdef void _append(self, const unsigned char* data, Py_ssize_t n) except *:
        cdef Py_ssize_t live = self._end - self._start
        cdef Py_ssize_t need
        cdef unsigned char* nb
        if n == 0:
            return
        if self._start > 0 and self._end + n > self._cap:
            memmove(self._buf, self._buf + self._start, live)
            self._start = 0
            self._end = live
        need = self._end + n
        if need > self._cap:
            while self._cap < need:
                self._cap *= 2
            nb = <unsigned char*>realloc(self._buf, self._cap)
            if nb == NULL:
                raise MemoryError()
            self._buf = nb
        memcpy(self._buf + self._end, data, n)
        self._end += n

    def feed(self, data):
        """Frames complete in the bytes fed so far. `data` is a contiguous bytes-like object
        (bytes, bytearray, a C-contiguous memoryview): a strided or reversed view is
        refused, never read past or in the wrong order; None is a TypeError, as in the twin."""
        if type(data) is bytes:       # what a serial port reads: no buffer view to set up
            self._append(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        elif data is None:
            raise TypeError("feed() takes a bytes-like object, not None")
        else:
            self._append_view(data)
        return self._frames()

    cdef void _append_view(self, const unsigned char[::1] data) except *:
        if data.shape[0]:
            self._append(&data[0], data.shape[0])

    cdef list _frames(self):
        cdef list out = []
        cdef Py_ssize_t pos = self._start, end = self._end, i, j, n = 0
        cdef int status
        while pos < end:
            i = self._next_start(pos, end)
            if i > pos:
                self._discard(pos, i)
                pos = i
                if i >= end:
                    break
            status = self._check(i, end, &n)
            if status == 1:
                out.append(<bytes>self._buf[i:i + n])
                self.frames += 1
                pos = i + n
            elif status == 0:
                j = self._lookahead(i + 1, end)
                if j < 0:
                    break
                self._discard(i, j)
                pos = j
            else:
                if status == -2:
                    self.checksum_errors += 1
                elif status == -3:
                    self.end_errors += 1
                self._discard(i, i + 1)
                pos = i + 1
        if pos >= end:
            self._start = 0
            self._end = 0
        else:
            self._start = pos
        return out
