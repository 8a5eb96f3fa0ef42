"""Replay: the same rules over stored history with a simulated clock, sending nothing.

Runs in one transaction that is rolled back. Temporary tables named like the worker's state
tables shadow them (PostgreSQL looks in pg_temp first), so the replay starts from a clean state
and leaves no trace, while the live worker keeps running."""

from __future__ import annotations

from datetime import datetime, timedelta

import psycopg

from policy import topology
from policy.settings import PolicySettings
from policy.worker import Worker, rows_as_dicts

STATE_TABLES = ("commands", "command_acks", "policy_events", "policy_conditions",
                "episode_closures", "agent_status")
DECISIONS = ("trigger_fired", "command_aborted", "power_returned_after_commit")


def replay(db_url: str, settings: PolicySettings, start: datetime, end: datetime,
           step_sec: float | None = None, sync_config: bool = False) -> list[dict]:
    """Every decision the rules would have taken between start and end, oldest first."""
    step = timedelta(seconds=step_sec or settings.interval_sec)
    with psycopg.connect(db_url) as conn:
        try:
            for table in STATE_TABLES:
                conn.execute(f"CREATE TEMP TABLE {table} (LIKE public.{table} INCLUDING ALL)"
                             " ON COMMIT DROP")
            if sync_config:
                topology.sync(conn, settings)
            worker = Worker(conn, settings, link=None)
            now = start
            while now <= end:
                worker.step(now)
                now += step
            return rows_as_dicts(
                conn,
                "SELECT ts, kind AS decision, agent_id, device_sn, episode_id, trigger,"
                " message AS reason FROM policy_events WHERE kind = ANY(%s) ORDER BY id",
                (list(DECISIONS),),
            )
        finally:
            conn.rollback()
