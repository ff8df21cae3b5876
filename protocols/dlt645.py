"""DL/T 645-2007 (and -1997 reads): frames, typed request constructors, answer decoding.

Sans-I/O. Facts and worked frames: ../shared/reference/dlt645.md sections 1-5. Frames are
built only through the typed constructors below; the clear-meter (0x1A), clear-events (0x1B)
and clear-demand (0x19) control codes cannot be built at all, so a relay command type of
0x1A/0x1B can never be sent as a control code by accident.
"""

import datetime as _dt
from enum import IntEnum
from typing import NamedTuple, Optional, Tuple

from protocols.dlt645_values import (Value, decode_values, decode_ymdhms, encode_values,
                                     encode_ymdhms)
from protocols.exchange import RelayIntent
from protocols.framing import add_33, dlt645_checksum, sub_33

PREAMBLE = b"\xFE\xFE\xFE\xFE"
BROADCAST = "999999999999"
WILDCARD = "AAAAAAAAAAAA"

# 2007 function codes (control code bits D4..D0), reference 1.4
READ_DATA = 0x11
READ_FOLLOW_UP = 0x12
READ_ADDRESS = 0x13
WRITE_DATA = 0x14
TIME_SYNC = 0x08
CHANGE_BAUD = 0x17
RELAY_CONTROL = 0x1C
# 1997 function codes, reference 5
READ_DATA_1997 = 0x01
READ_FOLLOW_UP_1997 = 0x02
WRITE_DATA_1997 = 0x04

# never built by this module: clearing a meter's energy, events or demand is not a
# concentrator's job, and 0x1A/0x1B double as relay command types inside 0x1C frames.
FORBIDDEN_CONTROLS = frozenset({0x19, 0x1A, 0x1B})

DIRECTION_BIT = 0x80
ERROR_BIT = 0x40
FOLLOW_UP_BIT = 0x20

ERR_BITS_2007 = ("other", "no_data", "unauthorized", "baud_unchangeable",
                 "too_many_year_zones", "too_many_day_slots", "too_many_tariffs", "reserved")
ERR_BITS_1997 = ("illegal_data", "wrong_di", "unauthorized", "reserved",
                 "too_many_year_zones", "too_many_day_slots", "too_many_tariffs", "reserved")
SERR_BITS = ("other", "repeated_topup", "esam_check_failed", "identity_auth_failed",
             "customer_number_mismatch", "wrong_topup_count", "over_hoarding_limit")

BAUD_CODES = {0x02: 600, 0x04: 1200, 0x08: 2400, 0x10: 4800, 0x20: 9600, 0x40: 19200}

# Password level of the ESAM-secured relay path (reference 1.5): data is ciphertext + MAC.
SECURED_LEVEL = 0x98


class RelayCommand(IntEnum):
    """N1 of a 0x1C frame (reference 1.5)."""
    TRIP = 0x1A
    CLOSE_ALLOWED = 0x1B
    DIRECT_CLOSE = 0x1C
    ALARM = 0x2A
    ALARM_RELEASE = 0x2B
    GUARANTEE = 0x3A
    GUARANTEE_RELEASE = 0x3B


# the gateway's protocol-neutral RelayIntent -> this frame's N1 code (same names)
RELAY_CODES = {intent: RelayCommand[intent.name] for intent in RelayIntent}


class FrameError(ValueError):
    """A byte string that is not a valid DL/T 645 frame (one line: what is wrong)."""


class Frame(NamedTuple):
    address: str     # 12 digits as on the nameplate (high digit first); 'A' for wildcard
    control: int
    data: bytes      # the data field with the 0x33 offset removed
    raw: bytes       # the exact frame, 0x68 .. 0x16, no preamble

    @property
    def function(self):
        return self.control & 0x1F

    @property
    def is_response(self):
        return bool(self.control & DIRECTION_BIT)

    @property
    def is_error(self):
        return bool(self.control & ERROR_BIT)

    @property
    def has_follow_up(self):
        return bool(self.control & FOLLOW_UP_BIT)


# ---------------------------------------------------------------- addresses

