"""The summary tables behind the views (migration 0003) give the answers the views gave when
they computed everything from raw readings: after a first build, across incremental refreshes,
with late rows inside the lookback, and with new rows no refresh has seen yet.

The reference is 0001's own view SQL, created in a schema `raw` beside the real views.
"""

from __future__ import annotations

import importlib
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
import pytest

from policy.worker import refresh_summaries
from servicekit.migrate import downgrade, upgrade
from tests.timescale_jobs import community, run_jobs

INITIAL = importlib.import_module("migrations.versions.0001_initial_schema")
ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"

# view -> the columns that order its rows
VIEWS = {
    "energy_daily": "device_sn, day",
    "outages": "device_sn, started_at",
    "ecoflow_rollup_1m": "device_sn, bucket",
    "ecoflow_rollup_1h": "device_sn, bucket",
}
SUMMARY_TABLES = {
    "ecoflow_summary_1m": "device_sn, bucket, source",
    "ecoflow_summary_1h": "device_sn, bucket, source",
    "ecoflow_summary_outages": "device_sn, started_at, bucket",
    "ecoflow_summary_devices": "device_sn",
}
COLUMNS = ("ts", "device_sn", "soc_percent", "soc_min_percent", "watts_in_sum", "watts_out_sum",
           "ac_in_watts", "pv_in_watts", "grid_connected", "battery_temp_c", "source", "raw_data")
OFFICE, GARAGE, UPS = "R331ZEB4ZEA0012345", "DCABZ8ZE1234567", "NUT-ups"


@dataclass
class Telemetry:
    db: psycopg.Connection
    now: datetime  # the seeded history ends here


def reading(ts, sn, source, *, grid, soc=80.0, watts_in=300, watts_out=150, pv=0):
    soc_min = None if soc is None else soc - 1
    return (ts, sn, soc, soc_min, watts_in, watts_out, watts_in if grid else 0, pv, grid, 25.0,
            source, "{}")


def insert(db, rows) -> None:
    with db.cursor().copy(f"COPY ecoflow_measurements ({', '.join(COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def two_days(now: datetime) -> list[tuple]:
    """Three stations over two days, sampled as real ones are: irregularly, with gaps, with
    grid losses (one across midnight UTC, one ongoing, one a few seconds long), with unknown grid
    states and missing power values, from more than one source."""
    rnd = random.Random(20261124)
    start = now - timedelta(days=2)
    office_out = [(now - timedelta(hours=30), now - timedelta(hours=29, minutes=10)),
                  (now - timedelta(hours=3), now - timedelta(hours=2, minutes=20)),
                  (now - timedelta(hours=10), now - timedelta(hours=10) + timedelta(seconds=50))]
    gap = (now - timedelta(hours=20), now - timedelta(hours=19, minutes=40))
    rows = []
    t, soc = start, 100.0
    while t <= now:
        if not gap[0] <= t < gap[1]:
            lost = any(a <= t < b for a, b in office_out)
            soc = max(5.0, soc - 0.2) if lost else min(100.0, soc + 0.05)
            grid = None if rnd.random() < 0.03 else not lost
            pv = 200 if 10 <= t.hour < 15 else 0
            watts_in = None if rnd.random() < 0.05 else (0 if lost else 300) + pv
            rows.append(reading(t, OFFICE, "rest", grid=grid, soc=soc, watts_in=watts_in,
                                watts_out=140 + rnd.randrange(20), pv=pv))
        t += timedelta(seconds=rnd.uniform(25, 50))
    t, soc = start + timedelta(seconds=7), 90.0
    while t <= now:
        lost = t >= now - timedelta(minutes=50)
        unknown = now - timedelta(minutes=40) <= t < now - timedelta(minutes=35)
        soc = max(5.0, soc - 0.3) if lost else soc
        rows.append(reading(t, GARAGE, "bridge" if t.minute % 2 else "nut",
                            grid=None if unknown else not lost, soc=soc, watts_out=200))
        t += timedelta(seconds=60)
    t = start + timedelta(seconds=3)
    while t <= now:
        rows.append(reading(t, UPS, "nut", grid=None, soc=None, watts_in=None, watts_out=80))
        t += timedelta(seconds=45)
    return rows


@pytest.fixture
def telemetry(db) -> Telemetry:
    now = db.execute("SELECT now()").fetchone()[0]
    insert(db, two_days(now))
    create_raw_views(db)
    return Telemetry(db, now)


def create_raw_views(db) -> None:
    db.execute("CREATE SCHEMA raw")
    db.execute("SET search_path = raw, public")
    db.execute(INITIAL.VIEWS)
    for name, (bucket, *_policy) in INITIAL.ROLLUPS.items():
        db.execute(f"CREATE VIEW raw.{name} AS SELECT date_bin(INTERVAL '{bucket}', ts, {ORIGIN})"
                   f" AS bucket, {INITIAL.ROLLUP_COLUMNS} GROUP BY 1, device_sn")
    db.execute("SET search_path = public")


def refresh(db, settle: str = "1 minute", since: datetime | str | None = None) -> datetime:
    """Refresh with the watermark `settle` before now: a larger settle stands for an earlier
    moment, so a test can walk the watermark through the history."""
    db.execute("UPDATE ecoflow_summary_state SET settle = %s::interval", (settle,))
    return db.execute("SELECT ecoflow_refresh_summaries(since => %s::timestamptz)",
                      (since,)).fetchone()[0]


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-9)
    return a == b


