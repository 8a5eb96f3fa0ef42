"""Batch writer: COPY into the hypertable, one row per (device_sn, ts), acked after commit.

The identity of a reading. `ecoflow_measurements` holds one row per device and time. A message
with the same device and time as a stored one is either a redelivery (the same payload again:
skipped) or a different message that shares the time (app pushes carry whole seconds): that
one is merged into the row, its values winning (the row is the device's snapshot after both),
its payload becoming `raw_data`, and the payload it replaced kept in `ecoflow_merged_payloads`.
(A reading without a usable device time is stored at its receive time, so its redelivery is
not recognised yet: see issue 15 item 8.)

A batch is copied straight into `ecoflow_measurements`, inside a savepoint. When that meets a
reading already stored, the batch goes through a staging table and `INSERT ... ON CONFLICT DO
UPDATE` (the merge above) instead, and so do the batches of the next minute; then the direct
path is tried again. Readings sharing a device and time inside one batch are folded the same
way before either.

When to write: a reading that arrives after a quiet period (nothing queued for `QUIET_SEC`) is
written at once, so the reading that decides a shutdown does not wait for a timer; readings
that keep coming are batched, and a batch is written when it holds `batch_rows`, when its first
reading has waited `flush_interval`, or when the readings stop coming for `QUIET_SEC`.

Rows are acknowledged (their `on_commit` callbacks run) only after the transaction holding
them has committed, which is what makes ingestion at-least-once end to end: the MQTT source
acks a message to the broker from that callback. While the database is unreachable the writer
keeps a bounded buffer and `add` blocks when it is full, so the broker holds the rest. A row
the database refuses (a value out of a column's range, say) is found by halving the batch and
goes to `ingest_errors` with its payload; the rest of the batch is stored.

No payload can stop ingestion. An `ingest_errors` entry is stored in a form the database
accepts: its text fields (topic, serial number, error) are cleaned of what no text column holds
(NUL, lone surrogates: written as `\u0000`-style escapes), and the payload keeps its bytes in the
`bytea` column. Only a failure of the connection (psycopg's OperationalError or InterfaceError,
other than a program limit a single row hit) counts as an outage; any other database error is
logged as what it is and retried with the same back-off, never mistaken for the database being
away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb, JsonbBinaryDumper

from collector.rows import TABLE_COLUMNS, VALUE_COLUMNS, Row, SnapshotMerger

log = logging.getLogger(__name__)

_COLUMNS = ", ".join(TABLE_COLUMNS)
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS ecoflow_staging
    (LIKE ecoflow_measurements INCLUDING DEFAULTS) ON COMMIT DELETE ROWS
"""
_COPY_DIRECT = f"COPY ecoflow_measurements ({_COLUMNS}) FROM STDIN"
_COPY_STAGING = f"COPY ecoflow_staging ({_COLUMNS}) FROM STDIN"
_SAME_PAYLOAD_KEPT = """EXISTS (SELECT 1 FROM ecoflow_merged_payloads p
            WHERE p.device_sn = {new}.device_sn AND p.ts = {new}.ts AND p.raw_data = {new}.raw_data)"""
# Staged rows: new ones inserted; one meeting a stored row with another payload is merged into
# it (the stored payload moves to ecoflow_merged_payloads); the same payload again is skipped.
# Returns (device_sn, ts, inserted) for each row stored or merged.
_INSERT = f"""
WITH old AS (
    SELECT m.device_sn, m.ts, m.received_at, m.source, m.raw_data
      FROM ecoflow_staging s
      JOIN ecoflow_measurements m ON m.device_sn = s.device_sn AND m.ts = s.ts
     WHERE m.raw_data <> s.raw_data AND NOT {_SAME_PAYLOAD_KEPT.format(new="s")}
), kept AS (
    INSERT INTO ecoflow_merged_payloads (device_sn, ts, received_at, source, raw_data)
    SELECT * FROM old RETURNING device_sn, ts
), stored AS (
    INSERT INTO ecoflow_measurements AS m ({_COLUMNS})
    SELECT {_COLUMNS} FROM ecoflow_staging
    ON CONFLICT (device_sn, ts) DO UPDATE SET
        {", ".join(f"{c} = EXCLUDED.{c}" for c in VALUE_COLUMNS)},
        source = EXCLUDED.source, raw_data = EXCLUDED.raw_data,
        received_at = greatest(m.received_at, EXCLUDED.received_at)
    WHERE m.raw_data <> EXCLUDED.raw_data AND NOT {_SAME_PAYLOAD_KEPT.format(new="EXCLUDED")}
    RETURNING device_sn, ts
)
SELECT device_sn, ts, NOT EXISTS (SELECT 1 FROM kept k
                                   WHERE k.device_sn = stored.device_sn AND k.ts = stored.ts)
  FROM stored
"""
_INSERT_MERGED = ("INSERT INTO ecoflow_merged_payloads (device_sn, ts, received_at, source,"
                  " raw_data) VALUES (%s, %s, %s, %s, %s)")
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
# Pack health reported with a reading (battery_packs, migration 0011): a second message about
# the same pack at the same time fills what the first left null; a redelivery changes nothing.
_PACK_COLUMNS = ("soh_percent", "cycles", "full_cap_mah", "design_cap_mah", "cell_mv_min",
                 "cell_mv_max", "temp_c_min", "temp_c_max")
