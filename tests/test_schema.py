"""The readings table and the other tables behave as the database contract says."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from tests.helpers import insert_reading

T0 = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)

CONTRACT = {
    "ts": ("timestamp with time zone", "NO"),
    "device_sn": ("text", "NO"),
    "soc_percent": ("real", "YES"),
    "soc_min_percent": ("real", "YES"),
    "remain_time_min": ("integer", "YES"),
    "watts_in_sum": ("integer", "YES"),
    "watts_out_sum": ("integer", "YES"),
    "ac_in_watts": ("integer", "YES"),
    "ac_out_watts": ("integer", "YES"),
    "dc_out_watts": ("integer", "YES"),
    "typec_out_watts": ("integer", "YES"),
    "usb_out_watts": ("integer", "YES"),
    "pv_in_watts": ("integer", "YES"),
    "grid_connected": ("boolean", "YES"),
    "battery_temp_c": ("real", "YES"),
    "source": ("text", "NO"),
    "raw_data": ("jsonb", "NO"),
    # When the collector received it (S1: the policy measures age with it); null: at ts.
    "received_at": ("timestamp with time zone", "YES"),
}


def test_measurements_columns_match_the_database_contract(db):
    rows = db.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_name = 'ecoflow_measurements'"
    ).fetchall()
    assert {name: (dtype, nullable) for name, dtype, nullable in rows} == CONTRACT


def test_measurements_is_a_hypertable_with_one_day_chunks(db, pg_server):
    if not pg_server.timescaledb:
        pytest.skip("this server has no TimescaleDB")
    row = db.execute(
        "SELECT d.time_interval FROM timescaledb_information.dimensions d"
        " WHERE d.hypertable_name = 'ecoflow_measurements' AND d.column_name = 'ts'"
    ).fetchone()
    assert row == (timedelta(days=1),)
    # Readings two days apart land in two chunks.
    insert_reading(db, T0, "SN1", soc_percent=50)
    insert_reading(db, T0 + timedelta(days=2), "SN1", soc_percent=51)
    chunks = db.execute(
        "SELECT count(*) FROM timescaledb_information.chunks"
        " WHERE hypertable_name = 'ecoflow_measurements'"
    ).fetchone()[0]
    assert chunks == 2


def test_duplicate_device_and_time_insert_on_conflict_keeps_one_row(db):
    for soc in (50, 99):
        db.execute(
            "INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, source, raw_data)"
            " VALUES (%s, 'SN1', %s, 'rest', '{}') ON CONFLICT (device_sn, ts) DO NOTHING",
            (T0, soc),
        )
    assert db.execute("SELECT soc_percent FROM ecoflow_measurements").fetchall() == [(50.0,)]


def test_duplicate_insert_without_on_conflict_is_refused(db):
    insert_reading(db, T0, "SN1")
    with pytest.raises(psycopg.errors.UniqueViolation):
        insert_reading(db, T0, "SN1")


def test_same_time_on_two_devices_is_two_readings(db):
    insert_reading(db, T0, "SN1")
    insert_reading(db, T0, "SN2")
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0] == 2


def test_unknown_source_is_refused(db):
    with pytest.raises(psycopg.errors.CheckViolation):
        insert_reading(db, T0, "SN1", source="carrier-pigeon")


def test_latest_per_device_and_device_range_use_the_device_time_index(db):
    # Half a day of readings every 5 s from 50 stations: enough rows that the planner's
    # choice between this index and the arrival-order one (0009) follows what each is for.
    db.execute("""
        INSERT INTO ecoflow_measurements (ts, device_sn, source, raw_data)
        SELECT %s::timestamptz + make_interval(secs => i * 5), 'SN' || (i %% 50), 'simulator', '{}'
          FROM generate_series(0, 8639) AS i""", (T0,))
    db.execute("ANALYZE ecoflow_measurements")
    db.execute("SET enable_seqscan = off")
    for query in (
        "SELECT * FROM ecoflow_measurements WHERE device_sn = 'SN1' ORDER BY ts DESC LIMIT 1",
        "SELECT * FROM ecoflow_measurements WHERE device_sn = 'SN1'"
        f" AND ts >= '{T0.isoformat()}' AND ts < '{(T0 + timedelta(hours=1)).isoformat()}'",
    ):
        plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + query).fetchall())
        assert "device_ts_key" in plan, plan


def test_ingest_errors_keep_the_payload_bytes(db):
    payload = b"\x0a\x03\xff\x00garbage"
    db.execute(
        "INSERT INTO ingest_errors (source, topic, payload, error) VALUES (%s, %s, %s, %s)",
        ("bridge", "bridge-ecoflow/SN1/data", payload, "not JSON and not protobuf"),
    )
    assert db.execute("SELECT payload FROM ingest_errors").fetchone()[0] == payload


def _command(db, agent: str, episode: str, action: str = "shutdown") -> None:
    db.execute(
        "INSERT INTO commands (id, agent_id, action, episode_id, ttl_sec, issued_at, expires_at,"
        " payload) VALUES (%s, %s, %s, %s, 300, now(), now() + interval '300 seconds', '{}')",
        (uuid.uuid4(), agent, action, episode),
    )


def test_second_shutdown_for_the_same_agent_and_episode_is_refused(db):
    _command(db, "nas-01", "ep-1")
    _command(db, "pc-01", "ep-1")
    _command(db, "nas-01", "ep-1", action="abort")
    with pytest.raises(psycopg.errors.UniqueViolation):
        _command(db, "nas-01", "ep-1")
    _command(db, "nas-01", "ep-2")


def test_agent_supplies_link_agents_to_known_stations(db):
    db.execute("INSERT INTO devices (device_sn, name) VALUES ('SN1', 'study')")
    db.execute("INSERT INTO agents (agent_id, min_supplies) VALUES ('nas-01', 1)")
    db.execute("INSERT INTO agent_supplies VALUES ('nas-01', 'SN1')")
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("INSERT INTO agent_supplies VALUES ('nas-01', 'UNKNOWN')")
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("INSERT INTO agents (agent_id, soc_threshold) VALUES ('pc-01', 100)")
