"""Migrations apply, roll back and re-apply on TimescaleDB and on plain PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, pool

from servicekit import dbsetup
from servicekit.migrate import downgrade, upgrade
from tests.timescale_jobs import community, pause_all, run_jobs

REPO = Path(__file__).resolve().parent.parent
OBJECTS = {
    "ecoflow_measurements", "devices", "agents", "agent_supplies", "policy_events", "commands",
    "command_acks", "agent_status", "ingest_errors", "ecoflow_latest", "outages",
    "energy_daily", "ecoflow_rollup_1m", "ecoflow_rollup_1h",
}


def relations(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()}


def is_hypertable(url: str) -> bool:
    with psycopg.connect(url) as conn:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            return False
        return bool(conn.execute(
            "SELECT 1 FROM timescaledb_information.hypertables"
            " WHERE hypertable_name = 'ecoflow_measurements'").fetchone())


def round_trip(server) -> None:
    name = f"rt_{uuid.uuid4().hex[:10]}"
    server.create_database(name)
    try:
        settings = server.settings(name)
        url = server.url(name)
        upgrade(settings)
        assert OBJECTS <= relations(url)
        assert is_hypertable(url) == server.timescaledb
        downgrade(settings, "base")
        assert relations(url) & OBJECTS == set()
        upgrade(settings)
        assert OBJECTS <= relations(url)
        assert is_hypertable(url) == server.timescaledb
    finally:
        server.drop_database(name)


def test_upgrade_downgrade_upgrade_on_timescaledb(pg_server):
    if not pg_server.timescaledb:
        pytest.skip("this server has no TimescaleDB")
    round_trip(pg_server)


@pytest.mark.plain_postgres
def test_upgrade_downgrade_upgrade_on_plain_postgresql(plain_pg_server):
    round_trip(plain_pg_server)


@pytest.mark.plain_postgres
def test_plain_postgresql_gets_the_same_table_without_hypertable(plain_pg_server):
    name = f"plain_{uuid.uuid4().hex[:10]}"
    plain_pg_server.create_database(name)
    try:
        upgrade(plain_pg_server.settings(name))
        url = plain_pg_server.url(name)
        with psycopg.connect(url) as conn:
            assert conn.execute(
                "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'").fetchone() == (0,)
            conn.execute(
                "INSERT INTO ecoflow_measurements (ts, device_sn, source, raw_data)"
                " VALUES (now(), 'SN1', 'rest', '{}') ON CONFLICT (device_sn, ts) DO NOTHING")
            assert conn.execute("SELECT count(*) FROM ecoflow_latest").fetchone() == (1,)
    finally:
        plain_pg_server.drop_database(name)


def test_migrate_command_uses_database_url_and_reports_the_flavour(pg_server, empty_db_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTGRES_")}
    env.update(DATABASE_URL=empty_db_url, RETENTION_DAYS="30", LOG_LEVEL="INFO",
               POSTGRES_READONLY_PASSWORD="s3cret-reader-pw")
    result = subprocess.run(
        [sys.executable, "-m", "servicekit.migrate"], env=env, capture_output=True, text=True,
        cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    flavour = "timescaledb-apache" if pg_server.timescaledb else "postgresql"
    assert f"database flavour: {flavour}" in result.stderr or "timescaledb-community" in result.stderr
    assert "s3cret-reader-pw" not in result.stderr + result.stdout
    assert OBJECTS <= relations(empty_db_url)


def test_alembic_command_line_works_from_the_repository(empty_db_url):
    env = dict(os.environ, DATABASE_URL=empty_db_url)
    alembic = Path(sys.executable).with_name("alembic")
    result = subprocess.run([str(alembic), "upgrade", "head"], env=env, capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    from alembic.script import ScriptDirectory

    from servicekit.migrate import alembic_config
    from servicekit.settings import DatabaseSettings

    head = ScriptDirectory.from_config(
        alembic_config(DatabaseSettings(DATABASE_URL=empty_db_url))).get_current_head()
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (head,)


def test_bad_database_url_stops_with_a_message_naming_the_variable(tmp_path):
    env = dict(os.environ, DATABASE_URL="mysql://root@localhost/x")
    result = subprocess.run([sys.executable, "-m", "servicekit.migrate"], env=env,
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr and "postgresql://" in result.stderr
    assert "Traceback" not in result.stderr


def test_retention_removes_old_readings_now_without_a_policy_job(db_url, db):
    db.execute(
        "INSERT INTO ecoflow_measurements (ts, device_sn, source, raw_data) VALUES"
        " (now() - interval '40 days', 'SN1', 'rest', '{}'),"
        " (now() - interval '1 day', 'SN1', 'rest', '{}')")
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1),
                           poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            fl = dbsetup.flavour(conn)
            if fl.community:
                pytest.skip("community TimescaleDB uses a background retention policy instead")
            message = dbsetup.apply_retention_policy(conn, 30)
    finally:
        engine.dispose()
    assert "older than 30 days" in message
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (1,)


MONTH_OF_READINGS = """
INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, watts_in_sum, source, raw_data)
SELECT ts, 'SN1', 80, 300, 'rest', '{}'
  FROM generate_series(date_bin('1 minute', now(), TIMESTAMPTZ '2000-01-01')
                       - interval '30 days', now() - interval '2 minutes', interval '1 minute') ts
