"""The DL/T 698.45 driver: what the line does with DL/T 698.45 meters.

Poll tasks (energy and prepaid money in one GET-Request-NormalList, instantaneous values and
the status words in another; one OAD at a time for a meter that refuses lists), the clock
with drift tracking and broadcast time sync (ACTION 4000 method 127, the same rules as for
DL/T 645 meters), the daily freeze and its backfill with GET-Request-Record on 5004 (the
record's own freeze time checked), reads by quantity name or raw OAD, the wildcard address
search, and the relay: the master station's SECURITY-Request forwarded unchanged, or a
plaintext ACTION on 8000/8001 for meters configured with `relay_plaintext` (test meters,
the simulator), the state read back from status word 3. Frames come from protocols.dlt698
only; the quantity names are the DL/T 645 meters' (protocols.dlt698.quantities).
"""

import datetime as _dt

from gateway.line.reads import UnknownQuantity, suggested_address_id
from gateway.model import TxError
from gateway.store.journal import BACKFILLED, GOOD
from protocols import dlt698
from protocols.dlt698 import OAD, RSD, DataError
from protocols.dlt698_data import DATE_TIME_S

HAS_RELAY = True

ENERGY = [OAD(0x0010, 2, 0), OAD(0x0020, 2, 0)]
PREPAID = [OAD(0x202C, 2, 0), OAD(0x202D, 2, 0)]
INSTANT = [OAD(0x2000, 2, 0), OAD(0x2001, 2, 0), OAD(0x2004, 2, 0), OAD(0x200A, 2, 0),
           OAD(0x200F, 2, 0)]
STATUS = [dlt698.STATUS_WORDS]
CLOCK = [dlt698.CLOCK]
GROUPS = {"energy": ENERGY, "instant": INSTANT, "status": STATUS, "clock": CLOCK,
          "balance": PREPAID}

FREEZE_COLUMNS = [dlt698.FREEZE_TIME, OAD(0x0010, 2, 0), OAD(0x0020, 2, 0)]
FREEZE_DAYS = 62                  # daily freezes looked back at most (as for DL/T 645)
UNSUPPORTED_DARS = (4, 5, 6)      # object undefined / class mismatch / does not exist

# not readings of their own: decoded into the meter's health, or clock checks
SKIP_QUANTITIES = {"relay.command", "meter.clock"}

_QUANTITY_OAD = {}
for _oi, (_names, _s, _u) in dlt698._OBJECTS.items():
    for _i, _name in enumerate(_names, 1):
        _QUANTITY_OAD.setdefault(_name, OAD(_oi, 2, _i))
_QUANTITY_OAD.update({"frequency": OAD(0x200F, 2, 0), "meter.clock": dlt698.CLOCK,
                      "meter.address": dlt698.COMM_ADDRESS,
                      "balance.remaining": OAD(0x202C, 2, 0),
                      "balance.overdraft": OAD(0x202D, 2, 0),
                      "relay.state": dlt698.STATUS_WORDS,
                      "guarantee.state": dlt698.STATUS_WORDS})


def server_address(meter):
    """A MeterSpec's (`logical`) or a [[meters]] entry's (`logical_address`) address field."""
    logical = getattr(meter, "logical", None)
    if logical is None:
        logical = getattr(meter, "logical_address", 0)
    return dlt698.server_address(meter.address, logical=logical or 0)


def on_meters_line(exchange, meter):
    """The exchange for this meter, at its own line settings where it has them."""
    return exchange.for_meter(meter.id).on_line(getattr(meter, "baudrate", None),
                                                getattr(meter, "parity", None))


def oads_for(meter, quantities):
    """The OADs to read for quantity names, group names or raw OADs (8 hex digits)."""
    if not quantities:
        quantities = ["energy", "instant", "status", "clock"] + \
            (["balance"] if meter.prepaid else [])
    oads = []
    for q in quantities:
        if q in GROUPS:
            new = GROUPS[q]
        elif q in _QUANTITY_OAD:
            new = [_QUANTITY_OAD[q]]
        else:
            try:
                new = [OAD.parse(q[2:] if q.lower().startswith("0x") else q)]
            except ValueError:
                raise UnknownQuantity("unknown quantity %r (groups: %s; or an OAD of 8 hex "
                                      "digits)" % (q, ", ".join(sorted(GROUPS)))) from None
        oads += [o for o in new if o not in oads]
    return oads


def check_quantities(meter, quantities):
    """UnknownQuantity if a name cannot be read from this meter."""
    oads_for(meter, quantities)


def key_of(meter):
    """How a scan names this meter: its address."""
    return meter.address


