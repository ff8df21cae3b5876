"""The compiled DL/T 698.45 read path (ext/_apdu698.pyx) against its pure twin (dlt698.PURE):
frame_from_scanner, decode, decode_apdu, decode_data and quantities give the same results
(same types, values, Decimal exponents) or the same error class and message, on the real
captures, on frames our codec builds, and on random and mutated APDUs.

Frames: ../shared/vectors/dlt698-captures.json (read, never copied here).
"""

import datetime as dt
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from decimal import Decimal, localcontext

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import _pyframing
from protocols import dlt698 as D
from protocols import dlt698_data as A
from protocols.dlt698_data import (ARRAY, BIT_STRING, BOOL, DATE_TIME, DATE_TIME_S,
                                   DOUBLE_LONG, DOUBLE_LONG_UNSIGNED, ENUM, INTEGER, LONG,
                                   LONG64, LONG64_UNSIGNED, LONG_UNSIGNED, NULL, OAD, OAD_T,
                                   OCTET_STRING, OMD, OMD_T, STRUCTURE, UNSIGNED,
                                   VISIBLE_STRING, BitString, encode_data)

pytestmark = pytest.mark.protocol

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("MGW_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "vectors" / "dlt698-captures.json"
SA = D.server_address("000000200001")


def _compiled():
    """protocols._apdu698; setup.py builds it with the scanner from ext/*.pyx, so where the
    compiled scanner is there and this is not, the build is incomplete: a failure."""
    try:
        return importlib.import_module("protocols._apdu698")
    except ImportError:
        if os.environ.get("MGW_REQUIRE_COMPILED") == "1" or \
                importlib.util.find_spec("protocols._speedups") is not None:
            raise
        pytest.skip("compiled 698 read path not built (protocols._apdu698)")


def _outcome(fn, *args):
    """What a call gives: its result as (type, repr) all the way down (repr shows a
    Decimal's exponent, which == does not compare), or the error's class and message."""
    try:
        r = fn(*args)
    except Exception as exc:           # noqa: BLE001 - the twins must fail alike
        return "raises", type(exc).__name__, str(exc)
    return "returns", type(r).__name__, repr(r)


def _twins_agree(name, *args):
    fast = getattr(_compiled(), name)
    pure = D.PURE[name] if name in D.PURE else getattr(A, name)
    assert _outcome(fast, *args) == _outcome(pure, *args), (name, args)


def _values(msg):
    """(oad, value) of every result or record cell a message carries."""
    apdu = msg.apdu if isinstance(msg, D.Message) else None
    if isinstance(apdu, D.GetResponse):
        return [(r.oad, r.value) for r in apdu.results]
    if isinstance(apdu, D.GetRecordResponse):
        return [(c.oad, v) for row in apdu.rows for c, v in zip(apdu.columns, row)]
    return []


def _check_frame(raw):
    """Every step of the read path on one scanned frame, compiled against pure."""
    _twins_agree("frame_from_scanner", raw)
    frame = D.PURE["frame_from_scanner"](raw)
    _twins_agree("decode", frame)
    _twins_agree("decode_apdu", frame.user_data)
    for oad, value in _values(D.PURE["decode"](frame)):
        _twins_agree("quantities", oad, value)


# ---------------------------------------------------------------- selection

def test_the_compiled_path_is_selected_where_it_is_built():
    _compiled()
    if os.environ.get("MGW_PURE_PYTHON", "") not in ("", "0"):
        assert D.IMPLEMENTATION == "python" and D.decode is D.PURE["decode"]
        return
    assert D.IMPLEMENTATION == "compiled"
    assert D.decode is _compiled().decode and D.quantities is _compiled().quantities
    assert D.PURE["decode"] is not D.decode


def test_mgw_pure_python_keeps_to_the_twin():
    code = ("import protocols.dlt698 as D; print(D.IMPLEMENTATION, "
            "D.decode is D.PURE['decode'])")
    env = dict(os.environ, MGW_PURE_PYTHON="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["python", "True"]


def test_decimals_built_in_place_equal_the_text_built_ones():
    mod = _compiled()
    assert mod._exponent_offset() >= 0          # CPython's C decimal: the fast way is used
    code = ("import protocols.dlt698 as D; from protocols.dlt698_data import OAD; "
            "print(repr(D.quantities(OAD(0x10, 2, 0), [0, -1, 12345678901, 2**63, 5])))")
    outs = []
    for text in ("0", "1"):
        env = dict(os.environ, MGW_DECIMAL_TEXT=text, PYTHONPATH=str(ROOT))
        env.pop("MGW_PURE_PYTHON", None)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env,
                                   capture_output=True, text=True, check=True).stdout)
    assert outs[0] == outs[1]
    assert "Decimal('0.00')" in outs[0] and "Decimal('92233720368547758.08')" in outs[0]
    got = mod.quantities(OAD(0x10, 2, 0), [123456789, -5])
    want = [Decimal("1234567.89"), Decimal("-0.05")]
    assert [v.value.as_tuple() for v in got] == [w.as_tuple() for w in want]
    assert [hash(v.value) for v in got] == [hash(w) for w in want]


