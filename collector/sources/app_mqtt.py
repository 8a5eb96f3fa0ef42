"""EcoFlow app-login MQTT source: the stations' pushes, kept coming with `latestQuotas`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from collector.cloud.api import AppApi, MqttCredentials
from collector.pipeline import Pipeline
from collector.sources.ecoflow_common import DEVICE_LIST_REFRESH_SEC, DeviceDirectory
from collector.sources.ecoflow_mqtt import CloudMqttSource
from collector.sources.liveness import FRESH


class AppMqttSource(CloudMqttSource):
    """App-login MQTT: `/app/device/property/<sn>`, plus the periodic `latestQuotas` request
    that keeps stations pushing (they go quiet when no app asks), whose replies are decoded."""

    def __init__(self, pipeline: Pipeline, api: AppApi, directory: DeviceDirectory,
                 client_id: Callable[[], str], ca_file: str | None = None,
                 latest_quotas_sec: float = 300.0):
        self.api = api
        self.directory = directory
        self.latest_quotas_sec = latest_quotas_sec
        self._last_request: float | None = None  # monotonic time; None: ask at once
        self._request_id = int(time.time() * 1000) % 1_000_000_000
        self.requests_sent = 0
        self.quiet_requests = 0
        self._asked: dict[str, float] = {}  # sn -> monotonic time of the last request

        def topics(_creds: MqttCredentials) -> list[str]:
            directory.refresh_if_older(DEVICE_LIST_REFRESH_SEC)
            user_id = api.user_id
            return [t for sn in directory.serials()
                    for t in (f"/app/device/property/{sn}",
                              f"/app/{user_id}/{sn}/thing/property/get_reply")]

        super().__init__(pipeline, "app_mqtt", api.certification, client_id, topics, ca_file)

    def on_connected(self, client: mqtt.Client) -> None:
        # Not 0.0: the monotonic clock starts near zero at boot, so "long ago" must be explicit.
        self._last_request = None
        self._asked.clear()
        self._wake.set()

    def _tick(self) -> None:
        super()._tick()
        client = self.client
        if client is None:
            return
        now = time.monotonic()
        if self._last_request is None or now - self._last_request >= self.latest_quotas_sec:
            self._last_request = now
            wanted = self.directory.serials()
        else:
            # A station whose pushes went quiet is asked again at once (at most once per
            # expected period), not only at the next ECOFLOW_LATEST_QUOTAS_SEC.
            wanted = [sn for sn in self.directory.serials() if self._quiet(sn, now)]
            for sn in wanted:
                self.quiet_requests += 1
                self._log.problem(f"quiet:{sn}", f"{sn}: no app push for "
                                  f"{self.liveness.entry(self.source_label, sn).age:.0f} s; "
                                  "asking latestQuotas again", logging.INFO)
        for sn in wanted:
            self._ask(client, sn, now)

    def _quiet(self, sn: str, now: float) -> bool:
        if self.liveness is None:
            return False
        entry = self.liveness.entry(self.source_label, sn)
        if entry.state == FRESH:
            self._log.ok(f"quiet:{sn}", f"{sn}: app pushes are back")
            return False
        return now - self._asked.get(sn, float("-inf")) >= entry.period

    def _ask(self, client: mqtt.Client, sn: str, now: float) -> None:
        """`latestQuotas`: a read request (a get), the only thing this source publishes."""
        self._request_id += 1
        request = {"id": self._request_id, "version": "1.1", "from": "Android",
                   "moduleType": 0, "operateType": "latestQuotas", "params": {}}
        client.publish(f"/app/{self.api.user_id}/{sn}/thing/property/get",
                       json.dumps(request, separators=(",", ":")), qos=1)
        self._asked[sn] = now
        self.requests_sent += 1
