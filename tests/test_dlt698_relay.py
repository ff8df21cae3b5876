"""Relay control of DL/T 698.45 meters through the protocol seam of control/relay.py, on a
real (pseudo-terminal) line with the real port worker, beside a DL/T 645 meter: a plaintext
ACTION on 8000/8001 for a meter configured with relay_plaintext, the master station's
SECURITY-Request forwarded byte for byte for the others, the state read back from status
word 3 either way, refusals reported with the meter's DAR."""

import datetime as dt

import pytest

from gateway.control import relay
from gateway.line import dlt698 as drv
from gateway.line.poller import MeterSpec
from gateway.line.port import PortWorker
from gateway.service.config import validate
from gateway.sim.dlt645 import SimLine, SimMeter
from gateway.sim.dlt698 import SimMeter698
from protocols import dlt698 as D
from protocols.exchange import RelayIntent


class Audit:
    def __init__(self):
        self.entries = []

    def append(self, kind, **data):
        self.entries.append(dict(data, kind=kind))


def _config(meters):
    doc = {"gateway": {"id": "gw"}, "ports": [{"name": "p", "device": "/dev/null"}],
           "meters": meters}
    return validate(doc, "gw.toml")


@pytest.fixture
def line():
    m645 = SimMeter("000000000101")
    plain = SimMeter698("000000000201", plaintext_relay=True)
    secured = SimMeter698("000000000202", plaintext_relay=False)
    sim = SimLine([m645, plain, secured], baudrate=9600)
    sim.start()
    worker = PortWorker("p", sim.device, baudrate=9600, retries=1)
    worker.open()
    worker.start()
    cfg = _config([
        {"id": "a", "port": "p", "address": "000000000101"},
        {"id": "b", "port": "p", "protocol": "dlt698", "address": "000000000201",
         "relay_plaintext": True},
        {"id": "c", "port": "p", "protocol": "dlt698", "address": "000000000202"}])
    meters = {m.id: m for m in cfg.meters}
    specs = {i: MeterSpec.from_config(m) for i, m in meters.items()}
    yield relay.Line(lambda port: worker), meters, specs, {"a": m645, "b": plain,
                                                           "c": secured}
    worker.stop()
    sim.stop()


def _operate(line, meters, specs, mid, rc, params=None):
    audit = Audit()
    sent = []
    out = relay.operate(line, specs[mid], meters[mid], rc, params or {}, audit, "cmd-1",
                        lambda: sent.append(True))
    assert sent == [True]
    return out, audit


def _secured_payload(sim_meter, method, direct=False):
    """A SECURITY-Request as the master station sends it for this meter: here plaintext +
    SID_MAC around the ACTION (the simulator has no ESAM to decipher ciphertext)."""
    when = dt.datetime.now().replace(microsecond=0)
    if method in (D.RelayMethod.TRIP, D.RelayMethod.CLOSE):
        inner = D.relay_action(sim_meter.sa, method, when, direct=direct)
    else:
        inner = D.protect_action(sim_meter.sa, method, when)
    return D.security_request_apdu(D.parse_frame(inner).user_data,
                                   sid=(0x00000107, b"\x01\x02"), mac=b"\x5A\xA5\x3C\xC3")


def test_plaintext_cut_off_restore_and_guarantee_read_back_as_done(line):
    ln, meters, specs, sims = line
    (status, reason, extra), audit = _operate(ln, meters, specs, "b", RelayIntent.TRIP)
    assert (status, reason, extra["relay"]) == ("done", None, "open"), (reason, extra)
    assert sims["b"].relay_open and not sims["a"].relay_open and not sims["c"].relay_open
    # the frame that went is a time-tagged ACTION 8000-129 to this meter
    sent = [bytes.fromhex(f) for e in audit.entries if e["kind"] == "relay.frame"
            for f in e["frames"]]
    req = D.decode(D.parse_frame(sent[0]))
    assert req.frame.sa.address == "000000000201"
    assert req.apdu.omd == D.OMD(0x8000, 129)
    when, ti = req.apdu.time_tag                # sent with a TimeTag: the meters want one
    assert abs((dt.datetime.now() - when).total_seconds()) < 60
    assert ti == (0, 300)                       # relay_valid_s, in seconds
    (status, _, extra), _ = _operate(ln, meters, specs, "b", RelayIntent.DIRECT_CLOSE)
    assert (status, extra["relay"]) == ("done", "closed") and not sims["b"].relay_open
    (status, _, extra), _ = _operate(ln, meters, specs, "b", RelayIntent.GUARANTEE)
    assert (status, extra["guarantee"]) == ("done", True) and sims["b"].guarantee
    # the meter refuses a trip under protection: its DAR is the reason, nothing moved
    (status, reason, extra), _ = _operate(ln, meters, specs, "b", RelayIntent.TRIP)
    assert status == "failed" and extra["code"] == "meter_refused"
    assert "DAR 3" in reason and not sims["b"].relay_open
    (status, _, extra), _ = _operate(ln, meters, specs, "b", RelayIntent.GUARANTEE_RELEASE)
    assert (status, extra["guarantee"]) == ("done", False)


