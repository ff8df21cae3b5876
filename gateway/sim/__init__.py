"""Simulated meters (DL/T 645, DL/T 698.45, Modbus RTU) on pseudo-terminals, and the demo.
Shipped, since `mgw simulate` and `mgw demo` are features; imported by the command line
only."""

def _modbus_line(count, first, faults, baudrate, profile=None, on_relay=None, count_1997=0,
                 baudrate_1997=1200, button_required=False):
    if count_1997 or button_required:
        raise ValueError("--meters-1997 and --button simulate DL/T 645 meters "
                         "(--protocol dlt645)")
    from gateway.sim.dlt645 import Faults
    from gateway.sim.modbus import ModbusSimLine, ModbusSimMeter
    meters = [ModbusSimMeter(first + i, profile, faults=Faults(**vars(faults)))
              for i in range(count)]
    return ModbusSimLine(meters, baudrate=baudrate), ["unit %d" % m.unit for m in meters]


def _dlt698_line(count, first, faults, baudrate, profile=None, on_relay=None, count_1997=0,
                 baudrate_1997=1200, button_required=False):
    from gateway.sim.dlt645 import SimLine
    from gateway.sim.dlt698 import make_meters698
    meters = make_meters698(count, first_address=first, faults=faults, prepaid=True,
                            button_required=button_required)
    for m in meters:
        m.on_relay = on_relay
    return SimLine(meters, baudrate=baudrate), [m.address for m in meters]


def _dlt645_line(count, first, faults, baudrate, profile=None, on_relay=None, count_1997=0,
                 baudrate_1997=1200, button_required=False):
    """DL/T 645 lines may carry `count_1997` DL/T 645-1997 meters at their own
    `baudrate_1997` after the 2007 ones (a mixed line: each answers only at its own rate)."""
    from gateway.sim.dlt645 import SimLine, make_meters
    meters = make_meters(count, first_address=first, faults=faults, prepaid=True,
                         button_required=button_required)
    meters += make_meters(count_1997, first_address=first + count, faults=faults,
                          prepaid=False, version=1997,
                          baudrate=baudrate_1997 if baudrate_1997 != baudrate else None)
    for m in meters:
        m.on_relay = on_relay
    return SimLine(meters, baudrate=baudrate), [m.address for m in meters]


# what `mgw simulate --protocol` can simulate, first the default
SIMULATORS = {"dlt645": _dlt645_line, "modbus": _modbus_line, "dlt698": _dlt698_line}
PROTOCOLS = tuple(SIMULATORS)

# the protocols whose simulated meters share one line (`--meter PROTO:ADDRESS`): DL/T 645
# and DL/T 698.45 frames both start with 0x68 and live together on RS-485 lines in the field
SHARED_LINE = ("dlt645", "dlt698")


def meter_spec(text):
    """("dlt698", "000000001007") from `dlt698:1007` (up to 12 address digits, zeros put in
    front as on the nameplate's short form); ValueError naming what is wrong."""
    proto, sep, address = text.partition(":")
    if not sep or proto not in SHARED_LINE:
        raise ValueError("PROTOCOL:ADDRESS with PROTOCOL one of %s" % ", ".join(SHARED_LINE))
    if not address.isdigit() or not address.isascii() or len(address) > 12:
        raise ValueError("the address must be 1 to 12 digits")
    return proto, address.rjust(12, "0")


def _one_meter(proto, address, faults, on_relay, button_required):
    import copy
    from gateway.sim.dlt645 import SimMeter
    from gateway.sim.dlt698 import SimMeter698
    kind = SimMeter698 if proto == "dlt698" else SimMeter
    m = kind(address, seed=int(address), faults=copy.copy(faults), prepaid=True,
             button_required=button_required)
    m.on_relay = on_relay
    return m


def simulated_line(protocol, count, first, faults, baudrate, meters=(), **options):
    """(a simulated line, not yet started, and its meters' names) for `mgw simulate`:
    `count` meters of `protocol`, then `meters` [(protocol, address)] on the same line."""
    if meters and protocol not in SHARED_LINE:
        raise ValueError("--meter puts DL/T 645 or DL/T 698.45 meters on the line: not "
                         "with --protocol %s" % protocol)
    line, names = SIMULATORS[protocol](count, first, faults, baudrate, **options)
    for proto, address in meters:
        if address in line.meters:
            raise ValueError("two meters with address %s on one line" % address)
        line.add(_one_meter(proto, address, faults, options.get("on_relay"),
                            options.get("button_required", False)))
        names.append(address)
    return line, names