def address_to_wire(address):
    """'000000123456' -> b'\\x56\\x34\\x12\\x00\\x00\\x00' (low byte first). Short addresses
    are padded with 0 on the left; 'A' digits are the AA wildcard."""
    a = str(address).strip().upper()
    if len(a) < 12:
        a = a.rjust(12, "0")
    if len(a) != 12 or any(c not in "0123456789A" for c in a):
        raise ValueError("a DL/T 645 address is 12 digits (0-9, A for wildcard): %r" % address)
    return bytes.fromhex(a)[::-1]


def address_from_wire(wire):
    return bytes(wire[::-1]).hex().upper()


# ---------------------------------------------------------------- framing

def build_frame(address, control, data=b"", preamble=True):
    """Bytes of a frame. Private to this module's constructors in spirit: call those."""
    if control & 0x1F in FORBIDDEN_CONTROLS and not control & DIRECTION_BIT:
        raise ValueError("control code %02X (clear meter/events/demand) is never sent" % control)
    if len(data) > 255:
        raise ValueError("data field of %d bytes exceeds 255" % len(data))
    body = (b"\x68" + address_to_wire(address) + b"\x68" + bytes((control, len(data)))
            + add_33(data))
    frame = body + bytes((dlt645_checksum(body), 0x16))
    return PREAMBLE + frame if preamble else frame


def parse_frame(raw):
    """A Frame from bytes (preamble allowed); raises FrameError naming the fault."""
    raw = bytes(raw)
    start = 0
    while start < len(raw) and raw[start] == 0xFE:
        start += 1
    raw = raw[start:]
    if len(raw) < 12:
        raise FrameError("frame too short (%d bytes, at least 12)" % len(raw))
    if raw[0] != 0x68 or raw[7] != 0x68:
        raise FrameError("no 68 .. 68 header")
    n = raw[9]
    if len(raw) < 12 + n:
        raise FrameError("length byte says %d data bytes, only %d present" % (n, len(raw) - 12))
    cs = dlt645_checksum(raw[:10 + n])
    if raw[10 + n] != cs:
        raise FrameError("checksum %02X, computed %02X" % (raw[10 + n], cs))
    if raw[11 + n] != 0x16:
        raise FrameError("end byte %02X, not 16" % raw[11 + n])
    return Frame(address_from_wire(raw[1:7]), raw[8], sub_33(raw[10:10 + n]), raw[:12 + n])


def frame_from_scanner(raw):
    """Fast path for bytes the Scanner already checked (header, length, CS, end)."""
    n = raw[9]
    return Frame(address_from_wire(raw[1:7]), raw[8], sub_33(raw[10:10 + n]), raw)


# ---------------------------------------------------------------- request constructors

def _di_bytes(di, version):
    if version == 2007:
        if not 0 <= di <= 0xFFFFFFFF:
            raise ValueError("a 2007 data identifier is 4 bytes: %X" % di)
        return di.to_bytes(4, "little")
    if version == 1997:
        if not 0 <= di <= 0xFFFF:
            raise ValueError("a 1997 data identifier is 2 bytes: %X" % di)
        return di.to_bytes(2, "little")
    raise ValueError("DL/T 645 version is 2007 or 1997, not %r" % (version,))


def read_data(address, di, version=2007):
    """Read one data identifier (0x11; 0x01 for 1997 meters)."""
    control = READ_DATA if version == 2007 else READ_DATA_1997
    return build_frame(address, control, _di_bytes(di, version))


def read_follow_up(address, di, seq, version=2007):
    """Ask for follow-up frame SEQ (1..255) after a 0xB1 answer (0x12; 0x02 for 1997)."""
    if version == 1997:
        return build_frame(address, READ_FOLLOW_UP_1997, _di_bytes(di, 1997))
    if not 1 <= seq <= 255:
        raise ValueError("follow-up SEQ is 1..255: %r" % seq)
    return build_frame(address, READ_FOLLOW_UP, _di_bytes(di, 2007) + bytes((seq,)))


def read_address(address=WILDCARD):
    """Read the communication address (0x13): the AA wildcard, or a short AA-padded one."""
    return build_frame(address, READ_ADDRESS)


def broadcast_time_sync(when, address=BROADCAST):
    """Broadcast time sync (0x08): no meter answers. `when` is the meters' local time."""
    return build_frame(address, TIME_SYNC, encode_ymdhms(when))


def _password_field(level, password):
    if not 0 <= level <= 0xFF:
        raise ValueError("password level is one byte: %r" % level)
    pw = str(password)
    if len(pw) != 6 or not pw.isdigit():
        raise ValueError("a meter password is 6 digits")
    return bytes((level,)) + bytes.fromhex(pw)[::-1]


