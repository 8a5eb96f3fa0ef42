"""Summary tables behind the views, so dashboards stay fast on a long history without
TimescaleDB's licensed features (continuous aggregates).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

How it works (docs/schema.md, "Summaries", says it for users):

* `ecoflow_summary_1m` / `ecoflow_summary_1h` hold, per device, minute (hour) and source, the
  partial aggregates of the readings: sums and counts for averages, minima and maxima, and the
  energy (watt-seconds) of every reading integrated to the next reading, as `energy_daily`
  integrates it. `ecoflow_summary_outages` holds the grid-loss runs cut into one piece per hour.
* `ecoflow_refresh_summaries()` fills them incrementally. `ecoflow_summary_state` keeps the
  watermark: minutes before `materialized_until` are materialized. Each call recomputes from
  `lookback` (plus the 15-minute integration gap) before the previous watermark, so late and
  out-of-order rows within that window are picked up; older backfills need an explicit
  `ecoflow_refresh_summaries(since => ...)`.
* Energy and outages need the *next* reading, which for the last reading before the watermark
  may not exist yet. So each device's live part starts at its last reading before the watermark
  (`ecoflow_summary_devices`): what is materialized never depends on readings after it.
* The views combine the materialized rows with the same computation over the un-materialized
  tail of raw readings (`ecoflow_summary_tail_1m()`, `ecoflow_summary_live_outages()`), so
  they are always current, like TimescaleDB's real-time aggregates. Before the first refresh
  everything is the tail and the views compute from raw readings, as they did before.
"""

from alembic import op
from sqlalchemy import text

from servicekit import dbsetup

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Must match MAX_INTEGRATION_GAP_SEC in 0001: a longer gap between readings is missing data.
GAP_SEC = 900
ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"
ORIGIN_QUOTED = ORIGIN.replace("'", "''")  # inside a quoted string of dynamic SQL
ROLLUPS = ("ecoflow_rollup_1m", "ecoflow_rollup_1h")

# The summary columns after (device_sn, bucket, source): (name, type, aggregate over readings,
# aggregate over minutes into an hour). In ecoflow_summary_minutes, `s` marks a reading that
# counts for the statistics and `e` one whose energy counts (its next reading is known and at
# most GAP_SEC away).
_PORTS = (
    ("watts_in", "watts_in_sum"), ("watts_out", "watts_out_sum"), ("ac_in", "ac_in_watts"),
    ("ac_out", "ac_out_watts"), ("dc_out", "dc_out_watts"), ("typec_out", "typec_out_watts"),
    ("usb_out", "usb_out_watts"), ("pv_in", "pv_in_watts"),
)
COLUMNS = [
    ("readings", "bigint NOT NULL", "count(*) FILTER (WHERE s)", "sum(readings)::bigint"),
    ("soc_total", "double precision", "sum(soc_percent::float8) FILTER (WHERE s)",
     "sum(soc_total)"),
    ("soc_count", "bigint NOT NULL", "count(soc_percent) FILTER (WHERE s)",
     "sum(soc_count)::bigint"),
    ("soc_min", "real", "min(soc_min_percent) FILTER (WHERE s)", "min(soc_min)"),
    ("soc_max", "real", "max(soc_percent) FILTER (WHERE s)", "max(soc_max)"),
    *[col for name, source in _PORTS for col in (
        (f"{name}_total", "bigint", f"sum({source}) FILTER (WHERE s)",
         f"sum({name}_total)::bigint"),
        (f"{name}_count", "bigint NOT NULL", f"count({source}) FILTER (WHERE s)",
         f"sum({name}_count)::bigint"),
    )],
    ("watts_in_max", "integer", "max(watts_in_sum) FILTER (WHERE s)", "max(watts_in_max)"),
    ("watts_out_max", "integer", "max(watts_out_sum) FILTER (WHERE s)", "max(watts_out_max)"),
    ("remain_time_min", "integer", "min(remain_time_min) FILTER (WHERE s)",
     "min(remain_time_min)"),
    ("battery_temp_max", "real", "max(battery_temp_c) FILTER (WHERE s)", "max(battery_temp_max)"),
    ("grid_min", "smallint",
     "(min(CASE WHEN grid_connected THEN 1 WHEN NOT grid_connected THEN 0 END)"
     " FILTER (WHERE s))::smallint", "min(grid_min)"),
    ("energy_readings", "bigint NOT NULL", "count(*) FILTER (WHERE e)",
     "sum(energy_readings)::bigint"),
    ("in_ws", "numeric", "sum(watts_in_sum * dt) FILTER (WHERE e)", "sum(in_ws)"),
    ("out_ws", "numeric", "sum(watts_out_sum * dt) FILTER (WHERE e)", "sum(out_ws)"),
    ("solar_ws", "numeric", "sum(pv_in_watts * dt) FILTER (WHERE e)", "sum(solar_ws)"),
]


