"""Reading meters now, for the technician's tools (`mgw read`, `mgw scan`) and for commands,
whatever their protocol: each meter's driver (gateway.registry) does the protocol's part."""

import functools
import importlib

from gateway.model import GatewayError, TxError
from gateway.registry import DEFAULT_PROTOCOL, PROTOCOLS


class UnknownQuantity(GatewayError, ValueError):
    """A quantity name this meter cannot be asked for (one line)."""


class ReadError(str):
    """One failed quantity of a read, for people (the text) and for programs: `code` is the
    line's TxError when the meter gave no usable answer, None when the meter answered with
    an error of its own (`flags`, such as no_data: it is there, it has no such value)."""

    def __new__(cls, text, code=None, flags=()):
        self = super().__new__(cls, text)
        self.code = code
        self.flags = tuple(flags)
        return self


# a read stops at the first of these while the meter has not answered at all: one timeout
# is enough to say it does not answer, the technician should not wait for every quantity
SILENT = (TxError.NO_ANSWER, TxError.GARBLED, TxError.PORT_CLOSED, TxError.STOPPING)


@functools.lru_cache(maxsize=None)
def driver(name=DEFAULT_PROTOCOL):
    """The driver module of a protocol named in the registry."""
    return importlib.import_module(PROTOCOLS[name].driver)


def driver_of(meter):
    return driver(meter.protocol)


def time_sync_frame(meter, when):
    """The meter's own protocol's broadcast time-sync frame; GatewayError (one line) for a
    protocol whose driver sets no clock (Modbus meters here)."""
    make = getattr(driver_of(meter), "time_sync_frame", None)
    if make is None:
        raise GatewayError("meter %s (%s) has no clock the gateway can set"
                           % (meter.id, PROTOCOLS[meter.protocol].label))
    return make(when)


def read_now(worker, meter, quantities=()):
    """Reads a meter through a worker (on the calling thread): (values, errors)."""
    return driver_of(meter).read_now(worker, meter, quantities)


def check_quantities(meter, quantities):
    """UnknownQuantity if one of the names cannot be read from this meter."""
    driver_of(meter).check_quantities(meter, quantities)


def suggested_address_id(found):
    """A meter id for `mgw scan --toml`, for meters found by address: m and the address
    without its leading zeros."""
    return "m%s" % (found["address"].lstrip("0") or "0")


def has_relay(meter):
    return driver_of(meter).HAS_RELAY


def scan(worker, protocol, progress, **options):
    """Meters found on a line: [{"address": ...} or {"unit": ..., "profile": ...}]."""
    return driver(protocol).scan(worker, progress, **options)
