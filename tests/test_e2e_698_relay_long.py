"""End to end with real processes (Mosquitto, `mgw run`, `mgw command sign`): a DL/T
698.45 test meter that answers every read at length, each GET by GET-Response-Next block
transfer and each long APDU in link-layer fragments, still reports its readings, and a
signed cut-off and restore on it are read back as done."""

import json

from gateway.sim.dlt645 import Faults, SimLine
from gateway.sim.dlt698 import SimMeter698
from mqtt_helpers import HeadEnd
from test_e2e_dlt698 import BAUD, latest, result, stop, write_config
from tests.test_e2e import keys, mgw, sign


def test_a_signed_cut_off_on_a_meter_that_answers_at_length(tmp_path, broker):
    priv, pub = keys(tmp_path)
    meter = SimMeter698("000000000003", plaintext_relay=True, faults=Faults(latency_s=0.005))
    meter.always_blocks = True
    meter.max_fragment = 16
    line = SimLine([meter], baudrate=BAUD)
    line.start()
    cfg = write_config(tmp_path, line.device, broker, pub, [
        ("m3", "000000000003", ('protocol = "dlt698"', "relay_plaintext = true"))])
    head = HeadEnd(broker)
    gw = None
    try:
        gw = mgw("run", "--config", cfg)
        head.wait(lambda: latest(head, "m3", "relay.state") and
                  latest(head, "m3", "energy.import.total"), timeout=60)
        for action, state in (("cut_off", "open"), ("restore", "closed")):
            cmd = sign(priv, "m3", action)
            head.publish("commands", cmd)
            cid = json.loads(cmd)["id"]
            head.wait(lambda: result(head, cid), timeout=30)
            res = result(head, cid)
            assert res["status"] == "done" and res["relay"] == state, res
        assert [(s, c) for _, s, c in meter.relay_log] == [("open", "TRIP"),
                                                          ("closed", "CLOSE_ALLOWED")]
        stop(gw)
        gw = None
    finally:
        if gw is not None and gw.poll() is None:
            gw.kill()
            gw.wait(10)
        head.close()
        line.stop()
