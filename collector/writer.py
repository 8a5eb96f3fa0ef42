"""Batch writer: COPY into a staging table, then INSERT ... ON CONFLICT DO NOTHING.

Rows are acknowledged (their `on_commit` callbacks run) only after the transaction holding
them has committed, which is what makes ingestion at-least-once end to end: the MQTT source
acks a message to the broker from that callback. While the database is unreachable the writer
keeps a bounded buffer and `add` blocks when it is full, so the broker holds the rest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from collector.rows import TABLE_COLUMNS, VALUE_COLUMNS, Row, SnapshotMerger

log = logging.getLogger(__name__)

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS ecoflow_staging
    (LIKE ecoflow_measurements INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_INSERT = (
    f"INSERT INTO ecoflow_measurements ({', '.join(TABLE_COLUMNS)})"
    f" SELECT {', '.join(TABLE_COLUMNS)} FROM ecoflow_staging"
    " ON CONFLICT (device_sn, ts) DO NOTHING"
)
_DEVICES = """
INSERT INTO devices AS d (device_sn, model, first_seen, last_seen)
SELECT device_sn, max(%(model)s::jsonb ->> device_sn), min(ts), max(ts)
  FROM ecoflow_staging GROUP BY device_sn
ON CONFLICT (device_sn) DO UPDATE SET
    model      = coalesce(EXCLUDED.model, d.model),
    first_seen = least(d.first_seen, EXCLUDED.first_seen),
    last_seen  = greatest(d.last_seen, EXCLUDED.last_seen),
    updated_at = now()
