"""DL/T 698.45 (面向对象的用电信息数据交换协议): link frames, typed request constructors, a
total decode, and the exchanges the gateway runs.

Sans-I/O. Facts, worked frames and open doubts: ../shared/reference/dlt698.md (sections
1-7); real frames: ../shared/vectors/dlt698-captures.json. Public sources checked for the
facts used here are named where they are used (RS = chitandahua/dlt698_rs, ASN =
freudshow/dlt698.45 `dlt698.45.asn1`, ICP = icprog/dlt698.45, WSD = float12/WorkProjectsSVN,
as tagged in the reference).

Decisions on the reference's doubts (docs/frame-layer.md says why):
- length bit 14 (kilobyte unit) and bit 15: refused, by the scanner and by parse_frame;
  this module never builds a frame longer than 0x3FFF bytes;
- address flag bit 5: the 2017 reading, an extended logical address byte leads the address
  bytes and is counted in the length nibble; logical addresses 2..255 are only built that
  way. An answer must carry the request's address field byte for byte, so a meter that reads
  the flag the other way answers "foreign", never as someone else;
- broadcast: address type 3 (flag 0xC0) with the one byte AA; the `00 AA` form of one
  concentrator comment is a single address "AA" here, never a broadcast.

Frames are built only through the typed constructors below. Relay control on real meters
goes inside the master station's SECURITY-Request, forwarded unchanged (`security_frame`);
a plaintext ACTION on 8000 is built only by `relay_action`, for meters configured to take it.
"""

import datetime as _dt
import itertools
import os
import sys
from decimal import Decimal
from enum import IntEnum
from typing import Any, NamedTuple, Optional, Tuple

from protocols.dlt698_data import (ARRAY, DAR, DATE_TIME_S, DOUBLE_LONG_UNSIGNED, ENUM,
                                   LONG_UNSIGNED, OAD, OAD_T, OMD, RSD, STRUCTURE, UNSIGNED,
                                   BOOL, CSD, BitString, DataError, Raw, Reader, dar_name,
                                   encode_data, encode_date_time_s, encode_length)
from protocols.dlt698_data import _date_time_s
from protocols.dlt645_values import Value
from protocols.framing import MAX_DLT698_FRAME, crc16_x25

__all__ = ["OAD", "OMD", "RSD", "CSD", "DAR", "dar_name", "Value", "DataError"]

PREAMBLE = b"\xFE\xFE\xFE\xFE"

# control byte (reference section 1, RS `CtrlField`)
DIR_BIT = 0x80                 # 1: sent by the server (meter)
PRM_BIT = 0x40                 # 1: the client (master) started this exchange
SEGMENT_BIT = 0x20             # link-layer fragment
SCRAMBLE_BIT = 0x08
FN_LINK = 1                    # link management (LINK login / heartbeat)
FN_DATA = 3                    # user data (APDUs)
CLIENT_REQUEST = PRM_BIT | FN_DATA            # 0x43

# server address types (flag bits 6-7)
SINGLE, WILDCARD, GROUP, BROADCAST = 0, 1, 2, 3
KINDS = ("single", "wildcard", "group", "broadcast")
LENGTH_UNIT_BIT = 0x4000       # length field bit 14: refused (docs/frame-layer.md)

# APDU tags (ASN `Client-APDU` / `Server-APDU`; the RS README table agrees)
LINK_REQUEST, LINK_RESPONSE = 0x01, 0x81
GET_REQUEST, GET_RESPONSE = 0x05, 0x85
SET_REQUEST, SET_RESPONSE = 0x06, 0x86
ACTION_REQUEST, ACTION_RESPONSE = 0x07, 0x87
REPORT_NOTIFICATION = 0x88
PROXY_REQUEST, PROXY_RESPONSE = 0x09, 0x89
SECURITY_REQUEST, SECURITY_RESPONSE = 0x10, 0x90
ERROR_RESPONSE = 0xEE

NORMAL, NORMAL_LIST, RECORD, RECORD_LIST, NEXT = 1, 2, 3, 4, 5

SERVICE_NAMES = {
    (GET_REQUEST, NORMAL): "GET-Request-Normal", (GET_REQUEST, NORMAL_LIST):
    "GET-Request-NormalList", (GET_REQUEST, RECORD): "GET-Request-Record",
    (GET_REQUEST, NEXT): "GET-Request-Next",
    (GET_RESPONSE, NORMAL): "GET-Response-Normal", (GET_RESPONSE, NORMAL_LIST):
    "GET-Response-NormalList", (GET_RESPONSE, RECORD): "GET-Response-Record",
    (GET_RESPONSE, NEXT): "GET-Response-Next",
    (SET_REQUEST, NORMAL): "SET-Request-Normal", (SET_RESPONSE, NORMAL): "SET-Response-Normal",
    (ACTION_REQUEST, NORMAL): "ACTION-Request-Normal",
    (ACTION_RESPONSE, NORMAL): "ACTION-Response-Normal",
}

# objects (reference section 5)
CLOCK = OAD(0x4000, 2, 0)
COMM_ADDRESS = OAD(0x4001, 2, 0)
STATUS_WORDS = OAD(0x2014, 2, 0)
DAY_FREEZE = OAD(0x5004, 2, 0)
FREEZE_TIME = OAD(0x2021, 2, 0)
RECORD_NUMBER = OAD(0x2023, 2, 0)
REMOTE_CONTROL = 0x8000
PROTECT = 0x8001
RELAY_OUTPUT = OAD(0xF205, 2, 1)     # relay output unit 1: the OAD inside 8000 parameters
CLOCK_BROADCAST_METHOD = 127         # 4000 method 127: broadcast time (reference section 7)


class RelayMethod(IntEnum):
    """8000 (remote control) and 8001 (protection) methods, reference section 6 (ICP
    `lib698/class8.c` class8000_act_route / class8001_act_route)."""
    ALARM = 127
    ALARM_RELEASE = 128
    TRIP = 129
    CLOSE = 130


class ProtectMethod(IntEnum):
    ON = 127
    OFF = 128
    RELEASE_AUTO = 129


class FrameError(ValueError):
    """A byte string that is not a valid DL/T 698.45 link frame (one line: what is wrong)."""


# ---------------------------------------------------------------- addresses

class ServerAddress(NamedTuple):
    kind: int            # SINGLE, WILDCARD, GROUP, BROADCAST
    address: str         # hex digits as on the nameplate (high digit first); 'A' wildcards
    logical: int         # 0/1 from bit 4, or the extended logical address byte (bit 5)
    flag: int            # the flag byte as sent
    wire: bytes          # the bytes after the flag (extended logical byte included)

    @property
    def field(self):
        """The whole address field as on the wire: flag byte and address bytes."""
        return bytes((self.flag,)) + self.wire

    @property
    def kind_name(self):
        return KINDS[self.kind]

    def __str__(self):
        extra = "" if not self.logical else "/%d" % self.logical
        return "%s%s%s" % ("" if self.kind == SINGLE else self.kind_name + ":",
                           self.address, extra)


def server_address(address, kind=SINGLE, logical=0):
    """The address field for `address` (hex digits as on the nameplate, 'A' for wildcard
    digits), of type `kind`, with a logical address: 0/1 in flag bit 4, 2..255 as the
    extended logical address byte (flag bit 5, the 2017 reading)."""
    a = str(address).strip().upper()
    if len(a) % 2:
        a = "0" + a
    allowed = "0123456789A" if kind != SINGLE else "0123456789"
    if not 2 <= len(a) <= 32 or any(c not in allowed for c in a):
        raise ValueError("a DL/T 698.45 %s address is 1-16 bytes of digits%s: %r"
                         % (KINDS[kind], " (A for wildcard)" if kind != SINGLE else "",
                            address))
    if kind not in (SINGLE, WILDCARD, GROUP, BROADCAST):
        raise ValueError("address type is 0..3")
    wire = bytes.fromhex(a)[::-1]
    if logical in (0, 1):
        flag = kind << 6 | logical << 4 | (len(wire) - 1)
    elif 2 <= logical <= 255:
        if len(wire) + 1 > 16:
            raise ValueError("no room for an extended logical address")
        wire = bytes((logical,)) + wire
        flag = kind << 6 | 0x20 | (len(wire) - 1)
    else:
        raise ValueError("logical address is 0..255: %r" % (logical,))
    return ServerAddress(kind, a, logical, flag, wire)