def _summary_table(name: str, bucket: str) -> str:
    cols = ",\n    ".join(f"{col} {typ}" for col, typ, _, _ in COLUMNS)
    return f"""
CREATE TABLE {name} (
    device_sn text        NOT NULL,
    bucket    timestamptz NOT NULL,
    source    text        NOT NULL,
    {cols},
    PRIMARY KEY (device_sn, bucket, source)
);
CREATE INDEX {name}_bucket_idx ON {name} (bucket);
COMMENT ON TABLE {name} IS
    'Materialized part of ecoflow_stats_{bucket}: partial aggregates of the readings per device,'
    ' {bucket} bucket and source (see ecoflow_refresh_summaries)';
"""


MINUTE_AGGREGATES = ",\n       ".join(f"{agg} AS {col}" for col, _, agg, _ in COLUMNS)
HOUR_AGGREGATES = ",\n       ".join(f"{agg} AS {col}" for col, _, _, agg in COLUMNS)

TABLES = f"""
CREATE TABLE ecoflow_summary_state (
    id                 boolean     PRIMARY KEY DEFAULT true CHECK (id),
    materialized_until timestamptz,
    hours_until        timestamptz,
    lookback           interval    NOT NULL DEFAULT '1 hour' CHECK (lookback >= interval '0'),
    settle             interval    NOT NULL DEFAULT '1 minute' CHECK (settle >= interval '0'),
    refreshed_at       timestamptz,
    refreshed_from     timestamptz,
    refresh_ms         double precision
);
COMMENT ON TABLE ecoflow_summary_state IS
    'Watermark of the summary tables (one row): minutes before materialized_until and hours'
    ' before hours_until are materialized (null: nothing yet); later readings are computed'
    ' live by the views';
COMMENT ON COLUMN ecoflow_summary_state.lookback IS
    'Each refresh recomputes this far (plus the 15-minute integration gap) behind the previous'
    ' watermark, so readings arriving that late are still counted';
COMMENT ON COLUMN ecoflow_summary_state.settle IS
    'A refresh materializes up to this long before now, leaving time for readings in flight';
INSERT INTO ecoflow_summary_state DEFAULT VALUES;

CREATE TABLE ecoflow_summary_devices (
    device_sn   text        PRIMARY KEY,
    energy_from timestamptz NOT NULL,
    grid_from   timestamptz
);
COMMENT ON TABLE ecoflow_summary_devices IS
    'Where each device''s live part starts: its last reading before the watermark (whose energy'
    ' needs the next reading) and its last one before it that knows the grid state';
{_summary_table("ecoflow_summary_1m", "1m")}
{_summary_table("ecoflow_summary_1h", "1h")}
CREATE TABLE ecoflow_summary_outages (
    device_sn  text        NOT NULL,
    started_at timestamptz NOT NULL,
    bucket     timestamptz NOT NULL,
    readings   bigint      NOT NULL,
    first_ts   timestamptz NOT NULL,
    soc_first  real,
    last_ts    timestamptz NOT NULL,
    soc_last   real,
    soc_min    real,
    out_ws     numeric,
    ended_at   timestamptz,
    PRIMARY KEY (device_sn, started_at, bucket)
);
COMMENT ON TABLE ecoflow_summary_outages IS
    'Materialized grid-loss runs, one piece per run and hour: started_at names the run,'
    ' ended_at is set on its last piece once a reading has the grid back';
"""

