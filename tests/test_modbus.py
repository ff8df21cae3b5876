"""Modbus RTU ADUs around pymodbus' PDUs, through the shared scanner."""

import pytest
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse

from protocols import modbus as M
from protocols.framing import Scanner

pytestmark = pytest.mark.protocol

H = bytes.fromhex


def test_requests_byte_for_byte():
    assert M.read_holding_registers(1, 0, 10) == H("01 03 00 00 00 0A C5 CD")
    assert M.write_coil(1, 0, True) == H("01 05 00 00 FF 00 8C 3A")
    with pytest.raises(ValueError):
        M.read_holding_registers(0, 0, 1)
    with pytest.raises(ValueError):
        M.read_input_registers(1, 0, 126)


def test_answers_through_the_scanner():
    rsp = M._adu(5, ReadHoldingRegistersResponse(registers=[1, 0xFFFF, 3], dev_id=5))
    exc = H("05 83 02") + bytes((lambda c: (c & 0xFF, c >> 8))(M.crc16_modbus(H("05 83 02"))))
    frames = Scanner("modbus").feed(H("FF 00") + rsp + exc)
    a, e = [M.decode_answer(f) for f in frames]
    assert a.registers == (1, 0xFFFF, 3) and a.exception is None
    assert M.match_answer(M.read_holding_registers(5, 0, 3), a) is None
    assert "unit" in M.match_answer(M.read_holding_registers(6, 0, 3), a)
    assert "registers" in M.match_answer(M.read_holding_registers(5, 0, 4), a)
    assert e.exception == 2 and e.exception_name == "illegal_data_address"


def test_bad_crc_is_one_line_error():
    with pytest.raises(M.ModbusError, match="CRC"):
        M.decode_answer(H("01 03 02 00 01 00 00"))


def test_answer_length():
    assert M.answer_length(M.read_holding_registers(1, 0, 10)) == 25
    assert M.answer_length(M.write_coil(1, 0, True)) == 8


def test_decode_request_for_the_meter_side():
    unit, pdu = M.decode_request(M.write_register(9, 0x20, 0x1234))
    assert unit == 9 and pdu.function_code == 6 and pdu.registers == [0x1234]
