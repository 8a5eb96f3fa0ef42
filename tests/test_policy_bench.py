"""Policy benchmarks (run with BENCH=1; figures are printed, not asserted): decision latency
from the decisive row's commit to the command on the broker, and one evaluation over 3 million
rows."""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import paho.mqtt.client as mqtt
import psycopg
import pytest

from policy import topology
from policy.mqttlink import MqttLink
from policy.rules import supply_rows
from policy.settings import PolicySettings
from policy.worker import serve

pytestmark = pytest.mark.skipif(not os.environ.get("BENCH"), reason="benchmarks: set BENCH=1")

EPISODES = 200
STATIONS = 5
WEEK_SEC = 7 * 86400
OUTAGE_START = datetime(2026, 1, 7, 22, tzinfo=timezone.utc)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def test_bench_decision_latency(db, db_url, mqtt_broker):
    agents = [f"bench-{i:03d}" for i in range(EPISODES)]
    sns = [f"BENCH{i:011d}" for i in range(EPISODES)]
    settings = PolicySettings(soc_min=15, debounce_sec=0, interval_sec=30, resend_sec=3600,
                              mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port,
                              signing_key="bench",
                              device_to_agents_json=json.dumps({sn: [a] for sn, a in
                                                                zip(sns, agents)}))
    topology.sync(db, settings)
    db.execute("UPDATE agents SET enabled = false")
    with db.cursor() as cur:
        cur.executemany("INSERT INTO ecoflow_measurements (ts, device_sn, soc_min_percent,"
                        " grid_connected, source, raw_data)"
                        " VALUES (now() - interval '10 s', %s, 50, false, 'simulator', '{}')",
                        [(sn,) for sn in sns])

    arrived: dict[str, float] = {}
    got = threading.Condition()

    def on_message(client, userdata, msg):
        with got:
            arrived[msg.topic.split("/")[1]] = time.perf_counter()
            got.notify_all()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"b-{uuid.uuid4().hex[:6]}",
                      protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.subscribe("power-manager/+/cmd", qos=1)
    sub.loop_start()
    link = MqttLink.from_settings(settings, client_id=f"policy-{uuid.uuid4().hex[:6]}")
    link.start()
    stop = threading.Event()
    worker = threading.Thread(target=serve, args=(db_url, settings, link, None, stop))
    worker.start()
    latencies = []
    try:
        with psycopg.connect(db_url, autocommit=True) as writer:
            for agent, sn in zip(agents, sns):
                writer.execute("UPDATE agents SET enabled = (agent_id = %s)", (agent,))
                time.sleep(0.05)
                started = time.perf_counter()
                writer.execute("INSERT INTO ecoflow_measurements (ts, device_sn, soc_min_percent,"
                               " grid_connected, source, raw_data)"
                               " VALUES (now(), %s, 10, false, 'simulator', '{}')", (sn,))
                with got:
                    got.wait_for(lambda a=agent: a in arrived, timeout=5)
                if agent in arrived:
                    latencies.append(arrived[agent] - started)
    finally:
        stop.set()
        worker.join(5)
        link.stop()
        sub.loop_stop()
    print(f"\npolicy decision latency over {len(latencies)} episodes: "
          f"p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {_percentile(latencies, 0.99) * 1000:.0f} ms (target p99 < 1000 ms)")


def test_bench_one_evaluation_over_three_million_rows(db):
    sns = [f"WEEK{i:012d}" for i in range(STATIONS)]
    settings = PolicySettings(runtime_min=10,
                              device_to_agents_json=json.dumps({sn: [f"host-{i}"]
                                                                for i, sn in enumerate(sns)}))
    topology.sync(db, settings)
    started = time.perf_counter()
    # One reading per second for a week; the last two hours on battery, draining.
    db.execute(
        "INSERT INTO ecoflow_measurements (ts, device_sn, soc_min_percent, remain_time_min,"
        " grid_connected, source, raw_data)"
        " SELECT t, sn, CASE WHEN t > e - interval '2 hours'"
        "                    THEN 90 - extract(epoch FROM t - (e - interval '2 hours')) / 100"
        "                    ELSE 90 END,"
        "        NULL, t <= e - interval '2 hours', 'simulator', '{}'"
        "   FROM unnest(%s::text[]) sn,"
        "        (SELECT timestamptz '2026-01-08 00:00+00' AS e) end_,"
        "        generate_series(e - make_interval(secs => %s - 1), e, interval '1 s') t",
        (sns, WEEK_SEC))
    db.execute("ANALYZE ecoflow_measurements")
    loaded = time.perf_counter() - started
    rows = db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0]
    print(f"\n{rows} rows ({STATIONS} stations, 1 week at 1 Hz) loaded in {loaded:.0f} s")
    for label, now in (("on grid", OUTAGE_START - timedelta(hours=1)),
                       ("2 hours into an outage", OUTAGE_START + timedelta(hours=2))):
        timings = []
        # The worker's connection keeps the statement prepared after a few runs (psycopg's
        # prepare_threshold), so steady-state figures leave planning out.
        for _ in range(20):
            t = time.perf_counter()
            supply_rows(db, now, settings.rule_params())
            timings.append(time.perf_counter() - t)
        steady = statistics.median(timings[10:]) * 1000
        print(f"policy evaluation, {label}: first {timings[0] * 1000:.1f} ms, steady median "
              f"{steady:.1f} ms (target < 50 ms: {'met' if steady < 50 else 'MISSED'})")
