"""Reading meters now, for the technician's tools (`mgw read`, `mgw scan`) and for commands,
whatever their protocol: each meter's driver (gateway.registry) does the protocol's part."""

import functools
import importlib

from gateway.model import GatewayError
from gateway.registry import DEFAULT_PROTOCOL, PROTOCOLS


class UnknownQuantity(GatewayError, ValueError):
    """A quantity name this meter cannot be asked for (one line)."""


@functools.lru_cache(maxsize=None)
def driver(name=DEFAULT_PROTOCOL):
    """The driver module of a protocol named in the registry."""
    return importlib.import_module(PROTOCOLS[name])


def driver_of(meter):
    return driver(meter.protocol)


def read_now(worker, meter, quantities=()):
    """Reads a meter through a worker (on the calling thread): (values, errors)."""
    return driver_of(meter).read_now(worker, meter, quantities)


def check_quantities(meter, quantities):
    """UnknownQuantity if one of the names cannot be read from this meter."""
    driver_of(meter).check_quantities(meter, quantities)


def has_relay(meter):
    return driver_of(meter).HAS_RELAY


def scan(worker, protocol, progress, **options):
    """Meters found on a line: [{"address": ...} or {"unit": ..., "profile": ...}]."""
    return driver(protocol).scan(worker, progress, **options)