def assert_same_rows(got: list[tuple], expected: list[tuple], what: str) -> None:
    assert len(got) == len(expected), f"{what}: {len(got)} rows, expected {len(expected)}"
    for g, e in zip(got, expected):
        assert len(g) == len(e) and all(same(x, y) for x, y in zip(g, e)), (what, g, e)


def assert_views_match_raw(db) -> None:
    with db.transaction():  # one now() for both sides: durations of ongoing outages
        for view, order in VIEWS.items():
            got = db.execute(f"SELECT * FROM public.{view} ORDER BY {order}").fetchall()
            expected = db.execute(f"SELECT * FROM raw.{view} ORDER BY {order}").fetchall()
            assert expected, f"raw.{view} is empty: the seed does not exercise it"
            assert_same_rows(got, expected, view)


def snapshot(db) -> dict[str, list[tuple]]:
    return {table: db.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            for table, order in SUMMARY_TABLES.items()}


def state(db) -> dict:
    with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT refreshed_at, refreshed_from FROM ecoflow_summary_state"
                           ).fetchone()


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata"])
def test_a_first_build_gives_the_answers_of_the_raw_computation(telemetry, zone):
    refresh(telemetry.db)
    materialized = telemetry.db.execute("SELECT count(*) FROM ecoflow_summary_1m").fetchone()[0]
    assert materialized > 2 * 24 * 60  # most of the history, not just the live tail
    # Kolkata is 5:30 from UTC: midnight splits an hour, whose minutes go to two days.
    telemetry.db.execute(f"SET TIME ZONE '{zone}'")
    assert_views_match_raw(telemetry.db)


def test_refreshes_that_cut_through_outages_agree_with_raw_and_with_a_rebuild(telemetry):
    db = telemetry.db
    # Watermarks inside the office's two longer outages, and in the garage's ongoing one.
    for settle in ("29 hours 30 minutes", "2 hours 35 minutes", "45 minutes", "1 minute"):
        refresh(db, settle)
        assert_views_match_raw(db)
    # Each call recomputed only a window behind the previous watermark, not the history.
    assert state(db)["refreshed_from"] > telemetry.now - timedelta(hours=3)
    incremental = snapshot(db)
    # A rebuild up to the same watermark (a larger settle keeps it where it is).
    refresh(db, "1 hour", since="-infinity")
    rebuilt = snapshot(db)
    for table in SUMMARY_TABLES:
        assert_same_rows(rebuilt[table], incremental[table], table)