def _operator_field(operator_code):
    op = str(operator_code)
    if len(op) != 8 or any(c not in "0123456789ABCDEFabcdef" for c in op):
        raise ValueError("an operator code is 8 hex digits")
    return bytes.fromhex(op)[::-1]


def relay_control(address, command, *, password_level, password, operator_code, valid_until):
    """Relay control (0x1C) on the plaintext path: trip, close allowed, direct close,
    alarm / release, guarantee (保电) / release. Every field is required: the meter checks
    the password and refuses the command after `valid_until` (the meter's local time)."""
    command = RelayCommand(command)
    if password_level == SECURED_LEVEL:
        raise ValueError("password level 98 is the ESAM path: use relay_control_secured")
    if not isinstance(valid_until, _dt.datetime):
        raise TypeError("valid_until must be a datetime")
    data = (_password_field(password_level, password) + _operator_field(operator_code)
            + bytes((int(command), 0x00)) + encode_ymdhms(valid_until))
    return build_frame(address, RELAY_CONTROL, data)


def relay_control_secured(address, payload):
    """Relay control for ESAM-secured meters: the master station's data field (level 98,
    password, operator code, ciphertext + MAC), forwarded unchanged. The gateway cannot
    and must not make these itself."""
    payload = bytes(payload)
    if len(payload) < 16 or payload[0] != SECURED_LEVEL:
        raise ValueError("a secured relay payload starts with level 98 and has >= 16 bytes")
    return build_frame(address, RELAY_CONTROL, payload)


# ---------------------------------------------------------------- answer constructors (meter side)

def read_response(address, di, payload, version=2007, follow_up=False, seq=None):
    function = READ_DATA if version == 2007 else READ_DATA_1997
    if seq is not None:
        function = READ_FOLLOW_UP if version == 2007 else READ_FOLLOW_UP_1997
    control = DIRECTION_BIT | function | (FOLLOW_UP_BIT if follow_up else 0)
    data = _di_bytes(di, version) + bytes(payload)
    if seq is not None and version == 2007:
        data += bytes((seq,))
    return build_frame(address, control, data)


def read_values_response(address, di, values, version=2007):
    return read_response(address, di, encode_values(di, values, version), version)


def error_response(address, function, err):
    return build_frame(address, DIRECTION_BIT | ERROR_BIT | function, bytes((err,)))


def ack_response(address, function):
    return build_frame(address, DIRECTION_BIT | function)


def address_response(address):
    return build_frame(address, DIRECTION_BIT | READ_ADDRESS, address_to_wire(address))


# ---------------------------------------------------------------- decoded messages

class ReadRequest(NamedTuple):
    address: str
    di: int
    version: int
    seq: Optional[int] = None


class ReadResponse(NamedTuple):
    address: str
    di: int
    version: int
    payload: bytes                     # after the DI (and before SEQ), -0x33 applied
    values: Optional[Tuple[Value, ...]]  # None: unknown DI or vendor format -> use payload
    follow_up: bool = False            # more frames follow (0xB1 / 0xB2)
    seq: Optional[int] = None

    def value(self, quantity):
        for v in self.values or ():
            if v.quantity == quantity:
                return v.value
        raise KeyError(quantity)


class ErrorResponse(NamedTuple):
    address: str
    function: int
    code: int
    flags: Tuple[str, ...]
    version: int


class ReadAddressRequest(NamedTuple):
    address: str


class AddressResponse(NamedTuple):
    address: str


class TimeSync(NamedTuple):
    address: str
    when: _dt.datetime


class RelayControl(NamedTuple):
    address: str
    password_level: int
    password: str
    operator_code: str
    command: Optional[RelayCommand]   # None on the secured path (ciphertext)
    valid_until: Optional[_dt.datetime]   # None: secured path, or a deadline of all zeros
    payload: bytes                    # the whole data field, -0x33 applied

    @property
    def secured(self):
        return self.password_level == SECURED_LEVEL


class Ack(NamedTuple):
    address: str
    function: int


class ChangeBaud(NamedTuple):
    address: str
    baud: Optional[int]
    is_response: bool


class Unknown(NamedTuple):
    """A valid frame this module does not interpret (vendor control codes, odd layouts)."""
    frame: Frame
    reason: str