def read_exchange(meter, oads):
    """One OAD as GET-Request-Normal, several as one GET-Request-NormalList."""
    sa = server_address(meter)
    if len(oads) == 1:
        return on_meters_line(dlt698.get_exchange(sa, oads[0]), meter)
    return on_meters_line(dlt698.get_list_exchange(sa, oads), meter)


def status_exchange(meter):
    """The exchange reading the status words (relay state, protection)."""
    return read_exchange(meter, STATUS)


# ---------------------------------------------------------------- relay (control/relay.py)

MAX_PAYLOAD_BYTES = 512           # a SECURITY-Request for one relay action is ~60-120 bytes
_PLAIN_ACTIONS = {"TRIP": (dlt698.REMOTE_CONTROL, dlt698.RelayMethod.TRIP),
                  "CLOSE_ALLOWED": (dlt698.REMOTE_CONTROL, dlt698.RelayMethod.CLOSE),
                  "DIRECT_CLOSE": (dlt698.REMOTE_CONTROL, dlt698.RelayMethod.CLOSE),
                  "GUARANTEE": (dlt698.PROTECT, dlt698.ProtectMethod.ON),
                  "GUARANTEE_RELEASE": (dlt698.PROTECT, dlt698.ProtectMethod.OFF)}


def relay_params_problem(meter, action, params):
    """Why a relay command cannot go to this meter as given (one line), or None. Real
    meters take relay control and protection only inside the master station's
    SECURITY-Request (reference section 6), carried hex in params.payload and forwarded
    unchanged; a meter configured with relay_plaintext also takes plaintext ACTIONs."""
    payload = params.get("payload")
    if payload is None:
        if getattr(meter, "relay_plaintext", False):
            return None
        return "meter %s (DL/T 698.45) takes %s only as the master station's " \
            "SECURITY-Request: the command must carry it hex in params.payload" % (
                meter.id, action)
    return payload_problem(payload)


def payload_problem(payload):
    """Why params.payload is not one whole SECURITY-Request APDU, or None."""
    if not isinstance(payload, str) or len(payload) % 2 or \
            not 8 <= len(payload) <= 2 * MAX_PAYLOAD_BYTES or \
            any(c not in "0123456789abcdefABCDEF" for c in payload):
        return "params.payload must be the SECURITY-Request APDU as hex (4 to %d bytes)" \
            % MAX_PAYLOAD_BYTES
    try:
        msg = dlt698.decode_apdu(bytes.fromhex(payload))
    except (DataError, ValueError, IndexError) as exc:
        return "params.payload is not a whole SECURITY-Request APDU: %s" % exc
    if not isinstance(msg, dlt698.SecurityRequest):
        return "params.payload is not a SECURITY-Request APDU (10 00 or 10 01 ...): %s" % (
            msg if isinstance(msg, str) else dlt698.service_name(msg))
    return None


def relay_exchange(meter, rc, params, now=None):
    """The exchange for a gateway RelayIntent: the master station's SECURITY-Request
    (params.payload) forwarded byte for byte, or, for a relay_plaintext meter, ACTION
    8000-129 trip / 8000-130 close (enum 1 direct, 0 allow close) / 8001-127 and -128
    protection on and off (reference section 6, ICP lib698/class8.c), time-tagged with the
    gateway's local time and relay_valid_s as the allowed delay."""
    sa = server_address(meter)
    payload = (params or {}).get("payload")
    if payload is not None:
        why = payload_problem(payload)
        if why:
            raise ValueError(why)
        return on_meters_line(dlt698.security_exchange(
            dlt698.security_frame(sa, bytes.fromhex(payload)), rc.name), meter)
    if not getattr(meter, "relay_plaintext", False):
        raise ValueError("meter %s takes relay commands only as a SECURITY-Request" % meter.id)
    oi, method = _PLAIN_ACTIONS[rc.name]
    when = (now or _dt.datetime.now()).replace(microsecond=0)
    valid_s = getattr(meter, "relay_valid_s", 300)
    if oi == dlt698.REMOTE_CONTROL:
        frame = dlt698.relay_action(sa, method, when, direct=rc.name == "DIRECT_CLOSE",
                                    valid_s=valid_s)
    else:
        frame = dlt698.protect_action(sa, method, when, valid_s=valid_s)
    return on_meters_line(dlt698.action_exchange(frame, rc.name), meter)


def relay_state(answer):
    """({relay, relay_command, guarantee}, None) from the answer to status_exchange (status
    word 3 of 2014 0200), or (None, why)."""
    values, errors, _ = values_of(answer)
    vals = {v.quantity: v.value for v in values}
    if "relay.state" not in vals:
        return None, errors[0] if errors else "no status word 3 in the answer"
    return {"relay": vals["relay.state"], "relay_command": vals.get("relay.command"),
            "guarantee": vals.get("guarantee.state")}, None


