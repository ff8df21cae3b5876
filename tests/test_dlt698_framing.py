"""DL/T 698.45 stream scanner (Scanner("dlt698")), over the compiled module and its twin.

Frames and facts: ../shared/reference/dlt698.md section 1; real frames:
../shared/vectors/dlt698-captures.json.
"""

import importlib
import json
import os
import pathlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import _pyframing
from protocols.dlt645 import build_frame as build_645

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("MGW_SHARED", ROOT.parent / "shared"))

pytestmark = pytest.mark.protocol

H = bytes.fromhex
# reference CAP #44 (GET 4000 0200) and #45 (its answer, date_time_s 2026-10-07 14:16:26)
GET_CLOCK = H("68 17 00 43 05 00 00 00 00 00 00 00 72 79 05 01 00 40 00 02 00 00 56 1F 16")
CLOCK_RSP = H("68 21 00 C3 05 00 00 00 00 00 00 00 1D DB 85 01 00 40 00 02 00 01 1C 07 EA 0A"
              " 07 0E 10 1A 00 00 E4 C5 16")
VECTORS = SHARED / "vectors" / "dlt698-captures.json"


def _compiled():
    try:
        return importlib.import_module("protocols._speedups")
    except ImportError:
        return None


def frame698(apdu, control=0x43, sa_flag=0x05, address=b"\x00" * 6, ca=0x00, length_bits=0):
    """A link frame built the plain way (the codec has its own builder; this one is only
    for feeding the scanner)."""
    assert (sa_flag & 0x0F) + 1 == len(address)
    length = 2 + 1 + 1 + len(address) + 1 + 2 + len(apdu) + 2
    head = (length | length_bits).to_bytes(2, "little") + bytes((control, sa_flag)) + \
        address + bytes((ca,))
    head += _pyframing.crc16_x25(head).to_bytes(2, "little")
    body = head + apdu
    return b"\x68" + body + _pyframing.crc16_x25(body).to_bytes(2, "little") + b"\x16"


