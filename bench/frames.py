"""Frame layer benchmark: frames per second and frames recovered, side by side with peers.

Same streams for everyone: N frames (default 100,000) with 5% of the bytes random garbage
mixed in between frames, fed in 256-byte chunks.

  DL/T 645 stream: our compiled scanner, our pure-Python twin, and the `dlt645` 3.2.0
  package's streaming DLT645Protocol.deserialize_with_remaining.
  Modbus stream: our two scanners and pymodbus' FramerRTU.handleFrame.
  DL/T 698.45 stream: our two scanners and the `dlt698` package's FrameStreamDecoder (the
  Python bindings of a C++ library). Then bytes -> typed readings, ours compiled
  (ext/_apdu698.pyx) and pure (dlt698.PURE): scan, frame, APDU, A-XDR data, Scaler_Unit
  applied into Decimal quantities named as the head-end sees them (dlt698_typed); beside
  the peer's frame + decode_apdu (native objects, values not read: the issue's yardstick)
  and the peer's frame + decode_apdu + every Data read into plain Python values (no
  scaler, no names, no Decimal: the nearest it comes to what ours produces).
  Mixed DL/T 645 + 698.45 stream (half each, as on a mixed line): each of our scanners
  picks its own frames out of the other's, and the peer its 698 frames.

Then the whole path from bytes to typed readings (scan + decode + BCD values) for ours.
Run: python bench/frames.py [--frames N]  (install the peers with pip install '.[bench]').
This prints figures; it asserts nothing. Targets are in the issue and the closing note.
Where ours is set beside a peer, both run in turn, five rounds, best of each (a 2-core
machine shared with other work: a load that comes and goes weighs on each side alike).
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
from protocols import dlt698  # noqa: E402
from protocols import modbus  # noqa: E402
from protocols.dlt698_data import (ARRAY, BIT_STRING, DATE_TIME_S, DOUBLE_LONG,  # noqa: E402
                                   DOUBLE_LONG_UNSIGNED, LONG, LONG_UNSIGNED, STRUCTURE, OAD,
                                   BitString, encode_data)

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


def dlt698_stream(n, rng):
    """Answers a concentrator gets from 32 DL/T 698.45 meters: the driver's energy+money
    and instant+status NormalLists, a clock read and a day-freeze record."""
    import datetime as _dt
    templates = []
    when = _dt.datetime(2026, 11, 26, 10, 15, 0)
    word = dlt698.status_word(False, False, False)
    for i in range(32):
        sa = dlt698.server_address("%012d" % (200000 + i))
        kwh = [rng.randint(0, 10 ** 8) for _ in range(5)]
        energy = [(OAD(0x0010, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, k)
                                                          for k in kwh]), None),
                  (OAD(0x0020, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, 0)] * 5),
                   None),
                  (OAD(0x202C, 2, 0), encode_data(STRUCTURE, [(DOUBLE_LONG_UNSIGNED, 3520),
                                                              (DOUBLE_LONG_UNSIGNED, 4)]),
                   None),
                  (OAD(0x202D, 2, 0), encode_data(DOUBLE_LONG_UNSIGNED, 0), None)]
        instant = [(OAD(0x2000, 2, 0), encode_data(ARRAY, [(LONG_UNSIGNED, 2201)] * 3), None),
                   (OAD(0x2001, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG, -5123)] * 3), None),
                   (OAD(0x2004, 2, 0), encode_data(ARRAY, [(DOUBLE_LONG, 11000)] * 4), None),
                   (OAD(0x200A, 2, 0), encode_data(ARRAY, [(LONG, 998)] * 4), None),
                   (OAD(0x200F, 2, 0), encode_data(LONG_UNSIGNED, 5001), None),
                   (dlt698.STATUS_WORDS, encode_data(ARRAY, [(BIT_STRING, BitString(
                       16, b"\x00\x00"))] * 2 + [(BIT_STRING, word)]), None)]
        cols = [dlt698.CSD(dlt698.FREEZE_TIME), dlt698.CSD(OAD(0x0010, 2, 0))]
        row = [encode_data(DATE_TIME_S, when.replace(hour=0, minute=0)),
               encode_data(ARRAY, [(DOUBLE_LONG_UNSIGNED, k) for k in kwh])]
        templates += [
            dlt698.get_list_response(sa, 1, energy),
            dlt698.get_list_response(sa, 2, instant),
            dlt698.get_response(sa, 3, dlt698.CLOCK, encode_data(DATE_TIME_S, when)),
            dlt698.get_record_response(sa, 4, dlt698.DAY_FREEZE, cols, rows=[row]),
        ]
    frames = [rng.choice(templates) for _ in range(n)]
    return [f[rng.randint(0, 4):] for f in frames]         # 0..4 wake-up FE bytes


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


def timed_together(fns, chunks, rounds=5):
    """{name: (count, best seconds)} of functions run in turn, round after round: on a
    shared machine a load that comes and goes weighs on each side alike."""
    best, counts = {}, {}
    for _ in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            counts[name] = fn(chunks)
            dt = time.perf_counter() - t0
            best[name] = min(best.get(name, dt), dt)
    return {name: (counts[name], best[name]) for name in fns}


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


def ours_typed(module, protocol, typed):
    """Scan with this module's scanner, and count what `typed(raw frame)` makes of each."""
    Scanner = importlib.import_module(module).Scanner

    def run(chunks):
        s = Scanner(protocol)
        n = 0
        for c in chunks:
            for raw in s.feed(c):
                n += typed(raw)
        return n
    return run


