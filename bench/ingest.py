"""Ingest benchmark: readings/s from the broker into TimescaleDB through the collector, next to
one INSERT and commit per row (how the earlier tools write) and one raw COPY (the ceiling)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion
from psycopg.types.json import Jsonb

from bench.common import migrated_database, save, table
from collector.decoders import decode
from testbed.mosquitto import MosquittoServer

REPO = Path(__file__).resolve().parent.parent
DEVICES = 20
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def payloads(n: int) -> list[tuple[str, bytes]]:
    """n Delta 2 pushes spread over DEVICES stations, one reading per station every second."""
    out = []
    for i in range(n):
        sn, k = f"R351BENCH{i % DEVICES:06d}", i // DEVICES
        body = {"id": i, "version": "1.0",
                "timestamp": int((T0 + timedelta(seconds=k)).timestamp() * 1000),
                "params": {"bms_emsStatus.f32LcdShowSoc": 50 + (k % 50) / 2,
                           "pd.wattsOutSum": 100 + k % 200, "pd.wattsInSum": 0,
                           "inv.inputWatts": 0, "inv.acInVol": 230000}}
        out.append((f"bridge-ecoflow/{sn}/data", json.dumps(body).encode()))
    return out


def decoded_rows(items: list[tuple[str, bytes]]) -> list[tuple]:
    rows = []
    for topic, body in items:
        [r] = decode(body, topic=topic)
        v = r.values
        rows.append((r.ts, r.device_sn, v.get("soc_percent"), v.get("soc_min_percent"),
                     v.get("watts_in_sum"), v.get("watts_out_sum"), v.get("grid_connected"),
                     "bridge", Jsonb(r.raw)))
    return rows


COLS = ("ts, device_sn, soc_percent, soc_min_percent, watts_in_sum, watts_out_sum,"
        " grid_connected, source, raw_data")


def one_insert_per_row(url: str, rows: list[tuple]) -> float:
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE ecoflow_measurements")
        conn.commit()
        start = time.perf_counter()
        for row in rows:
            conn.execute(f"INSERT INTO ecoflow_measurements ({COLS}) VALUES"
                         " (%s, %s, %s, %s, %s, %s, %s, %s, %s)", row)
            conn.commit()
        return len(rows) / (time.perf_counter() - start)


def raw_copy(url: str, rows: list[tuple]) -> float:
    with psycopg.connect(url) as conn:
        conn.execute("TRUNCATE ecoflow_measurements")
        conn.commit()
        start = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY ecoflow_measurements ({COLS}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
        conn.commit()
        return len(rows) / (time.perf_counter() - start)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def end_to_end(url: str, broker: MosquittoServer, items: list[tuple[str, bytes]]) -> tuple[float, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE ecoflow_measurements")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MQTT_"))}
    env.update(DATABASE_URL=url, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               EXPORTER_PORT="0", PUBLISH_STATE="false", BATCH_ROWS="5000", LOG_LEVEL="WARNING",
               COLLECTOR_CLIENT_ID="bench-collector")
    proc = subprocess.Popen([sys.executable, "-m", "collector"], env=env, cwd=REPO)
    try:
        time.sleep(2.0)  # connected and subscribed
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher",
                          protocol=mqtt.MQTTv5)
        pub.max_inflight_messages_set(1000)
        pub.max_queued_messages_set(0)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        start = time.perf_counter()
        # In chunks, so the publisher's own queue stays bounded.
        for first in range(0, len(items), 5000):
            infos = [pub.publish(topic, body, qos=1) for topic, body in items[first:first + 5000]]
            infos[-1].wait_for_publish(300)
        n = 0
        with psycopg.connect(url, autocommit=True) as conn:
            while n < len(items) and time.perf_counter() - start < 600:
                n = conn.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0]
                time.sleep(0.05)
        elapsed = time.perf_counter() - start
        rss = peak_rss_mb(proc.pid)
        pub.disconnect()
        if n < len(items):
            raise SystemExit(f"only {n} of {len(items)} readings arrived")
        return len(items) / elapsed, rss
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=200_000, help="readings (default 200000)")
    parser.add_argument("--insert-sample", type=int, default=20_000,
                        help="rows for the one-INSERT-per-row baseline (its rate is measured on"
                             " a sample: at its speed the full set would take many minutes)")
    args = parser.parse_args(argv)
    items = payloads(args.n)
    rows = decoded_rows(items)
    with migrated_database("ingest") as (_pg, url), MosquittoServer() as broker:
        per_row = one_insert_per_row(url, rows[: args.insert_sample])
        copy_rate = raw_copy(url, rows)
        e2e_rate, rss = end_to_end(url, broker, items)
    figures = {
        "readings": args.n,
        "end_to_end_readings_per_sec": round(e2e_rate),
        "one_insert_per_row_per_sec": round(per_row),
        "raw_copy_per_sec": round(copy_rate),
        "vs_insert_per_row": round(e2e_rate / per_row, 1),
        "vs_raw_copy": round(e2e_rate / copy_rate, 2),
        "collector_peak_rss_mb": round(rss, 1),
        "targets": {"vs_insert_per_row": ">= 10", "vs_raw_copy": ">= 0.5",
                    "collector_peak_rss_mb": "< 150"},
    }
    print(f"\nIngest: {args.n} readings from {DEVICES} stations\n")
    print(table([
        ("collector, broker -> TimescaleDB", f"{figures['end_to_end_readings_per_sec']:,}", "",
         f"{figures['collector_peak_rss_mb']} MB peak RSS"),
        ("one INSERT + commit per row", f"{figures['one_insert_per_row_per_sec']:,}",
         f"{figures['vs_insert_per_row']}x (target >= 10x)", ""),
        ("one raw COPY (ceiling)", f"{figures['raw_copy_per_sec']:,}",
         f"{figures['vs_raw_copy']}x (target >= 0.5x)", ""),
    ], ("path", "readings/s", "collector vs this", "")))
    save("ingest", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
