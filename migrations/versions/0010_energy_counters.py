"""Energy counters that only go up, for Home Assistant's energy dashboard (docs/ha-discovery.md).

`energy_counters` holds, per station, watt-hours charged, discharged, solar, AC in and AC out
(and total in and out), integrated from the stored readings the way `energy_daily` integrates
them: each reading's power times the time to the next reading, nothing across a gap longer than
`max_gap_sec` (900 s by default, MAX_INTEGRATION_GAP_SEC of 0001). `through_ts` is the last
reading integrated: `ecoflow_advance_energy_counters()` adds only the readings from there on, so
a counter never goes down, whatever happens to older readings (retention, recomputation, a late
reading behind `through_ts`, which is not counted). A station's counters start at 0 at its
latest reading when the first advance sees it. State lives here, not in the process that calls
the function: restarting it continues the counters.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

COUNTERS = ("charged", "discharged", "solar", "ac_in", "ac_out", "in", "out")

# Power (W) of each counter in one reading; a negative reading counts as 0.
POWER = {
    "charged": "watts_in_sum - watts_out_sum",
    "discharged": "watts_out_sum - watts_in_sum",
    "solar": "pv_in_watts",
    "ac_in": "ac_in_watts",
    "ac_out": "ac_out_watts",
    "in": "watts_in_sum",
    "out": "watts_out_sum",
}

_COLUMNS = ",\n    ".join(
    f"{c}_wh double precision NOT NULL DEFAULT 0 CHECK ({c}_wh >= 0)" for c in COUNTERS)
_INCREMENTS = ",\n               ".join(
    f"coalesce(sum(greatest({POWER[c]}, 0) * dt) FILTER (WHERE dt <= max_gap_sec), 0) / 3600.0"
    f" AS {c}_wh" for c in COUNTERS)
_ADD = ",\n           ".join(f"{c}_wh = c.{c}_wh + i.{c}_wh" for c in COUNTERS)

UPGRADE = f"""
CREATE TABLE energy_counters (
    device_sn  text        PRIMARY KEY,
    through_ts timestamptz NOT NULL,
    {_COLUMNS},
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE energy_counters IS
    'Energy per station that only goes up (Wh), integrated from the readings up to through_ts'
    ' by ecoflow_advance_energy_counters(); Home Assistant''s energy dashboard reads them';
COMMENT ON COLUMN energy_counters.through_ts IS
    'The last reading integrated; readings stamped before it are never counted again';
COMMENT ON COLUMN energy_counters.charged_wh IS
    'Total input above total output (the battery charging, conversion losses included)';
COMMENT ON COLUMN energy_counters.discharged_wh IS 'Total output above total input';

CREATE FUNCTION ecoflow_advance_energy_counters(max_gap_sec double precision DEFAULT 900)
RETURNS SETOF energy_counters LANGUAGE plpgsql AS $$
BEGIN
    -- Two callers at once would integrate the same readings twice.
    PERFORM pg_advisory_xact_lock(hashtext('ecoflow energy counters'));
    -- A new station starts at its latest reading (not one stamped in the future).
    INSERT INTO energy_counters (device_sn, through_ts)
    SELECT l.device_sn, last.ts
      FROM ecoflow_latest l
     CROSS JOIN LATERAL (
           SELECT m.ts FROM ecoflow_measurements m
            WHERE m.device_sn = l.device_sn AND m.ts <= now()
            ORDER BY m.ts DESC LIMIT 1) last
    ON CONFLICT (device_sn) DO NOTHING;

    WITH r AS (
        SELECT c.device_sn, m.*,
               extract(epoch FROM lead(m.ts) OVER w - m.ts)::double precision AS dt
          FROM energy_counters c
         CROSS JOIN LATERAL (
               SELECT ts, watts_in_sum, watts_out_sum, pv_in_watts, ac_in_watts, ac_out_watts
                 FROM ecoflow_measurements m
                WHERE m.device_sn = c.device_sn AND m.ts >= c.through_ts AND m.ts <= now()
               OFFSET 0) m
        WINDOW w AS (PARTITION BY c.device_sn ORDER BY m.ts)
    ), i AS (
        SELECT device_sn, max(ts) AS through_ts,
               {_INCREMENTS}
          FROM r
         GROUP BY device_sn
    )
    UPDATE energy_counters c
       SET through_ts = i.through_ts,
           {_ADD},
           updated_at = now()
      FROM i
     WHERE c.device_sn = i.device_sn AND i.through_ts > c.through_ts;

    RETURN QUERY SELECT * FROM energy_counters ORDER BY device_sn;
END
$$;
COMMENT ON FUNCTION ecoflow_advance_energy_counters(double precision) IS
    'Integrate the readings since each station''s through_ts into energy_counters and return'
    ' them all; a gap between readings longer than max_gap_sec counts nothing';
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute("""
DROP FUNCTION ecoflow_advance_energy_counters(double precision);
DROP TABLE energy_counters;
""")
