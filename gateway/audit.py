"""The audit trail of every command, remote or local: append-only JSON lines, each carrying
the SHA-256 of the one before, fsynced before the operation goes on. Removing or editing a
line breaks the chain, and `verify` says where."""

import hashlib
import json
import os
import threading
import time

GENESIS = "0" * 64


def _digest(prev, entry):
    body = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256((prev + body).encode("utf-8")).hexdigest()


class AuditTrail:
    def __init__(self, path, on_entry=None):
        self.path = path
        self._lock = threading.Lock()
        self.on_entry = on_entry
        self.n, self.last = 0, GENESIS
        if os.path.exists(path):
            with open(path, "rb") as f:
                lines = f.read().splitlines()
            # a power cut can leave half a last line: it was never acknowledged, drop it
            while lines:
                try:
                    rec = json.loads(lines[-1])
                    self.n, self.last = rec["n"], rec["hash"]
                    break
                except (ValueError, KeyError):
                    lines.pop()
                    with open(path, "wb") as f:
                        f.write(b"".join(line + b"\n" for line in lines))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def append(self, kind, **data):
        with self._lock:
            entry = dict(data, kind=kind, n=self.n + 1, ts=time.time(), prev=self.last)
            entry["hash"] = _digest(self.last, entry)
            line = json.dumps(entry, sort_keys=True, ensure_ascii=False, default=str) + "\n"
            os.write(self._fd, line.encode("utf-8"))
            os.fsync(self._fd)
            self.n, self.last = entry["n"], entry["hash"]
        if self.on_entry:
            self.on_entry(entry)
        return entry

    def close(self):
        os.close(self._fd)


def verify(path):
    """(entries, None) if the chain is whole, else (entries checked, the problem)."""
    prev = GENESIS
    n = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                entry = json.loads(raw)
            except ValueError:
                return n, "line %d: not JSON" % i
            h = entry.pop("hash", None)
            if entry.get("prev") != prev:
                return n, "line %d: chain broken (prev does not match)" % i
            if _digest(prev, entry) != h:
                return n, "line %d: hash mismatch (edited)" % i
            prev = h
            n += 1
    return n, None
