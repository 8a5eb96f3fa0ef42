"""Database set-up that depends on settings: TimescaleDB flavour, read-only role, retention.

Used by the migration revisions and re-applied by `ecoflow-migrate` on every run, so that a
changed password or retention period takes effect without a new revision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

HYPERTABLE = "ecoflow_measurements"


@dataclass(frozen=True)
class Flavour:
    """What the server offers: plain PostgreSQL, TimescaleDB Apache build, or community (TSL)."""

    timescaledb: bool
    license: str | None  # 'timescale' (community/TSL), 'apache', or None without TimescaleDB

    @property
    def community(self) -> bool:
        return self.timescaledb and self.license == "timescale"

    @property
    def name(self) -> str:
        if not self.timescaledb:
            return "postgresql"
        return "timescaledb-community" if self.community else "timescaledb-apache"


def timescaledb_available(conn: Connection) -> bool:
    """The extension is installed on the server and loaded (it must be preloaded to work)."""
    row = conn.execute(
        text(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),"
            " coalesce(current_setting('shared_preload_libraries', true), '')"
        )
    ).one()
    available, preload = row
    return bool(available) and "timescaledb" in preload


def ensure_timescaledb(conn: Connection) -> Flavour:
    """Create the extension when the server has it, and report the flavour in use."""
    installed = conn.execute(
        text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    ).scalar()
    if installed is None and timescaledb_available(conn):
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
        installed = True
    return flavour(conn) if installed else Flavour(False, None)


def flavour(conn: Connection) -> Flavour:
    installed = conn.execute(
        text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    ).scalar()
    if not installed:
        return Flavour(False, None)
    lic = conn.execute(text("SELECT current_setting('timescaledb.license', true)")).scalar()
    return Flavour(True, lic)


def can_create_roles(conn: Connection) -> bool:
    return bool(
        conn.execute(
            text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
        ).scalar()
    )


def role_exists(conn: Connection, role: str) -> bool:
    return bool(
        conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).scalar()
    )


# Identifiers and the password are quoted server-side with format(%I, %L) from values passed
# as settings of this transaction, so no value is ever spliced into SQL by Python.
_ROLE_SQL = """
DO $$
DECLARE
  r text := current_setting('ecoflow.ro_user');
  p text := current_setting('ecoflow.ro_password');
BEGIN
  -- Roles belong to the whole server: two migrations of different databases at once (test
  -- workers sharing a server) must not both find the role missing.
  PERFORM pg_advisory_xact_lock(hashtext('ecoflow readonly role'));
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
    EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT', r);
  END IF;
  IF p <> '' THEN
    EXECUTE format('ALTER ROLE %I PASSWORD %L', r, p);
  END IF;
  EXECUTE format('ALTER ROLE %I SET default_transaction_read_only = on', r);
END
$$
"""

_GRANT_SQL = """
DO $$
DECLARE
  r text := current_setting('ecoflow.ro_user');
BEGIN
  EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r);
  EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', r);
  EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO %I', r);
  EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO %I', r);
  -- Temporary tables are writes a read-only session still may do (they bypass
  -- default_transaction_read_only once a client turns it off). Every role gets TEMP through
  -- PUBLIC, so it is taken from PUBLIC; the database owner, which the collector and the
  -- policy worker connect as, keeps it as the owner. (A warning, not an error, when the
  -- migrating user does not own the database.)
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM %I', current_database(), r);
END
$$
"""

_REVOKE_SQL = """
DO $$
DECLARE
  r text := current_setting('ecoflow.ro_user');
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE SELECT ON TABLES FROM %I', r);
    EXECUTE format('REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM %I', r);
    EXECUTE format('REVOKE USAGE ON SCHEMA public FROM %I', r);
  END IF;
  -- PostgreSQL's default, taken away by _GRANT_SQL.
  EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
END
$$
"""


def ensure_readonly_role(conn: Connection, role: str, password: str) -> bool:
    """Create (or update) the SELECT-only role and grant it every table and view.

    Returns False, with a warning, when the role does not exist and the migrating user may not
    create roles; the schema is still migrated.
    """
    conn.execute(
        text("SELECT set_config('ecoflow.ro_user', :r, true), set_config('ecoflow.ro_password', :p, true)"),
        {"r": role, "p": password or ""},
    )
    if can_create_roles(conn):
        conn.execute(text(_ROLE_SQL))
    elif not role_exists(conn, role):
        log.warning(
            "read-only role %s not created: the migrating user may not create roles. "
            "Create it as a superuser (CREATE ROLE %s LOGIN PASSWORD '...') and run "
            "ecoflow-migrate again to grant it SELECT.",
            role,
            role,
        )
        return False
    if not password:
        log.warning(
            "POSTGRES_READONLY_PASSWORD is empty: role %s can only log in where the server "
            "trusts local connections; set a password for Grafana and Home Assistant",
            role,
        )
    conn.execute(text(_GRANT_SQL))
    conn.execute(text("SELECT set_config('ecoflow.ro_password', '', true)"))
    return True


def revoke_readonly_role(conn: Connection, role: str) -> None:
    """Take the grants back (the role itself is cluster-wide and may serve other databases)."""
    conn.execute(text("SELECT set_config('ecoflow.ro_user', :r, true)"), {"r": role})
    conn.execute(text(_REVOKE_SQL))


def apply_retention_policy(conn: Connection, days: int) -> str:
    """Keep raw readings for `days` days (0 = forever).

    Community TimescaleDB: a background retention policy. Otherwise old rows are removed now
    (drop_chunks with the Apache build, DELETE on plain PostgreSQL); call it periodically.
    Returns what was done, for the log.
    """
    fl = flavour(conn)
    if fl.community:
        conn.execute(text(f"SELECT remove_retention_policy('{HYPERTABLE}', if_exists => true)"))
        if days <= 0:
            return "retention policy removed: raw readings are kept forever"
        conn.execute(
            text(f"SELECT add_retention_policy('{HYPERTABLE}', make_interval(days => :d))"),
            {"d": days},
        )
        return f"retention policy: raw readings older than {days} days are dropped"
    if days <= 0:
        return "retention disabled: raw readings are kept forever"
    return enforce_retention(conn, days)


def enforce_retention(conn: Connection, days: int) -> str:
    """Remove raw readings older than `days` days right now."""
    if days <= 0:
        return "retention disabled"
    fl = flavour(conn)
    if fl.timescaledb:
        dropped = conn.execute(
            text(f"SELECT count(*) FROM drop_chunks('{HYPERTABLE}', older_than => make_interval(days => :d))"),
            {"d": days},
        ).scalar()
        return f"dropped {dropped} chunk(s) older than {days} days"
    deleted = conn.execute(
        text(f"DELETE FROM {HYPERTABLE} WHERE ts < now() - make_interval(days => :d)"),
        {"d": days},
    ).rowcount
    return f"deleted {deleted} reading(s) older than {days} days"
