"""Logging for the service and the command line: one short line per record on stderr
(journald adds the time and the unit), and the last lines kept in memory for the head-end's
`logs` command (bounded: RECENT_LINES)."""

import collections
import logging
import sys
import time

RECENT_LINES = 500
MAX_LINE = 300                  # characters of one line kept (the message, truncated)
_recent = collections.deque(maxlen=RECENT_LINES)


class _Recent(logging.Handler):
    def emit(self, record):
        try:
            line = "%s %s %s: %s" % (
                time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.created)),
                record.levelname, record.name, record.getMessage())
        except Exception:              # a bad format string must not break logging
            return
        _recent.append((record.levelno, line[:MAX_LINE]))


def setup_logging(level="info"):
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    root = logging.getLogger()
    if not any(isinstance(h, _Recent) for h in root.handlers):
        root.addHandler(_Recent())


def recent_lines(n, level="info"):
    """The last n lines at `level` or above, oldest first."""
    floor = getattr(logging, str(level).upper(), logging.INFO)
    lines = [line for lvl, line in list(_recent) if lvl >= floor]
    return lines[-n:] if n > 0 else []
