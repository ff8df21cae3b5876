"""A simulated DL/T 698.45 meter, for the same SimLine (pseudo-terminal RS-485 line) as the
DL/T 645 meters, so one line can carry both, as in the field.

It is the DL/T 645 simulator's meter model (energy by tariff, load profile, drifting clock,
relay and protection, prepaid money, 62 daily freezes, fault injection) answering in
DL/T 698.45: GET-Request-Normal and -NormalList on the objects the gateway polls, GET-Request-
Record on the day freeze 5004 (selector 1 on the freeze time, or 9), broadcast time
(ACTION 4000 method 127), SET 4000 0200, and, when `plaintext_relay` is set (a test meter),
plaintext ACTION 8000 trip/close and 8001 protection. Relay control inside a
SECURITY-Request: every one is kept byte for byte in `security_requests` (what the gateway
forwarded); a plaintext one (choice 0) is carried out and answered in a plaintext
SECURITY-Response with a MAC, a ciphertext one is refused with DAR 22 (ESAM verification
failed): the simulator has no ESAM, so it neither checks a MAC nor deciphers. Every answer
is logged in `truth` with the values the gateway should report.
"""

import copy
import datetime as _dt
from decimal import Decimal

from gateway.sim.dlt645 import SimLine, SimMeter
from protocols import dlt698 as D
from protocols.dlt698_data import (ARRAY, BIT_STRING, DATE_TIME_S, DOUBLE_LONG,
                                   DOUBLE_LONG_UNSIGNED, LONG, LONG_UNSIGNED, OCTET_STRING,
                                   OAD, OMD, STRUCTURE, encode_data)

OBJECT_UNDEFINED = 4
OBJECT_MISSING = 6
READ_WRITE_REFUSED = 3
SECURITY_MISMATCH = 20          # a plain ACTION on 8000 to a meter that wants security
ESAM_FAILED = 22


def _int(d, decimals):
    return int(Decimal(d).scaleb(decimals).to_integral_value())


