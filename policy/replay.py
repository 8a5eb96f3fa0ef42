"""Replay: the same rules over stored history with a simulated clock, sending nothing.

Runs in one transaction that is rolled back. Temporary tables named like the worker's state
tables shadow them (PostgreSQL looks in pg_temp first), so the replay starts from a clean state
and leaves no trace, while the live worker keeps running.

The topology comes from the configuration the replay is given (DEVICE_TO_AGENTS_JSON and
POLICY_CONFIG_FILE, or the file passed as --config), written into temporary copies of the
topology tables: the live tables are neither changed nor locked, so the collector's device
updates never wait for a replay. With no configuration, the topology the worker stored is used."""

from __future__ import annotations

from datetime import datetime, timedelta

import psycopg

from policy import topology
from policy.settings import PolicySettings
from policy.worker import Worker, rows_as_dicts
from servicekit.settings import SettingsError

STATE_TABLES = ("commands", "command_acks", "policy_events", "policy_conditions",
                "episode_closures", "agent_status", "nut_reports")
# Copied, not emptied: a device's name and freshness limits, and the stored topology when
# the replay has no configuration of its own.
TOPOLOGY_TABLES = ("devices", "agents", "agent_supplies")
DECISIONS = ("trigger_fired", "command_aborted", "power_returned_after_commit")
NO_AGENTS = (
    "replay: no agents to evaluate: DEVICE_TO_AGENTS_JSON and POLICY_CONFIG_FILE are not set "
    "and the database holds no enabled agent. Set one of them as the worker has it, or pass "
    "--config FILE with the agents and their supplies"
)


def replay(db_url: str, settings: PolicySettings, start: datetime, end: datetime,
           step_sec: float | None = None) -> list[dict]:
    """Every decision the rules would have taken between start and end, oldest first.
    Raises SettingsError when there is no agent to decide for."""
    step = timedelta(seconds=step_sec or settings.interval_sec)
    with psycopg.connect(db_url) as conn:
        try:
            for table in STATE_TABLES:
                conn.execute(f"CREATE TEMP TABLE {table} (LIKE public.{table} INCLUDING ALL)"
                             " ON COMMIT DROP")
            for table in TOPOLOGY_TABLES:
                conn.execute(f"CREATE TEMP TABLE {table} (LIKE public.{table} INCLUDING ALL)"
                             " ON COMMIT DROP")
                conn.execute(f"INSERT INTO pg_temp.{table} SELECT * FROM public.{table}")
            if settings.device_to_agents_json or settings.config_file:
                topology.sync(conn, settings)
            if not conn.execute("SELECT count(*) FROM agents WHERE enabled").fetchone()[0]:
                raise SettingsError(NO_AGENTS)
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