def modbus_registers(raw):
    return len(modbus.decode_answer(raw).registers)


def dlt698_typed(compiled):
    """bytes -> typed readings, as the gateway's 698 driver gets them (exchange: frame and
    decode; values_of / freeze_values: quantities per result): the frame, its APDU, the
    A-XDR data, then Scaler_Unit applied into Decimal quantities with the contract's names
    (a day-freeze record: its freeze time and the quantities of its energy column). With
    `compiled`, protocols.dlt698's compiled read path (ext/_apdu698.pyx); else its pure twin
    (dlt698.PURE). Returns the number of typed values."""
    fns = dlt698.PURE if not compiled else {
        "frame_from_scanner": dlt698.frame_from_scanner, "decode": dlt698.decode,
        "quantities": dlt698.quantities}
    frame_from_scanner, decode, quantities = (fns["frame_from_scanner"], fns["decode"],
                                              fns["quantities"])
    GetResponse, GetRecordResponse = dlt698.GetResponse, dlt698.GetRecordResponse

    def typed(raw):
        apdu = decode(frame_from_scanner(raw)).apdu
        n = 0
        if type(apdu) is GetResponse:
            for oad, value, dar in apdu.results:
                if dar is None:
                    n += len(quantities(oad, value))
        elif type(apdu) is GetRecordResponse:
            columns = [c.oad for c in apdu.columns]
            for row in apdu.rows:
                for oad, cell in zip(columns, row):
                    n += 1 if oad == dlt698.FREEZE_TIME else len(quantities(oad, cell))
        return n
    return typed


def ours_mixed(module):
    """Both of our scanners over the same mixed bytes (a port worker feeds each exchange's
    bytes to the scanner of its framing): 645 frames and 698 frames found."""
    Scanner = importlib.import_module(module).Scanner

    def run(chunks):
        a, b = Scanner("dlt645"), Scanner("dlt698")
        n = 0
        for c in chunks:
            n += len(a.feed(c)) + len(b.feed(c))
        return n
    return run


def peer_dlt698(decode_apdus=False, values=False):
    """The `dlt698` package: FrameStreamDecoder; with decode_apdus, decode_apdu of each
    frame's payload (native objects: its Data values are read lazily); with values, every
    result's Data walked into Python values too (ints, byte lists for date_time_s: no
    Scaler_Unit, no names, no Decimal)."""
    try:
        from dlt698 import codec
    except ImportError:
        return None
    Frame = codec.Frame

    def walk(d):
        v = d.value
        if d.type in (1, 2):                         # array, structure
            return sum(walk(x) for x in v)
        return 1

    def run(chunks):
        dec = codec.FrameStreamDecoder()
        n = 0
        for c in chunks:
            for f in dec.feed(c):
                if type(f) is Frame:
                    if values:
                        apdu = codec.decode_apdu(f.payload)
                        for r in getattr(apdu, "attributes", ()):
                            n += walk(r.result)
                        for rec in getattr(apdu, "records", ()):
                            for row in rec.result:
                                for cell in row:
                                    n += walk(cell)
                    elif decode_apdus:
                        apdu = codec.decode_apdu(f.payload)
                        n += len(getattr(apdu, "attributes", ())) or 1
                    else:
                        n += 1
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


