"""The DL/T 645 driver: what the line does with DL/T 645-2007 and -1997 meters.

Poll tasks (energy registers as a block or single identifiers, prepaid money, instantaneous
values and status word 3, the clock with drift tracking and broadcast sync, the daily freeze
with its backfill), reads by quantity name or identifier, the address search, and the
status-word exchange the relay operation reads. Frames come from protocols.dlt645 only.
"""

import datetime as _dt

from gateway.line.reads import SILENT, ReadError, UnknownQuantity, suggested_address_id
from gateway.model import TxError
from gateway.store.journal import BACKFILLED, GOOD
from protocols import dlt645
from protocols.dlt645_values import lookup

HAS_RELAY = True

ENERGY_BLOCK = {2007: 0x0001FF00, 1997: 0x901F}
ENERGY_SINGLE = {2007: [0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400],
                 1997: [0x9010, 0x9011, 0x9012, 0x9013, 0x9014]}
INSTANT = {2007: [0x0201FF00, 0x0202FF00, 0x02030000, 0x04000503],
           1997: [0xB611, 0xB621, 0xB630]}
PREPAID = [0x00900200, 0x00900201]

# not readings of their own: decoded into relay.state / guarantee.state, or clock checks
SKIP_QUANTITIES = {"status.word1", "status.word2", "status.word3", "status.word4",
                   "status.word5", "status.word6", "status.word7", "status.word",
                   "relay.command", "relay.prealarm", "meter.prepaid_type", "meter.clock",
                   "meter.date", "meter.time"}

GROUPS_2007 = {
    "energy": [ENERGY_BLOCK[2007]],
    "instant": INSTANT[2007][:3],
    "status": [0x04000503],
    "clock": [0x0400010C],
    "balance": PREPAID,
}
GROUPS_1997 = {"energy": [ENERGY_BLOCK[1997]], "instant": INSTANT[1997],
               "clock": [0xC010, 0xC011]}

CLOCK_DI = 0x0400010C
STATUS_WORD_3 = 0x04000503        # relay state and command, guarantee
FREEZE_TIME = 0x05060000
FREEZE_IMPORT = 0x05060100
FREEZE_DAYS = 62                  # daily freezes a DL/T 645-2007 meter keeps
SCAN_DI = {2007: 0x00010000, 1997: 0x9010}   # what the address search asks every meter for
ADDRESS_DI = {2007: 0x04000401, 1997: 0xC032}

_QUANTITY_DI = {}
for _di in (0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400, 0x00020000,
            0x00000000, 0x02010100, 0x02010200, 0x02010300, 0x02020100, 0x02020200,
            0x02020300, 0x02030000, 0x02060000, 0x02800002, 0x04000503, 0x00900200,
            0x00900201, 0x0400010C, 0x04000402):
    for _f in lookup(_di)[0]:
        _QUANTITY_DI.setdefault(_f.quantity, _di)
_QUANTITY_DI.update({"relay.state": 0x04000503, "guarantee.state": 0x04000503})


def dis_for(meter, quantities):
    """DL/T 645 identifiers to read for quantity names or group names."""
    groups = GROUPS_2007 if meter.version == 2007 else GROUPS_1997
    if not quantities:
        quantities = [g for g in ["energy", "instant", "status", "clock"] +
                      (["balance"] if meter.prepaid else []) if g in groups]
    dis = []
    for q in quantities:
        if q in groups:
            new = groups[q]
        elif meter.version == 2007 and q in _QUANTITY_DI:
            new = [_QUANTITY_DI[q]]
        elif _is_di(q, meter.version):
            new = [int(q, 16)]
        elif _is_hex(q):
            # a bare 0001 is not silently a data identifier: say what one looks like
            raise UnknownQuantity(
                "%r is not a data identifier of a DL/T 645-%d meter: give %d hex digits "
                "(such as %s) or 0x%s" % (q, meter.version, 8 if meter.version == 2007 else 4,
                                          "00010000" if meter.version == 2007 else "9010",
                                          q.lower().replace("0x", "")))
        else:
            raise UnknownQuantity("unknown quantity %r (groups: %s; or a data identifier in "
                                  "hex)" % (q, ", ".join(sorted(groups))))
        dis += [d for d in new if d not in dis]
    return dis


