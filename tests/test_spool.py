"""The technician's spool: a relay path and nothing more, never through a planted link, never
blocked by a FIFO."""

import json
import os
import stat
import threading
import time
import uuid

import pytest

from gateway.control import spool as S


class Server:
    def __init__(self, folder):
        self.handled = []
        self.rejected = []
        self.server = S.SpoolServer(str(folder), self.handle, self.reject)

    def handle(self, req, operator):
        self.handled.append(req)
        return {"status": "done", "relay": "open"}

    def reject(self, reason, operator):
        self.rejected.append(reason)
        return {"status": "rejected", "reason": reason}


@pytest.fixture
def spool(tmp_path):
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


def put(folder, body, rid=None):
    rid = rid or uuid.uuid4().hex
    path = folder / ("%s.req.json" % rid)
    path.write_text(json.dumps(body) if not isinstance(body, str) else body)
    return rid, path


def result(folder, rid):
    return json.loads((folder / ("%s.res.json" % rid)).read_text())


@pytest.mark.parametrize("action,params", [
    ("topup", {"amount": "100000.00", "txn": "INVENTED"}),
    ("account_update", {"mode": "remote", "overdraft_limit": "99999.00"}),
    ("guarantee_on", {}), ("weather_hold", {"on": True}), ("release_breaker", {}),
    ("cut_off", {"payload": "98" + "00" * 20}), ("restore", {"mode": "weird"}),
    ("restore", {"mode": "direct", "amount": "5"})])
def test_the_spool_allows_relay_operations_only(spool, action, params):
    srv = Server(spool)
    rid, _ = put(spool, {"meter": "m1", "action": action, "params": params})
    srv.server.scan()
    assert srv.handled == [] and len(srv.rejected) == 1
    assert result(spool, rid)["status"] == "rejected"


def test_relay_requests_are_handled(spool):
    srv = Server(spool)
    rid, path = put(spool, {"meter": "m1", "action": "restore", "params": {"mode": "direct"},
                            "operator": "li.wei"})
    srv.server.scan()
    assert srv.handled == [{"meter": "m1", "action": "restore", "params": {"mode": "direct"},
                            "operator": "li.wei"}]
    assert result(spool, rid) == {"status": "done", "relay": "open"}
    assert not path.exists()
    assert stat.S_IMODE(os.stat(spool / ("%s.res.json" % rid)).st_mode) == 0o660


def test_a_planted_link_where_the_result_goes_is_replaced_not_written_through(spool, tmp_path):
    victim = tmp_path / "audit.log"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    srv = Server(spool)
    rid = uuid.uuid4().hex
    os.symlink(str(victim), str(spool / ("%s.res.json" % rid)))
    os.symlink(str(victim), str(spool / ("%s.res.json.tmp" % rid)))
    put(spool, {"meter": "m1", "action": "status"}, rid)
    srv.server.scan()
    assert victim.read_text() == "precious\n"
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    assert result(spool, rid)["status"] == "done"


def test_a_symlinked_request_is_refused_without_reading_its_target(spool, tmp_path):
    secret = tmp_path / "state.json"
    secret.write_text(json.dumps({"meter": "m1", "action": "cut_off"}))
    srv = Server(spool)
    rid = uuid.uuid4().hex
    os.symlink(str(secret), str(spool / ("%s.req.json" % rid)))
    srv.server.scan()
    assert srv.handled == [] and "link" in srv.rejected[0]
    assert secret.exists()


def test_a_fifo_does_not_block_the_executor(spool):
    srv = Server(spool)
    rid = uuid.uuid4().hex
    os.mkfifo(str(spool / ("%s.req.json" % rid)))
    t = threading.Thread(target=srv.server.scan, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "scan blocked on a FIFO"
    assert srv.handled == [] and "regular" in srv.rejected[0]
    assert not (spool / ("%s.req.json" % rid)).exists()


def test_oversized_and_malformed_requests_are_refused(spool):
    srv = Server(spool)
    put(spool, "x" * (S.MAX_REQUEST_BYTES + 1))
    put(spool, "[" * 3000)
    srv.server.scan()
    assert srv.handled == [] and len(srv.rejected) == 2


def test_staleness_comes_from_the_files_mtime_not_from_what_it_claims(spool):
    srv = Server(spool)
    body = {"meter": "m1", "action": "cut_off", "created_at": float("nan")}
    _, old = put(spool, {"meter": "m1", "action": "cut_off"})
    os.utime(old, (time.time() - 600, time.time() - 600))
    _, future = put(spool, {"meter": "m1", "action": "cut_off"})
    os.utime(future, (time.time() + 3600, time.time() + 3600))
    put(spool, json.dumps(body).replace('NaN', 'NaN'))       # a fresh file: created_at ignored
    srv.server.scan()
    assert len(srv.handled) == 1
    assert sorted(r.split(" ")[0] for r in srv.rejected) == ["stale", "stale"]


def test_the_client_side_round_trip(spool):
    srv = Server(spool)
    rid = S.submit(str(spool), "m1", "status", {}, "tech")
    threading.Timer(0.3, srv.server.scan).start()
    body, taken = S.wait_result(str(spool), rid, 5)
    assert taken and body == {"status": "done", "relay": "open"}
    with pytest.raises(S.BadRequest):
        S.submit(str(spool), "m1", "topup", {"amount": "5"}, "tech")


@pytest.mark.parametrize("plant", ["dir", "garbage"])
def test_the_client_gives_one_line_on_a_planted_result(spool, plant):
    rid = S.submit(str(spool), "m1", "status", {}, "li")
    out = spool / ("%s.res.json" % rid)
    if plant == "dir":
        out.mkdir()
    else:
        out.write_bytes(b"\xff not json")
    with pytest.raises(S.BadRequest) as info:
        S.wait_result(str(spool), rid, 2)
    assert "\n" not in str(info.value)
