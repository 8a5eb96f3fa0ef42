"""Several collectors on one MQTT v5 shared subscription: the broker hands each message to one
of them, and together they store every reading exactly once, through a crash of one of them."""

from __future__ import annotations

import signal
import threading
import time
import uuid

from collector.service import Collector
from collector.settings import CollectorSettings
from servicekit.settings import DatabaseSettings
from tests.collector_support import (
    collector_env,
    delta2_push,
    publish_all,
    publisher,
    start_collector_process,
    wait_rows,
)

STATIONS = [f"R351ZFB4HF{n:06d}" for n in range(8)]


def shared_topic() -> str:
    # A group of its own per test: the broker outlives the test, and so do its sessions.
    return f"$share/collectors-{uuid.uuid4().hex[:8]}/bridge-ecoflow/+/data"


def publish_readings(pub, first: int, count: int) -> None:
    """`count` readings per station, numbered from `first` (one second apart)."""
    for sn in STATIONS:
        publish_all(pub, f"bridge-ecoflow/{sn}/data",
                    [delta2_push(i) for i in range(first, first + count)])


def test_two_collectors_on_a_shared_subscription_store_each_reading_once(db_url, mqtt_broker,
                                                                         db):
    topic = shared_topic()
    collectors = []
    for n in range(2):
        settings = CollectorSettings(MQTT_HOST=mqtt_broker.host, MQTT_PORT=mqtt_broker.port,
                                     EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.2,
                                     PUBLISH_STATE=False, BRIDGE_TOPICS=topic,
                                     COLLECTOR_CLIENT_ID=f"shared-{uuid.uuid4().hex[:8]}-{n}")
        c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
        c.start()
        collectors.append(c)
    try:
        for c in collectors:
            assert c.sources[0].subscribed.wait(10)  # SUBACK: the broker has the subscription
        pub = publisher(mqtt_broker.host, mqtt_broker.port, "shared-publisher")
        publish_readings(pub, 0, 250)
        total = 250 * len(STATIONS)
        assert wait_rows(db_url, total) == total
        time.sleep(0.5)
        assert db.execute("SELECT count(*), count(DISTINCT (device_sn, ts))"
                          " FROM ecoflow_measurements").fetchone() == (total, total)
        written = [c.writer.rows_written for c in collectors]
        assert sum(written) == total and min(written) > 0  # both took a share
        assert [c.writer.rows_duplicate for c in collectors] == [0, 0]
        pub.disconnect()
    finally:
        for c in collectors:
            c.stop()


def test_a_collector_killed_on_a_shared_subscription_gets_its_share_back(db_url, mqtt_broker,
                                                                         db):
    # Mosquitto keeps handing a stopped member its share (queued in its session) rather than
    # passing it to the others: the share waits for that collector's return.
    topic = shared_topic()
    envs = [collector_env(db_url, mqtt_broker, BRIDGE_TOPICS=topic, PUBLISH_STATE="false",
                          COLLECTOR_CLIENT_ID=f"shared-kill-{uuid.uuid4().hex[:8]}-{n}")
            for n in range(2)]
    procs = [start_collector_process(env) for env in envs]
    pub = publisher(mqtt_broker.host, mqtt_broker.port, "shared-kill-publisher")
    try:
        for proc in procs:
            wait_connected(proc)
        publish_readings(pub, 0, 100)
        wait_rows(db_url, 100)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        publish_readings(pub, 100, 100)
        procs[1] = start_collector_process(envs[1])
        wait_connected(procs[1])
        total = 200 * len(STATIONS)
        assert wait_rows(db_url, total, timeout=40) == total
        time.sleep(0.5)
        assert db.execute("SELECT count(*), count(DISTINCT (device_sn, ts))"
                          " FROM ecoflow_measurements").fetchone() == (total, total)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
        pub.disconnect()


def wait_connected(proc, timeout: float = 30.0) -> None:
    """Until the collector process logs its bridge connection (it subscribes just before)."""
    connected = threading.Event()

    def read() -> None:  # and keep reading, so the pipe never fills
        for line in proc.stdout:
            if "bridge source: connected" in line:
                connected.set()

    threading.Thread(target=read, daemon=True).start()
    assert connected.wait(timeout), "the collector did not connect to the broker"
    time.sleep(0.3)
