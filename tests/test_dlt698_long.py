"""Long DL/T 698.45 answers: link-layer segmentation (first/middle/last fragments, each
confirmed, joined into one APDU, bounded) and GET-Response-Next block transfer, in the codec
(with the real fragment set CAP #16-#21) and through the driver on a real line with a
simulated meter that splits its answers."""

import json
import os
import pathlib

import pytest

from gateway.line import dlt698 as drv
from gateway.line.poller import MeterSpec
from gateway.line.port import PortWorker
from gateway.model import TxError
from gateway.sim.dlt645 import SimLine
from gateway.sim.dlt698 import SimMeter698
from protocols import dlt698 as D
from protocols.framing import Scanner

H = bytes.fromhex
ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = pathlib.Path(os.environ.get("MGW_SHARED", ROOT.parent / "shared")) / "vectors" / \
    "dlt698-captures.json"


def cap(n):
    if not VECTORS.exists():
        pytest.skip("shared vectors not found at %s" % VECTORS)
    return H({e["id"]: e for e in json.loads(VECTORS.read_text())}[n]["hex"])


def msg(raw):
    return D.decode(D.parse_frame(raw))


# ---------------------------------------------------------------- the codec

@pytest.mark.protocol
def test_the_real_fragments_join_into_the_real_reassembled_apdu():
    first, middle, last = msg(cap(18)), msg(cap(19)), msg(cap(20))
    assert [m.apdu.kind for m in (first, middle, last)] == ["first", "middle", "last"]
    parts = D.Reassembly(first)
    assert parts.seq == 261 and not parts.done
    parts.add(middle)
    parts.add(last)
    whole = parts.message()
    assert parts.done and whole.frame.user_data == D.parse_frame(cap(21)).user_data
    assert isinstance(whole.apdu, D.GetRequest) and whole.apdu.oads == (D.OAD(0xF101, 2, 0),)


@pytest.mark.protocol
def test_the_confirmation_is_cap_17_byte_for_byte():
    first = msg(cap(18))
    assert D.fragment_confirm(first.frame.sa, 261, first.frame.ca)[4:] == cap(17)
    ex = D.fragment_confirm_exchange(first, 261)
    assert ex.frame[4:] == cap(17)
    ok, why = ex.accept(cap(19))
    assert why is None and ok.apdu.seq == 262
    wrong, why = ex.accept(cap(20))                   # 263 is not the one after 261
    assert wrong is None and "expected fragment 262" in why


@pytest.mark.protocol
def test_fragments_out_of_order_foreign_or_too_many_bytes_are_refused():
    first, middle, last = msg(cap(18)), msg(cap(19)), msg(cap(20))
    parts = D.Reassembly(first)
    with pytest.raises(D.FrameError, match="263 .last. after 261"):
        parts.add(last)
    with pytest.raises(D.FrameError, match="starts with a first"):
        D.Reassembly(middle)
    other = D.server_address("000000000009")
    foreign = msg(D.fragment_frame(0x83, other, 262, "middle", b"\x01"))
    with pytest.raises(D.FrameError, match="fragment from"):
        D.Reassembly(first).add(foreign)
    sa = first.frame.sa
    small = D.Reassembly(first, limit=5)
    small.add(msg(D.fragment_frame(0x83, sa, 262, "middle", b"\x01\x02")))
    with pytest.raises(D.FrameError, match="more than 5 bytes"):
        small.add(msg(D.fragment_frame(0x83, sa, 263, "last", b"\x03")))
    # the first fragment is taken by the request's exchange; a middle one is not
    req = D.get_exchange(sa, D.OAD(0xF101, 2, 0), piid=0x15)
    assert req.accept(cap(18))[1] is None
    assert "without its first" in req.accept(cap(19))[1]


@pytest.mark.protocol
def test_get_response_next_blocks_join_into_one_answer():
    sa = D.server_address("000000000201")
    oads = [D.OAD(0x2000, 2, 0), D.OAD(0x200F, 2, 0), D.OAD(0x4001, 2, 0)]
    request = msg(D.get_list_request(sa, oads, piid=7))
    b1 = msg(D.get_next_response(sa, 7, False, 1, [(oads[0], H("01 01 12 08 FC"), None),
                                                   (oads[1], H("12 13 88"), None)]))
    b2 = msg(D.get_next_response(sa, 7, True, 2, [(oads[2], None, 6)]))
    assert isinstance(b1.apdu, D.GetNextResponse) and not b1.apdu.last and b2.apdu.last
    assert D.match_answer(request, b1) is None        # a first block answers the request
    nxt = D.get_next_exchange(request, 1)
    nreq = msg(nxt.frame)
    assert isinstance(nreq.apdu, D.GetNextRequest) and (nreq.apdu.piid, nreq.apdu.seq) == (7, 1)
    assert nxt.accept(D.get_next_response(sa, 7, True, 2, [])[4:])[1] is None
    assert "block 3" in nxt.accept(D.get_next_response(sa, 7, True, 3, [])[4:])[1]
    joined = D.join_blocks(request, [b1.apdu, b2.apdu])
    assert isinstance(joined, D.GetResponse) and joined.listed
    assert [r.oad for r in joined.results] == oads and joined.results[2].dar == 6
    assert D.match_answer(request, D.Message(b1.frame, joined)) is None
    # a transfer the meter ends with a DAR, or blocks out of order: an error, never a guess
    stop = msg(D.get_next_response(sa, 7, True, 2, dar=10)).apdu
    with pytest.raises(D.DataError, match="DAR 10"):
        D.join_blocks(request, [b1.apdu, stop])
    with pytest.raises(D.DataError, match="block 1 after block 1"):
        D.join_blocks(request, [b1.apdu, b1.apdu])


