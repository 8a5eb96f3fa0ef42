"""EcoFlow developer REST source: `quota/all` per station at COLLECTING_INTERVAL."""

from __future__ import annotations

import logging
import time

from collector.cloud.api import Backoff, EcoflowApiError, OpenApi
from collector.pipeline import Pipeline
from collector.sources.ecoflow_common import NOT_OPENED_RETRY_SEC, DeviceDirectory, OnceLog, Worker

log = logging.getLogger(__name__)


class RestSource(Worker):
    """Poll `quota/all` for every online station at COLLECTING_INTERVAL.

    With push sources beside it (`push_sources`, e.g. open_mqtt) and `mode` "failover", a
    station is polled only while none of its push sources is fresh (collector.sources.liveness):
    from start-up until the first pushes arrive, and whenever they go quiet, until they come
    back. `mode` "always" polls every station at every interval regardless.
    """

    name = "rest"
    thread_name = "ecoflow-rest"

    def __init__(self, pipeline: Pipeline, api: OpenApi, directory: DeviceDirectory,
                 interval: float = 30.0, backoff: Backoff | None = None, liveness=None,
                 push_sources: tuple[str, ...] = (), mode: str = "failover"):
        super().__init__()
        self.pipeline, self.api, self.directory = pipeline, api, directory
        self.interval = interval
        self.backoff = backoff or Backoff(base=interval, cap=600)
        self.liveness = liveness
        self.push_sources = tuple(push_sources)
        self.mode = mode
        self.check_sec = min(1.0, interval)
        self.polls = 0
        self.failover_polls = 0
        self._skip_until: dict[str, float] = {}
        self._next_poll: dict[str, float] = {}  # sn -> monotonic time its next poll is due
        self._failing_over: set[str] = set()
        self._log = OnceLog("ecoflow rest", log)

    def _run(self) -> None:
        how = (f"for stations whose {'/'.join(self.push_sources)} pushes are not fresh"
               if self._failover_mode() else "for every online station")
        log.info("ecoflow rest: polling %s every %.0f s %s", self.api.host, self.interval, how)
        while not self._stop.is_set():
            delay = self.check_sec
            try:
                self.poll_once()
                self.backoff.reset()
            except EcoflowApiError as exc:
                delay = self.backoff.next_delay(exc.persistent)
                self._log.problem("cycle", f"{exc} (next try in {delay:.0f} s)",
                                  logging.ERROR if exc.persistent else logging.WARNING)
            self._stop.wait(delay)

    def _failover_mode(self) -> bool:
        return self.mode == "failover" and bool(self.push_sources) and self.liveness is not None

    def _pushes_fresh(self, sn: str) -> bool:
        """Whether a push source delivers `sn` (then REST stands by); logs the switch."""
        if not self._failover_mode():
            return False
        if self.liveness.fresh(sn, self.push_sources):
            if sn in self._failing_over:
                self._failing_over.discard(sn)
                self.liveness.forget(self.name, sn)
                self._next_poll.pop(sn, None)
                log.info("ecoflow rest: %s pushes are fresh again; REST polling stands by", sn)
            return True
        if sn not in self._failing_over:
            self._failing_over.add(sn)
            self.liveness.begin(self.name, sn)
            entries = [self.liveness.entry(src, sn) for src in self.push_sources]
            # At start-up (no push yet) this is routine; pushes that stopped are worth a warning.
            log.log(logging.WARNING if any(e.seen for e in entries) else logging.INFO,
                    "ecoflow rest: failover for %s (%s): polling quota/all every %.0f s until "
                    "pushes come back", sn, "; ".join(e.describe() for e in entries),
                    self.interval)
        return False

    def poll_once(self) -> int:
        """The device list when it is older than the interval, then quota/all for each online
        station that is due; rows queued."""
        self.directory.refresh_if_older(self.interval)
        self._log.ok("cycle", "EcoFlow answers again")
        queued = 0
        for sn in self.directory.serials():
            if self._stop.is_set():
                break
            if not self.directory.online(sn):
                continue  # quota/all would repeat the last values it knew
            now = time.monotonic()
            if now < self._skip_until.get(sn, 0) or now < self._next_poll.get(sn, 0):
                continue
            if self._pushes_fresh(sn):
                continue
            self._next_poll[sn] = now + self.interval
            if self.liveness is not None and not self._failover_mode():
                self.liveness.add_stations(self.name, [sn])
            try:
                _data, raw = self.api.quota_all(sn)
            except EcoflowApiError as exc:
                if exc.persistent and exc.code not in ("8513", "8521"):
                    self._skip_until[sn] = time.monotonic() + NOT_OPENED_RETRY_SEC
                    self._log.problem(f"quota:{sn}", f"{sn}: {exc}", logging.ERROR)
                    continue
                raise
            self._log.ok(f"quota:{sn}")
            self.polls += 1
            if sn in self._failing_over:
                self.failover_polls += 1
            queued += self.pipeline.handle(raw, f"rest:{self.api.host}/device/quota/all?sn={sn}",
                                           "rest", device_sn=sn)
        return queued
