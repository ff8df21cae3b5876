"""The control core: signed head-end commands, a technician's relay requests and cost
control's own cut-offs and restores, all through one path.

- `verify`: pure. Bytes in, an authenticated command or a rejection with a code out.
- `policy`: pure. Whether a cut-off may go now (guarantee, trusted clock, rate limit).
- `relay`: the relay operation on the meter's line (status read, frame, read-back).
- `spool`: both sides of the technician's file protocol (`mgw relay`).
- `executor`: the thread: ledger first, then the meter, then the result; resume on start.
"""
