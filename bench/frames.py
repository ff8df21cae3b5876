"""Frame layer benchmark: frames per second and frames recovered, side by side with peers.

Same streams for everyone: N frames (default 100,000) with 5% of the bytes random garbage
mixed in between frames, fed in 256-byte chunks.

  DL/T 645 stream: our compiled scanner, our pure-Python twin, and the `dlt645` 3.2.0
  package's streaming DLT645Protocol.deserialize_with_remaining.
  Modbus stream: our two scanners and pymodbus' FramerRTU.handleFrame.

Then the whole path from bytes to typed readings (scan + decode + BCD values) for ours.
Run: python bench/frames.py [--frames N]  (install the peers with pip install '.[bench]').
This prints figures; it asserts nothing. Targets are in the issue and the closing note.
"""

import argparse
import gc
import importlib
import os
import random
import sys
import time
from decimal import Decimal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from protocols import dlt645  # noqa: E402
from protocols import modbus  # noqa: E402

CHUNK = 256


def dlt645_stream(n, rng):
    addresses = ["%012d" % (100000 + i) for i in range(32)]
    templates = []
    for a in addresses:
        templates += [
            dlt645.read_values_response(a, 0x00010000, [Decimal("12345.67")]),
            dlt645.read_values_response(a, 0x0001FF00, [Decimal("12345.67"), Decimal("1.00"),
                                                   Decimal("2345.10"), Decimal("7000.00"),
                                                   Decimal("2999.57")]),
            dlt645.read_values_response(a, 0x0201FF00, [Decimal("220.1"), Decimal("219.8"),
                                                   Decimal("221.0")]),
            dlt645.read_values_response(a, 0x02020100, [Decimal("-5.123")]),
            dlt645.read_values_response(a, 0x04000503, [0x0010]),
            dlt645.read_values_response(a, 0x00900200, [Decimal("35.20")]),
        ]
    frames = [rng.choice(templates) for _ in range(n)]
    # vary preambles: meters send 0..4 FE
    frames = [f[rng.randint(0, 4):] for f in frames]
    return frames


def modbus_stream(n, rng):
    from pymodbus.pdu.register_message import ReadHoldingRegistersResponse
    templates = []
    for unit in range(1, 33):
        for count in (2, 4, 10, 24):
            regs = [rng.getrandbits(16) for _ in range(count)]
            templates.append(modbus._adu(unit, ReadHoldingRegistersResponse(registers=regs,
                                                                       dev_id=unit)))
    return [rng.choice(templates) for _ in range(n)]