BROADCAST_ADDRESS = server_address("AA", BROADCAST)          # flag C0, AA
WILDCARD_ADDRESS = server_address("AAAAAAAAAAAA", WILDCARD)  # flag 45, AA x 6


def _read_address(raw, pos):
    """(ServerAddress, position after it) from the flag byte at raw[pos]."""
    flag = raw[pos]
    n = (flag & 0x0F) + 1
    wire = bytes(raw[pos + 1:pos + 1 + n])
    if len(wire) != n:
        raise FrameError("address flag %02X announces %d bytes, %d present"
                         % (flag, n, len(wire)))
    kind = flag >> 6
    if flag & 0x20:
        if n < 2:
            raise FrameError("address flag %02X: extended logical address without an "
                             "address" % flag)
        logical, addr = wire[0], wire[1:]
    else:
        logical, addr = (flag >> 4) & 1, wire
    return ServerAddress(kind, addr[::-1].hex().upper(), logical, flag, wire), pos + 1 + n


# ---------------------------------------------------------------- link frames

class Frame(NamedTuple):
    control: int
    sa: ServerAddress
    ca: int
    user_data: bytes      # the APDU (or, with the segmentation bit, the fragment)
    raw: bytes            # the exact frame, 0x68 .. 0x16, no wake-up bytes

    @property
    def function(self):
        return self.control & 0x07

    @property
    def is_response(self):
        """Sent by the server (DIR = 1)."""
        return bool(self.control & DIR_BIT)

    @property
    def client_started(self):
        return bool(self.control & PRM_BIT)

    @property
    def segmented(self):
        return bool(self.control & SEGMENT_BIT)

    @property
    def scrambled(self):
        return bool(self.control & SCRAMBLE_BIT)

    @property
    def address(self):
        return self.sa.address


def build_frame(control, sa, user_data, ca=0x00, preamble=True, allow_empty=False):
    """Bytes of a link frame. Call the typed constructors below instead."""
    if control & 0x07 not in (FN_LINK, FN_DATA):
        raise ValueError("function code %d is not link management (1) or user data (3)"
                         % (control & 0x07))
    if not user_data and not allow_empty:
        raise ValueError("a frame carries at least one byte of user data")
    length = 2 + 1 + len(sa.field) + 1 + 2 + len(user_data) + 2
    if length > 0x3FFF:
        raise ValueError("frame of %d bytes exceeds the 14-bit length field" % (length + 2))
    head = length.to_bytes(2, "little") + bytes((control,)) + sa.field + bytes((ca & 0xFF,))
    head += crc16_x25(head).to_bytes(2, "little")
    body = head + bytes(user_data)
    frame = b"\x68" + body + crc16_x25(body).to_bytes(2, "little") + b"\x16"
    return PREAMBLE + frame if preamble else frame


def parse_frame(raw):
    """A Frame from bytes (wake-up bytes allowed); raises FrameError naming the fault."""
    raw = bytes(raw)
    start = 0
    while start < len(raw) and raw[start] == 0xFE:
        start += 1
    raw = raw[start:]
    if len(raw) < 5 or raw[0] != 0x68:
        raise FrameError("no 68 start byte or too short")
    length = raw[1] | raw[2] << 8
    if length & LENGTH_UNIT_BIT:
        raise FrameError("length field %04X has bit 14 (kilobyte unit) set: not supported"
                         % length)
    if length & 0x8000:
        raise FrameError("length field %04X has reserved bit 15 set" % length)
    n = length + 2
    if len(raw) < n:
        raise FrameError("length field says %d bytes, %d present" % (n, len(raw)))
    raw = raw[:n]
    control = raw[3]
    if control & 0x07 not in (FN_LINK, FN_DATA):
        raise FrameError("function code %d in control %02X" % (control & 0x07, control))
    sa, pos = _read_address(raw, 4)
    if pos + 3 > n - 4:
        raise FrameError("frame too short for its header")
    hcs = crc16_x25(raw[1:pos + 1])
    if raw[pos + 1:pos + 3] != hcs.to_bytes(2, "little"):
        raise FrameError("HCS %s, computed %04X (low byte first)"
                         % (raw[pos + 1:pos + 3].hex(" ").upper(), hcs))
    fcs = crc16_x25(raw[1:n - 3])
    if raw[n - 3:n - 1] != fcs.to_bytes(2, "little"):
        raise FrameError("FCS %s, computed %04X (low byte first)"
                         % (raw[n - 3:n - 1].hex(" ").upper(), fcs))
    if raw[n - 1] != 0x16:
        raise FrameError("end byte %02X, not 16" % raw[n - 1])
    return Frame(control, sa, raw[pos], raw[pos + 3:n - 3], raw)


def frame_from_scanner(raw):
    """Fast path for bytes Scanner("dlt698") already checked (length, HCS, FCS, end)."""
    sa, pos = _read_address(raw, 4)
    return Frame(raw[3], sa, raw[pos], bytes(raw[pos + 3:len(raw) - 3]), bytes(raw))


# ---------------------------------------------------------------- PIID

_piids = itertools.count()


def next_piid():
    """A request's PIID: sequence number 0..63 (bits 0-5), priority bit clear."""
    return next(_piids) & 0x3F


def _piid(piid):
    if piid is None:
        return next_piid()
    if not 0 <= piid <= 0xFF:
        raise ValueError("PIID is one byte")
    return piid


def _time_tag(when=None, ti=None):
    """The optional TimeTag of client APDUs: absent, or send time + allowed delay (TI)."""
    if when is None:
        return b"\x00"
    unit, count = ti or (1, 5)                # 5 minutes unless told
    return b"\x01" + encode_date_time_s(when) + bytes((unit,)) + count.to_bytes(2, "big")


# ---------------------------------------------------------------- request constructors

def _address(address, logical=0):
    return address if isinstance(address, ServerAddress) else server_address(address,
                                                                             logical=logical)


def get_request(address, oad, piid=None, logical=0, ca=0x00, time_tag=None):
    """GET-Request-Normal `05 01 PIID OAD TimeTag` (reference section 2, CAP #44)."""
    apdu = bytes((GET_REQUEST, NORMAL, _piid(piid))) + OAD(*oad).encode() + _time_tag(time_tag)
    return build_frame(CLIENT_REQUEST, _address(address, logical), apdu, ca)


def get_list_request(address, oads, piid=None, logical=0, ca=0x00, time_tag=None):
    """GET-Request-NormalList `05 02 PIID n OAD x n` (CAP #30, #68)."""
    oads = [OAD(*o) for o in oads]
    if not 1 <= len(oads) <= 127:
        raise ValueError("a NormalList reads 1..127 OADs")
    apdu = bytes((GET_REQUEST, NORMAL_LIST, _piid(piid), len(oads))) + \
        b"".join(o.encode() for o in oads) + _time_tag(time_tag)
    return build_frame(CLIENT_REQUEST, _address(address, logical), apdu, ca)