def relay_refusal(answer):
    """The meter's refusal of a relay exchange (its DAR or ERROR-Response), or None. A
    ciphertext SECURITY-Response cannot be read here: the state read back decides."""
    apdu = answer.apdu if isinstance(answer, dlt698.Message) else None
    if isinstance(apdu, dlt698.SecurityResponse):
        if apdu.dar is not None:
            return "SECURITY-Response DAR %d (%s)" % (apdu.dar, dlt698.dar_name(apdu.dar))
        apdu = apdu.inner
    if isinstance(apdu, dlt698.ErrorResponse):
        return "ERROR-Response type %d" % apdu.code
    if isinstance(apdu, (dlt698.ActionResponse, dlt698.SetResponse)) and apdu.dar:
        return "DAR %d (%s)" % (apdu.dar, dlt698.dar_name(apdu.dar))
    return None


def _apdu(msg):
    apdu = msg.apdu if isinstance(msg, dlt698.Message) else None
    if isinstance(apdu, dlt698.SecurityResponse):
        apdu = apdu.inner
    return apdu


def transact(worker, exchange):
    """worker.transact, a long answer followed to its end: link-layer fragments confirmed
    one by one and joined (reference section 1), GET-Response-Next blocks asked for with
    GET-Request-Next (APDU-level block transfer), both bounded (dlt698.MAX_FOLLOW_UPS,
    MAX_REASSEMBLED). The Result's answer is then the whole message, checked against the
    request like an answer that came in one frame; a follow-up that fails fails it all."""
    first = worker.transact(exchange)
    if not first.ok or not isinstance(first.answer, dlt698.Message):
        return first
    msg = first.answer
    if not isinstance(msg.apdu, (dlt698.Fragment, dlt698.GetNextResponse)):
        return first
    frames, tally = list(first.frames), [first.attempts, first.elapsed]

    def follow(ex):
        r = worker.transact(ex.for_meter(exchange.meter).on_line(exchange.baudrate,
                                                                exchange.parity))
        frames.extend(r.frames)
        tally[0] += r.attempts
        tally[1] += r.elapsed
        return r

    def failed(why, code=TxError.GARBLED):
        return first._replace(ok=False, answer=None, error=why, code=code,
                              frames=tuple(frames), attempts=tally[0], elapsed=tally[1])
    request = dlt698.decode(dlt698.parse_frame(exchange.frame))
    try:
        msg, why = _joined(msg, follow)
        if why:
            return failed(why[0], why[1])
        if isinstance(_apdu(msg), dlt698.GetNextResponse):
            blocks = [_apdu(msg)]
            while not blocks[-1].last and blocks[-1].dar is None:
                if len(blocks) >= dlt698.MAX_FOLLOW_UPS:
                    return failed("more than %d blocks" % dlt698.MAX_FOLLOW_UPS)
                r = follow(dlt698.get_next_exchange(request, blocks[-1].seq))
                if not r.ok:
                    return failed("block after %d: %s" % (blocks[-1].seq, r.error), r.code)
                block, why = _joined(r.answer, follow)
                if why:
                    return failed(why[0], why[1])
                if not isinstance(_apdu(block), dlt698.GetNextResponse):
                    return failed("block after %d: %s" % (blocks[-1].seq, dlt698.service_name(
                        _apdu(block))))
                blocks.append(_apdu(block))
            msg = dlt698.Message(msg.frame, dlt698.join_blocks(request, blocks))
    except (dlt698.FrameError, DataError) as exc:
        return failed(str(exc))
    why = dlt698.match_answer(request, msg)
    if why:
        return failed(why)
    return first._replace(answer=msg, frames=tuple(frames), attempts=tally[0],
                          elapsed=tally[1])


def _joined(msg, follow):
    """(the whole message, None) from an answer that may be a first link-layer fragment,
    the rest fetched with `follow`; or (None, (why, TxError))."""
    if not isinstance(msg, dlt698.Message) or not isinstance(msg.apdu, dlt698.Fragment):
        return msg, None
    parts = dlt698.Reassembly(msg)
    while not parts.done:
        r = follow(dlt698.fragment_confirm_exchange(msg, parts.seq))
        if not r.ok:
            return None, ("link-layer fragment after %d: %s" % (parts.seq, r.error), r.code)
        parts.add(r.answer)
    return parts.message(), None


