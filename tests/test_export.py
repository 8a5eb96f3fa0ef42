"""ecoflow-export against the real database, connected as the read-only role: what it writes
is what the table and the views hold, in CSV (COPY) and Parquet (a server-side cursor)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exporter import cli
from exporter.export import READING_COLUMNS, Progress, export
from servicekit import reader
from servicekit.settings import DatabaseSettings
from tests.services import READONLY_PASSWORD, READONLY_USER

ROOT = Path(__file__).resolve().parent.parent
UTC = timezone.utc
DAY = datetime(2024, 5, 1, tzinfo=UTC)
SN = "EXP0001"

# A day of readings every 30 s: SoC falling and rising, nulls now and then, the grid lost
# from 10:00 to 11:00 (one outage), solar in the afternoon.
INSERT_DAY = """
INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent, remain_time_min,
    watts_in_sum, watts_out_sum, ac_in_watts, ac_out_watts, dc_out_watts, typec_out_watts,
    usb_out_watts, pv_in_watts, grid_connected, battery_temp_c, source, raw_data)
SELECT ts, %(sn)s, 50 + (i %% 50) * 0.5, 49.5 + (i %% 50) * 0.5,
       CASE WHEN i %% 11 = 0 THEN NULL ELSE 100 + i %% 300 END,
       i %% 400, 100 + i %% 50, i %% 300, 90 + i %% 40, i %% 7, i %% 3, i %% 5,
       CASE WHEN extract(hour FROM ts) BETWEEN 13 AND 16 THEN 150 + i %% 20 ELSE 0 END,
       NOT (ts >= %(day)s + interval '10 hours' AND ts < %(day)s + interval '11 hours'),
       CASE WHEN i %% 7 = 0 THEN NULL ELSE 20 + (i %% 10) * 0.25 END,
       'simulator', jsonb_build_object('i', i, 'note', 'line' || chr(10) || 'break')
  FROM generate_series(0, 2879) AS i,
       LATERAL (SELECT %(day)s + i * interval '30 seconds' AS ts) t