def _is_di(q, version):
    """A data identifier as a technician types it: 0x plus hex digits, or exactly the
    version's width (8 hex digits for 2007, 4 for 1997)."""
    width = 8 if version == 2007 else 4
    if q.lower().startswith("0x"):
        return 2 < len(q) <= 2 + width and _is_hex(q[2:])
    return len(q) == width and _is_hex(q)


def _is_hex(s):
    try:
        int(s, 16)
        return True
    except ValueError:
        return False






def check_quantities(meter, quantities):
    """UnknownQuantity if a name cannot be read from this meter."""
    dis_for(meter, quantities)


def on_meters_line(exchange, meter):
    """The exchange for this meter, at its own line settings where it has them."""
    return exchange.for_meter(meter.id).on_line(getattr(meter, "baudrate", None),
                                                getattr(meter, "parity", None))


def read_exchange(meter, di):
    return on_meters_line(dlt645.read_exchange(meter.address, di, meter.version), meter)


def transact_read(worker, meter, di, address=None):
    """Read one identifier through the worker, following a long answer to its end: after a
    0xB1 answer (more data follows), 0x12 with SEQ 1, 2, ... until the meter says done
    (0x92), the data joined and decoded once. A Result whose answer is the whole
    ReadResponse (or the meter's ErrorResponse); a follow-up that fails fails the read."""
    address = meter.address if address is None else address
    first = worker.transact(on_meters_line(dlt645.read_exchange(address, di, meter.version),
                                           meter))
    msg = first.answer
    if not first.ok or not isinstance(msg, dlt645.ReadResponse) or not msg.follow_up:
        return first
    parts, frames, attempts, elapsed = [], list(first.frames), first.attempts, first.elapsed
    for seq in range(1, dlt645.MAX_FOLLOW_UPS + 1):
        res = worker.transact(on_meters_line(
            dlt645.follow_up_exchange(address, di, seq, meter.version), meter))
        frames += res.frames
        attempts += res.attempts
        elapsed += res.elapsed
        part = res.answer
        if not res.ok or not isinstance(part, dlt645.ReadResponse):
            why = res.error if not res.ok else "meter says %s" % ", ".join(
                getattr(part, "flags", ()) or ("an unexpected answer",))
            return res._replace(ok=False, answer=None, attempts=attempts, elapsed=elapsed,
                                frames=tuple(frames), code=res.code or TxError.GARBLED,
                                error="follow-up frame %d: %s" % (seq, why))
        parts.append(part)
        if not part.follow_up:
            break
    try:
        whole = dlt645.join_follow_ups(msg, parts)
    except ValueError as exc:
        return first._replace(ok=False, answer=None, error="follow-up frames: %s" % exc,
                              code=TxError.GARBLED, frames=tuple(frames))
    return first._replace(answer=whole, attempts=attempts, elapsed=elapsed,
                          frames=tuple(frames))


def status_exchange(meter):
    """The exchange reading status word 3 (relay state, relay command, guarantee)."""
    return read_exchange(meter, STATUS_WORD_3)


def key_of(meter):
    """How a scan names this meter: its address."""
    return meter.address


def read_now(worker, meter, quantities=()):
    """Reads a meter through a worker (on the calling thread): (values, errors)."""
    values, errors = [], []
    answered = False
    form = "%08X" if meter.version == 2007 else "%04X"
    for di in dis_for(meter, quantities):
        res = transact_read(worker, meter, di)
        msg = res.answer
        if not res.ok:
            errors.append(ReadError("%s: %s" % (form % di, res.error), res.code))
            if not answered and res.code in SILENT:
                break                    # the meter does not answer: say so now
            continue
        answered = True
        if isinstance(msg, dlt645.ErrorResponse):
            errors.append(ReadError("%s: meter says %s" % (form % di, ", ".join(msg.flags)
                                                           or msg.code), None, msg.flags))
        elif isinstance(msg, dlt645.ReadResponse):
            if msg.values is None:
                values.append(dlt645.Value("di." + form % di, msg.payload.hex(), "raw"))
            else:
                values += [v for v in msg.values if v.quantity not in SKIP_QUANTITIES
                           or v.quantity == "meter.clock"]
    return values, errors




