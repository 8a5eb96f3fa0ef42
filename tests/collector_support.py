"""Helpers for collector tests: build device payloads, publish them, wait for rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
SN = "R351ZFB4HF123456"
T0_MS = 1767225600000


def delta2_push(i: int, soc: float | None = None, watts_out: int | None = None) -> bytes:
    """An app-MQTT style Delta 2 Max push, numbered i (one second apart)."""
    params = {"bms_emsStatus.f32LcdShowSoc": soc if soc is not None else 90 - (i % 50) * 0.5}
    if watts_out is not None:
        params["pd.wattsOutSum"] = watts_out
    return json.dumps({"id": i, "version": "1.0", "timestamp": T0_MS + i * 1000,
                       "params": params}).encode()


def publisher(host: str, port: int, client_id: str = "test-publisher") -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(host, port)
    c.loop_start()
    return c


def publish_all(client: mqtt.Client, topic: str, payloads: list[bytes]) -> None:
    infos = [client.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(10)


def wait_rows(url: str, count: int, timeout: float = 20.0, table: str = "ecoflow_measurements",
              device_sn: str | None = None):
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            n = conn.execute(f"SELECT count(*) FROM {table}"
                             " WHERE %(sn)s::text IS NULL OR device_sn = %(sn)s",
                             {"sn": device_sn}).fetchone()[0]
            if n >= count or time.monotonic() > deadline:
                return n
            time.sleep(0.1)


def collector_env(db_url: str, broker, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POSTGRES_", "MQTT_", "COLLECTOR_"))}
    env.update(DATABASE_URL=db_url, MQTT_HOST=broker.host, MQTT_PORT=str(broker.port),
               EXPORTER_PORT="0", FLUSH_INTERVAL_SEC="0.2", LOG_LEVEL="INFO", **extra)
    return env


def start_collector_process(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "collector"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def redelivered(broker, client_id: str, wait: float = 1.5) -> list[bytes]:
    """What the broker hands `client_id`'s persistent session when it resumes: a message the
    collector left unacknowledged would come again."""
    from servicekit.mqtt import make_client, persistent_session

    again: list[bytes] = []
    client = make_client(client_id)
    client.on_message = lambda _c, _u, msg: again.append(msg.payload)
    client.connect(broker.host, broker.port, clean_start=False, properties=persistent_session())
    client.loop_start()
    time.sleep(wait)
    client.disconnect()
    client.loop_stop()
    return again


PROBE_SN = "R351ZFB4HFPROBE1"


def wait_until_subscribed(url: str, client: mqtt.Client, timeout: float = 30.0) -> None:
    """Publish readings of another station (PROBE_SN) until one is stored: the collector has
    subscribed and writes. A message sent before its subscription reaches nobody, and a
    collector process can take seconds to get there on a loaded machine."""
    deadline = time.monotonic() + timeout
    i = 0
    while time.monotonic() < deadline:
        client.publish(f"bridge-ecoflow/{PROBE_SN}/data", delta2_push(100_000 + i),
                       qos=1).wait_for_publish(5)
        i += 1
        if wait_rows(url, 1, timeout=1.0, device_sn=PROBE_SN):
            return
    raise AssertionError(f"the collector stored nothing from {PROBE_SN} in {timeout:.0f} s")
