"""The configuration file as a whole: the service's sections (gateway/config/sections.py)
then cost control's (gateway/billing/settings.py), walked by one engine into one frozen
`Config` record:

    cfg = load("/etc/meter-gateway/gateway.toml")      # or validate(doc, path)
    cfg.gateway.id, cfg.ports[0].baudrate, cfg.meters[0].address, cfg.uplink.host,
    cfg.control.public_keys, cfg.tariffs["flat"], cfg.accounts[0].opening_balance,
    cfg.cost_control.protected_ranges

Both raise ConfigError listing every problem, one line each naming the file and the key.

`python -m gateway.service.config --doc-tables` prints the defaults tables of
docs/configuration.md and docs/cost-control.md from the declarations; `--write` rewrites
them in place (tests/test_config.py fails when they differ).
"""

import os
import sys

from gateway.billing import settings as billing_settings
from gateway.config import ConfigError, FileSchema, read, sections
from gateway.ota import settings as ota_settings

__all__ = ["Config", "ConfigError", "SCHEMA", "load", "validate"]

SCHEMA = FileSchema(sections.SECTIONS + billing_settings.SECTIONS + ota_settings.SECTIONS)
Config = SCHEMA.record
Config.__module__ = __name__

# where each document's tables come from
DOC_TABLES = {
    "configuration.md": sections.SECTIONS,
    "cost-control.md": (billing_settings.ACCOUNTS, billing_settings.COST_CONTROL),
    "deploy.md": ota_settings.SECTIONS,
}


def validate(document, path="<config>"):
    """The Config of a parsed TOML document, or ConfigError with every problem."""
    return SCHEMA.validate(document, path)


def load(path):
    """The Config of a configuration file, or ConfigError with every problem."""
    return SCHEMA.validate(read(path), path)


def main(argv):
    from gateway.config import doc
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "docs")
    if argv[:1] != ["--doc-tables"]:
        sys.stderr.write("usage: python -m gateway.service.config --doc-tables [--write]\n")
        return 2
    for name, secs in DOC_TABLES.items():
        if "--write" in argv:
            path = os.path.join(docs, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            with open(path, "w", encoding="utf-8") as f:
                f.write(doc.rewrite(text, secs))
            print("rewrote %s" % path)
        else:
            for s in secs:
                print("%s (%s)\n\n%s\n" % (doc.heading(s), name, "\n".join(doc.table(s))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
