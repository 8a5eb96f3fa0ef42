"""The database side of the Home Assistant bridge: stations, agents and the energy counters."""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

from servicekit.agents import rows as agent_rows

# One row per station with readings: its latest reading, liveness as the policy sees it
# (fresh within the station's stale_after_sec) and which optional columns it reports.
STATIONS = """
SELECT l.device_sn                                        AS sn,
       d.name, d.model, d.site,
       CASE WHEN l.age_sec <= coalesce(d.stale_after_sec, 120) THEN 'fresh'
            WHEN l.age_sec <= coalesce(d.dead_after_sec, 600) THEN 'stale'
            ELSE 'dead' END                               AS liveness,
       l.ts                                               AS last_seen,
       l.soc_percent, l.soc_min_percent,
       l.remain_time_min                                  AS runtime_min,
       l.grid_connected,
       l.watts_in_sum                                     AS watts_in,
       l.watts_out_sum                                    AS watts_out,
       l.ac_in_watts, l.ac_out_watts, l.pv_in_watts, l.battery_temp_c,
       array_remove(ARRAY[
           CASE WHEN l.soc_min_percent IS NOT NULL THEN 'soc_min_percent' END,
           CASE WHEN l.remain_time_min IS NOT NULL THEN 'remain_time_min' END,
           CASE WHEN l.grid_connected IS NOT NULL THEN 'grid_connected' END,
           CASE WHEN l.ac_in_watts IS NOT NULL THEN 'ac_in_watts' END,
           CASE WHEN l.ac_out_watts IS NOT NULL THEN 'ac_out_watts' END,
           CASE WHEN l.pv_in_watts IS NOT NULL THEN 'pv_in_watts' END,
           CASE WHEN l.battery_temp_c IS NOT NULL THEN 'battery_temp_c' END], NULL) AS reported
  FROM ecoflow_latest l
  LEFT JOIN devices d ON d.device_sn = l.device_sn
 ORDER BY 1
"""

# Migration 0010: integrates the readings since the last call and returns every counter.
ADVANCE_COUNTERS = "SELECT * FROM ecoflow_advance_energy_counters(%(max_gap_sec)s)"


def _rows(conn: psycopg.Connection, query: str, params: dict | None = None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params or {})
        return cur.fetchall()


def stations(conn: psycopg.Connection) -> list[dict]:
    rows = _rows(conn, STATIONS)
    for row in rows:
        row["reported"] = set(row["reported"])
    return rows


def agents(conn: psycopg.Connection) -> list[dict]:
    """One row per agent, the same rows the status API reads (servicekit.agents.AGENTS)."""
    return agent_rows(conn)


def advance_counters(conn: psycopg.Connection, max_gap_sec: float) -> dict[str, dict]:
    """Counters by station, after integrating the new readings (committed at once)."""
    with conn.transaction():
        rows = _rows(conn, ADVANCE_COUNTERS, {"max_gap_sec": max_gap_sec})
    return {row["device_sn"]: row for row in rows}
