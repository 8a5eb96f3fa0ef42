"""Policy worker state: condition markers, episode closures, per-agent battery-time limit, and
a NOTIFY on every batch of new readings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The channel the policy worker LISTENs on; the payload is empty because the worker re-reads
# the table anyway, and identical notifications within one transaction are folded into one.
READINGS_CHANNEL = "ecoflow_readings"

UPGRADE = f"""
ALTER TABLE agents ADD COLUMN max_on_battery_sec integer CHECK (max_on_battery_sec > 0);
COMMENT ON COLUMN agents.max_on_battery_sec IS
    'Shut the host down after this long on battery whatever the SoC; null: no limit';

-- Conditions currently holding, so that every start and clear is audited exactly once, even
-- across restarts. The decisions themselves are recomputed from the readings each time.
CREATE TABLE policy_conditions (
    subject    text        NOT NULL,
    condition  text        NOT NULL,
    since      timestamptz NOT NULL,
    device_sn  text,
    agent_id   text,
    details    jsonb       NOT NULL DEFAULT '{{}}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, condition)
);
COMMENT ON TABLE policy_conditions IS
    'Conditions the policy worker saw holding at its last evaluation (audit bookkeeping)';

-- An abort ends the episode early: a later grid loss is a new episode and may shut down again.
CREATE TABLE episode_closures (
    episode_id text PRIMARY KEY,
    device_sn  text        NOT NULL,
    closed_at  timestamptz NOT NULL,
    reason     text        NOT NULL
);
CREATE INDEX episode_closures_device_idx ON episode_closures (device_sn, closed_at DESC);

CREATE FUNCTION ecoflow_measurements_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{READINGS_CHANNEL}', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER ecoflow_measurements_notify
    AFTER INSERT ON ecoflow_measurements
    FOR EACH STATEMENT EXECUTE FUNCTION ecoflow_measurements_notify();
"""

DOWNGRADE = """
DROP TRIGGER IF EXISTS ecoflow_measurements_notify ON ecoflow_measurements;
DROP FUNCTION IF EXISTS ecoflow_measurements_notify();
DROP TABLE IF EXISTS episode_closures, policy_conditions;
ALTER TABLE agents DROP COLUMN IF EXISTS max_on_battery_sec;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