"""
_COPY = f"COPY ecoflow_staging ({', '.join(TABLE_COLUMNS)}) FROM STDIN"
_LATEST = f"SELECT device_sn, {', '.join(VALUE_COLUMNS)} FROM ecoflow_latest"


@dataclass
class IngestError:
    source: str
    topic: str | None
    payload: bytes
    error: str
    device_sn: str | None = None


Callback = Callable[[], None]


class Writer:
    def __init__(self, dsn: str, batch_rows: int = 1000, flush_interval: float = 1.0,
                 max_buffer: int = 50_000, retry_max_sec: float = 30.0, metrics=None):
        self.dsn = dsn
        self.metrics = metrics
        self.batch_rows = batch_rows
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self.retry_max_sec = retry_max_sec
        self.snapshots = SnapshotMerger()
        self.rows_written = 0
        self.rows_duplicate = 0
        self.errors_written = 0
        self._rows: list[Row] = []
        self._errors: list[IngestError] = []
        self._callbacks: list[Callback] = []
        self._after_acks: list[Callback] = []
        self._lock = threading.Condition()
        self._conn: psycopg.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seeded = False

    # -- producers --------------------------------------------------------------------------
    def add(self, row: Row, on_commit: Callback | None = None) -> None:
        """Queue a reading; its values are merged into the device's snapshot first."""
        self.add_rows([row], on_commit)

    def add_rows(self, rows: list[Row], on_commit: Callback | None = None) -> None:
        """Queue the readings of one payload, then `on_commit` to run once they are committed
        (also when `rows` is empty: the payload is handled once what came before is)."""
        with self._lock:
            while len(self._rows) >= self.max_buffer and not self._stop.is_set():
                self._lock.wait(0.5)
            merge = self.snapshots.merge
            for row in rows:
                row.values = merge(row.device_sn, row.values)
            self._rows += rows
            if on_commit:
                self._callbacks.append(on_commit)
            if len(self._rows) >= self.batch_rows:
                self._lock.notify_all()

    def add_error(self, error: IngestError, on_commit: Callback | None = None) -> None:
        with self._lock:
            self._errors.append(error)
            if on_commit:
                self._callbacks.append(on_commit)

    def after_acks(self, hook: Callback) -> None:
        """Run `hook` once after the callbacks of each committed batch have run: a source that
        collects its acknowledgements in the callbacks sends them all from here."""
        self._after_acks.append(hook)

    # -- database ---------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, connect_timeout=5)
            self._conn.execute(_STAGING)
            self._conn.commit()
        return self._conn

    def seed_snapshots(self) -> None:
        """Start each device's snapshot from its latest stored row (survives restarts)."""
        conn = self._connect()
        with conn.cursor() as cur:
            cur.execute(_LATEST)
            for sn, *values in cur.fetchall():
                self.snapshots.seed(sn, dict(zip(VALUE_COLUMNS, values)))
        conn.commit()
        self._seeded = True

    def flush(self) -> int:
        """Write everything queued in one transaction; returns rows handed to the database.
        Raises psycopg.OperationalError when the database is unreachable (nothing is lost)."""
        with self._lock:
            rows, errors, callbacks = self._rows, self._errors, self._callbacks
            self._rows, self._errors, self._callbacks = [], [], []
        if not rows and not errors:
            self._acknowledge(callbacks)
            return 0
        started = time.monotonic()
        try:
            inserted = self._write(rows, errors)
        except Exception:
            with self._lock:  # put them back in front, in order
                self._rows[:0], self._errors[:0], self._callbacks[:0] = rows, errors, callbacks
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None
            raise
        if self.metrics:
            self.metrics.rows_written.inc(inserted)
            self.metrics.batch_seconds.observe(time.monotonic() - started)
        with self._lock:
            self._lock.notify_all()
        self._acknowledge(callbacks)
        return len(rows)

    def _acknowledge(self, callbacks: list[Callback]) -> None:
        for cb in callbacks:
            try:
                cb()
            except Exception:  # an ack for a dropped connection must not undo the write
                log.exception("acknowledging a committed message failed")
        if callbacks:
            for hook in self._after_acks:
                try:
                    hook()
                except Exception:
                    log.exception("sending the acknowledgements of a committed batch failed")

    def _write(self, rows: list[Row], errors: list[IngestError]) -> int:
        inserted = 0
        conn = self._connect()
        with conn.transaction(), conn.cursor() as cur:
            if rows:
                with cur.copy(_COPY) as cp:
                    write = cp.write_row
                    for row in rows:
                        get = row.values.get
                        write((row.ts, row.device_sn, *map(get, VALUE_COLUMNS), row.source,
                               row.raw_json if row.raw_json is not None else Jsonb(row.raw_data)))
                cur.execute(_INSERT)
                inserted = cur.rowcount
                models = {r.device_sn: r.model for r in rows if r.model}
                cur.execute(_DEVICES, {"model": json.dumps(models)})
                self.rows_written += inserted
                self.rows_duplicate += len(rows) - inserted
            if errors:
                cur.executemany(
                    "INSERT INTO ingest_errors (source, topic, device_sn, payload, error)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [(e.source, e.topic, e.device_sn, e.payload, e.error) for e in errors],
                )
                self.errors_written += len(errors)
        return inserted

    # -- background loop --------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.seed_snapshots()
        except psycopg.Error as exc:
            log.warning("database unavailable at start (%s); will retry", type(exc).__name__)
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            with self._lock:
                self._lock.wait_for(
                    lambda: len(self._rows) >= self.batch_rows or self._stop.is_set(),
                    timeout=self.flush_interval,
                )
            try:
                if not self._seeded:
                    self.seed_snapshots()
                self.flush()
                backoff = 0.5
            except psycopg.Error as exc:
                log.warning("database unavailable (%s); %d reading(s) buffered, retrying in %.1f s",
                            type(exc).__name__, self.pending, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_sec)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def stop(self, timeout: float = 10.0) -> None:
        """Flush what is queued (as far as the database allows) and stop."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while (self._rows or self._errors) and time.monotonic() < deadline:
            try:
                self.flush()
            except psycopg.Error:
                time.sleep(0.5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