def scan(worker, progress=lambda done, total, found: None, versions=(2007, 1997), **_):
    """Finds every meter on a DL/T 645 line, addresses unknown: a wildcard read, and where
    answers collide, the same again with one more low byte of the address fixed (short
    addressing, reference 1.3); first for 2007 meters, then for 1997 meters (function 01),
    which ignore 2007 requests. A meter that answers with the wildcard as its address (a
    real meter does this) is asked for its real address before it is reported. Returns
    [{"address", "version"}] sorted by address; an answer whose real address could not be
    read is reported with "address": None."""
    found = {}
    unresolved = 0
    done = 0
    total = len(versions)
    for version in versions:
        probes = [""]            # known low digits (2 per byte), grows from the right
        while probes:
            suffix = probes.pop(0)
            pattern = "A" * (12 - len(suffix)) + suffix
            res = worker.transact(dlt645.read_exchange(pattern, SCAN_DI[version], version)
                                  .for_meter("scan"))
            done += 1
            if res.ok:
                address = getattr(res.answer, "address", None) or \
                    dlt645.parse_frame(res.frames[1]).address
                if "A" in address:
                    address = real_address(worker, pattern, version)
                if address is None:
                    unresolved += 1
                else:
                    found.setdefault(address, version)
            elif res.code == TxError.GARBLED and len(suffix) < 12:
                # several meters answered at once: split on the next address byte
                probes.extend("%02d" % b + suffix for b in range(100))
                total += 100
            progress(done, total, len(found))
    out = [{"address": a, "version": v} for a, v in sorted(found.items())]
    return out + [{"address": None, "version": None}] * unresolved


def quick_probe(worker):
    """Addresses of DL/T 645 meters answering one wildcard read (another protocol's scan
    found nothing: is this a DL/T 645 line?); collisions count as one unknown meter."""
    for version in (2007, 1997):
        res = worker.transact(dlt645.read_exchange(dlt645.WILDCARD, SCAN_DI[version], version)
                              .for_meter("scan"))
        if res.ok:
            return [getattr(res.answer, "address", "?")]
        if res.code == TxError.GARBLED:
            return ["(several)"]
    return []


suggested_id = suggested_address_id


def toml_lines(found):
    """The [[meters]] lines that identify a meter found by the scan."""
    lines = ['address = "%s"' % found["address"]]
    if found.get("version") == 1997:
        lines.append("version = 1997")
    return lines


def real_address(worker, pattern, version=2007):
    """The real address of the one meter answering `pattern` (a wildcard or short address):
    read address (0x13), else DI 04000401 (for 1997 meters C032, the meter number, which
    is their address on most nameplates). None if it cannot be read."""
    def clean(address):
        return address if address and address.isdigit() and len(address) == 12 else None
    if version == 2007:
        res = worker.transact(dlt645.read_address_exchange(pattern).for_meter("scan"))
        if res.ok and isinstance(res.answer, dlt645.AddressResponse) and \
                clean(res.answer.address):
            return res.answer.address
    di = ADDRESS_DI[version]
    res = worker.transact(dlt645.read_exchange(pattern, di, version).for_meter("scan"))
    if res.ok and isinstance(res.answer, dlt645.ReadResponse) and res.answer.values:
        return clean(str(res.answer.values[0].value))
    return None


# ---------------------------------------------------------------- poll tasks

def tasks(meter):
    """The tasks this meter is polled for beyond energy and instantaneous values."""
    return ("clock", "freeze") if meter.version == 2007 and meter.clock_interval_s else ()


