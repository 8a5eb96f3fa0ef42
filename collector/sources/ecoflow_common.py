"""What the EcoFlow cloud sources share: the account's station list (with EcoFlow's online
flag), a worker thread, and a log that says a repeating problem once."""

from __future__ import annotations

import logging
import threading
import time

from collector.cloud.api import OpenApi

log = logging.getLogger(__name__)

# A station that device/list says is offline has its quota/all skipped (it would repeat stale
# values); a station EcoFlow has not opened for the API is asked again only after this long.
NOT_OPENED_RETRY_SEC = 3600
DEVICE_LIST_REFRESH_SEC = 600


class OnceLog:
    """Log a repeating problem when it starts or changes, not on every retry."""

    def __init__(self, prefix: str, logger: logging.Logger = log):
        self.prefix = prefix
        self.log = logger
        self.last: dict[str, str] = {}

    def problem(self, key: str, text: str, level: int = logging.WARNING) -> None:
        if self.last.get(key) != text:
            self.last[key] = text
            self.log.log(level, "%s: %s", self.prefix, text)

    def ok(self, key: str, text: str | None = None) -> None:
        if self.last.pop(key, None) is not None and text:
            self.log.info("%s: %s", self.prefix, text)


class DeviceDirectory:
    """The account's stations from `device/list` (or the configured serial numbers), with
    EcoFlow's own online flag: the liveness signal, as quota/all repeats stale values."""

    def __init__(self, api: OpenApi | None, serials: tuple[str, ...] = (), metrics=None):
        self.api = api
        self.wanted = tuple(serials)
        self.metrics = metrics
        self.devices: dict[str, dict] = {sn: {"sn": sn, "online": None} for sn in serials}
        self.fetched_at: float | None = None
        self._lock = threading.Lock()
        self._log = OnceLog("ecoflow device list")

    def refresh(self) -> dict[str, dict]:
        if self.api is None:
            return self.devices
        listed = {d["sn"]: d for d in self.api.device_list()}
        with self._lock:
            chosen = {sn: d for sn, d in listed.items() if not self.wanted or sn in self.wanted}
            for sn in self.wanted:
                if sn not in listed:
                    self._log.problem(f"missing:{sn}", (
                        f"{sn} (ECOFLOW_DEVICE_SN / ECOFLOW_DEVICE_LIST) is not on this "
                        f"account's device list ({', '.join(sorted(listed)) or 'empty'}): check "
                        "the serial number, and that the station is bound to this account"))
            for sn, device in chosen.items():
                online = str(device.get("online")) == "1"
                before = self.devices.get(sn, {}).get("online")
                if before is not None and before != online:
                    log.info("EcoFlow reports %s %s", sn, "online" if online else "offline")
                self.devices[sn] = {**device, "online": online}
                if self.metrics:
                    self.metrics.cloud_online.labels(sn).set(1 if online else 0)
            for sn in list(self.devices):
                if sn not in chosen:
                    del self.devices[sn]
            self.fetched_at = time.monotonic()
        return self.devices

    def set_online(self, sn: str, online: bool) -> None:
        with self._lock:
            device = self.devices.get(sn)
            if device is None:
                return
            if device.get("online") is not None and device["online"] != online:
                log.info("EcoFlow reports %s %s", sn, "online" if online else "offline")
            device["online"] = online
        if self.metrics:
            self.metrics.cloud_online.labels(sn).set(1 if online else 0)

    def refresh_if_older(self, max_age: float) -> None:
        if self.fetched_at is None or time.monotonic() - self.fetched_at > max_age:
            self.refresh()

    def serials(self) -> list[str]:
        with self._lock:
            return sorted(self.devices)

    def online(self, sn: str) -> bool | None:
        with self._lock:
            return self.devices.get(sn, {}).get("online")


class Worker:
    """A daemon thread with a stop event."""

    thread_name = "cloud"

    def __init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


