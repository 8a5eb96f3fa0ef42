"""NUT source: poll a Network UPS Tools `upsd` (TCP 3493) with `LIST VAR <ups>`.

The fallback for when the internet fails together with the grid: some gen-3 stations appear
over USB as HID UPSes, and upsd reports their charge, runtime and on-battery status locally.
The status flags (OL, OB, LB, FSD) decide grid_connected, and LB on battery or FSD reads as an
empty battery (soc_min_percent = 0): see collector/decoders/nut.py and docs/policy.md.
"""

from __future__ import annotations

import logging
import shlex
import socket
import threading

from collector.decoders import DecodeError
from collector.decoders.nut import decode_vars
from collector.pipeline import Pipeline

log = logging.getLogger(__name__)


class NutError(RuntimeError):
    pass


def list_vars(host: str, port: int, ups: str, user: str | None = None,
              password: str | None = None, timeout: float = 5.0) -> tuple[dict[str, str], bytes]:
    """Ask upsd for every variable of `ups`; returns them and the raw reply."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        f = sock.makefile("rwb")
        if user:
            for line in (f"USERNAME {user}", f"PASSWORD {password or ''}"):
                f.write(line.encode() + b"\n")
                f.flush()
                reply = f.readline().decode(errors="replace").strip()
                if not reply.startswith("OK"):
                    raise NutError(f"upsd refused the login: {reply}")
        f.write(f"LIST VAR {ups}\n".encode())
        f.flush()
        raw = b""
        variables: dict[str, str] = {}
        while True:
            line = f.readline()
            if not line:
                raise NutError("upsd closed the connection in the middle of LIST VAR")
            raw += line
            text = line.decode(errors="replace").strip()
            if text.startswith("ERR"):
                raise NutError(f"upsd answered {text} for UPS {ups!r}"
                               " (check NUT_UPS against `upsc -l`)")
            if text.startswith("END LIST VAR"):
                break
            if text.startswith("VAR "):
                _, _ups, name, value = shlex.split(text)
                variables[name] = value
        f.write(b"LOGOUT\n")
        f.flush()
        return variables, raw


class NutSource:
    name = "nut"

    def __init__(self, pipeline: Pipeline, host: str, port: int, ups: str, interval: float = 5.0,
                 device_sn: str | None = None, user: str | None = None,
                 password: str | None = None):
        self.pipeline = pipeline
        self.host, self.port, self.ups = host, port, ups
        self.interval = interval
        self.device_sn = device_sn
        self.user, self.password = user, password
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def start(self) -> None:
        log.info("nut source: polling UPS %s at %s:%d every %.0f s", self.ups, self.host,
                 self.port, self.interval)
        self._thread = threading.Thread(target=self._run, name="nut", daemon=True)
        self._thread.start()

    def poll_once(self) -> int:
        try:
            variables, raw = list_vars(self.host, self.port, self.ups, self.user, self.password)
        except (OSError, NutError) as exc:
            log.warning("nut source: %s", exc)
            return 0
        self.polls += 1
        topic = f"nut://{self.host}:{self.port}/{self.ups}"
        try:
            reading = decode_vars(self.ups, variables, self.device_sn)
        except DecodeError as exc:
            return self.pipeline.dead_letter("nut", topic, raw, str(exc), self.device_sn, None)
        return self.pipeline.handle_readings([reading], raw, topic, "nut")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
