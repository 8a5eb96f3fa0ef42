"""Batch writer: COPY into the hypertable, deduplicated on (device_sn, ts), acked after commit.

A batch is copied straight into `ecoflow_measurements`, inside a savepoint. When that meets a
reading already stored (a message the broker delivered again after a restart), the batch goes
through a staging table and `INSERT ... ON CONFLICT DO NOTHING` instead, and so do the batches
of the next minute; then the direct path is tried again. Readings repeated inside one batch are
dropped before either (the first wins, as ON CONFLICT DO NOTHING would keep it).

Rows are acknowledged (their `on_commit` callbacks run) only after the transaction holding
them has committed, which is what makes ingestion at-least-once end to end: the MQTT source
acks a message to the broker from that callback. While the database is unreachable the writer
keeps a bounded buffer and `add` blocks when it is full, so the broker holds the rest. A row
the database refuses (a value out of a column's range, say) is found by halving the batch and
goes to `ingest_errors` with its payload; the rest of the batch is stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from collector.rows import TABLE_COLUMNS, VALUE_COLUMNS, Row, SnapshotMerger

log = logging.getLogger(__name__)

_COLUMNS = ", ".join(TABLE_COLUMNS)
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS ecoflow_staging
    (LIKE ecoflow_measurements INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_COPY_DIRECT = f"COPY ecoflow_measurements ({_COLUMNS}) FROM STDIN"
_COPY_STAGING = f"COPY ecoflow_staging ({_COLUMNS}) FROM STDIN"
_INSERT = (
    f"INSERT INTO ecoflow_measurements ({_COLUMNS}) SELECT {_COLUMNS} FROM ecoflow_staging"
    " ON CONFLICT (device_sn, ts) DO NOTHING"
)
_CLEAR_STAGING = "DELETE FROM ecoflow_staging"
_DEVICES = """
INSERT INTO devices AS d (device_sn, model, first_seen, last_seen)
SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[])
ON CONFLICT (device_sn) DO UPDATE SET
    model      = coalesce(EXCLUDED.model, d.model),
    first_seen = least(d.first_seen, EXCLUDED.first_seen),
    last_seen  = greatest(d.last_seen, EXCLUDED.last_seen),
    updated_at = now()