def error_flags(code, version=2007, secured=False):
    names = SERR_BITS if secured else ERR_BITS_2007 if version == 2007 else ERR_BITS_1997
    return tuple(name for bit, name in enumerate(names) if code >> bit & 1)


_VERSION_OF_READ = {READ_DATA: 2007, READ_FOLLOW_UP: 2007,
                    READ_DATA_1997: 1997, READ_FOLLOW_UP_1997: 1997}


def decode(frame):
    """The message a frame carries. Never raises for a checked frame: what it cannot
    interpret comes back as Unknown with the reason."""
    try:
        return _decode(frame)
    except (ValueError, IndexError) as exc:
        return Unknown(frame, "cannot interpret: %s" % exc)


def _decode(frame):
    fn = frame.function
    data = frame.data
    addr = frame.address
    if not frame.is_response:
        if fn in (READ_DATA, READ_FOLLOW_UP, READ_DATA_1997, READ_FOLLOW_UP_1997):
            version = _VERSION_OF_READ[fn]
            width = 4 if version == 2007 else 2
            if fn == READ_FOLLOW_UP and len(data) == 5:
                return ReadRequest(addr, int.from_bytes(data[:4], "little"), 2007, data[4])
            if len(data) != width and not (fn == READ_DATA and len(data) > 4):
                return Unknown(frame, "read request with %d data bytes" % len(data))
            # 2007 load-profile reads (06xxxxxx) carry N and a time after the DI
            return ReadRequest(addr, int.from_bytes(data[:width], "little"), version)
        if fn == READ_ADDRESS and not data:
            return ReadAddressRequest(addr)
        if fn == TIME_SYNC and len(data) == 6:
            return TimeSync(addr, decode_ymdhms(data))
        if fn == RELAY_CONTROL and len(data) >= 8:
            return _decode_relay(addr, data)
        if fn == CHANGE_BAUD and len(data) == 1:
            return ChangeBaud(addr, BAUD_CODES.get(data[0]), False)
        return Unknown(frame, "request with control %02X" % frame.control)
    if frame.is_error:
        if not data:
            return Unknown(frame, "error answer without an error byte")
        version = 1997 if fn in (0x01, 0x02, 0x04, 0x0A, 0x0C, 0x0F, 0x10) else 2007
        secured = len(data) == 2
        code = int.from_bytes(data[:2], "little") if secured else data[0]
        return ErrorResponse(addr, fn, code, error_flags(code, version, secured), version)
    if fn in (READ_DATA, READ_FOLLOW_UP, READ_DATA_1997, READ_FOLLOW_UP_1997):
        version = _VERSION_OF_READ[fn]
        width = 4 if version == 2007 else 2
        if len(data) < width:
            return Unknown(frame, "read answer shorter than its DI")
        di = int.from_bytes(data[:width], "little")
        payload = data[width:]
        seq = None
        if fn == READ_FOLLOW_UP:
            if not payload:
                return Unknown(frame, "follow-up answer without SEQ")
            payload, seq = payload[:-1], payload[-1]
        # a part of a longer answer (0xB1 says more follows, 0x92/0xB2 continue one) is
        # never decoded on its own: its values would be labelled from the wrong offset.
        # join_follow_ups() puts the parts together and decodes them once.
        partial = frame.has_follow_up or fn in (READ_FOLLOW_UP, READ_FOLLOW_UP_1997)
        values = None if partial else decode_values(di, payload, version)
        return ReadResponse(addr, di, version, bytes(payload),
                            tuple(values) if values is not None else None,
                            frame.has_follow_up, seq)
    if fn == READ_ADDRESS and len(data) == 6:
        return AddressResponse(address_from_wire(data))
    if fn == CHANGE_BAUD and len(data) == 1:
        return ChangeBaud(addr, BAUD_CODES.get(data[0]), True)
    if not data and fn in (RELAY_CONTROL, WRITE_DATA, WRITE_DATA_1997, 0x15, 0x16, 0x1D):
        return Ack(addr, fn)
    return Unknown(frame, "answer with control %02X" % frame.control)


MAX_FOLLOW_UPS = 255              # SEQ is one byte