def _vectors():
    if not VECTORS.exists():
        pytest.skip("shared vectors not found at %s (set MGW_SHARED)" % VECTORS)
    return json.loads(VECTORS.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- checks

def test_crc16_x25(impl):
    assert impl.crc16_x25(b"123456789") == 0x906E          # CRC catalogue check value
    assert impl.crc16_x25(GET_CLOCK[1:12]) == 0x7972          # HCS of CAP #44, sent 72 79
    assert impl.crc16_x25(GET_CLOCK[1:-3]) == 0x1F56          # FCS, sent 56 1F


def test_builder_reproduces_a_capture():
    assert frame698(H("05 01 00 40 00 02 00 00")) == GET_CLOCK


def test_frames_whole_byte_by_byte_and_behind_wakeup_bytes(impl):
    stream = b"\xFE" * 4 + GET_CLOCK + b"\xFE\xFE" + CLOCK_RSP
    s = impl.Scanner("dlt698")
    assert s.protocol == "dlt698"
    assert s.feed(stream) == [GET_CLOCK, CLOCK_RSP]
    assert s.preamble_bytes == 6 and s.bytes_discarded == 0 and s.frames == 2
    s2 = impl.Scanner("dlt698")
    out = []
    for b in stream:
        out += s2.feed(bytes([b]))
    assert out == [GET_CLOCK, CLOCK_RSP]
    assert s2.stats() == s.stats() and s2.pending == 0


def test_bad_hcs_bad_fcs_and_bad_end_cost_one_byte_each(impl):
    bad_hcs = bytearray(CLOCK_RSP)
    bad_hcs[12] ^= 0xFF
    bad_fcs = bytearray(CLOCK_RSP)
    bad_fcs[-3] ^= 0x01
    bad_end = bytearray(CLOCK_RSP)
    bad_end[-1] = 0x17
    s = impl.Scanner("dlt698")
    stream = bytes(bad_hcs) + GET_CLOCK + bytes(bad_fcs) + CLOCK_RSP + bytes(bad_end) + GET_CLOCK
    assert s.feed(stream) == [GET_CLOCK, CLOCK_RSP, GET_CLOCK]
    assert s.checksum_errors == 2 and s.end_errors == 1


def test_swapped_hcs_is_refused(impl):
    """CAP #37: a Java tool writes the HCS high byte first."""
    swapped = bytearray(frame698(H("05 01 00 40 01 02 00 00"), address=H("02 00 00 00 00 00"),
                                 ca=0x10))
    swapped[12], swapped[13] = swapped[13], swapped[12]
    s = impl.Scanner("dlt698")
    assert s.feed(bytes(swapped)) == []
    assert s.checksum_errors == 1


def test_length_bit_14_is_refused(impl):
    """Bit 14 (the 2017 edition's kilobyte unit) set: not read as bytes, not as kilobytes."""
    kb = frame698(H("05 01 00 40 00 02 00 00"), length_bits=0x4000)
    s = impl.Scanner("dlt698")
    assert s.feed(kb + GET_CLOCK) == [GET_CLOCK]
    assert s.bytes_discarded == len(kb)
    reserved = frame698(H("05 01 00 40 00 02 00 00"), length_bits=0x8000)
    assert s.feed(reserved) == []


def test_long_frame_with_two_byte_length(impl):
    apdu = H("85 01 00 EE EE 44 44 01 0C 82 03 00") + bytes(range(256)) * 3 + H("00 00")
    f = frame698(apdu, control=0xC3)
    assert len(f) > 256
    s = impl.Scanner("dlt698")
    out = []
    for i in range(0, len(f), 7):
        out += s.feed(f[i:i + 7])
    assert out == [f]


def test_bogus_header_with_valid_hcs_does_not_hold_back_a_valid_frame(impl):
    """A header whose HCS happens to be right and which claims 16 K of body: the valid frame
    inside it is still found at once."""
    bogus = frame698(bytes(2000))[:14]          # header only, valid HCS, claims 2000+ bytes
    s = impl.Scanner("dlt698")
    assert s.feed(bogus + CLOCK_RSP) == [CLOCK_RSP]
    assert s.pending == 0
    assert s.bytes_discarded == len(bogus)


def test_dlt645_frames_are_not_dlt698_frames(impl):
    f645 = build_645("000000123456", 0x91, H("00 00 01 00 12 34 56 78"), preamble=True)
    s = impl.Scanner("dlt698")
    assert s.feed(f645 + CLOCK_RSP + f645) == [CLOCK_RSP]
    s.flush()
    s645 = impl.Scanner("dlt645")
    assert s645.feed(CLOCK_RSP + f645) == [f645[4:]]


def test_memory_stays_bounded_under_garbage(impl):
    rng = random.Random(7)
    s = impl.Scanner("dlt698")
    worst = 0
    for _ in range(2000):
        chunk = bytearray(rng.getrandbits(8) for _ in range(256))
        for _ in range(4):                     # plenty of start bytes
            chunk[rng.randrange(256)] = 0x68
        s.feed(bytes(chunk))
        worst = max(worst, s.pending)
    assert worst <= impl.MAX_DLT698_FRAME
    assert s.frames == 0


def test_feed_refuses_none_and_non_contiguous_views(impl):
    s = impl.Scanner("dlt698")
    with pytest.raises(TypeError):
        s.feed(None)
    data = b"\xFE" + GET_CLOCK
    for view in (memoryview(data)[::-1], memoryview(data + data)[::2]):
        with pytest.raises((TypeError, BufferError, ValueError)):
            s.feed(view)
    assert s.pending == 0
    assert s.feed(memoryview(data)) == [GET_CLOCK]          # a contiguous view is fine
    assert s.feed(bytearray(data)) == [GET_CLOCK]
    for proto in ("dlt645", "modbus"):
        with pytest.raises(TypeError):
            impl.Scanner(proto).feed(None)


def test_unknown_protocol_names_dlt698(impl):
    with pytest.raises(ValueError, match="dlt698"):
        impl.Scanner("dlt699")


# ---------------------------------------------------------------- the captures

def _feed_ways(impl, wire):
    """The frames a scanner finds in `wire` fed whole, byte by byte, and with garbage
    (no 0x68 in it) around it; each with the scanner's counters."""
    garbage = bytes((0x11, 0x16, 0xFE, 0x00, 0x43, 0xAA))
    ways = {}
    s = impl.Scanner("dlt698")
    ways["whole"] = (s.feed(wire), s)
    s = impl.Scanner("dlt698")
    out = []
    for b in wire:
        out += s.feed(bytes([b]))
    ways["byte"] = (out, s)
    s = impl.Scanner("dlt698")
    out = []
    stream = garbage + wire + garbage
    for i in range(0, len(stream), 5):
        out += s.feed(stream[i:i + 5])
    ways["garbage"] = (out, s)
    for _, sc in ways.values():
        sc.flush()
    return ways


def test_every_capture_found_or_refused(impl):
    entries = _vectors()
    assert len(entries) >= 50
    good = bad = 0
    for e in entries:
        wire = H(e["hex"])
        ok = e["expect"]["valid_fcs"]
        where = "capture #%s (%s)" % (e["id"], e["meaning"][:70])
        for how, (frames, s) in _feed_ways(impl, wire).items():
            if ok:
                start = wire.index(0x68)
                assert frames == [wire[start:]], (how, where)
                assert frames[0][3] == int(e["expect"]["control"], 16), where
                assert frames[0][4] == int(e["expect"]["sa_flag"], 16), where
            else:
                assert frames == [], (how, where)
                assert s.checksum_errors + s.end_errors + s.bytes_discarded > 0, where
        good += ok
        bad += not ok
    assert good >= 40 and bad >= 5


def test_captures_back_to_back_with_invalid_ones_between(impl):
    entries = _vectors()
    stream = b"".join(H(e["hex"]) for e in entries)
    want = [H(e["hex"]) for e in entries if e["expect"]["valid_fcs"]]
    for size in (1, 3, 64, 256, len(stream)):
        s = impl.Scanner("dlt698")
        out = []
        for i in range(0, len(stream), size):
            out += s.feed(stream[i:i + size])
        assert out == want, size


# ---------------------------------------------------------------- properties

def _frames698():
    return st.builds(
        lambda apdu, ctrl, flag, ca, addr: frame698(apdu, ctrl, flag, addr[:(flag & 0x0F) + 1],
                                                    ca),
        st.binary(min_size=1, max_size=80),
        st.sampled_from([0x43, 0xC3, 0x81, 0x01, 0xA3, 0x63, 0x83, 0x03]),
        st.sampled_from([0x05, 0x45, 0x15, 0x26, 0xC0, 0x03, 0x07, 0x85]),
        st.integers(0, 255), st.binary(min_size=16, max_size=16))


def _frames645():
    return st.builds(
        lambda addr, data: build_645("%012d" % addr, 0x91, data, preamble=False),
        st.integers(0, 10 ** 12 - 1), st.binary(max_size=40))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_frames698(), st.binary(max_size=24), st.booleans()), max_size=10),
       st.data())
