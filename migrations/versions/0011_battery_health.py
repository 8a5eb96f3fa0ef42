"""Battery health per pack (docs/battery-health.md): `battery_packs` and `battery_health_daily`.

`battery_packs` holds what a station reported about one battery pack in one message: state of
health, charge cycles, full and design capacity, lowest and highest cell voltage and cell
temperature (collector/decoders/pack_health.py says which keys, per family). The collector
writes a row only for a message that carries pack data, in the transaction of the reading it
came with, at the reading's time; a column the message did not carry is null (never carried
over from an earlier message: a health figure is a measurement, not a state).

On TimescaleDB it is a hypertable (7-day chunks), compressed after 30 days on the community
build. It has no retention policy: the point is the trend over the life of a pack, and it is
small next to the readings (one row per pack per BMS message). `battery_health_daily` is the
day-by-day summary the dashboard and alert read.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from alembic import op
from sqlalchemy import text

from servicekit import dbsetup

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLE = """
CREATE TABLE battery_packs (
    ts              timestamptz NOT NULL,
    device_sn       text        NOT NULL,
    pack            text        NOT NULL,
    soh_percent     real        CHECK (soh_percent > 0 AND soh_percent <= 100),
    cycles          integer     CHECK (cycles >= 0),
    full_cap_mah    integer     CHECK (full_cap_mah > 0),
    design_cap_mah  integer     CHECK (design_cap_mah > 0),
    cell_mv_min     integer     CHECK (cell_mv_min > 0),
    cell_mv_max     integer     CHECK (cell_mv_max > 0),
    temp_c_min      real,
    temp_c_max      real,
    cell_mv_spread  integer     GENERATED ALWAYS AS (cell_mv_max - cell_mv_min) STORED,
    PRIMARY KEY (device_sn, pack, ts)
);
COMMENT ON TABLE battery_packs IS
    'What a station reported about one battery pack in one message (null: not in that'
    ' message); written by the collector with the reading it came with';
COMMENT ON COLUMN battery_packs.pack IS
    'master, slave1, slave2 (gen 1 / gen 2 JSON), pack<num> (gen-3 BMS heartbeat), bms (gen-3'
    ' display/runtime summary of the station''s BMS)';
COMMENT ON COLUMN battery_packs.soh_percent IS 'State of health as the BMS reports it (%)';
COMMENT ON COLUMN battery_packs.cell_mv_spread IS
    'Highest minus lowest cell voltage (mV) of the same message';
"""

VIEW = """
CREATE VIEW battery_health_daily AS
SELECT date_trunc('day', ts)                      AS day,
       device_sn,
       pack,
       min(soh_percent)::double precision         AS soh_min_percent,
       max(soh_percent)::double precision         AS soh_max_percent,
       max(cycles)                                AS cycles_max,
       min(full_cap_mah)                          AS full_cap_min_mah,
       max(design_cap_mah)                        AS design_cap_mah,
       avg(cell_mv_spread)::double precision      AS cell_mv_spread_avg,
       max(cell_mv_spread)                        AS cell_mv_spread_max,
       min(temp_c_min)::double precision          AS temp_c_min,
       max(temp_c_max)::double precision          AS temp_c_max,
       count(*)                                   AS reports
  FROM battery_packs
 GROUP BY 1, 2, 3;
COMMENT ON VIEW battery_health_daily IS
    'Per pack and day: lowest SoH, most cycles, mean and worst cell voltage spread, cell'
    ' temperature range, from battery_packs';
"""


def upgrade() -> None:
    conn = op.get_bind()
    flavour = dbsetup.flavour(conn)
    op.execute(TABLE)
    if flavour.timescaledb:
        conn.execute(text(
            "SELECT create_hypertable('battery_packs', 'ts',"
            " chunk_time_interval => INTERVAL '7 days')"))
    if flavour.community:
        op.execute("ALTER TABLE battery_packs SET (timescaledb.compress,"
                   " timescaledb.compress_segmentby = 'device_sn, pack',"
                   " timescaledb.compress_orderby = 'ts DESC')")
        op.execute("SELECT add_compression_policy('battery_packs', INTERVAL '30 days')")
    op.execute(VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW battery_health_daily")
    op.execute("DROP TABLE battery_packs")
