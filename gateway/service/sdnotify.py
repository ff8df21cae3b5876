"""systemd's notify protocol (sd_notify(3)) without libsystemd: READY, WATCHDOG, STATUS,
STOPPING as datagrams to $NOTIFY_SOCKET. A no-op when not run by systemd."""

import os
import socket


class Notifier:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET")
        if addr and addr.startswith("@"):
            addr = "\0" + addr[1:]          # abstract namespace
        self.address = addr
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_s = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._sock = None

    @property
    def enabled(self):
        return bool(self.address)

    def send(self, *fields):
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status=None):
        return self.send("READY=1", *(["STATUS=" + status] if status else []))

    def watchdog(self):
        return self.send("WATCHDOG=1")

    def status(self, text):
        return self.send("STATUS=" + text.replace("\n", " "))

    def stopping(self):
        return self.send("STOPPING=1")
