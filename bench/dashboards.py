"""Dashboard benchmark: a quarter of readings (3 stations, one every 5 s), the summary tables
built over it (timed on their own, as is one refresh after that) and, where the rollups are
continuous aggregates, those refreshed explicitly over the whole history (so the figures do
not depend on when TimescaleDB's jobs last ran), then every panel's SQL over the last 30 and
the last 90 days, as Grafana would send it; median and slowest time per query. A TimescaleDB
background job that failed is reported loudly: its figures would not be the user's."""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import timedelta

import psycopg

from bench.common import migrated_database, save, table
from testbed.dashboards import DASHBOARDS, load, queries
from testbed.grafana_sql import auto_interval, expand

TARGET_MS = {30: 300, 90: 1000}  # per range in days; other ranges use the nearest below

# Failed runs of TimescaleDB's background jobs: ours (a refresh, compression or retention
# policy on our tables, hypertable_name set) make the figures wrong; TimescaleDB's own
# housekeeping (e.g. policy_job_stat_history_retention, which the Apache build refuses with
# 0A000 "not supported under the apache license") is reported but does not touch our data.
JOB_FAILURES = """
SELECT s.job_id, j.proc_name, j.hypertable_name, s.last_run_status, s.total_failures
  FROM timescaledb_information.job_stats s
  JOIN timescaledb_information.jobs j USING (job_id)
 WHERE (s.last_run_status IS DISTINCT FROM 'Success' AND s.total_runs > 0)
    OR s.total_failures > 0
"""


def target_ms(days: int) -> int:
    return TARGET_MS[max([d for d in TARGET_MS if d <= days] or [min(TARGET_MS)])]


def refresh_rollups(conn) -> list[str]:
    """Refresh every continuous aggregate over all of its history (community edition); the
    Apache build and plain PostgreSQL have views there, with nothing to refresh."""
    try:
        names = [r[0] for r in conn.execute(
            "SELECT view_name FROM timescaledb_information.continuous_aggregates").fetchall()]
    except psycopg.Error:
        return []
    for name in names:
        conn.execute(f"CALL refresh_continuous_aggregate('{name}', NULL, NULL)")
    return names


def failed_jobs(conn) -> list[tuple]:
    try:
        return conn.execute(JOB_FAILURES).fetchall()
    except psycopg.Error:
        return []

# Three stations, a reading every 5 s for `days` days; the grid drops for an hour every day
# at 18:00, SoC follows, and a little solar around noon.
GENERATE = """
INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent,
    remain_time_min, watts_in_sum, watts_out_sum, ac_in_watts, ac_out_watts, pv_in_watts,
    grid_connected, battery_temp_c, source, raw_data)
SELECT ts, sn,
       soc, soc - 1,
       CASE WHEN outage THEN (soc * 6)::int END,
       CASE WHEN outage THEN pv ELSE 250 + pv END,
       200 + (extract(epoch FROM ts)::bigint %% 60)::int,
       CASE WHEN outage THEN 0 ELSE 250 END,
       200, pv, NOT outage, 25, 'simulator',
       jsonb_build_object('bms_emsStatus.f32LcdShowSoc', soc, 'pd.wattsOutSum', 200)
  FROM (SELECT ts, sn,
               extract(hour FROM ts AT TIME ZONE 'UTC') = 18 AS outage,
               CASE WHEN extract(hour FROM ts AT TIME ZONE 'UTC') = 18
                    THEN 100 - extract(minute FROM ts AT TIME ZONE 'UTC') ELSE 100 END AS soc,
               CASE WHEN extract(hour FROM ts AT TIME ZONE 'UTC') BETWEEN 10 AND 15
                    THEN 300 ELSE 0 END AS pv
          FROM generate_series(now() - make_interval(days => %(days)s), now(),
                               interval '5 seconds') AS ts,
               unnest(%(sns)s::text[]) AS sn) g
"""
SNS = ["DAEBZ5ZE4000123", "R351ZFB4HF123456", "R631ZEB4WH123456"]
EXTRAS = """
INSERT INTO devices (device_sn, name, model) VALUES
    ('DAEBZ5ZE4000123', 'office', 'Delta Max'), ('R351ZFB4HF123456', 'rack', 'Delta 2 Max'),
    ('R631ZEB4WH123456', 'desk', 'River 3');
INSERT INTO policy_events (ts, kind, device_sn, message)
SELECT ts, 'condition_started', 'R631ZEB4WH123456', 'on battery'
  FROM generate_series(now() - interval '30 days', now(), interval '1 hour') ts;
INSERT INTO agent_status (agent_id, online, version, platform, host)
VALUES ('nas-01', true, '1.0.0', 'linux', 'nas');
INSERT INTO ingest_errors (ts, source, topic, payload, error)
SELECT ts, 'bridge', 'bridge-ecoflow/X/data', '\\x00ff'::bytea, 'not JSON'
  FROM generate_series(now() - interval '30 days', now(), interval '6 hours') ts;
"""


