"""The frame layer's hot path, compiled where possible.

Picks protocols._speedups (built by setup.py from ext/_speedups.pyx) and falls back to its
pure-Python twin protocols._pyframing, with the same names and results. MGW_PURE_PYTHON=1
forces the twin. IMPLEMENTATION says which one is in use.
"""

import os

if os.environ.get("MGW_PURE_PYTHON", "") not in ("", "0"):
    from protocols._pyframing import (  # noqa: F401
        MAX_DLT645_FRAME, MAX_DLT698_FRAME, MAX_MODBUS_FRAME, Scanner, add_33, bcd_to_int,
        crc16_modbus, crc16_x25, dlt645_checksum, int_to_bcd, sub_33)
    IMPLEMENTATION = "python"
else:
    try:
        from protocols._speedups import (  # noqa: F401
            MAX_DLT645_FRAME, MAX_DLT698_FRAME, MAX_MODBUS_FRAME, Scanner, add_33,
            bcd_to_int, crc16_modbus, crc16_x25, dlt645_checksum, int_to_bcd, sub_33)
        IMPLEMENTATION = "compiled"
    except ImportError:
        from protocols._pyframing import (  # noqa: F401
            MAX_DLT645_FRAME, MAX_DLT698_FRAME, MAX_MODBUS_FRAME, Scanner, add_33,
            bcd_to_int, crc16_modbus, crc16_x25, dlt645_checksum, int_to_bcd, sub_33)
        IMPLEMENTATION = "python"



def implementation():
    """The whole frame layer's: "compiled" or "python" when every compiled part (the
    scanner, the DL/T 698.45 read path) agrees, else each part named (a half-built
    install)."""
    from protocols import dlt698        # imports this module: only when asked
    if dlt698.IMPLEMENTATION == IMPLEMENTATION:
        return IMPLEMENTATION
    return "%s, DL/T 698.45 reader %s" % (IMPLEMENTATION, dlt698.IMPLEMENTATION)


__all__ = ["Scanner", "add_33", "sub_33", "bcd_to_int", "int_to_bcd", "crc16_modbus",
           "crc16_x25", "dlt645_checksum", "IMPLEMENTATION", "implementation",
           "MAX_DLT645_FRAME",
           "MAX_DLT698_FRAME", "MAX_MODBUS_FRAME"]
