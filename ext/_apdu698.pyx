# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of the DL/T 698.45 read path of protocols/dlt698.py and dlt698_data.py.

What a poll's answer goes through, in C: `frame_from_scanner`, `decode` / `decode_apdu` of
GET-Response-Normal, -NormalList and -Record with the A-XDR data inside (integers, arrays,
structures, strings, bit-strings, date_time_s, date_time, OAD/OMD, DAR per item), and
`quantities` for the polled objects (Scaler_Unit applied exactly into Decimal).

Same names, arguments and results as the pure functions (dlt698.PURE). Anything this
module does not decode itself (other services, rarer data types, malformed or hostile bytes,
a value of an unexpected type) goes whole to the pure twin, so errors, Raw values and
Unknown reasons are the twin's own, word for word. protocols/dlt698.py binds it at import
(`bind`) unless MGW_PURE_PYTHON=1.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.datetime cimport datetime_new, import_datetime
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeASCII

from libc.string cimport memcmp, memcpy

import datetime as _dt
import os

cdef extern from *:
    """
    /* A NamedTuple instance without its Python-level __new__: what tuple.__new__(cls, items)
       does (CPython's tuple_subtype_new); the caller fills every field, defaults too. */
    static PyObject* mgw_alloc_tuple(PyObject* cls, Py_ssize_t n) {
        return ((PyTypeObject*)cls)->tp_alloc((PyTypeObject*)cls, n);
    }

    /* type(arg) by its tp_new with one args tuple kept for the next call, which spares
       building a tuple per Decimal (decimal's dec_new keeps no reference to it). It is
       held while tp_new runs: a call made meanwhile (a finalizer run by an allocation in
       there) finds it taken and makes its own. */
    static PyObject* mgw_args1 = NULL;
    static PyObject* mgw_new1(PyObject* type, PyObject* arg) {
        PyObject *args = mgw_args1, *prev, *old, *r;
        if (args == NULL || Py_REFCNT(args) != 1) {
            args = PyTuple_New(1);
            if (args == NULL)
                return NULL;
            Py_INCREF(Py_None);
            PyTuple_SET_ITEM(args, 0, Py_None);
            prev = mgw_args1;
            mgw_args1 = args;
            Py_XDECREF(prev);
        }
        Py_INCREF(args);
        old = PyTuple_GET_ITEM(args, 0);
        Py_INCREF(arg);
        PyTuple_SET_ITEM(args, 0, arg);
        Py_DECREF(old);
        r = ((PyTypeObject*)type)->tp_new((PyTypeObject*)type, args, NULL);
        Py_DECREF(args);
        return r;
    }
    """
    object mgw_alloc_tuple(object cls, Py_ssize_t n)
    object mgw_new1(object type, object arg)

import_datetime()

cdef enum:
    MAX_DEPTH = 16          # dlt698_data.MAX_DEPTH and MAX_ITEMS (bind checks they agree)
    MAX_ITEMS = 4096


class _Fallback(Exception):
    """Not decoded here: the pure twin decodes the whole thing (and words any error)."""


# bound from protocols.dlt698 / dlt698_data / dlt645_values (bind)
cdef object OAD_ = None, OMD_, BitString_, DAR_, CSD_, Value_, Decimal_
cdef object Frame_ = None, ServerAddress_, Message_, GetResult_, GetResponse_
cdef object GetRecordResponse_
cdef object py_frame_from_scanner, py_decode, py_decode_apdu, py_quantities
# dlt698._OBJECTS and _SINGLE: the OIs in a C array, each one's (names, scaler, unit) at the
# same place in TABLE (a dozen entries: a scan is cheaper than a dict lookup of a new int)
cdef enum:
    MAX_TABLE = 64
cdef int TABLE_OI[MAX_TABLE]
cdef bint TABLE_ARRAY[MAX_TABLE]
cdef Py_ssize_t TABLE_N = 0
cdef tuple TABLE = ()
cdef object DATETIME = _dt.datetime
cdef int CLOCK_OI = -1, STATUS_OI = -1, RELAY_OPEN_BIT, TRIP_BIT, PROTECT_BIT
cdef object S_METER_CLOCK, S_REMAINING, S_PURCHASES, S_CNY, S_RELAY_STATE
cdef object S_RELAY_COMMAND, S_GUARANTEE, S_OPEN, S_CLOSED, S_TRIP, S_CLOSE