def test_scalers_are_applied_exactly_whatever_the_decimal_context():
    _compiled()
    energy = [123456789, 2 ** 63, 0, 1, 99]
    for quantities in (D.PURE["quantities"], _compiled().quantities):
        with localcontext() as ctx:
            ctx.prec = 4                       # a caller's context must not round readings
            got = [str(v.value) for v in quantities(OAD(0x10, 2, 0), energy)]
        assert got == ["1234567.89", "92233720368547758.08", "0.00", "0.01", "0.99"]


# ---------------------------------------------------------------- the captures

def _captures():
    if not VECTORS.exists():
        pytest.skip("shared vectors not found at %s (set MGW_SHARED)" % VECTORS)
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def test_every_capture_decodes_the_same_on_both_paths():
    seen = 0
    for entry in _captures():
        raw = bytes.fromhex(entry["hex"])
        frames = _pyframing.Scanner("dlt698").feed(raw)
        for f in frames:
            _check_frame(f)
            seen += 1
        # the APDU of an invalid frame too, whatever its checksums say
        _twins_agree("decode_apdu", raw[14:-3] if len(raw) > 17 else raw)
    assert seen >= 40


# ---------------------------------------------------------------- frames our codec builds

WHEN = dt.datetime(2026, 11, 26, 10, 15, 0)
INSTANT = [(OAD(0x2000, 2, 0), encode_data(ARRAY, [(LONG_UNSIGNED, 2201)] * 3), None),
           (OAD(0x2001, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG, -5123)] * 3), None),
           (OAD(0x2004, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG, 11000)] * 4), None),
           (OAD(0x200A, 2, 0), encode_data(ARRAY, [(LONG, 998)] * 4), None),
           (OAD(0x200F, 2, 0), encode_data(LONG_UNSIGNED, 5001), None),
           (D.STATUS_WORDS, encode_data(ARRAY, [(BIT_STRING, BitString(16, b"\x00\x00"))] * 2
                                        + [(BIT_STRING, D.status_word(True, True, True))]),
            None),
           (OAD(0x2005, 2, 0), None, 6),                              # DAR per item
           (OAD(0x202C, 2, 0), encode_data(STRUCTURE, [(DOUBLE_LONG_UNSIGNED, 3520),
                                                       (DOUBLE_LONG_UNSIGNED, 4)]), None),
           (OAD(0x0000, 4, 0), encode_data(ARRAY, [(LONG64, -(2 ** 63))] * 5), None),
           (D.COMM_ADDRESS, encode_data(OCTET_STRING, bytes.fromhex("123456789012")), None)]


