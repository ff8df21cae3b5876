"""The installed package: console script, module entry point, implementation choice."""

import os
import re
import shutil
import subprocess
import sys

import pytest

import gateway


def run(args, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run(args, capture_output=True, text=True, env=e, timeout=60)


def test_mgw_console_script_prints_version():
    mgw = shutil.which("mgw") or os.path.join(os.path.dirname(sys.executable), "mgw")
    if not os.path.exists(mgw):
        pytest.skip("mgw console script not installed in this environment")
    r = run([mgw, "--version"])
    # issue 14: the version says which frame parser runs
    assert r.returncode == 0 and re.match(r"mgw %s \(frame parser: (compiled|python)\)$"
                                          % re.escape(gateway.__version__), r.stdout.strip())


def test_a_half_built_parser_says_which_half_is_python():
    from protocols import framing
    if framing.IMPLEMENTATION != "compiled":
        pytest.skip("the compiled scanner is not built here")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['protocols._apdu698'] = None; "
            "from gateway.cli.main import version_line; print(version_line())")
    r = run([sys.executable, "-c", code], PYTHONPATH=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("(frame parser: compiled, DL/T 698.45 reader python)")


def test_module_entry_point_lists_subcommands():
    r = run([sys.executable, "-m", "gateway"])
    assert r.returncode == 0
    for name in ("run", "demo", "simulate", "scan", "read", "relay", "status", "buffer"):
        assert "\n  %s " % name in r.stdout


@pytest.mark.parametrize("value, expected", [("1", "python"), ("", None)])
def test_implementation_is_chosen_at_import(value, expected):
    r = run([sys.executable, "-c", "import protocols.framing as f; print(f.IMPLEMENTATION)"],
            MGW_PURE_PYTHON=value)
    got = r.stdout.strip()
    if expected is None:
        try:
            import protocols._speedups  # noqa: F401
            expected = "compiled"
        except ImportError:
            expected = "python"
    assert got == expected


def test_unknown_subcommand_is_a_usage_error():
    r = run([sys.executable, "-m", "gateway", "frobnicate"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