def poll(poller, worker, meter, task):
    if task == "energy":
        _energy(poller, worker, meter)
    elif task == "instant":
        _read_dis(poller, worker, meter, INSTANT[meter.version])
    elif task == "clock":
        _clock(poller, worker, meter)
    elif task == "freeze":
        _freeze(poller, worker, meter)


def read_di(poller, worker, meter, di):
    """One read through the worker, counted in the meter's health; (Result, message)."""
    result = transact_read(worker, meter, di)
    if not poller.outcome(meter, result):
        return result, None
    return result, result.answer


def _readings(poller, meter, values, ts=None, quality=None):
    return poller.readings(meter, values, ts, quality, SKIP_QUANTITIES)


def _read_dis(poller, worker, meter, dis):
    readings = []
    h = poller.health[meter.id]
    for di in dis:
        if di in h.unsupported:
            continue
        result, msg = read_di(poller, worker, meter, di)
        if msg is None:
            if not h.online:
                break                       # offline: stop this round, probe later
            continue
        if isinstance(msg, dlt645.ErrorResponse):
            if "no_data" in msg.flags or "wrong_di" in msg.flags:
                h.unsupported = set(h.unsupported) | {di}
            continue
        if isinstance(msg, dlt645.ReadResponse) and msg.values:
            readings += _readings(poller, meter, msg.values)
    if readings:
        poller.sink(readings)
    return readings


def _energy(poller, worker, meter):
    h = poller.health[meter.id]
    prepaid = PREPAID if meter.prepaid and meter.version == 2007 else []
    if h.block_ok:
        result, msg = read_di(poller, worker, meter, ENERGY_BLOCK[meter.version])
        if msg is None:
            return
        if isinstance(msg, dlt645.ReadResponse) and msg.values:
            poller.sink(_readings(poller, meter, msg.values))
            if prepaid:
                _read_dis(poller, worker, meter, prepaid)
            return
        h.block_ok = False                   # no block reads: single identifiers
    _read_dis(poller, worker, meter, ENERGY_SINGLE[meter.version] + prepaid)


def _clock(poller, worker, meter):
    t0 = poller.wall()
    result, msg = read_di(poller, worker, meter, CLOCK_DI)
    if not isinstance(msg, dlt645.ReadResponse) or not msg.values:
        return
    poller.clock_checked(worker, meter, msg.values[0].value, t0, poller.wall(),
                         lambda when: worker.broadcast(time_sync_frame(when),
                                                       meter.baudrate, meter.parity))


def time_sync_frame(when):
    """The broadcast time sync (0x08 to 99..99) setting the meters' clocks to `when`."""
    return dlt645.broadcast_time_sync(when)


def _freeze(poller, worker, meter):
    """Today's daily freeze, and any missed day backfilled, timestamp checked."""
    h = poller.health[meter.id]
    today = _dt.datetime.fromtimestamp(poller.wall()).date()
    if h.last_freeze_day is None:
        h.last_freeze_day = today - _dt.timedelta(days=1)
    day = h.last_freeze_day + _dt.timedelta(days=1)
    while day <= today:
        n = (today - day).days + 1
        if n > FREEZE_DAYS:
            poller.event("freeze.missing", meter=meter.id, day=day.isoformat(),
                       reason="older than the meter keeps")
            day += _dt.timedelta(days=1)
            continue
        found = None
        for k in (n, n - 1, n + 1):      # the meter's clock may have shifted its freezes
            if not 1 <= k <= FREEZE_DAYS:
                continue
            result, msg = read_di(poller, worker, meter, FREEZE_TIME | k)
            if msg is None:
                return                    # no answer: try again at the next round
            if isinstance(msg, dlt645.ReadResponse) and msg.values and \
                    msg.values[0].value.date() == day:
                found = (k, msg.values[0].value)
                break
        if found is None:
            poller.event("freeze.missing", meter=meter.id, day=day.isoformat(),
                       reason="no freeze with that date")
        else:
            k, stamp = found
            result, msg = read_di(poller, worker, meter, FREEZE_IMPORT | k)
            if msg is None:
                return
            if isinstance(msg, dlt645.ReadResponse) and msg.values:
                quality = GOOD if day == today else BACKFILLED
                poller.sink(_readings(poller, meter, msg.values,
                                                   ts=poller.local_ms(stamp), quality=quality))
        h.last_freeze_day = day
        day += _dt.timedelta(days=1)



