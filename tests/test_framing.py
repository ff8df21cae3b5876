"""Stream scanner, checksums and BCD: every test runs over both twins."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import _pyframing
from protocols.dlt645 import build_frame
from protocols.modbus import read_holding_registers, write_coil

pytestmark = pytest.mark.protocol

H = bytes.fromhex
READ_REQ = H("FE FE FE FE 68 56 34 12 00 00 00 68 11 04 33 33 34 33 4E 16")
READ_RSP = H("68 56 34 12 00 00 00 68 91 08 33 33 34 33 89 67 45 33 3A 16")
VOLT_RSP = H("68 56 34 12 00 00 00 68 91 0A 33 32 34 35 34 55 CB 54 43 55 15 16")
MB_RSP = H("01 03 06 00 01 00 02 00 03 FD 74")


def test_checksums(impl):
    assert impl.dlt645_checksum(READ_REQ[4:-2]) == 0x4E
    assert impl.crc16_modbus(H("01 03 00 00 00 0A")) == 0xCDC5
    assert impl.crc16_modbus(b"") == 0xFFFF


def test_offset(impl):
    assert impl.add_33(H("00 CD FF 35")) == H("33 00 32 68")
    assert impl.sub_33(H("33 00 32 68")) == H("00 CD FF 35")


def test_bcd(impl):
    assert impl.bcd_to_int(H("56 34 12 00")) == 123456
    assert impl.bcd_to_int(H("56 34 92"), True) == -123456
    assert impl.int_to_bcd(-123456, 3, True) == H("56 34 92")
    assert impl.int_to_bcd(99, 1) == H("99")
    with pytest.raises(ValueError):
        impl.bcd_to_int(H("FF 00"))
    with pytest.raises(ValueError):
        impl.int_to_bcd(100, 1)
    with pytest.raises(ValueError):
        impl.int_to_bcd(800000, 3, True)   # would set the sign bit
    with pytest.raises(ValueError):
        impl.int_to_bcd(-1, 2)
    assert impl.bcd_to_int(bytes(12) + H("01")) == 10 ** 24


def test_unsigned_bcd_ignores_top_bit_as_sign(impl):
    assert impl.bcd_to_int(H("56 34 92")) == 923456


def test_frames_in_one_piece_and_byte_by_byte(impl):
    stream = READ_REQ + READ_RSP + VOLT_RSP
    s = impl.Scanner()
    assert s.feed(stream) == [READ_REQ[4:], READ_RSP, VOLT_RSP]
    s2 = impl.Scanner()
    out = []
    for b in stream:
        out += s2.feed(bytes([b]))
    assert out == [READ_REQ[4:], READ_RSP, VOLT_RSP]
    assert s2.frames == 3 and s2.preamble_bytes == 4 and s2.bytes_discarded == 0
    assert s2.pending == 0


def test_data_bytes_68_and_16_do_not_confuse_the_scanner(impl):
    # payload bytes that become 0x68 / 0x16 / 0xFE on the wire
    frame = build_frame("000000123456", 0x91, H("00 00 01 00") + H("35 E3 CB 35"), False)
    assert b"\x68" in frame[10:-2] and b"\x16" in frame[10:-2]
    s = impl.Scanner()
    assert s.feed(b"\x16\x68\x16" + frame) == [frame]
    assert s.bytes_discarded == 3


def test_bad_checksum_costs_only_that_frame(impl):
    bad = bytearray(READ_RSP)
    bad[12] ^= 0x01
    s = impl.Scanner()
    assert s.feed(bytes(bad) + VOLT_RSP) == [VOLT_RSP]
    assert s.checksum_errors == 1
    bad_end = bytearray(READ_RSP)
    bad_end[-1] = 0x17
    assert s.feed(bytes(bad_end) + READ_RSP) == [READ_RSP]
    assert s.end_errors == 1


def test_bogus_header_with_long_length_does_not_hold_back_a_valid_frame(impl):
    # garbage that looks like a header claiming 200 data bytes, then the real answer
    bogus = H("68 01 02 03 04 05 06 68 91 C8")
    s = impl.Scanner()
    assert s.feed(bogus + READ_RSP) == [READ_RSP]
    assert s.pending == 0


def test_truncated_frame_is_dropped_and_counted_on_flush(impl):
    s = impl.Scanner()
    assert s.feed(READ_RSP[:15]) == []
    assert s.flush() == 15
    assert s.bytes_discarded == 15 and s.pending == 0
    assert s.feed(READ_RSP) == [READ_RSP]


def test_memory_stays_bounded_under_endless_garbage(impl):
    rng = random.Random(1)
    s = impl.Scanner()
    worst = 0
    for _ in range(2000):
        s.feed(bytes(rng.getrandbits(8) for _ in range(256)))
        worst = max(worst, s.pending)
    assert worst <= impl.MAX_DLT645_FRAME
    m = impl.Scanner("modbus")
    for _ in range(2000):
        m.feed(bytes(rng.getrandbits(8) for _ in range(256)))
        worst = max(worst, m.pending)
    assert worst <= impl.MAX_DLT645_FRAME


def test_unknown_protocol(impl):
    with pytest.raises(ValueError):
        impl.Scanner("iec62056")


def test_modbus_answers_and_exceptions(impl):
    exc = H("01 83 02 C0 F1")
    assert impl.crc16_modbus(exc[:3]) == 0xF1C0
    s = impl.Scanner("modbus")
    stream = H("00 FF 13") + MB_RSP + exc + MB_RSP
    out = []
    for i in range(0, len(stream), 3):
        out += s.feed(stream[i:i + 3])
    assert out == [MB_RSP, exc, MB_RSP]
    assert s.bytes_discarded == 3


def test_modbus_bad_crc_costs_one_byte(impl):
    bad = bytearray(MB_RSP)
    bad[4] ^= 0xFF
    s = impl.Scanner("modbus")
    assert s.feed(bytes(bad) + MB_RSP) == [MB_RSP]
    assert s.checksum_errors >= 1


def test_modbus_requests_mode(impl):
    s = impl.Scanner("modbus", requests=True)
    reqs = [read_holding_registers(7, 0x10, 4), write_coil(7, 0, True)]
    assert s.feed(b"".join(reqs)) == reqs


# ---------------------------------------------------------------- properties

def _dlt_frames():
    return st.builds(
        lambda addr, ctrl, data: build_frame("%012d" % addr, ctrl, data, preamble=False),
        st.integers(0, 10 ** 12 - 1), st.sampled_from([0x11, 0x91, 0xB1, 0xD1, 0x93, 0x9C, 0x81]),
        st.binary(max_size=60))


def _stream(draw_frames, garbage):
    return st.lists(st.tuples(draw_frames, garbage, st.booleans()), max_size=12)


@settings(max_examples=150, deadline=None)
@given(_stream(_dlt_frames(), st.binary(max_size=24)), st.data())
def test_any_split_yields_the_same_frames(parts, data):
    import importlib
    stream = b"".join((b"\xFE" * 4 if pre else b"") + f + g for f, g, pre in parts)
    for name in ("protocols._pyframing", "protocols._speedups"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        whole = mod.Scanner().feed(stream)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
        s = mod.Scanner()
        pieces = []
        prev = 0
        for c in cuts + [len(stream)]:
            pieces += s.feed(stream[prev:c])
            prev = c
        assert pieces == whole
        # every valid frame survives garbage: each one appears, in order
        expected = [f for f, _, _ in parts]
        it = iter(whole)
        assert all(any(f == w for w in it) for f in expected)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["dlt645", "modbus"]))
def test_garbage_never_yields_an_unchecked_frame(garbage, protocol):
    from protocols import framing
    for f in framing.Scanner(protocol).feed(garbage):
        if protocol == "dlt645":
            n = f[9]
            assert len(f) == 12 + n and f[0] == 0x68 and f[7] == 0x68 and f[-1] == 0x16
            assert framing.dlt645_checksum(f[:-2]) == f[-2]
        else:
            crc = framing.crc16_modbus(f[:-2])
            assert f[-2:] == bytes((crc & 0xFF, crc >> 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_dlt_frames(), st.binary(max_size=40),
                          st.just(MB_RSP), st.just(H("68 01 02 03 04 05 06 68 91"))),
                max_size=15),
       st.lists(st.integers(1, 64), min_size=1, max_size=8),
       st.sampled_from(["dlt645", "modbus"]))
def test_twins_agree_on_random_streams(chunks, sizes, protocol):
    import importlib
    try:
        compiled = importlib.import_module("protocols._speedups")
    except ImportError:
        pytest.skip("compiled scanner not built")
    stream = b"".join(chunks)
    a, b = compiled.Scanner(protocol), _pyframing.Scanner(protocol)
    out_a, out_b = [], []
    pos = i = 0
    while pos < len(stream):
        n = sizes[i % len(sizes)]
        out_a += a.feed(stream[pos:pos + n])
        out_b += b.feed(stream[pos:pos + n])
        pos += n
        i += 1
    assert out_a == out_b
    assert a.pending == b.pending
    a.flush()
    b.flush()
    assert a.stats() == b.stats()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=12), st.booleans())
def test_bcd_twins_agree(data, signed):
    import importlib
    try:
        compiled = importlib.import_module("protocols._speedups")
    except ImportError:
        pytest.skip("compiled scanner not built")

    def run(f):
        try:
            return f(data, signed)
        except ValueError:
            return "error"
    assert run(compiled.bcd_to_int) == run(_pyframing.bcd_to_int)
    assert compiled.add_33(data) == _pyframing.add_33(data)
    assert compiled.sub_33(data) == _pyframing.sub_33(data)
    assert compiled.crc16_modbus(data) == _pyframing.crc16_modbus(data)
    assert compiled.dlt645_checksum(data) == _pyframing.dlt645_checksum(data)
