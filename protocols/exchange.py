"""An exchange: one request and the answer it waits for, sans-I/O.

Built by a codec's constructors (`dlt645.read_exchange`, `modbus.block_exchange`, ...), it
knows the bytes to send, how long the answer will be (for the timeout), which stream
framing finds the answer on the line, the address key (some meters need a pause when the
address changes), the line settings its meter talks at when they differ from the port's
(a 1997 meter at 1200 baud on a 2400 baud line), and whether a received frame answers it,
and why not. The port worker only moves bytes and asks the exchange: it knows no protocol.

Also the words a relay exchange is built for, the same for every protocol (RelayIntent).
"""

from enum import Enum


class RelayIntent(Enum):
    """What a relay command asks of a meter, whatever its protocol; each codec or driver
    maps it to its own (DL/T 645: the 0x1C frame's N1 code, `dlt645.RELAY_CODES`; DL/T
    698.45: an ACTION method of 8000/8001). The names are stored (the command ledger's
    `relay_command`, read back by a restart): never rename one."""
    TRIP = "TRIP"
    CLOSE_ALLOWED = "CLOSE_ALLOWED"
    DIRECT_CLOSE = "DIRECT_CLOSE"
    GUARANTEE = "GUARANTEE"
    GUARANTEE_RELEASE = "GUARANTEE_RELEASE"


class Exchange:
    __slots__ = ("frame", "answer_len", "framing", "address_key", "label", "meter", "baudrate",
                 "parity", "_match")

    def __init__(self, frame, answer_len, framing, address_key, match, label="", meter=""):
        self.frame = bytes(frame)
        self.answer_len = int(answer_len)     # expected answer bytes, for the timeout
        self.framing = framing                # the protocols.framing.Scanner that finds it
        self.address_key = address_key
        self.label = label
        self.meter = meter                    # the meter's id: latency budgets and logs
        self.baudrate = None                  # None: the port's own line settings
        self.parity = None
        self._match = match                   # raw frame -> (answer, None) or (None, why)

    def accept(self, raw):
        """(decoded answer, None) if `raw` answers this request, else (None, why)."""
        return self._match(raw)

    def for_meter(self, meter_id):
        self.meter = meter_id
        return self

    def on_line(self, baudrate=None, parity=None):
        """Talk at these line settings (the meter's own); None keeps the port's."""
        self.baudrate = baudrate
        self.parity = parity
        return self

    def __repr__(self):
        return "Exchange(%s %s, %d bytes expected)" % (self.framing, self.label or "",
                                                      self.answer_len)
