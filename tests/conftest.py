"""Real services for the tests: PostgreSQL (with TimescaleDB) and Mosquitto.

Where they come from, in order:
  1. TEST_DATABASE_URL / TEST_MQTT_URL: servers you run yourself;
  2. a reachable Docker engine: testcontainers (timescale/timescaledb, eclipse-mosquitto:2);
  3. otherwise the machine's own binaries, started on free ports in temporary directories.
Set REQUIRE_TIMESCALEDB=1 (as `make test` does) to fail instead of falling back to plain
PostgreSQL when TimescaleDB is not installed.
"""

from __future__ import annotations

import logging
import os
import uuid

import psycopg
import pytest

from servicekit.logging import RedactingFormatter
from tests.services import (
    DatabaseServer,
    MqttBroker,
    SecureMqttBroker,
    start_database_server,
    start_mqtt_broker,
    start_plain_database_server,
    start_secure_mqtt_broker,
)
from tests.timescale_jobs import pause_in_template


@pytest.fixture(autouse=True)
def _program_log_handler_removed():
    """A program's main run in-process (servicekit.logging.setup) leaves the root logger a
    handler on the stream pytest captured for that test; a later test's log record (a paho
    callback thread's, say) went to that closed stream: "--- Logging error ---" in the run's
    output. The handler goes with the test that set it up."""
    yield
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler and isinstance(handler.formatter,
                                                                   RedactingFormatter):
            root.removeHandler(handler)


@pytest.fixture(scope="session")
def pg_server() -> DatabaseServer:
    """The main database server: TimescaleDB when it can be had."""
    with start_database_server() as server:
        yield server


@pytest.fixture(scope="session")
def plain_pg_server() -> DatabaseServer:
    """A PostgreSQL server without TimescaleDB loaded, for the plain-PostgreSQL flavour."""
    with start_plain_database_server() as server:
        yield server


@pytest.fixture(scope="session")
def migrated_template(pg_server: DatabaseServer) -> str:
    """A database migrated to head once per session; tests get clones of it, with TimescaleDB's
    background jobs unscheduled (tests/timescale_jobs.py: tests run them explicitly)."""
    name = pg_server.make_template()
    if pg_server.timescaledb:
        pause_in_template(pg_server.admin_url, pg_server.url(name), name)
    return name


@pytest.fixture
def db_url(pg_server: DatabaseServer, migrated_template: str) -> str:
    """A fresh, migrated database for one test (postgresql:// URL)."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(name, template=migrated_template)
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def db(db_url: str) -> psycopg.Connection:
    """An autocommit connection to the test's own migrated database."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def empty_db_url(pg_server: DatabaseServer) -> str:
    """A fresh database with no schema, for migration tests."""
    name = f"empty_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(name)
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="session")
def mqtt_broker() -> MqttBroker:
    """An anonymous Mosquitto (MQTT v5) on a free port."""
    with start_mqtt_broker() as broker:
        yield broker


@pytest.fixture(scope="session")
def secure_mqtt_broker() -> SecureMqttBroker:
    """Mosquitto with a password file, the project's ACL (compose/mosquitto/acl) and a TLS
    listener whose CA is generated for this session."""
    with start_secure_mqtt_broker() as broker:
        yield broker


def pytest_report_header(config):
    lines = []
    for var in ("TEST_DATABASE_URL", "TEST_MQTT_URL", "REQUIRE_TIMESCALEDB",
                "TEST_TIMESCALEDB_LICENSE"):
        if os.environ.get(var):
            lines.append(f"{var} is set")
    return lines