def values_of(msg):
    """(values, errors, unsupported OADs) of an answer to a GET."""
    values, errors, unsupported = [], [], []
    apdu = _apdu(msg)
    if isinstance(apdu, dlt698.ErrorResponse):
        return values, ["meter says ERROR-Response %d" % apdu.code], unsupported
    if not isinstance(apdu, dlt698.GetResponse):
        return values, ["unexpected answer %s" % dlt698.service_name(apdu)], unsupported
    for r in apdu.results:
        if not r.ok:
            errors.append("%s: meter says DAR %d (%s)" % (r.oad, r.dar, dlt698.dar_name(r.dar)))
            if r.dar in UNSUPPORTED_DARS:
                unsupported.append(r.oad)
            continue
        try:
            values += dlt698.quantities(r.oad, r.value)
        except DataError as exc:
            errors.append("%s: %s" % (r.oad, exc))
            values.append(dlt698.Value("oad." + str(r.oad), repr(r.value), "raw"))
    return values, errors, unsupported


def read_now(worker, meter, quantities=()):
    """Reads a meter through a worker (on the calling thread): (values, errors)."""
    values, errors = [], []
    oads = oads_for(meter, quantities)
    res = transact(worker, read_exchange(meter, oads))
    if res.ok and isinstance(_apdu(res.answer), dlt698.GetResponse):
        v, e, _ = values_of(res.answer)
        return v, e
    # no list answer: one OAD at a time (meters that refuse lists, or a list too long)
    for oad in oads if len(oads) > 1 else ():
        r = transact(worker, read_exchange(meter, [oad]))
        if not r.ok:
            errors.append("%s: %s" % (oad, r.error))
            continue
        v, e, _ = values_of(r.answer)
        values += v
        errors += e
    if len(oads) == 1:
        if res.ok:
            v, e, _ = values_of(res.answer)
            values, errors = v, e
        else:
            errors.append("%s: %s" % (oads[0], res.error))
    return values, errors


def scan(worker, progress=lambda done, total, found: None, **_):
    """Finds the DL/T 698.45 meter on a line by a wildcard read of its address (4001 0200
    to AA x 6, flag 45: reference section 7). Several meters answering at once garble each
    other: then the search narrows the wildcard by the lowest address byte, as for
    DL/T 645 (00..99 for each byte, from the right)."""
    found = set()
    probes = [""]
    done = 0
    total = 1
    while probes:
        suffix = probes.pop(0)
        pattern = "A" * (12 - len(suffix)) + suffix
        sa = dlt698.server_address(pattern, dlt698.WILDCARD)
        res = worker.transact(dlt698.get_exchange(sa, dlt698.COMM_ADDRESS).for_meter("scan"))
        done += 1
        if res.ok and isinstance(res.answer, dlt698.Message):
            found.add(res.answer.sa.address)
        elif res.code == TxError.GARBLED and len(suffix) < 12:
            probes.extend("%02d" % b + suffix for b in range(100))
            total += 100
        progress(done, total, len(found))
    return [{"address": a} for a in sorted(found)]


def quick_probe(worker):
    """Addresses of DL/T 698.45 meters answering one wildcard address read (another
    protocol's scan found nothing: is this a DL/T 698.45 line?)."""
    sa = dlt698.server_address("A" * 12, dlt698.WILDCARD)
    res = worker.transact(dlt698.get_exchange(sa, dlt698.COMM_ADDRESS).for_meter("scan"))
    if res.ok and isinstance(res.answer, dlt698.Message):
        return [res.answer.sa.address]
    if res.code == TxError.GARBLED:
        return ["(several)"]
    return []


suggested_id = suggested_address_id


def toml_lines(found):
    """The [[meters]] lines that identify a meter found by the scan."""
    return ['address = "%s"' % found["address"]]


# ---------------------------------------------------------------- poll tasks

def tasks(meter):
    """The tasks this meter is polled for beyond energy and instantaneous values."""
    return ("clock", "freeze") if meter.clock_interval_s else ()


def poll(poller, worker, meter, task):
    if task == "energy":
        _read(poller, worker, meter, ENERGY + (PREPAID if meter.prepaid else []))
    elif task == "instant":
        _read(poller, worker, meter, INSTANT + STATUS)
    elif task == "clock":
        _clock(poller, worker, meter)
    elif task == "freeze":
        _freeze(poller, worker, meter)


def _readings(poller, meter, values, ts=None, quality=None):
    return poller.readings(meter, values, ts, quality, SKIP_QUANTITIES)


