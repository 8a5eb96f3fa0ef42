"""The read-only role for Grafana and Home Assistant can read everything and change nothing."""

from __future__ import annotations

import psycopg
import pytest

from servicekit.migrate import apply_settings
from tests.services import READONLY_USER

VIEWS = ("ecoflow_latest", "outages", "energy_daily", "ecoflow_rollup_1m", "ecoflow_rollup_1h")


@pytest.fixture
def reader(pg_server, db_url, db):
    db.execute(
        "INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, grid_connected, source,"
        " raw_data) VALUES (now(), 'SN1', 50, true, 'rest', '{}')"
    )
    name = db_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url(name).replace("postgres@", f"{READONLY_USER}@", 1),
                         autocommit=True) as conn:
        yield conn


def test_reader_can_select_every_view_and_table(reader):
    tables = [r[0] for r in reader.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()]
    assert "ecoflow_measurements" in tables and "commands" in tables
    for name in (*VIEWS, *tables):
        reader.execute(f"SELECT * FROM {name} LIMIT 1").fetchall()
    assert reader.execute("SELECT soc_percent FROM ecoflow_latest").fetchone() == (50.0,)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO ecoflow_measurements (ts, device_sn, source, raw_data)"
        " VALUES (now(), 'X', 'rest', '{}')",
        "UPDATE ecoflow_measurements SET soc_percent = 1",
        "DELETE FROM ecoflow_measurements",
        "INSERT INTO commands (id, agent_id, action, ttl_sec, expires_at, payload)"
        " VALUES (gen_random_uuid(), 'a', 'shutdown', 1, now() + interval '1 s', '{}')",
        "DELETE FROM devices",
    ],
)
def test_reader_cannot_change_anything(reader, statement):
    # Sessions are read-only by default; even with that switched off, privileges refuse.
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader.execute(statement)
    reader.execute("SET default_transaction_read_only = off")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        reader.execute(statement)


def test_reader_cannot_create_tables(reader):
    reader.execute("SET default_transaction_read_only = off")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        reader.execute("CREATE TABLE mine (x int)")


def test_reader_cannot_create_temporary_tables(reader, pg_server, db_url):
    # PUBLIC holds TEMP on every new database; `ecoflow-migrate` takes it away on every run
    # (a database's own privileges are not copied from the template the tests clone, so the
    # run is repeated here as the stack's migrate service does at each start).
    apply_settings(pg_server.settings(db_url.rsplit("/", 1)[1]))
    reader.execute("SET default_transaction_read_only = off")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        reader.execute("CREATE TEMP TABLE mine (x int)")
    assert reader.execute(
        "SELECT has_database_privilege(current_user, current_database(), 'TEMP')"
    ).fetchone() == (False,)


def test_the_owner_keeps_its_temporary_tables(pg_server, db_url, db):
    # The collector stages readings in a temporary table; it connects as the owner.
    apply_settings(pg_server.settings(db_url.rsplit("/", 1)[1]))
    db.execute("CREATE TEMP TABLE owner_scratch (x int)")
    assert db.execute(
        "SELECT has_database_privilege(current_user, current_database(), 'TEMP')"
    ).fetchone() == (True,)


def test_reader_notifying_the_readings_channel_does_not_wake_the_policy(reader, db, db_url):
    """PostgreSQL has no privilege for NOTIFY: a client with the read-only role sending
    NOTIFY ecoflow_readings in a loop drove the policy worker from 0.2 % to 39 % of a core.
    Only a session that may write readings wakes it; the reader's wait runs to its interval."""
    import threading
    import time

    from policy.worker import READINGS_CHANNEL, _wait_for_readings

    stop = threading.Event()
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {READINGS_CHANNEL}")
        for _ in range(20):
            reader.execute(f"NOTIFY {READINGS_CHANNEL}")
        started = time.monotonic()
        _wait_for_readings(listener, 1.5, stop)
        assert time.monotonic() - started >= 1.4, "woken by the read-only role"
        # A reading written by the writing role wakes it at once (the insert trigger notifies).
        db.execute("INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, source,"
                   " raw_data) VALUES (now(), 'SN2', 40, 'rest', '{}')")
        started = time.monotonic()
        _wait_for_readings(listener, 5, stop)
        assert time.monotonic() - started < 1.0
