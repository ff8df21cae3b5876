"""DL/T 645 codec: the reference's worked frames byte for byte, decoding, round trips."""

import datetime as dt
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import dlt645 as D
from protocols import dlt645_values as V
from protocols.framing import Scanner

pytestmark = pytest.mark.protocol

H = bytes.fromhex
ADDR = "000000123456"
DEADLINE = dt.datetime(2025, 12, 31, 12, 0, 0)


def relay(cmd):
    return D.relay_control(ADDR, cmd, password_level=2, password="000000",
                           operator_code="12345678", valid_until=DEADLINE)


@pytest.mark.parametrize("built, wire", [
    (lambda: D.read_data(ADDR, 0x00010000),
     "FE FE FE FE 68 56 34 12 00 00 00 68 11 04 33 33 34 33 4E 16"),
    (lambda: D.read_data("AAAAAAAA3456", 0x00010000),
     "FE FE FE FE 68 56 34 AA AA AA AA 68 11 04 33 33 34 33 E4 16"),
    (lambda: D.read_data(ADDR, 0x04000503),
     "FE FE FE FE 68 56 34 12 00 00 00 68 11 04 36 38 33 37 59 16"),
    (lambda: D.read_data(ADDR, 0x0201FF00),
     "FE FE FE FE 68 56 34 12 00 00 00 68 11 04 33 32 34 35 4F 16"),
    (lambda: D.read_address(), "FE FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16"),
    (lambda: relay(D.RelayCommand.TRIP),
     "FE FE FE FE 68 56 34 12 00 00 00 68 1C 10 35 33 33 33 AB 89 67 45 4D 33 33 33 45 64 45 58 72 16"),
    (lambda: relay(D.RelayCommand.CLOSE_ALLOWED),
     "FE FE FE FE 68 56 34 12 00 00 00 68 1C 10 35 33 33 33 AB 89 67 45 4E 33 33 33 45 64 45 58 73 16"),
    (lambda: D.broadcast_time_sync(dt.datetime(2025, 12, 31, 12, 34, 56)),
     "FE FE FE FE 68 99 99 99 99 99 99 68 08 06 89 67 45 64 45 58 AA 16"),
    (lambda: D.read_follow_up(ADDR, 0x00010000, 1),
     "FE FE FE FE 68 56 34 12 00 00 00 68 12 05 33 33 34 33 34 84 16"),
    (lambda: D.read_data(ADDR, 0x9010, version=1997),
     "FE FE FE FE 68 56 34 12 00 00 00 68 01 02 43 C3 75 16"),
    (lambda: D.read_response(ADDR, 0x00010000, H("56 34 12 00")),
     "FE FE FE FE 68 56 34 12 00 00 00 68 91 08 33 33 34 33 89 67 45 33 3A 16"),
    (lambda: D.error_response(ADDR, 0x11, 0x02), "FE FE FE FE 68 56 34 12 00 00 00 68 D1 01 35 73 16"),
    (lambda: D.ack_response(ADDR, 0x1C), "FE FE FE FE 68 56 34 12 00 00 00 68 9C 00 08 16"),
    (lambda: D.address_response(ADDR),
     "FE FE FE FE 68 56 34 12 00 00 00 68 93 06 89 67 45 33 33 33 D3 16"),
])
def test_reference_frames_byte_for_byte(built, wire):
    assert built() == H(wire)


def decode_hex(wire):
    return D.decode(D.parse_frame(H(wire)))


def test_decode_energy_answer():
    msg = decode_hex("68 56 34 12 00 00 00 68 91 08 33 33 34 33 89 67 45 33 3A 16")
    assert isinstance(msg, D.ReadResponse)
    assert msg.di == 0x00010000 and msg.address == ADDR
    assert msg.values == (V.Value("energy.import.total", Decimal("1234.56"), "kWh"),)


def test_decode_voltage_block_and_status_word():
    msg = decode_hex("68 56 34 12 00 00 00 68 91 0A 33 32 34 35 34 55 CB 54 43 55 15 16")
    assert [v.value for v in msg.values] == [Decimal("220.1"), Decimal("219.8"), Decimal("221.0")]
    sw = decode_hex("68 56 34 12 00 00 00 68 91 06 36 38 33 37 83 33 91 16")
    assert sw.value("status.word3") == 0x0050
    assert sw.value("relay.state") == "open" and sw.value("relay.command") == "trip"
    assert sw.value("guarantee.state") is False


def test_decode_errors_name_their_bits():
    msg = decode_hex("68 56 34 12 00 00 00 68 D1 01 35 73 16")
    assert isinstance(msg, D.ErrorResponse) and msg.code == 2 and msg.flags == ("no_data",)
    refused = decode_hex("68 56 34 12 00 00 00 68 DC 01 37 80 16")
    assert refused.function == D.RELAY_CONTROL and refused.flags == ("unauthorized",)


