"""A station's readings in the order they were received (issue 15, item 9).

The policy takes as a station's latest reading the one received last, not the one with the
latest stamp: a message whose clock jumped ahead must not stand for the station's current state
until the clock catches up (policy/sql/supply_state.sql, docs/decoding.md). This index lets that
lookup stop at the first row, as the (device_sn, ts) one does for the newest stamp; rows without
a receive time count as received at their `ts`, as everywhere else.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE INDEX ecoflow_measurements_device_received_idx
    ON ecoflow_measurements (device_sn, (coalesce(received_at, ts)) DESC, ts DESC);
""")


def downgrade() -> None:
    op.execute("DROP INDEX ecoflow_measurements_device_received_idx")
