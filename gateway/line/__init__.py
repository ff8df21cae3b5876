"""The RS-485 lines: one worker per port (the only thing that touches the serial device),
the poller that schedules each meter's reads and keeps its health, on-demand reads and the
address search. Protocol knowledge stays in `protocols/`."""