class SimMeter698(SimMeter):
    """A DL/T 698.45 meter (the DL/T 645 model underneath)."""

    protocol = "dlt698"
    serve_method = "_serve698"

    def __init__(self, address, *, logical=0, plaintext_relay=True, **kw):
        super().__init__(address, **kw)
        self.logical = logical
        self.plaintext_relay = plaintext_relay
        self.sa = D.server_address(address, logical=logical)
        self.list_ok = True          # False: answers lists with ERROR-Response (old meters)
        self.security_requests = []  # SECURITY-Request APDUs received, byte for byte
        # long answers, as meters with small buffers send them: APDUs longer than
        # max_fragment bytes in link-layer fragments (each sent on the client's
        # confirmation), lists of more than max_results results in GET-Response-Next blocks
        # (a relay's status read included: control/relay.py follows both)
        self.max_fragment = None
        self.max_results = None
        # True: every GET answered by block transfer, a single OAD's too (in one last block),
        # as firmware does that switches to GET-Response-Next for any answer once it is on
        self.always_blocks = False
        self.fragment_seq = 261      # where the fragment numbering starts (CAP #18)
        self._fragments = []         # (seq, kind, payload) still to send
        self._blocks = {}            # PIID -> the GET-Response-Next frames still to send

    # ---------------------------------------------------------------- data

    def data(self, oad, now):
        """Encoded Data for an OAD (element index honoured), or a DAR."""
        whole = self._whole(oad.whole, now)
        if whole is None:
            return None, OBJECT_MISSING
        tag, items = whole
        if not oad.index:
            return encode_data(tag, items), None
        if tag not in (ARRAY, STRUCTURE) or oad.index > len(items):
            return None, OBJECT_MISSING
        return encode_data(*items[oad.index - 1]), None

    def _whole(self, oad, now):
        v = self.values
        if oad == OAD(0x0010, 2, 0):
            return ARRAY, [(DOUBLE_LONG_UNSIGNED, _int(x, 2)) for x in v(0x0001FF00, now)]
        if oad == OAD(0x0020, 2, 0):
            exp = _int(v(0x00020000, now)[0], 2)
            return ARRAY, [(DOUBLE_LONG_UNSIGNED, exp)] + [(DOUBLE_LONG_UNSIGNED, 0)] * 4
        if oad == OAD(0x2000, 2, 0):
            return ARRAY, [(LONG_UNSIGNED, _int(x, 1)) for x in v(0x0201FF00, now)]
        if oad == OAD(0x2001, 2, 0):
            return ARRAY, [(DOUBLE_LONG, _int(x, 3)) for x in v(0x0202FF00, now)]
        if oad == OAD(0x2004, 2, 0):
            return ARRAY, [(DOUBLE_LONG, _int(x, 4)) for x in v(0x0203FF00, now)]
        if oad == OAD(0x200A, 2, 0):
            pf = _int(v(0x02060000, now)[0], 3)
            return ARRAY, [(LONG, pf)] * 4
        if oad == OAD(0x200F, 2, 0):
            return LONG_UNSIGNED, _int(v(0x02800002, now)[0], 2)
        if oad == D.CLOCK:
            return DATE_TIME_S, self.meter_now(now).replace(microsecond=0)
        if oad == D.COMM_ADDRESS:
            return OCTET_STRING, bytes.fromhex(self.address)
        if oad == D.STATUS_WORDS:
            word = D.status_word(self.relay_open, self.relay_command_trip, self.guarantee)
            zero = D.BitString(16, b"\x00\x00")
            return ARRAY, [(BIT_STRING, zero), (BIT_STRING, zero), (BIT_STRING, word)] + \
                [(BIT_STRING, zero)] * 4
        if self.prepaid and oad == OAD(0x202C, 2, 0):
            return STRUCTURE, [(DOUBLE_LONG_UNSIGNED, _int(v(0x00900200, now)[0], 2)),
                               (DOUBLE_LONG_UNSIGNED, 1)]
        if self.prepaid and oad == OAD(0x202D, 2, 0):
            return DOUBLE_LONG_UNSIGNED, _int(v(0x00900201, now)[0], 2)
        return None

    # ---------------------------------------------------------------- protocol

    def matches698(self, sa):
        if sa.kind == D.BROADCAST:
            return True
        if sa.kind == D.SINGLE:
            return sa.field == self.sa.field
        if sa.kind == D.WILDCARD:
            return len(sa.address) == len(self.address) and all(
                w == "A" or w == g for w, g in zip(sa.address, self.address))
        return False

    def handle698(self, frame, now):
        """The answer frame (no wake-up bytes) to a request for this meter, or None."""
        self.requests += 1
        msg = D.decode(frame)
        if isinstance(msg, D.Unknown):
            return None
        apdu = msg.apdu
        if isinstance(apdu, D.Fragment):
            return self._next_fragment(apdu)
        broadcast = frame.sa.kind == D.BROADCAST
        if isinstance(apdu, D.ActionRequest) and apdu.omd == OMD(0x4000, 127):
            if isinstance(apdu.value, _dt.datetime):
                self.time_sync(apdu.value, now)
            return None if broadcast else self._out(D.action_response(
                self.sa, apdu.piid, apdu.omd, 0))
        if broadcast:
            return None                           # nobody answers a broadcast
        if isinstance(apdu, D.GetRequest):
            if apdu.listed and not self.list_ok:
                return self._out(D.error_response(self.sa, apdu.piid, 2))
            results = []
            for oad in apdu.oads:
                data, dar = self.data(oad, now)
                results.append((oad, data, dar))
                if data is not None:
                    v = D.Reader(data).data_value()
                    try:
                        self.truth.append((now, str(oad), D.quantities(oad, v)))
                    except D.DataError:
                        pass
            if self.always_blocks or (apdu.listed and self.max_results and
                                      len(results) > self.max_results):
                return self._out(self._in_blocks(apdu.piid, results))
            if apdu.listed:
                return self._out(D.get_list_response(self.sa, apdu.piid, results))
            oad, data, dar = results[0]
            return self._out(D.get_response(self.sa, apdu.piid, oad, data, dar))
        if isinstance(apdu, D.GetNextRequest):
            blocks = self._blocks.get(apdu.piid & 0x3F) or []
            if not blocks or D.decode(D.parse_frame(blocks[0])).apdu.seq != apdu.seq + 1:
                return self._out(D.get_next_response(self.sa, apdu.piid, True, apdu.seq + 1,
                                                     dar=14))     # invalid block number
            return self._out(blocks.pop(0))
        if isinstance(apdu, D.GetRecordRequest):
            return self._out(self._record(apdu, now))
        if isinstance(apdu, D.SetRequest):
            dar = READ_WRITE_REFUSED
            if apdu.oad == D.CLOCK and isinstance(apdu.value, _dt.datetime):
                self.time_sync(apdu.value, now)
                dar = 0
            return self._out(D.set_response(self.sa, apdu.piid, apdu.oad, dar))
        if isinstance(apdu, D.ActionRequest):
            return self._out(D.action_response(self.sa, apdu.piid, apdu.omd,
                                               self._action(apdu, now)))
        if isinstance(apdu, D.SecurityRequest):
            self.security_requests.append(bytes(frame.user_data))
            if apdu.ciphertext or not isinstance(apdu.inner, D.ActionRequest):
                return self._out(D.security_response(self.sa, dar=ESAM_FAILED))
            inner = apdu.inner
            answer = D.action_response(self.sa, inner.piid, inner.omd,
                                       self._action(inner, now, secured=True))
            return self._out(D.security_response(self.sa, D.parse_frame(answer).user_data,
                                                 mac=bytes(4)))
        return None

    def _out(self, frame):
        """The answer as sent: whole, or its first link-layer fragment."""
        frame = frame[4:]
        if not self.max_fragment:
            return frame
        f = D.parse_frame(frame)
        if len(f.user_data) <= self.max_fragment:
            return frame
        n = self.max_fragment
        parts = [f.user_data[i:i + n] for i in range(0, len(f.user_data), n)]
        seq = self.fragment_seq
        kinds = ["first"] + ["middle"] * (len(parts) - 2) + ["last"]
        self._fragments = [(f.control, (seq + k) & 0x0FFF, kind, part)
                           for k, (kind, part) in enumerate(zip(kinds, parts))]
        self.fragment_seq = (seq + len(parts)) & 0x0FFF
        return self._fragment(self._fragments.pop(0))

    def _fragment(self, item):
        control, seq, kind, payload = item
        return D.fragment_frame(control, self.sa, seq, kind, payload)[4:]

    def _next_fragment(self, confirm):
        """The fragment after the one the client confirms; nothing after the last."""
        if confirm.kind != "confirm" or not self._fragments or \
                self._fragments[0][1] != (confirm.seq + 1) & 0x0FFF:
            return None
        return self._fragment(self._fragments.pop(0))

    def _in_blocks(self, piid, results):
        """The first GET-Response-Next block of a long list; the others kept for
        GET-Request-Next."""
        n = self.max_results or len(results)
        chunks = [results[i:i + n] for i in range(0, len(results), n)]
        frames = [D.get_next_response(self.sa, piid, k == len(chunks) - 1, k + 1, chunk)
                  for k, chunk in enumerate(chunks)]
        self._blocks[piid & 0x3F] = frames[1:]
        return frames[0]

    def _record(self, req, now):
        cols = req.columns
        if req.oad != D.DAY_FREEZE:
            return D.get_record_response(self.sa, req.piid, req.oad, cols, dar=OBJECT_UNDEFINED)
        self.advance(now)
        with self.lock:
            freezes = list(self._freezes)
        picked = []
        if req.rsd.selector == 1 and req.rsd.oad == D.FREEZE_TIME:
            want = req.rsd.values[0][1]
            picked = [f for f in freezes if f[0] == want]
        elif req.rsd.selector == 9:
            n = req.rsd.values[0]
            picked = freezes[n - 1:n] if n >= 1 else []
        rows = []
        for stamp, block in picked:
            row = []
            for c in cols:
                if c.oad == D.FREEZE_TIME:
                    row.append(encode_data(DATE_TIME_S, stamp))
                elif c.oad == OAD(0x0010, 2, 0):
                    row.append(encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, _int(x, 2))
                                                   for x in block]))
                else:
                    row.append(b"\x00")
            rows.append(row)
        return D.get_record_response(self.sa, req.piid, req.oad, cols, rows=rows)

    def _action(self, req, now, secured=False):
        """DAR of an ACTION on 8000 / 8001 (plaintext, or carried in a SECURITY-Request)."""
        if req.omd.oi not in (D.REMOTE_CONTROL, D.PROTECT):
            return OBJECT_UNDEFINED
        if not (secured or self.plaintext_relay):
            return SECURITY_MISMATCH
        m = req.omd.method
        with self.lock:
            self.advance(now)
            if req.omd.oi == D.PROTECT:
                if m == D.ProtectMethod.ON:
                    self.guarantee = True
                elif m == D.ProtectMethod.OFF:
                    self.guarantee = False
                else:
                    return OBJECT_UNDEFINED
                return 0
            if m == D.RelayMethod.TRIP:
                if self.guarantee:
                    return READ_WRITE_REFUSED
                self.relay_command_trip = True
                self._move(True, now, _Cmd("TRIP"))
            elif m == D.RelayMethod.CLOSE:
                direct = bool(req.value) and req.value[0][-1] == 1
                self.relay_command_trip = False
                if direct or not self.button_required:
                    self._move(False, now, _Cmd("DIRECT_CLOSE" if direct else
                                                "CLOSE_ALLOWED"))
            else:
                return OBJECT_UNDEFINED
        return 0


class _Cmd:
    """What SimMeter._move logs as the command (it reads `.name`)."""

    def __init__(self, name):
        self.name = name


def make_meters698(n, first_address=1, faults=None, **kwargs):
    import copy
    return [SimMeter698("%012d" % (first_address + i), seed=first_address + i,
                        faults=copy.copy(faults) if faults else None, **kwargs)
            for i in range(n)]


LINE = SimLine               # the DL/T 645 simulator's line: both kinds share it


def simulated_line(count, first, faults, baudrate, profile=None, on_relay=None, count_1997=0,
                   baudrate_1997=1200, button_required=False):
    meters = make_meters698(count, first_address=first, faults=faults, prepaid=True,
                            button_required=button_required)
    for m in meters:
        m.on_relay = on_relay
    return SimLine(meters, baudrate=baudrate), [m.address for m in meters]


def one_meter(address, faults, on_relay=None, button_required=False):
    """One more meter for a line of LINE (`mgw simulate --meter dlt698:ADDRESS`)."""
    m = SimMeter698(address, seed=int(address), faults=copy.copy(faults), prepaid=True,
                    button_required=button_required)
    m.on_relay = on_relay
    return m