def _built_frames():
    energy = [(OAD(0x0010, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, k) for k in
                                                      (12345678, 0, 4294967295, 1, 99)]),
               None),
              (OAD(0x0020, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, 0)] * 5), None),
              (OAD(0x202D, 2, 0), encode_data(DOUBLE_LONG_UNSIGNED, 7), None)]
    cols = [D.CSD(D.FREEZE_TIME), D.CSD(OAD(0x0010, 2, 0)), D.CSD(OAD(0x0020, 2, 0))]
    row = [encode_data(DATE_TIME_S, WHEN.replace(hour=0, minute=0)),
           encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, k) for k in (5, 4, 3, 2, 1)]),
           encode_data(NULL)]
    odd = [(OAD(0x4000, 2, 0), encode_data(DATE_TIME_S, WHEN), None),
           (OAD(0x4000, 2, 0), b"\x1C\xFF\xFF\xFF\xFF\xFF\xFF\xFF", None),   # FF: Raw
           (OAD(0x4000, 2, 0), encode_data(DOUBLE_LONG, 3), None),           # wrong type
           (OAD(0x4002, 2, 0), encode_data(VISIBLE_STRING, "AB12"), None),
           (OAD(0x4003, 2, 0), b"\x0A\x02\xC3\xA9", None),                   # not ASCII
           (OAD(0x4004, 2, 0), encode_data(DATE_TIME, WHEN), None),
           (OAD(0x4005, 2, 0), encode_data(STRUCTURE, [(BOOL, True), (ENUM, 3),
                                                       (INTEGER, -7), (UNSIGNED, 200),
                                                       (LONG64_UNSIGNED, 2 ** 64 - 1),
                                                       (OAD_T, OAD(0x1234, 5, 6)),
                                                       (OMD_T, OMD(0x8000, 129, 0))]), None),
           (OAD(0x4006, 2, 0), b"\x17\x3F\x80\x00\x00", None),               # float32
           (OAD(0x0010, 2, 1), encode_data(DOUBLE_LONG_UNSIGNED, 5), None),  # element index
           (OAD(0x0010, 2, 0), encode_data(ARRAY, [(BOOL, True)] * 2), None)]
    return [D.get_list_response(SA, 1, energy), D.get_list_response(SA, 2, INSTANT),
            D.get_response(SA, 3, D.CLOCK, encode_data(DATE_TIME_S, WHEN)),
            D.get_response(SA, 3, D.CLOCK, dar=4),
            D.get_record_response(SA, 4, D.DAY_FREEZE, cols, rows=[row, row]),
            D.get_record_response(SA, 5, D.DAY_FREEZE, cols, dar=6),
            D.get_list_response(SA, 6, odd),
            D.get_list_response(D.server_address("123456789012", logical=3), 7, energy),
            D.get_next_response(SA, 8, True, 2, results=[(D.CLOCK, encode_data(
                DATE_TIME_S, WHEN), None)]),
            D.set_response(SA, 9, D.CLOCK), D.error_response(SA, 10)]


def test_frames_our_codec_builds_decode_the_same_on_both_paths():
    for frame in _built_frames():
        found = _pyframing.Scanner("dlt698").feed(frame)
        assert len(found) == 1
        _check_frame(found[0])


def test_the_polled_values_come_out_exact():
    _compiled()
    msg = D.decode(D.frame_from_scanner(D.get_list_response(SA, 2, INSTANT)[4:]))
    got = {}
    for r in msg.apdu.results:
        if r.ok:
            got.update({v.quantity: (v.value, v.unit) for v in D.quantities(r.oad, r.value)})
    assert got["voltage.a"] == (Decimal("220.1"), "V")
    assert str(got["current.c"][0]) == "-5.123"
    assert str(got["power.active"][0]) == "1.1000"
    assert str(got["power.factor.a"][0]) == "0.998"
    assert got["frequency"] == (Decimal("50.01"), "Hz")
    assert got["relay.state"] == ("open", None) and got["guarantee.state"] == (True, None)
    assert str(got["balance.remaining"][0]) == "35.20" and got["balance.purchases"][0] == 4
    assert str(got["energy.combined.total"][0]) == "-922337203685477.5808"
    assert msg.apdu.results[6].dar == 6 and msg.apdu.results[6].value is None


