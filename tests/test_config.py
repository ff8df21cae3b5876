"""Configuration declared once: the declarations, the walker and the records, the wording of
every problem (unchanged from the validator they replace), and the docs' tables made from
the declarations."""

import copy
import os
import re
from decimal import Decimal

import pytest

from gateway.config.schema import Record

from gateway.billing import settings as billing_settings
from gateway.billing.tariff import Tariff
from gateway.config import ConfigError, doc, sections
from gateway.service.config import DOC_TABLES, SCHEMA, Config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problems(document, path="f.toml"):
    try:
        validate(document, path)
    except ConfigError as exc:
        return exc.problems
    return []


# ---------------------------------------------------------------- the docs' tables

@pytest.mark.parametrize("name", sorted(DOC_TABLES))
def test_the_docs_tables_are_the_declarations(name):
    """docs/configuration.md and docs/cost-control.md show each section's table exactly as
    the declaration makes it; after changing a declaration, run
    `python -m gateway.service.config --doc-tables --write`."""
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        text = f.read()
    for section in DOC_TABLES[name]:
        assert doc.documented(text, section) == doc.table(section), (
            "%s: the table under %s differs from its declaration; run python -m "
            "gateway.service.config --doc-tables --write" % (name, doc.heading(section)))


def test_every_key_of_the_file_is_in_a_docs_table():
    documented = {s.key for secs in DOC_TABLES.values() for s in secs}
    assert documented | {"tariffs"} == {s.key for s in SCHEMA.sections}


def test_the_minimal_file_of_the_docs_is_valid_with_its_defaults(tmp_path):
    from gateway.config import tomllib
    from gateway.control.signing import generate
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        text = f.read()
    minimal = re.search(r"## The minimal file\s+```toml\n(.*?)```", text, re.S).group(1)
    public = generate(str(tmp_path))[1]
    document = tomllib.loads(minimal.replace("/etc/meter-gateway/headend.pub", public))
    cfg = validate(document, "gw.toml")
    assert isinstance(cfg, Config) and cfg.path == "gw.toml"
    assert cfg.meters[0].address == "000000123456" and cfg.meters[0].port == "rs485-1"
    for section in sections.SECTIONS:
        records = getattr(cfg, section.key)
        record = records[0] if isinstance(records, tuple) else records
        given = document.get(section.key, {})
        given = given[0] if isinstance(given, list) else given
        for f in section.fields:
            if f.name not in given:
                assert getattr(record, f.name) == f.value, (section.key, f.name)
    assert cfg.accounts == () and dict(cfg.tariffs) == {}
    assert cfg.cost_control == billing_settings.COST_CONTROL.default()


# ---------------------------------------------------------------- records

def test_records_are_frozen_slotted_and_copied_with_replace():
    cfg = validate({"gateway": {"id": "g"}, "ports": [{"name": "p", "device": "/dev/null"}],
                    "meters": [{"id": "m1", "port": "p", "address": "7"}]})
    meter = cfg.meters[0]
    assert type(meter).__name__ == "MeterConfig" and type(meter) is sections.MeterConfig
    assert not hasattr(meter, "__dict__")                  # slotted: 1,024 meters stay small
    for record in (cfg, cfg.gateway, cfg.storage, cfg.ports[0], meter, cfg.uplink,
                   cfg.control, cfg.cost_control):
        assert isinstance(record, Record) and not hasattr(record, "__dict__")
        with pytest.raises(AttributeError):
            record.path = "x"
    faster = meter.replace(interval_s=1)
    assert faster.interval_s == 1 and meter.interval_s == 900
    assert meter["address"] == "000000000007" and meter.get("nope", 5) == 5
    assert dict(meter)["protocol"] == "dlt645"
    import pickle
    assert pickle.loads(pickle.dumps(cfg.ports[0])) == cfg.ports[0]