def join_follow_ups(first, parts):
    """The whole answer of a read that came in several frames: the first answer (0xB1) and
    its follow-ups (0x92 last, 0xB2 more) in order, their data joined and decoded once.
    ValueError if the parts do not belong together."""
    payload = bytearray(first.payload)
    for part in parts:
        if part.di != first.di or part.address != first.address:
            raise ValueError("follow-up for %s/%X joined to %s/%X"
                             % (part.address, part.di, first.address, first.di))
        payload += part.payload
    if parts and parts[-1].follow_up:
        raise ValueError("the meter has more follow-up frames")
    values = decode_values(first.di, bytes(payload), first.version)
    return ReadResponse(first.address, first.di, first.version, bytes(payload),
                        tuple(values) if values is not None else None, False, None)


def _decode_relay(addr, data):
    level = data[0]
    password = bytes(data[1:4][::-1]).hex()
    operator = bytes(data[4:8][::-1]).hex().upper()
    if level == SECURED_LEVEL or len(data) != 16:
        return RelayControl(addr, level, password, operator, None, None, bytes(data))
    try:
        command = RelayCommand(data[8])
    except ValueError:
        command = None
    deadline = data[10:16]
    # a deadline of all zeros (seen in a real concentrator's traffic) means none was set
    valid_until = None if not any(deadline) else decode_ymdhms(deadline)
    return RelayControl(addr, level, password, operator, command, valid_until, bytes(data))


def match_answer(request, answer):
    """Why an answer does not belong to a request frame, or None if it does.

    Checks the address (unless the request used the wildcard or short addressing), the
    function code and, for reads, the echoed DI.
    """
    if not answer.is_response:
        return "not an answer (direction bit clear)"
    if answer.function != request.function:
        return "answer function %02X to request %02X" % (answer.function, request.function)
    if "A" not in request.address and answer.address != request.address:
        return "answer from %s to a request for %s" % (answer.address, request.address)
    if "A" in request.address:
        for want, got in zip(request.address, answer.address):
            if want != "A" and want != got:
                return "answer from %s does not match %s" % (answer.address, request.address)
    if request.function in (READ_DATA, READ_FOLLOW_UP) and not answer.is_error:
        if answer.data[:4] != request.data[:4]:
            return "answer DI %s to a request for %s" % (answer.data[:4][::-1].hex().upper(),
                                                        request.data[:4][::-1].hex().upper())
    if request.function in (READ_DATA_1997, READ_FOLLOW_UP_1997) and not answer.is_error:
        if answer.data[:2] != request.data[:2]:
            return "answer DI %s to a request for %s" % (answer.data[:2][::-1].hex().upper(),
                                                        request.data[:2][::-1].hex().upper())
    return None


# ---------------------------------------------------------------- exchanges

# the fixed part of an answer: 68 A0..A5 68 C L ... CS 16
FRAME_OVERHEAD = 12
UNKNOWN_PAYLOAD = 40            # an identifier whose length we do not know: room for it


def exchange(frame, answer_data_len, label=""):
    """The exchange of a request frame built by this module, whose answer carries
    `answer_data_len` data bytes."""
    from protocols.exchange import Exchange
    request = parse_frame(frame)

    def match(raw):
        answer = frame_from_scanner(raw)
        why = match_answer(request, answer)
        if why:
            return None, why
        return decode(answer), None
    return Exchange(frame, FRAME_OVERHEAD + answer_data_len, "dlt645", request.address,
                    match, label)


def read_exchange(address, di, version=2007):
    """Read one data identifier: the request and the answer's length from the value table."""
    from protocols.dlt645_values import payload_length
    width = 4 if version == 2007 else 2
    plen = payload_length(di, version) or UNKNOWN_PAYLOAD
    return exchange(read_data(address, di, version), width + plen, label="%X" % di)


def follow_up_exchange(address, di, seq, version=2007):
    """Read follow-up frame SEQ of a long answer (0x12 with SEQ; 0x02 for 1997)."""
    width = 4 if version == 2007 else 2
    return exchange(read_follow_up(address, di, seq, version),
                    width + UNKNOWN_PAYLOAD + (1 if version == 2007 else 0),
                    label="%X+%d" % (di, seq))


def read_address_exchange(address=WILDCARD):
    return exchange(read_address(address), 6, label="address")


def relay_exchange(frame, label=""):
    """A relay control frame (plaintext or secured): the meter answers with no data."""
    return exchange(frame, 0, label)
