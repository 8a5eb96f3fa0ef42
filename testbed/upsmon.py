"""A real NUT `upsmon` (Debian's nut-client) as a secondary, in the foreground, with its own
configuration, state directory and a harmless SHUTDOWNCMD that appends a line to a file."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path


def find_upsmon() -> str | None:
    """The binary itself: Debian's /usr/sbin/upsmon is a wrapper that reads /etc/nut/nut.conf
    and does nothing unless MODE is set there."""
    for d in ("/lib/nut", "/usr/lib/nut", "/usr/libexec/nut"):
        if os.access(os.path.join(d, "upsmon"), os.X_OK):
            return os.path.join(d, "upsmon")
    return shutil.which("upsmon")


class Upsmon:
    def __init__(self, monitor: str, user: str, password: str, role: str = "secondary"):
        self.monitor = monitor
        self.base = Path(tempfile.mkdtemp(prefix="ecoflow-upsmon-"))
        self.shutdown_log = self.base / "shutdown.log"
        self.output = self.base / "upsmon.out"
        script = self.base / "shutdown.sh"
        script.write_text(f"#!/bin/sh\necho shutdown >> {self.shutdown_log}\n")
        script.chmod(0o755)
        (self.base / "upsmon.conf").write_text(
            f"MONITOR {monitor} 1 {user} {password} {role}\n"
            "MINSUPPLIES 1\n"
            f"SHUTDOWNCMD \"{script}\"\n"
            "POLLFREQ 1\nPOLLFREQALERT 1\nDEADTIME 15\nHOSTSYNC 5\nFINALDELAY 0\n"
            f"POWERDOWNFLAG {self.base / 'killpower'}\n"
            "RBWARNTIME 43200\nNOCOMMWARNTIME 300\n")
        (self.base / "upsmon.conf").chmod(0o600)
        (self.base / "nut.conf").write_text("MODE=netclient\n")
        self.proc: subprocess.Popen | None = None
        self._lock = None

    def start(self) -> Upsmon:
        binary = find_upsmon()
        if binary is None:
            raise RuntimeError("upsmon not found: install nut-client (scripts/install-system-deps)")
        # upsmon keeps its PID file where it was built to (/run/nut, whatever NUT_ALTPIDPATH
        # says) and refuses to start beside a running instance: one at a time on this machine,
        # across test processes.
        self._lock = open(os.path.join(tempfile.gettempdir(), "ecoflow-upsmon.lock"), "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        env = dict(os.environ, NUT_CONFPATH=str(self.base), NUT_STATEPATH=str(self.base),
                   NUT_ALTPIDPATH=str(self.base))
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen([binary, "-F", "-p", *user], env=env,
                                     stdout=self.output.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def shutdowns(self) -> int:
        if not self.shutdown_log.exists():
            return 0
        return len(self.shutdown_log.read_text().splitlines())

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None
        shutil.rmtree(self.base, ignore_errors=True)
