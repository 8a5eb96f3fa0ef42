"""The collector process: sources -> pipeline -> writer, with metrics, until told to stop."""

from __future__ import annotations

import logging
import signal
import threading

import psycopg

from collector.metrics import Metrics
from collector.pipeline import Pipeline, tune_gc
from collector.settings import CollectorSettings
from collector.sources.bridge import BridgeSource
from collector.sources.liveness import Liveness, LivenessRecorder
from collector.sources.nut import NutSource
from collector.sources.simulator import Simulator, default_stations
from collector.writer import Writer
from servicekit.logging import register_secret
from servicekit.settings import DatabaseSettings

log = logging.getLogger("ecoflow.collector")

NAMES_SQL = "SELECT device_sn, name FROM devices WHERE name IS NOT NULL"


class Collector:
    def __init__(self, settings: CollectorSettings, db: DatabaseSettings):
        register_secret(settings.mqtt_pass)
        register_secret(settings.nut_password)
        register_secret(db.postgres_password)
        for secret in (settings.ecoflow_secret_key, settings.ecoflow_account_password,
                       settings.ecoflow_access_key):
            register_secret(secret)
        self.settings = settings
        self.db = db
        self.metrics = Metrics(prefix=settings.metrics_prefix,
                               name_overrides=settings.metrics_names)
        self.writer = Writer(db.libpq_url(), batch_rows=settings.batch_rows,
                             flush_interval=settings.flush_interval_sec,
                             max_buffer=settings.max_buffer_rows, metrics=self.metrics)
        # Per station and source: age of the newest reading, expected cadence, state.
        self.liveness = Liveness(settings.liveness_quiet_periods,
                                 settings.liveness_stale_periods,
                                 default_period=settings.bridge_period_sec)
        self.metrics.attach_liveness(self.liveness)
        # The same states in the database, for the collector-health dashboard.
        self.liveness_recorder = LivenessRecorder(self.liveness, db.libpq_url(),
                                                  collector=settings.client_id)
        self.pipeline = Pipeline(self.writer, metrics=self.metrics,
                                 state_interval=settings.state_interval_sec)
        self.sources: list = []
        self._stop = threading.Event()

    def start(self) -> None:
        s = self.settings
        self._load_names()
        if s.exporter_port:
            # Stations silent since before this start still get their series (online 0).
            self.metrics.load_from_database(self.db.libpq_url())
        self.writer.start()
        # The bridge subscription also consumes the simulator, which publishes like a bridge.
        if {"bridge", "simulator"} & set(s.source_list):
            bridge = BridgeSource(self.pipeline, s.mqtt_host, s.mqtt_port, s.topic_list,
                                  s.client_id, s.mqtt_user, s.mqtt_pass, s.mqtt_tls_ca)
            if s.publish_state:
                self.pipeline.publish_states(bridge.publish_state)
            bridge.liveness = self.liveness
            self.liveness.expect("bridge", s.bridge_period_sec)
            self.sources.append(bridge)
        if "simulator" in s.source_list:
            self.liveness.expect("simulator", s.simulator_interval_sec)
            self.sources.append(Simulator(
                default_stations(s.simulator_scenario), s.mqtt_host, s.mqtt_port,
                s.simulator_interval_sec, s.simulator_accel, s.mqtt_user, s.mqtt_pass,
                client_id=f"{s.client_id}-simulator"))
        if "nut" in s.source_list:
            self.liveness.expect("nut", s.nut_poll_sec)
            self.sources.append(NutSource(self.pipeline, s.nut_host, s.nut_port, s.nut_ups,
                                          s.nut_poll_sec, s.nut_device_sn, s.nut_user,
                                          s.nut_password))
        if "ecoflow" in s.source_list:
            from collector.sources.ecoflow import cloud_sources

            self.sources += cloud_sources(s, self.db.libpq_url(), self.pipeline, self.metrics,
                                          self.liveness)
        for source in self.sources:
            source.start()
        self.liveness_recorder.start()
        self.metrics.serve(s.exporter_port)
        log.info("collector running: sources %s, metrics on :%s", s.sources, s.exporter_port or "off")

    def _load_names(self) -> None:
        try:
            with psycopg.connect(self.db.libpq_url(), connect_timeout=5) as conn:
                self.pipeline.names = {sn: _topic_safe(name)
                                       for sn, name in conn.execute(NAMES_SQL).fetchall()}
        except psycopg.Error as exc:
            log.warning("device names not loaded (%s); states are published by serial number",
                        type(exc).__name__)

    def run_forever(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        tune_gc()  # the process is set up: its objects are kept out of the collector's scans
        while not self._stop.wait(5):
            self.metrics.refresh()
            self.liveness.log_changes()
        self.stop()

    def stop(self) -> None:
        # Flush first, so the final acks and states still go out on the live connections.
        self.writer.stop()
        self.pipeline.stop()
        self.liveness_recorder.stop()
        for source in self.sources:
            source.stop()
        log.info("collector stopped: %d rows written, %d duplicates skipped, %d ingest errors",
                 self.writer.rows_written, self.writer.rows_duplicate, self.writer.errors_written)


def _topic_safe(name: str) -> str:
    return "".join("_" if c in "/+#" else c for c in name)
