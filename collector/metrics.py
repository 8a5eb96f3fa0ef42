"""Prometheus metrics of the collector: per-device gauges, device liveness and info, collector
health. Names and labels: docs/prometheus.md.

Every name starts with METRICS_PREFIX (default `ecoflow`, the seed exporter's variable). The
per-device families are built when Prometheus scrapes, from the latest row of each device and
the device directory (the `devices` table, read at start and every DIRECTORY_REFRESH_SEC): a
station known to the database that has been silent since before the collector started reads
`<prefix>_online 0` instead of having no series at all, and each station's liveness uses its own
`devices.stale_after_sec`.

To add a family: a plain counter or gauge goes in `Metrics.__init__` (named with `self.name`);
one computed at scrape time goes in a `_scrape_*` method of `_ScrapeTime` and is listed in its
`collect`, or in a collector of its own added with `Metrics.register` (named `ecoflow_...`,
served under METRICS_PREFIX).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Counter_
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from collector.rows import Row

log = logging.getLogger("ecoflow.collector")

DEFAULT_PREFIX = "ecoflow"
# devices.stale_after_sec's default: a device the directory does not know yet.
DEFAULT_STALE_AFTER_SEC = 120
DIRECTORY_REFRESH_SEC = 60.0

# Column -> (name after the prefix, help, factor). Power is `*_watts` throughout, runtime in
# seconds (the column holds minutes). Renamed from earlier releases: watts_in ->
# input_watts, watts_out -> output_watts, remain_time_min -> remain_time_seconds
# (compose/prometheus/rules.yml records the old names for existing dashboards).
DEVICE_GAUGES = {
    "soc_percent": ("soc_percent", "State of charge shown by the station (%)", 1),
    "soc_min_percent": ("soc_min_percent", "Lowest SoC across battery packs (%)", 1),
    "watts_in_sum": ("input_watts", "Total input power (W)", 1),
    "watts_out_sum": ("output_watts", "Total output power (W)", 1),
    "pv_in_watts": ("pv_in_watts", "Solar input power (W)", 1),
    "ac_in_watts": ("ac_in_watts", "AC input power (W)", 1),
    "ac_out_watts": ("ac_out_watts", "AC output power (W)", 1),
    "dc_out_watts": ("dc_out_watts", "DC (12 V) output power (W)", 1),
    "typec_out_watts": ("typec_out_watts", "USB-C output power (W)", 1),
    "usb_out_watts": ("usb_out_watts", "USB-A output power (W)", 1),
    "remain_time_min": ("remain_time_seconds",
                        "Runtime left while discharging, the station's estimate (s)", 60),
    "battery_temp_c": ("battery_temp_celsius", "Battery temperature (deg C)", 1),
    "grid_connected": ("grid_connected", "AC input present (1) or not (0)", 1),
}

# The device directory and each device's latest reading, for the liveness rebuilt at start.
DIRECTORY_SQL = "SELECT device_sn, name, model, stale_after_sec FROM devices"
LATEST_SQL = ("SELECT device_sn, extract(epoch FROM ts)::float8 AS ts, "
              + ", ".join(DEVICE_GAUGES) + " FROM ecoflow_latest")


@dataclass(frozen=True)
class DeviceEntry:
    name: str | None = None
    model: str | None = None
    stale_after_sec: float = DEFAULT_STALE_AFTER_SEC


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = DEFAULT_PREFIX,
                 name_overrides: dict[str, str] | None = None):
        self.registry = registry or CollectorRegistry()
        self.prefix = prefix
        # Serial -> name given by the environment (ECOFLOW_DEVICE_NAME): wins over devices.name.
        self.name_overrides = dict(name_overrides or {})
        r, n = self.registry, self.name
        self.rows_written = Counter(n("collector_rows_written"), "Rows committed", registry=r)
        self.rows_rejected = Counter(n("collector_rows_rejected"),
                                     "Rows the database refused (kept in ingest_errors)",
                                     registry=r)
        self.batch_seconds = Histogram(n("collector_batch_write_seconds"),
                                       "Time to write one batch", registry=r)
        self.cloud_online = Gauge(n("cloud_online"),
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
        # (source, product) -> payloads kept raw because we do not map their model or module.
        self.unmapped_count: Counter_[tuple[str, str]] = Counter_()
        self._latest: dict[str, dict] = {}  # device -> values of its latest row
        self._last_seen: dict[str, float] = {}  # device -> unix time of its latest reading
        self.directory: dict[str, DeviceEntry] = {}  # replaced whole on every reload
        self._db_url: str | None = None
        self._liveness_loaded = False
        self._directory_loaded_at = 0.0
        r.register(_ScrapeTime(self))
        # Per station and source liveness (collector.sources.liveness), set by attach_liveness.
        self.liveness = None

    def attach_liveness(self, liveness) -> None:
        """Feed `liveness` from every decoded row and export its states at scrape time."""
        from collector.sources.liveness import LivenessMetrics

        self.liveness = liveness
        self.register(LivenessMetrics(liveness))

    def register(self, collector) -> None:
        """Add a scrape-time collector (a `collect()` yielding metric families) whose names
        start with `ecoflow_`: they are served with METRICS_PREFIX instead."""
        self.registry.register(collector if self.prefix == DEFAULT_PREFIX
                               else _Prefixed(collector, self.prefix))

    def name(self, suffix: str) -> str:
        return f"{self.prefix}_{suffix}"

    # -- called by the pipeline and the writer ----------------------------------------------
    def received(self, source: str) -> None:
        with self._count_lock:
            self.received_count[source] += 1

    def failed(self, source: str) -> None:
        with self._count_lock:
            self.failed_count[source] += 1

    def unmapped(self, source: str, product: str) -> None:
        """A payload stored raw without columns: a product type or module we do not map."""
        with self._count_lock:
            self.unmapped_count[(source, product)] += 1

    def decoded(self, source: str, rows: list[Row]) -> None:
        with self._count_lock:
            self.decoded_count[source] += 1
        latest, last_seen = self._latest, self._last_seen
        for row in rows:
            sn = row.device_sn
            ts = row.ts.timestamp()
            if ts >= last_seen.get(sn, 0):
                # A row's values are the device's merged snapshot (collector.rows.SnapshotMerger),
                # so the latest row holds every column the device has reported.
                latest[sn] = row.values
                last_seen[sn] = ts
        if self.liveness is not None:
            self.liveness.seen_rows(source, rows)

    # -- the database: liveness at start, the directory now and then -------------------------
    def load_from_database(self, db_url: str) -> bool:
        """Read the device directory and every device's latest reading, so a station silent
        since before this process started still has its series (online 0). Returns whether
        the database answered; without it the metrics start empty, as before."""
        import psycopg

        self._db_url = db_url
        try:
            with psycopg.connect(db_url, connect_timeout=5, autocommit=True) as conn:
                self._load_directory(conn)
                cur = conn.execute(LATEST_SQL)
                columns = [c.name for c in cur.description]
                for row in cur.fetchall():
                    values = dict(zip(columns, row))
                    sn, ts = values.pop("device_sn"), values.pop("ts")
                    if ts is not None and ts > self._last_seen.get(sn, 0):
                        self._last_seen[sn] = ts
                        self._latest[sn] = {k: v for k, v in values.items() if v is not None}
        except psycopg.Error as exc:
            self._directory_loaded_at = time.monotonic()  # refresh() tries again later
            log.warning("device liveness not loaded from the database (%s): trying again in "
                        "%.0f s", type(exc).__name__, DIRECTORY_REFRESH_SEC)
            return False
        self._liveness_loaded = True
        return True

    def refresh(self) -> None:
        """Called every few seconds by the collector: re-read the device directory (names,
        models, stale_after_sec set by the policy worker or by hand) when it is due."""
        if self._db_url is None or (
            time.monotonic() - self._directory_loaded_at < DIRECTORY_REFRESH_SEC
        ):
            return
        if not self._liveness_loaded:
            self.load_from_database(self._db_url)
            return
        import psycopg

        try:
            with psycopg.connect(self._db_url, connect_timeout=5, autocommit=True) as conn:
                self._load_directory(conn)
        except psycopg.Error as exc:
            self._directory_loaded_at = time.monotonic()  # try again next period, not at once
            log.debug("device directory not refreshed: %s", exc)

    def _load_directory(self, conn) -> None:
        self.directory = {
            sn: DeviceEntry(name, model, float(stale or DEFAULT_STALE_AFTER_SEC))
            for sn, name, model, stale in conn.execute(DIRECTORY_SQL).fetchall()}
        self._directory_loaded_at = time.monotonic()

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)


class _Prefixed:
    """A collector's families renamed from `ecoflow_...` to `<prefix>_...`."""

    def __init__(self, inner, prefix: str):
        self.inner, self.prefix = inner, prefix

    def describe(self):
        return []

    def collect(self):
        old = DEFAULT_PREFIX + "_"
        for family in self.inner.collect():
            if family.name.startswith(old):
                family.name = self.prefix + "_" + family.name[len(old):]
                family.samples = [s._replace(name=self.prefix + "_" + s.name[len(old):])
                                  if s.name.startswith(old) else s for s in family.samples]
            yield family


