"""The `mgw` command line: parser and exit codes (main), field commands, relay and
signing helpers (control). It may import the service; the service never imports it."""