"""
_LATEST = f"SELECT device_sn, {', '.join(VALUE_COLUMNS)} FROM ecoflow_latest"

# After a batch met readings already stored, batches take the staging path for this long.
STAGED_AFTER_CONFLICT_SEC = 60.0
# What the database says about a row's own content (SQLSTATE classes 22 and 23), as opposed to
# the connection or the server: such a row is set aside, never retried.
_ROW_ERRORS = (pg_errors.DataError, pg_errors.IntegrityError)


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
        self.rows_rejected = 0
        self.errors_written = 0
        self.direct_conflicts = 0  # batches that met stored readings on the direct path
        self._staged_until = 0.0  # monotonic time; before it, batches take the staging path
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
            self._write(rows, errors)
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

    def _write(self, rows: list[Row], errors: list[IngestError]) -> None:
        conn = self._connect()
        with conn.transaction(), conn.cursor() as cur:
            inserted, refused = 0, []
            if rows:
                unique = _first_of_each(rows)
                inserted = self._insert(cur, unique, refused)
                if refused:
                    gone = {id(r) for r, _ in refused}
                    unique = [r for r in unique if id(r) not in gone]
                _upsert_devices(cur, unique)
            rejected = [_refused_row(row, exc) for row, exc in refused]
            if errors or rejected:
                cur.executemany(
                    "INSERT INTO ingest_errors (source, topic, device_sn, payload, error)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [(e.source, e.topic, e.device_sn, e.payload, e.error)
                     for e in errors + rejected],
                )
        self.rows_written += inserted
        self.rows_duplicate += len(rows) - inserted - len(refused)
        self.rows_rejected += len(refused)
        self.errors_written += len(errors) + len(rejected)
        if self.metrics:
            self.metrics.rows_written.inc(inserted)
            if refused:
                self.metrics.rows_rejected.inc(len(refused))
        for row, exc in refused:
            log.warning("the database refused a reading of %s at %s (%s); kept in ingest_errors",
                        row.device_sn, row.ts.isoformat(), _reason(exc))

    def _insert(self, cur: psycopg.Cursor, rows: list[Row], refused: list) -> int:
        """Store `rows` (no two with the same device and time); returns how many were new.
        Rows the database refuses are appended to `refused` with the error."""
        if time.monotonic() >= self._staged_until:
            try:
                with cur.connection.transaction():
                    _copy(cur, _COPY_DIRECT, rows)
                return len(rows)
            except pg_errors.UniqueViolation:
                self.direct_conflicts += 1
                self._staged_until = time.monotonic() + STAGED_AFTER_CONFLICT_SEC
            except _ROW_ERRORS:
                return self._isolate(cur, rows, refused)
        try:
            with cur.connection.transaction():
                return _staged(cur, rows)
        except _ROW_ERRORS:
            return self._isolate(cur, rows, refused)

    def _isolate(self, cur: psycopg.Cursor, rows: list[Row], refused: list) -> int:
        """The database refused something in `rows`: store each half on its own, halving
        again where a half is refused, down to the single rows it refuses."""
        if len(rows) == 1:
            try:
                with cur.connection.transaction():
                    return _staged(cur, rows)
            except _ROW_ERRORS as exc:
                refused.append((rows[0], exc))
                return 0
        mid = len(rows) // 2
        inserted = 0
        for half in (rows[:mid], rows[mid:]):
            try:
                with cur.connection.transaction():
                    inserted += _staged(cur, half)
            except _ROW_ERRORS:
                inserted += self._isolate(cur, half, refused)
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


def _copy(cur: psycopg.Cursor, statement: str, rows: list[Row]) -> None:
    with cur.copy(statement) as cp:
        write = cp.write_row
        for row in rows:
            get = row.values.get
            write((row.ts, row.device_sn, *map(get, VALUE_COLUMNS), row.source,
                   row.raw_json if row.raw_json is not None else Jsonb(row.raw_data),
                   row.received_at))


def _staged(cur: psycopg.Cursor, rows: list[Row]) -> int:
    """Through the staging table, skipping readings already stored; returns rows inserted."""
    _copy(cur, _COPY_STAGING, rows)
    cur.execute(_INSERT)
    inserted = cur.rowcount
    cur.execute(_CLEAR_STAGING)  # the next staged insert of this transaction starts empty
    return inserted


def _first_of_each(rows: list[Row]) -> list[Row]:
    """The rows without repeats of a (device, time) pair; the first of each is kept."""
    seen: set = set()
    unique = []
    for row in rows:
        key = (row.device_sn, row.ts)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _upsert_devices(cur: psycopg.Cursor, rows: list[Row]) -> None:
    devices: dict[str, list] = {}
    for row in rows:
        d = devices.get(row.device_sn)
        if d is None:
            devices[row.device_sn] = [row.model, row.ts, row.ts]
            continue
        if row.model:
            d[0] = row.model
        if row.ts < d[1]:
            d[1] = row.ts
        elif row.ts > d[2]:
            d[2] = row.ts
    if devices:
        cur.execute(_DEVICES, (list(devices), [d[0] for d in devices.values()],
                               [d[1] for d in devices.values()],
                               [d[2] for d in devices.values()]))


def _reason(exc: psycopg.Error) -> str:
    return f"{exc.sqlstate}: {exc.diag.message_primary or type(exc).__name__}"


def _refused_row(row: Row, exc: psycopg.Error) -> IngestError:
    payload = row.payload
    if payload is None:
        payload = (row.raw_json if row.raw_json is not None else repr(row.raw_data)).encode()
    return IngestError(row.source, row.topic, bytes(payload),
                       f"the database refused the reading: {_reason(exc)}", row.device_sn)
