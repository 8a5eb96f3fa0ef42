"""The agents as the read-only services show them: one row each, with its latest command and ack.

Shared by the status API and the Home Assistant bridge, so both report an agent the same way.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import dict_row

# One row per agent: configured (agents) or seen (agent_status), its supplies, its latest
# command and latest ack. Payloads, which carry signatures, are never read.
AGENTS = """
WITH ids AS (
    SELECT agent_id FROM agents UNION SELECT agent_id FROM agent_status
)
SELECT i.agent_id, a.name, a.tier, a.enabled,
       CASE WHEN s.agent_id IS NULL THEN 'unknown'
            WHEN s.online THEN 'online' ELSE 'offline' END  AS status,
       s.last_seen, s.changed_at AS status_since, s.version, s.platform, s.host,
       coalesce((SELECT array_agg(x.device_sn ORDER BY x.device_sn) FROM agent_supplies x
                  WHERE x.agent_id = i.agent_id), '{}')  AS supplies,
       c.id AS command_id, c.action AS command_action, c.status AS command_status,
       c.issued_at AS command_issued_at, c.reason AS command_reason,
       c.episode_id AS command_episode_id,
       k.command_id AS ack_command_id, k.status AS ack_status,
       k.received_at AS ack_received_at, k.host AS ack_host, k.detail AS ack_detail
  FROM ids i
  LEFT JOIN agents a ON a.agent_id = i.agent_id
  LEFT JOIN agent_status s ON s.agent_id = i.agent_id
  LEFT JOIN LATERAL (SELECT * FROM commands c WHERE c.agent_id = i.agent_id
                      ORDER BY c.issued_at DESC, c.attempt DESC LIMIT 1) c ON true
  LEFT JOIN LATERAL (SELECT * FROM command_acks k WHERE k.agent_id = i.agent_id
                      ORDER BY k.received_at DESC, k.id DESC LIMIT 1) k ON true
 ORDER BY 1
"""


def rows(conn: psycopg.Connection) -> list[dict]:
    """The rows of AGENTS, as dicts: status is 'online', 'offline' or 'unknown' (never seen)."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(AGENTS)
        return cur.fetchall()
