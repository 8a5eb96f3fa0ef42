"""Stream one station's readings, outages or daily energy out of the database.

CSV goes through PostgreSQL's COPY: the server formats the rows and psycopg hands each chunk
on as it arrives. Parquet reads a server-side cursor `batch_rows` rows at a time and writes
each batch as one row group, so memory holds one batch whatever the time range.

The range is half-open: from inclusive, to exclusive, on the row's own time (a reading's
`ts`, an outage's `started_at`, the start of an energy day in the export's time zone).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import BinaryIO

import psycopg
from psycopg import sql

WHAT = ("readings", "outages", "daily-energy")
FORMATS = ("csv", "parquet")
BATCH_ROWS = 50_000

READING_COLUMNS = (
    "ts", "device_sn", "soc_percent", "soc_min_percent", "remain_time_min", "watts_in_sum",
    "watts_out_sum", "ac_in_watts", "ac_out_watts", "dc_out_watts", "typec_out_watts",
    "usb_out_watts", "pv_in_watts", "grid_connected", "battery_temp_c", "source",
)

READINGS = """
SELECT {columns}
  FROM ecoflow_measurements
 WHERE device_sn = {device} AND ts >= {start} AND ts < {end}
 ORDER BY ts
"""

# The `outages` view (one row per grid-loss episode); `duration` is left out for
# `duration_sec`, which every format can hold.
OUTAGES = """
SELECT device_sn, started_at, ended_at, ongoing, duration_sec, soc_start_percent,
       soc_end_percent, soc_min_percent, energy_out_wh, readings
  FROM outages
 WHERE device_sn = {device} AND started_at >= {start} AND started_at < {end}
 ORDER BY started_at
"""

# The `energy_daily` view; its days are days in the session's time zone (--timezone).
DAILY_ENERGY = """
SELECT device_sn, day::date AS day, wh_in, wh_out, wh_solar, readings
  FROM energy_daily
 WHERE device_sn = {device} AND day >= {start} AND day < {end}
 ORDER BY day
"""

DEVICE_KNOWN = """
SELECT EXISTS (SELECT 1 FROM devices WHERE device_sn = %(sn)s)
    OR EXISTS (SELECT 1 FROM ecoflow_measurements WHERE device_sn = %(sn)s)
"""

KNOWN_DEVICES = """
SELECT device_sn FROM devices
UNION
SELECT device_sn FROM ecoflow_latest
ORDER BY 1 LIMIT 21
"""


class ExportError(Exception):
    """Input the export cannot use; the message names the flag and what to do."""


@dataclass
class ExportStats:
    rows: int = 0
    batches: int = 0
    largest_batch: int = 0  # rows (Parquet) or bytes (CSV) held at once
    seconds: float = 0.0


class Progress:
    """Rows and rate on stderr every `every` seconds, once an export has run that long."""

    def __init__(self, stream=None, every: float = 2.0, clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.clock = clock
        self.started = clock()
        self.last = self.started
        self.shown = False

    def update(self, rows: int) -> None:
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.shown = True
            self._line(f"{rows:,} rows, {self._rate(rows, now):,.0f} rows/s")

    def done(self, rows: int) -> None:
        if self.shown:
            now = self.clock()
            self._line(f"done: {rows:,} rows in {now - self.started:.1f} s "
                       f"({self._rate(rows, now):,.0f} rows/s)")

    def _rate(self, rows: int, now: float) -> float:
        return rows / max(now - self.started, 1e-9)

    def _line(self, text: str) -> None:
        print(f"ecoflow-export: {text}", file=self.stream, flush=True)


def check_device(conn: psycopg.Connection, device: str) -> None:
    if conn.execute(DEVICE_KNOWN, {"sn": device}).fetchone()[0]:
        return
    known = [r[0] for r in conn.execute(KNOWN_DEVICES).fetchall()]
    if not known:
        hint = "the database has no stations yet"
    else:
        hint = "known: " + ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
    raise ExportError(f"--device {device}: no such station in the database ({hint})")


def query(what: str, device: str, start: datetime, end: datetime,
          with_raw: bool = False) -> sql.Composed:
    if what not in WHAT:
        raise ExportError(f"--what {what}: choose one of {', '.join(WHAT)}")
    template = {"readings": READINGS, "outages": OUTAGES, "daily-energy": DAILY_ENERGY}[what]
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in READING_COLUMNS)
    if with_raw:
        columns = sql.SQL("{}, raw_data::text AS raw_data").format(columns)
    return sql.SQL(template).format(columns=columns, device=sql.Literal(device),
                                    start=sql.Literal(start), end=sql.Literal(end))


def export(conn: psycopg.Connection, out: BinaryIO, *, what: str, device: str,
           start: datetime, end: datetime, fmt: str, timezone: str = "UTC",
           with_raw: bool = False, batch_rows: int = BATCH_ROWS,
           progress: Progress | None = None) -> ExportStats:
    """Write the rows to `out` (a binary stream) and say how many there were.

    `conn` must not be in autocommit mode: the server-side cursor lives in its transaction,
    which is rolled back at the end (nothing is written)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose csv or parquet")
    if end <= start:
        raise ExportError("--to must be later than --from (the range is from inclusive, "
                          "to exclusive)")
    try:
        conn.execute("SELECT set_config('TimeZone', %s, true)", [timezone])
    except psycopg.errors.InvalidParameterValue:
        conn.rollback()
        raise ExportError(f"--timezone {timezone}: the database does not know this time zone "
                          "(use an IANA name such as Europe/Berlin, or UTC)") from None
    check_device(conn, device)
    stmt = query(what, device, start, end, with_raw)
    progress = progress or Progress()
    started = time.monotonic()
    try:
        if fmt == "csv":
            stats = _csv(conn, out, stmt, progress)
        else:
            stats = _parquet(conn, out, stmt, batch_rows, progress)
    finally:
        conn.rollback()
    stats.seconds = time.monotonic() - started
    progress.done(stats.rows)
    return stats