def mix_garbage(frames, rng, share=0.05):
    total = sum(len(f) for f in frames)
    budget = int(total * share / (1 - share))
    out = bytearray()
    gaps = sorted(rng.sample(range(len(frames)), min(len(frames), max(1, budget // 16))))
    per_gap = budget // max(1, len(gaps))
    gi = 0
    for i, f in enumerate(frames):
        if gi < len(gaps) and gaps[gi] == i:
            out += bytes(rng.getrandbits(8) for _ in range(per_gap))
            gi += 1
        out += f
    return bytes(out), budget


def chunks_of(stream):
    return [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]


def timed(fn, chunks, repeat=3):
    best = None
    count = 0
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        count = fn(chunks)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return count, best


def ours(module, protocol):
    Scanner = importlib.import_module(module).Scanner

    def run(chunks):
        s = Scanner(protocol)
        n = 0
        for c in chunks:
            n += len(s.feed(c))
        return n
    return run


def ours_decoded(module):
    mod = importlib.import_module(module)
    Scanner, sub_33 = mod.Scanner, mod.sub_33

    def run(chunks):
        # the full path: scan, frame, decode DI and BCD values into typed readings
        s = Scanner("dlt645")
        n = 0
        for c in chunks:
            for raw in s.feed(c):
                msg = dlt645.decode(dlt645.Frame(dlt645.address_from_wire(raw[1:7]), raw[8],
                                       sub_33(raw[10:-2]), raw))
                n += len(msg.values)
        return n
    return run


def ours_modbus_decoded(module):
    Scanner = importlib.import_module(module).Scanner

    def run(chunks):
        s = Scanner("modbus")
        n = 0
        for c in chunks:
            for raw in s.feed(c):
                n += len(modbus.decode_answer(raw).registers)
        return n
    return run


def peer_dlt645():
    try:
        from dlt645.protocol.protocol import DLT645Protocol
    except ImportError:
        return None
    try:  # the peer logs every checksum error through loguru; measure parsing, not logging
        from loguru import logger
        logger.remove()
    except ImportError:
        pass

    def run(chunks):
        rem = b""
        n = 0
        des = DLT645Protocol.deserialize_with_remaining
        for c in chunks:
            rem += c
            while True:
                rem, frame = des(rem)
                if frame is None:
                    break
                n += 1
        return n
    return run


def peer_pymodbus():
    from pymodbus.framer import FramerRTU
    from pymodbus.pdu import DecodePDU
    framer = FramerRTU(DecodePDU(is_server=False))

    def run(chunks):
        buf = b""
        n = 0
        for c in chunks:
            buf += c
            while buf:
                used, pdu = framer.handleFrame(buf, 0, 0)
                if not used:
                    break
                buf = buf[used:]
                if pdu is not None:
                    n += 1
        return n
    return run


def peer_pymodbus_per_response():
    """pymodbus' own use: one request, one response, one handleFrame call per response
    (its framer drops what follows the first frame in a buffer). Clean frames, no garbage:
    the peer's best case."""
    from pymodbus.framer import FramerRTU
    from pymodbus.pdu import DecodePDU
    framer = FramerRTU(DecodePDU(is_server=False))

    def run(frames):
        n = 0
        for f in frames:
            used, pdu = framer.handleFrame(f, 0, 0)
            if pdu is not None:
                n += 1
        return n
    return run


def row(name, sent, result):
    count, secs = result
    rate = count / secs
    print("  %-46s %12s frames/s   %7d / %d recovered (%.2f%%)"
          % (name, "{:,.0f}".format(rate), count, sent, 100.0 * count / sent))
    return rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100000)
    args = ap.parse_args()
    rng = random.Random(645)
    have_compiled = importlib.util.find_spec("protocols._speedups") is not None
    print("meter-gateway frame benchmark: %d frames, 5%% garbage, %d-byte chunks, Python %s"
          % (args.frames, CHUNK, sys.version.split()[0]))
    if not have_compiled:
        print("  (compiled scanner not built: run pip install -e . with Cython and gcc)")

    frames = dlt645_stream(args.frames, rng)
    stream, garbage = mix_garbage(frames, rng)
    chunks = chunks_of(stream)
    print("\nDL/T 645 stream: %d bytes, %d garbage" % (len(stream), garbage))
    rates = {}
    if have_compiled:
        rates["compiled"] = row("ours, compiled (scan)", len(frames),
                                timed(ours("protocols._speedups", "dlt645"), chunks))
    rates["python"] = row("ours, pure-Python twin (scan)", len(frames),
                          timed(ours("protocols._pyframing", "dlt645"), chunks, 1))
    peer = peer_dlt645()
    if peer:
        rates["dlt645"] = row("dlt645 3.2.0 deserialize_with_remaining", len(frames),
                              timed(peer, chunks, 1))
    else:
        print("  dlt645 peer not installed (pip install '.[bench]')")
    if have_compiled:
        c, s = timed(ours_decoded("protocols._speedups"), chunks, 1)
        print("  %-46s %12s frames/s   (%d typed values)" % (
            "ours, compiled: bytes -> typed readings", "{:,.0f}".format(args.frames / s), c))
    c, s = timed(ours_decoded("protocols._pyframing"), chunks, 1)
    print("  %-46s %12s frames/s   (%d typed values)" % (
        "ours, twin: bytes -> typed readings", "{:,.0f}".format(args.frames / s), c))

    mframes = modbus_stream(args.frames, rng)
    mstream, mgarbage = mix_garbage(mframes, rng)
    mchunks = chunks_of(mstream)
    print("\nModbus RTU stream: %d bytes, %d garbage" % (len(mstream), mgarbage))
    mrates = {}
    if have_compiled:
        mrates["compiled"] = row("ours, compiled (scan)", len(mframes),
                                 timed(ours("protocols._speedups", "modbus"), mchunks))
    mrates["python"] = row("ours, pure-Python twin (scan)", len(mframes),
                           timed(ours("protocols._pyframing", "modbus"), mchunks, 1))
    mrates["pymodbus"] = row("pymodbus handleFrame, one call per response", len(mframes),
                             timed(peer_pymodbus_per_response(), mframes, 1))
    row("pymodbus handleFrame on the garbled stream", len(mframes),
        timed(peer_pymodbus(), mchunks, 1))
    if have_compiled:
        c, s = timed(ours_modbus_decoded("protocols._speedups"), mchunks, 1)
        print("  %-46s %12s frames/s   (%d registers, via pymodbus PDUs)" % (
            "ours, compiled: bytes -> registers", "{:,.0f}".format(args.frames / s), c))

    print("\nRatios (targets: compiled >= 20x each peer, >= 8x the twin)")
    if have_compiled:
        print("  DL/T 645: compiled / twin   = %6.1fx" % (rates["compiled"] / rates["python"]))
        if "dlt645" in rates:
            print("  DL/T 645: compiled / dlt645 = %6.1fx" % (rates["compiled"] / rates["dlt645"]))
        print("  Modbus:   compiled / twin   = %6.1fx" % (mrates["compiled"] / mrates["python"]))
        print("  Modbus:   compiled / pymodbus = %4.1fx"
              % (mrates["compiled"] / mrates["pymodbus"]))


if __name__ == "__main__":
    main()