FUNCTIONS = f"""
-- (OFFSET 0 in the LATERAL subqueries keeps them one index range scan per device: flattened
-- into a join, the planner would rather hash-join the whole table.)
--
-- Summary rows for the readings of each device in sns from its froms entry up to until_ts: a
-- reading at or after stats_from counts for the statistics; one before the device's
-- energy_untils entry counts its energy when the next reading is at most {GAP_SEC} s away.
-- Shared by the refresh (materialize up to until_ts; energy up to each device's cut, taken in
-- the same statement as the cut so that readings committed meanwhile go to one side only) and
-- the views (the live tail: everything up to infinity).
CREATE FUNCTION ecoflow_summary_minutes(sns text[], froms timestamptz[],
                                        energy_untils timestamptz[], stats_from timestamptz,
                                        until_ts timestamptz)
RETURNS SETOF ecoflow_summary_1m LANGUAGE sql STABLE AS $$
WITH r AS (
    SELECT d.device_sn, d.energy_until, m.*,
           extract(epoch FROM lead(m.ts) OVER w - m.ts)    AS dt
      FROM unnest(sns, froms, energy_untils) AS d(device_sn, from_ts, energy_until)
     CROSS JOIN LATERAL (
           SELECT ts, source, soc_percent, soc_min_percent, remain_time_min, watts_in_sum,
                  watts_out_sum, ac_in_watts, ac_out_watts, dc_out_watts, typec_out_watts,
                  usb_out_watts, pv_in_watts, grid_connected, battery_temp_c
             FROM ecoflow_measurements m
            WHERE m.device_sn = d.device_sn AND m.ts >= d.from_ts AND m.ts < until_ts
           OFFSET 0) m
    WINDOW w AS (PARTITION BY d.device_sn ORDER BY m.ts)
), flagged AS (
    SELECT r.*, r.ts >= stats_from AS s,
           coalesce(r.ts < r.energy_until AND r.dt <= {GAP_SEC}, false) AS e
      FROM r
)
SELECT device_sn, date_bin('1 minute', ts, {ORIGIN}) AS bucket, source,
       {MINUTE_AGGREGATES}
  FROM flagged
 WHERE s OR e
 GROUP BY device_sn, date_bin('1 minute', ts, {ORIGIN}), source
$$;

-- Grid-loss pieces (one per run and hour) from the readings that know the grid state, per
-- device in sns from the matching froms entry up to (not including) the untils entry. A run
-- that was already open before froms (the last stored piece before it has no end) keeps its
-- start. Shared by the refresh and the live part of the outages view.
CREATE FUNCTION ecoflow_summary_outage_pieces(sns text[], froms timestamptz[],
                                              untils timestamptz[])
RETURNS SETOF ecoflow_summary_outages LANGUAGE sql STABLE AS $$
WITH d AS (
    SELECT * FROM unnest(sns, froms, untils) AS d(device_sn, from_ts, until_ts)
), open_run AS (
    SELECT d.device_sn, p.started_at
      FROM d
     CROSS JOIN LATERAL (
           SELECT o.started_at, o.ended_at FROM ecoflow_summary_outages o
            WHERE o.device_sn = d.device_sn AND o.bucket < d.from_ts
            ORDER BY o.started_at DESC, o.bucket DESC LIMIT 1) p
     WHERE p.ended_at IS NULL
), k AS (
    SELECT d.device_sn, d.until_ts, m.*,
           lag(m.grid_connected) OVER w  AS prev_grid,
           lead(m.ts) OVER w             AS next_ts,
           lead(m.grid_connected) OVER w AS next_grid
      FROM d
     CROSS JOIN LATERAL (
           SELECT ts, grid_connected, soc_percent, soc_min_percent, watts_out_sum
             FROM ecoflow_measurements m
            WHERE m.device_sn = d.device_sn AND m.ts >= d.from_ts AND m.ts <= d.until_ts
              AND m.grid_connected IS NOT NULL
           OFFSET 0) m
    WINDOW w AS (PARTITION BY d.device_sn ORDER BY m.ts)
), numbered AS (
    -- run 0 continues the open run, when the first reading still has the grid down
    SELECT k.*, o.started_at AS open_started_at,
           count(*) FILTER (WHERE coalesce(k.prev_grid, CASE WHEN o.started_at IS NOT NULL
                                                             THEN false END)
                                  IS DISTINCT FROM k.grid_connected)
               OVER (PARTITION BY k.device_sn ORDER BY k.ts) AS run_no
      FROM k LEFT JOIN open_run o USING (device_sn)
), runs AS (
    SELECT lost.*, min(ts) OVER (PARTITION BY device_sn, run_no) AS run_start
      FROM numbered lost
     WHERE NOT grid_connected AND ts < until_ts
)
SELECT device_sn,
       CASE WHEN run_no = 0 THEN open_started_at ELSE run_start END AS started_at,
       date_bin('1 hour', ts, {ORIGIN})                        AS bucket,
       count(*)                                                  AS readings,
       min(ts)                                                   AS first_ts,
       (array_agg(soc_percent ORDER BY ts))[1]                   AS soc_first,
       max(ts)                                                   AS last_ts,
       (array_agg(soc_percent ORDER BY ts DESC))[1]              AS soc_last,
       min(soc_min_percent)                                      AS soc_min,
       sum(watts_out_sum * CASE
               WHEN extract(epoch FROM next_ts - ts) <= {GAP_SEC}
               THEN extract(epoch FROM next_ts - ts) ELSE 0 END) AS out_ws,
       (array_agg(CASE WHEN next_grid THEN next_ts END ORDER BY ts DESC))[1] AS ended_at
  FROM runs
 GROUP BY device_sn, run_no, open_started_at, run_start, date_bin('1 hour', ts, {ORIGIN})
$$;

-- The devices whose readings the live part reads, and where: a device known to the summaries
-- from its cut (energy_from or grid_from), any other from the watermark.
CREATE FUNCTION ecoflow_summary_live_devices(grid boolean, OUT sns text[],
                                             OUT froms timestamptz[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    w timestamptz := (SELECT coalesce(materialized_until, '-infinity')
                        FROM ecoflow_summary_state);
BEGIN
    -- The watermark as a literal, so that chunks and index ranges before it are never read.
    EXECUTE format(
        'SELECT array_agg(device_sn), array_agg(from_ts) FROM ('
        '  SELECT device_sn, CASE WHEN $1 THEN coalesce(grid_from, %1$L) ELSE energy_from END'
        '         AS from_ts FROM ecoflow_summary_devices'
        '  UNION ALL'
        '  SELECT DISTINCT m.device_sn, %1$L::timestamptz FROM ecoflow_measurements m'
        '   WHERE m.ts >= %1$L AND NOT EXISTS ('
        '         SELECT 1 FROM ecoflow_summary_devices d WHERE d.device_sn = m.device_sn)'
        ') x', w)
        INTO sns, froms USING grid;
END
$$;

-- Minute rows from the last materialized hour on: the materialized minutes of that hour, then
-- the live computation over the readings not yet materialized.
-- (jit is off: the planner cannot see how few rows a tail has, and would compile for a long
-- one.)
CREATE FUNCTION ecoflow_summary_tail_1m() RETURNS SETOF ecoflow_summary_1m
LANGUAGE plpgsql STABLE ROWS 500 SET jit = off AS $$
DECLARE
    st ecoflow_summary_state;
    live record;
BEGIN
    SELECT * INTO st FROM ecoflow_summary_state;
    live := ecoflow_summary_live_devices(false);
    RETURN QUERY EXECUTE format(
        'SELECT * FROM ecoflow_summary_1m WHERE bucket >= %L',
        coalesce(st.hours_until, '-infinity'));
    RETURN QUERY EXECUTE
        'SELECT * FROM ecoflow_summary_minutes($1, $2,'
        ' array_fill(''infinity''::timestamptz, ARRAY[coalesce(cardinality($1), 0)]),'
        ' $3, ''infinity'')'
        USING live.sns, live.froms, coalesce(st.materialized_until, '-infinity');
END
$$;

-- Every field of a payload one level deep, nested objects flattened to "parent.child", so
-- that "bms_bmsStatus.soc" reads the same flat or nested (the station dashboard's pack panels).
-- STRICT keeps it from being inlined: the planner then trusts ROWS instead of estimating two
-- nested jsonb_each at 100 rows each, a cost that switches on JIT compilation for nothing.
CREATE FUNCTION ecoflow_payload_fields(payload jsonb) RETURNS TABLE (key text, value jsonb)
LANGUAGE sql IMMUTABLE STRICT ROWS 30 AS $$
SELECT k.key, k.value FROM jsonb_each(payload) k
UNION ALL
SELECT k.key || '.' || c.key, c.value
  FROM jsonb_each(payload) k
 CROSS JOIN LATERAL jsonb_each(
       CASE WHEN jsonb_typeof(k.value) = 'object' THEN k.value ELSE '{{}}' END) c
$$;

-- The materialized minutes of the hours that a midnight of the session's time zone splits
-- (zones whose offset is not whole hours), so that energy_daily can put each on its day.
CREATE FUNCTION ecoflow_summary_split_hours() RETURNS SETOF ecoflow_summary_1m
LANGUAGE plpgsql STABLE ROWS 10 SET jit = off AS $$
DECLARE
    first_hour timestamptz;
    last_hour  timestamptz;
BEGIN
    SELECT min(bucket), max(bucket) INTO first_hour, last_hour FROM ecoflow_summary_1h;
    RETURN QUERY
    SELECT m.*
      FROM generate_series(date_trunc('day', first_hour), last_hour, interval '1 day') AS midnight
      JOIN ecoflow_summary_1m m
        ON m.bucket >= date_bin('1 hour', midnight, {ORIGIN})
       AND m.bucket < date_bin('1 hour', midnight, {ORIGIN}) + interval '1 hour'
     WHERE midnight <> date_bin('1 hour', midnight, {ORIGIN})
       AND date_bin('1 hour', midnight, {ORIGIN}) <= last_hour;
END
$$;

CREATE FUNCTION ecoflow_summary_live_outages() RETURNS SETOF ecoflow_summary_outages
LANGUAGE plpgsql STABLE ROWS 10 SET jit = off AS $$
DECLARE
    live record;
BEGIN
    live := ecoflow_summary_live_devices(true);
    RETURN QUERY EXECUTE
        'SELECT * FROM ecoflow_summary_outage_pieces($1, $2,'
        ' array_fill(''infinity''::timestamptz, ARRAY[coalesce(cardinality($1), 0)]))'
        USING live.sns, live.froms;
END
$$;

-- One step of a refresh: materialize the readings from r_from (a whole hour) up to w (a whole
-- minute), given that everything before r_from is materialized already.
CREATE FUNCTION ecoflow_summary_materialize(r_from timestamptz, w timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    sns      text[];
    e_cuts   timestamptz[];
    g_cuts   timestamptz[];
    g_froms  timestamptz[];
BEGIN
    -- Devices with readings to (re)materialize, their new cuts (last reading before w, and last
    -- one that knows the grid), and where their outage runs must be recomputed from: whole
    -- hours, and never after the previous grid cut, which was not materialized yet.
    EXECUTE format(
        'SELECT array_agg(n.device_sn), array_agg(n.e_cut), array_agg(coalesce(n.g_cut, d.grid_from)),'
        '       array_agg(least(%1$L, date_bin(''1 hour'', d.grid_from, {ORIGIN_QUOTED})))'
        '  FROM (SELECT device_sn, max(ts) AS e_cut,'
        '               max(ts) FILTER (WHERE grid_connected IS NOT NULL) AS g_cut'
        '          FROM ecoflow_measurements WHERE ts >= %1$L AND ts < %2$L'
        '         GROUP BY device_sn) n'
        '  LEFT JOIN ecoflow_summary_devices d USING (device_sn)', r_from, w)
        INTO sns, e_cuts, g_cuts, g_froms;

    DELETE FROM ecoflow_summary_1m WHERE bucket >= r_from;
    EXECUTE 'INSERT INTO ecoflow_summary_1m'
            ' SELECT * FROM ecoflow_summary_minutes($1,'
            '        array_fill($2, ARRAY[coalesce(cardinality($1), 0)]), $3, $2, $4)'
        USING sns, r_from, e_cuts, w;

    DELETE FROM ecoflow_summary_1h WHERE bucket >= r_from;
    EXECUTE format(
        'INSERT INTO ecoflow_summary_1h'
        ' SELECT device_sn, date_bin(''1 hour'', bucket, {ORIGIN_QUOTED}) AS bucket, source,'
        '        {HOUR_AGGREGATES.replace(chr(10), " ")}'
        '   FROM ecoflow_summary_1m WHERE bucket >= %L AND bucket < %L'
        '  GROUP BY 1, 2, 3', r_from, date_bin('1 hour', w, {ORIGIN}));

    DELETE FROM ecoflow_summary_outages o
     USING unnest(sns, g_froms) AS d(device_sn, from_ts)
     WHERE o.device_sn = d.device_sn AND o.bucket >= d.from_ts;
    EXECUTE 'INSERT INTO ecoflow_summary_outages'
            ' SELECT * FROM ecoflow_summary_outage_pieces($1, $2, $3)'
        USING sns, g_froms, g_cuts;

    INSERT INTO ecoflow_summary_devices AS d (device_sn, energy_from, grid_from)
    SELECT * FROM unnest(sns, e_cuts, g_cuts)
    ON CONFLICT (device_sn) DO UPDATE
        SET energy_from = EXCLUDED.energy_from, grid_from = EXCLUDED.grid_from;
END
$$;

CREATE FUNCTION ecoflow_refresh_summaries(since timestamptz DEFAULT NULL)
RETURNS timestamptz LANGUAGE plpgsql SET work_mem = '64MB' SET jit = off AS $$
DECLARE
    st        ecoflow_summary_state;
    started   timestamptz := clock_timestamp();
    target    timestamptz;  -- the new watermark
    step_from timestamptz;
    step_to   timestamptz;
    steps     integer := 0;
BEGIN
    -- One refresh at a time; a second caller waits and then finds little left to do.
    SELECT * INTO st FROM ecoflow_summary_state FOR UPDATE;
    target := greatest(st.materialized_until,
                       date_bin('1 minute', now() - st.settle, {ORIGIN}));
    -- Recompute from lookback before the old watermark (or from since), and the integration
    -- gap before that: a late reading changes the energy of the reading before it.
    step_from := least(coalesce(st.materialized_until, '-infinity') - st.lookback, since)
                 - make_interval(secs => {GAP_SEC});
    IF NOT isfinite(step_from) THEN
        -- A first build, or a rebuild: from the first reading, and nothing of the old kept.
        DELETE FROM ecoflow_summary_1m;
        DELETE FROM ecoflow_summary_1h;
        DELETE FROM ecoflow_summary_outages;
        DELETE FROM ecoflow_summary_devices;
        step_from := (SELECT min(ts) FROM ecoflow_measurements);
    END IF;
    step_from := date_bin('1 hour', step_from, {ORIGIN});
    UPDATE ecoflow_summary_state SET refreshed_from = step_from;

    -- A day at a time, so that a long history (a first build, a worker that was down) never
    -- needs one huge sort. The next step starts the integration gap before this one ended (the
    -- energy of the last reading before step_to needs the next reading), or, after a stretch
    -- without readings, at the next reading.
    WHILE step_from < target LOOP
        step_to := least(target, step_from + interval '1 day');
        PERFORM ecoflow_summary_materialize(step_from, step_to);
        steps := steps + 1;
        EXIT WHEN step_to >= target;
        step_from := date_bin('1 hour', (SELECT min(ts) FROM ecoflow_measurements
                                         WHERE ts >= step_to - make_interval(secs => {GAP_SEC})),
                              {ORIGIN});
    END LOOP;

    UPDATE ecoflow_summary_state
       SET materialized_until = target, hours_until = date_bin('1 hour', target, {ORIGIN}),
           refreshed_at = now(),
           refresh_ms = extract(epoch FROM clock_timestamp() - started) * 1000;
    IF steps > 7 THEN
        -- More than a week (re)built: let the planner know before autovacuum gets to it.
        ANALYZE ecoflow_summary_1m, ecoflow_summary_1h, ecoflow_summary_outages,
                ecoflow_summary_devices;
    END IF;
    RETURN target;
END
$$;
COMMENT ON FUNCTION ecoflow_refresh_summaries(timestamptz) IS
    'Bring the summary tables up to date (the policy worker calls it every minute). Pass since'
    ' to recompute from that time after a backfill of older readings; ''-infinity'' rebuilds all';
"""

