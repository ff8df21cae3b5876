"""Simulated meters (DL/T 645 and Modbus RTU) on pseudo-terminals, and the demo. Shipped,
since `mgw simulate` and `mgw demo` are features; imported by the command line only."""