"""


def reader_url(db_url: str) -> str:
    parts = urlsplit(db_url)
    netloc = f"{READONLY_USER}:{READONLY_PASSWORD}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def day_db(db, db_url):
    db.execute("INSERT INTO devices (device_sn, name) VALUES (%s, 'Study')", [SN])
    db.execute(INSERT_DAY, {"sn": SN, "day": DAY})
    return reader_url(db_url)


def run(url: str, *args: str, capsys=None) -> tuple[int, str]:
    try:
        code = cli.main(["--database-url", url, *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err if capsys else ""
    return code, err


def owner_rows(db, query: str, *params) -> list[tuple]:
    db.execute("SET TimeZone = 'UTC'")
    return db.execute(query, params).fetchall()


def readings(db, start=DAY, end=DAY + timedelta(days=1)):
    cols = ", ".join(READING_COLUMNS)
    return owner_rows(db, f"SELECT {cols} FROM ecoflow_measurements WHERE device_sn = %s"
                          " AND ts >= %s AND ts < %s ORDER BY ts", SN, start, end)


def csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def from_csv(value: str, like):
    """A CSV cell as the Python value psycopg gives for the same column."""
    if value == "":
        return None
    if isinstance(like, bool):
        return value == "t"
    if isinstance(like, datetime):
        return datetime.fromisoformat(value)
    if isinstance(like, date):
        return date.fromisoformat(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, int):
        return int(value)
    return value


def assert_csv_equals(path: Path, expected: list[tuple], columns: list[str]) -> None:
    header, rows = csv_rows(path)
    assert header == columns
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected):
        like = [w if w is not None else next((r[i] for r in expected if r[i] is not None), "")
                for i, w in enumerate(want)]
        assert tuple(from_csv(v, lk) for v, lk in zip(got, like)) == want


# -- CSV ---------------------------------------------------------------------------------------
def test_csv_readings_equal_the_rows(day_db, db, tmp_path, capsys):
    out = tmp_path / "readings.csv"
    code, err = run(day_db, "--device", SN, "--from", "2024-05-01", "--to", "2024-05-02",
                    "--format", "csv", "--output", str(out), capsys=capsys)
    assert code == 0, err
    expected = readings(db)
    assert len(expected) == 2880
    assert_csv_equals(out, expected, list(READING_COLUMNS))
    assert "2,880 rows" in err
    assert not (tmp_path / "readings.csv.part").exists()


def test_csv_with_raw_keeps_the_payload_on_one_line(day_db, db, tmp_path, capsys):
    out = tmp_path / "raw.csv"
    code, err = run(day_db, "--device", SN, "--from", "2024-05-01T00:00:00Z",
                    "--to", "2024-05-01T00:05:00Z", "--with-raw", "--output", str(out),
                    capsys=capsys)
    assert code == 0, err
    header, rows = csv_rows(out)
    assert header[-1] == "raw_data" and len(rows) == 10
    assert out.read_text().count("\n") == 11  # the newline inside the payload stays escaped
    assert rows[3][-1] == '{"i": 3, "note": "line\\nbreak"}'


# -- Parquet -----------------------------------------------------------------------------------
def test_parquet_readings_read_back_with_their_types(day_db, db, tmp_path, capsys):
    out = tmp_path / "readings.parquet"
    code, err = run(day_db, "--device", SN, "--from", "2024-05-01", "--to", "2024-05-02",
                    "--format", "parquet", "--output", str(out), capsys=capsys)
    assert code == 0, err
    table = pq.read_table(out)
    schema = dict(zip(table.schema.names, table.schema.types))
    assert table.schema.names == list(READING_COLUMNS)
    assert schema["ts"] == pa.timestamp("us", tz="UTC")
    assert schema["soc_percent"] == pa.float32()
    assert schema["remain_time_min"] == pa.int32()
    assert schema["grid_connected"] == pa.bool_()
    assert schema["device_sn"] == pa.string()
    got = [tuple(r.values()) for r in table.to_pylist()]
    assert got == readings(db)
    assert got[0][0] == DAY and got[0][0].utcoffset() == timedelta(0)


def test_parquet_timestamps_are_utc_whatever_the_export_time_zone(day_db, db, tmp_path, capsys):
    out = tmp_path / "berlin.parquet"
    code, err = run(day_db, "--device", SN, "--from", "2024-05-01T02:00",
                    "--to", "2024-05-01T02:01", "--timezone", "Europe/Berlin",
                    "--format", "parquet", "--output", str(out), capsys=capsys)
    assert code == 0, err
    ts = pq.read_table(out).column("ts").to_pylist()
    # 02:00 in Berlin (summer time) is midnight UTC.
    assert ts == [DAY, DAY + timedelta(seconds=30)]


def test_parquet_to_stdout_through_a_pipe(day_db, db):
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
    env["DATABASE_URL"] = day_db
    proc = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "--device", SN, "--from", "2024-05-01T00:00Z",
         "--to", "2024-05-01T01:00Z", "--format", "parquet"],
        capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    table = pq.read_table(io.BytesIO(proc.stdout))
    assert table.num_rows == 120
    assert READONLY_PASSWORD.encode() not in proc.stderr


# -- the range ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_range_is_from_inclusive_to_exclusive(day_db, db, tmp_path, capsys, fmt):
    out = tmp_path / f"edge.{fmt}"
    # Readings at exactly 00:01:00 and 00:02:00: the first is in, the second is not.
    code, err = run(day_db, "--device", SN, "--from", "2024-05-01T00:01:00+00:00",
                    "--to", "2024-05-01T00:02:00+00:00", "--format", fmt,
                    "--output", str(out), capsys=capsys)
    assert code == 0, err
    if fmt == "csv":
        ts = [datetime.fromisoformat(r[0]) for r in csv_rows(out)[1]]
    else:
        ts = pq.read_table(out).column("ts").to_pylist()
    assert ts == [DAY + timedelta(minutes=1), DAY + timedelta(minutes=1, seconds=30)]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_empty_range_writes_the_columns_and_no_rows(day_db, tmp_path, capsys, fmt):
    out = tmp_path / f"empty.{fmt}"
    code, err = run(day_db, "--device", SN, "--from", "2023-01-01", "--to", "2023-02-01",
                    "--format", fmt, "--output", str(out), capsys=capsys)
    assert code == 0, err
    if fmt == "csv":
        assert csv_rows(out) == (list(READING_COLUMNS), [])
    else:
        table = pq.read_table(out)
        assert table.num_rows == 0 and table.schema.names == list(READING_COLUMNS)
        assert table.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert "0 rows" in err


# -- outages and daily energy ------------------------------------------------------------------
OUTAGES = """SELECT device_sn, started_at, ended_at, ongoing, duration_sec, soc_start_percent,
                    soc_end_percent, soc_min_percent, energy_out_wh, readings
               FROM outages WHERE device_sn = %s ORDER BY started_at"""
ENERGY = """SELECT device_sn, day::date, wh_in, wh_out, wh_solar, readings
              FROM energy_daily WHERE device_sn = %s ORDER BY day"""


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_outages_equal_the_outages_view(day_db, db, tmp_path, capsys, fmt):
    out = tmp_path / f"outages.{fmt}"
    code, err = run(day_db, "--device", SN, "--what", "outages", "--from", "2024-05-01",
                    "--to", "2024-05-02", "--format", fmt, "--output", str(out), capsys=capsys)
    assert code == 0, err
    expected = owner_rows(db, OUTAGES, SN)
    assert len(expected) == 1 and expected[0][1] == DAY + timedelta(hours=10)
    columns = ["device_sn", "started_at", "ended_at", "ongoing", "duration_sec",
               "soc_start_percent", "soc_end_percent", "soc_min_percent", "energy_out_wh",
               "readings"]
    if fmt == "csv":
        assert_csv_equals(out, expected, columns)
    else:
        table = pq.read_table(out)
        assert table.schema.field("started_at").type == pa.timestamp("us", tz="UTC")
        assert table.schema.field("readings").type == pa.int64()
        assert [tuple(r.values()) for r in table.to_pylist()] == expected


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_daily_energy_equals_the_energy_daily_view(day_db, db, tmp_path, capsys, fmt):
    out = tmp_path / f"energy.{fmt}"
    code, err = run(day_db, "--device", SN, "--what", "daily-energy", "--from", "2024-04-01",
                    "--to", "2024-06-01", "--format", fmt, "--output", str(out), capsys=capsys)
    assert code == 0, err
    expected = owner_rows(db, ENERGY, SN)
    assert [r[1] for r in expected] == [date(2024, 5, 1)]
    columns = ["device_sn", "day", "wh_in", "wh_out", "wh_solar", "readings"]
    if fmt == "csv":
        assert_csv_equals(out, expected, columns)
    else:
        table = pq.read_table(out)
        assert table.schema.field("day").type == pa.date32()
        assert [tuple(r.values()) for r in table.to_pylist()] == expected


def test_energy_days_start_at_midnight_in_the_export_time_zone(day_db, db, tmp_path, capsys):
    out = tmp_path / "energy.csv"
    code, err = run(day_db, "--device", SN, "--what", "daily-energy", "--from", "2024-05-01",
                    "--to", "2024-05-03", "--timezone", "America/New_York",
                    "--output", str(out), capsys=capsys)
    assert code == 0, err
    # A UTC day of readings spans two New York days (it starts at 20:00 on April 30th there);
    # the one starting on April 30th is before --from, midnight New York time.
    assert [r[1] for r in csv_rows(out)[1]] == ["2024-05-01"]


# -- streaming with bounded memory -------------------------------------------------------------
def test_a_large_range_streams_in_bounded_batches(db, db_url, tmp_path):
    db.execute("""INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, source, raw_data)
                  SELECT %s + i * interval '1 second', 'BIG1', i %% 100, 'simulator', '{}'
                    FROM generate_series(0, 24999) i""", [DAY])
    start, end = DAY, DAY + timedelta(days=1)
    with reader.connect(reader_url(db_url)) as conn:
        buf = io.BytesIO()
        stats = export(conn, buf, what="readings", device="BIG1", start=start, end=end,
                       fmt="parquet", batch_rows=1000, progress=Progress(every=float("inf")))
        assert (stats.rows, stats.batches, stats.largest_batch) == (25000, 25, 1000)
        meta = pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata
        assert meta.num_rows == 25000 and meta.num_row_groups == 25
        assert max(meta.row_group(i).num_rows for i in range(25)) == 1000

        writes = []

        class Sink(io.RawIOBase):
            def writable(self):
                return True

            def write(self, b):
                writes.append(len(b))
                return len(b)

        stats = export(conn, Sink(), what="readings", device="BIG1", start=start, end=end,
                       fmt="csv", progress=Progress(every=float("inf")))
        assert stats.rows == 25000
        # COPY hands its output on as it comes: many small writes, none near the total.
        assert len(writes) > 100 and max(writes) < sum(writes) / 20


def test_progress_reports_rows_and_rate_on_long_exports():
    err = io.StringIO()
    clock = iter([0.0, 1.0, 2.5, 3.0, 5.0, 5.0]).__next__
    progress = Progress(stream=err, every=2.0, clock=clock)
    for rows in (1000, 5000, 6000, 10000):
        progress.update(rows)
    progress.done(10000)
    assert err.getvalue().splitlines() == [
        "ecoflow-export: 5,000 rows, 2,000 rows/s",
        "ecoflow-export: 10,000 rows, 2,000 rows/s",
        "ecoflow-export: done: 10,000 rows in 5.0 s (2,000 rows/s)",
    ]


def test_a_short_export_prints_no_progress():
    err = io.StringIO()
    progress = Progress(stream=err, every=2.0, clock=iter([0.0, 0.1, 0.2]).__next__)
    progress.update(10)
    progress.done(10)
    assert err.getvalue() == ""


# -- errors ------------------------------------------------------------------------------------
def test_an_unknown_device_is_named_with_the_known_ones(day_db, tmp_path, capsys):
    out = tmp_path / "x.csv"
    code, err = run(day_db, "--device", "NOPE", "--from", "2024-05-01", "--to", "2024-05-02",
                    "--output", str(out), capsys=capsys)
    assert code == 2
    assert "--device NOPE: no such station" in err and SN in err
    assert not out.exists() and not (tmp_path / "x.csv.part").exists()


@pytest.mark.parametrize("args,flag", [
    (["--from", "2024-13-01", "--to", "2024-05-02"], "--from '2024-13-01'"),
    (["--from", "2024-05-01", "--to", "yesterday"], "--to 'yesterday'"),
    (["--from", "2024-05-02", "--to", "2024-05-01"], "--to must be later than --from"),
    (["--from", "2024-05-01", "--to", "2024-05-02", "--timezone", "Mars/Base"], "--timezone"),
])
def test_bad_dates_name_the_flag(args, flag, capsys):
    # Checked before connecting: no database is needed to be told.
    code, err = run("postgresql://nobody@127.0.0.1:1/none", "--device", SN, *args,
                    capsys=capsys)
    assert code == 2 and flag in err


def test_an_unreachable_database_says_so_without_the_password(capsys):
    code, err = run("postgresql://u:hunter22@127.0.0.1:1/none", "--device", SN, "--from",
                    "2024-05-01", "--to", "2024-05-02", capsys=capsys)
    assert code == 1 and "cannot reach the database" in err and "hunter22" not in err


# -- the database role -------------------------------------------------------------------------
def test_by_default_it_connects_as_the_read_only_role():
    settings = DatabaseSettings(postgres_host="db", postgres_user="ecoflow",
                                postgres_password="owner-pw", readonly_user="ecoflow_reader",
                                readonly_password="p@ss")
    assert reader.reader_url(settings) == "postgresql://ecoflow_reader:p%40ss@db:5432/ecoflow"
    with_url = DatabaseSettings(database_url="postgresql://me:pw@h:5433/d")
    assert reader.reader_url(with_url) == "postgresql://me:pw@h:5433/d"


def test_its_sessions_are_read_only_even_as_the_owner(day_db, db_url):
    with reader.connect(db_url) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM ecoflow_measurements")

