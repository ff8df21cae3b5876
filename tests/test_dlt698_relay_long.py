"""A DL/T 698.45 meter that answers the relay's status read at length (link-layer fragments,
GET-Response-Next block transfer, or both): the relay operation follows the answer to its
end, before the command and in the read-back, on the line's thread (a command's job) and
from another thread (`mgw relay status` through the executor), on a real pseudo-terminal
line with the real port worker."""

import pytest

from gateway.control import relay
from gateway.line.poller import MeterSpec
from gateway.line.port import ON_DEMAND, PortWorker
from gateway.service.config import validate
from gateway.sim.dlt645 import SimLine
from gateway.sim.dlt698 import SimMeter698
from protocols import dlt698 as D
from protocols.exchange import RelayIntent

LONG_ANSWERS = {"fragments": {"max_fragment": 12},
                "blocks": {"always_blocks": True},
                "fragmented blocks": {"max_fragment": 12, "always_blocks": True}}


class Audit:
    def __init__(self):
        self.entries = []

    def append(self, kind, **data):
        self.entries.append(dict(data, kind=kind))


@pytest.fixture(params=sorted(LONG_ANSWERS))
def line(request):
    sim_meter = SimMeter698("000000000201", plaintext_relay=True)
    for key, value in LONG_ANSWERS[request.param].items():
        setattr(sim_meter, key, value)
    sim = SimLine([sim_meter], baudrate=9600)
    sim.start()
    worker = PortWorker("p", sim.device, baudrate=9600, retries=1)
    worker.open()
    worker.start()
    cfg = validate({"gateway": {"id": "gw"}, "ports": [{"name": "p", "device": "/dev/null"}],
                    "meters": [{"id": "b", "port": "p", "protocol": "dlt698",
                                "address": "000000000201", "relay_plaintext": True}]},
                   "gw.toml")
    meter = cfg.meters[0]
    yield relay.Line(lambda port: worker), meter, MeterSpec.from_config(meter), sim_meter
    worker.stop()
    sim.stop()


def _answers_at_length(frames):
    """How many of the status read's frames came back as follow-ups (fragments, blocks)."""
    kinds = []
    for raw in frames:
        msg = D.decode(D.parse_frame(bytes(raw)))
        if msg.frame.is_response and isinstance(msg.apdu, (D.Fragment, D.GetNextResponse)):
            kinds.append(type(msg.apdu).__name__)
    return kinds


def test_the_status_read_follows_a_long_answer_from_another_thread(line):
    worker_line, meter, spec, sim_meter = line
    state, why, frames = relay.read_relay(worker_line, spec, meter, ON_DEMAND)
    assert why is None and state == {"relay": "closed", "relay_command": "close",
                                     "guarantee": False}
    assert _answers_at_length(frames), "the simulator did not answer at length"


def test_cut_off_and_restore_read_back_a_long_answer_as_done(line):
    worker_line, meter, spec, sim_meter = line
    for rc, relay_open in ((RelayIntent.TRIP, True), (RelayIntent.DIRECT_CLOSE, False)):
        audit = Audit()
        # as the executor runs it: one job on the meter's line
        status, reason, extra = worker_line.run_job(meter, lambda: relay.operate(
            worker_line, spec, meter, rc, {}, audit, "cmd-1", lambda: None))
        assert (status, reason) == ("done", None), (status, reason, audit.entries)
        assert extra["relay"] == ("open" if relay_open else "closed")
        assert sim_meter.relay_open is relay_open
        before = [e for e in audit.entries if e["kind"] == "relay.before"][0]
        after = [e for e in audit.entries if e["kind"] == "relay.after"][-1]
        assert before["state"]["relay"] == ("closed" if relay_open else "open")
        assert after["state"] == {"relay": extra["relay"], "relay_command": extra[
            "relay_command"], "guarantee": False}
        assert _answers_at_length(bytes.fromhex(f) for f in after["frames"])


def test_a_broken_follow_up_fails_the_read_back_with_a_reason(line):
    worker_line, meter, spec, sim_meter = line
    sim_meter.max_fragment = 12
    sim_meter.fragment_seq = 4094          # numbering wraps at 4095: still followed
    state, why, _ = relay.read_relay(worker_line, spec, meter)
    assert state is not None, why
    sim_meter._next_fragment = lambda confirm: None      # the meter loses the thread
    state, why, _ = relay.read_relay(worker_line, spec, meter)
    assert state is None and "link-layer fragment after" in why, why
