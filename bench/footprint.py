"""Footprint benchmark: resident memory and CPU of `mgw run` with 1,024 simulated meters on
8 lines, idle between polls and during a polling cycle, and the time from start to READY
(systemd notify). Target: at most 40 MB resident (a concentrator has 256-512 MB for
everything).

The meters are 8 `mgw simulate` processes (128 meters each, 9600 baud; 4 lines of DL/T 645
meters, 4 of DL/T 698.45) on
pseudo-terminals; the gateway is a separate `mgw run` process measured from /proc, with an
uplink (to an absent broker: buffering) and a head-end key configured, as in the field, and
the environment of systemd/meter-gateway.service (MALLOC_ARENA_MAX=2).
With `--accounts N` the first N meters also have prepaid accounts (a flat tariff, cost
control running, the account store loaded): a fee-recovery box.
Run: python bench/footprint.py [--accounts N]. Prints figures only.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LINES = 8
PER_LINE = 128
BAUD = 9600


def protocol_of(line):
    """Half the lines DL/T 645, half DL/T 698.45 (128 meters each)."""
    return "dlt645" if line < LINES // 2 else "dlt698"


def byte_compile():
    """Installed Python code runs from byte-compiled files (pip and Debian's packaging
    compile them); without them every start compiles every module, and the compiler's
    memory stays in the resident set. Some sandboxes set PYTHONDONTWRITEBYTECODE."""
    import compileall
    for pkg in ("gateway", "protocols"):
        compileall.compile_dir(os.path.join(ROOT, pkg), quiet=1)


def mgw(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "gateway"] + list(args), env=env, **kw)


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=0,
                    help="prepaid accounts on the first N meters (default none)")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="mgw-bench-footprint-")
    sims = []
    for n in range(LINES):
        link = os.path.join(folder, "tty%d" % n)
        p = mgw("simulate", "--port", link, "--meters", str(PER_LINE), "--first",
                str(100000 * (n + 1)), "--baudrate", str(BAUD), "--latency-ms", "20",
                "--protocol", protocol_of(n),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        p.stdout.readline()
        threading.Thread(target=lambda q=p: [None for _ in q.stdout], daemon=True).start()
        sims.append((p, link))
    cfg = os.path.join(folder, "gw.toml")
    lines = ['[gateway]', 'id = "bench"', 'data_dir = "%s/data"' % folder,
             'log_level = "warning"', '']
    for n, (_, link) in enumerate(sims):
        lines += ['[[ports]]', 'name = "l%d"' % n, 'device = "%s"' % link,
                  'baudrate = %d' % BAUD, '']
    for n in range(LINES):
        for i in range(PER_LINE):
            lines += ['[[meters]]', 'id = "m%d_%d"' % (n, i), 'port = "l%d"' % n,
                      'protocol = "%s"' % protocol_of(n),
                      'address = "%012d"' % (100000 * (n + 1) + i), 'interval_s = 300',
                      'instant_interval_s = 0', 'clock_interval_s = 0', '']
    if args.accounts:
        lines += ['[tariffs.flat]', 'kind = "flat"', 'price = "0.5283"', '']
        for k in range(min(args.accounts, LINES * PER_LINE)):
            n, i = divmod(k, PER_LINE)
            lines += ['[[accounts]]', 'meter = "m%d_%d"' % (n, i), 'tariff = "flat"',
                      'opening_balance = "100.00"', '']
    # a head-end key, as in the field (the signature check is part of the footprint)

    keys = os.path.join(folder, "keys")
    subprocess.run([sys.executable, "-m", "gateway", "keys", "gen", "--out", keys],
                   env=dict(os.environ, PYTHONPATH=ROOT), check=True, capture_output=True)
    # an uplink, as in the field (to a broker that is not there: buffering, reconnecting)
    lines += ['[uplink]', 'host = "127.0.0.1"', 'port = 9', '']
    lines += ['[control]', 'require_synced_clock = false',
              'public_keys = ["%s/headend.pub"]' % keys]
    with open(cfg, "w") as f:
        f.write("\n".join(lines))
    sock_path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(60)
    t0 = time.perf_counter()
    # the environment the systemd unit gives the service (MALLOC_ARENA_MAX=2), running
    # byte-compiled code as an installed gateway does
    byte_compile()
    gw = mgw("run", "--config", cfg, env={"NOTIFY_SOCKET": sock_path,
                                          "MALLOC_ARENA_MAX": "2"},
             stderr=subprocess.DEVNULL)
    try:
        while True:
            msg = sock.recv(4096).decode()
            if msg.startswith("READY=1"):
                break
        ready = time.perf_counter() - t0
        # the first cycle: every meter is due at start
        c0, w0 = cpu_s(gw.pid), time.perf_counter()
        peak = 0.0
        status = os.path.join(folder, "data", "status.json")
        cycle_end = None
        while time.perf_counter() - w0 < 120:
            peak = max(peak, rss_mb(gw.pid))
            time.sleep(0.5)
            try:
                import json
                with open(status) as f:
                    st = json.load(f)
                reads = sum(p["answers"] for p in st["ports"])
                if reads >= LINES * PER_LINE:
                    cycle_end = time.perf_counter()
                    break
            except (OSError, ValueError):
                pass
        cycle_s = (cycle_end or time.perf_counter()) - w0
        cycle_cpu = cpu_s(gw.pid) - c0
        # idle between polls
        time.sleep(2)
        c1, w1 = cpu_s(gw.pid), time.perf_counter()
        time.sleep(20)
        idle_cpu = (cpu_s(gw.pid) - c1) / (time.perf_counter() - w1)
        idle_rss = rss_mb(gw.pid)
        if os.environ.get("MGW_BENCH_SMAPS"):
            by = {}
            name = ""
            with open("/proc/%d/smaps" % gw.pid) as f:
                for line in f:
                    head = line.split()
                    if "-" in head[0] and len(head) >= 5:
                        name = head[5] if len(head) > 5 else "[anon]"
                    elif head[0] == "Rss:":
                        by[name] = by.get(name, 0) + int(head[1])
            for n, kb in sorted(by.items(), key=lambda kv: -kv[1])[:8]:
                print("    %6d kB %s" % (kb, n))
        print("meter-gateway footprint: `mgw run` with %d meters (half DL/T 645, half "
              "DL/T 698.45) on %d lines at %d baud, %d prepaid accounts, Python %s"
              % (LINES * PER_LINE, LINES, BAUD, args.accounts, sys.version.split()[0]))
        print("\n  start to READY:                  %6.2f s" % ready)
        print("  first cycle (every meter read):  %6.1f s, CPU %.1f s (%.0f%% of one core)"
              % (cycle_s, cycle_cpu, 100 * cycle_cpu / cycle_s))
        print("  resident memory, peak in cycle:  %6.1f MB" % peak)
        print("  resident memory, idle:           %6.1f MB   (target <= 40 MB)" % idle_rss)
        print("  CPU idle between polls:          %6.2f%% of one core" % (100 * idle_cpu))
        print("  peer (ThingsBoard IoT Gateway): not measured here: it has no DL/T 645 "
              "connector to drive the same 1,024 meters")
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(20)
        for p, _ in sims:
            p.send_signal(signal.SIGINT)
            p.wait(10)


if __name__ == "__main__":
    main()
