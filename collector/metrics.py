"""Prometheus metrics: per-device gauges named like the existing exporters, collector health."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from collector.rows import Row

# Column -> gauge name, as the earlier EcoFlow exporters spell them.
DEVICE_GAUGES = {
    "soc_percent": ("ecoflow_soc_percent", "State of charge shown by the station (%)"),
    "soc_min_percent": ("ecoflow_soc_min_percent", "Lowest SoC across battery packs (%)"),
    "watts_in_sum": ("ecoflow_watts_in", "Total input power (W)"),
    "watts_out_sum": ("ecoflow_watts_out", "Total output power (W)"),
    "pv_in_watts": ("ecoflow_pv_in_watts", "Solar input power (W)"),
    "ac_in_watts": ("ecoflow_ac_in_watts", "AC input power (W)"),
    "ac_out_watts": ("ecoflow_ac_out_watts", "AC output power (W)"),
    "remain_time_min": ("ecoflow_remain_time_min", "Runtime left while discharging (min)"),
    "battery_temp_c": ("ecoflow_battery_temp_celsius", "Battery temperature (deg C)"),
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("ecoflow_collector_messages_received", "Payloads received",
                                ["source"], registry=r)
        self.decoded_total = Counter("ecoflow_collector_messages_decoded", "Payloads decoded",
                                     ["source"], registry=r)
        self.failed_total = Counter("ecoflow_collector_messages_failed",
                                    "Payloads that went to ingest_errors", ["source"], registry=r)
        self.rows_written = Counter("ecoflow_collector_rows_written", "Rows committed", registry=r)
        self.batch_seconds = Histogram("ecoflow_collector_batch_write_seconds",
                                       "Time to write one batch", registry=r)
        self.last_reading = Gauge("ecoflow_last_reading_timestamp_seconds",
                                  "Unix time of the device's latest reading", ["device"], registry=r)
        self.seconds_since = Gauge("ecoflow_seconds_since_last_reading",
                                   "Seconds since the device's latest reading", ["device"],
                                   registry=r)
        self.grid = Gauge("ecoflow_grid_connected", "AC input present (1) or not (0)", ["device"],
                          registry=r)
        self.online = Gauge("ecoflow_online", "Device reported within its freshness limit",
                            ["device"], registry=r)
        self.cloud_online = Gauge("ecoflow_cloud_online",
                                  "Online flag of EcoFlow's device list (developer API)",
                                  ["device"], registry=r)
        self.device = {col: Gauge(name, doc, ["device"], registry=r)
                       for col, (name, doc) in DEVICE_GAUGES.items()}
        self._last_seen: dict[str, float] = {}
        self._children: dict[str, dict] = {}  # per device, labelled gauges (labels() is costly)

    def received(self, source: str) -> None:
        self.messages.labels(source).inc()

    def failed(self, source: str) -> None:
        self.failed_total.labels(source).inc()

    def decoded(self, source: str, rows: list[Row]) -> None:
        self.decoded_total.labels(source).inc()
        for row in rows:
            gauges = self._device_gauges(row.device_sn)
            for col, value in row.values.items():
                gauge = gauges.get(col)
                if gauge is not None and value is not None:
                    gauge.set(1 if value is True else 0 if value is False else value)
            ts = row.ts.timestamp()
            if ts >= self._last_seen.get(row.device_sn, 0):
                self._last_seen[row.device_sn] = ts
                gauges["_last_reading"].set(ts)

    def _device_gauges(self, sn: str) -> dict:
        children = self._children.get(sn)
        if children is None:
            children = {col: g.labels(sn) for col, g in self.device.items()}
            children["grid_connected"] = self.grid.labels(sn)
            children["_last_reading"] = self.last_reading.labels(sn)
            self._children[sn] = children
        return children

    def refresh(self, stale_after_sec: float = 120) -> None:
        now = time.time()
        for sn, ts in self._last_seen.items():
            self.seconds_since.labels(sn).set(now - ts)
            self.online.labels(sn).set(1 if now - ts <= stale_after_sec else 0)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)
