"""A private Network UPS Tools server: the dummy-ups driver and upsd on a free port.

The driver reads a `.dev` file of `variable: value` lines and re-reads it when it changes,
so a test can script a UPS going on battery by rewriting the file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from testbed.ports import free_port, wait_for_port

NUT_DIRS = ("/lib/nut", "/usr/lib/nut", "/usr/libexec/nut")


class NutNotFound(RuntimeError):
    pass


def find_nut_binary(name: str) -> str:
    for d in NUT_DIRS:
        path = os.path.join(d, name)
        if os.access(path, os.X_OK):
            return path
    raise NutNotFound(f"{name} not found in {', '.join(NUT_DIRS)}: install Network UPS Tools "
                      "(Debian: apt-get install nut-server)")


class NutServer:
    def __init__(self, variables: dict[str, str], ups: str = "dummy"):
        self.ups = ups
        self.host = "127.0.0.1"
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="ecoflow-nut-"))
        self.dev_file = self.base / f"{ups}.dev"
        self._procs: list[subprocess.Popen] = []
        self._last_write = 0.0
        self.write(variables)

    def write(self, variables: dict[str, str]) -> None:
        """Replace the UPS's variables; the driver picks the change up within a poll."""
        # The driver notices changes by modification time in whole seconds: two writes within
        # one second would look like one.
        wait = int(self._last_write) + 1 - time.time()
        if self._last_write and wait > 0:
            time.sleep(wait)
        tmp = self.dev_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}: {v}\n" for k, v in variables.items()))
        tmp.replace(self.dev_file)
        self._last_write = time.time()

    def start(self) -> NutServer:
        (self.base / "ups.conf").write_text(
            f"[{self.ups}]\n  driver = dummy-ups\n  port = {self.dev_file}\n"
            "  pollinterval = 1\n  desc = \"ecoflow testbed\"\n")
        (self.base / "upsd.conf").write_text(f"LISTEN {self.host} {self.port}\n")
        (self.base / "upsd.users").write_text("")
        (self.base / "nut.conf").write_text("MODE=standalone\n")
        self.base.chmod(0o700)
        env = dict(os.environ, NUT_CONFPATH=str(self.base), NUT_STATEPATH=str(self.base))
        user = ["-u", "root"] if os.geteuid() == 0 else []
        driver = subprocess.Popen([find_nut_binary("dummy-ups"), "-a", self.ups, "-D", *user],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        self._procs.append(driver)
        deadline = time.monotonic() + 10
        while not any(p.name.startswith("dummy-ups") for p in self.base.iterdir()
                      if p.is_socket()):
            if time.monotonic() > deadline or driver.poll() is not None:
                self.stop()
                raise RuntimeError("the dummy-ups driver did not start")
            time.sleep(0.05)
        upsd = subprocess.Popen([find_nut_binary("upsd"), "-D", *user], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self._procs.append(upsd)
        wait_for_port(self.port)
        self._wait_for_data()
        return self

    def _wait_for_data(self, timeout: float = 15.0) -> None:
        """upsd answers WAIT until the driver has published its first values."""
        deadline = time.monotonic() + timeout
        while True:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                sock.sendall(f"GET VAR {self.ups} ups.status\n".encode())
                reply = sock.makefile("rb").readline().decode(errors="replace")
            if reply.startswith("VAR ") and '"WAIT"' not in reply:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"upsd has no data from the driver: {reply.strip()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> NutServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