def test_decode_relay_request_and_ack():
    msg = D.decode(D.parse_frame(relay(D.RelayCommand.TRIP)))
    assert msg.command == D.RelayCommand.TRIP and msg.valid_until == DEADLINE
    assert msg.password == "000000" and msg.operator_code == "12345678"
    assert isinstance(decode_hex("68 56 34 12 00 00 00 68 9C 00 08 16"), D.Ack)


def test_signed_values():
    payload = V.encode_values(0x02020100, [Decimal("-1.234")])
    assert payload == H("34 12 80")
    assert V.decode_values(0x02020100, payload)[0].value == Decimal("-1.234")
    assert V.decode_values(0x00000000, H("00 00 00 80"))[0].value == Decimal("-0.00")


def test_unknown_di_and_bad_payloads_give_raw_bytes():
    msg = D.decode(D.parse_frame(D.read_response(ADDR, 0x028011FF, b"\x01\x02\x03")))
    assert msg.values is None and msg.payload == b"\x01\x02\x03"
    # 'no data' FF fillers and wrong lengths never become numbers
    assert V.decode_values(0x00010000, H("FF FF FF FF")) is None
    assert V.decode_values(0x02010100, H("00 00 00")) is None


def test_constructors_refuse_dangerous_or_incomplete_frames():
    for control in (0x19, 0x1A, 0x1B):
        with pytest.raises(ValueError):
            D.build_frame(ADDR, control, b"")
    with pytest.raises(TypeError):
        D.relay_control(ADDR, D.RelayCommand.TRIP, password_level=2, password="000000",
                        operator_code="12345678")                  # no deadline
    with pytest.raises(ValueError):
        D.relay_control(ADDR, 0x55, password_level=2, password="000000",
                        operator_code="12345678", valid_until=DEADLINE)
    with pytest.raises(ValueError):
        D.relay_control(ADDR, D.RelayCommand.TRIP, password_level=0x98, password="000000",
                        operator_code="12345678", valid_until=DEADLINE)
    with pytest.raises(ValueError):
        D.read_data("12345", 0x1FFFFFFFF)
    with pytest.raises(ValueError):
        D.read_data("12X456", 0x00010000)


def test_secured_relay_payload_is_forwarded_unchanged():
    payload = bytes([0x98]) + bytes(range(1, 24))
    frame = D.parse_frame(D.relay_control_secured(ADDR, payload))
    assert frame.data == payload
    msg = D.decode(frame)
    assert msg.secured and msg.command is None and msg.payload == payload


def test_match_answer():
    req = D.parse_frame(D.read_data(ADDR, 0x00010000))
    good = D.parse_frame(D.read_response(ADDR, 0x00010000, H("56 34 12 00")))
    assert D.match_answer(req, good) is None
    other = D.parse_frame(D.read_response("000000999999", 0x00010000, H("56 34 12 00")))
    assert "from 000000999999" in D.match_answer(req, other)
    wrong_di = D.parse_frame(D.read_response(ADDR, 0x00020000, H("56 34 12 00")))
    assert "DI" in D.match_answer(req, wrong_di)
    assert D.match_answer(req, req) is not None
    short = D.parse_frame(D.read_data("AAAAAAAA3456", 0x00010000))
    assert D.match_answer(short, good) is None


def test_parse_frame_errors_are_one_line():
    for wire, words in [("68 56 34", "too short"),
                        ("68 56 34 12 00 00 00 68 91 08 33 33 34 33 89 67 45 33 3B 16", "checksum"),
                        ("68 56 34 12 00 00 00 68 91 08 33 33 34 33 89 67 45 33 3A 17", "end byte"),
                        ("68 56 34 12 00 00 00 00 91 08 33 33 34 33 89 67 45 33 3A 16", "header")]:
        with pytest.raises(D.FrameError, match=words):
            D.parse_frame(H(wire))


KNOWN_DIS = [0x00010000, 0x0001FF00, 0x00000000, 0x00020400, 0x02010100, 0x0201FF00,
             0x02020200, 0x0203FF00, 0x02060000, 0x02800002, 0x04000101, 0x04000102,
             0x0400010C, 0x04000503, 0x040005FF, 0x00900200, 0x00900201, 0x05060001,
             0x05060101, 0x1D000001, 0x1D000101, 0x03110001, 0x04000402, 0x00010001]


