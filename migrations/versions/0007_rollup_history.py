"""Rollups cover the whole retained history on every edition, and late readings count.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Readings arrive late: a backfill, the backlog a collector drains after a long database
outage, an import. Before this revision both ways of keeping the rollups lost them:

* Community edition (continuous aggregates, 0001): the rollups were created `WITH NO DATA` and
  their refresh policies looked back only 2 hours (1-minute rollup) and 3 days (1-hour rollup).
  Everything older than that was never materialized, and vanished from the real-time rollups
  as soon as the first refresh moved their watermark; a late reading older than that window
  stayed in TimescaleDB's invalidation log and never reached the rollup. Now the policies have
  `start_offset => NULL`: every run processes the whole invalidation log (an insert, update or
  delete behind the watermark invalidates its buckets; so does drop_chunks, which is how the
  rollups follow the retention period) and recomputes only the invalidated buckets, so an
  up-to-date run costs what the old ones did. The upgrade materializes the whole history once.
* Apache build and plain PostgreSQL (summary tables, 0003): a refresh recomputed only `lookback`
  behind its previous watermark; older late readings waited for an explicit
  `ecoflow_refresh_summaries(since => ...)`. Now a row trigger on `ecoflow_measurements` logs
  the time of every reading inserted, updated or deleted behind the watermark in
  `ecoflow_summary_invalidations` (at most one row per transaction unless it goes further
  back), and the next refresh recomputes from the earliest logged time, like TimescaleDB's own
  invalidation log. The summary tables also serve `energy_daily` and `outages` on the
  community edition, so the trigger is there on every edition.
"""

import importlib.util
from pathlib import Path

from alembic import op
from sqlalchemy import text

from servicekit import dbsetup

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _load_0003():
    """Revision 0003 (its refresh function is redefined here and restored on downgrade)."""
    path = Path(__file__).with_name("0003_summaries.py")
    spec = importlib.util.spec_from_file_location("ecoflow_migration_0003", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SUMMARIES = _load_0003()

# Continuous aggregate: (end_offset, schedule_interval, 0001's start_offset for the downgrade).
CAGG_POLICIES = {
    "ecoflow_rollup_1m": ("1 minute", "1 minute", "2 hours"),
    "ecoflow_rollup_1h": ("1 hour", "30 minutes", "3 days"),
}

INVALIDATION = """
CREATE TABLE ecoflow_summary_invalidations (
    ts       timestamptz NOT NULL,
    logged_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ecoflow_summary_invalidations IS
    'Times of readings inserted, updated or deleted behind the summaries'' watermark: the next'
    ' ecoflow_refresh_summaries() recomputes from the earliest and empties the log';

CREATE FUNCTION ecoflow_summary_invalidate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t      timestamptz := CASE TG_OP WHEN 'DELETE' THEN OLD.ts ELSE NEW.ts END;
    logged text;
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.ts < t THEN
        t := OLD.ts;
    END IF;
    -- Readings at or after the watermark are read by the next refresh anyway.
    IF t < (SELECT materialized_until FROM ecoflow_summary_state) THEN
        -- One log row per transaction, unless a reading goes further back than the last one.
        logged := current_setting('ecoflow.summary_invalid_from', true);
        IF coalesce(logged, '') = '' OR extract(epoch FROM t) < logged::double precision THEN
            INSERT INTO ecoflow_summary_invalidations (ts) VALUES (t);
            PERFORM set_config('ecoflow.summary_invalid_from', extract(epoch FROM t)::text, true);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER ecoflow_summary_invalidate
    AFTER INSERT OR UPDATE OR DELETE ON ecoflow_measurements
    FOR EACH ROW EXECUTE FUNCTION ecoflow_summary_invalidate();
"""

_OLD_REFRESH = SUMMARIES.FUNCTIONS[
    SUMMARIES.FUNCTIONS.index("CREATE FUNCTION ecoflow_refresh_summaries"):]
_LOCK = "    SELECT * INTO st FROM ecoflow_summary_state FOR UPDATE;\n"
_CONSUME = """\
    -- Readings changed behind the watermark since (ecoflow_summary_invalidations): recompute
    -- from the earliest. Entries this statement does not see wait for the next refresh.
    WITH consumed AS (DELETE FROM ecoflow_summary_invalidations RETURNING ts)
    SELECT least(since, min(ts)) INTO since FROM consumed;
"""
_OLD_COMMENT = ("'Bring the summary tables up to date (the policy worker calls it every minute). Pass"
                " since'\n    ' to recompute from that time after a backfill of older readings;"
                " ''-infinity'' rebuilds all';")
_NEW_COMMENT = ("'Bring the summary tables up to date (the policy worker calls it every minute),"
                " from the'\n    ' earliest reading changed behind the watermark"
                " (ecoflow_summary_invalidations) if any.'\n    ' since forces a recomputation"
                " from that time; ''-infinity'' rebuilds all';")
assert _LOCK in _OLD_REFRESH and _OLD_COMMENT in _OLD_REFRESH, "0003's refresh function changed"
NEW_REFRESH = (_OLD_REFRESH.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
               .replace(_LOCK, _LOCK + _CONSUME).replace(_OLD_COMMENT, _NEW_COMMENT))
OLD_REFRESH = _OLD_REFRESH.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


def _caggs(conn) -> list[str]:
    if not dbsetup.flavour(conn).timescaledb:
        return []
    names = set(conn.execute(text(
        "SELECT view_name FROM timescaledb_information.continuous_aggregates")).scalars())
    return [name for name in CAGG_POLICIES if name in names]


def _set_policy(name: str, start: str | None) -> None:
    end, every, _old_start = CAGG_POLICIES[name]
    op.execute(f"SELECT remove_continuous_aggregate_policy('{name}', if_exists => true)")
    start_sql = "NULL" if start is None else f"INTERVAL '{start}'"
    op.execute(
        f"SELECT add_continuous_aggregate_policy('{name}', start_offset => {start_sql},"
        f" end_offset => INTERVAL '{end}', schedule_interval => INTERVAL '{every}')"
    )


def upgrade() -> None:
    conn = op.get_bind()
    op.execute(INVALIDATION)
    op.execute(NEW_REFRESH)
    caggs = _caggs(conn)
    for name in caggs:
        _set_policy(name, None)
    if caggs:
        # Materialize what the old policies never did. A refresh cannot run in a transaction.
        with op.get_context().autocommit_block():
            for name in caggs:
                end = CAGG_POLICIES[name][0]
                op.execute(f"CALL refresh_continuous_aggregate('{name}', NULL,"
                           f" now() - INTERVAL '{end}')")


def downgrade() -> None:
    conn = op.get_bind()
    for name in _caggs(conn):
        _set_policy(name, CAGG_POLICIES[name][2])
    op.execute(OLD_REFRESH)
    op.execute("DROP TRIGGER ecoflow_summary_invalidate ON ecoflow_measurements")
    op.execute("DROP FUNCTION ecoflow_summary_invalidate()")
    op.execute("DROP TABLE ecoflow_summary_invalidations")