def _read(poller, worker, meter, oads):
    """The OADs in one NormalList (or one by one for a meter that refuses lists); the
    OADs a meter says it lacks are not asked again."""
    h = poller.health[meter.id]
    oads = [o for o in oads if o not in h.unsupported]
    if not oads:
        return []
    groups = [oads] if h.block_ok or len(oads) == 1 else [[o] for o in oads]
    readings = []
    for group in groups:
        result = transact(worker, read_exchange(meter, group))
        if not poller.outcome(meter, result):
            if not h.online:
                break
            continue
        apdu = _apdu(result.answer)
        if len(group) > 1 and not isinstance(apdu, dlt698.GetResponse):
            h.block_ok = False             # ERROR-Response to a list: one at a time next
            continue
        values, _errors, unsupported = values_of(result.answer)
        if unsupported:
            h.unsupported = set(h.unsupported) | set(unsupported)
        readings += _readings(poller, meter, values)
    if readings:
        poller.sink(readings)
    return readings


def _clock(poller, worker, meter):
    t0 = poller.wall()
    result = transact(worker, read_exchange(meter, CLOCK))
    if not poller.outcome(meter, result):
        return
    values, _, _ = values_of(result.answer)
    clock = next((v.value for v in values if v.quantity == "meter.clock"), None)
    if not isinstance(clock, _dt.datetime):
        return
    poller.clock_checked(worker, meter, clock, t0, poller.wall(),
                         lambda when: worker.broadcast(time_sync_frame(when),
                                                       getattr(meter, "baudrate", None),
                                                       getattr(meter, "parity", None)))


def time_sync_frame(when):
    """The broadcast ACTION 4000 method 127 setting the meters' clocks to `when`
    (reference section 7; no meter answers it)."""
    return dlt698.broadcast_time_sync(when)


def freeze_exchange(meter, day):
    """GET-Request-Record of the daily freeze of `day` (5004 0200, selector 1 on the freeze
    time 2021 0200 = day 00:00), with its freeze time and the energy columns."""
    rsd = RSD(1, dlt698.FREEZE_TIME, ((DATE_TIME_S, _dt.datetime.combine(day, _dt.time())),))
    return on_meters_line(dlt698.get_record_exchange(server_address(meter), dlt698.DAY_FREEZE,
                                                     rsd, FREEZE_COLUMNS), meter)


def freeze_values(apdu, day):
    """(freeze time, values) of a day-freeze record answer, or (None, why)."""
    if not isinstance(apdu, dlt698.GetRecordResponse):
        return None, "unexpected answer %s" % dlt698.service_name(apdu)
    if apdu.dar is not None:
        return None, "meter says DAR %d (%s)" % (apdu.dar, dlt698.dar_name(apdu.dar))
    if not apdu.rows:
        return None, "no freeze with that date"
    cols = [c.oad for c in apdu.columns]
    for row in apdu.rows:
        cells = dict(zip(cols, row))
        stamp = cells.get(dlt698.FREEZE_TIME)
        if not isinstance(stamp, _dt.datetime) or stamp.date() != day:
            continue                  # the record's own freeze time must say that day
        values = []
        for oad, prefix in ((OAD(0x0010, 2, 0), "freeze.daily.energy.import."),
                            (OAD(0x0020, 2, 0), "freeze.daily.energy.export.")):
            if cells.get(oad) is None:
                continue
            try:
                for v in dlt698.quantities(oad, cells[oad]):
                    values.append(dlt698.Value(prefix + v.quantity.rsplit(".", 1)[1],
                                               v.value, v.unit))
            except DataError:
                continue
        return stamp, values
    return None, "no record with the freeze time of that day"


def _freeze(poller, worker, meter):
    """Today's daily freeze, and any missed day backfilled, timestamp checked."""
    h = poller.health[meter.id]
    today = _dt.datetime.fromtimestamp(poller.wall()).date()
    if h.last_freeze_day is None:
        h.last_freeze_day = today - _dt.timedelta(days=1)
    day = h.last_freeze_day + _dt.timedelta(days=1)
    while day <= today:
        if (today - day).days >= FREEZE_DAYS:
            poller.event("freeze.missing", meter=meter.id, day=day.isoformat(),
                         reason="older than the gateway looks back")
            day += _dt.timedelta(days=1)
            continue
        result = transact(worker, freeze_exchange(meter, day))
        if not poller.outcome(meter, result):
            return                        # no answer: try again at the next round
        stamp, values = freeze_values(_apdu(result.answer), day)
        if stamp is None:
            poller.event("freeze.missing", meter=meter.id, day=day.isoformat(),
                         reason=values)
        elif values:
            quality = GOOD if day == today else BACKFILLED
            poller.sink(poller.readings(meter, values, ts=poller.local_ms(stamp),
                                        quality=quality))
        h.last_freeze_day = day
        day += _dt.timedelta(days=1)
