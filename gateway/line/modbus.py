"""The Modbus RTU driver: register blocks of a meter's profile (protocols.modbus_profiles)
read as poll tasks or on demand, and the unit-id sweep. No relay.

Register-read function: public drivers disagree for the same meter (the Chint DDSU666 is
read with 04, input registers, by Tasmota's xnrg_11_ddsu666.ino, and with 03, holding
registers, by ChuwuYo/DDSUViewer internal/modbus/modbus.go and devlevinspuhl/DDSU), and
firmware differs. A meter's `function_code` overrides its profile's; a meter that answers
exception 01 (illegal function) is asked once with the other code (03 <-> 04), and the one
that worked is kept for it, logged with the line to put in its configuration, shown in the
poller's status (`function_code`) and in what the scan suggests.
"""

import logging

from gateway.line.reads import SILENT, ReadError, UnknownQuantity
from protocols import modbus
from protocols.modbus_profiles import PROFILES, decode_block

HAS_RELAY = False
ILLEGAL_FUNCTION = 1
OTHER_READ = {3: 4, 4: 3}

log = logging.getLogger(__name__)


def tasks(meter):
    return ()


def key_of(meter):
    """How a sweep names this meter: its unit id."""
    return str(meter.unit)


def function_of(meter, block):
    """The read function used for a block of this meter: its own, or the profile's."""
    return getattr(meter, "function_code", None) or block.function


def block_exchange(meter, block, count=None, function=None):
    return modbus.block_exchange(meter.unit, function or function_of(meter, block),
                                 block.address, block.count if count is None else count
                                 ).for_meter(meter.id).on_line(
        getattr(meter, "baudrate", None), getattr(meter, "parity", None))


def _refused(res):
    return res.ok and res.answer.exception == ILLEGAL_FUNCTION


def transact_block(worker, meter, block):
    """One block read; on exception 01 the other read function is tried, once per meter,
    and kept when the meter answers it."""
    fn = function_of(meter, block)
    res = worker.transact(block_exchange(meter, block, function=fn))
    if not _refused(res) or fn not in OTHER_READ or getattr(meter, "function_tried", True):
        return res
    meter.function_tried = True
    other = OTHER_READ[fn]
    res2 = worker.transact(block_exchange(meter, block, function=other))
    if res2.ok and res2.answer.exception is None:
        meter.function_code = other
        log.warning("meter %s (unit %d) refuses function %02d (illegal function) and answers "
                    "%02d: reading it with %02d (set function_code = %d in its [[meters]] "
                    "entry)", meter.id, meter.unit, fn, other, other, other)
        return res2
    log.warning("meter %s (unit %d) refuses function %02d (illegal function), and %02d too",
                meter.id, meter.unit, fn, other)
    return res


def check_quantities(meter, quantities):
    profile = PROFILES[meter.profile]
    for g in quantities:
        if g not in profile.groups:
            raise UnknownQuantity("profile %s has groups %s, not %r"
                                  % (profile.name, ", ".join(profile.groups), g))


def read_now(worker, meter, quantities=()):
    """Reads a meter through a worker (on the calling thread): (values, errors)."""
    values, errors = [], []
    profile = PROFILES[meter.profile]
    groups = quantities or list(profile.groups)
    check_quantities(meter, groups)
    answered = False
    for g in groups:
        for block in profile.groups[g]:
            res = transact_block(worker, meter, block)
            if not res.ok:
                errors.append(ReadError("%04X: %s" % (block.address, res.error), res.code))
                if not answered and res.code in SILENT:
                    return values, errors        # the meter does not answer: say so now
                continue
            answered = True
            if res.answer.exception is not None:
                errors.append(ReadError("%04X: %s" % (block.address,
                                                      res.answer.exception_name), None,
                                        (res.answer.exception_name,)))
            else:
                values += decode_block(block, res.answer.registers)
    return values, errors


def scan(worker, progress=lambda done, total, found: None, profile=None, first=1,
         last=247, **_):
    """Unit ids that answer (a normal or an exception answer) on a Modbus line, each with
    the profile whose registers it has: a unit that answers is asked for a few registers of
    every known map (its instantaneous block), and the map that answers without exception
    with a plausible voltage names it (None: the unit answered, no known map fits). A unit
    that refuses the map's read function (exception 01) is asked with the other one; where
    that matches, `function_code` says which."""
    profiles = [PROFILES[profile]] if profile else list(PROFILES.values())
    found = []
    total = last - first + 1
    for n, unit in enumerate(range(first, last + 1), 1):
        answered, matched, function = False, None, None
        for prof in profiles:
            block = _probe_block(prof)
            fn = block.function
            res = worker.transact(modbus.block_exchange(unit, fn, block.address,
                                                        block.count).for_meter("scan"))
            if _refused(res) and fn in OTHER_READ:
                fn = OTHER_READ[fn]
                res = worker.transact(modbus.block_exchange(unit, fn, block.address,
                                                            block.count).for_meter("scan"))
                answered = True
            if not res.ok:
                if not answered:
                    break                # silence: no unit here, the other maps are moot
                continue
            answered = True
            if res.answer.exception is None and _plausible(block, res.answer.registers):
                matched = prof.name
                function = fn if fn != block.function else None
                break
        if answered:
            found.append(dict({"unit": unit, "profile": matched},
                              **({"function_code": function} if function else {})))
        progress(n, total, len(found))
    return found


def quick_probe(worker):
    """Unit ids 1-3 that answer (another protocol's scan found nothing: is this a Modbus
    line?)."""
    return [f["unit"] for f in scan(worker, first=1, last=3)]


def suggested_id(found):
    """A meter id for `mgw scan --toml`: u and the unit id."""
    return "u%d" % found["unit"]


def toml_lines(found):
    """The [[meters]] lines that identify a meter found by the sweep."""
    lines = ["unit = %d" % found["unit"]]
    if found.get("profile"):
        lines.append('profile = "%s"' % found["profile"])
    if found.get("function_code"):
        lines.append("function_code = %d" % found["function_code"])
    return lines


def _probe_block(profile):
    """The block that tells a profile: its instantaneous values (voltage first)."""
    groups = profile.groups
    return (groups.get("instant") or next(iter(groups.values())))[0]


def _plausible(block, registers):
    """A voltage a mains meter can show: another map's registers read as floats are
    usually zero, huge or not numbers."""
    for v in decode_block(block, registers):
        if v.quantity.startswith("voltage."):
            return 50 <= v.value <= 500
    return bool(decode_block(block, registers))


# ---------------------------------------------------------------- poll tasks

def poll(poller, worker, meter, task):
    profile = PROFILES[meter.profile]
    readings = []
    for block in profile.groups.get(task, ()):
        result = transact_block(worker, meter, block)
        if not poller.outcome(meter, result):
            if not poller.health[meter.id].online:
                break
            continue
        if result.answer.exception is not None:
            continue
        readings += poller.readings(meter, decode_block(block, result.answer.registers))
    if readings:
        poller.sink(readings)