def test_cost_control_sections_are_typed_fields_of_the_configuration():
    cfg = validate({
        "gateway": {"id": "g"}, "ports": [{"name": "p", "device": "/dev/null"}],
        "meters": [{"id": "m1", "port": "p", "address": "1"}],
        "tariffs": {"flat": {"kind": "flat", "price": "0.5283"}},
        "accounts": [{"meter": "m1", "tariff": "flat", "opening_balance": "100.00",
                      "max_kw": 12.5}],
        "cost_control": {"protected_hours": ["22:00-06:00"], "holidays": ["2026-10-01"]}})
    assert isinstance(cfg.tariffs["flat"], Tariff)
    acc = cfg.accounts[0]
    assert type(acc) is billing_settings.AccountConfig
    assert (acc.meter, acc.mode, acc.tariff) == ("m1", "local", "flat")
    assert acc.opening_balance == Decimal("100.00") and acc.alarm1 == Decimal("20.00")
    assert acc.max_kw == Decimal("12.5") and acc.guarantee is False
    pol = cfg.cost_control
    assert pol.protected_ranges == ((22 * 60, 6 * 60),)
    assert [str(d) for d in pol.holiday_dates] == ["2026-10-01"]
    assert pol.notice_s == 86400 and pol.protected_weekends is True


def test_a_tariffs_own_grades_are_checked_in_one_line_each_over_the_gateways():
    base = {"gateway": {"id": "g"}, "ports": [{"name": "p", "device": "/dev/null"}],
            "meters": [{"id": "m1", "port": "p", "address": "1"}]}
    cfg = validate(dict(base, tariffs={"biz": {"kind": "flat", "price": "0.8", "grades": {
        "moderate_amount": "1000.00", "heavy_amount": "5000.00"}}}))
    assert cfg.tariffs["biz"].grades == {"moderate_amount": "1000.00",
                                         "heavy_amount": "5000.00"}
    assert problems(dict(base, tariffs={"biz": {"kind": "flat", "price": "0.8", "grades": {
        "moderate_amont": "1000.00"}}})) == [
        "f.toml: tariffs.biz.grades: moderate_amont: not a grade threshold (light_amount, "
        "light_days, moderate_amount, moderate_days, heavy_amount, heavy_days)"]
    # fine over the defaults, falling over the gateway's own: said once, naming both
    found = problems(dict(base, tariffs={"biz": {"kind": "flat", "price": "0.8", "grades": {
        "moderate_amount": "300.00"}}}, cost_control={"grades": {"heavy_amount": "200.00"}}))
    assert found == ["f.toml: cost_control.grades: with [tariffs.biz.grades]: thresholds "
                     "must not fall from light to moderate to heavy"], found


def test_no_validation_writes_into_the_document():
    document = {"gateway": {"id": "g"}, "ports": [{"name": "p", "device": "/dev/null"}],
                "meters": [{"id": "m1", "port": "p", "address": "1"}],
                "tariffs": {"flat": {"kind": "flat", "price": "0.5"}},
                "accounts": [{"meter": "m1", "tariff": "flat", "opening_balance": "1.00"}]}
    before = copy.deepcopy(document)
    validate(document)
    assert document == before


def test_a_meter_may_have_its_own_baud_rate_and_parity():
    document = {"gateway": {"id": "g"},
                "ports": [{"name": "p", "device": "/dev/null", "baudrate": 2400}],
                "meters": [{"id": "new", "port": "p", "address": "1"},
                           {"id": "old", "port": "p", "address": "2", "version": 1997,
                            "baudrate": 1200, "parity": "E"}]}
    cfg = validate(document)
    new, old = cfg.meters
    assert (new.baudrate, new.parity) == (None, None)            # the port's
    assert (old.baudrate, old.parity) == (1200, "E")
    document["meters"][1].update(baudrate=1234, parity="X")
    found = problems(document)
    assert any(p.startswith("f.toml: meters[1].baudrate:") for p in found), found
    assert any(p.startswith("f.toml: meters[1].parity:") for p in found), found


# ---------------------------------------------------------------- problems

def test_unknown_keys_are_errors_naming_the_key_at_every_level():
    found = problems({"gateway": {"id": "g", "idd": 1}, "gatway": {},
                      "ports": [{"name": "p", "device": "d", "baud": 1}],
                      "meters": [{"id": "m", "port": "p", "address": "1", "adress": "1"}],
                      "uplink": {"hots": "x"}, "control": {"keys": []},
                      "tariffs": {"t": {"kind": "flat", "price": "1", "prise": "1"}},
                      "accounts": [{"meter": "m", "tariff": "t", "opening_balance": "1.00",
                                    "alarm3": "1.00"}],
                      "cost_control": {"notice": 1}})
    for key in ("gateway.idd", "gatway", "ports[0].baud", "meters[0].adress", "uplink.hots",
                "control.keys", "tariffs.t.prise", "accounts[0].alarm3", "cost_control.notice"):
        assert any(p.startswith("f.toml: %s: unknown key" % key) for p in found), (key, found)
    # and the one consequence: the account's tariff is the one that was refused
    assert found[8:9] == ["f.toml: accounts[0].tariff: no tariff 't' (tariffs: none)"]
    assert len(found) == 10, found


