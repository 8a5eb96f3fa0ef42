"""Policy benchmark: one evaluation of the shutdown rules (policy/sql/supply_state.sql) over a
year of history, as the worker runs it (one connection, statements prepared after a few runs),
at 8 and at 365 daily chunks, 5 and 50 stations, on grid and two hours into an outage. Prints
the first evaluation and the steady-state median (evaluations 11-30), with the targets."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timedelta, timezone

import psycopg

from bench.common import migrated_database, save, table
from policy import topology
from policy.rules import supply_rows
from policy.settings import PolicySettings

END = datetime(2026, 6, 1, tzinfo=timezone.utc)
OUTAGE_START = END - timedelta(hours=2)
TARGET_MS = {"on grid": 50, "in an outage": 100}

# One reading every `every` seconds per station for `days` days: on grid at 90 %, except
# the last two hours (on battery, draining) and a one-hour outage every 30 days.
GENERATE = """
INSERT INTO ecoflow_measurements (ts, received_at, device_sn, soc_percent, soc_min_percent,
    grid_connected, source, raw_data)
SELECT t, t, sn, soc, soc, NOT outage, 'simulator', '{}'
  FROM (SELECT t, sn,
               t > %(outage)s OR (extract(epoch FROM t)::bigint %% (30 * 86400)) < 3600 AS outage,
               CASE WHEN t > %(outage)s
                    THEN 90 - extract(epoch FROM t - %(outage)s) / 120 ELSE 90 END AS soc
          FROM unnest(%(sns)s::text[]) sn,
               generate_series(%(start)s, %(end)s, make_interval(secs => %(every)s)) t) g
"""


def evaluations(url: str, settings: PolicySettings, now: datetime, runs: int = 30):
    with psycopg.connect(url, autocommit=True) as conn:
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            supply_rows(conn, now, settings.rule_params())
            timings.append((time.perf_counter() - started) * 1000)
    return timings[0], statistics.median(timings[10:])


def run_case(url: str, days: int, stations: int, every: int) -> list[tuple]:
    sns = [f"BENCH{days:03d}{stations:03d}{i:07d}" for i in range(stations)]
    settings = PolicySettings(runtime_min=10, device_to_agents_json=json.dumps(
        {sn: [f"host-{days}-{i}"] for i, sn in enumerate(sns)}))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(GENERATE, {"sns": sns, "start": END - timedelta(days=days), "end": END,
                                "every": every, "outage": OUTAGE_START})
        conn.execute("UPDATE agents SET enabled = false")
        topology.sync(conn, settings)
        # As the collector's writer keeps it.
        conn.execute("UPDATE devices d SET last_seen = %s WHERE device_sn = ANY(%s)",
                     (END, sns))
        conn.execute("ANALYZE ecoflow_measurements")
        chunks = conn.execute(
            "SELECT count(*) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'ecoflow_measurements'").fetchone()[0]
    rows = []
    for label, now in (("on grid", OUTAGE_START - timedelta(minutes=30)),
                       ("in an outage", END)):
        first, steady = evaluations(url, settings, now)
        target = TARGET_MS[label]
        rows.append((days, chunks, stations, label, f"{first:.0f}", f"{steady:.1f}",
                     f"< {target}", "met" if steady < target else "MISSED"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE agents SET enabled = false")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--every", type=int, default=600, help="seconds between readings")
    parser.add_argument("--stations", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--days", type=int, nargs="+", default=[8, 365])
    args = parser.parse_args(argv)
    results = []
    # One database per history length: chunk counts must not add up across cases.
    for days in args.days:
        with migrated_database(f"bench_policy_{days}") as (_pg, url):
            for stations in args.stations:
                results += run_case(url, days, stations, args.every)
    headers = ("days", "chunks", "stations", "state", "first ms", "steady ms", "target",
               "")
    print("\npolicy evaluation (one statement for all agents and stations)")
    print(table(results, headers))
    save("policy", {"rows": [dict(zip(headers, r)) for r in results],
                    "every_sec": args.every})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
