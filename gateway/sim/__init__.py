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
    meters = make_meters698(count, first_address=first, faults=faults, prepaid=True)
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


def simulated_line(protocol, count, first, faults, baudrate, **options):
    """(a simulated line, not yet started, and its meters' names) for `mgw simulate`."""
    return SIMULATORS[protocol](count, first, faults, baudrate, **options)