def test_odd_arguments_are_the_twins_business():
    frame = D.PURE["frame_from_scanner"](D.get_response(SA, 3, D.CLOCK, encode_data(
        DATE_TIME_S, WHEN))[4:])
    for args in [(bytearray(frame.raw),), (memoryview(frame.raw),), (b"",), (b"\x68\x00",),
                 (b"\x68" + b"\x00" * 5,), (frame.raw[:9],), (None,), ("68",)]:
        _twins_agree("frame_from_scanner", *args)
    for args in [(frame._replace(user_data=bytearray(frame.user_data)),),
                 (frame._replace(control=frame.control | 0x20),),
                 (frame._replace(control=frame.control | 0x08),),
                 (frame._replace(control=2 ** 70),), (None,), ((1, 2),)]:
        _twins_agree("decode", *args)
    for args in [(b"",), (bytearray(frame.user_data),), (frame.user_data, 1),
                 (frame.user_data, 2), (None,), (12,)]:
        _twins_agree("decode_apdu", *args)
    for args in [(b"",), (b"\x06\x00",), (bytearray(b"\x12\x00\x05"),), (None,)]:
        _twins_agree("decode_data", *args)
    for oad, value in [((0x10, 2, 0), [1, 2]), (OAD(0x10, 2, 0), (1, 2)),
                       (OAD(0x10, 2, 0), [1, True]), (OAD(0x10, 2, 0), [1.5]),
                       (OAD(0x10, 2, 0), []), (OAD(0x10, 2, 0), [1] * 9),
                       (OAD(0x10, 2, 9), 1), (OAD(0x10, 2, 1), 7),
                       (OAD(0x200F, 2, 0), True), (OAD(0x200F, 2, 0), D.DAR(3)),
                       (OAD(0x200F, 2, 0), 2 ** 80), (OAD(0x4000, 2, 0), WHEN.date()),
                       (OAD(0x202C, 2, 0), (1,)), (OAD(0x202C, 2, 0), [1, 2]),
                       (OAD(0x2014, 2, 0), [BitString(16, b"\xFF")] * 3),
                       (OAD(0x2014, 2, 0), [BitString(8, b"\xFF")] * 3),
                       (OAD(0x2014, 2, 0), [None] * 3), (OAD("x", 2, 0), 1),
                       (OAD(-1, 2, 0), 1), (OAD(0x10, "2", 0), [1]), (None, 1)]:
        _twins_agree("quantities", oad, value)


# ---------------------------------------------------------------- random and mutated

def _data_strategy():
    leaf = st.one_of(
        st.just((NULL, None)), st.tuples(st.just(BOOL), st.booleans()),
        st.tuples(st.just(DOUBLE_LONG), st.integers(-2 ** 31, 2 ** 31 - 1)),
        st.tuples(st.just(DOUBLE_LONG_UNSIGNED), st.integers(0, 2 ** 32 - 1)),
        st.tuples(st.just(LONG), st.integers(-2 ** 15, 2 ** 15 - 1)),
        st.tuples(st.just(LONG_UNSIGNED), st.integers(0, 2 ** 16 - 1)),
        st.tuples(st.just(INTEGER), st.integers(-128, 127)),
        st.tuples(st.just(UNSIGNED), st.integers(0, 255)),
        st.tuples(st.just(ENUM), st.integers(0, 255)),
        st.tuples(st.just(LONG64), st.integers(-2 ** 63, 2 ** 63 - 1)),
        st.tuples(st.just(LONG64_UNSIGNED), st.integers(0, 2 ** 64 - 1)),
        st.tuples(st.just(OCTET_STRING), st.binary(max_size=8)),
        st.tuples(st.just(VISIBLE_STRING), st.text("ab09 ", max_size=6)),
        st.tuples(st.just(DATE_TIME_S), st.datetimes(dt.datetime(2000, 1, 1),
                                                      dt.datetime(2099, 12, 31))),
        st.tuples(st.just(BIT_STRING), st.binary(min_size=1, max_size=3).map(
            lambda b: BitString(8 * len(b), b))),
        st.tuples(st.just(OAD_T), st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255),
                                            st.integers(0, 255)).map(lambda t: OAD(*t))))
    return st.recursive(leaf, lambda kids: st.one_of(
        st.tuples(st.just(ARRAY), st.lists(kids, max_size=5)),
        st.tuples(st.just(STRUCTURE), st.lists(kids, max_size=5))), max_leaves=12)


