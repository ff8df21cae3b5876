"""The command line in the technician's language: gettext catalogues of the domain `mgw`
under gateway/locale/<lang>/LC_MESSAGES/ (the .po is the source, kept with the code; the .mo
is compiled from it by Babel when the package is built: setup.py, setup.cfg).

English is the source and the default; `LANGUAGE`, `LC_ALL`, `LC_MESSAGES` or `LANG` set to
zh_CN (zh_CN.UTF-8, ...) picks Chinese, as every gettext program does. argparse's own words
(usage, options, "show this help message") are looked up in the same catalogue, since
argparse asks gettext's current domain, which `install()` sets to ours.

Meter ids, keys, quantities, addresses and values are never translated: they are what the
configuration and the head-end use.
"""

import gettext
import os
import unicodedata

DOMAIN = "mgw"
LOCALE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "locale")

_catalogue = None


def catalogue():
    global _catalogue
    if _catalogue is None:
        _catalogue = gettext.translation(DOMAIN, LOCALE_DIR, fallback=True)
    return _catalogue


def install():
    """Reads the language from the environment again (a test may change it) and makes the
    catalogue argparse's too."""
    global _catalogue
    _catalogue = None
    gettext.bindtextdomain(DOMAIN, LOCALE_DIR)
    gettext.textdomain(DOMAIN)
    return catalogue()


def _(message):
    return catalogue().gettext(message)


def ngettext(singular, plural, n):
    return catalogue().ngettext(singular, plural, n)


def pgettext(context, message):
    """A word that means different things in two places ('unit' of a value, Modbus unit)."""
    return catalogue().pgettext(context, message)


def N_(message):
    """Marks a message for the catalogue where it is translated later (argparse's words)."""
    return message


def width(text):
    """Columns a text takes on a terminal: Chinese characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def ljust(text, columns):
    return text + " " * max(0, columns - width(text))


# argparse's own words (Python 3.9-3.13), so that Babel extracts them into our catalogue
ARGPARSE = (N_("usage: "), N_("positional arguments"), N_("options"),
            N_("optional arguments"), N_("show this help message and exit"),
            N_("show program's version number and exit"),
            N_("the following arguments are required: %s"),
            N_("unrecognized arguments: %s"), N_("%(prog)s: error: %(message)s\n"),
            N_("invalid choice: %(value)r (choose from %(choices)s)"),
            N_("argument %(argument_name)s: %(message)s"),
            N_("expected one argument"), N_("invalid %(type)s value: %(value)r"))
