"""Prometheus metrics: per-device gauges named like the existing exporters, collector health."""

from __future__ import annotations

import threading
import time
from collections import Counter as Counter_

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
RECEIVED = ("ecoflow_collector_messages_received", "Payloads received")
DECODED = ("ecoflow_collector_messages_decoded", "Payloads decoded")
FAILED = ("ecoflow_collector_messages_failed", "Payloads that went to ingest_errors")
GRID_GAUGE = ("ecoflow_grid_connected", "AC input present (1) or not (0)")
LAST_READING_GAUGE = ("ecoflow_last_reading_timestamp_seconds",
                      "Unix time of the device's latest reading")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rows_written = Counter("ecoflow_collector_rows_written", "Rows committed", registry=r)
        self.rows_rejected = Counter("ecoflow_collector_rows_rejected",
                                     "Rows the database refused (kept in ingest_errors)",
                                     registry=r)
        self.batch_seconds = Histogram("ecoflow_collector_batch_write_seconds",
                                       "Time to write one batch", registry=r)
        self.seconds_since = Gauge("ecoflow_seconds_since_last_reading",
                                   "Seconds since the device's latest reading", ["device"],
                                   registry=r)
        self.online = Gauge("ecoflow_online", "Device reported within its freshness limit",
                            ["device"], registry=r)
        self.cloud_online = Gauge("ecoflow_cloud_online",
                                  "Online flag of EcoFlow's device list (developer API)",
                                  ["device"], registry=r)
        # Per-message figures are plain counts and dicts turned into samples when Prometheus
        # scrapes: a labelled counter or gauge takes a lock on every update, and setting a
        # dozen of them per reading cost more than decoding it.
        # Sources call these from their own threads: the lock keeps every count (uncontended,
        # it costs well under a microsecond).
        self._count_lock = threading.Lock()
        self.received_count: Counter_[str] = Counter_()
        self.decoded_count: Counter_[str] = Counter_()
        self.failed_count: Counter_[str] = Counter_()
        self._latest: dict[str, dict] = {}  # device -> values of its latest row
        self._last_seen: dict[str, float] = {}
        r.register(_PerMessage(self))

    def received(self, source: str) -> None:
        with self._count_lock:
            self.received_count[source] += 1

    def failed(self, source: str) -> None:
        with self._count_lock:
            self.failed_count[source] += 1

    def decoded(self, source: str, rows: list[Row]) -> None:
        with self._count_lock:
            self.decoded_count[source] += 1
        latest, last_seen = self._latest, self._last_seen
        for row in rows:
            sn = row.device_sn
            # A row's values are the device's merged snapshot (collector.rows.SnapshotMerger),
            # so the latest row holds every column the device has reported.
            latest[sn] = row.values
            ts = row.ts.timestamp()
            if ts >= last_seen.get(sn, 0):
                last_seen[sn] = ts

    def refresh(self, stale_after_sec: float = 120) -> None:
        now = time.time()
        for sn, ts in list(self._last_seen.items()):
            self.seconds_since.labels(sn).set(now - ts)
            self.online.labels(sn).set(1 if now - ts <= stale_after_sec else 0)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)


class _PerMessage:
    """The message counters and per-device gauges, made from the counts and latest rows at
    scrape time."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        m = self.m
        for (name, doc), counts in ((RECEIVED, m.received_count), (DECODED, m.decoded_count),
                                    (FAILED, m.failed_count)):
            family = CounterMetricFamily(name, doc, labels=["source"])
            for source, count in list(counts.items()):
                family.add_metric([source], count)
            yield family
        columns = {**DEVICE_GAUGES, "grid_connected": GRID_GAUGE}
        families = {col: GaugeMetricFamily(name, doc, labels=["device"])
                    for col, (name, doc) in columns.items()}
        last = GaugeMetricFamily(*LAST_READING_GAUGE, labels=["device"])
        for sn, values in list(m._latest.items()):
            for col, family in families.items():
                # A column the device never reported has no sample: a 0 would read as an
                # empty battery or a lost grid to an alert rule.
                value = values.get(col)
                if value is not None:
                    family.add_metric([sn], 1 if value is True else 0 if value is False
                                      else value)
            last.add_metric([sn], m._last_seen.get(sn, 0))
        yield from families.values()
        yield last