VIEWS = f"""
-- Partial aggregates per device, bucket and source, materialized and live. Several rows may
-- share a bucket (the live part adds energy to the minute of a device's last materialized
-- reading): sum them, as every consumer does.
CREATE VIEW ecoflow_stats_1m AS
SELECT s.* FROM ecoflow_summary_1m s
 WHERE s.bucket < (SELECT hours_until FROM ecoflow_summary_state)
UNION ALL
SELECT * FROM ecoflow_summary_tail_1m();

CREATE VIEW ecoflow_stats_1h AS
SELECT * FROM ecoflow_summary_1h
UNION ALL
SELECT device_sn, date_bin('1 hour', bucket, {ORIGIN}) AS bucket, source,
       {HOUR_AGGREGATES}
  FROM ecoflow_summary_tail_1m()
 GROUP BY 1, 2, 3;

-- Energy per device and day (in the session's time zone): power integrated over the time to
-- the next reading, so irregular sampling does not skew the totals. Whole hours where they lie
-- within one day, minutes where midnight splits an hour (half-hour time zones).
CREATE VIEW energy_daily AS
WITH e AS (
    SELECT device_sn, bucket, energy_readings, in_ws, out_ws, solar_ws
      FROM ecoflow_summary_1h
     WHERE date_trunc('day', bucket) = date_trunc('day', bucket + interval '59 minutes')
    UNION ALL
    SELECT device_sn, bucket, energy_readings, in_ws, out_ws, solar_ws
      FROM ecoflow_summary_split_hours()
    UNION ALL
    SELECT device_sn, bucket, energy_readings, in_ws, out_ws, solar_ws
      FROM ecoflow_summary_tail_1m()
)
SELECT device_sn,
       date_trunc('day', bucket)                         AS day,
       (sum(in_ws) / 3600.0)::double precision           AS wh_in,
       (sum(out_ws) / 3600.0)::double precision          AS wh_out,
       (sum(solar_ws) / 3600.0)::double precision        AS wh_solar,
       sum(energy_readings)::bigint                      AS readings
  FROM e
 GROUP BY device_sn, date_trunc('day', bucket)
HAVING sum(energy_readings) > 0;

-- Grid-loss episodes: runs of readings with grid_connected = false. An episode ends at the
-- first reading with the grid back (null while ongoing). Energy is power integrated over time.
CREATE VIEW outages AS
WITH pieces AS (
    SELECT * FROM ecoflow_summary_outages
    UNION ALL
    SELECT * FROM ecoflow_summary_live_outages()
), episodes AS (
    SELECT device_sn, started_at,
           (array_agg(ended_at ORDER BY last_ts DESC))[1]  AS ended_at,
           (array_agg(soc_first ORDER BY first_ts))[1]     AS soc_start_percent,
           (array_agg(soc_last ORDER BY last_ts DESC))[1]  AS soc_end_percent,
           min(soc_min)                                    AS soc_min_percent,
           sum(out_ws) / 3600.0                            AS energy_out_wh,
           sum(readings)::bigint                           AS readings
      FROM pieces
     GROUP BY device_sn, started_at
)
SELECT device_sn, started_at, ended_at,
       ended_at IS NULL                                             AS ongoing,
       coalesce(ended_at, now()) - started_at                       AS duration,
       extract(epoch FROM coalesce(ended_at, now()) - started_at)::double precision AS duration_sec,
       soc_start_percent, soc_end_percent, soc_min_percent,
       coalesce(energy_out_wh, 0)::double precision                 AS energy_out_wh,
       readings
  FROM episodes;
"""