POLLED = [OAD(0x0010, 2, 0), OAD(0x0020, 2, 0), OAD(0x2000, 2, 0), OAD(0x2001, 2, 0),
          OAD(0x2004, 2, 0), OAD(0x200A, 2, 0), OAD(0x200F, 2, 0), OAD(0x202C, 2, 0),
          OAD(0x202D, 2, 0), D.STATUS_WORDS, D.CLOCK, D.COMM_ADDRESS, OAD(0x0010, 4, 0),
          OAD(0x0010, 2, 2), OAD(0x6000, 2, 0)]


def _mutate(data, edits):
    b = bytearray(data)
    for kind, where, byte in edits:
        if not b:
            break
        k = where % len(b)
        if kind == 0:
            b[k] = byte
        elif kind == 1:
            del b[k:]
        else:
            b.insert(k, byte)
    return bytes(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(results=st.lists(st.tuples(st.sampled_from(POLLED), _data_strategy(),
                                  st.sampled_from([None, None, None, 4, 255])),
                        min_size=1, max_size=5),
       listed=st.booleans(),
       edits=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 500),
                                st.integers(0, 255)), max_size=3),
       trailer=st.sampled_from([b"", b"\x00", b"\x00\x00", b"\x01", b"\x00\x01" + b"\x00" * 10,
                                b"\x00\x02", b"\x00\x00\x07"]))
def test_twins_agree_on_random_and_mutated_get_responses(results, listed, edits, trailer):
    _compiled()
    items = [(oad, None if dar is not None else encode_data(*data), dar)
             for oad, data, dar in results]
    if listed:
        frame = D.get_list_response(SA, 9, items)
    else:
        oad, value, dar = items[0]
        frame = D.get_response(SA, 9, oad, value, dar)
    raw = _pyframing.Scanner("dlt698").feed(frame)[0]
    apdu = D.PURE["frame_from_scanner"](raw).user_data
    apdu = apdu[:-2] + trailer if apdu.endswith(b"\x00\x00") else apdu + trailer
    for data in (apdu, _mutate(apdu, edits)):
        _twins_agree("decode_apdu", data)
        frame = D.PURE["frame_from_scanner"](raw)._replace(user_data=data)
        _twins_agree("decode", frame)
        for oad, value in _values(D.PURE["decode"](frame)):
            _twins_agree("quantities", oad, value)
    for oad, data, _ in results:
        _twins_agree("quantities", oad, A.decode_data(encode_data(*data))[0])


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(_data_strategy(), min_size=2, max_size=2), max_size=3),
       edits=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 500),
                                st.integers(0, 255)), max_size=3))
def test_twins_agree_on_random_and_mutated_records(rows, edits):
    _compiled()
    cols = [D.CSD(D.FREEZE_TIME), D.CSD(OAD(0x0010, 2, 0), (OAD(0x0010, 2, 1),))]
    frame = D.get_record_response(SA, 4, D.DAY_FREEZE, cols,
                                  rows=[[encode_data(*c) for c in r] for r in rows])
    raw = _pyframing.Scanner("dlt698").feed(frame)[0]
    apdu = D.PURE["frame_from_scanner"](raw).user_data
    for data in (apdu, _mutate(apdu, edits)):
        _twins_agree("decode_apdu", data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=60), head=st.sampled_from([b"", b"\x85\x01\x05", b"\x85\x02\x05",
                                                         b"\x85\x03\x05", b"\x85\x05\x05"]))
def test_twins_agree_on_random_bytes(data, head):
    _compiled()
    _twins_agree("decode_apdu", head + data)
    _twins_agree("decode_data", data)
