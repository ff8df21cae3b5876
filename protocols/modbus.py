"""Modbus RTU for meters: request ADUs and answer decoding around pymodbus' PDUs.

pymodbus supplies the PDUs (encode/decode of function codes 1-6, 15, 16 and exceptions);
the RTU framing (unit id, CRC-16 low byte first, stream scanning) is ours, shared with
DL/T 645 through protocols.framing.Scanner, so both protocols have one scanner, one
timeout policy and one set of line statistics.
"""

import functools
from typing import NamedTuple, Optional, Tuple

from protocols.framing import crc16_modbus

EXCEPTION_NAMES = {
    1: "illegal_function", 2: "illegal_data_address", 3: "illegal_data_value",
    4: "server_device_failure", 5: "acknowledge", 6: "server_device_busy",
    8: "memory_parity_error", 10: "gateway_path_unavailable",
    11: "gateway_target_failed_to_respond",
}



@functools.lru_cache(maxsize=None)
def _pdu():
    """pymodbus, imported on first use: a gateway without Modbus meters does not carry it
    (about 9 MB resident on a box that has 256 MB)."""
    import pymodbus.pdu as pdu
    from pymodbus.pdu import bit_message, register_message
    return (pdu.DecodePDU(is_server=False), pdu.DecodePDU(is_server=True), bit_message,
            register_message)


class ModbusError(ValueError):
    """A byte string that is not a valid Modbus RTU ADU."""


class Answer(NamedTuple):
    unit: int
    function: int
    registers: Tuple[int, ...]   # function 3/4 (and the echo of 6/16: the written values)
    bits: Tuple[bool, ...]       # function 1/2
    exception: Optional[int]     # exception code, None for a normal answer
    pdu: object

    @property
    def exception_name(self):
        return EXCEPTION_NAMES.get(self.exception, "exception_%s" % self.exception)


def _adu(unit, pdu):
    if not 1 <= unit <= 247:
        raise ValueError("Modbus unit id is 1..247: %r" % unit)
    body = bytes((unit, pdu.function_code)) + pdu.encode()
    crc = crc16_modbus(body)
    return body + bytes((crc & 0xFF, crc >> 8))


def _check_range(address, count, most):
    if not 0 <= address <= 0xFFFF:
        raise ValueError("register address is 0..65535: %r" % address)
    if not 1 <= count <= most:
        raise ValueError("count is 1..%d: %r" % (most, count))


def read_holding_registers(unit, address, count):
    _check_range(address, count, 125)
    return _adu(unit, _pdu()[3].ReadHoldingRegistersRequest(address=address, count=count,
                                                             dev_id=unit))


def read_input_registers(unit, address, count):
    _check_range(address, count, 125)
    return _adu(unit, _pdu()[3].ReadInputRegistersRequest(address=address, count=count,
                                                           dev_id=unit))


def read_coils(unit, address, count):
    _check_range(address, count, 2000)
    return _adu(unit, _pdu()[2].ReadCoilsRequest(address=address, count=count, dev_id=unit))


def write_coil(unit, address, on):
    _check_range(address, 1, 1)
    return _adu(unit, _pdu()[2].WriteSingleCoilRequest(address=address, bits=[bool(on)],
                                                        dev_id=unit))


def write_register(unit, address, value):
    _check_range(address, 1, 1)
    return _adu(unit, _pdu()[3].WriteSingleRegisterRequest(address=address, registers=[value],
                                                            dev_id=unit))


def write_registers(unit, address, values):
    _check_range(address, len(values), 123)
    return _adu(unit, _pdu()[3].WriteMultipleRegistersRequest(
        address=address, registers=list(values), dev_id=unit))


def _check_crc(adu):
    if len(adu) < 4:
        raise ModbusError("ADU too short (%d bytes)" % len(adu))
    crc = crc16_modbus(adu[:-2])
    if adu[-2] != crc & 0xFF or adu[-1] != crc >> 8:
        raise ModbusError("CRC %02X%02X, computed %04X" % (adu[-1], adu[-2], crc))


def decode_answer(adu):
    """An Answer from a response ADU (as the Scanner yields it); raises ModbusError."""
    adu = bytes(adu)
    _check_crc(adu)
    unit, fn = adu[0], adu[1]
    if fn & 0x80:
        if len(adu) != 5:
            raise ModbusError("exception answer of %d bytes" % len(adu))
        return Answer(unit, fn & 0x7F, (), (), adu[2], None)
    try:
        pdu = _pdu()[0].decode(adu[1:-2])
    except Exception as exc:  # pymodbus raises several types for malformed PDUs
        raise ModbusError("undecodable PDU for function %d: %s" % (fn, exc)) from None
    if pdu is None:
        raise ModbusError("undecodable PDU for function %d" % fn)
    return Answer(unit, fn, tuple(getattr(pdu, "registers", ()) or ()),
                  tuple(getattr(pdu, "bits", ()) or ()), None, pdu)


def decode_request(adu):
    """(unit, pdu) from a request ADU: the meter side, for simulators and scans."""
    adu = bytes(adu)
    _check_crc(adu)
    pdu = _pdu()[1].decode(adu[1:-2])
    if pdu is None:
        raise ModbusError("undecodable request for function %d" % adu[1])
    return adu[0], pdu


def answer_length(request_adu):
    """Bytes the normal answer to a request takes on the wire (for timeouts)."""
    fn = request_adu[1]
    count = int.from_bytes(request_adu[4:6], "big")
    if fn in (3, 4):
        return 5 + 2 * count
    if fn in (1, 2):
        return 5 + (count + 7) // 8
    return 8


def match_answer(request_adu, answer):
    """Why an Answer does not belong to a request ADU, or None if it does."""
    if answer.unit != request_adu[0]:
        return "answer from unit %d to a request for unit %d" % (answer.unit, request_adu[0])
    if answer.function != request_adu[1]:
        return "answer function %d to request %d" % (answer.function, request_adu[1])
    if answer.exception is None and request_adu[1] in (3, 4):
        want = int.from_bytes(request_adu[4:6], "big")
        if len(answer.registers) != want:
            return "%d registers in answer, %d requested" % (len(answer.registers), want)
    return None


# ---------------------------------------------------------------- exchanges

READ_FUNCTIONS = {3: read_holding_registers, 4: read_input_registers}


def exchange(frame, label=""):
    """The exchange of a request ADU built by this module."""
    from protocols.exchange import Exchange

    def match(raw):
        try:
            answer = decode_answer(raw)
        except ModbusError as exc:
            return None, str(exc)
        why = match_answer(frame, answer)
        if why:
            return None, why
        return answer, None
    return Exchange(frame, answer_length(frame), "modbus", frame[:1], match, label)


def block_exchange(unit, function, address, count):
    """Read a register block (function 3 or 4)."""
    if function not in READ_FUNCTIONS:
        raise ValueError("function %r does not read registers (3 or 4)" % (function,))
    return exchange(READ_FUNCTIONS[function](unit, address, count),
                    label="%d:%04X" % (function, address))