def test_late_rows_in_the_lookback_count_after_the_next_refresh_new_rows_at_once(telemetry):
    db, now = telemetry.db, telemetry.now
    db.execute("UPDATE ecoflow_summary_state SET lookback = '3 hours'")
    watermark = refresh(db, "30 minutes")
    # Late: office readings 1.5 to 2 hours old between the stored ones, with a short grid loss,
    # and a garage reading with the grid back that splits its ongoing outage in two.
    late = [reading(watermark - timedelta(minutes=135) + timedelta(seconds=15 + 30 * i), OFFICE,
                    "rest", grid=not 20 <= i < 30, watts_in=900) for i in range(80)]
    late.append(reading(now - timedelta(minutes=45, seconds=30), GARAGE, "bridge", grid=True))
    # New: a station the refresh has never seen, after the watermark.
    new = [reading(watermark + timedelta(seconds=20 * i), "NEW-STATION", "app_mqtt",
                   grid=i % 30 < 20, watts_out=50) for i in range(60)]
    insert(db, late + new)

    # The new rows are in the views at once, through the live part.
    fresh = ("SELECT * FROM {}.ecoflow_rollup_1m WHERE device_sn = 'NEW-STATION'"
             " ORDER BY bucket")
    assert_same_rows(db.execute(fresh.format("public")).fetchall(),
                     db.execute(fresh.format("raw")).fetchall(), "new station")
    assert db.execute(fresh.format("public")).fetchall()

    refresh(db, "30 minutes")
    assert_views_match_raw(db)
    episodes = db.execute("SELECT count(*) FROM outages WHERE device_sn = %s AND started_at"
                          " >= %s", (GARAGE, now - timedelta(hours=1))).fetchone()[0]
    assert episodes == 2


def test_rows_older_than_the_lookback_count_after_the_next_refresh(telemetry):
    db, now = telemetry.db, telemetry.now
    # Twenty minutes around a whole hour nine hours ago go missing, then come back as a backfill
    # starting on the hour: it also gives the reading before the gap its energy.
    hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=9)
    db.execute("DELETE FROM ecoflow_measurements WHERE device_sn = %s AND ts >= %s AND ts < %s",
               (OFFICE, hour - timedelta(minutes=10), hour + timedelta(minutes=10)))
    refresh(db)
    insert(db, [reading(hour + timedelta(minutes=i), OFFICE, "rest", grid=True, watts_in=1000)
                for i in range(5)])
    day = "SELECT readings FROM {}.energy_daily WHERE device_sn = %s AND day = %s"
    key = (OFFICE, hour.replace(hour=0))
    # Far older than the lookback: logged as a change behind the watermark (migration 0007)...
    assert db.execute("SELECT min(ts) FROM ecoflow_summary_invalidations").fetchone() == (hour,)

    refresh(db)
    # ... so the next refresh recomputed from there, and not from further back.
    assert hour - timedelta(hours=1) <= state(db)["refreshed_from"] <= hour
    got, expected = (db.execute(day.format(s), key).fetchone()[0] for s in ("public", "raw"))
    assert got == expected
    assert_views_match_raw(db)


def test_a_reading_committed_while_a_refresh_runs_counts_once(telemetry):
    db = telemetry.db
    refresh(db)
    # Stand-in for the collector committing a reading just before the new watermark while the
    # refresh runs: it appears between the refresh's first look at the readings and the next.
    db.execute(f"""
        CREATE FUNCTION sneak_in_a_reading() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO ecoflow_measurements ({', '.join(COLUMNS)})
            SELECT date_bin('1 minute', now() - settle, {ORIGIN}) - interval '1 ms', '{OFFICE}',
                   50, 49, 700, 150, 700, 0, true, 25, 'rest', '{{}}'
              FROM ecoflow_summary_state
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END $$;
        CREATE TRIGGER sneak AFTER DELETE ON ecoflow_summary_1m
            FOR EACH STATEMENT EXECUTE FUNCTION sneak_in_a_reading();""")
    refresh(db)
    db.execute("DROP TRIGGER sneak ON ecoflow_summary_1m")
    assert db.execute("SELECT count(*) FROM ecoflow_measurements WHERE watts_in_sum = 700"
                      ).fetchone() == (1,)
    assert_views_match_raw(db)