def _csv(conn: psycopg.Connection, out: BinaryIO, stmt: sql.Composed,
         progress: Progress) -> ExportStats:
    stats = ExportStats()
    copy_stmt = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(stmt)
    newlines = 0
    with conn.cursor() as cur, cur.copy(copy_stmt) as copy:
        for view in copy:
            chunk = bytes(view)  # one chunk of the server's output, a few KiB
            out.write(chunk)
            # No exported value holds a raw newline (jsonb text escapes them), so each one
            # ends a row; the first ends the header.
            newlines += chunk.count(b"\n")
            stats.batches += 1
            stats.largest_batch = max(stats.largest_batch, len(chunk))
            progress.update(max(newlines - 1, 0))
    out.flush()
    stats.rows = max(newlines - 1, 0)
    return stats


def _parquet(conn: psycopg.Connection, out: BinaryIO, stmt: sql.Composed, batch_rows: int,
             progress: Progress) -> ExportStats:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stats = ExportStats()
    with conn.cursor(name="ecoflow_export") as cur:
        cur.itersize = batch_rows
        cur.execute(stmt)
        names = [d.name for d in cur.description]
        types = [_arrow_type(pa, d.type_code) for d in cur.description]
        schema = pa.schema(list(zip(names, types)))
        writer = pq.ParquetWriter(out, schema, compression="zstd")
        try:
            while rows := cur.fetchmany(batch_rows):
                columns = list(zip(*rows))
                arrays = [pa.array(_values(col, t), type=t) for col, t in zip(columns, types)]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                stats.rows += len(rows)
                stats.batches += 1
                stats.largest_batch = max(stats.largest_batch, len(rows))
                progress.update(stats.rows)
        finally:
            writer.close()
    out.flush()
    return stats


# PostgreSQL type OIDs to Arrow types: timestamptz as UTC timestamps, real as float32 and so
# on; anything else (text, the cast raw payload) as strings.
_OIDS = {16: "bool", 20: "int64", 21: "int16", 23: "int32", 700: "float32", 701: "float64",
         1700: "float64", 1082: "date32", 1114: "timestamp", 1184: "timestamptz"}


def _arrow_type(pa, oid: int):
    name = _OIDS.get(oid, "string")
    if name == "timestamptz":
        return pa.timestamp("us", tz="UTC")
    if name == "timestamp":
        return pa.timestamp("us")
    return getattr(pa, name)() if name != "bool" else pa.bool_()


def _values(column, arrow_type):
    if str(arrow_type) in ("float64", "float32"):
        return [float(v) if isinstance(v, Decimal) else v for v in column]
    if str(arrow_type) == "string":
        return [v if v is None or isinstance(v, str) else str(v) for v in column]
    return column
