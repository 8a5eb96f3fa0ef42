-- One row per (enabled agent, station that supplies it): the station's state at %(now)s and
-- which shutdown trigger, if any, has fired for this agent's thresholds.
--
-- Two clocks meet here (SAFETY S1). Age is measured with the database's: a reading counts from
-- when it was received (received_at; rows without it count as received at ts), so a station is
-- fresh, stale or dead by when its readings arrive, whatever its own clock says. Everything
-- else (debounce, confirmation, cooldown, discharge slope) compares readings with each other
-- on the station's clock (ts), against `dev_now`: %(now)s translated to that clock by the
-- offset of the station's newest reading (received_at - ts). A station whose clock runs hours
-- behind or ahead therefore reaches the same decisions at the same moments as one in sync.
-- The *_fires_at columns are on the database clock; the *_since columns on the station's
-- (they also name conditions and episodes, and must not move with network jitter).
--
-- Only readings received by %(now)s count, so the same query answers "now" (callers pass
-- now()) and any moment of the past (tests, replay). Every "since" is derived from the
-- readings, not from the worker's memory: a restarted worker reaches the same decision at the
-- same moment.
--
-- Every lookup in the hypertable reads only ts BETWEEN %(horizon)s AND %(until)s, and
-- BETWEEN {chunks_from} AND {chunks_to}: the same window rounded out to whole days (the whole
-- range while the hypertable has few chunks), which policy/rules.py writes into the statement
-- as constants. The planner skips every chunk
-- outside them, in a generic plan too, so a year of history costs what a day does; and the
-- text stays the same for a day, so PostgreSQL keeps one plan for it (psycopg prepares it
-- after a few runs) instead of planning every run. `history_cut` says when a row's result may
-- depend on older readings (no reading in the window from a station that has reported, an
-- outage or a grid flapping without re-arm for longer than the window); rules.py then
-- evaluates those stations again over a wider window, up to all of their history, so the
-- window changes no decision. %(only)s (null: all) limits the run to some stations.
--
-- Parameters: now, horizon, until, bounded (false when the window is all history), only, soc_min, soc_margin, runtime_min, runtime_margin,
-- max_on_battery_sec, debounce_sec, confirm_sec, cooldown_sec, rearm_soc, slope_window_sec.
WITH stations AS (
    -- Each station once, however many agents it supplies: its state is computed once.
    SELECT DISTINCT d.device_sn, d.name AS device_name, d.stale_after_sec, d.dead_after_sec,
           d.last_seen
      FROM agents a
      JOIN agent_supplies s ON s.agent_id = a.agent_id
      JOIN devices d ON d.device_sn = s.device_sn
     WHERE a.enabled AND (%(only)s::text[] IS NULL OR d.device_sn = ANY(%(only)s::text[]))
), clock AS (
    SELECT p.*,
           latest.ts AS last_ts,
           latest.received_at AS last_received_at,
           latest.soc AS soc,
           latest.remain_time_min,
           coalesce(latest.received_at - latest.ts, interval '0')  AS clock_offset,
           %(now)s - coalesce(latest.received_at - latest.ts, interval '0') AS dev_now
      FROM stations p
      -- The newest reading received by now: the last to arrive, not the one with the latest
      -- stamp. A message whose clock jumped ahead claims a time still to come; ordered by its
      -- stamp it would stand for the station until the clock caught up, hiding the real grid
      -- and SoC behind it. Taken as the last arrival, it sets no clock: its ts lies beyond
      -- dev_now, so no lookup below sees it before the station's clock reaches it. (The
      -- collector stores a stamp more than pipeline.MAX_CLOCK_AHEAD ahead of the receive
      -- time at the receive time.) Same arrival: the later stamp. The index on
      -- (device_sn, coalesce(received_at, ts) DESC, ts DESC) (migration 0009) stops this at
      -- the first row, inside the same chunks as the other lookups.
      LEFT JOIN LATERAL (
            SELECT m.ts, coalesce(m.received_at, m.ts) AS received_at,
                   coalesce(m.soc_min_percent, m.soc_percent)::float8 AS soc,
                   m.remain_time_min
              FROM ecoflow_measurements m
             WHERE m.device_sn = p.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND coalesce(m.received_at, m.ts) <= %(now)s
             ORDER BY coalesce(m.received_at, m.ts) DESC, m.ts DESC LIMIT 1) latest ON true
), station AS (
    SELECT p.*,
           grid.grid_connected AS grid_on,
           grid.ts AS grid_ts,
           -- The last moment the grid was back and stayed back for the confirmation period:
           -- everything before it is cleared; a shorter return (a flap) clears nothing.
           coalesce(confirmed.ts, '-infinity'::timestamptz) AS confirmed_grid_ts,
           -- The last re-arm point: grid back for the whole cooldown with SoC at the restart
           -- level, or an abort that closed the episode. An episode starts after it.
           greatest(coalesce(rearm.ts, '-infinity'::timestamptz),
                    coalesce(closure.closed_at - p.clock_offset, '-infinity'::timestamptz))
                                                                      AS rearm_ts
      FROM clock p
      LEFT JOIN LATERAL (
            SELECT m.ts, m.grid_connected
              FROM ecoflow_measurements m
             WHERE m.device_sn = p.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND m.ts <= p.dev_now
               AND m.grid_connected IS NOT NULL
             ORDER BY m.ts DESC LIMIT 1) grid ON true
      -- "The grid held for a period from reading g": walk back from the latest candidate; when
      -- the first loss b after g falls inside the period, no reading from b - period on can
      -- qualify, so the walk jumps before it: a few index probes per grid flap instead of one
      -- per reading.
      LEFT JOIN LATERAL (
            WITH RECURSIVE walk AS (
                SELECT c.ts, (SELECT o.ts FROM ecoflow_measurements o
                               WHERE o.device_sn = p.device_sn
                                 AND o.ts BETWEEN %(horizon)s AND %(until)s
                                 AND o.ts BETWEEN {chunks_from} AND {chunks_to}
                                 AND NOT o.grid_connected
                                 AND o.ts > c.ts
                                 AND o.ts <= c.ts + make_interval(secs => %(confirm_sec)s)
                               ORDER BY o.ts LIMIT 1) AS blocked_by
                  FROM (SELECT g.ts FROM ecoflow_measurements g
                         WHERE g.device_sn = p.device_sn
                           AND g.ts BETWEEN %(horizon)s AND %(until)s
                           AND g.ts BETWEEN {chunks_from} AND {chunks_to}
                           AND g.grid_connected
                           AND g.ts <= p.dev_now - make_interval(secs => %(confirm_sec)s)
                         ORDER BY g.ts DESC LIMIT 1) c
                UNION ALL
                SELECT c.ts, (SELECT o.ts FROM ecoflow_measurements o
                               WHERE o.device_sn = p.device_sn
                                 AND o.ts BETWEEN %(horizon)s AND %(until)s
                                 AND o.ts BETWEEN {chunks_from} AND {chunks_to}
                                 AND NOT o.grid_connected
                                 AND o.ts > c.ts
                                 AND o.ts <= c.ts + make_interval(secs => %(confirm_sec)s)
                               ORDER BY o.ts LIMIT 1)
                  FROM walk w
                  CROSS JOIN LATERAL (
                        SELECT g.ts FROM ecoflow_measurements g
                         WHERE g.device_sn = p.device_sn
                           AND g.ts BETWEEN %(horizon)s AND %(until)s
                           AND g.ts BETWEEN {chunks_from} AND {chunks_to}
                           AND g.grid_connected
                           AND g.ts < w.blocked_by - make_interval(secs => %(confirm_sec)s)
                         ORDER BY g.ts DESC LIMIT 1) c
                 WHERE w.blocked_by IS NOT NULL
            )
            SELECT ts FROM walk WHERE blocked_by IS NULL) confirmed ON true
      LEFT JOIN LATERAL (
            WITH RECURSIVE walk AS (
                SELECT c.ts, (SELECT o.ts FROM ecoflow_measurements o
                               WHERE o.device_sn = p.device_sn
                                 AND o.ts BETWEEN %(horizon)s AND %(until)s
                                 AND o.ts BETWEEN {chunks_from} AND {chunks_to}
                                 AND NOT o.grid_connected
                                 AND o.ts > c.ts
                                 AND o.ts <= c.ts + make_interval(secs => %(cooldown_sec)s)
                               ORDER BY o.ts LIMIT 1) AS blocked_by
                  FROM (SELECT g.ts FROM ecoflow_measurements g
                         WHERE g.device_sn = p.device_sn
                           AND g.ts BETWEEN %(horizon)s AND %(until)s
                           AND g.ts BETWEEN {chunks_from} AND {chunks_to}
                           AND g.grid_connected
                           AND coalesce(g.soc_min_percent, g.soc_percent) >= %(rearm_soc)s
                           AND g.ts <= p.dev_now - make_interval(secs => %(cooldown_sec)s)
                         ORDER BY g.ts DESC LIMIT 1) c
                UNION ALL
                SELECT c.ts, (SELECT o.ts FROM ecoflow_measurements o
                               WHERE o.device_sn = p.device_sn
                                 AND o.ts BETWEEN %(horizon)s AND %(until)s
                                 AND o.ts BETWEEN {chunks_from} AND {chunks_to}
                                 AND NOT o.grid_connected
                                 AND o.ts > c.ts
                                 AND o.ts <= c.ts + make_interval(secs => %(cooldown_sec)s)
                               ORDER BY o.ts LIMIT 1)
                  FROM walk w
                  CROSS JOIN LATERAL (
                        SELECT g.ts FROM ecoflow_measurements g
                         WHERE g.device_sn = p.device_sn
                           AND g.ts BETWEEN %(horizon)s AND %(until)s
                           AND g.ts BETWEEN {chunks_from} AND {chunks_to}
                           AND g.grid_connected
                           AND coalesce(g.soc_min_percent, g.soc_percent) >= %(rearm_soc)s
                           AND g.ts < w.blocked_by - make_interval(secs => %(cooldown_sec)s)
                         ORDER BY g.ts DESC LIMIT 1) c
                 WHERE w.blocked_by IS NOT NULL
            )
            SELECT ts FROM walk WHERE blocked_by IS NULL) rearm ON true
      LEFT JOIN LATERAL (
            SELECT max(c.closed_at) AS closed_at
              FROM episode_closures c
             WHERE c.device_sn = p.device_sn AND c.closed_at <= %(now)s) closure ON true
), marks AS MATERIALIZED (
    -- MATERIALIZED here and for `conditions`: inlined, a column computed by a subquery is
    -- copied into every expression that uses it further down (runtime_left_min reads
    -- discharge_pct_per_min twice, the triggers the *_low_since twice more, ...), and each
    -- copy is planned and run again: twice the lookups to plan, and to run in an outage.
    SELECT s.*,
           (SELECT min(m.ts) FROM ecoflow_measurements m
             WHERE m.device_sn = s.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND NOT m.grid_connected
               AND m.ts > s.rearm_ts AND m.ts <= s.dev_now)              AS episode_start,
           (SELECT min(m.ts) FROM ecoflow_measurements m
             WHERE m.device_sn = s.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND NOT m.grid_connected
               AND m.ts > s.confirmed_grid_ts AND m.ts <= s.dev_now)     AS on_battery_since,
           -- Only losses after the last confirmed return matter, which keeps this scan short
           -- after a week on grid.
           (SELECT max(m.ts) FROM ecoflow_measurements m
             WHERE m.device_sn = s.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND NOT m.grid_connected
               AND m.ts > s.confirmed_grid_ts AND m.ts <= s.dev_now)     AS last_off_grid_ts,
           -- Discharge rate in percent per minute over the recent on-battery readings.
           (SELECT CASE WHEN regr_count(coalesce(m.soc_min_percent, m.soc_percent),
                                        extract(epoch FROM m.ts)) >= 3
                        THEN -60 * regr_slope(coalesce(m.soc_min_percent, m.soc_percent),
                                              extract(epoch FROM m.ts)) END
              FROM ecoflow_measurements m
             WHERE m.device_sn = s.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND NOT m.grid_connected
               AND m.ts > greatest(s.confirmed_grid_ts,
                                   s.dev_now - make_interval(secs => %(slope_window_sec)s))
               AND m.ts <= s.dev_now)                                   AS discharge_pct_per_min
      FROM station s
), runtime AS MATERIALIZED (
    SELECT k.*,
           -- Since when the grid has been back: the first reading with it after the last loss,
           -- or at least since the last confirmed return.
           CASE WHEN k.grid_on THEN coalesce(
               (SELECT min(m.ts) FROM ecoflow_measurements m
                 WHERE m.device_sn = k.device_sn
                   AND m.ts BETWEEN %(horizon)s AND %(until)s
                   AND m.ts BETWEEN {chunks_from} AND {chunks_to}
                   AND m.grid_connected
                   AND m.ts > k.last_off_grid_ts AND m.ts <= k.dev_now),
               CASE WHEN k.last_off_grid_ts IS NULL
                    THEN nullif(k.confirmed_grid_ts, '-infinity') END)
           END                                                        AS grid_back_since,
           -- The device's estimate when it gives one, else SoC over the current discharge rate.
           coalesce(k.remain_time_min::float8,
                    CASE WHEN k.grid_on IS FALSE AND k.discharge_pct_per_min > 0
                         THEN k.soc / k.discharge_pct_per_min END)    AS runtime_left_min
      FROM marks k
), pairs AS (
    SELECT a.agent_id, a.tier, a.min_supplies, a.shutdown_delay_sec, s.device_sn,
           coalesce(a.soc_threshold, %(soc_min)s)::float8               AS soc_thr,
           coalesce(a.runtime_threshold_min, %(runtime_min)s)::float8   AS runtime_thr,
           coalesce(a.max_on_battery_sec, %(max_on_battery_sec)s)::float8 AS battery_limit_sec
      FROM agents a
      JOIN agent_supplies s ON s.agent_id = a.agent_id
     WHERE a.enabled
), conditions AS MATERIALIZED (
    -- A condition starts at the first reading meeting it after the last reading that clears
    -- it (threshold plus margin, or the grid confirmed back): hysteresis and debounce in one.
    -- Per agent: each has its own thresholds.
    SELECT r.*, p.agent_id, p.tier, p.min_supplies, p.shutdown_delay_sec,
           p.soc_thr, p.runtime_thr, p.battery_limit_sec,
           (SELECT min(m.ts) FROM ecoflow_measurements m
             WHERE m.device_sn = r.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND NOT m.grid_connected AND m.ts <= r.dev_now
               AND coalesce(m.soc_min_percent, m.soc_percent) <= p.soc_thr
               AND m.ts > greatest(r.confirmed_grid_ts, coalesce(
                     (SELECT max(c.ts) FROM ecoflow_measurements c
                       WHERE c.device_sn = r.device_sn
                         AND c.ts BETWEEN %(horizon)s AND %(until)s
                         AND c.ts BETWEEN {chunks_from} AND {chunks_to}
                         AND c.ts <= r.dev_now
                         AND c.ts > r.confirmed_grid_ts
                         AND coalesce(c.soc_min_percent, c.soc_percent)
                             > p.soc_thr + %(soc_margin)s), '-infinity')))  AS soc_low_since,
           CASE WHEN p.runtime_thr IS NOT NULL THEN
           (SELECT min(m.ts) FROM ecoflow_measurements m
             WHERE m.device_sn = r.device_sn
               AND m.ts BETWEEN %(horizon)s AND %(until)s
               AND m.ts BETWEEN {chunks_from} AND {chunks_to}
               AND NOT m.grid_connected AND m.ts <= r.dev_now
               AND coalesce(m.remain_time_min::float8,
                            coalesce(m.soc_min_percent, m.soc_percent)
                              / nullif(greatest(r.discharge_pct_per_min, 0), 0)) <= p.runtime_thr
               AND m.ts > greatest(r.confirmed_grid_ts, coalesce(
                     (SELECT max(c.ts) FROM ecoflow_measurements c
                       WHERE c.device_sn = r.device_sn
                         AND c.ts BETWEEN %(horizon)s AND %(until)s
                         AND c.ts BETWEEN {chunks_from} AND {chunks_to}
                         AND c.ts <= r.dev_now
                         AND c.ts > r.confirmed_grid_ts
                         AND coalesce(c.remain_time_min::float8,
                                      coalesce(c.soc_min_percent, c.soc_percent)
                                        / nullif(greatest(r.discharge_pct_per_min, 0), 0))
                             > p.runtime_thr + %(runtime_margin)s), '-infinity')))
           END                                                        AS runtime_low_since
      FROM runtime r
      JOIN pairs p ON p.device_sn = r.device_sn
), fired AS (
    SELECT c.*,
           CASE WHEN c.last_ts IS NULL THEN 'unknown'
                WHEN %(now)s - c.last_received_at > make_interval(secs => c.dead_after_sec)
                     THEN 'dead'
                WHEN %(now)s - c.last_received_at > make_interval(secs => c.stale_after_sec)
                     THEN 'stale'
                ELSE 'fresh' END                                      AS freshness,
           -- On battery from the first reading without the grid until the grid has been back
           -- for the confirmation period: an AC pulse shorter than that is not the grid back,
           -- so it does not tell the agents' fail-safe "on grid" nor end the on-battery alert.
           -- The triggers themselves need the latest reading off grid (below): a blip shorter
           -- than the debounce must never fire because the grid's return is not yet confirmed.
           c.grid_on IS FALSE OR (c.grid_on AND c.last_off_grid_ts IS NOT NULL)
                                                                      AS on_battery,
           c.soc_low_since + c.clock_offset
               + make_interval(secs => %(debounce_sec)s)              AS soc_fires_at,
           c.runtime_low_since + c.clock_offset
               + make_interval(secs => %(debounce_sec)s)              AS runtime_fires_at,
           c.on_battery_since + c.clock_offset
               + make_interval(secs => c.battery_limit_sec)           AS battery_time_fires_at,
           c.last_received_at + make_interval(secs => c.dead_after_sec) AS dead_fires_at
      FROM conditions c
), decided AS (
    -- Triggers are evaluated only while the latest reading says the grid is off (a dead
    -- station counts as on battery when it was last seen so); the one that fired first wins
    -- and names the reason.
    SELECT f.*,
           (SELECT t.name FROM (VALUES
                   ('soc', f.soc_fires_at),
                   ('runtime', f.runtime_fires_at),
                   ('battery_time', f.battery_time_fires_at),
                   ('dead_on_battery', CASE WHEN f.freshness = 'dead' THEN f.dead_fires_at END)
               ) AS t(name, at)
             WHERE f.grid_on IS FALSE AND t.at <= %(now)s
             ORDER BY t.at, t.name LIMIT 1)                           AS trigger
      FROM fired f
)
SELECT agent_id, tier, min_supplies, shutdown_delay_sec, device_sn, device_name,
       freshness, on_battery, grid_on,
       last_ts, last_received_at,
       extract(epoch FROM %(now)s - last_received_at)::float8        AS age_sec,
       extract(epoch FROM clock_offset)::float8                      AS clock_offset_sec,
       soc, soc_thr, remain_time_min, runtime_left_min, runtime_thr, discharge_pct_per_min,
       on_battery_since, grid_back_since, battery_limit_sec,
       soc_low_since, runtime_low_since,
       soc_fires_at, runtime_fires_at, battery_time_fires_at, dead_fires_at,
       trigger,
       CASE WHEN episode_start IS NOT NULL
            THEN device_sn || '-' || floor(extract(epoch FROM episode_start))::bigint END
                                                                      AS episode_id,
       episode_start,
       -- What the window rests on (rules.py keeps them to choose the next window).
       nullif(confirmed_grid_ts, '-infinity') AS confirmed_grid_ts,
       nullif(rearm_ts, '-infinity') AS rearm_ts,
       freshness IN ('fresh', 'stale') AND trigger IS NULL           AS healthy,
       %(bounded)s AND (
            (last_ts IS NULL AND last_seen IS NOT NULL)
         OR (confirmed_grid_ts = '-infinity' AND grid_on IS NOT NULL)
         OR (rearm_ts = '-infinity' AND episode_start IS NOT NULL))  AS history_cut,
       -- Power is back for this supply once the grid has held for the confirmation period.
       freshness IN ('fresh', 'stale') AND grid_on IS TRUE
           AND grid_back_since <= dev_now - make_interval(secs => %(confirm_sec)s) AS power_back
  FROM decided
 ORDER BY agent_id, device_sn;
