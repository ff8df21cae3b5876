"""Sans-I/O codecs for the meter side: bytes in, typed frames and values out, and back.

No serial, no threads, no clocks here: DL/T 645-2007 (and -1997 reads) and Modbus RTU.
"""