_FIELDS = {
    "OAD": ("oi", "attr", "index"), "OMD": ("oi", "method", "mode"),
    "BitString": ("nbits", "data"), "CSD": ("oad", "related"),
    "Value": ("quantity", "value", "unit"),
    "Frame": ("control", "sa", "ca", "user_data", "raw"),
    "ServerAddress": ("kind", "address", "logical", "flag", "wire"),
    "Message": ("frame", "apdu"), "GetResult": ("oad", "value", "dar"),
    "GetResponse": ("piid", "results", "listed"),
    "GetRecordResponse": ("piid", "oad", "columns", "rows", "dar"),
}


def _checked(cls):
    """A class this module builds without calling it: a slotted NamedTuple whose fields are
    the ones written here (a field added there and not here fails the import, loudly)."""
    if not (isinstance(cls, type) and issubclass(cls, tuple) and cls.__dictoffset__ == 0
            and getattr(cls, "_fields", None) == _FIELDS[cls.__name__]):
        raise TypeError("protocols._apdu698 builds %s%s; rebuild it for the class as it is "
                        "now" % (cls.__name__, _FIELDS.get(cls.__name__)))
    return cls


def bind(module):
    """Takes the classes, tables and pure functions from protocols.dlt698 (`module`)."""
    global OAD_, OMD_, BitString_, DAR_, CSD_, Value_, Decimal_, Frame_, ServerAddress_
    global Message_, GetResult_, GetResponse_, GetRecordResponse_, py_frame_from_scanner
    global py_decode, py_decode_apdu, py_quantities, TABLE, TABLE_N, CLOCK_OI, STATUS_OI
    global RELAY_OPEN_BIT, TRIP_BIT, PROTECT_BIT, S_METER_CLOCK, S_REMAINING, S_PURCHASES
    global S_CNY, S_RELAY_STATE, S_RELAY_COMMAND, S_GUARANTEE, S_OPEN, S_CLOSED, S_TRIP
    global S_CLOSE, dec_exp_offset
    from decimal import Decimal
    from protocols import dlt698_data
    m = module
    if (dlt698_data.MAX_DEPTH, dlt698_data.MAX_ITEMS) != (MAX_DEPTH, MAX_ITEMS):
        raise TypeError("protocols._apdu698 was built for other data bounds; rebuild it")
    OAD_ = _checked(dlt698_data.OAD)
    OMD_ = _checked(dlt698_data.OMD)
    BitString_ = _checked(dlt698_data.BitString)
    CSD_ = _checked(dlt698_data.CSD)
    DAR_ = dlt698_data.DAR
    Value_ = _checked(m.Value)
    Decimal_ = Decimal
    frame = _checked(m.Frame)              # set last: _ready() takes it for "bound"
    ServerAddress_ = _checked(m.ServerAddress)
    Message_ = _checked(m.Message)
    GetResult_ = _checked(m.GetResult)
    GetResponse_ = _checked(m.GetResponse)
    GetRecordResponse_ = _checked(m.GetRecordResponse)
    pure = m.PURE
    py_frame_from_scanner = pure["frame_from_scanner"]
    py_decode = pure["decode"]
    py_decode_apdu = pure["decode_apdu"]
    py_quantities = pure["quantities"]
    rows = [(oi, True, (tuple(names), int(scaler), unit))
            for oi, (names, scaler, unit) in m._OBJECTS.items()]
    rows += [(oi, False, (name, int(scaler), unit))
             for oi, (name, scaler, unit) in m._SINGLE.items()]
    if len(rows) > MAX_TABLE or len({r[0] for r in rows}) != len(rows):
        raise TypeError("protocols._apdu698 takes at most %d distinct objects" % MAX_TABLE)
    for i, (oi, array, _) in enumerate(rows):
        TABLE_OI[i] = oi
        TABLE_ARRAY[i] = array
    TABLE = tuple(r[2] for r in rows)
    TABLE_N = len(rows)
    CLOCK_OI = m.CLOCK.oi
    STATUS_OI = m.STATUS_WORDS.oi
    if m.CLOCK != OAD_(CLOCK_OI, 2, 0) or m.STATUS_WORDS != OAD_(STATUS_OI, 2, 0):
        raise TypeError("protocols._apdu698 reads the clock and status words at attribute 2")
    RELAY_OPEN_BIT = m.RELAY_OPEN_BIT
    TRIP_BIT = m.RELAY_TRIP_COMMAND_BIT
    PROTECT_BIT = m.PROTECT_BIT
    S_METER_CLOCK, S_REMAINING, S_PURCHASES, S_CNY = \
        "meter.clock", "balance.remaining", "balance.purchases", "CNY"
    S_RELAY_STATE, S_RELAY_COMMAND, S_GUARANTEE = \
        "relay.state", "relay.command", "guarantee.state"
    S_OPEN, S_CLOSED, S_TRIP, S_CLOSE = "open", "closed", "trip", "close"
    Frame_ = frame
    dec_exp_offset = -1 if os.environ.get("MGW_DECIMAL_TEXT", "") not in ("", "0") \
        else _exponent_offset()


