"""Agents of kind `nut`: NUT clients (a NAS's upsmon, WinNUT, ...) served by `ecoflow-nut`.

The worker decides and records their commands like any other agent's, but publishes nothing
to them: the NUT server reads the commands from `commands` and shows `OB LB FSD` on the UPS
the agent watches from the commit point on. What the NUT server sees comes back through
`nut_reports` (migration 0008) as the same acks and status messages an MQTT agent sends, and
the worker records them with the same code (docs/nut-server.md).
"""

from __future__ import annotations

import json

import psycopg

from policy.mqttlink import Incoming

# Oldest first; a report is taken once, also with two workers (SKIP LOCKED).
TAKE_REPORTS = """
UPDATE nut_reports SET handled_at = now()
 WHERE id IN (SELECT id FROM nut_reports WHERE handled_at IS NULL
               ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED)
RETURNING id, agent_id, kind, payload
"""

# Commands to NUT agents are never handed to the broker (worker.DUE_FOR_SENDING).
NOT_NUT = "agent_id NOT IN (SELECT agent_id FROM agents WHERE kind = 'nut')"


def take_reports(conn: psycopg.Connection) -> list[Incoming]:
    """The NUT server's unhandled reports, as the worker's incoming MQTT messages."""
    rows = sorted(conn.execute(TAKE_REPORTS).fetchall())
    return [Incoming(agent, kind, payload if isinstance(payload, dict) else None,
                     json.dumps(payload).encode()) for _id, agent, kind, payload in rows]
