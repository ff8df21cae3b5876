"""`mgw command sign` builds any command the head-end could send: KEY:=JSON for tables,
lists, numbers and booleans (an account_update's grades, a config_update's patch)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    p = subprocess.run([sys.executable, "-m", "gateway"] + list(args), capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    return p.returncode, p.stdout, p.stderr


def test_nested_params_are_signed_as_json_and_bad_json_is_one_line(tmp_path):
    code, out, err = run("keys", "gen", "--out", str(tmp_path / "k"), "--json")
    key = json.loads(out)["private_key"]
    code, out, err = run("command", "sign", "--key", key, "--meter", "m1",
                         "--action", "account_update", "--param", "debt=300.00",
                         "--param", 'grades:={"heavy_amount": "800.00", "heavy_days": 60}',
                         "--param", "recovery_rate=0.30")
    assert code == 0, err
    cmd = json.loads(out)
    assert cmd["params"] == {"debt": "300.00", "recovery_rate": "0.30",
                             "grades": {"heavy_amount": "800.00", "heavy_days": 60}}
    sys.path.insert(0, ROOT)
    from gateway.control.signing import load_public_key, verify
    pub = load_public_key(str(tmp_path / "k" / "headend.pub"))
    assert verify(cmd, [pub]) is None
    code, out, err = run("command", "sign", "--key", key, "--meter", "m1",
                         "--action", "account_update", "--param", "grades:={heavy")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "--param grades: not JSON" in err and "Traceback" not in err