class _ScrapeTime:
    """The families made when Prometheus scrapes: message counters, per-device gauges,
    liveness and device info."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        yield from self._scrape_messages()
        yield from self._scrape_devices()

    def _scrape_messages(self):
        m = self.m
        for suffix, doc, counts in (
            ("collector_messages_received", "Payloads received", m.received_count),
            ("collector_messages_decoded", "Payloads decoded", m.decoded_count),
            ("collector_messages_failed", "Payloads that went to ingest_errors (dead letters)",
             m.failed_count),
        ):
            family = CounterMetricFamily(m.name(suffix), doc, labels=["source"])
            for source, count in list(counts.items()):
                family.add_metric([source], count)
            yield family
        unmapped = CounterMetricFamily(
            m.name("collector_messages_unmapped"),
            "Payloads stored raw without columns: a product type or module this collector "
            "does not decode (`decode` and `doctor` name it)", labels=["source", "product"])
        for (source, product), count in list(m.unmapped_count.items()):
            unmapped.add_metric([source, product], count)
        yield unmapped

    def _scrape_devices(self):
        m, now = self.m, time.time()
        directory, latest, last_seen = m.directory, dict(m._latest), dict(m._last_seen)
        families = {col: GaugeMetricFamily(m.name(suffix), doc, labels=["device"])
                    for col, (suffix, doc, _factor) in DEVICE_GAUGES.items()}
        last = GaugeMetricFamily(m.name("last_reading_timestamp_seconds"),
                                 "Unix time of the device's latest reading", labels=["device"])
        since = GaugeMetricFamily(m.name("seconds_since_last_reading"),
                                  "Seconds since the device's latest reading", labels=["device"])
        online = GaugeMetricFamily(
            m.name("online"), "Device reported within its freshness limit "
            "(devices.stale_after_sec); 0 for a known device silent since before the start",
            labels=["device"])
        stale = GaugeMetricFamily(m.name("stale_after_seconds"),
                                  "Freshness limit of the device (devices.stale_after_sec)",
                                  labels=["device"])
        info = InfoMetricFamily(m.name("device"), "The device's name and model (value 1)",
                                labels=["device"])
        for sn in sorted(set(directory) | set(last_seen)):
            entry = directory.get(sn, DeviceEntry())
            values = latest.get(sn, {})
            for col, family in families.items():
                # A column the device never reported has no sample: a 0 would read as an
                # empty battery or a lost grid to an alert rule.
                value = values.get(col)
                if value is not None:
                    factor = DEVICE_GAUGES[col][2]
                    family.add_metric([sn], 1 if value is True else 0 if value is False
                                      else value * factor)
            seen = last_seen.get(sn)
            if seen is not None:
                last.add_metric([sn], seen)
                since.add_metric([sn], max(0.0, now - seen))
            online.add_metric([sn], 1 if seen is not None
                              and now - seen <= entry.stale_after_sec else 0)
            stale.add_metric([sn], entry.stale_after_sec)
            info.add_metric([sn], {"name": m.name_overrides.get(sn) or entry.name or sn,
                                   "model": entry.model or ""})
        yield from families.values()
        yield from (last, since, online, stale, info)