def test_public_keys_are_checked_one_by_one(tmp_path):
    from gateway.control.signing import generate
    public = generate(str(tmp_path))[1]
    not_pem = tmp_path / "x.pub"
    not_pem.write_text("hello\n")
    found = problems({"gateway": {"id": "g"}, "control": {
        "public_keys": [5, str(tmp_path / "nope.pub"), str(not_pem), public]}})
    assert found == [
        "f.toml: control.public_keys[0]: must be a path",
        "f.toml: control.public_keys[1]: file not found: %s" % (tmp_path / "nope.pub"),
        "f.toml: control.public_keys[2]: %s: not a PEM public key" % not_pem]


# documents and the problems the validator before the declarations (8fb68b5) reported
# for them: the same lines, in any order
WORDING = [
    ({}, ['f.toml: gateway.id: is required']),
    ({'gateway': 3},
     ['f.toml: gateway: must be a table ([gateway])', 'f.toml: gateway.id: is required']),
    ({'gateway': {'id': 5}}, ['f.toml: gateway.id: must be a string, not 5']),
    ({'gateway': {'id': 'g w'}, 'bogus': 1},
     ['f.toml: bogus: unknown key',
      "f.toml: gateway.id: use letters, digits, '.', '_' or '-' (it appears in topics)"]),
    ({'gateway': {'id': 'g',
                  'log_level': 'loud',
                  'status_interval_s': 0,
                  'data_dir': 3,
                  'x': 1}},
     ['f.toml: gateway.data_dir: must be a string, not 3',
      "f.toml: gateway.log_level: must be one of 'debug', 'info', 'warning', 'error', not "
      "'loud'",
      'f.toml: gateway.status_interval_s: must be at least 1, not 0.0',
      'f.toml: gateway.x: unknown key']),
    ({'gateway': {'id': 'g', 'status_interval_s': True}},
     ['f.toml: gateway.status_interval_s: must be a number, not True']),
    ({'gateway': {'id': 'g'},
      'storage': {'journal_quota_mb': 0.5, 'reserve_mb': -1, 'recover_state': 'no', 'y': 2}},
     ['f.toml: storage.journal_quota_mb: must be at least 1, not 0.5',
      'f.toml: storage.reserve_mb: must be at least 0, not -1.0',
      "f.toml: storage.recover_state: must be true or false, not 'no'",
      'f.toml: storage.y: unknown key']),
    ({'gateway': {'id': 'g'}, 'storage': 4}, ['f.toml: storage: must be a table ([storage])']),
    ({'gateway': {'id': 'g'}, 'ports': 1},
     ['f.toml: ports: must be a list of tables ([[ports]])']),
    ({'gateway': {'id': 'g'}, 'ports': [1, {'name': 1, 'device': []}]},
     ['f.toml: ports[0]: must be a table',
      'f.toml: ports[1].name: must be a string, not 1',
      'f.toml: ports[1].device: must be a string, not []']),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p',
                 'device': 'd',
                 'baudrate': 1234,
                 'parity': 'X',
                 'bytesize': 9,
                 'stopbits': 3,
                 'retries': 6,
                 'settle_ms': -1,
                 'offline_after': 0,
                 'z': 1},
                {'name': 'p', 'device': 'e'}]},
     ['f.toml: ports[0].baudrate: must be one of 600, 1200, 2400, 4800, 9600, 19200, 38400, '
      '57600, 115200, not 1234',
      "f.toml: ports[0].parity: must be one of 'E', 'N', 'O', not 'X'",
      'f.toml: ports[0].bytesize: must be one of 7, 8, not 9',
      'f.toml: ports[0].stopbits: must be one of 1, 2, not 3',
      'f.toml: ports[0].retries: must be at most 5, not 6',
      'f.toml: ports[0].settle_ms: must be at least 0, not -1',
      'f.toml: ports[0].offline_after: must be at least 1, not 0',
      'f.toml: ports[0].z: unknown key',
      "f.toml: ports[1].name: duplicate port name 'p'"]),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': 'd', 'retries': 2.5, 'settle_ms': 2001}]},
     ['f.toml: ports[0].retries: must be a whole number, not 2.5',
      'f.toml: ports[0].settle_ms: must be at most 2000, not 2001']),
    ({'gateway': {'id': 'g'}, 'meters': ['a']}, ['f.toml: meters[0]: must be a table']),
    ({'gateway': {'id': 'g'}, 'meters': 5},
     ['f.toml: meters: must be a list of tables ([[meters]])']),
    ({'gateway': {'id': 'g'}, 'meters': [{'id': 'm', 'port': 'x', 'address': 12}]},
     ['f.toml: meters[0].address: must be a string, not 12',
      "f.toml: meters[0].port: no port named 'x' (ports: none)"]),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': '/dev/null'}],
      'meters': [{'id': 'm 1', 'port': 'p', 'address': '12AB'}, {'id': 'm 1', 'port': 'p'}]},
     ["f.toml: meters[0].id: use letters, digits, '.', '_' or '-'",
      'f.toml: meters[0].address: a DL/T 645 address is up to 12 digits as on the nameplate, '
      "not '12AB'",
      'f.toml: meters[1].address: is required',
      "f.toml: meters[1].id: duplicate meter id 'm 1'",
      "f.toml: meters[1].id: use letters, digits, '.', '_' or '-'"]),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': '/dev/null'}],
      'meters': [{'id': 'm1', 'port': 'p', 'address': '1'},
                 {'id': 'm2', 'port': 'p', 'address': '000000000001'},
                 {'id': 'm3', 'port': 'p', 'address': '1', 'protocol': 'modbus'},
                 {'id': 'm4', 'port': 'p', 'address': '1', 'protocol': 'iec'}]},
     ['f.toml: meters[1].address: two meters with address 000000000001 on port p',
      'f.toml: meters[2].unit: is required',
      'f.toml: meters[2].profile: is required',
      "f.toml: meters[3].protocol: must be one of 'dlt645', 'modbus', 'dlt698', not 'iec'",
      'f.toml: meters[3].address: two meters with address 000000000001 on port p']),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': '/dev/null'}],
      'meters': [{'id': 'm1',
                  'port': 'p',
                  'address': '1',
                  'version': 2000,
                  'unit': 0,
                  'profile': 'x',
                  'interval_s': 5,
                  'instant_interval_s': -1,
                  'clock_interval_s': -2,
                  'prepaid': 1,
                  'password': '12',
                  'password_level': 200,
                  'operator_code': 'zz',
                  'secured': 'y',
                  'relay_valid_s': 10,
                  'q': 1}]},
     ['f.toml: meters[0].version: must be one of 2007, 1997, not 2000',
      'f.toml: meters[0].unit: must be at least 1, not 0',
      "f.toml: meters[0].profile: must be one of 'chint-ddsu666', 'eastron-sdm120', not 'x'",
      'f.toml: meters[0].interval_s: must be at least 10, not 5',
      'f.toml: meters[0].instant_interval_s: must be at least 0, not -1',
      'f.toml: meters[0].clock_interval_s: must be at least 0, not -2',
      'f.toml: meters[0].prepaid: must be true or false, not 1',
      'f.toml: meters[0].password_level: must be at most 152, not 200',
      "f.toml: meters[0].secured: must be true or false, not 'y'",
      'f.toml: meters[0].relay_valid_s: must be at least 30, not 10',
      'f.toml: meters[0].q: unknown key',
      'f.toml: meters[0].password: a meter password is 6 digits',
      'f.toml: meters[0].operator_code: an operator code is 8 hex digits']),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': '/dev/null'}],
      'meters': [{'id': 'm1',
                  'port': 'p',
                  'address': '1',
                  'password': 123456,
                  'operator_code': 5,
                  'relay_valid_s': 4000}]},
     ['f.toml: meters[0].password: must be a string, not 123456',
      'f.toml: meters[0].operator_code: must be a string, not 5',
      'f.toml: meters[0].relay_valid_s: must be at most 3600, not 4000']),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': '/dev/null'}],
      'meters': [{'id': 'm1',
                  'port': 'p',
                  'protocol': 'modbus',
                  'unit': 300,
                  'profile': 'eastron-sdm120'}]},
     ['f.toml: meters[0].unit: must be at most 247, not 300']),
    ({'gateway': {'id': 'g'}, 'uplink': {'port': '1883', 'tls_cert': '/nope'}},
     ["f.toml: uplink.port: must be a whole number, not '1883'",
      'f.toml: uplink.tls_key: tls_cert and tls_key go together',
      'f.toml: uplink.tls_cert: file not found: /nope']),
    ({'gateway': {'id': 'g'}, 'uplink': 5}, ['f.toml: uplink: must be a table ([uplink])']),
    ({'gateway': {'id': 'g'},
      'uplink': {'host': 'h',
                 'port': 0,
                 'topic_root': 'a/+',
                 'mqtt_version': '4',
                 'tls': 'yes',
                 'keepalive_s': 1,
                 'session_expiry_s': -1,
                 'batch_max': 0,
                 'batch_age_s': 'x',
                 'inflight_max': 1001,
                 'health_interval_s': 5,
                 'reconnect_max_s': 0.5,
                 'w': 1}},
     ['f.toml: uplink.port: must be at least 1, not 0',
      "f.toml: uplink.mqtt_version: must be one of '5', '3.1.1', not '4'",
      "f.toml: uplink.tls: must be true or false, not 'yes'",
      'f.toml: uplink.keepalive_s: must be at least 5, not 1',
      'f.toml: uplink.session_expiry_s: must be at least 0, not -1',
      'f.toml: uplink.batch_max: must be at least 1, not 0',
      "f.toml: uplink.batch_age_s: must be a number, not 'x'",
      'f.toml: uplink.inflight_max: must be at most 1000, not 1001',
      'f.toml: uplink.health_interval_s: must be at least 10, not 5',
      'f.toml: uplink.reconnect_max_s: must be at least 1, not 0.5',
      'f.toml: uplink.w: unknown key',
      'f.toml: uplink.topic_root: must be a topic prefix such as "mgw/v1" (not empty, no '
      "'+', '#' or NUL, not starting with '$'), not 'a/+'"]),
    ({'gateway': {'id': 'g'}, 'uplink': {'host': 'h', 'username': 'u', 'password': 'p'}},
     ['f.toml: uplink.password: would travel in clear: set tls = true (or tls_ca), or '
      'allow_insecure = true for a link that needs no protection']),
    ({'gateway': {'id': 'g'}, 'uplink': {'topic_root': ''}},
     ['f.toml: uplink.topic_root: must be a topic prefix such as "mgw/v1" (not empty, no '
      "'+', '#' or NUL, not starting with '$'), not ''"]),
    ({'gateway': {'id': 'g'}, 'uplink': {'topic_root': 5}},
     ['f.toml: uplink.topic_root: must be a string, not 5']),
    ({'gateway': {'id': 'g'}, 'control': {'public_keys': 'k.pub'}},
     ["f.toml: control.public_keys: must be a list, not 'k.pub'"]),
    ({'gateway': {'id': 'g'}, 'control': 7}, ['f.toml: control: must be a table ([control])']),
    ({'gateway': {'id': 'g'}, 'tariffs': {'t': {'kind': 'tou', 'prices': {'peak': 1}}}},
     ['f.toml: tariffs.t.prices.peak: a decimal string such as "0.5283"']),
    ({'gateway': {'id': 'g'},
      'tariffs': {'t': {'kind': 'tiered', 'price': '0.5', 'ladder': [{'upto_kwh': 'x'}]}}},
     ["f.toml: tariffs.t.ladder[0].upto_kwh: not a decimal number: 'x'"]),
    ({'gateway': {'id': 'g'}, 'tariffs': {'t': 5}}, ['f.toml: tariffs.t: must be a table']),
    ({'gateway': {'id': 'g'}, 'accounts': [{'meter': 3, 'opening_balance': 1.5}]},
     ['f.toml: accounts[0].meter: no meter 3',
      'f.toml: accounts[0].tariff: no tariff None (tariffs: none)',
      'f.toml: accounts[0].opening_balance: must be a decimal string such as "10.00" (money '
      'is never a float)']),
    ({'gateway': {'id': 'g'}, 'accounts': 7, 'tariffs': 2, 'cost_control': 'x'},
     ['f.toml: tariffs: must be tables [tariffs.NAME]',
      'f.toml: accounts: must be a list of tables ([[accounts]])',
      'f.toml: cost_control: must be a table']),
    ({'gateway': {'id': 'g'}, 'cost_control': {'protected_hours': ['25:00-26:00']}},
     ['f.toml: cost_control.protected_hours: a list of "HH:MM-HH:MM"']),
    ({'gateway': {'id': 'g'},
      'cost_control': {'protected_hours': 'x',
                       'holidays': ['2020-13-01'],
                       'notice_s': -1,
                       'protected_weekends': 1,
                       'breaker_max_share': True,
                       'zz': 1}},
     ["f.toml: cost_control.protected_hours: must be a list of strings, not 'x'",
      'f.toml: cost_control.notice_s: must be a number >= 0, not -1',
      'f.toml: cost_control.protected_weekends: must be true or false, not 1',
      'f.toml: cost_control.breaker_max_share: must be a number >= 0, not True',
      'f.toml: cost_control.zz: unknown key',
      'f.toml: cost_control.holidays: a list of "YYYY-MM-DD"']),
    ({'gateway': {'id': 'g'}, 'cost_control': {'holidays': [5], 'notice_s': 0.5}},
     ['f.toml: cost_control.holidays: must be a list of strings, not [5]']),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': '/dev/null'}],
      'meters': [{'id': 'm1', 'port': 'p', 'address': '1'},
                 {'id': 'm2', 'port': 'p', 'address': '2'}],
      'tariffs': {'flat': {'kind': 'flat', 'price': '0.5'}},
      'accounts': [{'meter': 'm1', 'tariff': 'flat', 'opening_balance': '1e400'},
                   {'meter': 'm1',
                    'tariff': 'nope',
                    'mode': 'x',
                    'opening_balance': '10.001',
                    'alarm1': 5,
                    'alarm2': '30.00',
                    'overdraft_limit': '-1',
                    'restore_threshold': '1.00',
                    'max_kw': 'abc',
                    'guarantee': 'no',
                    'extra': 1},
                   {'meter': 'm9', 'tariff': 'flat'},
                   5,
                   {'meter': 'm2',
                    'tariff': 'flat',
                    'opening_balance': '1.00',
                    'alarm1': '5.00',
                    'alarm2': '6.00',
                    'max_kw': True,
                    'mode': 3}]},
     ['f.toml: accounts[0].opening_balance: yuan with at most 6 digits and 2 decimals, such '
      'as "10.00", not \'1e400\'',
      'f.toml: accounts[1].extra: unknown key',
      'f.toml: accounts[1].meter: a second account for meter m1',
      "f.toml: accounts[1].mode: local or remote, not 'x'",
      "f.toml: accounts[1].tariff: no tariff 'nope' (tariffs: flat)",
      'f.toml: accounts[1].opening_balance: yuan with at most 6 digits and 2 decimals, such '
      'as "10.00", not \'10.001\'',
      'f.toml: accounts[1].alarm1: must be a decimal string such as "10.00" (money is never a '
      'float)',
      'f.toml: accounts[1].overdraft_limit: yuan with at most 6 digits and 2 decimals, such '
      'as "10.00", not \'-1\'',
      'f.toml: accounts[1].max_kw: a number of kW',
      'f.toml: accounts[1].guarantee: true or false',
      "f.toml: accounts[2].meter: no meter 'm9'",
      'f.toml: accounts[2].opening_balance: is required',
      'f.toml: accounts[3]: must be a table',
      'f.toml: accounts[4].mode: local or remote, not 3',
      'f.toml: accounts[4].max_kw: a number of kW',
      'f.toml: accounts[4].alarm2: must not be above alarm1']),
    ({'gateway': {'id': 'g'},
      'ports': [{'name': 'p', 'device': '/dev/null'}],
      'meters': [{'id': 'm1', 'port': 'p', 'address': '1'}],
      'tariffs': {'flat': {'kind': 'flat', 'price': '0.5'}},
      'accounts': [{'meter': 'm1',
                    'tariff': 'flat',
                    'opening_balance': '1.00',
                    'max_kw': 12.5}]},
     []),
]


@pytest.mark.parametrize("document, expected", WORDING)
def test_every_problem_at_once_in_the_same_words_as_before(document, expected):
    found = problems(document)
    assert sorted(found) == sorted(expected)
    assert all("\n" not in p for p in found)
