"""Polling benchmark: how close a cycle comes to the wire-time minimum.

32 simulated DL/T 645 meters on one line, one energy block read each (total + 4 tariffs,
0001FF00), at 2400 and at 9600 baud, through the real port worker and poller on a
pseudo-terminal. The minimum is the sum over the meters of request and answer bytes on the
wire (11 bits per byte, 4 FE preamble bytes each way) plus the simulated meter latency;
efficiency = minimum / measured (target >= 0.90). Then 4 lines of 32 polled at once: the
cycle should take about as long as one line, not four.

Run: python bench/poll.py. It prints figures; it asserts nothing.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gateway.line.poller import LinePoller, MeterSpec  # noqa: E402
from gateway.line.port import PortWorker  # noqa: E402
from gateway.sim.dlt645 import Faults, SimLine, make_meters  # noqa: E402
from protocols import dlt645  # noqa: E402

LATENCY_S = 0.03
METERS = 32


def minimum(baud):
    request = len(dlt645.read_data("000000000001", 0x0001FF00))               # with 4 FE
    answer = 4 + 12 + 4 + 20                                              # FE + frame
    return METERS * ((request + answer) * 11 / baud + LATENCY_S)


def run_lines(nlines, baud):
    lines, workers, pollers = [], [], []
    for n in range(nlines):
        meters = make_meters(METERS, first_address=1000 * (n + 1),
                             faults=Faults(latency_s=LATENCY_S))
        line = SimLine(meters, baudrate=baud, name="b%d" % n)
        line.start()
        specs = [MeterSpec(m.address, "b%d" % n, address=m.address, interval_s=86400,
                           instant_interval_s=0, clock_interval_s=0) for m in meters]
        poller = LinePoller(specs, lambda r: None, lambda t, **k: None, first_poll=False)
        worker = PortWorker("b%d" % n, line.device, baudrate=baud, poll_source=poller)
        worker.open()
        lines.append(line)
        workers.append(worker)
        pollers.append(poller)
    # warm-up: one read per meter so the latency budgets have seen each meter once
    for poller, worker in zip(pollers, workers):
        for spec in poller.meters.values():
            poller.read_di(worker, spec, 0x00010000)
        for h in poller.health.values():
            h.reads = h.reads_ok = 0
    t0 = time.time()
    for poller in pollers:                     # make every meter's energy read due now
        poller._heap = []
        for spec in poller.meters.values():
            poller._push(t0, spec.id, "energy")
    for w in workers:
        w.start()
    while any(sum(h.reads for h in p.health.values()) < METERS for p in pollers):
        time.sleep(0.002)
    elapsed = time.time() - t0
    ok = sum(sum(h.reads_ok for h in p.health.values()) for p in pollers)
    for w, line in zip(workers, lines):
        w.stop()
        line.stop()
    return elapsed, ok


def main():
    print("meter-gateway polling benchmark: %d meters per line, energy block read each, "
          "meter latency %d ms" % (METERS, LATENCY_S * 1000))
    print("\n  %-28s %10s %10s %11s %6s" % ("", "minimum s", "cycle s", "efficiency", "ok"))
    for baud in (2400, 9600):
        elapsed, ok = run_lines(1, baud)
        mn = minimum(baud)
        print("  %-28s %10.3f %10.3f %11.3f %6d" % ("1 line, %d baud" % baud, mn, elapsed,
                                                    mn / elapsed, ok))
    elapsed4, ok4 = run_lines(4, 9600)
    mn = minimum(9600)
    print("  %-28s %10.3f %10.3f %11.3f %6d" % ("4 lines at once, 9600 baud", mn, elapsed4,
                                                mn / elapsed4, ok4))
    print("  (target: efficiency >= 0.90; 4 lines take about as long as one)")


if __name__ == "__main__":
    main()
