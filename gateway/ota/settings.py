"""The [ota] section of the configuration file, declared as data (docs/deploy.md's table is
made from it)."""

from gateway.config import NUMBER, ListOf, Table, Field

_STRINGS = ListOf(str, "must be a list of strings, not %r", "list of strings")


def _installer(value):
    if not value:
        return "must name a program"
    if not any("{package}" in v for v in value):
        return "must contain \"{package}\" where the package's path goes"
    return None


OTA = Table("ota", "OtaSettings", [
    Field("enabled", bool, True, doc="`false`: every `software_update` is rejected"),
    Field("installer", _STRINGS, ["dpkg", "-i", "{package}"], check=_installer,
          doc="the program and arguments that install a package (`{package}`: its path); "
              "it may restart the service; run in its own session so that it outlives it"),
    Field("privileged_installer", _STRINGS, ["dpkg", "-i", "--force-confold", "{package}"],
          check=_installer,
          doc="what `mgw ota install-requested` (run as root by meter-gateway-update.service) "
              "runs on a package it has checked against the head-end's signature"),
    Field("installer_timeout_s", NUMBER, 600, minimum=1,
          doc="an installer still running after this long has failed; once it ends, the "
              "service must be restarted (by it, or by the package it installed) within "
              "this long too"),
    Field("health_timeout_s", NUMBER, 180, minimum=1,
          doc="the new version must be healthy (started, every line open, uplink "
              "connected) within this long, or the previous package is reinstalled"),
    Field("arch", str, None, doc_default="`dpkg --print-architecture`",
          doc="the Debian architecture packages must be built for"),
    Field("max_package_mb", NUMBER, 64, minimum=1, doc="larger packages are refused"),
    Field("window", int, 4, minimum=1, maximum=16,
          doc="chunks requested ahead (each at most 64 KiB in memory)"),
    Field("pace_ms", int, 20, minimum=0, maximum=10000,
          doc="pause after each chunk, so readings and commands keep their share of "
              "the connection"),
    Field("chunk_timeout_s", NUMBER, 10, minimum=1,
          doc="a chunk not received this long after it was asked for is asked for again"),
], shape="must be a table")

SECTIONS = (OTA,)

OtaSettings = OTA.record
OtaSettings.__module__ = __name__