# ---------------------------------------------------------------- relay (control/relay.py)

# relay frame data (0x1C): PA, P0..P2 (password), C0..C3 (operator code), then the command.
# The audit keeps the frame but never the secrets: those 8 bytes are masked.
_SECRET_OFFSET = 10             # 68 A0..A5 68 C L, then data
_SECRET_BYTES = 8


def relay_params_problem(meter, action, params):
    """Why a relay command cannot go to this meter as given (one line), or None: an
    ESAM-secured meter's cut-off and restore carry the master station's data field."""
    if meter.secured and action in ("cut_off", "restore"):
        payload = params.get("payload")
        if not isinstance(payload, str) or len(payload) % 2 or \
                not 32 <= len(payload) <= 400 or \
                any(c not in "0123456789abcdefABCDEF" for c in payload):
            return "meter %s is at the secured level: the command must carry the master " \
                "station's relay payload (hex)" % meter.id
    return None


def relay_exchange(meter, rc, params, now=None):
    """The 0x1C relay frame for a gateway RelayIntent (its N1 code, dlt645.RELAY_CODES): the
    master station's data field for a secured meter, else password, operator code and a
    validity deadline of relay_valid_s."""
    code = dlt645.RELAY_CODES[rc]
    if meter.secured and code in (dlt645.RelayCommand.TRIP, dlt645.RelayCommand.DIRECT_CLOSE,
                                  dlt645.RelayCommand.CLOSE_ALLOWED):
        frame = dlt645.relay_control_secured(meter.address, bytes.fromhex(params["payload"]))
    else:
        valid_until = ((now or _dt.datetime.now()) + _dt.timedelta(
            seconds=meter.relay_valid_s)).replace(microsecond=0)
        frame = dlt645.relay_control(meter.address, code,
                                     password_level=meter.password_level,
                                     password=meter.password,
                                     operator_code=meter.operator_code,
                                     valid_until=valid_until)
    return on_meters_line(dlt645.relay_exchange(frame, rc.name), meter)


def relay_state(answer):
    """({relay, relay_command, guarantee}, None) from the answer to status_exchange, or
    (None, why)."""
    if isinstance(answer, dlt645.ErrorResponse):
        return None, "meter says %s" % (", ".join(answer.flags) or answer.code)
    if not isinstance(answer, dlt645.ReadResponse) or not answer.values:
        return None, "unexpected answer to the status read"
    vals = {v.quantity: v.value for v in answer.values}
    return {"relay": vals.get("relay.state"), "relay_command": vals.get("relay.command"),
            "guarantee": vals.get("guarantee.state")}, None


def relay_refusal(answer):
    """The meter's refusal of a relay frame (its error flags), or None."""
    if isinstance(answer, dlt645.ErrorResponse):
        return ", ".join(answer.flags) or str(answer.code)
    return None


def mask_secrets(raw):
    """A frame as hex, a relay frame's password and operator code masked."""
    i = 0
    while i < len(raw) and raw[i] == 0xFE:
        i += 1
    text = raw.hex()
    if len(raw) >= i + _SECRET_OFFSET + _SECRET_BYTES and raw[i] == 0x68 and \
            raw[i + 8] & 0x1F == dlt645.RELAY_CONTROL and not raw[i + 8] & 0x80:
        a = 2 * (i + _SECRET_OFFSET)
        text = text[:a] + "*" * (2 * _SECRET_BYTES) + text[a + 2 * _SECRET_BYTES:]
    return text
