"""Where the test fixtures get their PostgreSQL and Mosquitto from (see conftest.py)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from servicekit.migrate import upgrade
from servicekit.settings import DatabaseSettings
from testbed.mosquitto import MosquittoServer, random_users
from testbed.postgres import PostgresServer, find_bindir, timescaledb_installed

READONLY_USER = "ecoflow_reader"
READONLY_PASSWORD = "reader-" + secrets.token_hex(6)
# Users of the secure broker: the stack's own services, two host agents, and the account that
# plays EcoFlow's cloud broker in the cloud-source tests.
SECURE_USERS = ("policy", "collector", "bridge", "nas-01", "pc-01", "cloud")


def _require_timescaledb() -> bool:
    return os.environ.get("REQUIRE_TIMESCALEDB", "").lower() in ("1", "true", "yes")


def docker_available() -> bool:
    if os.environ.get("TESTCONTAINERS", "").lower() in ("0", "false", "no", "off"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


# -- PostgreSQL ---------------------------------------------------------------------------
@dataclass
class DatabaseServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    admin_url: str  # a URL to a maintenance database with CREATEDB rights
    timescaledb: bool
    kind: str

    def url(self, dbname: str) -> str:
        parts = urlsplit(self.admin_url)
        return urlunsplit(parts._replace(path="/" + dbname))

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_url, autocommit=True)

    def create_database(self, name: str, template: str | None = None) -> None:
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            stmt += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self._admin() as conn:
            conn.execute(stmt)

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def settings(self, dbname: str) -> DatabaseSettings:
        return DatabaseSettings(
            database_url=self.url(dbname),
            readonly_user=READONLY_USER,
            readonly_password=READONLY_PASSWORD,
        )

    def make_template(self) -> str:
        """Migrate a new database to head and freeze it as a template for clones."""
        name = f"ecoflow_template_{uuid.uuid4().hex[:8]}"
        self.create_database(name)
        upgrade(self.settings(name))
        with self._admin() as conn:
            # TimescaleDB's scheduler keeps a session open on every database with the
            # extension, and a database being accessed cannot be cloned.
            conn.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name))
            )
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
            )
        return name


@contextlib.contextmanager
def start_database_server():
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        with psycopg.connect(external, autocommit=True) as conn:
            ts = bool(conn.execute(
                "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
            ).fetchone()[0])
        _check_timescaledb(ts, "the server at TEST_DATABASE_URL has no TimescaleDB")
        yield DatabaseServer(external, ts, "external")
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        image = os.environ.get("TEST_TIMESCALEDB_IMAGE", "timescale/timescaledb:2.19.3-pg16")
        with PostgresContainer(image, username="postgres", password="postgres",
                               dbname="postgres", driver=None) as pg:
            yield DatabaseServer(pg.get_connection_url(), True, "container")
        return
    try:
        bindir = find_bindir()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    has_ts = timescaledb_installed(bindir)
    _check_timescaledb(
        has_ts,
        f"TimescaleDB is not installed for the PostgreSQL server in {bindir}: "
        "run scripts/install-timescaledb (make test does)",
    )
    server = PostgresServer(timescaledb=True, bindir=bindir)
    try:
        server.start()
        yield DatabaseServer(server.url(), server.timescaledb, "native")
    finally:
        server.stop()


@contextlib.contextmanager
def start_plain_database_server():
    """PostgreSQL without TimescaleDB: a native server started without the library loaded,
    or PLAIN_TEST_DATABASE_URL when set."""
    external = os.environ.get("PLAIN_TEST_DATABASE_URL")
    if external:
        yield DatabaseServer(external, False, "external")
        return
    try:
        server = PostgresServer(timescaledb=False)
    except RuntimeError as exc:
        pytest.skip(f"no native PostgreSQL binaries for the plain-PostgreSQL flavour: {exc}")
    try:
        server.start()
        yield DatabaseServer(server.url(), False, "native")
    finally:
        server.stop()


def _check_timescaledb(present: bool, why: str) -> None:
    if not present and _require_timescaledb():
        pytest.fail(f"REQUIRE_TIMESCALEDB is set but {why}", pytrace=False)


# -- Mosquitto ----------------------------------------------------------------------------
@dataclass
class MqttBroker:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f"{self.username}:{self.password}@" if self.username else ""
        return f"mqtt://{auth}{self.host}:{self.port}"


@dataclass
class SecureMqttBroker:
    """Authentication, the project's ACL, and TLS (with `ca_file` to verify the server)."""

    host: str
    port: int
    tls_port: int
    ca_file: Path
    users: dict[str, str] = field(default_factory=dict)

    def credentials(self, user: str) -> tuple[str, str]:
        return user, self.users[user]


@contextlib.contextmanager
def start_mqtt_broker():
    external = os.environ.get("TEST_MQTT_URL")
    if external:
        parts = urlsplit(external)
        yield MqttBroker(parts.hostname or "127.0.0.1", parts.port or 1883,
                         parts.username, parts.password)
        return
    if docker_available():
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        conf = Path(_tmpdir("ecoflow-mqtt-conf-")) / "mosquitto.conf"
        conf.write_text("listener 1883 0.0.0.0\nallow_anonymous true\npersistence false\n")
        container = (
            DockerContainer("eclipse-mosquitto:2")
            .with_exposed_ports(1883)
            .with_volume_mapping(str(conf), "/mosquitto/config/mosquitto.conf", "ro")
        )
        with container:
            wait_for_logs(container, "running", timeout=30)
            yield MqttBroker(container.get_container_host_ip(),
                             int(container.get_exposed_port(1883)))
        shutil.rmtree(conf.parent, ignore_errors=True)
        return
    with MosquittoServer() as server:
        yield MqttBroker(server.host, server.port)


@contextlib.contextmanager
def start_secure_mqtt_broker():
    # Always the machine's own mosquitto: the broker's files (password file, ACL,
    # certificates) are generated here, and certificates must name 127.0.0.1.
    users = random_users(*SECURE_USERS)
    with MosquittoServer(users=users, tls=True) as server:
        yield SecureMqttBroker(server.host, server.port, server.tls_port,
                               server.tls_files.ca_cert, users)


def _tmpdir(prefix: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=prefix)
