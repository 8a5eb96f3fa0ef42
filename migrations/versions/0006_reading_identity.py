"""The identity of a reading: distinct messages that share a time all count.

- `ecoflow_merged_payloads`: a station may send two different messages with the same timestamp
  (app pushes carry whole seconds). `ecoflow_measurements` keeps one row per (device_sn, ts),
  which every view and saved query relies on; the collector merges the later message into that
  row (its values win, its payload becomes `raw_data`) and moves the payload it replaced here,
  so every payload the station sent stays findable by (device_sn, ts). Rows written here are
  rare: only same-timestamp merges. A redelivery (the same payload again) is not stored twice.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
CREATE TABLE ecoflow_merged_payloads (
    device_sn   text        NOT NULL,
    ts          timestamptz NOT NULL,
    received_at timestamptz,
    source      text        NOT NULL,
    raw_data    jsonb       NOT NULL,
    merged_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ecoflow_merged_payloads IS
    'Payloads a later message with the same (device_sn, ts) replaced in ecoflow_measurements.raw_data';
CREATE INDEX ecoflow_merged_payloads_device_ts_idx ON ecoflow_merged_payloads (device_sn, ts);
""")


def downgrade() -> None:
    op.execute("DROP TABLE ecoflow_merged_payloads")
