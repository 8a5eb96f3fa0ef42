"""TimescaleDB's background jobs in the tests: paused in the migrated template, run explicitly.

The community edition schedules jobs of its own on every database with our schema (the
rollups' refresh policies, compression, retention) and TimescaleDB's housekeeping (e.g.
job_stat_history_retention, which fails under the Apache license: not ours). A test that
raced them would pass or fail by timing, so the template every test database is cloned from
has them all unscheduled (`scheduled => false`, community edition): the jobs exist as a user has them, and a test
that wants one to run says so with `run_jobs()` (CALL run_job, what the scheduler does).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

JOBS = """
SELECT j.job_id FROM timescaledb_information.jobs j
  LEFT JOIN timescaledb_information.continuous_aggregates c
         ON (c.materialization_hypertable_schema, c.materialization_hypertable_name)
          = (j.hypertable_schema, j.hypertable_name)
 WHERE j.proc_name = %(proc)s
   AND (%(relation)s::text IS NULL OR j.hypertable_name = %(relation)s OR c.view_name = %(relation)s)
 ORDER BY j.job_id
"""


def has_timescaledb(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
                        ).fetchone() is not None


def pause_all(conn: psycopg.Connection) -> int:
    """Unschedule every background job of this database; returns how many. Under the Apache
    license, which allows no job management, the only jobs are TimescaleDB's housekeeping,
    which touches none of our tables: they stay as they are."""
    if not community(conn):
        return 0
    ids = [r[0] for r in conn.execute(
        "SELECT job_id FROM timescaledb_information.jobs WHERE scheduled").fetchall()]
    for job_id in ids:
        conn.execute("SELECT alter_job(%s, scheduled => false)", (job_id,))
    return len(ids)


def pause_in_template(admin_url: str, url: str, name: str) -> None:
    """Unschedule the jobs of the template database `name` (reachable at `url`), which
    DatabaseServer.make_template froze with connections disallowed; freeze it again."""
    ident = sql.Identifier(name)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident))
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                pause_all(conn)
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident))
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = %s AND pid <> pg_backend_pid()", (name,))


def run_jobs(conn: psycopg.Connection, proc: str, relation: str | None = None) -> list[int]:
    """Run now, as the scheduler would, the jobs of procedure `proc` (e.g.
    'policy_refresh_continuous_aggregate', 'policy_retention', 'policy_compression'), on
    `relation` (a hypertable or a continuous aggregate) if given; returns their ids."""
    ids = [r[0] for r in conn.execute(JOBS, {"proc": proc, "relation": relation}).fetchall()]
    for job_id in ids:
        conn.execute("CALL run_job(%s)", (job_id,))
    return ids


def community(conn: psycopg.Connection) -> bool:
    """The server runs TimescaleDB under the community (`timescale`) license."""
    return has_timescaledb(conn) and conn.execute(
        "SELECT current_setting('timescaledb.license', true)").fetchone()[0] == "timescale"