def get_record_request(address, oad, rsd, columns, piid=None, logical=0, ca=0x00):
    """GET-Request-Record `05 03 PIID OAD RSD RCSD` (CAP #71, #73, #75)."""
    apdu = bytes((GET_REQUEST, RECORD, _piid(piid))) + OAD(*oad).encode() + rsd.encode() + \
        bytes((len(columns),)) + b"".join(CSD(OAD(*c)).encode() if not isinstance(c, CSD)
                                          else c.encode() for c in columns) + b"\x00"
    return build_frame(CLIENT_REQUEST, _address(address, logical), apdu, ca)


def get_next_request(address, piid, seq, logical=0, ca=0x00):
    """GET-Request-Next `05 05 PIID seq`: the block after `seq`, the last one received
    whole (ASN `GetRequestNext`); the PIID is the original request's."""
    apdu = bytes((GET_REQUEST, NEXT, _piid(piid))) + int(seq).to_bytes(2, "big") + b"\x00"
    return build_frame(CLIENT_REQUEST, _address(address, logical), apdu, ca)


def fragment_frame(control, sa, seq, kind, payload=b"", ca=0x00):
    """A link-layer fragment frame (control bit 5): the format word (sequence 0..4095 in
    bits 0-11, type in bits 14-15: first 0, last 1, confirm 2, middle 3; reference
    section 1, RS `FragmentTag`, CAP #16-#20) then the payload."""
    word = (int(seq) & 0x0FFF) | _FRAGMENT_KINDS.index(kind) << 14
    return build_frame(control | SEGMENT_BIT, sa, word.to_bytes(2, "little") + bytes(payload),
                       ca, allow_empty=True)


def fragment_confirm(sa, seq, ca=0x00):
    """The client's confirmation of the server fragment `seq` (C = 0x63, no payload;
    CAP #17)."""
    return fragment_frame(CLIENT_REQUEST, sa, seq, "confirm", b"", ca)


def set_request(address, oad, data, piid=None, logical=0, ca=0x00, time_tag=None):
    """SET-Request-Normal `06 01 PIID OAD Data` (CAP #50). `data` is encoded Data bytes."""
    apdu = bytes((SET_REQUEST, NORMAL, _piid(piid))) + OAD(*oad).encode() + bytes(data) + \
        _time_tag(time_tag)
    return build_frame(CLIENT_REQUEST, _address(address, logical), apdu, ca)


def action_request(address, omd, data, piid=None, logical=0, ca=0x00, time_tag=None,
                   ti=None):
    """ACTION-Request-Normal `07 01 PIID OMD Data` (CAP #0); with `time_tag` (the send
    time) a TimeTag whose allowed delay is `ti` = (unit, count), 5 minutes unless told."""
    apdu = bytes((ACTION_REQUEST, NORMAL, _piid(piid))) + OMD(*omd).encode() + bytes(data) + \
        _time_tag(time_tag, ti)
    return build_frame(CLIENT_REQUEST, _address(address, logical), apdu, ca)


def set_clock(address, when, piid=None, logical=0, ca=0x00):
    """SET 4000 0200 := date_time_s (CAP #50)."""
    return set_request(address, CLOCK, encode_data(DATE_TIME_S, when), piid, logical, ca)


def broadcast_time_sync(when, piid=None, ca=0x00):
    """Broadcast time: ACTION 4000 method 127 with a date_time_s to the broadcast address
    (flag C0, AA), reference section 7. No meter answers it. `when` is the meters' local
    time."""
    return action_request(BROADCAST_ADDRESS, OMD(0x4000, CLOCK_BROADCAST_METHOD),
                          encode_data(DATE_TIME_S, when), piid, ca=ca)


def relay_action(address, method, when, piid=None, logical=0, ca=0x00, *, relay=RELAY_OUTPUT,
                 alarm_delay_min=0, off_minutes=0, auto_close=False, direct=False,
                 valid_s=300):
    """Plaintext ACTION on 8000 (remote control), for meters configured to accept it (test
    meters, the simulator); real meters take relay control only inside the master
    station's SECURITY-Request (reference section 6). Parameters per ICP
    `lib698/class8.c`: trip (129) = array of structure{relay OAD, alarm delay unsigned
    (min), power-off duration long-unsigned (min), auto-close bool}; close (130) = array
    of structure{relay OAD, enum 0 allow close / 1 direct close}. A time tag is always
    sent (ICP and P698: meters refuse 8000 without one, DAR 32), allowing `valid_s`
    seconds of delay (TI unit 0 = seconds)."""
    method = RelayMethod(method)
    if method == RelayMethod.TRIP:
        params = encode_data(ARRAY, [(STRUCTURE, [
            (OAD_T, OAD(*relay)), (UNSIGNED, alarm_delay_min), (LONG_UNSIGNED, off_minutes),
            (BOOL, auto_close)])])
    elif method == RelayMethod.CLOSE:
        params = encode_data(ARRAY, [(STRUCTURE, [(OAD_T, OAD(*relay)),
                                                  (ENUM, 1 if direct else 0)])])
    else:
        params = b"\x00"
    if not isinstance(when, _dt.datetime):
        raise TypeError("relay_action needs the send time (the meter's local time)")
    return action_request(address, OMD(REMOTE_CONTROL, int(method)), params, piid, logical,
                          ca, time_tag=when, ti=_seconds(valid_s))


def protect_action(address, method, when, piid=None, logical=0, ca=0x00, valid_s=300):
    """Plaintext ACTION on 8001 (protection, 保电): on 127, off 128 (no parameter); time
    tagged like relay_action (ICP refuses 8001-127 without a tag)."""
    method = ProtectMethod(method)
    return action_request(address, OMD(PROTECT, int(method)), b"\x00", piid, logical, ca,
                          time_tag=when, ti=_seconds(valid_s))


def _seconds(n):
    """TI of n seconds (unit 0), the long-unsigned count bounded."""
    if not 1 <= int(n) <= 0xFFFF:
        raise ValueError("a time tag's delay is 1..65535 s")
    return (0, int(n))


def security_frame(address, apdu, logical=0, ca=0x00):
    """The master station's SECURITY-Request APDU (ciphertext + MAC, made by its encryption
    machine), forwarded unchanged in a frame to the meter."""
    apdu = bytes(apdu)
    if len(apdu) < 4 or apdu[0] != SECURITY_REQUEST or apdu[1] not in (0, 1):
        raise ValueError("a SECURITY-Request APDU starts 10 00 or 10 01")
    return build_frame(CLIENT_REQUEST, _address(address, logical), apdu, ca)


def security_request_apdu(apdu, ciphertext=False, sid=(0, b""), mac=b"", rn=None):
    """A SECURITY-Request APDU `10 choice len APDU verify` around `apdu`: verified by
    SID_MAC (choice 0: SID{double-long-unsigned, octet-string} + MAC octet-string), or by RN
    (choice 1) when `rn` is given (reference section 6, ASN `SecurityRequest`). Real relay
    payloads come from the master station's encryption machine, ciphertext and MAC made
    with the meter's ESAM keys, which the gateway does not hold: this builds the shape, for
    tests and drills."""
    body = bytes(apdu)
    head = bytes((SECURITY_REQUEST, 1 if ciphertext else 0)) + encode_length(len(body)) + body
    if rn is not None:
        return head + b"\x01" + encode_length(len(rn)) + bytes(rn)
    ident, extra = sid
    return head + b"\x00" + int(ident).to_bytes(4, "big") + encode_length(len(extra)) + \
        bytes(extra) + encode_length(len(mac)) + bytes(mac)


# ---------------------------------------------------------------- answers (meter side)

def _server_control(request_control=CLIENT_REQUEST):
    return DIR_BIT | (request_control & PRM_BIT) | FN_DATA


def _result(value_bytes=None, dar=None):
    """A Get-Result: 01 Data, or 00 DAR (ASN; CAP #45, #70)."""
    if dar is not None:
        return bytes((0, int(dar)))
    return b"\x01" + bytes(value_bytes)