def _value_for(field):
    if field.kind == "num":
        top = 10 ** (field.size * 2 - (1 if field.signed else 0)) - 1
        lo = -top if field.signed else 0
        return st.integers(lo, top).map(lambda n: Decimal(n).scaleb(-field.decimals))
    if field.kind in ("int", "digits"):
        return st.integers(0, 10 ** (field.size * 2) - 1)
    if field.kind == "word":
        return st.integers(0, 256 ** field.size - 1)
    if field.kind == "date":
        return st.dates(dt.date(2000, 1, 1), dt.date(2099, 12, 31))
    if field.kind == "time":
        return st.times().map(lambda t: t.replace(microsecond=0))
    dts = st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31))
    if field.kind == "ymdhm":
        return dts.map(lambda d: d.replace(second=0, microsecond=0))
    return dts.map(lambda d: d.replace(microsecond=0))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_values_round_trip_through_a_frame(data):
    di = data.draw(st.sampled_from(KNOWN_DIS))
    fields, repeating = V.lookup(di)
    if repeating:
        fields = fields[:data.draw(st.integers(1, 5))]
    values = [data.draw(_value_for(f)) for f in fields]
    wire = D.read_values_response(ADDR, di, values)
    frames = Scanner().feed(wire)
    msg = D.decode(D.frame_from_scanner(frames[0]))
    assert msg.di == di
    decoded = [v.value for v in msg.values][:len(values)]
    if fields[0].kind == "digits":
        values = ["%012d" % v for v in values]
    assert decoded == values
    assert [v.quantity for v in msg.values][:len(fields)] == [f.quantity for f in fields]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=80), st.integers(0, 10 ** 12 - 1))
def test_decode_never_raises(control, data, addr):
    if control & 0x1F in D.FORBIDDEN_CONTROLS and not control & 0x80:
        return
    frame = D.parse_frame(D.build_frame("%012d" % addr, control, data))
    msg = D.decode(frame)
    assert msg is not None


# ---------------------------------------------------------------- issue 14: field-true frames

def test_follow_up_parts_are_never_labelled_alone_and_are_joined_once():
    payload = V.encode_values(0x0001FF00, [Decimal("100.00"), Decimal("10.00"),
                                           Decimal("20.00"), Decimal("30.00"),
                                           Decimal("40.00")])
    first = D.decode(D.parse_frame(D.read_response(ADDR, 0x0001FF00, payload[:8],
                                                   follow_up=True)))
    assert first.follow_up and first.values is None          # 0xB1: more follows
    middle = D.decode(D.parse_frame(D.read_response(ADDR, 0x0001FF00, payload[8:16],
                                                    follow_up=True, seq=1)))
    last = D.decode(D.parse_frame(D.read_response(ADDR, 0x0001FF00, payload[16:], seq=2)))
    # a continuation alone decoded from the start of its block would say T2 is the total
    assert middle.values is None and last.values is None and last.seq == 2
    whole = D.join_follow_ups(first, [middle, last])
    assert whole.value("energy.import.total") == Decimal("100.00")
    assert whole.value("energy.import.t4") == Decimal("40.00")
    with pytest.raises(ValueError):
        D.join_follow_ups(first, [middle])                   # the meter said more follows
    # the follow-up request is the reference's frame, and its answer matches it
    ex = D.follow_up_exchange(ADDR, 0x0001FF00, 2)
    answer = D.read_response(ADDR, 0x0001FF00, payload[16:], seq=2)[4:]
    got, why = ex.accept(answer)
    assert why is None and got.seq == 2


@pytest.mark.parametrize("di, quantity", [
    (0x00170000, "energy.reactive.combined1.a"), (0x00180000, "energy.reactive.combined2.a"),
    (0x002B0000, "energy.reactive.combined1.b"), (0x002C0000, "energy.reactive.combined2.b"),
    (0x003F0000, "energy.reactive.combined1.c"), (0x00400000, "energy.reactive.combined2.c"),
])
def test_per_phase_combined_reactive_energy_is_signed(di, quantity):
    msg = decode_hex(D.read_response(ADDR, di, H("34 12 00 80")).hex())
    assert msg.values == (V.Value(quantity, Decimal("-12.34"), "kvarh"),)


def test_per_phase_energies_are_named_and_unknown_energy_dis_stay_raw():
    assert V.decode_values(0x00150000, H("34 12 00 00"))[0] == \
        V.Value("energy.import.a", Decimal("12.34"), "kWh")
    assert V.decode_values(0x00160000, H("34 12 00 00"))[0].quantity == "energy.export.a"
    assert V.decode_values(0x00410000, H("34 12 00 00"))[0].quantity == \
        "energy.reactive.q1.c"
    # an energy-class DI the tables do not name: raw bytes, never an unsigned guess
    for di in (0x00700000, 0x00150100):
        msg = decode_hex(D.read_response(ADDR, di, H("34 12 00 80")).hex())
        assert msg.values is None and msg.payload == H("34 12 00 80")


def test_a_trip_without_a_deadline_decodes_as_a_relay_command():
    data = H("02 00 00 00") + H("00 00 00 00") + H("1A 00") + bytes(6)
    msg = D.decode(D.parse_frame(D.build_frame("250619510001", 0x1C, data)))
    assert isinstance(msg, D.RelayControl)
    assert msg.command == D.RelayCommand.TRIP and msg.valid_until is None