_PACKS = f"""
INSERT INTO battery_packs AS b (ts, device_sn, pack, {", ".join(_PACK_COLUMNS)})
VALUES (%s, %s, %s, {", ".join(["%s"] * len(_PACK_COLUMNS))})
ON CONFLICT (device_sn, pack, ts) DO UPDATE SET
    {", ".join(f"{c} = coalesce(EXCLUDED.{c}, b.{c})" for c in _PACK_COLUMNS)}
"""

# A reading after this long without any is written at once; a burst is written once it pauses
# this long (or fills a batch, or its first reading has waited the flush interval).
QUIET_SEC = 0.1
# After a batch met readings already stored, batches take the staging path for this long.
STAGED_AFTER_CONFLICT_SEC = 60.0
# What the database says about a row's own content (SQLSTATE classes 22 and 23, and 54: a
# value too large or too deep), as opposed to the connection or the server, and text the driver
# cannot encode: such a row is set aside, never retried.
_ROW_ERRORS = (pg_errors.DataError, pg_errors.IntegrityError, pg_errors.ProgramLimitExceeded,
               UnicodeEncodeError)
_INSERT_ERRORS = ("INSERT INTO ingest_errors (source, topic, device_sn, payload, error)"
                  " VALUES (%s, %s, %s, %s, %s)")


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
        self.rows_duplicate = 0  # redeliveries skipped
        self.rows_merged = 0  # other messages with a stored reading's device and time, merged
        self.rows_rejected = 0
        self.errors_written = 0
        self.direct_conflicts = 0  # batches that met stored readings on the direct path
        self.batches_written = 0  # committed transactions that stored readings or dead letters
        self.quiet = min(QUIET_SEC, flush_interval)
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
        self._first_at = 0.0  # monotonic time the oldest queued item arrived
        self._last_add = float("-inf")  # monotonic time the last item arrived
        self._now = False  # write what is queued without waiting (after quiet, or a retry)

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
            merge, binary_safe = self.snapshots.merge, self.snapshots.binary_safe
            for row in rows:
                row.values = merge(row.device_sn, row.values)
                row.binary = binary_safe(row.device_sn)
            self._arrived()
            self._rows += rows
            if on_commit:
                self._callbacks.append(on_commit)
            if len(self._rows) >= self.batch_rows or self._now:
                self._lock.notify_all()

    def add_error(self, error: IngestError, on_commit: Callback | None = None) -> None:
        with self._lock:
            self._arrived()
            self._errors.append(error)
            if on_commit:
                self._callbacks.append(on_commit)
            if self._now:
                self._lock.notify_all()

    def _arrived(self) -> None:
        """Note an arrival (under the lock, before queueing it): the first after a quiet period
        is to be written at once."""
        now = time.monotonic()
        if not (self._rows or self._errors or self._callbacks):
            self._first_at = now
            if now - self._last_add >= self.quiet:
                self._now = True
        self._last_add = now

    def _due_in(self) -> float | None:
        """Seconds until what is queued is to be written (0: now); None when nothing is."""
        if not (self._rows or self._errors or self._callbacks):
            return None
        if self._now or len(self._rows) >= self.batch_rows:
            return 0.0
        due = min(self._first_at + self.flush_interval, self._last_add + self.quiet)
        return max(0.0, due - time.monotonic())

    def after_acks(self, hook: Callback) -> None:
        """Run `hook` once after the callbacks of each committed batch have run: a source that
        collects its acknowledgements in the callbacks sends them all from here."""
        self._after_acks.append(hook)

    # -- database ---------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, connect_timeout=5)
            self._conn.adapters.register_dumper(None, _RawJsonbBinaryDumper)
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
            self._now = False
        if not rows and not errors:
            self._acknowledge(callbacks)
            return 0
        started = time.monotonic()
        try:
            self._write(rows, errors)
        except Exception:
            with self._lock:  # put them back in front, in order; retried after the back-off
                self._rows[:0], self._errors[:0], self._callbacks[:0] = rows, errors, callbacks
                self._now = True
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None
            raise
        self.batches_written += 1
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
            refused: list = []
            stored: dict = {}  # (device_sn, ts) -> True: inserted, False: merged into a stored row
            if rows:
                unique = _fold(rows)
                if unique:
                    self._insert(cur, unique, refused, stored)
                unique = [r for r in unique if (r.device_sn, r.ts) in stored]
                _keep_merged(cur, unique, refused)
                _upsert_devices(cur, unique)
                _insert_packs(cur, rows, stored)
            rejected = [_refused_row(row, exc) for row, exc in refused]
            if errors or rejected:
                _insert_errors(cur, errors + rejected)
        inserted = sum(stored.values())
        refused_readings = sum(1 for r, _ in refused if r.merged is not _EARLIER)
        self.rows_written += inserted
        self.rows_merged += len(stored) - inserted + _folded(rows)
        self.rows_duplicate += len(rows) - len(stored) - refused_readings - _folded(rows)
        self.rows_rejected += len(refused)
        self.errors_written += len(errors) + len(rejected)
        if self.metrics:
            self.metrics.rows_written.inc(inserted)
            if refused:
                self.metrics.rows_rejected.inc(len(refused))
        for row, exc in refused:
            log.warning("the database refused a reading of %r at %s (%s); kept in ingest_errors",
                        row.device_sn, row.ts.isoformat(), _reason(exc))

    def _insert(self, cur: psycopg.Cursor, rows: list[Row], refused: list,
                stored: dict) -> None:
        """Store `rows` (no two with the same device and time), noting each in `stored`
        (True: new, False: merged into a stored row); redeliveries are left out. Rows the
        database refuses are appended to `refused` with the error."""
        if time.monotonic() >= self._staged_until:
            try:
                with cur.connection.transaction():
                    _copy(cur, _COPY_DIRECT, rows)
                stored.update(((r.device_sn, r.ts), True) for r in rows)
                return
            except pg_errors.UniqueViolation:
                self.direct_conflicts += 1
                self._staged_until = time.monotonic() + STAGED_AFTER_CONFLICT_SEC
            except _ROW_ERRORS:
                return self._isolate(cur, rows, refused, stored)
        try:
            with cur.connection.transaction():
                _staged(cur, rows, stored)
        except _ROW_ERRORS:
            self._isolate(cur, rows, refused, stored)

    def _isolate(self, cur: psycopg.Cursor, rows: list[Row], refused: list,
                 stored: dict) -> None:
        """The database refused something in `rows`: store each half on its own, halving
        again where a half is refused, down to the single rows it refuses."""
        if len(rows) == 1:
            try:
                with cur.connection.transaction():
                    _staged(cur, rows, stored)
            except _ROW_ERRORS as exc:
                refused.append((rows[0], exc))
            return
        mid = len(rows) // 2
        for half in (rows[:mid], rows[mid:]):
            try:
                with cur.connection.transaction():
                    _staged(cur, half, stored)
            except _ROW_ERRORS:
                self._isolate(cur, half, refused, stored)

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
                due = self._due_in()
                if due != 0.0:
                    self._lock.wait(self.flush_interval if due is None
                                    else min(due, self.flush_interval))
                    due = self._due_in()
            if self._stop.is_set():
                break  # stop() writes what is left
            try:
                if not self._seeded:
                    self.seed_snapshots()
                if due == 0.0:
                    self.flush()
                backoff = 0.5
            except Exception as exc:  # noqa: BLE001 - the writer thread must never die
                if is_outage(exc):
                    log.warning("database unavailable (%s); %d reading(s) buffered, retrying in"
                                " %.1f s", type(exc).__name__, self.pending, backoff)
                elif isinstance(exc, psycopg.Error):
                    log.error("the database refused a batch (%s), not an outage; %d reading(s)"
                              " buffered, retrying in %.1f s", _reason(exc), self.pending,
                              backoff)
                else:
                    log.error("writing a batch failed (%r); %d reading(s) buffered, retrying in"
                              " %.1f s", exc, self.pending, backoff,
                              exc_info=backoff == 0.5)  # the traceback once, not every retry
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
        while (self._rows or self._errors or self._callbacks) and time.monotonic() < deadline:
            try:
                self.flush()
            except psycopg.Error:
                time.sleep(0.5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# The columns' types, for binary COPY (TABLE_COLUMNS order).
_VALUE_TYPES = {"soc_percent": "float4", "soc_min_percent": "float4", "battery_temp_c": "float4",
                "grid_connected": "bool"}
_COPY_TYPES = ["timestamptz", "text", *(_VALUE_TYPES.get(c, "int4") for c in VALUE_COLUMNS),
               "text", "jsonb", "timestamptz"]
# Binary COPY is used for a batch whose every row suits it (see `_binary`); set False to write
# every batch in text, as the collector did before (the tests compare the two).
BINARY_COPY = True


def _binary(rows: list[Row]) -> bool:
    """Whether binary COPY stores `rows` exactly as text COPY would: every value of its
    column's own type (`Row.binary`, from the snapshot merge), times with a time zone, and
    texts without NUL (which the database refuses either way, with the text format's error)."""
    for row in rows:
        if not row.binary or row.ts.tzinfo is None or "\x00" in row.device_sn:
            return False
        received = row.received_at
        if received is not None and received.tzinfo is None:
            return False
    return True


def _copy(cur: psycopg.Cursor, statement: str, rows: list[Row]) -> None:
    binary = BINARY_COPY and _binary(rows)
    with cur.copy(statement + _BINARY if binary else statement) as cp:
        if binary:
            cp.set_types(_COPY_TYPES)
        write = cp.write_row
        for row in rows:
            get = row.values.get
            write((row.ts, row.device_sn, *map(get, VALUE_COLUMNS), row.source,
                   row.raw_json if row.raw_json is not None else Jsonb(row.raw_data),
                   row.received_at))


_BINARY = " (FORMAT BINARY)"


class _RawJsonbBinaryDumper(JsonbBinaryDumper):
    """jsonb for binary COPY: a str is the payload's JSON text and goes as it came (what text
    COPY sends for it); anything else (a Jsonb) is serialized as text COPY serializes it."""

    def __init__(self, cls: type, context=None):
        super().__init__(cls, context)
        self._encoding = self.connection.info.encoding if self.connection else "utf-8"

    def dump(self, obj):
        if type(obj) is str:
            return b"\x01" + obj.encode(self._encoding)
        return super().dump(obj)


def _staged(cur: psycopg.Cursor, rows: list[Row], stored: dict) -> None:
    """Through the staging table: merged into stored readings, redeliveries skipped."""
    _copy(cur, _COPY_STAGING, rows)
    cur.execute(_INSERT)
    result = cur.fetchall()
    cur.execute(_CLEAR_STAGING)  # the next staged insert of this transaction starts empty
    stored.update(((sn, ts), inserted) for sn, ts, inserted in result)


# Marks the rows `_keep_merged` stores in ecoflow_merged_payloads, should one be refused.
_EARLIER: list = []


def _fold(rows: list[Row]) -> list[Row]:
    """One row per device and time: a repeat of a payload already in the batch is dropped; a
    different payload with the same device and time is merged (the later row, whose values are
    the snapshot after both, is kept in place of the earlier and carries it in `merged`)."""
    kept: dict = {}
    for row in rows:
        row.merged = None  # (a retried batch is folded again from scratch)
    for row in rows:
        key = (row.device_sn, row.ts)
        first = kept.get(key)
        if first is None:
            kept[key] = row
            continue
        earlier = [first, *(first.merged or ())]
        if any(e.raw_data == row.raw_data for e in earlier):
            continue  # the same payload again
        row.merged = earlier
        first.merged = None
        kept[key] = row
    return list(kept.values())


def _folded(rows: list[Row]) -> int:
    """How many rows of the batch were merged into a later one inside it."""
    return sum(len(r.merged) for r in rows if r.merged and r.merged is not _EARLIER)


def _keep_merged(cur: psycopg.Cursor, rows: list[Row], refused: list) -> None:
    """Store in ecoflow_merged_payloads the payloads rows were merged over inside the batch."""
    earlier = [(row, e) for row in rows if row.merged for e in row.merged]
    if not earlier:
        return

    def params(row: Row, e: Row) -> tuple:
        return (row.device_sn, row.ts, e.received_at, e.source,
                e.raw_json if e.raw_json is not None else Jsonb(e.raw_data))

    try:
        with cur.connection.transaction():
            cur.executemany(_INSERT_MERGED, [params(r, e) for r, e in earlier])
        return
    except _ROW_ERRORS:
        pass
    for row, e in earlier:
        try:
            with cur.connection.transaction():
                cur.execute(_INSERT_MERGED, params(row, e))
        except _ROW_ERRORS as exc:
            e.merged = _EARLIER  # counted once already, as merged
            refused.append((e, exc))


def _upsert_devices(cur: psycopg.Cursor, rows: list[Row]) -> None:
    devices: dict[str, list] = {}
    for row in rows:
        ts = row.ts
        d = devices.get(row.device_sn)
        if d is None:
            devices[row.device_sn] = [row.model, ts, ts]
            continue
        if row.model:
            d[0] = row.model
        if ts < d[1]:
            d[1] = ts
        elif ts > d[2]:
            d[2] = ts
    if devices:
        cur.execute(_DEVICES, (list(devices), [storable_text(d[0]) for d in devices.values()],
                               [d[1] for d in devices.values()],
                               [d[2] for d in devices.values()]))


def _insert_packs(cur: psycopg.Cursor, rows: list[Row], stored: dict) -> None:
    """Store the pack health of the rows whose reading was stored (or merged into a stored
    one); a pack row the database refuses is logged and left out, never failing the batch."""
    params = [(row.ts, row.device_sn, pack.pack, *pack.values())
              for row in rows if row.packs and (row.device_sn, row.ts) in stored
              for pack in row.packs]
    if not params:
        return
    try:
        with cur.connection.transaction():
            cur.executemany(_PACKS, params)
        return
    except _ROW_ERRORS:
        pass
    for one in params:
        try:
            with cur.connection.transaction():
                cur.execute(_PACKS, one)
        except _ROW_ERRORS as exc:
            log.warning("the database refused pack health of %r pack %r at %s (%s)",
                        one[1], one[2], one[0].isoformat(), _reason(exc))


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot be reached (connection lost or refused, server
    shutting down), as opposed to refusing what was sent: only then is it an outage."""
    return (isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
            and not isinstance(exc, pg_errors.ProgramLimitExceeded))


def storable_text(text: str | None) -> str | None:
    """`text` as a PostgreSQL text column accepts it: NUL and lone surrogates, which no text
    column holds, written as escapes (`\\u0000`, `\\ud800`); anything else unchanged."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _insert_errors(cur: psycopg.Cursor, errors: list[IngestError]) -> None:
    """Store dead letters; one the database still refuses is stored with only its bytes and
    the reason, so a dead letter can never fail the batch carrying it."""
    params = [(storable_text(e.source), storable_text(e.topic), storable_text(e.device_sn),
               bytes(e.payload), storable_text(e.error)) for e in errors]
    try:
        with cur.connection.transaction():
            cur.executemany(_INSERT_ERRORS, params)
        return
    except _ROW_ERRORS:
        pass
    for source, topic, sn, payload, error in params:
        try:
            with cur.connection.transaction():
                cur.execute(_INSERT_ERRORS, (source, topic, sn, payload, error))
        except _ROW_ERRORS as exc:
            cur.execute(_INSERT_ERRORS, (
                source or "unknown", None, None, payload,
                f"the database refused this dead letter ({_reason(exc)}); first, it was: "
                + repr(error)[:2000]))


def _reason(exc: BaseException) -> str:
    if not isinstance(exc, psycopg.Error):
        return f"{type(exc).__name__}: {exc}"
    message = exc.diag.message_primary if exc.sqlstate else str(exc)
    return f"{exc.sqlstate or 'client'}: {message or type(exc).__name__}"


def _refused_row(row: Row, exc: BaseException) -> IngestError:
    payload = row.payload
    if payload is None:
        payload = (row.raw_json if row.raw_json is not None else repr(row.raw_data)).encode(
            "utf-8", "backslashreplace")
    return IngestError(row.source, row.topic, bytes(payload),
                       f"the database refused the reading: {_reason(exc)}", row.device_sn)
