"""Per-station, per-source liveness as the running collector computes it, for Grafana.

The collector's expected cadences are settings of the collector process, so a dashboard cannot
recompute fresh / quiet / stale from the readings alone. The collector writes what it computes
(collector/sources/liveness.py, `LivenessRecorder`): a row per station and source in
`source_liveness`, on every state change and refreshed every `refresh_sec`; and each change in
`source_liveness_changes`, for a state timeline. A row whose `updated_at` is older than two
`refresh_sec` means the collector stopped writing (it is down, or cannot reach the database):
the dashboard then shows the state as `unknown`, as of `updated_at`.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE source_liveness (
    device_sn                text             NOT NULL,
    source                   text             NOT NULL,
    state                    text             NOT NULL
                             CHECK (state IN ('fresh', 'quiet', 'stale')),
    age_sec                  double precision NOT NULL CHECK (age_sec >= 0),
    expected_period_sec      double precision NOT NULL CHECK (expected_period_sec > 0),
    quiet_after_sec          double precision NOT NULL,
    stale_after_sec          double precision NOT NULL,
    connected                boolean,
    last_reading_received_at timestamptz,
    changed_at               timestamptz      NOT NULL DEFAULT now(),
    updated_at               timestamptz      NOT NULL DEFAULT now(),
    refresh_sec              double precision NOT NULL DEFAULT 30 CHECK (refresh_sec > 0),
    collector                text             NOT NULL DEFAULT '',
    PRIMARY KEY (device_sn, source)
);
COMMENT ON TABLE source_liveness IS
    'Liveness of each source per station as the running collector computes it (fresh, quiet,'
    ' stale), written on each state change and refreshed every refresh_sec; a row not updated'
    ' for two refresh_sec is the state of a collector that stopped writing (unknown)';
COMMENT ON COLUMN source_liveness.age_sec IS
    'Seconds since the newest reading (receive time), or since the source started when none'
    ' arrived yet, at updated_at';
COMMENT ON COLUMN source_liveness.connected IS
    'The source''s connection at updated_at; NULL for sources without one (REST, NUT)';
COMMENT ON COLUMN source_liveness.last_reading_received_at IS
    'When the collector received the newest reading; NULL: none since the collector started';
COMMENT ON COLUMN source_liveness.changed_at IS 'When the state last changed';
COMMENT ON COLUMN source_liveness.collector IS 'COLLECTOR_CLIENT_ID of the writing collector';

CREATE TABLE source_liveness_changes (
    ts        timestamptz      NOT NULL DEFAULT now(),
    device_sn text             NOT NULL,
    source    text             NOT NULL,
    state     text             NOT NULL CHECK (state IN ('fresh', 'quiet', 'stale', 'gone')),
    age_sec   double precision NOT NULL DEFAULT 0
);
CREATE INDEX source_liveness_changes_ts ON source_liveness_changes (ts);
CREATE INDEX source_liveness_changes_key ON source_liveness_changes (device_sn, source, ts);
COMMENT ON TABLE source_liveness_changes IS
    'Each liveness state change the collector computed (gone: it stopped expecting the source'
    ' for the station, e.g. a REST failover that ended); source_liveness holds the current one';
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute("DROP TABLE source_liveness_changes; DROP TABLE source_liveness;")