def variable_values(conn, dashboard: str, start, end) -> dict:
    """What Grafana selects by default: all values of a multi-value variable, else the first."""
    values = {}
    for var in load(DASHBOARDS / f"{dashboard}.json")["templating"]["list"]:
        if var["type"] != "query":
            continue
        options = [r[0] for r in conn.execute(expand(var["query"], start, end)).fetchall()]
        values[var["name"]] = options if var.get("multi") or var.get("includeAll") else options[0]
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, nargs="+", default=[30, 90],
                        help="time ranges to query, in days (the data covers the longest)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    qs = queries()
    with migrated_database("dashboards") as (pg, url), psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(GENERATE, {"days": max(args.days), "sns": SNS})
        conn.execute(EXTRAS)
        conn.execute("ANALYZE")
        rows = conn.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0]
        print(f"generated {rows:,} readings in {time.perf_counter() - started:.0f} s")
        # What the policy worker does once a minute: the first call builds the whole month, a
        # later one recomputes only the lookback window behind the watermark.
        started = time.perf_counter()
        conn.execute("SELECT ecoflow_refresh_summaries()")
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        conn.execute("SELECT ecoflow_refresh_summaries()")
        refresh_ms = (time.perf_counter() - started) * 1000
        print(f"summaries: first build over {max(args.days)} days {build_s:.1f} s,"
              f" a refresh after it {refresh_ms:.0f} ms")
        started = time.perf_counter()
        rollups = refresh_rollups(conn)
        if rollups:
            print(f"continuous aggregates refreshed over all history in "
                  f"{time.perf_counter() - started:.1f} s: {', '.join(rollups)}")
        end = conn.execute("SELECT now()").fetchone()[0]
        by_range = {}
        for days in args.days:
            start = end - timedelta(days=days)
            results = []
            for q in qs:
                sql = expand(q.sql, start, end, interval=auto_interval(start, end),
                             variables=variable_values(conn, q.dashboard, start, end),
                             timescaledb=pg.timescaledb)
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    conn.execute(sql).fetchall()
                    times.append((time.perf_counter() - t) * 1000)
                results.append((q.id, statistics.median(times)))
            results.sort(key=lambda r: -r[1])
            by_range[days] = results
        failures = failed_jobs(conn)
    summary = {}
    for days, results in by_range.items():
        limit = target_ms(days)
        over = [r for r in results if r[1] >= limit]
        print(f"\nDashboards: every query over the last {days} days ({rows:,} readings stored,"
              f" median of {args.repeat})\n")
        print(table([(qid, f"{ms:.1f}", "over target" if ms >= limit else "")
                     for qid, ms in results], ("query", "median ms", "")))
        print(f"\nslowest: {results[0][0]} {results[0][1]:.0f} ms; {len(over)} of"
              f" {len(results)} over the {limit} ms target")
        summary[str(days)] = {
            "median_ms": {qid: round(ms, 1) for qid, ms in results},
            "slowest": {"query": results[0][0], "ms": round(results[0][1], 1)},
            "over_target": [qid for qid, _ in over], "target_ms": limit}
    ours = [f for f in failures if f[2] is not None]
    for job_id, proc, table_name, status, count in failures:
        if table_name is not None:
            print(f"\n!!! TimescaleDB background job {job_id} ({proc} on {table_name}) last ran"
                  f" {status} and failed {count} times: the figures above are not what a"
                  f" user would see")
        else:
            print(f"\nnote: TimescaleDB's own job {job_id} ({proc}) failed {count} times"
                  f" (housekeeping, not our data; see timescaledb_information.job_errors)")
    save("dashboards", {
        "readings": rows, "days": args.days, "rollups_refreshed": rollups,
        "summaries_build_s": round(build_s, 1), "summaries_refresh_ms": round(refresh_ms, 1),
        "ranges": summary, "failed_jobs": [list(map(str, f)) for f in failures],
    })
    return 1 if ours else 0


if __name__ == "__main__":
    raise SystemExit(main())