def test_the_master_stations_security_request_is_forwarded_unchanged(line):
    ln, meters, specs, sims = line
    payload = _secured_payload(sims["c"], D.RelayMethod.TRIP)
    (status, reason, extra), audit = _operate(ln, meters, specs, "c", RelayIntent.TRIP,
                                              {"payload": payload.hex()})
    assert (status, extra["relay"]) == ("done", "open"), reason
    assert sims["c"].security_requests == [payload]          # byte for byte
    assert sims["c"].relay_open and not sims["b"].relay_open
    payload = _secured_payload(sims["c"], D.RelayMethod.CLOSE, direct=True)
    (status, _, extra), _ = _operate(ln, meters, specs, "c", RelayIntent.DIRECT_CLOSE,
                                     {"payload": payload.hex()})
    assert (status, extra["relay"]) == ("done", "closed")
    assert sims["c"].security_requests[-1] == payload


def test_a_refused_ciphertext_is_a_failure_with_the_meters_dar(line):
    ln, meters, specs, sims = line
    payload = D.security_request_apdu(bytes(range(40)), ciphertext=True, sid=(7, b""),
                                      mac=bytes(4))
    (status, reason, extra), _ = _operate(ln, meters, specs, "c", RelayIntent.TRIP,
                                          {"payload": payload.hex()})
    assert status == "failed" and extra["code"] == "meter_refused"
    assert "DAR 22" in reason and extra["relay"] == "closed"
    assert sims["c"].security_requests == [payload] and not sims["c"].relay_open


def test_a_plain_action_to_a_secured_meter_is_never_built():
    cfg = _config([{"id": "c", "port": "p", "protocol": "dlt698", "address": "202"},
                   {"id": "b", "port": "p", "protocol": "dlt698", "address": "201",
                    "relay_plaintext": True},
                   {"id": "a", "port": "p", "address": "101"}])
    c, b, a = cfg.meters
    assert "SECURITY-Request" in relay.params_problem(c, "cut_off", {})
    assert "SECURITY-Request" in relay.params_problem(c, "guarantee_on", {})
    assert relay.params_problem(b, "cut_off", {}) is None
    assert relay.params_problem(a, "cut_off", {}) is None
    assert "SECURITY-Request" in relay.params_problem(c, "cut_off", {"payload": "0501"
                                                                     "00400002000000"})
    assert "whole" in relay.params_problem(c, "cut_off", {"payload": "1000FF07"})
    assert "hex" in relay.params_problem(c, "cut_off", {"payload": "xyz"})
    with pytest.raises(ValueError, match="SECURITY-Request"):
        drv.relay_exchange(c, RelayIntent.TRIP, {})
    assert drv.relay_exchange(b, RelayIntent.TRIP, {}).label == "TRIP"


def test_relay_state_comes_from_status_word_3():
    sa = D.server_address("000000000201")
    zero = D.BitString(16, b"\x00\x00")
    for opened, trip, prot in ((True, True, False), (False, False, True)):
        word = D.status_word(opened, trip, prot)
        data = D.encode_data(D.ARRAY, [(4, zero), (4, zero), (4, word)])
        msg = D.decode(D.parse_frame(D.get_response(sa, 1, D.STATUS_WORDS, data)))
        state, why = drv.relay_state(msg)
        assert why is None
        assert state == {"relay": "open" if opened else "closed",
                         "relay_command": "trip" if trip else "close", "guarantee": prot}
    msg = D.decode(D.parse_frame(D.get_response(sa, 1, D.STATUS_WORDS, dar=6)))
    state, why = drv.relay_state(msg)
    assert state is None and "DAR 6" in why
