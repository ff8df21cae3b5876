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


# ---------------------------------------------------------------- a real Mosquitto broker

import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary():
    for path in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if path and os.path.exists(path):
            return path
    return None


class Broker:
    """A Mosquitto broker on a free loopback port, stoppable and restartable."""

    def __init__(self, tmp_path, extra_conf="", persistence=False):
        self.binary = mosquitto_binary()
        if self.binary is None:
            raise RuntimeError("mosquitto is not installed (scripts/test installs it)")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.conf = tmp_path / ("mosquitto-%d.conf" % self.port)
        store = tmp_path / ("mosquitto-%d-db" % self.port)
        store.mkdir(exist_ok=True)
        persist = "persistence true\npersistence_location %s/\nautosave_interval 1\n" % store \
            if persistence else "persistence false\n"
        self.conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\n"
                             "%smax_queued_messages 100000\n%s%s"
                             % (self.port, persist, extra_conf,
                                # as root, mosquitto drops to user mosquitto, who cannot
                                # read the test's private temp files
                                "user root\n" if os.geteuid() == 0 else ""))
        self.proc = None
        self.log = tmp_path / ("mosquitto-%d.log" % self.port)

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        end = time.time() + 10
        while time.time() < end:
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start: %s" % self.log.read_text()[-500:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()
