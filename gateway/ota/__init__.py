"""Over-the-air updates: a signed `software_update` command carries a manifest, the
gateway fetches the package in chunks it requests over its own MQTT connection, verifies
it, installs it with the configured installer, and rolls back to the kept previous package
when the new version does not report healthy in time (docs/mqtt.md, docs/deploy.md).

manifest.py  pure: the manifest's shape, Debian version order, what is refused and why
settings.py  the [ota] section of the configuration file
updater.py   the updater thread: transfer, verification, installation, health, rollback
"""
