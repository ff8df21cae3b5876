"""The PyPI package `dlt698` (an independent C++ DL/T 698.45 library) as a test oracle: every
frame our codec builds for the requests we use decodes there to the same service, address,
OADs and values, and the frames it builds decode the same in ours. Test-only: the package is
in the `test` extra where it has a wheel, never a run-time dependency."""

import datetime as dt

import pytest

from protocols import dlt698 as D
from protocols.dlt698_data import DATE_TIME_S, OAD, RSD, Reader, encode_data

oracle = pytest.importorskip("dlt698.codec")
proto = pytest.importorskip("dlt698.protocol")
native = pytest.importorskip("dlt698._native")

pytestmark = pytest.mark.protocol

WHEN = dt.datetime(2026, 5, 1, 12, 0, 0)
KINDS = {0: "single", 1: "wildcard", 2: "group", 3: "broadcast"}


def _oads(items):
    return [OAD(o.oi, o.attribute, o.index) for o in items]


def _ours_and_theirs(frame):
    ours = D.parse_frame(frame)
    theirs = oracle.decode_frame(ours.raw)
    assert theirs.control == ours.control
    assert theirs.client == ours.ca
    sa = theirs.server
    assert str(sa.type).split(".")[-1] == ours.sa.kind_name
    return ours, theirs, oracle.decode_apdu(theirs.payload)


@pytest.mark.parametrize("address", ["000000000042", "123456789012"])
def test_get_requests_agree(address):
    ours, theirs, apdu = _ours_and_theirs(D.get_request(address, D.CLOCK, piid=5))
    assert type(apdu).__name__ == "GetRequest" and not apdu.list and apdu.piid == 5
    assert _oads(apdu.attributes) == [D.CLOCK]
    assert theirs.server.bytes[::-1].hex().upper() == ours.sa.address
    oads = [OAD(0x0010, 2, 0), OAD(0x2000, 2, 0), OAD(0x2001, 2, 0), D.CLOCK]
    _, _, apdu = _ours_and_theirs(D.get_list_request(address, oads, piid=6))
    assert apdu.list and _oads(apdu.attributes) == oads


def test_wildcard_and_broadcast_addresses_agree():
    ours, theirs, apdu = _ours_and_theirs(D.read_address_exchange(piid=1).frame)
    assert theirs.server.bytes == b"\xAA" * 6
    ours, theirs, apdu = _ours_and_theirs(D.broadcast_time_sync(WHEN, piid=2))
    assert theirs.server.bytes == b"\xAA"
    assert type(apdu).__name__ == "ActionRequest"
    m = apdu.methods[0]
    assert (m.method.oi, m.method.method) == (0x4000, 127)
    assert oracle.encode_data(m.parameter) == encode_data(DATE_TIME_S, WHEN)


def test_extended_logical_address_is_a_known_disagreement():
    """Flag 0x26 + 03 + 6 address bytes (WSD's meter firmware, CAP #23): the 2017 reading
    (ours, the reference's) is extended logical address 3 and address 111111111111; the
    oracle reads bits 4-5 as a 2-bit logical address (2) and keeps 7 address bytes, like
    RS. Both agree on the bytes on the wire; docs/frame-layer.md says why we read it so."""
    ours, theirs, apdu = _ours_and_theirs(
        D.get_request(D.server_address("111111111111", logical=3), D.CLOCK, piid=1))
    assert (ours.sa.logical, ours.sa.address) == (3, "111111111111")
    assert theirs.server.logical == 2
    assert theirs.server.bytes == ours.sa.wire


@pytest.mark.parametrize("method,kw", [(D.RelayMethod.TRIP, {}),
                                       (D.RelayMethod.CLOSE, {"direct": True}),
                                       (D.RelayMethod.CLOSE, {})])
def test_relay_actions_agree(method, kw):
    frame = D.relay_action("000000000001", method, WHEN, piid=7, **kw)
    ours, theirs, apdu = _ours_and_theirs(frame)
    assert type(apdu).__name__ == "ActionRequest" and apdu.piid == 7
    m = apdu.methods[0]
    assert (m.method.oi, m.method.method, m.method.mode) == (0x8000, int(method), 0)
    mine = D.decode(ours).apdu
    assert Reader(oracle.encode_data(m.parameter)).data_value() == mine.value
    assert apdu.time_tag is not None


def test_record_request_agrees():
    rsd = RSD(1, D.FREEZE_TIME, ((DATE_TIME_S, dt.datetime(2026, 10, 5)),))
    frame = D.get_record_request("000000000001", D.DAY_FREEZE, rsd,
                                 [D.FREEZE_TIME, OAD(0x0010, 2, 0)], piid=3)
    _, _, apdu = _ours_and_theirs(frame)
    assert type(apdu).__name__ == "GetRecordRequest" and apdu.piid == 3
    rec = apdu.records[0]
    assert (rec.attribute.oi, rec.attribute.attribute) == (0x5004, 2)


