"""Simulated meters (DL/T 645, DL/T 698.45, Modbus RTU) on pseudo-terminals, and the demo.
Shipped, since `mgw simulate` and `mgw demo` are features; imported by the command line
only.

Each protocol's simulator is the module its registry entry names (`simulator`): it builds a
line of its meters (`simulated_line`), says which line class it runs on (`LINE`) and, if a
line of that class takes single meters of it beside others', makes one (`one_meter`). Which
protocols share a simulated line follows from that; nothing here names a protocol."""

import importlib

from gateway.registry import DEFAULT_PROTOCOL, NAMES, PROTOCOLS as _REGISTRY

# what `mgw simulate --protocol` can simulate, first the default
PROTOCOLS = (DEFAULT_PROTOCOL,) + tuple(n for n in NAMES if n != DEFAULT_PROTOCOL)


def simulator(protocol):
    """The simulator module of a registered protocol (imported on first use)."""
    return importlib.import_module(_REGISTRY[protocol].simulator)


def shares_line(protocol, other):
    """Whether `other`'s simulated meters can be added one by one to a line of
    `protocol`'s (the same line class: DL/T 645 and DL/T 698.45 frames both start with 0x68
    and are told apart by one scanner, as on the RS-485 lines of the field)."""
    if protocol not in _REGISTRY or other not in _REGISTRY:
        return False
    add = simulator(other)
    return getattr(add, "one_meter", None) is not None and add.LINE is simulator(protocol).LINE


def shared_line_protocols():
    """The protocols whose meters `--meter` can add to a line of some protocol's."""
    return tuple(p for p in PROTOCOLS if any(shares_line(q, p) for q in PROTOCOLS))


def meter_spec(text):
    """(protocol, address) from `PROTOCOL:ADDRESS`, such as dlt698:1007 for a DL/T 698.45
    meter at 000000001007 (up to 12 address digits, zeros put in front as on the
    nameplate's short form); ValueError naming what is wrong."""
    proto, sep, address = text.partition(":")
    if not sep or proto not in _REGISTRY or \
            getattr(simulator(proto), "one_meter", None) is None:
        raise ValueError("PROTOCOL:ADDRESS with PROTOCOL one of %s"
                         % ", ".join(shared_line_protocols()))
    if not address.isdigit() or not address.isascii() or len(address) > 12:
        raise ValueError("the address must be 1 to 12 digits")
    return proto, address.rjust(12, "0")


def simulated_line(protocol, count, first, faults, baudrate, meters=(), **options):
    """(a simulated line, not yet started, and its meters' names) for `mgw simulate`:
    `count` meters of `protocol`, then `meters` [(protocol, address)] on the same line."""
    for proto, _ in meters:
        if not shares_line(protocol, proto):
            raise ValueError("--meter %s: its meters cannot go on a --protocol %s line"
                             % (proto, protocol))
    line, names = simulator(protocol).simulated_line(count, first, faults, baudrate,
                                                     **options)
    for proto, address in meters:
        if address in line.meters:
            raise ValueError("two meters with address %s on one line" % address)
        line.add(simulator(proto).one_meter(address, faults, options.get("on_relay"),
                                            options.get("button_required", False)))
        names.append(address)
    return line, names
