"""Is the gateway's own clock trustworthy? (NTP/chrony/systemd-timesyncd synchronised)

The kernel knows: adjtimex() reports TIME_ERROR / STA_UNSYNC until a time daemon has
disciplined the clock since boot. Readings taken while it is not are flagged
`clock_untrusted`, no broadcast time sync is sent, and no cut-off is made.
"""

import ctypes
import os
import time

STA_UNSYNC = 0x0040
TIME_ERROR = 5


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("constant", ctypes.c_long),
                ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long),
                ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("pad", ctypes.c_int * 11)]


_libc = []


def libc():
    if not _libc:
        # the C library is already in the process: dlopen(NULL) finds its symbols without
        # ctypes.util.find_library (which may run a subprocess)
        _libc.append(ctypes.CDLL(None, use_errno=True))
    return _libc[0]


def _adjtimex():
    return libc().adjtimex


def system_clock_synchronised():
    """True when the kernel says a time daemon keeps the clock in sync."""
    if os.path.exists("/run/systemd/timesync/synchronized"):
        return True
    try:
        tx = _Timex()
        state = _adjtimex()(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False
    if state < 0:
        return False            # cannot tell (e.g. filtered by seccomp): do not trust
    return state != TIME_ERROR and not tx.status & STA_UNSYNC


class ClockPolicy:
    """Whether to trust the gateway clock: the kernel's word, unless configured otherwise
    (`[control] require_synced_clock = false` on boxes without NTP). Asked for every
    reading batch, so the answer is kept for a few seconds."""

    def __init__(self, require_synced=True, probe=system_clock_synchronised, cache_s=5.0):
        self.require_synced = require_synced
        self._probe = probe
        self._cache_s = cache_s
        self._last = (None, 0.0)

    def trusted(self):
        if not self.require_synced:
            return True
        value, at = self._last
        now = time.monotonic()
        if value is None or now - at > self._cache_s:
            value = bool(self._probe())
            self._last = (value, now)
        return value


# Meters freeze their registers on the hour and at midnight: a time sync within this many
# minutes of the hour could move a freeze across it (DESIGN.md, "Clocks").
SYNC_GUARD_MIN = 5


def near_the_hour(now):
    """True within SYNC_GUARD_MIN minutes either side of a full hour (local time)."""
    return now.minute >= 60 - SYNC_GUARD_MIN or now.minute < SYNC_GUARD_MIN


def rfc3339(seconds, timespec="milliseconds"):
    """Unix seconds (a float) as RFC 3339 with the gateway's UTC offset, as every payload,
    status.json and the audit trail write times; None stays None."""
    if seconds is None:
        return None
    import datetime as _dt
    return _dt.datetime.fromtimestamp(seconds).astimezone().isoformat(timespec=timespec)
