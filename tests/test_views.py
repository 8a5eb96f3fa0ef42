"""The stable views give the right numbers for hand-made telemetry, whether they compute it
from raw readings (never refreshed) or read it from the summary tables (migration 0003)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tests.helpers import insert_reading, insert_series

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
MIN = timedelta(minutes=1)


@pytest.fixture(params=["live", "summarized"])
def read(request, db):
    """Query the views as they are, or after a refresh has materialized what they read."""

    def run(query, params=None):
        if request.param == "summarized":
            db.execute("SELECT ecoflow_refresh_summaries()")
        return db.execute(query, params)

    return run


def outages(read, device="SN1"):
    cur = read("SELECT * FROM outages WHERE device_sn = %s ORDER BY started_at", (device,))
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def test_ninety_minute_outage_at_300_watts_is_one_episode_of_450_wh(db, read):
    insert_series(db, "SN1", T0 - 30 * MIN, 30, MIN, grid_connected=True, soc_percent=100,
                  watts_out_sum=300)
    insert_series(db, "SN1", T0, 90, MIN, grid_connected=False,
                  soc_percent=lambda i: 100 - i * 0.5, soc_min_percent=lambda i: 99 - i * 0.5,
                  watts_out_sum=300)
    insert_series(db, "SN1", T0 + 90 * MIN, 30, MIN, grid_connected=True, soc_percent=60,
                  watts_out_sum=300)
    [ep] = outages(read)
    assert ep["started_at"] == T0
    assert ep["ended_at"] == T0 + 90 * MIN
    assert ep["duration"] == timedelta(minutes=90)
    assert ep["duration_sec"] == 5400
    assert not ep["ongoing"]
    assert ep["energy_out_wh"] == pytest.approx(450.0)
    assert ep["soc_start_percent"] == 100
    assert ep["soc_end_percent"] == pytest.approx(100 - 89 * 0.5)
    assert ep["soc_min_percent"] == pytest.approx(99 - 89 * 0.5)


def test_ongoing_outage_has_no_end_and_grows_with_the_clock(db, read):
    start = datetime.now(timezone.utc).replace(microsecond=0) - 10 * MIN
    insert_reading(db, start - MIN, "SN1", grid_connected=True, watts_out_sum=100)
    insert_series(db, "SN1", start, 10, MIN, grid_connected=False, watts_out_sum=120)
    [ep] = outages(read)
    assert ep["ongoing"] and ep["ended_at"] is None
    assert ep["duration"] >= timedelta(minutes=10)
    assert ep["energy_out_wh"] == pytest.approx(120 * 9 / 60)  # the last reading has no length yet


def test_unknown_grid_state_neither_starts_nor_ends_an_outage(db, read):
    insert_reading(db, T0, "SN1", grid_connected=True)
    insert_reading(db, T0 + MIN, "SN1", grid_connected=False, watts_out_sum=60)
    insert_reading(db, T0 + 2 * MIN, "SN1", grid_connected=None, watts_out_sum=60)
    insert_reading(db, T0 + 3 * MIN, "SN1", grid_connected=False, watts_out_sum=60)
    insert_reading(db, T0 + 4 * MIN, "SN1", grid_connected=True)
    [ep] = outages(read)
    assert (ep["started_at"], ep["ended_at"]) == (T0 + MIN, T0 + 4 * MIN)
    assert ep["energy_out_wh"] == pytest.approx(60 * 3 / 60)


def test_two_outages_on_two_devices_are_kept_apart(db, read):
    for sn in ("SN1", "SN2"):
        for k, grid in enumerate([True, False, False, True, False, True]):
            insert_reading(db, T0 + k * MIN, sn, grid_connected=grid, watts_out_sum=60)
    assert len(outages(read, "SN1")) == 2 and len(outages(read, "SN2")) == 2
    first, second = outages(read, "SN1")
    assert first["duration"] == 2 * MIN and second["duration"] == MIN


def test_energy_daily_integrates_power_over_time_not_samples(db, read):
    # 1000 W in for the whole day, sampled densely in the morning and sparsely afterwards:
    # summing samples would weigh the morning 10 times more; integrating gives 24 kWh.
    day = datetime(2026, 3, 2, tzinfo=timezone.utc)
    t = day
    while t < day + timedelta(days=1, minutes=10):
        insert_reading(db, t, "SN1", watts_in_sum=1000, watts_out_sum=250, pv_in_watts=400)
        t += timedelta(seconds=30) if t < day + timedelta(hours=6) else timedelta(minutes=5)
    db.execute("SET TIME ZONE 'UTC'")
    rows = read(
        "SELECT day, wh_in, wh_out, wh_solar FROM energy_daily WHERE device_sn = 'SN1'"
        " ORDER BY day"
    ).fetchall()
    assert rows[0][0] == day
    assert rows[0][1:] == pytest.approx((24000.0, 6000.0, 9600.0))


def test_energy_daily_counts_nothing_across_a_long_gap_in_data(db, read):
    day = datetime(2026, 3, 3, tzinfo=timezone.utc)
    insert_series(db, "SN1", day, 61, MIN, watts_in_sum=600)  # one hour: 600 Wh
    insert_reading(db, day + timedelta(hours=5), "SN1", watts_in_sum=600)  # 4 h of silence
    insert_reading(db, day + timedelta(hours=5, minutes=1), "SN1", watts_in_sum=600)
    db.execute("SET TIME ZONE 'UTC'")
    wh_in = read("SELECT wh_in FROM energy_daily WHERE device_sn = 'SN1'").fetchone()[0]
    assert wh_in == pytest.approx(600 + 10)


def test_latest_view_has_one_row_per_device_with_age_and_online_flag(db):
    now = db.execute("SELECT now()").fetchone()[0]
    db.execute("INSERT INTO devices (device_sn, name, stale_after_sec) VALUES ('SN2', 'garage', 60)")
    insert_series(db, "SN1", now - 10 * MIN, 10, MIN, soc_percent=lambda i: 50 + i)
    insert_series(db, "SN2", now - 30 * MIN, 3, MIN, soc_percent=lambda i: 80 - i)
    with db.cursor() as cur:
        cur.execute("SELECT * FROM ecoflow_latest ORDER BY device_sn")
        names = [d.name for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    assert [r["device_sn"] for r in rows] == ["SN1", "SN2"]
    sn1, sn2 = rows
    assert sn1["soc_percent"] == 59 and sn1["device_name"] == "SN1"
    assert 60 <= sn1["age_sec"] < 120 and sn1["online"]
    assert sn2["soc_percent"] == 78 and sn2["device_name"] == "garage"
    assert sn2["age_sec"] >= 28 * 60 and not sn2["online"]


def test_latest_view_is_empty_without_readings(db):
    assert db.execute("SELECT count(*) FROM ecoflow_latest").fetchone()[0] == 0


def test_rollups_average_soc_and_power_per_bucket(db, read):
    insert_series(db, "SN1", T0, 120, timedelta(seconds=30), soc_percent=lambda i: 50 + i % 2,
                  soc_min_percent=lambda i: 40 + i % 2, watts_in_sum=lambda i: 100 * (i % 2),
                  watts_out_sum=200)
    minute = read(
        "SELECT bucket, soc_avg, soc_min, watts_in_avg, watts_in_max, watts_out_avg, readings"
        " FROM ecoflow_rollup_1m WHERE device_sn = 'SN1' ORDER BY bucket LIMIT 1"
    ).fetchone()
    assert minute == (T0, pytest.approx(50.5), 40, pytest.approx(50), 100, pytest.approx(200), 2)
    hour = read(
        "SELECT bucket, soc_avg, readings FROM ecoflow_rollup_1h WHERE device_sn = 'SN1'"
    ).fetchall()
    assert hour == [(T0, pytest.approx(50.5), 120)]


def test_rollups_have_the_kind_the_server_allows(db, pg_server):
    if pg_server.timescaledb:
        licence = db.execute("SELECT current_setting('timescaledb.license', true)").fetchone()[0]
        caggs = {r[0] for r in db.execute(
            "SELECT view_name FROM timescaledb_information.continuous_aggregates"
            " WHERE NOT materialized_only").fetchall()}
    else:
        licence, caggs = None, set()
    if licence == "timescale":
        assert caggs == {"ecoflow_rollup_1m", "ecoflow_rollup_1h"}
        jobs = {r[0] for r in db.execute(
            "SELECT proc_name FROM timescaledb_information.jobs"
            " WHERE hypertable_name = 'ecoflow_measurements'").fetchall()}
        assert {"policy_compression", "policy_retention"} <= jobs
    else:
        assert caggs == set()
        views = {r[0] for r in db.execute(
            "SELECT viewname FROM pg_views WHERE viewname LIKE 'ecoflow_rollup_%'").fetchall()}
        assert views == {"ecoflow_rollup_1m", "ecoflow_rollup_1h"}