def _rollup_view(name: str, stats: str) -> str:
    return f"""
CREATE VIEW {name} AS
SELECT bucket, device_sn,
       sum(soc_total) / nullif(sum(soc_count), 0)::double precision  AS soc_avg,
       min(soc_min)                                                   AS soc_min,
       max(soc_max)                                                   AS soc_max,
       sum(watts_in_total) / nullif(sum(watts_in_count), 0)           AS watts_in_avg,
       max(watts_in_max)                                              AS watts_in_max,
       sum(watts_out_total) / nullif(sum(watts_out_count), 0)         AS watts_out_avg,
       max(watts_out_max)                                             AS watts_out_max,
       sum(ac_in_total) / nullif(sum(ac_in_count), 0)                 AS ac_in_avg,
       sum(ac_out_total) / nullif(sum(ac_out_count), 0)               AS ac_out_avg,
       sum(pv_in_total) / nullif(sum(pv_in_count), 0)                 AS pv_in_avg,
       sum(readings)::bigint                                          AS readings
  FROM {stats}
 GROUP BY bucket, device_sn
HAVING sum(readings) > 0;
"""


# What 0001 created, restored on downgrade.
OLD_VIEWS = f"""
CREATE VIEW outages AS
WITH r AS (
    SELECT device_sn, ts, grid_connected, soc_percent, soc_min_percent, watts_out_sum,
           lag(grid_connected) OVER w AS prev_grid,
           lead(ts) OVER w            AS next_ts
      FROM ecoflow_measurements
     WHERE grid_connected IS NOT NULL
    WINDOW w AS (PARTITION BY device_sn ORDER BY ts)
), numbered AS (
    SELECT *, count(*) FILTER (WHERE prev_grid IS DISTINCT FROM grid_connected)
                  OVER (PARTITION BY device_sn ORDER BY ts) AS run_no
      FROM r
), episodes AS (
    SELECT device_sn,
           min(ts)                                              AS started_at,
           (array_agg(next_ts ORDER BY ts DESC))[1]             AS ended_at,
           (array_agg(soc_percent ORDER BY ts))[1]              AS soc_start_percent,
           (array_agg(soc_percent ORDER BY ts DESC))[1]         AS soc_end_percent,
           min(soc_min_percent)                                 AS soc_min_percent,
           sum(watts_out_sum * CASE
                   WHEN extract(epoch FROM next_ts - ts) <= {GAP_SEC}
                   THEN extract(epoch FROM next_ts - ts) ELSE 0 END) / 3600.0 AS energy_out_wh,
           count(*)                                             AS readings
      FROM numbered
     WHERE NOT grid_connected
     GROUP BY device_sn, run_no
)
SELECT device_sn, started_at, ended_at,
       ended_at IS NULL                                             AS ongoing,
       coalesce(ended_at, now()) - started_at                       AS duration,
       extract(epoch FROM coalesce(ended_at, now()) - started_at)::double precision AS duration_sec,
       soc_start_percent, soc_end_percent, soc_min_percent,
       coalesce(energy_out_wh, 0)::double precision                 AS energy_out_wh,
       readings
  FROM episodes;

CREATE VIEW energy_daily AS
WITH r AS (
    SELECT device_sn, ts, watts_in_sum, watts_out_sum, pv_in_watts,
           extract(epoch FROM lead(ts) OVER (PARTITION BY device_sn ORDER BY ts) - ts) AS dt
      FROM ecoflow_measurements
)
SELECT device_sn,
       date_trunc('day', ts)                                             AS day,
       (sum(watts_in_sum * dt) / 3600.0)::double precision             AS wh_in,
       (sum(watts_out_sum * dt) / 3600.0)::double precision            AS wh_out,
       (sum(pv_in_watts * dt) / 3600.0)::double precision              AS wh_solar,
       count(*)                                                          AS readings
  FROM r
 WHERE dt <= {GAP_SEC}
 GROUP BY device_sn, date_trunc('day', ts);
"""

