"""The protocol registry: the one place in gateway/ that names the meter protocols.

A protocol is a codec in protocols/ plus a driver module in gateway/line/ (poll tasks,
reads, scan, and the relay status exchange where it has a relay); adding one is a codec
module, a driver and one entry here. Nothing else branches on a protocol's name. The
drivers are imported on first use, so a gateway without Modbus meters never loads pymodbus.
"""

PROTOCOLS = {
    "dlt645": "gateway.line.dlt645",      # DL/T 645-2007 and -1997
    "modbus": "gateway.line.modbus",      # Modbus RTU meters with a register profile
    "dlt698": "gateway.line.dlt698",      # DL/T 698.45 (object-oriented, A-XDR)
}
DEFAULT_PROTOCOL = "dlt645"
NAMES = tuple(PROTOCOLS)