cdef int _ready() except -1:
    """Bound to protocols.dlt698 (importing it binds this module unless MGW_PURE_PYTHON)."""
    if Frame_ is None:
        import protocols.dlt698 as m
        if Frame_ is None:
            bind(m)
    return 0


# ---------------------------------------------------------------- building blocks

cdef inline void _put(object t, Py_ssize_t i, object v):
    Py_INCREF(v)
    PyTuple_SET_ITEM(t, i, v)


cdef inline object _at(object t, Py_ssize_t i):
    """Field i of a tuple (a NamedTuple's fields without its Python-level __getitem__
    slot, which indexing a tuple subclass goes through); the caller checked the size."""
    return <object>PyTuple_GET_ITEM(t, i)


cdef inline object _nt2(object cls, object a, object b):
    cdef object t = mgw_alloc_tuple(cls, 2)
    _put(t, 0, a)
    _put(t, 1, b)
    return t


cdef inline object _nt3(object cls, object a, object b, object c):
    cdef object t = mgw_alloc_tuple(cls, 3)
    _put(t, 0, a)
    _put(t, 1, b)
    _put(t, 2, c)
    return t


cdef inline object _nt5(object cls, object a, object b, object c, object d, object e):
    cdef object t = mgw_alloc_tuple(cls, 5)
    _put(t, 0, a)
    _put(t, 1, b)
    _put(t, 2, c)
    _put(t, 3, d)
    _put(t, 4, e)
    return t


cdef struct Cur:
    const unsigned char* p
    Py_ssize_t pos
    Py_ssize_t n


cdef inline int _need(Cur* c, Py_ssize_t k) except -1:
    if k < 0 or c.pos + k > c.n:
        raise _Fallback()
    return 0


cdef inline int _u8(Cur* c) except -1:
    if c.pos >= c.n:
        raise _Fallback()
    c.pos += 1
    return c.p[c.pos - 1]


cdef inline Py_ssize_t _length(Cur* c) except -1:
    cdef int b = _u8(c)
    cdef const unsigned char* p
    if b < 0x80:
        return b
    if b == 0x81:
        return _u8(c)
    if b == 0x82:
        _need(c, 2)
        p = c.p + c.pos
        c.pos += 2
        return (<Py_ssize_t>p[0] << 8) | p[1]
    raise _Fallback()


# The OADs a gateway polls are few: each is built once and kept in a direct-mapped table
# (an OAD is an immutable NamedTuple), so decoding an answer does not rebuild them.
cdef enum:
    OAD_SLOTS = 256
cdef unsigned int oad_key[OAD_SLOTS]
cdef PyObject* oad_obj[OAD_SLOTS]


cdef inline object _oad(Cur* c):
    cdef const unsigned char* p
    cdef unsigned int key
    cdef Py_ssize_t slot
    cdef object o
    _need(c, 4)
    p = c.p + c.pos
    c.pos += 4
    key = (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) \
        | p[3]
    slot = ((key >> 16) * 31 + (key & 0xFFFF)) & (OAD_SLOTS - 1)
    if oad_obj[slot] != NULL and oad_key[slot] == key:
        return <object>oad_obj[slot]
    o = _nt3(OAD_, (<int>p[0] << 8) | p[1], <int>p[2], <int>p[3])
    Py_XDECREF(oad_obj[slot])
    Py_INCREF(o)
    oad_obj[slot] = <PyObject*>o
    oad_key[slot] = key
    return o


