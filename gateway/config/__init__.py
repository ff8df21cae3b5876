"""Configuration declared once, as data: the schema kit (fields, kinds such as
Money(places=2), sections, one walker, frozen slotted records), the service's own sections,
and reading the TOML file. Cost control declares its sections in gateway/billing/settings.py;
gateway/service/config.py puts the whole file together (`load(path)`, `validate(doc, path)`).
"""

import os

try:
    import tomllib
except ImportError:        # Python < 3.11
    import tomli as tomllib

from gateway.config.schema import (  # noqa: F401
    ConfigError, DecimalNumber, Field, FileSchema, Invalid, Kind, ListOf, ListOfTables, Money,
    NamedTables, Record, Section, Table, record_type, NAME, NUMBER)

DEFAULT_PATH = "/etc/meter-gateway/gateway.toml"


def config_path(explicit=None):
    return explicit or os.environ.get("MGW_CONFIG") or DEFAULT_PATH


def read(path):
    """The TOML document of a configuration file, or ConfigError in one line."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(["%s: no such file (set --config or $MGW_CONFIG)" % path]) from None
    except PermissionError:
        raise ConfigError(["%s: permission denied" % path]) from None
    except IsADirectoryError:
        raise ConfigError(["%s: is a folder, not a file" % path]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(["%s: not valid TOML: %s" % (path, exc)]) from None
    except UnicodeDecodeError:
        raise ConfigError(["%s: not UTF-8 text" % path]) from None
