"""Policy benchmark.

1. One evaluation of the shutdown rules (policy/sql/supply_state.sql) over a year of history,
   as the worker runs it (one connection, statements prepared after a few runs), at 8 and at
   365 daily chunks, 5 and 50 stations, on grid and two hours into an outage: the first
   evaluation and the steady-state median (evaluations 11-30), with the targets.
2. Publish -> command: a year of history for 50 stations, the real collector (a process,
   reading the bridge topic) and the policy worker (serve(), as `ecoflow-policy run` runs it);
   for each of 20 episodes a station publishes the decisive reading (grid lost, SoC under the
   threshold, no debounce) and the time until its agent's shutdown command arrives on the
   broker is measured: p50, p99, and episodes with no command within 10 s."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg

from bench.common import migrated_database, save, table
from policy import rules, topology
from policy.mqttlink import MqttLink
from policy.rules import supply_rows
from policy.settings import PolicySettings
from policy.worker import serve
from testbed.mosquitto import MosquittoServer

REPO = Path(__file__).resolve().parent.parent

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


def _seen(conn, sns: list[str], first: datetime, last: datetime) -> None:
    """The stations in `devices` as the collector's writer records them once they report (the
    history was written around it), so the topology finds them reported."""
    conn.execute("INSERT INTO devices (device_sn, first_seen, last_seen)"
                 " SELECT sn, %s, %s FROM unnest(%s::text[]) AS sn"
                 " ON CONFLICT (device_sn) DO UPDATE SET first_seen = EXCLUDED.first_seen,"
                 " last_seen = EXCLUDED.last_seen", (first, last, sns))


def run_case(url: str, days: int, stations: int, every: int) -> list[tuple]:
    sns = [f"BENCH{days:03d}{stations:03d}{i:07d}" for i in range(stations)]
    settings = PolicySettings(runtime_min=10, device_to_agents_json=json.dumps(
        {sn: [f"host-{days}-{i}"] for i, sn in enumerate(sns)}))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(GENERATE, {"sns": sns, "start": END - timedelta(days=days), "end": END,
                                "every": every, "outage": OUTAGE_START})
        conn.execute("UPDATE agents SET enabled = false")
        _seen(conn, sns, END - timedelta(days=days), END)
        topology.sync(conn, settings)
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
    rows += long_outage_case(url, days, chunks, stations, sns, settings)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE agents SET enabled = false")
    return rows


def long_outage_case(url, days, chunks, stations, sns, settings, off: int = 5) -> list[tuple]:
    """`off` stations on battery for three days (grid confirmed before), `off` more installed
    three days ago off grid (never on grid): their results rest on readings older than the
    day the rules read first. Steady state with the floors policy/rules.py keeps, and without
    them (every evaluation of those stations over all history, as before)."""
    if len(sns) < 2 * off:
        return []
    now = END
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE ecoflow_measurements SET grid_connected = false, soc_percent = 60,"
                     " soc_min_percent = 60 WHERE device_sn = ANY(%s) AND ts > %s",
                     (sns[:2 * off], now - timedelta(days=3)))
        conn.execute("DELETE FROM ecoflow_measurements WHERE device_sn = ANY(%s) AND ts <= %s",
                     (sns[off:2 * off], now - timedelta(days=3)))
        conn.execute("ANALYZE ecoflow_measurements")
    label = f"{off} on battery 3 days, {off} never on grid"
    out = []
    for how in ("all history", "floors"):
        if how == "all history":
            real = rules._FLOORS.get
            rules._FLOORS.get = lambda conn, params: {}
            try:
                first, steady = evaluations(url, settings, now)
            finally:
                rules._FLOORS.get = real
        else:
            first, steady = evaluations(url, settings, now)
        out.append((days, chunks, stations, f"{label} ({how})", f"{first:.0f}",
                    f"{steady:.1f}", "< 100", "met" if steady < 100 else "MISSED"))
    return out


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _delta2(sn: str, soc: float, grid: bool) -> bytes:
    """A Delta 2 push as a local bridge forwards it (PROTOCOL.md keys), stamped now."""
    return json.dumps({"id": uuid.uuid4().int % 10**9, "version": "1.0",
                       "timestamp": int(time.time() * 1000),
                       "params": {"bms_emsStatus.f32LcdShowSoc": soc, "pd.wattsOutSum": 300,
                                  "pd.wattsInSum": 320 if grid else 0,
                                  "inv.inputWatts": 320 if grid else 0,
                                  "inv.acInVol": 230000 if grid else 0}}).encode()


def publish_to_command(days: int, stations: int, episodes: int, every: int) -> list[tuple]:
    sns = [f"R351LATENCY{i:05d}" for i in range(stations)]
    agents = [f"lat-{i:03d}" for i in range(stations)]
    with migrated_database("bench_latency") as (_pg, url), MosquittoServer() as broker:
        now = datetime.now(timezone.utc)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(GENERATE, {"sns": sns, "start": now - timedelta(days=days),
                                    "end": now - timedelta(minutes=1), "every": every,
                                    "outage": now + timedelta(days=1)})
            conn.execute("ANALYZE ecoflow_measurements")
        settings = PolicySettings(soc_min=15, debounce_sec=0, interval_sec=5, resend_sec=3600,
                                  mqtt_host=broker.host, mqtt_port=broker.port,
                                  signing_key="bench", device_to_agents_json=json.dumps(
                                      {sn: [a] for sn, a in zip(sns, agents)}))
        with psycopg.connect(url, autocommit=True) as conn:
            _seen(conn, sns, now - timedelta(days=days), now - timedelta(minutes=1))
            topology.sync(conn, settings)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("POSTGRES_", "MQTT_", "COLLECTOR_", "BRIDGE_"))}
        env.update(DATABASE_URL=url, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
                   EXPORTER_PORT="0", LOG_LEVEL="WARNING", BRIDGE_TOPICS="bridge-ecoflow/+/data",
                   COLLECTOR_CLIENT_ID="bench-latency")
        collector = subprocess.Popen([sys.executable, "-m", "collector"], env=env, cwd=REPO)
        arrived: dict[str, float] = {}
        got = threading.Condition()

        def on_message(client, userdata, msg):
            with got:
                arrived.setdefault(msg.topic.split("/")[1], time.perf_counter())
                got.notify_all()

        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-agents",
                          protocol=mqtt.MQTTv5)
        sub.on_message = on_message
        sub.connect(broker.host, broker.port)
        sub.subscribe("power-manager/+/cmd", qos=1)
        sub.loop_start()
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bridge",
                          protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        link = MqttLink.from_settings(settings, client_id="bench-policy")
        link.start()
        stop = threading.Event()
        worker = threading.Thread(target=serve, args=(url, settings, link, None, stop))
        latencies, missed = [], 0
        try:
            # Every station reports on grid first, so the collector and the rules know it.
            deadline = time.monotonic() + 60
            with psycopg.connect(url, autocommit=True) as conn:
                while True:
                    for sn in sns:
                        pub.publish(f"bridge-ecoflow/{sn}/data", _delta2(sn, 90, True), qos=1)
                    time.sleep(2)
                    fresh = conn.execute(
                        "SELECT count(DISTINCT device_sn) FROM ecoflow_measurements"
                        " WHERE received_at > %s", (now,)).fetchone()[0]
                    if fresh == len(sns):
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit("the collector stored nothing within a minute")
            worker.start()
            time.sleep(3 * settings.interval_sec)  # past the first, slow evaluations
            for sn, agent in list(zip(sns, agents))[:episodes]:
                time.sleep(0.5)
                started = time.perf_counter()
                pub.publish(f"bridge-ecoflow/{sn}/data", _delta2(sn, 10, False), qos=1)
                with got:
                    got.wait_for(lambda a=agent: a in arrived, timeout=10)
                if agent in arrived:
                    latencies.append((arrived[agent] - started) * 1000)
                else:
                    missed += 1
        finally:
            stop.set()
            if worker.is_alive():
                worker.join(10)
            link.stop()
            sub.loop_stop()
            pub.loop_stop()
            collector.send_signal(signal.SIGTERM)
            try:
                collector.wait(30)
            except subprocess.TimeoutExpired:
                collector.kill()
    if not latencies:
        return [(days, stations, episodes, "-", "-", missed, "< 1000", "MISSED")]
    p99 = _percentile(latencies, 0.99)
    return [(days, stations, episodes, f"{statistics.median(latencies):.0f}", f"{p99:.0f}",
             missed, "< 1000", "met" if p99 < 1000 and not missed else "MISSED")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--every", type=int, default=600, help="seconds between readings")
    parser.add_argument("--stations", type=int, nargs="+", default=[5, 50])
    parser.add_argument("--days", type=int, nargs="+", default=[8, 365])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--only", choices=("evaluation", "latency"))
    args = parser.parse_args(argv)
    lat_headers = ("days", "stations", "episodes", "p50 ms", "p99 ms", "no command in 10 s",
                   "target p99", "")
    latency = []
    if args.only != "evaluation":
        latency = publish_to_command(max(args.days), max(args.stations), args.episodes,
                                     args.every)
    results = []
    # One database per history length: chunk counts must not add up across cases.
    for days in args.days if args.only != "latency" else []:
        with migrated_database(f"bench_policy_{days}") as (_pg, url):
            for stations in args.stations:
                results += run_case(url, days, stations, args.every)
    headers = ("days", "chunks", "stations", "state", "first ms", "steady ms", "target",
               "")
    if results:
        print("\npolicy evaluation (one statement for all agents and stations)")
        print(table(results, headers))
    if latency:
        print("\npublish -> command (collector and policy worker, a year of history)")
        print(table(latency, lat_headers))
    save("policy", {"rows": [dict(zip(headers, r)) for r in results],
                    "publish_to_command": [dict(zip(lat_headers, r)) for r in latency],
                    "every_sec": args.every})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