def test_any_split_yields_the_same_frames_and_every_frame(parts, data):
    stream = b"".join((b"\xFE" * 4 if pre else b"") + f + g for f, g, pre in parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    for mod in filter(None, (_pyframing, _compiled())):
        whole = mod.Scanner("dlt698").feed(stream)
        s = mod.Scanner("dlt698")
        pieces = []
        prev = 0
        for c in cuts + [len(stream)]:
            pieces += s.feed(stream[prev:c])
            prev = c
        assert pieces == whole
        it = iter(whole)
        assert all(any(f == w for w in it) for f, _, _ in parts)


@settings(max_examples=250, deadline=None)
@given(st.lists(st.one_of(_frames698(), _frames645(), st.binary(max_size=40),
                          st.just(GET_CLOCK[:14]), st.just(b"\x68\xFF\x3F\x43\x05"),
                          st.just(frame698(bytes(300))[:14])),
                max_size=15),
       st.lists(st.integers(1, 64), min_size=1, max_size=8),
       st.sampled_from(["dlt698", "dlt645"]))
def test_twins_agree_on_random_and_mixed_streams(chunks, sizes, protocol):
    compiled = _compiled()
    if compiled is None:
        pytest.skip("compiled scanner not built")
    stream = b"".join(chunks)
    a, b = compiled.Scanner(protocol), _pyframing.Scanner(protocol)
    out_a, out_b = [], []
    pos = i = 0
    while pos < len(stream):
        n = sizes[i % len(sizes)]
        out_a += a.feed(stream[pos:pos + n])
        out_b += b.feed(stream[pos:pos + n])
        assert a.pending == b.pending
        pos += n
        i += 1
    assert out_a == out_b
    a.flush()
    b.flush()
    assert a.stats() == b.stats()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_yields_an_unchecked_frame(garbage):
    from protocols import framing
    for f in framing.Scanner("dlt698").feed(garbage):
        n = (f[1] | f[2] << 8) + 2
        alen = (f[4] & 0x0F) + 1
        assert len(f) == n and f[0] == 0x68 and f[-1] == 0x16
        assert framing.crc16_x25(f[1:6 + alen]) == int.from_bytes(f[6 + alen:8 + alen],
                                                                   "little")
        assert framing.crc16_x25(f[1:-3]) == int.from_bytes(f[-3:-1], "little")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40))
def test_x25_twins_agree(data):
    compiled = _compiled()
    if compiled is None:
        pytest.skip("compiled scanner not built")
    assert compiled.crc16_x25(data) == _pyframing.crc16_x25(data)
