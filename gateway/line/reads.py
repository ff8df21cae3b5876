"""Reading meters now, for the technician's tools (`mgw read`, `mgw scan`) and for commands:
quantity names to data identifiers and register blocks, and the address search."""

from gateway.line.port import Request
from protocols import dlt645 as D
from protocols import modbus as M
from protocols.dlt645_values import lookup, payload_length
from protocols.modbus_profiles import PROFILES, decode_block

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

_QUANTITY_DI = {}
for _di in (0x00010000, 0x00010100, 0x00010200, 0x00010300, 0x00010400, 0x00020000,
            0x00000000, 0x02010100, 0x02010200, 0x02010300, 0x02020100, 0x02020200,
            0x02020300, 0x02030000, 0x02060000, 0x02800002, 0x04000503, 0x00900200,
            0x00900201, 0x0400010C, 0x04000402):
    for _f in lookup(_di)[0]:
        _QUANTITY_DI.setdefault(_f.quantity, _di)
_QUANTITY_DI.update({"relay.state": 0x04000503, "guarantee.state": 0x04000503})


class UnknownQuantity(ValueError):
    pass


def dis_for(meter, quantities):
    """DL/T 645 identifiers to read for quantity names or group names."""
    groups = GROUPS_2007 if meter.version == 2007 else GROUPS_1997
    if not quantities:
        quantities = ["energy", "instant", "status", "clock"] + \
            (["balance"] if meter.prepaid else [])
    dis = []
    for q in quantities:
        if q in groups:
            new = groups[q]
        elif meter.version == 2007 and q in _QUANTITY_DI:
            new = [_QUANTITY_DI[q]]
        elif q.lower().startswith("0x") or (len(q) in (4, 8) and _is_hex(q)):
            new = [int(q, 16)]
        else:
            raise UnknownQuantity("unknown quantity %r (groups: %s; or a data identifier in "
                                  "hex)" % (q, ", ".join(sorted(groups))))
        dis += [d for d in new if d not in dis]
    return dis


def _is_hex(s):
    try:
        int(s, 16)
        return True
    except ValueError:
        return False


def read_now(worker, meter, quantities=()):
    """Reads a meter through a worker (on the calling thread): (values, errors)."""
    values, errors = [], []
    if meter.protocol == "modbus":
        profile = PROFILES[meter.profile]
        groups = quantities or list(profile.groups)
        for g in groups:
            if g not in profile.groups:
                raise UnknownQuantity("profile %s has groups %s, not %r"
                                      % (profile.name, ", ".join(profile.groups), g))
            for block in profile.groups[g]:
                builder = M.read_input_registers if block.function == 4 else \
                    M.read_holding_registers
                frame = builder(meter.unit, block.address, block.count)
                res = worker.transact(Request(meter.id, "modbus", frame,
                                              M.answer_length(frame)))
                if not res.ok:
                    errors.append("%04X: %s" % (block.address, res.error))
                elif res.answer.exception is not None:
                    errors.append("%04X: %s" % (block.address, res.answer.exception_name))
                else:
                    values += decode_block(block, res.answer.registers)
        return values, errors
    for di in dis_for(meter, quantities):
        res = read_di(worker, meter, di)
        msg = res.answer
        if not res.ok:
            errors.append("%08X: %s" % (di, res.error))
        elif isinstance(msg, D.ErrorResponse):
            errors.append("%08X: meter says %s" % (di, ", ".join(msg.flags) or msg.code))
        elif isinstance(msg, D.ReadResponse):
            if msg.values is None:
                values.append(D.Value("di.%08X" % di, msg.payload.hex(), "raw"))
            else:
                values += [v for v in msg.values if v.quantity not in SKIP_QUANTITIES
                           or v.quantity == "meter.clock"]
    return values, errors


def read_request(meter, di):
    """The Request reading one DL/T 645 identifier, with its expected answer length."""
    width = 4 if meter.version == 2007 else 2
    plen = payload_length(di, meter.version) or 40
    return Request(meter.id, "dlt645", D.read_data(meter.address, di, meter.version),
                   12 + width + plen, label="%X" % di)


def read_di(worker, meter, di):
    return worker.transact(read_request(meter, di))


def search_dlt645(worker, progress=lambda done, total, found: None):
    """Finds every meter on a DL/T 645 line, addresses unknown: a wildcard read, and where
    answers collide, the same again with one more low byte of the address fixed (short
    addressing, reference 1.3). Returns sorted addresses."""
    found = set()
    probes = [""]                # known low digits (2 per byte), grows from the right
    done = 0
    total = 1
    while probes:
        suffix = probes.pop(0)
        pattern = "A" * (12 - len(suffix)) + suffix
        frame = D.read_data(pattern, 0x00010000)
        res = worker.transact(Request("scan", "dlt645", frame, 12 + 4 + 4))
        done += 1
        if res.ok:
            found.add(res.answer.address if hasattr(res.answer, "address") else
                      D.parse_frame(res.frames[1]).address)
        elif res.error and "garbled" in res.error and len(suffix) < 12:
            # several meters answered at once: split on the next address byte
            probes.extend("%02d" % b + suffix for b in range(100))
            total += 100
        progress(done, total, len(found))
    return sorted(found)


def sweep_modbus(worker, profile_name=None, first=1, last=247,
                 progress=lambda done, total, found: None):
    """Unit ids that answer (a normal or an exception answer) on a Modbus line."""
    profiles = [PROFILES[profile_name]] if profile_name else list(PROFILES.values())
    found = []
    total = last - first + 1
    for n, unit in enumerate(range(first, last + 1), 1):
        for profile in profiles:
            block = next(iter(profile.groups.values()))[0]
            builder = M.read_input_registers if block.function == 4 else \
                M.read_holding_registers
            frame = builder(unit, block.address, 2)
            res = worker.transact(Request("scan-%d" % unit, "modbus", frame, 9))
            if res.ok:
                found.append((unit, profile.name if res.answer.exception is None else None))
                break
        progress(n, total, len(found))
    return found