def scanned(title, protocol, frames, rng, have_compiled, peers=()):
    """The stream of these frames with garbage, in chunks, and our two scanners' rates;
    `peers` [(key, label, run)] are timed in turn with the compiled scanner."""
    stream, garbage = mix_garbage(frames, rng)
    chunks = chunks_of(stream)
    print("\n%s stream: %d bytes, %d garbage" % (title, len(stream), garbage))
    rates = {}
    runs = {key: run for key, _, run in peers}
    if have_compiled:
        runs["compiled"] = ours("protocols._speedups", protocol)
    together = timed_together(runs, chunks) if runs else {}
    if have_compiled:
        rates["compiled"] = row("ours, compiled (scan)", len(frames), together["compiled"])
    rates["python"] = row("ours, pure-Python twin (scan)", len(frames),
                          timed(ours("protocols._pyframing", protocol), chunks, 1))
    for key, label, _ in peers:
        rates[key] = row(label, len(frames), together[key])
    return chunks, rates


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
    chunks, rates = scanned("DL/T 645", "dlt645", frames, rng, have_compiled)
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
    mchunks, mrates = scanned("Modbus RTU", "modbus", mframes, rng, have_compiled)
    mrates["pymodbus"] = row("pymodbus handleFrame, one call per response", len(mframes),
                             timed(peer_pymodbus_per_response(), mframes, 1))
    row("pymodbus handleFrame on the garbled stream", len(mframes),
        timed(peer_pymodbus(), mchunks, 1))
    if have_compiled:
        c, s = timed(ours_typed("protocols._speedups", "modbus", modbus_registers), mchunks,
                     1)
        print("  %-46s %12s frames/s   (%d registers, via pymodbus PDUs)" % (
            "ours, compiled: bytes -> registers", "{:,.0f}".format(args.frames / s), c))

    pframes = dlt698_stream(args.frames, rng)
    peer = peer_dlt698()
    pchunks, prates = scanned("DL/T 698.45", "dlt698", pframes, rng, have_compiled,
                              [("dlt698", "dlt698 FrameStreamDecoder", peer)] if peer else [])
    if not peer:
        print("  dlt698 peer not installed (pip install '.[bench]', Python >= 3.11)")
    typed = {}
    if have_compiled and dlt698.IMPLEMENTATION == "compiled":
        typed["typed-compiled"] = ours_typed("protocols._speedups", "dlt698", dlt698_typed(True))
    else:
        print("  (compiled APDU decoder not built: protocols._apdu698)")
    if peer:
        typed["typed-dlt698"] = peer_dlt698(decode_apdus=True)
        typed["values-dlt698"] = peer_dlt698(values=True)
    together = timed_together(typed, pchunks)
    together["typed-twin"] = timed(ours_typed("protocols._pyframing", "dlt698",
                                              dlt698_typed(False)), pchunks, 1)
    for key, label, what in (
            ("typed-compiled", "ours, compiled: bytes -> typed readings",
             "typed values: Decimal quantities"),
            ("typed-twin", "ours, twin: bytes -> typed readings",
             "typed values: Decimal quantities"),
            ("typed-dlt698", "dlt698: FrameStreamDecoder + decode_apdu",
             "results, values left native"),
            ("values-dlt698", "dlt698: ... + every Data read into Python",
             "values: plain ints, no scaler")):
        if key in together:
            c, s = together[key]
            prates[key] = args.frames / s
            print("  %-46s %12s frames/s   (%d %s)" % (label, "{:,.0f}".format(args.frames / s),
                                                      c, what))

    half = args.frames // 2
    xframes = dlt645_stream(half, rng) + dlt698_stream(args.frames - half, rng)
    rng.shuffle(xframes)
    xstream, xgarbage = mix_garbage(xframes, rng)
    xchunks = chunks_of(xstream)
    print("\nMixed DL/T 645 + 698.45 stream: %d bytes, %d garbage, %d + %d frames"
          % (len(xstream), xgarbage, half, args.frames - half))
    xrates = {}
    runs = {"dlt698": peer} if peer else {}
    if have_compiled:
        runs["compiled"] = ours_mixed("protocols._speedups")
    together = timed_together(runs, xchunks)
    if have_compiled:
        xrates["compiled"] = row("ours, compiled (645 and 698 scanners)", len(xframes),
                                 together["compiled"])
    xrates["python"] = row("ours, pure-Python twins (645 and 698)", len(xframes),
                           timed(ours_mixed("protocols._pyframing"), xchunks, 1))
    if peer:
        row("dlt698 FrameStreamDecoder (its 698 frames)", args.frames - half, together["dlt698"])

    print("\nRatios (targets: compiled >= 20x each peer, >= 8x the twin)")
    if have_compiled:
        print("  DL/T 645: compiled / twin   = %6.1fx" % (rates["compiled"] / rates["python"]))
        if "dlt645" in rates:
            print("  DL/T 645: compiled / dlt645 = %6.1fx" % (rates["compiled"] / rates["dlt645"]))
        print("  Modbus:   compiled / twin   = %6.1fx" % (mrates["compiled"] / mrates["python"]))
        print("  Modbus:   compiled / pymodbus = %4.1fx"
              % (mrates["compiled"] / mrates["pymodbus"]))
        print("  DL/T 698.45 (targets: >= 4x FrameStreamDecoder, >= 8x the twin, typed "
              ">= the peer's frame + APDU)")
        print("  DL/T 698: compiled / twin   = %6.1fx" % (prates["compiled"] /
                                                         prates["python"]))
        if "dlt698" in prates:
            print("  DL/T 698: compiled / dlt698 = %6.1fx" % (prates["compiled"] /
                                                             prates["dlt698"]))
            if "typed-compiled" in prates:
                print("  DL/T 698: typed, compiled / dlt698 frame + APDU = %4.2fx"
                      % (prates["typed-compiled"] / prates["typed-dlt698"]))
                print("  DL/T 698: typed, compiled / dlt698 + values   = %4.2fx"
                      % (prates["typed-compiled"] / prates["values-dlt698"]))
                print("  DL/T 698: typed, compiled / twin              = %4.1fx"
                      % (prates["typed-compiled"] / prates["typed-twin"]))
        print("  mixed:    compiled / twins  = %6.1fx" % (xrates["compiled"] /
                                                         xrates["python"]))


if __name__ == "__main__":
    main()
