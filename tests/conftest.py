import importlib
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("MGW_SHARED", ROOT.parent / "shared"))


def _implementations():
    impls = [("python", "protocols._pyframing")]
    try:
        importlib.import_module("protocols._speedups")
        impls.insert(0, ("compiled", "protocols._speedups"))
    except ImportError:
        if os.environ.get("MGW_REQUIRE_COMPILED") == "1":
            raise RuntimeError("MGW_REQUIRE_COMPILED=1 but protocols._speedups is not built")
    return impls


IMPLEMENTATIONS = _implementations()


@pytest.fixture(params=[name for name, _ in IMPLEMENTATIONS])
def impl(request):
    """The frame layer's hot path: each test runs over the compiled module and its twin."""
    return importlib.import_module(dict(IMPLEMENTATIONS)[request.param])


@pytest.fixture
def vectors_path():
    path = SHARED / "vectors" / "dlt645-captures.json"
    if not path.exists():
        pytest.skip("shared vectors not found at %s (set MGW_SHARED)" % path)
    return path
