"""The Modbus RTU driver: register blocks of a meter's profile (protocols.modbus_profiles)
read as poll tasks or on demand, and the unit-id sweep. No relay."""

from gateway.line.reads import SILENT, ReadError, UnknownQuantity
from protocols import modbus
from protocols.modbus_profiles import PROFILES, decode_block

SCAN_KEY = "unit"             # what a scan reports a meter by
HAS_RELAY = False
SWEEP_REGISTERS = 2          # enough of a profile's first block to get an answer


def tasks(meter):
    return ()


def key_of(meter):
    """How a sweep names this meter: its unit id."""
    return str(meter.unit)


def block_exchange(meter, block, count=None):
    return modbus.block_exchange(meter.unit, block.function, block.address,
                            block.count if count is None else count).for_meter(meter.id).on_line(
        getattr(meter, "baudrate", None), getattr(meter, "parity", None))


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
            res = worker.transact(block_exchange(meter, block))
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
    """Unit ids that answer (a normal or an exception answer) on a Modbus line."""
    profiles = [PROFILES[profile]] if profile else list(PROFILES.values())
    found = []
    total = last - first + 1
    for n, unit in enumerate(range(first, last + 1), 1):
        for prof in profiles:
            block = next(iter(prof.groups.values()))[0]
            res = worker.transact(modbus.block_exchange(unit, block.function, block.address,
                                                   SWEEP_REGISTERS).for_meter("scan"))
            if res.ok:
                found.append({"unit": unit,
                              "profile": prof.name if res.answer.exception is None else None})
                break
        progress(n, total, len(found))
    return found


# ---------------------------------------------------------------- poll tasks

def poll(poller, worker, meter, task):
    profile = PROFILES[meter.profile]
    readings = []
    for block in profile.groups.get(task, ()):
        result = worker.transact(block_exchange(meter, block))
        if not poller.outcome(meter, result):
            if not poller.health[meter.id].online:
                break
            continue
        if result.answer.exception is not None:
            continue
        readings += poller.readings(meter, decode_block(block, result.answer.registers))
    if readings:
        poller.sink(readings)

