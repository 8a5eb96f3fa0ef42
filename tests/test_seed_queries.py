"""Every SQL statement in the paku-iot EcoFlow guide runs unchanged and returns what it should.

The statements are copied verbatim from the guide (shared/seeds/000_*): users of that tool keep
their saved queries, Grafana panels and Home Assistant sensors.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from testbed.grafana_sql import expand
from tests.helpers import insert_series

SN = "R331ZEB4ZEA0012345"

LATEST = """SELECT * FROM ecoflow_measurements 
WHERE device_sn = 'R331ZEB4ZEA0012345'
ORDER BY ts DESC 
LIMIT 1;"""

SOC_24H = """SELECT ts, soc_percent 
FROM ecoflow_measurements 
WHERE device_sn = 'R331ZEB4ZEA0012345'
  AND ts >= NOW() - INTERVAL '24 hours'
ORDER BY ts;"""

POWER_FLOW = """SELECT 
    ts,
    watts_in_sum as charging_watts,
    watts_out_sum as load_watts,
    watts_in_sum - watts_out_sum as net_watts
FROM ecoflow_measurements 
WHERE device_sn = 'R331ZEB4ZEA0012345'
  AND ts >= NOW() - INTERVAL '1 hour'
ORDER BY ts;"""

PANEL_SOC = """SELECT 
    ts as time,
    soc_percent as "Battery %"
FROM ecoflow_measurements
WHERE 
    device_sn = 'R331ZEB4ZEA0012345'
    AND $__timeFilter(ts)
ORDER BY ts"""

PANEL_POWER = """SELECT 
    ts as time,
    watts_in_sum as "Input (W)",
    watts_out_sum as "Output (W)"
FROM ecoflow_measurements
WHERE 
    device_sn = 'R331ZEB4ZEA0012345'
    AND $__timeFilter(ts)
ORDER BY ts"""

PANEL_STAT = """SELECT 
    soc_percent as "Battery",
    watts_out_sum as "Load",
    watts_in_sum as "Input"
FROM ecoflow_measurements
WHERE device_sn = 'R331ZEB4ZEA0012345'
ORDER BY ts DESC
LIMIT 1"""

PANEL_SOLAR = """SELECT 
    ts as time,
    pv_in_watts as "Solar (W)"
FROM ecoflow_measurements
WHERE 
    device_sn = 'R331ZEB4ZEA0012345'
    AND $__timeFilter(ts)
ORDER BY ts"""

RAW_DATA = """SELECT 
    device_sn,
    ts,
    raw_data 
FROM ecoflow_measurements 
ORDER BY ts DESC 
LIMIT 5;"""

HOME_ASSISTANT = """SELECT soc_percent FROM ecoflow_measurements 
WHERE device_sn = 'YOUR_SN' 
ORDER BY ts DESC LIMIT 1"""

RETENTION = """DELETE FROM ecoflow_measurements 
WHERE ts < NOW() - INTERVAL '90 days';"""


def seed(db) -> datetime:
    """Two days of readings every 10 minutes for the guide's station, and a second station."""
    now = db.execute("SELECT date_trunc('minute', now())").fetchone()[0]
    start = now - timedelta(days=2) + timedelta(minutes=10)
    count = 2 * 24 * 6  # the newest reading is at `now`
    insert_series(
        db, SN, start, count, timedelta(minutes=10),
        soc_percent=lambda i: 20 + i % 80, watts_in_sum=lambda i: 100 + i,
        watts_out_sum=lambda i: 50 + i, pv_in_watts=lambda i: i % 7,
        raw_data=lambda i: {"pd.soc": 20 + i % 80},
    )
    insert_series(db, "YOUR_SN", start, 3, timedelta(minutes=10), soc_percent=lambda i: 60 + i)
    # A reading outside the retention window, to be deleted.
    insert_series(db, SN, now - timedelta(days=100), 1, timedelta(0), soc_percent=5)
    return now


def test_latest_measurement_for_a_device(db):
    now = seed(db)
    with db.cursor() as cur:
        cur.execute(LATEST)
        row = dict(zip([d.name for d in cur.description], cur.fetchone()))
    assert row["ts"] == now and row["device_sn"] == SN
    assert row["soc_percent"] == 20 + (2 * 24 * 6 - 1) % 80


def test_battery_level_over_the_last_24_hours(db):
    now = seed(db)
    rows = db.execute(SOC_24H).fetchall()
    # Readings every 10 minutes: 144 in the last 24 hours, counting the one at exactly now-24h.
    assert len(rows) in (144, 145)
    assert all(ts >= now - timedelta(hours=24) for ts, _ in rows)
    assert [ts for ts, _ in rows] == sorted(ts for ts, _ in rows)


def test_power_flow_analysis_computes_net_watts(db):
    seed(db)
    rows = db.execute(POWER_FLOW).fetchall()
    assert 6 <= len(rows) <= 7
    for _ts, charging, load, net in rows:
        assert net == charging - load == 50


def test_grafana_panels_with_time_filter_expanded(db):
    now = seed(db)
    frm, to = now - timedelta(hours=6), now
    for panel, columns in (
        (PANEL_SOC, ["time", "Battery %"]),
        (PANEL_POWER, ["time", "Input (W)", "Output (W)"]),
        (PANEL_SOLAR, ["time", "Solar (W)"]),
    ):
        with db.cursor() as cur:
            cur.execute(expand(panel, frm, to))
            assert [d.name for d in cur.description] == columns
            rows = cur.fetchall()
        assert len(rows) == 37  # 6 hours every 10 minutes, both ends included
        assert rows[0][0] == frm and rows[-1][0] == to


def test_grafana_stat_panel_shows_the_latest_values(db):
    seed(db)
    i = 2 * 24 * 6 - 1
    assert db.execute(PANEL_STAT).fetchone() == (20 + i % 80, 50 + i, 100 + i)


def test_raw_data_query_shows_the_payload(db):
    seed(db)
    rows = db.execute(RAW_DATA).fetchall()
    assert len(rows) == 5
    assert rows[0][2] == {"pd.soc": 20 + (2 * 24 * 6 - 1) % 80}


def test_home_assistant_sensor_query(db):
    seed(db)
    assert db.execute(HOME_ASSISTANT).fetchone() == (62.0,)


def test_retention_delete_removes_only_old_readings(db):
    seed(db)
    before = db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0]
    deleted = db.execute(RETENTION).rowcount
    after = db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0]
    assert deleted == 1 and after == before - 1
    oldest = db.execute("SELECT min(ts) FROM ecoflow_measurements").fetchone()[0]
    assert oldest > datetime.now(timezone.utc) - timedelta(days=90)
