"""Field truth for the shutdown path: when each reading was received, and re-issued shutdowns.

- `ecoflow_measurements.received_at`: when the collector received the reading, by its own
  clock (NTP-kept, beside the database), not the station's. The rules measure a station's
  age with it (SAFETY S1), so a station whose clock runs hours behind or ahead is judged by
  when its readings arrive. Nullable with no default: rows stored before this revision, and
  rows written by other tools that do not set it, count as received at their `ts`, which is
  how they were judged before. (No default also keeps the change a catalogue-only one on a
  compressed hypertable.)
- `commands.attempt`: a shutdown whose every send expired unacknowledged (the host was
  offline longer than the TTL), or a host that booted again inside the same outage while the
  battery is still critical, gets a new shutdown command in the same episode. The uniqueness
  that makes "one shutdown per host per episode" hold whatever the worker does now reads
  "one shutdown per host per episode and attempt": two workers can still never issue the
  same attempt twice.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE ecoflow_measurements ADD COLUMN received_at timestamptz;
COMMENT ON COLUMN ecoflow_measurements.received_at IS
    'When the collector received the reading (its clock, not the device''s); null: at ts';

ALTER TABLE commands ADD COLUMN attempt integer NOT NULL DEFAULT 1 CHECK (attempt >= 1);
COMMENT ON COLUMN commands.attempt IS
    'Shutdowns: 1 for the first command of an episode, n+1 for each deliberate re-issue';
DROP INDEX commands_one_shutdown_per_episode;
CREATE UNIQUE INDEX commands_one_shutdown_per_episode_attempt
    ON commands (agent_id, episode_id, attempt)
    WHERE action = 'shutdown' AND episode_id IS NOT NULL;
""")


def downgrade() -> None:
    op.execute("""
DELETE FROM command_acks a USING commands c
 WHERE a.command_id = c.id AND c.action = 'shutdown' AND c.attempt > 1;
UPDATE commands SET cancels_id = NULL
 WHERE cancels_id IN (SELECT id FROM commands WHERE action = 'shutdown' AND attempt > 1);
DELETE FROM commands WHERE action = 'shutdown' AND attempt > 1;
DROP INDEX commands_one_shutdown_per_episode_attempt;
CREATE UNIQUE INDEX commands_one_shutdown_per_episode
    ON commands (agent_id, episode_id) WHERE action = 'shutdown' AND episode_id IS NOT NULL;
ALTER TABLE commands DROP COLUMN attempt;
ALTER TABLE ecoflow_measurements DROP COLUMN received_at;
""")
