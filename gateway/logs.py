"""Logging for the service and the command line: one short line per record on stderr
(journald adds the time and the unit)."""

import logging
import sys


def setup_logging(level="info"):
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