def get_response(sa, piid, oad, data=None, dar=None, ca=0x00):
    """GET-Response-Normal `85 01 PIID-ACD OAD Get-Result 00 00` (CAP #45)."""
    apdu = bytes((GET_RESPONSE, NORMAL, piid)) + OAD(*oad).encode() + _result(data, dar) + \
        b"\x00\x00"
    return build_frame(_server_control(), sa, apdu, ca)


def get_list_response(sa, piid, results, ca=0x00):
    """GET-Response-NormalList; results: [(oad, data bytes or None, dar or None)]."""
    apdu = bytes((GET_RESPONSE, NORMAL_LIST, piid, len(results))) + b"".join(
        OAD(*o).encode() + _result(d, r) for o, d, r in results) + b"\x00\x00"
    return build_frame(_server_control(), sa, apdu, ca)


def get_record_response(sa, piid, oad, columns, rows=None, dar=None, ca=0x00):
    """GET-Response-Record `85 03 PIID-ACD OAD RCSD (00 DAR | 01 M rows)` (CAP #72, #74);
    rows are lists of encoded Data bytes, one per column."""
    head = bytes((GET_RESPONSE, RECORD, piid)) + OAD(*oad).encode() + \
        bytes((len(columns),)) + b"".join(c.encode() for c in columns)
    if dar is not None:
        body = bytes((0, int(dar)))
    else:
        body = b"\x01" + bytes((len(rows),)) + b"".join(b"".join(r) for r in rows)
    return build_frame(_server_control(), sa, head + body + b"\x00\x00", ca)


def get_next_response(sa, piid, last, seq, results=None, records=None, dar=None, ca=0x00):
    """GET-Response-Next `85 05 PIID-ACD last seq (00 DAR | 01 n A-ResultNormal |
    02 n A-ResultRecord) 00 00`. results: [(oad, data bytes or None, dar or None)];
    records: encoded A-ResultRecord bytes (OAD RCSD ResponseData) each."""
    head = bytes((GET_RESPONSE, NEXT, piid, 1 if last else 0)) + int(seq).to_bytes(2, "big")
    if dar is not None:
        body = bytes((0, int(dar)))
    elif records is not None:
        body = b"\x02" + encode_length(len(records)) + b"".join(records)
    else:
        body = b"\x01" + encode_length(len(results)) + b"".join(
            OAD(*o).encode() + _result(d, r) for o, d, r in results)
    return build_frame(_server_control(), sa, head + body + b"\x00\x00", ca)


def set_response(sa, piid, oad, dar=0, ca=0x00):
    """SET-Response-Normal `86 01 PIID-ACD OAD DAR 00 00` (CAP #51)."""
    apdu = bytes((SET_RESPONSE, NORMAL, piid)) + OAD(*oad).encode() + bytes((int(dar),)) + \
        b"\x00\x00"
    return build_frame(_server_control(), sa, apdu, ca)


def action_response(sa, piid, omd, dar=0, data=None, ca=0x00):
    """ACTION-Response-Normal `87 01 PIID-ACD OMD DAR OPTIONAL-Data 00 00` (CAP #1)."""
    apdu = bytes((ACTION_RESPONSE, NORMAL, piid)) + OMD(*omd).encode() + bytes((int(dar),)) + \
        (b"\x00" if data is None else b"\x01" + bytes(data)) + b"\x00\x00"
    return build_frame(_server_control(), sa, apdu, ca)


def security_response(sa, apdu=b"", mac=None, dar=None, ciphertext=False, ca=0x00):
    """SECURITY-Response `90 choice len APDU [01 00 MAC]` (CAP #22), or `90 02 DAR 00`: the
    OPTIONAL verification follows the DAR choice too (ASN `SECURITY-Response`)."""
    if dar is not None:
        return build_frame(_server_control(), sa, bytes((SECURITY_RESPONSE, 2, int(dar), 0)),
                           ca)
    body = bytes((SECURITY_RESPONSE, 1 if ciphertext else 0)) + encode_length(len(apdu)) + \
        bytes(apdu) + (b"\x00" if mac is None else b"\x01\x00" + encode_length(len(mac)) +
                       bytes(mac))
    return build_frame(_server_control(), sa, body, ca)


def link_response(sa, piid, requested, received, responded, result=0, ca=0x00):
    """LINK-Response `81 PIID result(bit-string 8) date_time x 3` (ASN `LINK-Response`) in
    a link-management frame from the master (C = 01), answering a terminal's login or
    heartbeat; the times are date_time (10 bytes, weekday and milliseconds)."""
    apdu = bytes((LINK_RESPONSE, piid & 0xFF, result & 0xFF)) + b"".join(
        _date_time10_bytes(t) for t in (requested, received, responded))
    return build_frame(FN_LINK, sa, apdu, ca)


