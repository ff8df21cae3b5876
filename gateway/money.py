"""Money as the gateway keeps it: yuan as decimal strings with at most two places on the
outside, integer micro-yuan inside. One parser for every place money comes in (commands,
configuration, head-end updates), so a value accepted in one is accepted in all."""

import re
from decimal import Decimal

# ASCII digits only: str.isdigit() and Decimal() also take Arabic-Indic and other digits,
# exponents ("1e5"), underscores ("1_0.00") and spaces, none of which a payment system sends
_YUAN = re.compile(r"[0-9]{1,6}(\.[0-9]{1,2})?", re.ASCII)
MAX_YUAN = Decimal("999999.99")


def parse_yuan(value):
    """Decimal yuan from a string such as "10.00"; ValueError (one line) otherwise."""
    if not isinstance(value, str):
        raise ValueError("must be a decimal string such as \"10.00\" (money is never a float)")
    if not _YUAN.fullmatch(value):
        raise ValueError("yuan with at most 6 digits and 2 decimals, such as \"10.00\", "
                         "not %r" % value[:32])
    return Decimal(value)
