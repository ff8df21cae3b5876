"""Command verification and policy, pure and fast: bytes in, a command or a coded rejection
out; policy with the time and the counters passed in."""

import json

import pytest

from gateway.control import policy, verify
from gateway.control.verify import RejectCode, Rejected
from gateway.control.signing import generate, load_private_key, load_public_key, sign

NOW_ISO = "2026-11-26T10:00:00+08:00"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    priv, pub, _ = generate(str(folder))
    return load_private_key(priv), [load_public_key(pub)]


def command(key, **over):
    cmd = {"v": 1, "id": "c-1", "meter": "m1", "action": "topup", "issued_at": NOW_ISO,
           "expires_at": "2026-11-26T10:15:00+08:00",
           "params": {"amount": "50.00", "txn": "PAY-1"}}
    cmd.update(over)
    return sign(cmd, key)


def raw(cmd):
    return json.dumps(cmd).encode()


def rejection(payload, pub, max_bytes=8192):
    with pytest.raises(Rejected) as info:
        verify.authenticate(payload, pub, max_bytes)
    return info.value


def test_a_signed_command_is_authenticated(keys):
    key, pub = keys
    cmd = verify.authenticate(raw(command(key)), pub, 8192)
    assert cmd["id"] == "c-1"


@pytest.mark.parametrize("v", [True, 1.0, "1", 2, None])
def test_version_must_be_the_integer_one(keys, v):
    key, pub = keys
    rej = rejection(raw(command(key, v=v)), pub)
    assert rej.code == RejectCode.BAD_VERSION and not rej.authenticated


@pytest.mark.parametrize("cid", ["c-1\n", "", "a b", "x" * 129, "é", "c/1"])
def test_ids_are_matched_whole(keys, cid):
    key, pub = keys
    rej = rejection(raw(command(key, id=cid)), pub)
    assert rej.code == RejectCode.BAD_ID


def test_nesting_1500_deep_is_a_rejection_not_a_recursion_error(keys):
    _, pub = keys
    deep = b'{"v":1,"params":' + b"[" * 1500 + b"]" * 1500 + b"}"
    rej = rejection(deep, pub, max_bytes=1 << 20)
    assert rej.code == RejectCode.MALFORMED and "deep" in rej.reason


def test_nan_and_infinity_literals_are_not_json(keys):
    _, pub = keys
    assert rejection(b'{"v":NaN}', pub).code == RejectCode.MALFORMED


def test_a_forged_command_is_unauthenticated_and_keeps_only_a_claimed_id(keys):
    key, pub = keys
    cmd = command(key)
    cmd["meter"] = "m2"
    rej = rejection(raw(cmd), pub)
    assert rej.code == RejectCode.BAD_SIGNATURE and not rej.authenticated
    assert rej.claimed_id == "c-1"
    bad_id = dict(cmd, id="x\n")
    assert rejection(raw(bad_id), pub).claimed_id is None


def test_lone_surrogates_are_a_bad_signature_not_a_crash(keys):
    key, pub = keys
    payload = raw(command(key)).replace(b'"m1"', b'"\\ud800"')
    assert rejection(payload, pub).code == RejectCode.BAD_SIGNATURE


@pytest.mark.parametrize("amount", ["1e5", " 1.00", "1.00 ", "1_0.00", "\u0661\u0660\u0660",
                                    "1.001", "-1.00", "0.00", "1234567.00", "1e400", "NaN",
                                    "Infinity", "+1.00", "1.", ".5", 5, 5.0, None])
def test_topup_amounts_are_strict_ascii_decimal_strings(amount):
    with pytest.raises(Rejected) as info:
        verify.parse_amount(amount)
    assert info.value.code == RejectCode.BAD_PARAMS


@pytest.mark.parametrize("amount", ["1", "0.01", "50.5", "999999.99"])
def test_good_amounts(amount):
    assert str(verify.parse_amount(amount)) == amount


@pytest.mark.parametrize("topic,ok", [("headend/replies", True), ("evil/#", False),
                                      ("a/+/b", False), ("a\x00b", False), ("", False),
                                      ("$SYS/x", False), ("x" * 257, False), (None, False),
                                      ("\ud800", False), ("\u7535\u8868/\u56de\u590d", True)])
