"""The NUT server (nutserver/, docs/nut-server.md): NUT clients as policy agents.

- `agents.kind`: `mqtt` (a host agent on the broker, as before) or `nut` (a NUT client such
  as a NAS's upsmon, served by `ecoflow-nut`); `agents.nut_ups`: the UPS name a `nut` agent
  watches. The worker publishes nothing to a `nut` agent: the NUT server reads its commands
  from `commands` and shows `OB LB FSD` on that UPS from the commit point on.
- `nut_reports`: what the NUT server saw, for the policy worker to record as it records an
  MQTT agent's messages: acks of the commands (`scheduled`, `executing`, `aborted`) and the
  agent's liveness (`online` while a NUT client is logged in to its UPS). The worker keeps
  `commands`, `command_acks`, `agent_status` and `policy_events` to itself.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
ALTER TABLE agents ADD COLUMN kind text NOT NULL DEFAULT 'mqtt'
    CONSTRAINT agents_kind_check CHECK (kind IN ('mqtt', 'nut'));
ALTER TABLE agents ADD COLUMN nut_ups text;
ALTER TABLE agents ADD CONSTRAINT agents_nut_ups_check
    CHECK ((kind = 'nut') = (nut_ups IS NOT NULL));
COMMENT ON COLUMN agents.kind IS
    'mqtt: a host agent on the broker; nut: a NUT client of ecoflow-nut (no MQTT publish)';
COMMENT ON COLUMN agents.nut_ups IS 'kind nut: the UPS name its NUT clients log in to';

CREATE TABLE nut_reports (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts          timestamptz NOT NULL DEFAULT now(),
    agent_id    text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('ack', 'status')),
    payload     jsonb NOT NULL,
    handled_at  timestamptz
);
CREATE INDEX nut_reports_unhandled_idx ON nut_reports (id) WHERE handled_at IS NULL;
COMMENT ON TABLE nut_reports IS
    'Acks and liveness of NUT clients, written by ecoflow-nut, recorded by the policy worker';
""")


def downgrade() -> None:
    op.execute("""
DROP TABLE nut_reports;
ALTER TABLE agents DROP CONSTRAINT agents_nut_ups_check;
ALTER TABLE agents DROP COLUMN nut_ups;
ALTER TABLE agents DROP COLUMN kind;
""")
