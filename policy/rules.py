"""The shutdown rules: runs the SQL in policy/sql/ and folds each agent's supplies into one view."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

SQL_DIR = Path(__file__).with_name("sql")


@cache
def load_sql(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


def supply_rows(conn: psycopg.Connection, now: datetime, params: dict) -> list[dict]:
    """One dict per (agent, supply) as of `now`; see supply_state.sql for the columns."""
    with conn.cursor(row_factory=dict_row) as cur:
        # The rules are many small index lookups whose estimated cost crosses jit_above_cost;
        # compiling them would take longer than running them.
        cur.execute("SET jit = off")
        cur.execute(load_sql("supply_state"), dict(params, now=now))
        return cur.fetchall()


@dataclass
class AgentView:
    """One agent's supplies and what they add up to (S9: healthy supplies against the need)."""

    agent_id: str
    tier: int
    shutdown_delay_sec: int | None
    supplies: list[dict]

    @property
    def needed(self) -> int:
        wanted = self.supplies[0]["min_supplies"]
        return min(wanted or len(self.supplies), len(self.supplies))

    @property
    def healthy(self) -> int:
        return sum(1 for s in self.supplies if s["healthy"])

    @property
    def fired(self) -> list[dict]:
        """Supplies whose trigger fired, the earliest first."""
        fired = [s for s in self.supplies if s["trigger"]]
        return sorted(fired, key=lambda s: (_fires_at(s), s["device_sn"]))

    @property
    def shutdown_due(self) -> bool:
        # A trigger must have fired somewhere: missing or dead-on-grid supplies alone are an
        # alert, never a shutdown (S2, S3).
        return bool(self.fired) and self.healthy < self.needed

    @property
    def power_back(self) -> bool:
        return sum(1 for s in self.supplies if s["power_back"]) >= self.needed

    @property
    def episode_ids(self) -> set[str]:
        return {s["episode_id"] for s in self.supplies if s["episode_id"]}

    @property
    def in_episode(self) -> bool:
        return any(s["on_battery"] for s in self.supplies)


def _fires_at(supply: dict) -> datetime:
    return supply[f"{supply['trigger']}_fires_at".replace("dead_on_battery", "dead")]


def agent_views(rows: list[dict]) -> list[AgentView]:
    views: dict[str, AgentView] = {}
    for row in rows:
        view = views.get(row["agent_id"])
        if view is None:
            view = views[row["agent_id"]] = AgentView(
                row["agent_id"], row["tier"], row["shutdown_delay_sec"], []
            )
        view.supplies.append(row)
    # Lower tiers first, so in one evaluation the less important hosts are commanded first.
    return sorted(views.values(), key=lambda v: (v.tier, v.agent_id))


def trigger_reason(supply: dict) -> str:
    """Plain words for the trigger that fired, e.g. 'soc_min 14.5 <= 15 on battery'."""
    name = supply["trigger"]
    station = supply["device_name"] or supply["device_sn"]
    if name == "soc":
        text = f"soc_min {supply['soc']:.1f} <= {supply['soc_thr']:g} on battery"
    elif name == "runtime":
        left = supply["runtime_left_min"]
        text = (f"runtime left {left if left is None else round(left, 1)} min <= "
                f"{supply['runtime_thr']:g} min on battery")
    elif name == "battery_time":
        text = f"on battery for more than {supply['battery_limit_sec']:g} s"
    else:
        text = f"no data for {supply['age_sec']:.0f} s, last seen on battery"
    return f"{text} ({station})"