def test_response_topics_are_validated(topic, ok):
    assert verify.response_topic_ok(topic) is ok


def _window(issued, expires, now_iso):
    import datetime as dt
    cmd = {"issued_at": issued, "expires_at": expires}
    return verify.check_window(cmd, dt.datetime.fromisoformat(now_iso), 120, 3600)


def test_window_checks_with_an_injected_clock():
    exp = "2026-11-26T10:15:00+08:00"
    assert _window(NOW_ISO, exp, "2026-11-26T10:05:00+08:00")
    for now, code in (("2026-11-26T10:20:00+08:00", RejectCode.EXPIRED),
                      ("2026-11-26T09:50:00+08:00", RejectCode.NOT_YET_VALID)):
        with pytest.raises(Rejected) as info:
            _window(NOW_ISO, exp, now)
        assert info.value.code == code
    with pytest.raises(Rejected) as info:
        _window(NOW_ISO, "2026-11-26T12:00:00+08:00", NOW_ISO)
    assert info.value.code == RejectCode.WINDOW_TOO_LONG
    with pytest.raises(Rejected) as info:
        _window("2026-11-26T10:00:00", exp, NOW_ISO)          # no offset
    assert info.value.code == RejectCode.BAD_TIME


def test_cut_off_policy_with_counters_passed_in():
    ok = dict(guarantee_on=False, clock_trusted=True, recent_cutoffs=0, limit=2)
    assert policy.cut_off_refusal("m1", **ok) is None
    assert policy.cut_off_refusal("m1", **dict(ok, guarantee_on=True)).code == \
        RejectCode.GUARANTEE
    assert policy.cut_off_refusal("m1", **dict(ok, clock_trusted=False)).code == \
        RejectCode.CLOCK_UNTRUSTED
    assert policy.cut_off_refusal("m1", **dict(ok, recent_cutoffs=2)).code == \
        RejectCode.RATE_LIMIT


def test_cut_offs_count_from_admission_so_two_threads_cannot_both_pass():
    now = 10000.0
    ledger = [{"action": "cut_off", "state": "accepted", "received_at": now - 5},
              {"action": "cut_off", "state": "rejected", "received_at": now - 5},
              {"action": "cut_off", "state": "done", "received_at": now - 4000},
              {"action": "restore", "state": "done", "received_at": now - 5}]
    assert policy.recent_cutoffs(ledger, now) == 1


def test_token_bucket_bounds_answers_to_unauthenticated_input():
    bucket = policy.TokenBucket(10, 60)
    taken = sum(bucket.take(0.0) for _ in range(100))
    assert taken == 10 and bucket.refused == 90
    assert bucket.take(6.0)            # one token back every 6 s
    assert not bucket.take(6.1)


def test_cut_off_decision_windows_and_notice_with_an_injected_clock():
    import datetime as dt
    from gateway.billing.costcontrol import notice_given, protected_reason
    pol = {"protected_hours": ["18:00-08:00"], "protected_ranges": [(18 * 60, 8 * 60)],
           "protected_weekends": True, "holiday_dates": {dt.date(2026, 10, 1)}}
    wed = dt.datetime(2026, 11, 25, 12, 0)
    assert protected_reason(wed, pol, False) is None
    assert protected_reason(wed.replace(hour=7, minute=59), pol, False) == "protected hours"
    assert protected_reason(wed.replace(hour=8, minute=0), pol, False) is None
    assert protected_reason(wed.replace(hour=18), pol, False) == "protected hours"
    assert protected_reason(dt.datetime(2026, 11, 28, 12), pol, False) == "weekend"
    assert protected_reason(dt.datetime(2026, 10, 1, 12), pol, False) == "public holiday"
    assert protected_reason(wed, pol, True).startswith("extreme-weather")
    doc = {"warned": {"alarm1": 100.0, "alarm2": 1000.0, "exhausted": 5000.0}}
    assert not notice_given(doc, 1000.0 + 86399, 86400)
    assert notice_given(doc, 1000.0 + 86400, 86400)
    assert notice_given({"warned": {}}, 5.0, 0)
