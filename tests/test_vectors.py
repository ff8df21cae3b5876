"""Every real captured frame in ../shared/vectors is handled as its entry says."""

import datetime as dt
import json
import re
from decimal import Decimal

import pytest

from protocols import dlt645 as D
from protocols.framing import Scanner

pytestmark = pytest.mark.protocol


def _entries(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _check_value(entry, msg):
    expected = entry["expected_value"]
    if expected is None:
        return
    if isinstance(msg, D.ErrorResponse):
        assert msg.code == expected
    elif isinstance(msg, D.AddressResponse):
        assert msg.address == expected
    elif isinstance(msg, D.TimeSync):
        assert str(msg.when) == expected
    elif isinstance(msg, D.ChangeBaud):
        assert msg.baud == (int(expected.split()[0]) if isinstance(expected, str) else expected)
    elif isinstance(msg, D.RelayControl):
        code = int(re.search(r"0x([0-9A-Fa-f]{2})", expected).group(1), 16)
        assert msg.command == code
    elif isinstance(msg, D.ReadResponse):
        if msg.values is None:
            # vendor layouts are kept as raw bytes, never guessed
            assert "vendor" in entry["meaning"] and msg.payload
            return
        first = msg.values[0]
        if isinstance(expected, str):
            if isinstance(first.value, dt.date):
                m = re.match(r"(\d{4})-(\d\d)-(\d\d)(?: weekday (\d))?", expected)
                assert first.value == dt.date(*map(int, m.group(1, 2, 3)))
                if m.group(4):
                    assert first.value.isoweekday() % 7 == int(m.group(4))
            else:
                assert first.value == expected
        else:
            assert Decimal(first.value) == Decimal(str(expected))
            if entry["unit"] and first.unit:
                assert first.unit == entry["unit"]
    elif isinstance(msg, D.Unknown):
        # vendor control codes (e.g. 0x80) stay raw bytes
        assert msg.frame.raw
    else:
        pytest.fail("no check for %r" % (msg,))


def test_every_vector(vectors_path):
    entries = _entries(vectors_path)
    assert len(entries) >= 100
    seen_good = seen_bad = 0
    for entry in entries:
        wire = bytes.fromhex(entry["hex"])
        scanner = Scanner()
        frames = scanner.feed(wire)
        scanner.flush()
        where = "%s (%s)" % (entry["hex"][:60], entry["meaning"][:80])
        if entry["checksum_ok"]:
            assert len(frames) == 1, where
            frame = D.frame_from_scanner(frames[0])
            if entry["control"] is not None:
                assert frame.control == int(entry["control"], 16), where
            msg = D.decode(frame)
            if entry["di"] is not None and isinstance(msg, (D.ReadRequest, D.ReadResponse)):
                assert msg.di == int(entry["di"], 16), where
            _check_value(entry, msg)
            seen_good += 1
        else:
            # broken frames are rejected and counted; a resync vector still yields the
            # valid frame behind its stray byte
            rejected = (scanner.checksum_errors + scanner.end_errors + scanner.bytes_discarded)
            assert rejected > 0, where
            if "resync" in entry["meaning"]:
                assert len(frames) == 1, where
            else:
                assert frames == [], where
            seen_bad += 1
    assert seen_good and seen_bad
