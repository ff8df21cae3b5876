"""An exchange: one request and the answer it waits for, sans-I/O.

Built by a codec's constructors (`dlt645.read_exchange`, `modbus.block_exchange`, ...), it
knows the bytes to send, how long the answer will be (for the timeout), which stream
framing finds the answer on the line, the address key (some meters need a pause when the
address changes), and whether a received frame answers it, and why not. The port worker only
moves bytes and asks the exchange: it knows no protocol.
"""


class Exchange:
    __slots__ = ("frame", "answer_len", "framing", "address_key", "label", "meter", "_match")

    def __init__(self, frame, answer_len, framing, address_key, match, label="", meter=""):
        self.frame = bytes(frame)
        self.answer_len = int(answer_len)     # expected answer bytes, for the timeout
        self.framing = framing                # the protocols.framing.Scanner that finds it
        self.address_key = address_key
        self.label = label
        self.meter = meter                    # the meter's id: latency budgets and logs
        self._match = match                   # raw frame -> (answer, None) or (None, why)

    def accept(self, raw):
        """(decoded answer, None) if `raw` answers this request, else (None, why)."""
        return self._match(raw)

    def for_meter(self, meter_id):
        self.meter = meter_id
        return self

    def __repr__(self):
        return "Exchange(%s %s, %d bytes expected)" % (self.framing, self.label or "",
                                                      self.answer_len)
