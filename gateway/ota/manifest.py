"""A software update's manifest (the `params` of a signed `software_update` command) and the
rules that refuse one. Pure: no files, no clock.

    {"name": "meter-gateway", "version": "0.2.0-1", "arch": "armhf", "size": 7340032,
     "sha256": "<64 hex>", "chunk_size": 32768, "allow_downgrade": false}
"""

import re

PACKAGE_NAME = "meter-gateway"
MAX_CHUNK = 65536                # one chunk in memory at a time, well below MQTT's limits
MIN_CHUNK = 1024
DEFAULT_CHUNK = 32768

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Debian policy 5.6.12: [epoch:]upstream[-revision]
_VERSION = re.compile(r"(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*")
_ARCH = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


class Manifest:
    __slots__ = ("name", "version", "arch", "size", "sha256", "chunk_size",
                 "allow_downgrade")

    def __init__(self, name, version, arch, size, sha256, chunk_size=DEFAULT_CHUNK,
                 allow_downgrade=False):
        self.name, self.version, self.arch = name, version, arch
        self.size, self.sha256, self.chunk_size = size, sha256, chunk_size
        self.allow_downgrade = allow_downgrade

    @property
    def chunks(self):
        return (self.size + self.chunk_size - 1) // self.chunk_size

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


class BadManifest(ValueError):
    """The manifest is malformed (one line for the command's result)."""


def parse(params):
    """The Manifest of a command's params, or BadManifest naming the field."""
    if not isinstance(params, dict):
        raise BadManifest("software_update: params must be the manifest object")
    unknown = sorted(set(params) - set(Manifest.__slots__))
    if unknown:
        raise BadManifest("software_update: unknown manifest field %s" % unknown[0][:32])
    name = params.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9+.-]{0,63}", name):
        raise BadManifest("software_update: name must be a Debian package name")
    version = params.get("version")
    if not isinstance(version, str) or len(version) > 64 or not _VERSION.fullmatch(version) \
            or version.endswith("-"):
        raise BadManifest("software_update: version must be a Debian version, e.g. 0.2.0-1")
    arch = params.get("arch")
    if not isinstance(arch, str) or not _ARCH.fullmatch(arch):
        raise BadManifest("software_update: arch must be a Debian architecture, e.g. armhf")
    size = params.get("size")
    if type(size) is not int or size <= 0:
        raise BadManifest("software_update: size must be the package's size in bytes")
    sha = params.get("sha256")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise BadManifest("software_update: sha256 must be 64 lower-case hex digits")
    chunk = params.get("chunk_size", DEFAULT_CHUNK)
    if type(chunk) is not int or not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise BadManifest("software_update: chunk_size is %d to %d bytes"
                          % (MIN_CHUNK, MAX_CHUNK))
    down = params.get("allow_downgrade", False)
    if not isinstance(down, bool):
        raise BadManifest("software_update: allow_downgrade must be true or false")
    return Manifest(name, version, arch, size, sha, chunk, down)


def refusal(m, *, running, arch, max_bytes):
    """Why this gateway will not take the package (text), or None."""
    if m.name != PACKAGE_NAME:
        return "package %s is not %s" % (m.name, PACKAGE_NAME)
    if m.arch not in (arch, "all"):
        return "package is for %s, this gateway is %s" % (m.arch, arch)
    if m.size > max_bytes:
        return "package of %d bytes is larger than [ota] max_package_mb" % m.size
    order = order_to_running(m.version, running)
    if order == 0:
        return "version %s is already running" % m.version
    return downgrade_refusal(m, running)


def downgrade_refusal(m, running):
    """Why a package older than `running` may not go in (text), or None."""
    if order_to_running(m.version, running) < 0 and not m.allow_downgrade:
        return "version %s is older than the running %s (downgrade not allowed)" % (
            m.version, running)
    return None


def order_to_running(version, running):
    """<0, 0, >0 as a package's version sorts before, with, after the running one."""
    # the running gateway knows its upstream version (gateway.__version__), not the
    # package's Debian revision: then the revision does not count
    v = version if "-" in running else _split(version)[1]
    if ":" in version and "-" not in running:
        v = version.split(":", 1)[0] + ":" + v
    return compare(v, running)


# ---------------------------------------------------------------- Debian version order

def _order(c):
    # dpkg's lib/dpkg/version.c: ~ sorts before everything, even the end of the string;
    # letters before non-letters
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a, b):
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split(v):
    epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def compare(a, b):
    """<0, 0, >0 as Debian version a sorts before, with, after b (dpkg --compare-versions)."""
    ea, ua, ra = _split(a)
    eb, ub, rb = _split(b)
    if ea != eb:
        return ea - eb
    return _compare_part(ua, ub) or _compare_part(ra, rb)