def test_set_clock_agrees():
    _, _, apdu = _ours_and_theirs(D.set_clock("000000000001", WHEN, piid=4))
    assert type(apdu).__name__ == "SetRequest" and apdu.piid == 4


def test_their_frames_decode_the_same_in_ours():
    req = proto.GetRequest(attributes=[native.Oad(oi=0x0010, attribute=2, index=0),
                                       native.Oad(oi=0x4000, attribute=2, index=0)],
                           list=True, piid=9)
    sa = native.ServerAddress(bytes=bytes.fromhex("123456789012")[::-1], logical=0,
                              type=native.AddressType.single)
    raw = oracle.encode_frame(oracle.Frame(client=0, control=0x43, server=sa,
                                           payload=oracle.encode_apdu(req)))
    frame = D.parse_frame(raw)
    assert frame.sa == D.server_address("123456789012")
    msg = D.decode(frame).apdu
    assert isinstance(msg, D.GetRequest) and msg.listed and msg.piid == 9
    assert msg.oads == (OAD(0x0010, 2, 0), D.CLOCK)
    assert raw == D.get_list_request("123456789012", msg.oads, piid=9)[4:]


def test_get_next_request_and_response_agree():
    sa = D.server_address("000000000001")
    _, _, apdu = _ours_and_theirs(D.get_next_request(sa, 7, 3))
    assert type(apdu).__name__ == "GetNextRequest" and (apdu.piid, apdu.block) == (7, 3)
    oad = OAD(0x200F, 2, 0)
    ours, _, apdu = _ours_and_theirs(D.get_next_response(sa, 7, False, 1,
                                                         [(oad, bytes.fromhex("121388"),
                                                           None)]))
    assert type(apdu).__name__ == "GetNextResponse"
    assert (apdu.block, apdu.last) == (1, False)
    mine = D.decode(ours).apdu
    assert [OAD(r.attribute.oi, r.attribute.attribute, r.attribute.index)
            for r in apdu.result] == [r.oad for r in mine.results] == [oad]


def test_link_fragments_agree():
    sa = D.server_address("000000000001")
    for kind, word in (("first", "first"), ("middle", "middle"), ("last", "last"),
                       ("confirm", "acknowledgement")):
        ours = D.parse_frame(D.fragment_frame(0x83 if kind != "confirm" else 0x43, sa, 261,
                                              kind, b"\x85\x01" if kind != "confirm"
                                              else b""))
        theirs = native.decode_fragment(oracle.decode_frame(ours.raw).payload)
        assert (theirs.sequence, str(theirs.type).split(".")[-1]) == (261, word)
        assert theirs.data == D.decode(ours).apdu.payload


def test_protection_and_forwarded_security_request_agree():
    sa = D.server_address("000000000001")
    _, _, apdu = _ours_and_theirs(D.protect_action(sa, D.ProtectMethod.ON, WHEN, piid=3))
    m = apdu.methods[0]
    assert (m.method.oi, m.method.method) == (0x8001, 127) and apdu.time_tag is not None
    inner = D.parse_frame(D.relay_action(sa, D.RelayMethod.TRIP, WHEN, piid=4)).user_data
    payload = D.security_request_apdu(inner, sid=(7, b"\x01"), mac=b"\x11\x22\x33\x44")
    theirs = oracle.decode_security(payload)
    assert type(theirs).__name__ == "SecurityRequest" and not theirs.encrypted
    assert theirs.application == inner == D.decode_apdu(payload).apdu
    ours = D.parse_frame(D.security_frame(sa, payload))
    assert ours.user_data == payload                     # forwarded unchanged
    refused = oracle.decode_security(D.parse_frame(D.security_response(sa, dar=22)).user_data)
    assert refused.application == 22


def test_link_response_agrees():
    sa = D.server_address("111111111111")
    t = dt.datetime(2026, 11, 27, 9, 58, 1, 250000)      # a Friday
    ours, theirs, apdu = _ours_and_theirs(D.link_response(sa, 3, t, t, t, 0x80))
    assert ours.control == 0x01 and type(apdu).__name__ == "LinkResponse"
    assert (apdu.piid, apdu.result) == (3, 0x80)
    assert list(apdu.requested_at.value) == [0x07, 0xEA, 11, 27, 5, 9, 58, 1, 0x00, 0xFA]
    mine = D.decode(ours).apdu
    assert isinstance(mine, D.LinkResponse) and mine.requested == mine.responded == t