OLD_ROLLUP_COLUMNS = """
       device_sn,
       avg(soc_percent)      AS soc_avg,
       min(soc_min_percent)  AS soc_min,
       max(soc_percent)      AS soc_max,
       avg(watts_in_sum)     AS watts_in_avg,
       max(watts_in_sum)     AS watts_in_max,
       avg(watts_out_sum)    AS watts_out_avg,
       max(watts_out_sum)    AS watts_out_max,
       avg(ac_in_watts)      AS ac_in_avg,
       avg(ac_out_watts)     AS ac_out_avg,
       avg(pv_in_watts)      AS pv_in_avg,
       count(*)              AS readings
  FROM ecoflow_measurements
"""


def _plain_rollups(conn) -> list[str]:
    """The rollups that are ordinary views: continuous aggregates (community license) are
    materialized already and stay as they are."""
    caggs = set()
    if dbsetup.flavour(conn).timescaledb:
        caggs = set(conn.execute(text(
            "SELECT view_name FROM timescaledb_information.continuous_aggregates")).scalars())
    return [name for name in ROLLUPS if name not in caggs]


def upgrade() -> None:
    conn = op.get_bind()
    plain = _plain_rollups(conn)
    op.execute("DROP VIEW energy_daily, outages")
    for name in plain:
        op.execute(f"DROP VIEW {name}")
    op.execute(TABLES)
    op.execute(FUNCTIONS)
    op.execute(VIEWS)
    for name in plain:
        op.execute(_rollup_view(name, "ecoflow_stats_" + name.rsplit("_", 1)[1]))