"""


def test_upgrading_a_community_database_materializes_the_rollups_whole_history(pg_server):
    # Issue #16: 0001's refresh policies looked back 2 hours (1-minute rollup) and 3 days
    # (1-hour rollup) over rollups created WITH NO DATA, so a user's history was missing from
    # them. 0007 widens the policies to the whole history and materializes it on upgrade.
    name = f"cagg_{uuid.uuid4().hex[:10]}"
    pg_server.create_database(name)
    try:
        settings, url = pg_server.settings(name), pg_server.url(name)
        upgrade(settings, "0006")
        with psycopg.connect(url, autocommit=True) as conn:
            if not community(conn):
                pytest.skip("continuous aggregates need the community edition"
                            " (TEST_TIMESCALEDB_LICENSE=timescale)")
            pause_all(conn)
            conn.execute(MONTH_OF_READINGS)
            readings = conn.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0]
            run_jobs(conn, "policy_refresh_continuous_aggregate")  # as a user's server did
            before = conn.execute("SELECT count(*) FROM ecoflow_rollup_1m").fetchone()[0]
            assert before < 3 * 60  # the bug: the last two hours only
        upgrade(settings)
        with psycopg.connect(url, autocommit=True) as conn:
            pause_all(conn)  # what follows is the migration's doing, not a job's
            assert conn.execute("SELECT count(*), sum(readings) FROM ecoflow_rollup_1m"
                                ).fetchone() == (readings, readings)
            assert conn.execute("SELECT sum(readings) FROM ecoflow_rollup_1h"
                                ).fetchone() == (readings,)
            policies = conn.execute(
                "SELECT c.view_name, j.config->>'start_offset'"
                "  FROM timescaledb_information.jobs j"
                "  JOIN timescaledb_information.continuous_aggregates c"
                "    ON c.materialization_hypertable_name = j.hypertable_name"
                " WHERE j.proc_name = 'policy_refresh_continuous_aggregate'").fetchall()
            assert sorted(policies) == [("ecoflow_rollup_1h", None), ("ecoflow_rollup_1m", None)]
        downgrade(settings, "0006")
        with psycopg.connect(url, autocommit=True) as conn:
            offsets = {r[0] for r in conn.execute(
                "SELECT config->>'start_offset' FROM timescaledb_information.jobs"
                " WHERE proc_name = 'policy_refresh_continuous_aggregate'")}
            assert offsets == {"02:00:00", "3 days"}
            assert conn.execute("SELECT to_regclass('ecoflow_summary_invalidations')"
                                ).fetchone() == (None,)
    finally:
        pg_server.drop_database(name)
