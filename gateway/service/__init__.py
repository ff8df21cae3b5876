"""The service: wiring every part from one configuration, supervising the threads,
status, systemd notification. Never imports the command line."""