def downgrade() -> None:
    conn = op.get_bind()
    plain = _plain_rollups(conn)
    for name in plain:
        op.execute(f"DROP VIEW {name}")
    op.execute("DROP VIEW energy_daily, outages, ecoflow_stats_1h, ecoflow_stats_1m")
    op.execute(
        "DROP FUNCTION ecoflow_refresh_summaries(timestamptz),"
        " ecoflow_summary_materialize(timestamptz, timestamptz), ecoflow_summary_live_outages(),"
        " ecoflow_summary_split_hours(), ecoflow_payload_fields(jsonb),"
        " ecoflow_summary_tail_1m(), ecoflow_summary_live_devices(boolean),"
        " ecoflow_summary_outage_pieces(text[], timestamptz[], timestamptz[]),"
        " ecoflow_summary_minutes(text[], timestamptz[], timestamptz[], timestamptz,"
        " timestamptz)"
    )
    op.execute(
        "DROP TABLE ecoflow_summary_outages, ecoflow_summary_1h, ecoflow_summary_1m,"
        " ecoflow_summary_devices, ecoflow_summary_state"
    )
    op.execute(OLD_VIEWS)
    for name in plain:
        bucket = "1 minute" if name.endswith("_1m") else "1 hour"
        op.execute(
            f"CREATE VIEW {name} AS"
            f" SELECT date_bin(INTERVAL '{bucket}', ts, {ORIGIN})"
            f" AS bucket, {OLD_ROLLUP_COLUMNS} GROUP BY 1, device_sn"
        )