cdef inline object _bytes(Cur* c, Py_ssize_t k):
    _need(c, k)
    c.pos += k
    return PyBytes_FromStringAndSize(<const char*>(c.p + c.pos - k), k)


cdef object _datetime(int year, int month, int day, int hour, int minute, int second,
                      int us):
    try:
        return datetime_new(year, month, day, hour, minute, second, us, None)
    except (ValueError, OverflowError):
        raise _Fallback()        # the twin keeps it as Raw(tag, bytes, reason)


# ---------------------------------------------------------------- A-XDR data

cdef object _data(Cur* c, int depth):
    """One Data (tag + content), as dlt698_data.Reader.data_value reads it."""
    cdef int tag, k
    cdef Py_ssize_t n, i
    cdef const unsigned char* p
    cdef unsigned long long u
    cdef object items, v
    if depth > MAX_DEPTH:
        raise _Fallback()
    tag = _u8(c)
    if tag == 0:                                    # null
        return None
    if tag == 1 or tag == 2:                        # array, structure
        n = _length(c)
        if n > MAX_ITEMS or n > c.n - c.pos:
            raise _Fallback()
        if tag == 1:
            items = PyList_New(n)
            for i in range(n):
                v = _data(c, depth + 1)
                Py_INCREF(v)
                PyList_SET_ITEM(items, i, v)
        else:
            items = PyTuple_New(n)
            for i in range(n):
                v = _data(c, depth + 1)
                Py_INCREF(v)
                PyTuple_SET_ITEM(items, i, v)
        return items
    if tag == 6 or tag == 5:                        # double-long-unsigned, double-long
        _need(c, 4)
        p = c.p + c.pos
        c.pos += 4
        u = (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | \
            (<unsigned int>p[2] << 8) | p[3]
        if tag == 6:
            return <unsigned int>u
        return <int>(<unsigned int>u)
    if tag == 18 or tag == 16 or tag == 80:         # long-unsigned, long, OI
        _need(c, 2)
        p = c.p + c.pos
        c.pos += 2
        k = (<int>p[0] << 8) | p[1]
        return <short>k if tag == 16 else k
    if tag == 17 or tag == 22:                      # unsigned, enum
        return _u8(c)
    if tag == 15:                                   # integer
        return <signed char>_u8(c)
    if tag == 3:                                    # bool
        return _u8(c) != 0
    if tag == 20 or tag == 21:                      # long64, long64-unsigned
        _need(c, 8)
        p = c.p + c.pos
        c.pos += 8
        u = 0
        for i in range(8):
            u = (u << 8) | p[i]
        if tag == 21:
            return u
        return <long long>u
    if tag == 28:                                   # date_time_s
        _need(c, 7)
        p = c.p + c.pos
        c.pos += 7
        return _datetime((<int>p[0] << 8) | p[1], p[2], p[3], p[4], p[5], p[6], 0)
    if tag == 4:                                    # bit-string
        n = _length(c)
        return _nt2(BitString_, n, _bytes(c, (n + 7) // 8))
    if tag == 9 or tag == 86 or tag == 87:          # octet-string, MAC, RN
        return _bytes(c, _length(c))
    if tag == 10:                                   # visible-string (ASCII)
        n = _length(c)
        _need(c, n)
        p = c.p + c.pos
        for i in range(n):
            if p[i] >= 0x80:
                raise _Fallback()                   # the twin's Raw with its reason
        c.pos += n
        return PyUnicode_DecodeASCII(<const char*>p, n, NULL)
    if tag == 81:                                   # OAD
        return _oad(c)
    if tag == 83:                                   # OMD
        _need(c, 4)
        p = c.p + c.pos
        c.pos += 4
        return _nt3(OMD_, (<int>p[0] << 8) | p[1], <int>p[2], <int>p[3])
    if tag == 25:                                   # date_time: milliseconds at the end
        _need(c, 10)
        p = c.p + c.pos
        c.pos += 10
        k = (<int>p[8] << 8) | p[9]
        if k > 999:
            raise _Fallback()
        return _datetime((<int>p[0] << 8) | p[1], p[2], p[3], p[5], p[6], p[7], k * 1000)
    raise _Fallback()                               # rarer types: the twin reads them


def decode_data(data):
    """(value, bytes used) of one Data at the start of `data`: dlt698_data.decode_data."""
    cdef Cur c
    _ready()
    if type(data) is bytes:
        c.p = <const unsigned char*>PyBytes_AS_STRING(data)
        c.pos = 0
        c.n = PyBytes_GET_SIZE(data)
        try:
            v = _data(&c, 0)
            return v, c.pos
        except _Fallback:
            pass
    from protocols.dlt698_data import decode_data as pure
    return pure(data)


# ---------------------------------------------------------------- GET-Responses

cdef object _get_result(Cur* c, object oad):
    cdef int choice = _u8(c)
    if choice == 1:
        return _nt3(GetResult_, oad, _data(c, 0), None)
    if choice == 0:
        return _nt3(GetResult_, oad, None, DAR_(_u8(c)))
    raise _Fallback()


cdef object _csd(Cur* c):
    cdef int choice = _u8(c)
    cdef Py_ssize_t n, i
    cdef object oad, related
    oad = _oad(c)
    if choice == 0:
        return _nt2(CSD_, oad, None)
    if choice != 1:
        raise _Fallback()
    n = _length(c)
    _need(c, 4 * n)
    related = PyTuple_New(n)
    for i in range(n):
        v = _oad(c)
        Py_INCREF(v)
        PyTuple_SET_ITEM(related, i, v)
    return _nt2(CSD_, oad, related)


cdef object _record_response(Cur* c, int piid):
    cdef Py_ssize_t ncol, m, i, j
    cdef object oad, columns, rows, row, v
    oad = _oad(c)
    ncol = _length(c)
    if ncol > MAX_ITEMS or ncol > c.n - c.pos:
        raise _Fallback()
    columns = PyTuple_New(ncol)
    for i in range(ncol):
        v = _csd(c)
        Py_INCREF(v)
        PyTuple_SET_ITEM(columns, i, v)
    if _u8(c) != 1:
        raise _Fallback()                           # DAR or worse: rare, the twin's
    m = _length(c)
    if m * (ncol if ncol > 1 else 1) > c.n - c.pos:
        raise _Fallback()
    rows = PyTuple_New(m)
    for j in range(m):
        row = PyTuple_New(ncol)
        for i in range(ncol):
            v = _data(c, 0)
            Py_INCREF(v)
            PyTuple_SET_ITEM(row, i, v)
        Py_INCREF(row)
        PyTuple_SET_ITEM(rows, j, row)
    return _nt5(GetRecordResponse_, piid, oad, columns, rows, None)


cdef object _get_response(object data):
    """The GET-Response-Normal/-NormalList/-Record in `data` (bytes), or None for another
    APDU; raises _Fallback where the twin must decide."""
    cdef Cur c
    cdef int choice, piid, b
    cdef Py_ssize_t n, i
    cdef object msg, results, oad, v
    c.p = <const unsigned char*>PyBytes_AS_STRING(data)
    c.n = PyBytes_GET_SIZE(data)
    if c.n < 3 or c.p[0] != 0x85:
        return None
    choice = c.p[1]
    piid = c.p[2]
    c.pos = 3
    if choice == 1:
        oad = _oad(&c)
        results = PyTuple_New(1)
        v = _get_result(&c, oad)
        Py_INCREF(v)
        PyTuple_SET_ITEM(results, 0, v)
        msg = _nt3(GetResponse_, piid, results, False)
    elif choice == 2:
        n = _length(&c)
        if n > c.n - c.pos:
            raise _Fallback()
        results = PyTuple_New(n)
        for i in range(n):
            oad = _oad(&c)
            v = _get_result(&c, oad)
            Py_INCREF(v)
            PyTuple_SET_ITEM(results, i, v)
        msg = _nt3(GetResponse_, piid, results, True)
    elif choice == 3:
        msg = _record_response(&c, piid)
    else:
        return None
    # FollowReport OPTIONAL, then TimeTag OPTIONAL (dlt698._trailer, from the server)
    if c.pos < c.n:
        if _u8(&c) == 1:
            return msg                              # a follow report: not interpreted
    if c.pos < c.n:
        b = _u8(&c)
        if b == 1:
            _need(&c, 10)
            c.pos += 10
        elif b != 0:
            raise _Fallback()
    if c.pos < c.n:
        raise _Fallback()
    return msg


def decode_apdu(data, depth=0):
    """dlt698.decode_apdu: GET-Responses here, everything else by the twin."""
    cdef object msg
    _ready()
    if type(data) is bytes and depth == 0:
        try:
            msg = _get_response(data)
        except _Fallback:
            msg = None
        if msg is not None:
            return msg
    return py_decode_apdu(data, depth)


def decode(frame):
    """dlt698.decode: Message(frame, apdu) or Unknown(frame, reason), never raises."""
    cdef object control, ud, msg
    _ready()
    if type(frame) is Frame_ and PyTuple_GET_SIZE(frame) == 5:
        control = _at(frame, 0)
        ud = _at(frame, 3)
        if type(control) is int and 0 <= control <= 0xFF and not (<int>control & 0x28) \
                and type(ud) is bytes:
            try:                                    # not segmented, not scrambled
                msg = _get_response(ud)
            except _Fallback:
                msg = None
            if msg is not None:
                return _nt2(Message_, frame, msg)
    return py_decode(frame)


# A line's meters are few too: their ServerAddress objects are kept by address field
# (flag + up to 16 bytes) in a small direct-mapped table.
cdef enum:
    SA_SLOTS = 64
cdef unsigned char sa_key[SA_SLOTS][17]
cdef PyObject* sa_obj[SA_SLOTS]


cdef object _server_address(const unsigned char* p, Py_ssize_t alen):
    """ServerAddress of the flag byte at p and its alen address bytes (dlt698._read_address);
    the caller checked the bytes are there and an extended logical byte has an address."""
    cdef int flag = p[0], logical
    cdef Py_ssize_t i, an, slot
    cdef unsigned int h = 0
    cdef char hexa[64]
    cdef const unsigned char* a
    cdef object sa
    for i in range(alen + 1):
        h = h * 33 + p[i]
    slot = (h ^ (h >> 7)) & (SA_SLOTS - 1)
    if sa_obj[slot] != NULL and memcmp(sa_key[slot], p, alen + 1) == 0:
        return <object>sa_obj[slot]
    if flag & 0x20:
        logical = p[1]
        a = p + 2
        an = alen - 1
    else:
        logical = (flag >> 4) & 1
        a = p + 1
        an = alen
    for i in range(an):                             # nameplate order: high byte first
        hexa[2 * i] = b"0123456789ABCDEF"[a[an - 1 - i] >> 4]
        hexa[2 * i + 1] = b"0123456789ABCDEF"[a[an - 1 - i] & 0x0F]
    sa = _nt5(ServerAddress_, flag >> 6, PyUnicode_DecodeASCII(hexa, 2 * an, NULL), logical,
              flag, PyBytes_FromStringAndSize(<const char*>(p + 1), alen))
    Py_XDECREF(sa_obj[slot])
    Py_INCREF(sa)
    sa_obj[slot] = <PyObject*>sa
    memcpy(sa_key[slot], p, alen + 1)               # the flag's nibble gives the length
    return sa


def frame_from_scanner(raw):
    """dlt698.frame_from_scanner: a Frame of bytes Scanner("dlt698") already checked."""
    cdef const unsigned char* p
    cdef Py_ssize_t n, alen, pos, start, stop
    cdef int flag
    _ready()
    if type(raw) is not bytes:
        return py_frame_from_scanner(raw)
    p = <const unsigned char*>PyBytes_AS_STRING(raw)
    n = PyBytes_GET_SIZE(raw)
    if n < 6:
        return py_frame_from_scanner(raw)
    flag = p[4]
    alen = (flag & 0x0F) + 1
    pos = 5 + alen
    if pos >= n or ((flag & 0x20) and alen < 2):
        return py_frame_from_scanner(raw)           # the twin's FrameError / IndexError
    sa = _server_address(p + 4, alen)
    start = pos + 3
    stop = n - 3
    if stop < start:
        stop = start = 0
    return _nt5(Frame_, p[3], sa, p[pos],
                PyBytes_FromStringAndSize(<const char*>(p + start), stop - start), raw)


# ---------------------------------------------------------------- quantities

# A Decimal built from its text costs as much as everything else a reading needs (argument
# parsing, a copy, a string parser); built from the int it is cheap, and the exponent is
# then set in place: where CPython's C decimal keeps it is found and proven at bind()
# (_exponent_offset), else (another layout, the pure-Python decimal) the text is used.
cdef Py_ssize_t dec_exp_offset = -1


cdef inline Py_ssize_t _peek(object o, Py_ssize_t off):
    return (<Py_ssize_t*>((<char*><PyObject*>o) + off))[0]


def _exponent_offset():
    """Offset of the exponent in a C decimal.Decimal, or -1. Read at every aligned offset
    of the object on five Decimals of known exponents; proven by setting it on a fresh
    Decimal(int) and checking digits, exponent, text, equality and hash."""
    import decimal
    cdef Py_ssize_t size, off, step = sizeof(Py_ssize_t)
    _ready()
    if Decimal_ is not decimal.Decimal or not hasattr(decimal, "__libmpdec_version__") or \
            Decimal_(7) is Decimal_(7):
        return -1
    size = Decimal_.__basicsize__
    known = [(Decimal_("1E-7"), -7), (Decimal_("1E-11"), -11), (Decimal_("1E+5"), 5),
             (Decimal_(12345), 0), (Decimal_("-3E-2"), -2)]
    off = sizeof(PyObject)
    while off + step <= size:
        if all(_peek(d, off) == e for d, e in known):
            d = Decimal_(-123456789)
            (<Py_ssize_t*>((<char*><PyObject*>d) + off))[0] = -2
            want = Decimal_("-1234567.89")
            if d.as_tuple() == want.as_tuple() and str(d) == "-1234567.89" and d == want \
                    and hash(d) == hash(want):
                return off
            return -1
        off += step
    return -1


cdef object _dec_new(object n, int scaler):
    """Decimal n x 10^scaler, exact (dlt698._scaled)."""
    cdef object d
    if dec_exp_offset >= 0 and -99 <= scaler <= 99:
        d = mgw_new1(Decimal_, n)
        (<Py_ssize_t*>((<char*><PyObject*>d) + dec_exp_offset))[0] = scaler
        return d
    return Decimal_("%dE%d" % (n, scaler))


# Small readings recur (voltage 220.1 V, frequency 50.01 Hz, a power factor, a current of a
# few amperes): for integers of at most four digits the Decimal, and the Value of each
# quantity, are kept in direct-mapped tables (bounded: a slot is replaced on a miss; both
# are immutable, so readings may share them). Longer ones (energy registers) are built.
cdef enum:
    SMALL = 9999
    DEC_SLOTS = 4096
    VAL_SLOTS = 2048


cdef struct Kept:
    long long n
    int scaler
    PyObject* obj               # an owned reference, or NULL


cdef Kept dec_kept[DEC_SLOTS]
cdef Kept val_kept[VAL_SLOTS]


cdef inline object _kept(Kept* k, long long n, int scaler):
    if k.obj != NULL and k.n == n and k.scaler == scaler:
        return <object>k.obj
    return None


cdef inline void _keep(Kept* k, long long n, int scaler, object o):
    Py_XDECREF(k.obj)
    Py_INCREF(o)
    k.obj = <PyObject*>o
    k.n = n
    k.scaler = scaler


cdef object _value(object name, object n, int scaler, object unit):
    """Value(name, Decimal n x 10^scaler exactly, unit); n an int. A slot's Value holds
    its name and unit, so comparing them by identity is safe."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(n, &overflow)
    cdef Kept* k
    cdef object o, d
    if overflow or not -SMALL <= v <= SMALL:
        return _nt3(Value_, name, _dec_new(n, scaler), unit)
    k = &val_kept[((v * 4 + scaler) * 31 + ((<size_t><PyObject*>name) >> 4)) & (VAL_SLOTS - 1)]
    o = _kept(k, v, scaler)
    if o is not None and <PyObject*>PyTuple_GET_ITEM(o, 0) == <PyObject*>name and \
            <PyObject*>PyTuple_GET_ITEM(o, 2) == <PyObject*>unit:
        return o
    d = _kept(&dec_kept[(v * 4 + scaler) & (DEC_SLOTS - 1)], v, scaler)
    if d is None:
        d = _dec_new(n, scaler)
        _keep(&dec_kept[(v * 4 + scaler) & (DEC_SLOTS - 1)], v, scaler, d)
    o = _nt3(Value_, name, d, unit)
    _keep(k, v, scaler, o)
    return o


cdef inline long _small_int(object x):
    """x if it is an int within 0..0xFFFF, else -1 (no Python comparison on the way)."""
    cdef int overflow = 0
    cdef long long v
    if type(x) is not int:
        return -1
    v = PyLong_AsLongLongAndOverflow(x, &overflow)
    return v if not overflow and 0 <= v <= 0xFFFF else -1


cdef inline int _bit(const unsigned char* d, int k):
    return (d[k >> 3] >> (7 - (k & 7))) & 1


def quantities(oad, value):
    """dlt698.quantities: the polled objects here, anything else (and every error) by the
    twin."""
    cdef Py_ssize_t i, j, k
    cdef int scaler, oi
    cdef object entry, names, unit, out, v, word, data, n
    cdef const unsigned char* p
    _ready()
    if type(oad) is not OAD_ or PyTuple_GET_SIZE(oad) != 3:
        return py_quantities(oad, value)
    oi = _small_int(_at(oad, 0))
    if oi < 0 or oi > 0xFFFF or _small_int(_at(oad, 1)) != 2 or _small_int(_at(oad, 2)) != 0:
        return py_quantities(oad, value)
    for i in range(TABLE_N):
        if TABLE_OI[i] == oi:
            break
    else:
        i = -1
    if i >= 0 and TABLE_ARRAY[i]:
        if type(value) is not list:
            return py_quantities(oad, value)
        entry = _at(TABLE, i)
        names = _at(entry, 0)
        scaler = _at(entry, 1)
        unit = _at(entry, 2)
        k = min(PyTuple_GET_SIZE(names), PyList_GET_SIZE(value))
        for j in range(k):
            if type(<object>PyList_GET_ITEM(value, j)) is not int:
                return py_quantities(oad, value)
        out = PyList_New(k)
        for j in range(k):
            v = _value(_at(names, j), <object>PyList_GET_ITEM(value, j), scaler, unit)
            Py_INCREF(v)
            PyList_SET_ITEM(out, j, v)
        return out
    if i >= 0:
        if type(value) is not int:
            return py_quantities(oad, value)
        entry = _at(TABLE, i)
        return [_value(_at(entry, 0), value, _at(entry, 1), _at(entry, 2))]
    if oi == CLOCK_OI and isinstance(value, DATETIME):
        return [_nt3(Value_, S_METER_CLOCK, value, None)]
    if oi == 0x202C and type(value) is tuple and len(value) >= 2 and type(value[0]) is int:
        return [_value(S_REMAINING, value[0], -2, S_CNY),
                _nt3(Value_, S_PURCHASES, value[1], None)]
    if oi == STATUS_OI and type(value) is list and len(value) >= 3:
        word = value[2]
        if type(word) is BitString_ and PyTuple_GET_SIZE(word) == 2 and \
                type(_at(word, 0)) is int and _at(word, 0) >= 16:
            data = _at(word, 1)
            if type(data) is bytes and PyBytes_GET_SIZE(data) * 8 >= _at(word, 0) and \
                    0 <= RELAY_OPEN_BIT < 16 and 0 <= TRIP_BIT < 16 and 0 <= PROTECT_BIT < 16:
                p = <const unsigned char*>PyBytes_AS_STRING(data)
                return [_nt3(Value_, S_RELAY_STATE,
                             S_OPEN if _bit(p, RELAY_OPEN_BIT) else S_CLOSED, None),
                        _nt3(Value_, S_RELAY_COMMAND,
                             S_TRIP if _bit(p, TRIP_BIT) else S_CLOSE, None),
                        _nt3(Value_, S_GUARANTEE, _bit(p, PROTECT_BIT) == 1, None)]
    return py_quantities(oad, value)
