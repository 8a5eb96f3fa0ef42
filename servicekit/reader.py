"""Read-only database access for the tools that only read (export, status API).

They connect as the read-only role (POSTGRES_READONLY_USER / POSTGRES_READONLY_PASSWORD on
POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB), or to DATABASE_URL when it is set, and every
session they open is read-only whatever the role may do.
"""

from __future__ import annotations

from urllib.parse import quote

import psycopg

from servicekit.settings import DatabaseSettings

# Asked of the server at connection: the session may not write, whoever the role is.
READ_ONLY_OPTIONS = "-c default_transaction_read_only=on"

MAY_WRITE = """
SELECT current_user,
       has_table_privilege(current_user, 'ecoflow_measurements', 'INSERT')
       OR has_table_privilege(current_user, 'commands', 'INSERT')
"""


def reader_url(settings: DatabaseSettings) -> str:
    """DATABASE_URL when set; otherwise the read-only role on the POSTGRES_* server."""
    if settings.database_url:
        return settings.libpq_url()
    auth = quote(settings.readonly_user, safe="")
    if settings.readonly_password:
        auth += ":" + quote(settings.readonly_password, safe="")
    return (f"postgresql://{auth}@{settings.postgres_host}:{settings.postgres_port}/"
            f"{quote(settings.postgres_db, safe='')}")


def connect(url: str, **kw) -> psycopg.Connection:
    """A connection whose transactions are read-only."""
    return psycopg.connect(url, options=READ_ONLY_OPTIONS, **kw)


def role_may_write(conn: psycopg.Connection) -> tuple[str, bool]:
    """The role the connection logged in as, and whether it holds write privileges on the
    stack's tables (the read-only role holds none)."""
    user, may_write = conn.execute(MAY_WRITE).fetchone()
    if not conn.autocommit:
        conn.rollback()
    return user, bool(may_write)