def _date_time10_bytes(t):
    """date_time: year(2) month day weekday(0 = Sunday) hour minute second ms(2)."""
    return t.year.to_bytes(2, "big") + bytes((t.month, t.day, t.isoweekday() % 7, t.hour,
                                              t.minute, t.second)) + \
        (t.microsecond // 1000).to_bytes(2, "big")


def error_response(sa, piid, code=2, ca=0x00):
    """ERROR-Response `EE PIID-ACD type` (1 APDU unparseable, 2 unsupported, 255 other)."""
    return build_frame(_server_control(), sa, bytes((ERROR_RESPONSE, piid, code)), ca)


# ---------------------------------------------------------------- decoded messages

class GetRequest(NamedTuple):
    piid: int
    oads: Tuple[OAD, ...]          # one for Normal
    listed: bool                   # NormalList
    time_tag: Optional[tuple] = None


class GetRecordRequest(NamedTuple):
    piid: int
    oad: OAD
    rsd: RSD
    columns: Tuple[CSD, ...]


class SetRequest(NamedTuple):
    piid: int
    oad: OAD
    value: Any
    time_tag: Optional[tuple] = None


class ActionRequest(NamedTuple):
    piid: int
    omd: OMD
    value: Any
    time_tag: Optional[tuple] = None


class GetResult(NamedTuple):
    oad: OAD
    value: Any                     # the Data as Python values; None with a DAR
    dar: Optional[DAR] = None      # set when the meter answered an error for this OAD

    @property
    def ok(self):
        return self.dar is None


class GetResponse(NamedTuple):
    piid: int
    results: Tuple[GetResult, ...]  # one for Normal
    listed: bool

    @property
    def result(self):
        return self.results[0]


class GetRecordResponse(NamedTuple):
    piid: int
    oad: OAD
    columns: Tuple[CSD, ...]
    rows: Tuple[tuple, ...]         # each row: one value per column
    dar: Optional[DAR] = None


class GetNextRequest(NamedTuple):
    """GET-Request-Next: the next block after `seq`, the last one received whole."""
    piid: int
    seq: int
    time_tag: Optional[tuple] = None


class GetNextResponse(NamedTuple):
    """GET-Response-Next: one block of an answer split by the meter (APDU-level block
    transfer, ASN `GetResponseNext`): results (GetResult) or records (GetRecordResponse)."""
    piid: int
    last: bool
    seq: int
    results: Tuple[Any, ...] = ()
    records: bool = False           # the blocks carry A-ResultRecord
    dar: Optional[DAR] = None


class SetResponse(NamedTuple):
    piid: int
    oad: OAD
    dar: DAR


class ActionResponse(NamedTuple):
    piid: int
    omd: OMD
    dar: DAR
    value: Any = None


class SecurityRequest(NamedTuple):
    ciphertext: bool
    apdu: bytes                     # the inner APDU (plaintext) or the ciphertext
    verify: int                     # 0 SID_MAC, 1 RN, 2 RN_MAC, 3 SID
    inner: Any = None               # the decoded plaintext APDU


class SecurityResponse(NamedTuple):
    ciphertext: bool
    apdu: bytes
    dar: Optional[DAR] = None
    mac: Optional[bytes] = None
    inner: Any = None


class LinkRequest(NamedTuple):
    piid: int
    kind: str                       # login, heartbeat, logout
    heartbeat_s: int
    when: Any


class LinkResponse(NamedTuple):
    """The master's answer to a LINK-Request (login, heartbeat, logout)."""
    piid: int
    result: int                     # the result bit-string(8), as its byte
    requested: Any                  # the request's time, as the request said it
    received: Any
    responded: Any


class ErrorResponse(NamedTuple):
    piid: int
    code: int


class Fragment(NamedTuple):
    """A link-layer fragment (control bit 5): sequence 0..4095 and its type."""
    seq: int
    kind: str                       # first, last, confirm, middle
    payload: bytes


class Unknown(NamedTuple):
    """A valid frame this module does not interpret, with the reason."""
    frame: Frame
    reason: str


class Message(NamedTuple):
    """A decoded frame: who sent it (its address field) and what it says."""
    frame: Frame
    apdu: Any                       # one of the messages above

    @property
    def sa(self):
        return self.frame.sa


_FRAGMENT_KINDS = ("first", "last", "confirm", "middle")
_LINK_KINDS = ("login", "heartbeat", "logout")


def decode(frame):
    """The message a checked frame carries, as Message(frame, apdu). Never raises: what it
    cannot interpret comes back as Unknown(frame, reason)."""
    try:
        if frame.segmented:
            d = frame.user_data
            if len(d) < 2:
                return Unknown(frame, "fragment without its format word")
            word = d[0] | d[1] << 8
            return Message(frame, Fragment(word & 0x0FFF, _FRAGMENT_KINDS[word >> 14],
                                           bytes(d[2:])))
        if frame.scrambled:
            return Unknown(frame, "scrambled user data (control bit 3) is not interpreted")
        apdu = _decode_apdu(frame.user_data)
        if isinstance(apdu, str):
            return Unknown(frame, apdu)
        return Message(frame, apdu)
    except (DataError, ValueError, IndexError) as exc:
        return Unknown(frame, "cannot interpret: %s" % exc)


def decode_apdu(data, depth=0):
    """An APDU's message, or a string saying why it is not understood. Raises DataError
    on truncated or malformed content (decode turns it into Unknown). The tag says who
    speaks (client APDUs below 0x80, server APDUs from 0x80), not the control byte: RS's
    reassembly test (CAP #21) carries a GET-Request in a C=0x83 frame."""
    r = Reader(data)
    tag = r.u8()
    if depth > 1:
        raise DataError("security APDU nested in a security APDU")
    if tag == SECURITY_REQUEST:
        choice = r.u8()
        if choice not in (0, 1):
            return "SECURITY-Request choice %d" % choice
        inner = r.take(r.length())
        verify = r.u8()
        inner_msg = None if choice else _decode_apdu(inner, depth + 1)
        if isinstance(inner_msg, str):
            inner_msg = None                 # plaintext we do not interpret: carried as is
        return SecurityRequest(bool(choice), inner, verify, inner_msg)
    if tag == SECURITY_RESPONSE:
        choice = r.u8()
        if choice == 2:
            return SecurityResponse(False, b"", DAR(r.u8()))
        if choice not in (0, 1):
            return "SECURITY-Response choice %d" % choice
        inner = r.take(r.length())
        mac = None
        if r.left and r.u8() == 1:           # OPTIONAL verification: 00 MAC(len, bytes)
            if r.u8() != 0:
                return "SECURITY-Response verification other than MAC"
            mac = r.take(r.length())
        inner_msg = None if choice else _decode_apdu(inner, depth + 1)
        if isinstance(inner_msg, str):
            inner_msg = None
        return SecurityResponse(bool(choice), inner, None, mac, inner_msg)
    if tag == ERROR_RESPONSE:
        return ErrorResponse(r.u8(), r.u8())
    if tag == LINK_RESPONSE:
        piid, result = r.u8(), r.u8()
        return LinkResponse(piid, result, _date_time10(r.take(10)),
                            _date_time10(r.take(10)), _date_time10(r.take(10)))
    if tag == LINK_REQUEST:
        piid = r.u8()
        kind = r.u8()
        period = r.uint(2)
        when = _date_time10(r.take(10))
        return LinkRequest(piid, _LINK_KINDS[kind] if kind < 3 else "type %d" % kind,
                           period, when)
    if (tag & 0x7F) in (GET_REQUEST, SET_REQUEST, ACTION_REQUEST):
        choice = r.u8()
        piid = r.u8()
        handler = _HANDLERS.get((tag, choice))
        if handler is None:
            return "%s choice %d not interpreted" % (_tag_name(tag), choice)
        msg = handler(r, piid)
        if isinstance(msg, str):
            return msg
        tag_ = _trailer(r, bool(tag & 0x80))
        if tag_ is not None and "time_tag" in msg._fields:
            msg = msg._replace(time_tag=tag_)
        return msg
    return "APDU %02X (%s) not interpreted" % (tag, _tag_name(tag))


# the pure twin's own, also where decode_apdu is the compiled one (end of this module)
_decode_apdu = decode_apdu


def _tag_name(tag):
    return {0x01: "LINK-Request", 0x81: "LINK-Response", 0x02: "CONNECT-Request",
            0x82: "CONNECT-Response", 0x03: "RELEASE-Request", 0x83: "RELEASE-Response",
            0x84: "RELEASE-Notification", 0x05: "GET-Request", 0x85: "GET-Response",
            0x06: "SET-Request", 0x86: "SET-Response", 0x07: "ACTION-Request",
            0x87: "ACTION-Response", 0x08: "REPORT-Response", 0x88: "REPORT-Notification",
            0x09: "PROXY-Request", 0x89: "PROXY-Response", 0x10: "SECURITY-Request",
            0x90: "SECURITY-Response", 0x6E: "ERROR-Response",
            0xEE: "ERROR-Response"}.get(tag, "unknown")


def _trailer(r, from_server):
    """FollowReport OPTIONAL (server) then TimeTag OPTIONAL; a missing trailer is taken
    as absent (some meters stop after the result); anything else left is an error.
    Returns the time tag as (send time, (TI unit, count)), or None."""
    if from_server and r.left:
        if r.u8() == 1:
            return None                  # a follow report: not interpreted, not needed
    tag = None
    if r.left:
        flag = r.u8()
        if flag == 1:
            b = r.take(10)
            tag = (_date_time_s(b[:7]), (b[7], int.from_bytes(b[8:10], "big")))
        elif flag != 0:
            raise DataError("time tag flag %02X" % flag)
    if r.left:
        raise DataError("%d bytes after the APDU" % r.left)
    return tag


def _date_time10(b):
    try:
        ms = int.from_bytes(b[8:10], "big")
        return _dt.datetime(int.from_bytes(b[:2], "big"), b[2], b[3], b[5], b[6], b[7],
                            min(ms, 999) * 1000)
    except ValueError:
        return Raw(25, bytes(b), "not a valid date_time")


def _get_result(r, oad):
    choice = r.u8()
    if choice == 0:
        return GetResult(oad, None, DAR(r.u8()))
    if choice == 1:
        return GetResult(oad, r.data_value())
    raise DataError("Get-Result choice %d" % choice)


def _h_get_normal(r, piid):
    return GetRequest(piid, (r.oad(),), False)


def _h_get_list(r, piid):
    n = r.length()
    return GetRequest(piid, tuple(r.oad() for _ in range(n)), True)


def _h_get_record(r, piid):
    oad = r.oad()
    rsd = r.rsd()
    return GetRecordRequest(piid, oad, rsd, r.rcsd())


def _h_set_normal(r, piid):
    oad = r.oad()
    return SetRequest(piid, oad, r.data_value())


def _h_action_normal(r, piid):
    omd = r.omd()
    return ActionRequest(piid, omd, r.data_value())


def _h_get_response(r, piid):
    oad = r.oad()
    return GetResponse(piid, (_get_result(r, oad),), False)


def _h_get_list_response(r, piid):
    n = r.length()
    return GetResponse(piid, tuple(_get_result(r, r.oad()) for _ in range(n)), True)


def _h_get_next(r, piid):
    return GetNextRequest(piid, r.uint(2))


def _h_get_next_response(r, piid):
    last = r.u8() != 0
    seq = r.uint(2)
    choice = r.u8()
    if choice == 0:
        return GetNextResponse(piid, last, seq, (), False, DAR(r.u8()))
    if choice == 1:
        n = r.length()
        if n > r.left:
            raise DataError("%d results in %d bytes" % (n, r.left))
        return GetNextResponse(piid, last, seq, tuple(_get_result(r, r.oad())
                                                      for _ in range(n)))
    if choice == 2:
        n = r.length()
        if n > r.left:
            raise DataError("%d records in %d bytes" % (n, r.left))
        return GetNextResponse(piid, last, seq, tuple(_h_get_record_response(r, piid)
                                                      for _ in range(n)), True)
    raise DataError("GET-Response-Next choice %d" % choice)


def _h_get_record_response(r, piid):
    oad = r.oad()
    columns = r.rcsd()
    choice = r.u8()
    if choice == 0:
        return GetRecordResponse(piid, oad, columns, (), DAR(r.u8()))
    if choice != 1:
        raise DataError("record result choice %d" % choice)
    m = r.length()
    if m * max(1, len(columns)) > r.left:
        raise DataError("%d rows of %d columns in %d bytes" % (m, len(columns), r.left))
    rows = tuple(tuple(r.data_value() for _ in columns) for _ in range(m))
    return GetRecordResponse(piid, oad, columns, rows)


def _h_set_response(r, piid):
    oad = r.oad()
    return SetResponse(piid, oad, DAR(r.u8()))


def _h_action_response(r, piid):
    omd = r.omd()
    dar = DAR(r.u8())
    value = r.data_value() if r.left and r.u8() == 1 else None
    return ActionResponse(piid, omd, dar, value)


_HANDLERS = {
    (GET_REQUEST, NORMAL): _h_get_normal, (GET_REQUEST, NORMAL_LIST): _h_get_list,
    (GET_REQUEST, RECORD): _h_get_record, (GET_REQUEST, NEXT): _h_get_next,
    (GET_RESPONSE, NEXT): _h_get_next_response, (SET_REQUEST, NORMAL): _h_set_normal,
    (ACTION_REQUEST, NORMAL): _h_action_normal,
    (GET_RESPONSE, NORMAL): _h_get_response, (GET_RESPONSE, NORMAL_LIST): _h_get_list_response,
    (GET_RESPONSE, RECORD): _h_get_record_response, (SET_RESPONSE, NORMAL): _h_set_response,
    (ACTION_RESPONSE, NORMAL): _h_action_response,
}


def service_name(apdu):
    """The reference's name of a decoded APDU's service (for logs and tests)."""
    if isinstance(apdu, GetRequest):
        return "GET-Request-NormalList" if apdu.listed else "GET-Request-Normal"
    if isinstance(apdu, GetResponse):
        return "GET-Response-NormalList" if apdu.listed else "GET-Response-Normal"
    return {GetRecordRequest: "GET-Request-Record", GetRecordResponse: "GET-Response-Record",
            GetNextRequest: "GET-Request-Next", GetNextResponse: "GET-Response-Next",
            SetRequest: "SET-Request-Normal", SetResponse: "SET-Response-Normal",
            ActionRequest: "ACTION-Request-Normal", ActionResponse: "ACTION-Response-Normal",
            SecurityRequest: "SECURITY-Request", SecurityResponse: "SECURITY-Response",
            LinkRequest: "LINK-Request", LinkResponse: "LINK-Response",
            ErrorResponse: "ERROR-Response",
            Fragment: "link-layer APDU fragment"}.get(type(apdu), type(apdu).__name__)


# ---------------------------------------------------------------- values -> quantities

# (quantity names per element, scaler, unit, signed) for attribute 2 of each object;
# scalers and types from WSD Energy698.c / Variable698.c (reference section 5); powers are
# given in kW / kvar like the DL/T 645 meters (W x 10^-1 = kW x 10^-4).
_TARIFFS = ("total", "t1", "t2", "t3", "t4")
_OBJECTS = {
    0x0000: (tuple("energy.combined." + t for t in _TARIFFS), -2, "kWh"),
    0x0010: (tuple("energy.import." + t for t in _TARIFFS), -2, "kWh"),
    0x0020: (tuple("energy.export." + t for t in _TARIFFS), -2, "kWh"),
    0x2000: (("voltage.a", "voltage.b", "voltage.c"), -1, "V"),
    0x2001: (("current.a", "current.b", "current.c"), -3, "A"),
    0x2004: (("power.active", "power.active.a", "power.active.b", "power.active.c"), -4,
             "kW"),
    0x2005: (("power.reactive", "power.reactive.a", "power.reactive.b", "power.reactive.c"),
             -4, "kvar"),
    0x200A: (("power.factor", "power.factor.a", "power.factor.b", "power.factor.c"), -3,
             None),
}
# single values (not arrays) at attribute 2
_SINGLE = {
    0x200F: ("frequency", -2, "Hz"),
    0x202D: ("balance.overdraft", -2, "CNY"),
    0x202E: ("balance.purchased", -2, "CNY"),
}
# attribute 4: high-precision energy, long64, scaler -4 (CAP #65)
_HIGH_PRECISION = {0x0000: "energy.combined.", 0x0010: "energy.import.",
                   0x0020: "energy.export."}


def _scaled(n, scaler):
    if isinstance(n, bool) or not isinstance(n, int):
        raise DataError("expected an integer, got %r" % (n,))
    return Decimal("%dE%d" % (n, scaler))      # exact whatever the context's precision


def quantities(oad, value):
    """Values with the gateway's quantity names (the DL/T 645 meters' names) for an OAD's
    decoded data: Scaler_Unit applied exactly (Decimal). An object this table does not
    name comes back as one raw value "oad.XXXXXXXX"; data of the wrong type raises
    DataError (never a guess)."""
    oad = OAD(*oad)
    out = []
    if oad.attr == 2 and oad.oi in _OBJECTS:
        names, scaler, unit = _OBJECTS[oad.oi]
        if oad.index:
            if oad.index > len(names):
                return [Value("oad." + str(oad), _plain(value), "raw")]
            return [Value(names[oad.index - 1], _scaled(value, scaler), unit)]
        if not isinstance(value, list):
            raise DataError("%s: expected an array, got %r" % (oad, value))
        for name, v in zip(names, value):
            out.append(Value(name, _scaled(v, scaler), unit))
        return out
    if oad.attr == 4 and oad.oi in _HIGH_PRECISION:
        base = _HIGH_PRECISION[oad.oi]
        items = [value] if oad.index else value
        first = oad.index - 1 if oad.index else 0
        if not isinstance(items, list):
            raise DataError("%s: expected an array" % (oad,))
        return [Value(base + _TARIFFS[first + k], _scaled(v, -4), "kWh")
                for k, v in enumerate(items[:len(_TARIFFS) - first])]
    if oad.attr == 2 and oad.index == 0 and oad.oi in _SINGLE:
        name, scaler, unit = _SINGLE[oad.oi]
        return [Value(name, _scaled(value, scaler), unit)]
    if oad == CLOCK:
        if not isinstance(value, _dt.datetime):
            raise DataError("4000 0200: expected date_time_s, got %r" % (value,))
        return [Value("meter.clock", value, None)]
    if oad == COMM_ADDRESS:
        if not isinstance(value, bytes):
            raise DataError("4001 0200: expected an octet-string")
        return [Value("meter.address", value.hex().upper(), None)]
    if oad == OAD(0x202C, 2, 0):
        # current wallet file: structure{remaining money, purchase count}
        if not isinstance(value, tuple) or len(value) < 2:
            raise DataError("202C 0200: expected structure{money, count}")
        return [Value("balance.remaining", _scaled(value[0], -2), "CNY"),
                Value("balance.purchases", value[1], None)]
    if oad == STATUS_WORDS:
        return status_values(value)
    return [Value("oad." + str(oad), _plain(value), "raw")]


def _plain(value):
    """A decoded value in a form a reading can carry (JSON-friendly)."""
    if isinstance(value, bytes):
        return value.hex().upper()
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [_plain(v) for v in value]
    if isinstance(value, BitString):
        return value.data.hex().upper()
    if isinstance(value, (OAD, OMD)):
        return str(value)
    if isinstance(value, Raw):
        return value.data.hex().upper()
    return value


# status word 3 of 2014 0200 (DL/T 698.45 运行状态字3): DL/T 645's status word 3 layout
# (bit 4 relay open, bit 6 commanded trip, bit 12 protection), bits in ASN.1 bit-string
# order (bit 0 = the top bit of the first byte). WSD's 698 meter firmware keeps one word for
# 20140203 and 04000503 and mirrors bit-strings before sending; Chint's holds it low byte
# first and sends each byte bit-reversed, in order (Comm_698.c SF_DataExchangeTo698_BasicData):
# bit k at position k either way (docs/frame-layer.md). Kept in this one place.
RELAY_OPEN_BIT = 4
RELAY_TRIP_COMMAND_BIT = 6
PROTECT_BIT = 12


def status_values(value):
    if not isinstance(value, list) or len(value) < 3 or not isinstance(value[2], BitString) \
            or value[2].nbits < 16:
        raise DataError("2014 0200: expected an array of at least 3 bit-string(16)")
    word = value[2]
    return [Value("relay.state", "open" if word.bit(RELAY_OPEN_BIT) else "closed", None),
            Value("relay.command", "trip" if word.bit(RELAY_TRIP_COMMAND_BIT) else "close",
                  None),
            Value("guarantee.state", word.bit(PROTECT_BIT), None)]


def status_word(relay_open=False, trip_commanded=False, protected=False):
    """Status word 3 as a BitString (the simulator's side of status_values)."""
    bits = 0
    for k, on in ((RELAY_OPEN_BIT, relay_open), (RELAY_TRIP_COMMAND_BIT, trip_commanded),
                  (PROTECT_BIT, protected)):
        if on:
            bits |= 1 << (15 - k)
    return BitString(16, bits.to_bytes(2, "big"))


# ---------------------------------------------------------------- matching an answer

def _apdu_of(msg):
    apdu = msg.apdu
    if isinstance(apdu, SecurityResponse) and apdu.inner is not None:
        return apdu.inner
    return apdu


def match_answer(request, answer):
    """Why an answer frame (decoded) does not belong to a request frame, or None if it
    does: the direction, the address field (byte for byte; a wildcard request takes any
    single address its digits allow), the service, the PIID and the OAD(s)/OMD."""
    af = answer.frame if isinstance(answer, Message) else answer.frame
    if not af.is_response:
        return "not an answer (DIR bit clear)"
    rsa, asa = request.frame.sa, af.sa
    if rsa.kind == SINGLE:
        if asa.field != rsa.field:
            return "answer from %s (flag %02X) to a request for %s (flag %02X)" % (
                asa, asa.flag, rsa, rsa.flag)
    elif rsa.kind == WILDCARD:
        if asa.kind != SINGLE or len(asa.address) != len(rsa.address) or any(
                w != "A" and w != g for w, g in zip(rsa.address, asa.address)):
            return "answer from %s does not match wildcard %s" % (asa, rsa.address)
    else:
        return "no answer is expected to a %s request" % rsa.kind_name
    if isinstance(answer, Unknown):
        return "answer not understood: %s" % answer.reason
    req = request.apdu
    ans = _apdu_of(answer)
    if isinstance(req, SecurityRequest):
        if not isinstance(answer.apdu, SecurityResponse):
            return "answer %s to a SECURITY-Request" % service_name(answer.apdu)
        if req.inner is None:
            return None                       # ciphertext: the meter's answer is opaque
        req = req.inner
    if isinstance(ans, ErrorResponse):
        return None if (ans.piid & 0x3F) == (req.piid & 0x3F) else \
            "ERROR-Response with PIID %02X to PIID %02X" % (ans.piid, req.piid)
    if isinstance(ans, Fragment):
        # the first link-layer fragment of a long answer: who answers is checked here, what
        # it says once the fragments are joined (Reassembly, then match_answer again)
        return None if ans.kind == "first" else "link-layer fragment %d (%s) without its " \
            "first" % (ans.seq, ans.kind)
    pairs = ((GetRequest, (GetResponse, GetNextResponse)),
             (GetRecordRequest, (GetRecordResponse, GetNextResponse)),
             (GetNextRequest, GetNextResponse),
             (SetRequest, SetResponse), (ActionRequest, ActionResponse))
    want = next((b for a, b in pairs if isinstance(req, a)), None)
    if want is None or not isinstance(ans, want):
        return "answer %s to %s" % (service_name(ans), service_name(req))
    if (ans.piid & 0x3F) != (req.piid & 0x3F):
        return "answer PIID %02X to request PIID %02X" % (ans.piid, req.piid)
    if isinstance(ans, GetNextResponse):
        # a block of a long answer: its results are checked once joined (join_blocks)
        if isinstance(req, GetNextRequest) and ans.seq != (req.seq + 1) & 0xFFFF:
            return "block %d answers a request for the block after %d" % (ans.seq, req.seq)
        return None
    if isinstance(req, GetRequest):
        if req.listed != ans.listed or tuple(r.oad for r in ans.results) != req.oads:
            return "answer for %s to a request for %s" % (
                " ".join(str(r.oad) for r in ans.results), " ".join(map(str, req.oads)))
    elif isinstance(req, (GetRecordRequest, SetRequest)):
        if ans.oad != req.oad:
            return "answer for %s to a request for %s" % (ans.oad, req.oad)
    elif isinstance(req, ActionRequest) and ans.omd != req.omd:
        return "answer for %s to a request for %s" % (ans.omd, req.omd)
    return None


# ---------------------------------------------------------------- long answers

MAX_REASSEMBLED = 0xFFFF     # bytes of one APDU joined from link-layer fragments
MAX_FOLLOW_UPS = 256         # fragments or GET-Response-Next blocks of one answer
FRAGMENT_ANSWER = 256        # a fragment's expected length (the meter chooses its size)


class Reassembly:
    """The link-layer fragments of one server answer joined into its APDU (reference
    section 1; RS `combine_fragment`, CAP #16-#21): first, then middle ones, then last,
    each sequence number one more than the one before, all from the same address, at most
    MAX_REASSEMBLED bytes and MAX_FOLLOW_UPS fragments. `add` raises FrameError naming
    what is wrong; `message()` is the decoded whole once `done`."""

    def __init__(self, first, limit=MAX_REASSEMBLED):
        frag = first.apdu
        if not isinstance(frag, Fragment) or frag.kind != "first":
            raise FrameError("a reassembly starts with a first fragment")
        self.frame = first.frame
        self.seq = frag.seq
        self.parts = [frag.payload]
        self.size = len(frag.payload)
        self.limit = limit
        self.done = False

    def add(self, msg):
        frag = msg.apdu if isinstance(msg, Message) else None
        if not isinstance(frag, Fragment):
            raise FrameError("expected a fragment, got %s" % (
                service_name(frag) if frag is not None else msg.reason))
        if msg.frame.sa.field != self.frame.sa.field:
            raise FrameError("fragment from %s in an answer from %s" % (msg.frame.sa,
                                                                     self.frame.sa))
        if self.done or frag.kind not in ("middle", "last") or \
                frag.seq != (self.seq + 1) & 0x0FFF:
            raise FrameError("fragment %d (%s) after %d" % (frag.seq, frag.kind, self.seq))
        if len(self.parts) >= MAX_FOLLOW_UPS or self.size + len(frag.payload) > self.limit:
            raise FrameError("an answer of more than %d bytes or %d fragments"
                             % (self.limit, MAX_FOLLOW_UPS))
        self.parts.append(frag.payload)
        self.size += len(frag.payload)
        self.seq = frag.seq
        self.done = frag.kind == "last"

    def message(self):
        f = self.frame
        whole = Frame(f.control & ~SEGMENT_BIT, f.sa, f.ca, b"".join(self.parts), f.raw)
        return decode(whole)


def fragment_confirm_exchange(answer, seq):
    """Confirm fragment `seq` of the answer whose frame is `answer.frame`; the answer to
    the confirmation is the fragment after it, from the same address."""
    from protocols.exchange import Exchange
    sa, want = answer.frame.sa, (seq + 1) & 0x0FFF

    def match(raw):
        msg = decode(frame_from_scanner(raw))
        if not msg.frame.is_response or msg.frame.sa.field != sa.field:
            return None, "not the next fragment from %s" % sa
        frag = msg.apdu if isinstance(msg, Message) else None
        if not isinstance(frag, Fragment) or frag.seq != want or \
                frag.kind not in ("middle", "last"):
            return None, "expected fragment %d, got %s" % (
                want, "%d (%s)" % (frag.seq, frag.kind) if isinstance(frag, Fragment)
                else service_name(frag) if frag is not None else msg.reason)
        return msg, None
    return Exchange(fragment_confirm(sa, seq, answer.frame.ca), FRAGMENT_ANSWER, "dlt698",
                    sa.field, match, "fragment:%d" % want)


def get_next_exchange(request, block):
    """GET-Request-Next for the block after `block` of the answer to `request` (the
    original request, decoded): same address, same PIID."""
    return exchange(get_next_request(request.frame.sa, request.apdu.piid, block,
                                     ca=request.frame.ca), FRAGMENT_ANSWER,
                    label="next:%d" % (block + 1))


def join_blocks(request, blocks):
    """The answer GET-Response-Next blocks make together, as if it had come whole: a
    GetResponse (results in order) or a GetRecordResponse. Raises DataError when the
    meter ended the transfer with a DAR or the blocks do not follow each other."""
    results = []
    for k, b in enumerate(blocks):
        if b.dar is not None:
            raise DataError("the meter ended the block transfer at block %d: DAR %d (%s)"
                            % (b.seq, b.dar, dar_name(b.dar)))
        if k and b.seq != (blocks[k - 1].seq + 1) & 0xFFFF:
            raise DataError("block %d after block %d" % (b.seq, blocks[k - 1].seq))
        results.extend(b.results)
    req = request.apdu
    if isinstance(req, GetRecordRequest):
        if len(results) != 1 or not isinstance(results[0], GetRecordResponse):
            raise DataError("%d records in the blocks of one record read" % len(results))
        return results[0]
    if any(isinstance(r, GetRecordResponse) for r in results):
        raise DataError("records in the blocks of a normal read")
    return GetResponse(req.piid, tuple(results), req.listed)


# ---------------------------------------------------------------- exchanges

# a single answer's fixed part: 68 L L C AF A(6) CA HCS(2) ... FCS(2) 16, and the
# response's 85 01 PIID OAD 01 ... 00 00
FRAME_OVERHEAD = 16
ANSWER_ESTIMATE = {
    0x0000: 27, 0x0010: 27, 0x0020: 27, 0x2000: 11, 0x2001: 17, 0x2004: 22, 0x2005: 22,
    0x200A: 14, 0x200F: 3, 0x4000: 8, 0x4001: 8, 0x2014: 30, 0x202C: 14, 0x202D: 5,
}
UNKNOWN_ANSWER = 48


def _estimate(oad):
    oad = OAD(*oad)
    n = ANSWER_ESTIMATE.get(oad.oi, UNKNOWN_ANSWER)
    return min(n, 6) if oad.index else n


def exchange(frame, answer_len, label=""):
    """The exchange of a request frame built by this module, whose answer is about
    `answer_len` bytes."""
    from protocols.exchange import Exchange
    request = decode(parse_frame(frame))
    if isinstance(request, Unknown):
        raise ValueError("not a request this module builds: %s" % request.reason)

    def match(raw):
        answer = decode(frame_from_scanner(raw))
        why = match_answer(request, answer)
        if why:
            return None, why
        return answer, None
    return Exchange(frame, answer_len, "dlt698", request.frame.sa.field, match, label)


def get_exchange(address, oad, logical=0, piid=None):
    """Read one OAD."""
    oad = OAD(*oad)
    return exchange(get_request(address, oad, piid, logical), FRAME_OVERHEAD + 8 +
                    _estimate(oad), label=str(oad))


def get_list_exchange(address, oads, logical=0, piid=None):
    """Read several OADs in one GET-Request-NormalList."""
    oads = [OAD(*o) for o in oads]
    return exchange(get_list_request(address, oads, piid, logical),
                    FRAME_OVERHEAD + 1 + sum(6 + _estimate(o) for o in oads),
                    label="list:" + ",".join(map(str, oads)))


def get_record_exchange(address, oad, rsd, columns, logical=0, piid=None):
    columns = [c if isinstance(c, CSD) else CSD(OAD(*c)) for c in columns]
    return exchange(get_record_request(address, oad, rsd, columns, piid, logical),
                    FRAME_OVERHEAD + 8 + 5 * len(columns) + 2 + 8 * len(columns),
                    label="record:" + str(OAD(*oad)))


def action_exchange(frame, label=""):
    """An ACTION (or SET) request frame built here; the answer carries a DAR."""
    return exchange(frame, FRAME_OVERHEAD + 8, label)


def security_exchange(frame, label=""):
    """A forwarded SECURITY-Request: the answer is a SECURITY-Response (ciphertext or
    plaintext with MAC) of unknown length."""
    return exchange(frame, FRAME_OVERHEAD + 64, label)


def read_address_exchange(piid=None):
    """GET 4001 0200 to the wildcard address AA x 6 (flag 45), reference section 7."""
    return get_exchange(WILDCARD_ADDRESS, COMM_ADDRESS, piid=piid)


# ---------------------------------------------------------------- the compiled read path

# ext/_apdu698.pyx decodes what a poll's answer goes through (frame_from_scanner, decode
# of GET-Responses with their data, quantities of the polled objects) in C and hands all
# else to the functions above, its pure twin, which keep these names in PURE (the twin
# tests compare both). MGW_PURE_PYTHON=1 keeps to the twin, as for protocols.framing.
PURE = {"frame_from_scanner": frame_from_scanner, "decode": decode, "decode_apdu": decode_apdu,
        "quantities": quantities}
IMPLEMENTATION = "python"
if os.environ.get("MGW_PURE_PYTHON", "") in ("", "0"):
    try:
        from protocols import _apdu698
    except ImportError:
        _apdu698 = None
    if _apdu698 is not None:
        _apdu698.bind(sys.modules[__name__])
        frame_from_scanner = _apdu698.frame_from_scanner
        decode = _apdu698.decode
        decode_apdu = _apdu698.decode_apdu
        quantities = _apdu698.quantities
        IMPLEMENTATION = "compiled"