@pytest.mark.protocol
def test_fragments_and_blocks_are_frames_the_scanner_finds():
    sa = D.server_address("000000000201")
    stream = b"\x00\x68\x16" + D.fragment_frame(0x83, sa, 4095, "first", b"\x85") + \
        D.get_next_response(sa, 1, True, 2, [(D.OAD(0x200F, 2, 0), H("12 13 88"), None)])
    frames = Scanner("dlt698").feed(stream)
    assert len(frames) == 2
    assert msg(frames[0]).apdu == D.Fragment(4095, "first", b"\x85")


# ---------------------------------------------------------------- through the driver

@pytest.fixture
def line():
    meter = SimMeter698("000000000501", prepaid=True)
    sim = SimLine([meter], baudrate=9600)
    sim.start()
    worker = PortWorker("p", sim.device, baudrate=9600, retries=1)
    worker.open()
    yield meter, worker, MeterSpec("m501", "p", protocol="dlt698", address=meter.address,
                                   prepaid=True)
    worker.stop()
    sim.stop()


def _read(worker, spec):
    values, errors = drv.read_now(worker, spec, ["energy", "instant", "balance"])
    return {v.quantity: v.value for v in values}, errors


def test_a_meter_that_fragments_its_answers_is_read_whole(line):
    meter, worker, spec = line
    meter.max_fragment = 9
    whole, errors = _read(worker, spec)
    assert not errors and "energy.import.t4" in whole and "balance.remaining" in whole
    assert worker.scanners["dlt698"].frames > 6          # the answers came in pieces
    said = {v.quantity: v.value for _t, _oad, values in meter.truth for v in values}
    assert {q: whole[q] for q in said} == said           # exactly what the meter said
    meter.max_fragment = None
    again, errors = _read(worker, spec)
    assert not errors and set(again) == set(whole)


def test_a_meter_that_answers_in_blocks_is_read_whole(line):
    meter, worker, spec = line
    meter.max_results = 2
    values, errors = _read(worker, spec)
    assert not errors, errors
    for q in ("energy.import.total", "energy.export.total", "voltage.a", "current.a",
              "power.active", "power.factor", "frequency", "balance.remaining"):
        assert q in values, q
    assert meter._blocks == {0: []} or all(b == [] for b in meter._blocks.values())
    # blocks and fragments together: each block arrives in link-layer fragments
    meter.max_fragment = 7
    values2, errors = _read(worker, spec)
    assert not errors and set(values2) == set(values)


def test_a_broken_follow_up_fails_the_read_with_a_reason(line):
    meter, worker, spec = line
    meter.max_fragment = 9
    ex = drv.read_exchange(spec, drv.ENERGY)
    real = meter._next_fragment
    meter._next_fragment = lambda confirm: None          # the meter stops after the first
    res = drv.transact(worker, ex)
    assert not res.ok and res.code == TxError.NO_ANSWER
    assert "fragment after" in res.error
    meter._next_fragment = real
    assert drv.transact(worker, drv.read_exchange(spec, drv.ENERGY)).ok


@pytest.mark.protocol
def test_record_blocks_join_into_one_record_answer():
    import datetime as dt
    from protocols.dlt698_data import ARRAY, DATE_TIME_S, DOUBLE_LONG_UNSIGNED, RSD, encode_data
    sa = D.server_address("000000000201")
    cols = [D.CSD(D.FREEZE_TIME), D.CSD(D.OAD(0x0010, 2, 0))]
    day = dt.datetime(2026, 11, 26)
    rsd = RSD(1, D.FREEZE_TIME, ((DATE_TIME_S, day),))
    request = msg(D.get_record_request(sa, D.DAY_FREEZE, rsd, cols, piid=9))
    row = [encode_data(DATE_TIME_S, day), encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, 123456)])]
    # an A-ResultRecord is the record answer's body: OAD, RCSD, ResponseData
    whole = D.parse_frame(D.get_record_response(sa, 9, D.DAY_FREEZE, cols, rows=[row]))
    record = whole.user_data[3:-2]
    block = msg(D.get_next_response(sa, 9, True, 1, records=[record]))
    assert block.apdu.records and D.match_answer(request, block) is None
    joined = D.join_blocks(request, [block.apdu])
    assert isinstance(joined, D.GetRecordResponse) and joined.oad == D.DAY_FREEZE
    assert joined.rows == ((day, [123456]),)
    with pytest.raises(D.DataError, match="2 records"):
        D.join_blocks(request, [msg(D.get_next_response(sa, 9, True, 1,
                                                       records=[record, record])).apdu])