def test_policy_worker_refreshes_beside_its_loop_and_logs_failures(db, db_url, empty_db_url,
                                                                  caplog):
    stop = threading.Event()
    worker = threading.Thread(target=refresh_summaries, args=(db_url, stop, 0.05))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while state(db)["refreshed_at"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state(db)["refreshed_at"] is not None
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive()

    # A database without the summaries (not migrated): a warning each round, and it goes on.
    caplog.set_level(logging.WARNING, logger="ecoflow.policy")
    stop = threading.Event()
    worker = threading.Thread(target=refresh_summaries, args=(empty_db_url, stop, 0.05))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while (sum("summary refresh failed" in r.getMessage() for r in caplog.records) < 2
               and time.monotonic() < deadline):
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(10)
    assert not worker.is_alive()
    assert sum("summary refresh failed" in r.getMessage() for r in caplog.records) >= 2


def test_downgrade_restores_the_views_computed_from_raw_readings(pg_server):
    names = [f"sum_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for name in names:
        pg_server.create_database(name)
    try:
        down, reference = (pg_server.settings(n) for n in names)
        upgrade(down)
        downgrade(down, "0002")
        upgrade(reference, "0002")

        def definitions(name):
            with psycopg.connect(pg_server.url(name)) as conn:
                views = dict(conn.execute(
                    "SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'"
                ).fetchall())
                tables = {r[0] for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE tablename LIKE 'ecoflow_summary%'")}
                return views, tables

        (down_views, down_tables), (ref_views, _) = definitions(names[0]), definitions(names[1])
        assert down_tables == set()
        assert {"outages", "energy_daily"} <= set(ref_views)
        assert down_views == ref_views
    finally:
        for name in names:
            pg_server.drop_database(name)


@pytest.mark.plain_postgres
def test_summaries_work_on_plain_postgresql(plain_pg_server):
    name = f"sum_{uuid.uuid4().hex[:10]}"
    plain_pg_server.create_database(name)
    try:
        upgrade(plain_pg_server.settings(name))
        with psycopg.connect(plain_pg_server.url(name), autocommit=True) as db:
            now = db.execute("SELECT now()").fetchone()[0]
            insert(db, [r for r in two_days(now) if r[0] >= now - timedelta(hours=4)])
            create_raw_views(db)
            refresh(db, "2 hours 30 minutes")
            assert_views_match_raw(db)
            refresh(db)
            assert_views_match_raw(db)
    finally:
        plain_pg_server.drop_database(name)


def test_before_any_refresh_the_views_compute_everything_live(telemetry):
    assert telemetry.db.execute(
        "SELECT materialized_until IS NULL FROM ecoflow_summary_state").fetchone() == (True,)
    assert_views_match_raw(telemetry.db)


def test_policy_worker_enforces_retention_where_no_timescaledb_policy_does(db, db_url, caplog):
    # The Apache build has no retention policy: the worker's housekeeping removes raw readings
    # past RETENTION_DAYS itself, at start and then every few hours. The community edition has
    # TimescaleDB's retention policy, which the worker leaves the job to.
    now = db.execute("SELECT now()").fetchone()[0]
    insert(db, [reading(now - timedelta(days=400), OFFICE, "bridge", grid=True),
                reading(now - timedelta(days=10), OFFICE, "bridge", grid=True),
                reading(now - timedelta(minutes=1), OFFICE, "bridge", grid=True)])
    caplog.set_level(logging.INFO, logger="ecoflow.policy")
    tsl = community(db)

    def retained() -> bool:
        if tsl:  # the worker leaves it to TimescaleDB's retention policy
            return any(r.getMessage().startswith("retention: left to TimescaleDB")
                       for r in caplog.records)
        return db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0] <= 2

    stop = threading.Event()
    worker = threading.Thread(target=refresh_summaries, args=(db_url, stop, 0.05),
                              kwargs={"retention_days": 30, "retention_every": 3600})
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while not retained() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # several refresh rounds: retention is not run again inside the hour
    finally:
        stop.set()
        worker.join(10)
    if tsl:
        # The community edition's retention policy (the migration's RETENTION_DAYS, 365 here)
        # does it: the worker leaves it alone. Run it as TimescaleDB's scheduler would.
        assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (3,)
        assert run_jobs(db, "policy_retention", "ecoflow_measurements")
    assert db.execute("SELECT count(*), min(ts) > now() - interval '30 days'"
                      " FROM ecoflow_measurements").fetchone() == (2, True)
    assert sum(r.getMessage().startswith("retention: ") for r in caplog.records) == 1


# -- the whole history, late readings (issue #16) ---------------------------------------------
MONTH = """
INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent, watts_in_sum,
                                  watts_out_sum, ac_in_watts, pv_in_watts, grid_connected,
                                  battery_temp_c, source, raw_data)
SELECT ts, %(sn)s, 80, 79, 300, 150, 300, 0, NOT (ts >= %(now)s - interval '12 days'
                                                  AND ts < %(now)s - interval '12 days' + interval '2 hours'),
       25, 'rest', '{}'
  FROM generate_series(%(now)s - interval '30 days', %(now)s - interval '2 minutes',
                       interval '1 minute') AS ts
 WHERE NOT (ts >= %(hole)s AND ts < %(hole)s + interval '1 hour')
"""


def scheduled_refresh(db) -> None:
    """What runs on a schedule: the policy worker's summary refresh and, on the community
    edition, the rollups' refresh policies (run as TimescaleDB's scheduler runs them)."""
    db.execute("SELECT ecoflow_refresh_summaries()")
    if community(db):
        assert len(run_jobs(db, "policy_refresh_continuous_aggregate")) == 2


def rollup_buckets(db, view: str) -> tuple[int, int]:
    return db.execute(f"SELECT count(*), sum(readings) FROM {view} WHERE device_sn = %s",
                      (OFFICE,)).fetchone()


@dataclass
class Month(Telemetry):
    hole: datetime  # an hour without readings, 20 days ago


@pytest.fixture
def month(db) -> Month:
    """A station's readings, one a minute over the last 30 days, with a grid loss 12 days ago and
    an hour without readings 20 days ago (`hole`, on a whole hour)."""
    now = db.execute(f"SELECT date_bin('1 minute', now(), {ORIGIN})").fetchone()[0]
    hole = (now - timedelta(days=20)).replace(minute=0)
    db.execute(MONTH, {"sn": OFFICE, "now": now, "hole": hole})
    create_raw_views(db)
    return Month(db, now, hole)


def test_a_month_of_readings_is_in_every_rollup_bucket_after_the_scheduled_refresh(month):
    db = month.db
    readings, minutes, hours = db.execute(
        f"SELECT count(*), count(DISTINCT date_bin('1 minute', ts, {ORIGIN})),"
        f"       count(DISTINCT date_bin('1 hour', ts, {ORIGIN})) FROM ecoflow_measurements"
    ).fetchone()
    assert minutes == readings > 30 * 24 * 60 - 100
    scheduled_refresh(db)
    # Every bucket of the history, not just those the refresh policies look back over.
    assert rollup_buckets(db, "ecoflow_rollup_1m") == (minutes, readings)
    assert rollup_buckets(db, "ecoflow_rollup_1h") == (hours, readings)
    # ... and materialized, not computed live: the summaries' watermark (both editions) and the
    # continuous aggregates' (community) are past the history.
    assert db.execute("SELECT materialized_until > %s - interval '5 minutes'"
                      " FROM ecoflow_summary_state", (month.now,)).fetchone() == (True,)
    assert db.execute("SELECT count(*) FROM ecoflow_summary_1m").fetchone() == (minutes,)
    if community(db):
        for view in ("ecoflow_rollup_1m", "ecoflow_rollup_1h"):
            watermark = db.execute(
                "SELECT _timescaledb_functions.to_timestamp(_timescaledb_functions.cagg_watermark("
                "mat_hypertable_id)) FROM _timescaledb_catalog.continuous_agg"
                " WHERE user_view_name = %s", (view,)).fetchone()[0]
            assert watermark >= month.now - timedelta(hours=2), view  # end_offset: 1 bucket
    assert_views_match_raw(db)


def test_late_readings_behind_the_watermark_count_after_the_next_refresh(month):
    db, now, hole = month.db, month.now, month.hole
    scheduled_refresh(db)
    if community(db):
        # A 20-day-old chunk has been compressed by the time a backlog reaches it.
        assert run_jobs(db, "policy_compression", "ecoflow_measurements")
        assert db.execute("SELECT count(*) FROM timescaledb_information.chunks WHERE"
                          " hypertable_name = 'ecoflow_measurements' AND is_compressed"
                          " AND range_end <= %s", (hole,)).fetchone()[0] > 0
    # A reading 20 days old in the hour that had none, one into a minute that had one, and a
    # reading deleted 10 days ago (a correction): all far behind any lookback.
    late = hole + timedelta(minutes=17, seconds=5)
    insert(db, [reading(late, OFFICE, "rest", grid=True, watts_in=1000),
                reading(now - timedelta(days=25, seconds=-20), OFFICE, "rest", grid=True,
                        watts_in=2000)])
    db.execute("DELETE FROM ecoflow_measurements WHERE ts = %s",
               (now - timedelta(days=10),))
    minute = ("SELECT readings, watts_in_avg FROM ecoflow_rollup_1m"
              " WHERE device_sn = %s AND bucket = %s")
    scheduled_refresh(db)
    assert db.execute(minute, (OFFICE, late.replace(second=0))).fetchone() == (1, 1000)
    assert db.execute("SELECT readings FROM ecoflow_rollup_1h WHERE device_sn = %s"
                      " AND bucket = %s", (OFFICE, hole)).fetchone() == (1,)
    assert db.execute(minute, (OFFICE, now - timedelta(days=25))).fetchone() == (2, 1150)
    assert db.execute(minute, (OFFICE, now - timedelta(days=10))).fetchone() is None
    assert db.execute("SELECT count(*) FROM ecoflow_summary_invalidations").fetchone() == (0,)
    assert_views_match_raw(db)


def test_readings_at_the_watermark_are_not_logged_as_late(db):
    # The collector's usual writes are newer than the watermark: they cost no log row.
    now = db.execute("SELECT now()").fetchone()[0]
    insert(db, [reading(now - timedelta(hours=1), OFFICE, "rest", grid=True)])
    refresh(db)
    insert(db, [reading(now - timedelta(seconds=s), OFFICE, "rest", grid=True) for s in (5, 1)])
    assert db.execute("SELECT count(*) FROM ecoflow_summary_invalidations").fetchone() == (0,)
    # One row per transaction for a backlog, unless a reading goes further back.
    with db.transaction():
        insert(db, [reading(now - timedelta(minutes=m), OFFICE, "rest", grid=True)
                    for m in (30, 20, 40, 10)])
    assert [r[0] for r in db.execute(
        "SELECT ts FROM ecoflow_summary_invalidations ORDER BY logged_at, ts DESC")] == [
        now - timedelta(minutes=30), now - timedelta(minutes=40)]


def test_retention_drops_raw_readings_the_summaries_keep_their_totals(db):
    # Which rollup rows outlive RETENTION_DAYS differs by edition (docs/database.md): the
    # summary tables (energy_daily, outages, and the rollups under the Apache build) keep
    # them; continuous aggregates (community rollups) follow the raw readings, since
    # TimescaleDB invalidates the range drop_chunks removes and the next refresh clears it.
    now = db.execute("SELECT now()").fetchone()[0]
    old = [reading(now - timedelta(days=400, minutes=m), OFFICE, "rest", grid=True)
           for m in range(3)]
    insert(db, old + [reading(now - timedelta(minutes=5), OFFICE, "rest", grid=True)])
    scheduled_refresh(db)
    if community(db):
        assert run_jobs(db, "policy_retention", "ecoflow_measurements")
    else:
        db.execute("SELECT drop_chunks('ecoflow_measurements', older_than => interval '365 days')")
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (1,)
    scheduled_refresh(db)
    old_rollups = db.execute("SELECT count(*) FROM ecoflow_rollup_1m WHERE bucket < %s",
                             (now - timedelta(days=365),)).fetchone()[0]
    assert old_rollups == (0 if community(db) else 3)
    assert db.execute("SELECT sum(readings) FROM energy_daily WHERE day < %s",
                      (now - timedelta(days=365),)).fetchone() == (2,)
