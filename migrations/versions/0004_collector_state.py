"""Collector state that must survive restarts and re-deployments: the stable MQTT client ids
used towards EcoFlow's brokers (EcoFlow refuses an account after about ten distinct client
ids a day, so a new id per restart would lock the user out).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE collector_state (
    key        text        PRIMARY KEY,
    value      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE collector_state IS
    'Values the collector keeps across restarts (e.g. the MQTT client id per EcoFlow account)';
""")


def downgrade() -> None:
    op.execute("DROP TABLE collector_state")
