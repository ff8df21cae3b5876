"""The protocol registry: the one place in gateway/ that names the meter protocols.

A protocol is a codec in protocols/ plus a driver module in gateway/line/ (poll tasks,
reads, scan, and the relay status exchange where it has a relay); adding one is a codec
module, a driver (and its simulated meters) and one entry here. Nothing else branches on a
protocol's name. The drivers and simulators are imported on first use, so a gateway
without Modbus meters never loads pymodbus.
"""

from typing import NamedTuple


class Protocol(NamedTuple):
    driver: str            # the driver module in gateway/line
    label: str             # how messages name it
    keyed_by: str          # what identifies a meter in [[meters]]: "address" or "unit"
    simulator: str         # its simulated meters in gateway/sim (`mgw simulate`, the demo)


PROTOCOLS = {
    "dlt645": Protocol("gateway.line.dlt645", "DL/T 645", "address",     # 2007 and 1997
                       "gateway.sim.dlt645"),
    "modbus": Protocol("gateway.line.modbus", "Modbus", "unit",          # with a profile
                       "gateway.sim.modbus"),
    "dlt698": Protocol("gateway.line.dlt698", "DL/T 698.45", "address",
                       "gateway.sim.dlt698"),
}
DEFAULT_PROTOCOL = "dlt645"
NAMES = tuple(PROTOCOLS)


def keyed_by(name):
    """"address" or "unit" for a registered protocol, None for an unknown name."""
    entry = PROTOCOLS.get(name)
    return entry.keyed_by if entry else None
