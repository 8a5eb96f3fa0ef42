"""End to end with real Mosquitto and TimescaleDB: payloads on the broker become rows, exactly
once each, through redeliveries, crashes and outages."""

from __future__ import annotations

import json
import signal
import time

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.service import Collector
from collector.settings import CollectorSettings
from servicekit.mqtt import (
    RECV_CHUNK,
    FastReceiveClient,
    fast_path_available,
)
from servicekit.settings import DatabaseSettings
from testbed.mosquitto import MosquittoServer
from tests.collector_support import (
    SN,
    T0_MS,
    collector_env,
    delta2_push,
    publish_all,
    publisher,
    redelivered,
    start_collector_process,
    wait_rows,
    wait_until_subscribed,
)

TOPIC = f"bridge-ecoflow/{SN}/data"


@pytest.fixture
def collector(db_url, mqtt_broker, request):
    settings = CollectorSettings(MQTT_HOST=mqtt_broker.host, MQTT_PORT=mqtt_broker.port,
                                 EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.2,
                                 COLLECTOR_CLIENT_ID=f"collector-{request.node.name[:40]}")
    c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
    c.start()
    assert c.sources[0].subscribed.wait(5)
    yield c
    c.stop()


def test_published_payloads_become_rows_with_their_values(collector, mqtt_broker, db_url, db):
    pub = publisher(mqtt_broker.host, mqtt_broker.port)
    publish_all(pub, TOPIC, [delta2_push(i, soc=80 - i, watts_out=100 + i) for i in range(20)])
    assert wait_rows(db_url, 20) == 20
    rows = db.execute("SELECT soc_percent, watts_out_sum, source, raw_data->>'id'"
                      " FROM ecoflow_measurements ORDER BY ts").fetchall()
    assert rows == [(80 - i, 100 + i, "bridge", str(i)) for i in range(20)]
    assert db.execute("SELECT model FROM devices WHERE device_sn = %s", (SN,)).fetchone() == (
        "Delta 2 Max",)
    pub.disconnect()


def test_redelivered_messages_store_no_duplicates(collector, mqtt_broker, db_url, db):
    pub = publisher(mqtt_broker.host, mqtt_broker.port)
    payloads = [delta2_push(i) for i in range(10)]
    publish_all(pub, TOPIC, payloads)
    publish_all(pub, TOPIC, payloads)
    wait_rows(db_url, 10)
    time.sleep(0.6)
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (10,)
    assert collector.writer.rows_duplicate == 10
    pub.disconnect()


def test_undecodable_payloads_go_to_ingest_errors_and_the_collector_carries_on(
        collector, mqtt_broker, db_url, db):
    pub = publisher(mqtt_broker.host, mqtt_broker.port)
    publish_all(pub, TOPIC, [b"\xff\xfe not a payload", b"{\"json\": \"but unknown\"}"])
    publish_all(pub, TOPIC, [delta2_push(1)])
    assert wait_rows(db_url, 2, table="ingest_errors") == 2
    assert wait_rows(db_url, 1) == 1
    payloads = {r[0] for r in db.execute("SELECT payload FROM ingest_errors").fetchall()}
    assert b"\xff\xfe not a payload" in payloads
    pub.disconnect()


def state_subscriber(broker, sn: str) -> tuple[mqtt.Client, list[dict]]:
    """A client collecting the normalized states published for `sn` (subscribed and settled)."""
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    states: list[dict] = []
    sub.on_message = lambda _c, _u, m: states.append(json.loads(m.payload))
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"bridge-ecoflow/{sn}/json/state", qos=1)
    sub.loop_start()
    time.sleep(0.3)
    return sub, states


def test_partial_messages_publish_a_complete_normalized_state(collector, mqtt_broker, db_url):
    sn = "R351ZFB4HF999999"  # states are retained: a serial of its own keeps earlier tests out
    sub, states = state_subscriber(mqtt_broker, sn)
    pub = publisher(mqtt_broker.host, mqtt_broker.port)
    topic = f"bridge-ecoflow/{sn}/data"
    publish_all(pub, topic, [delta2_push(0, soc=70)])
    publish_all(pub, topic, [json.dumps({"id": 9, "timestamp": 1767225605000,
                                         "params": {"pd.wattsOutSum": 250}}).encode()])
    deadline = time.monotonic() + 5
    while len(states) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert states[-1]["soc"] == 70 and states[-1]["watts_out"] == 250
    assert states[-1]["soc_min"] == 70 and states[-1]["device"] == sn
    for c in (pub, sub):
        c.disconnect()


def test_a_burst_of_readings_publishes_few_states_ending_at_the_newest(collector, mqtt_broker,
                                                                        db_url):
    sn = "R351ZFB4HF888888"  # retained states: a serial of its own
    sub, states = state_subscriber(mqtt_broker, sn)
    pub = publisher(mqtt_broker.host, mqtt_broker.port)
    started = time.monotonic()
    publish_all(pub, f"bridge-ecoflow/{sn}/data",
                [delta2_push(i, soc=20 + i * 0.25) for i in range(300)])
    assert wait_rows(db_url, 300) == 300
    time.sleep(collector.settings.state_interval_sec + 0.5)
    elapsed = time.monotonic() - started
    for c in (pub, sub):
        c.disconnect()
    # One state per device per second at most (plus the first), not one per reading...
    assert 1 <= len(states) <= elapsed / collector.settings.state_interval_sec + 2
    # ...and the retained topic ends at the newest reading.
    assert states[-1]["soc"] == pytest.approx(20 + 299 * 0.25)
    assert states[-1]["ts"] == json.loads(delta2_push(299))["timestamp"]


def test_batches_fill_without_waiting_for_the_flush_interval(db_url, mqtt_broker, db):
    # The broker's window of unacknowledged messages must hold more than a batch: at 1000
    # (the old fixed window) a batch of 1500 never formed and every write waited a minute.
    settings = CollectorSettings(MQTT_HOST=mqtt_broker.host, MQTT_PORT=mqtt_broker.port,
                                 EXPORTER_PORT=0, BATCH_ROWS=1500, FLUSH_INTERVAL_SEC=60,
                                 PUBLISH_STATE=False, COLLECTOR_CLIENT_ID="collector-window-test")
    c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
    c.start()
    try:
        assert c.sources[0].subscribed.wait(5)
        pub = publisher(mqtt_broker.host, mqtt_broker.port, "window-publisher")
        publish_all(pub, TOPIC, [delta2_push(i) for i in range(3000)])
        # Full batches are written at once; only the last, partial one waits for the interval.
        assert wait_rows(db_url, 1500, timeout=20) >= 1500
        pub.disconnect()
    finally:
        c.stop()


def test_committed_messages_are_acknowledged_and_not_delivered_again(db_url, mqtt_broker):
    client_id = "collector-ack-test"
    settings = CollectorSettings(MQTT_HOST=mqtt_broker.host, MQTT_PORT=mqtt_broker.port,
                                 EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.2, PUBLISH_STATE=False,
                                 COLLECTOR_CLIENT_ID=client_id)
    c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
    c.start()
    assert c.sources[0].subscribed.wait(5)
    pub = publisher(mqtt_broker.host, mqtt_broker.port, "ack-publisher")
    publish_all(pub, TOPIC, [delta2_push(i) for i in range(2500)])
    assert wait_rows(db_url, 2500) == 2500
    pub.disconnect()
    c.stop()
    # The same session, resumed: a message left unacknowledged would be delivered again.
    assert redelivered(mqtt_broker, client_id) == []


def test_a_payload_larger_than_one_socket_read_arrives_whole(collector, mqtt_broker, db_url, db):
    big = json.dumps({"id": 1, "timestamp": T0_MS + 1000, "params": {
        "bms_emsStatus.f32LcdShowSoc": 77, "pd.note": "x" * 3 * RECV_CHUNK}}).encode()
    pub = publisher(mqtt_broker.host, mqtt_broker.port)
    publish_all(pub, TOPIC, [delta2_push(0), big, delta2_push(2)])
    assert wait_rows(db_url, 3) == 3
    assert db.execute("SELECT soc_percent, length(raw_data->'params'->>'pd.note')"
                      " FROM ecoflow_measurements WHERE raw_data->>'id' = '1'").fetchone() == (
        77, 3 * RECV_CHUNK)
    pub.disconnect()


def test_the_bridge_reads_with_the_fast_receive_path(collector):
    # FastReceiveClient builds on paho internals; if an upgrade removes them it falls back to
    # paho's slower path, and this test says so.
    client = collector.sources[0].client
    assert isinstance(client, FastReceiveClient)
    assert fast_path_available() and client._fast


def test_collector_killed_mid_stream_loses_nothing(db_url, mqtt_broker, db):
    env = collector_env(db_url, mqtt_broker, COLLECTOR_CLIENT_ID="collector-kill-test")
    proc = start_collector_process(env)
    pub = publisher(mqtt_broker.host, mqtt_broker.port, "kill-test-publisher")
    try:
        wait_until_subscribed(db_url, pub)
        publish_all(pub, TOPIC, [delta2_push(i) for i in range(300)])
        assert wait_rows(db_url, 50, device_sn=SN) >= 50
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        publish_all(pub, TOPIC, [delta2_push(i) for i in range(300, 600)])
        proc = start_collector_process(env)
        assert wait_rows(db_url, 600, timeout=30, device_sn=SN) == 600
        time.sleep(0.5)
        assert db.execute("SELECT count(DISTINCT ts), count(*) FROM ecoflow_measurements"
                          " WHERE device_sn = %s", (SN,)).fetchone() == (600, 600)
    finally:
        proc.kill()
        proc.wait(10)
        pub.disconnect()


def test_database_stopped_while_publishing_continues_loses_nothing():
    from servicekit.migrate import upgrade
    from testbed.postgres import PostgresServer
    from tests.services import DatabaseServer

    with PostgresServer() as pg, MosquittoServer() as broker:
        ds = DatabaseServer(pg.url(), pg.timescaledb, "native")
        ds.create_database("c")
        upgrade(ds.settings("c"))
        settings = CollectorSettings(MQTT_HOST=broker.host, MQTT_PORT=broker.port,
                                     EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.2)
        c = Collector(settings, DatabaseSettings(DATABASE_URL=ds.url("c")))
        c.writer.retry_max_sec = 0.5
        c.start()
        assert c.sources[0].subscribed.wait(5)
        pub = publisher(broker.host, broker.port)
        publish_all(pub, TOPIC, [delta2_push(i) for i in range(100)])
        wait_rows(ds.url("c"), 100)
        pg.halt()
        # Publishing goes on through a 30-second outage; the buffer and the broker hold it all.
        for k in range(10):
            publish_all(pub, TOPIC, [delta2_push(i) for i in range(100 + 30 * k, 130 + 30 * k)])
            time.sleep(3)
        pg.start()
        assert wait_rows(ds.url("c"), 400, timeout=30) == 400
        c.stop()
        pub.disconnect()


def test_broker_restart_is_survived(db_url, db):
    with MosquittoServer(persistence=True) as broker:
        settings = CollectorSettings(MQTT_HOST=broker.host, MQTT_PORT=broker.port,
                                     EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.2)
        c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
        c.start()
        assert c.sources[0].subscribed.wait(5)
        pub = publisher(broker.host, broker.port)
        publish_all(pub, TOPIC, [delta2_push(i) for i in range(50)])
        wait_rows(db_url, 50)
        pub.disconnect()
        broker.halt()
        time.sleep(0.5)
        broker.start()
        assert c.sources[0].subscribed.wait(40)
        pub = publisher(broker.host, broker.port)
        publish_all(pub, TOPIC, [delta2_push(i) for i in range(50, 100)])
        assert wait_rows(db_url, 100) == 100
        c.stop()
        pub.disconnect()
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (100,)


def test_metrics_endpoint_exposes_device_gauges_and_health(db_url, mqtt_broker):
    import urllib.request

    from testbed.ports import free_port

    port = free_port()
    settings = CollectorSettings(MQTT_HOST=mqtt_broker.host, MQTT_PORT=mqtt_broker.port,
                                 EXPORTER_PORT=port, FLUSH_INTERVAL_SEC=0.2,
                                 COLLECTOR_CLIENT_ID="collector-metrics-test")
    c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
    c.start()
    try:
        assert c.sources[0].subscribed.wait(5)
        pub = publisher(mqtt_broker.host, mqtt_broker.port, "metrics-publisher")
        publish_all(pub, TOPIC, [delta2_push(i, soc=66, watts_out=120) for i in range(3)])
        publish_all(pub, TOPIC, [b"garbage"])
        wait_rows(db_url, 3)
        c.metrics.refresh()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        pub.disconnect()
    finally:
        c.stop()
    assert f'ecoflow_soc_percent{{device="{SN}"}} 66.0' in body
    assert f'ecoflow_output_watts{{device="{SN}"}} 120.0' in body
    assert 'ecoflow_collector_messages_failed_total{source="bridge"} 1.0' in body
    assert "ecoflow_collector_rows_written_total 3.0" in body
    assert f'ecoflow_seconds_since_last_reading{{device="{SN}"}}' in body
    # Never reported: no sample at all, rather than a 0 an alert would read as a flat battery.
    assert f'ecoflow_battery_temp_celsius{{device="{SN}"}}' not in body
    assert f'ecoflow_grid_connected{{device="{SN}"}}' not in body


def test_collector_command_decodes_a_payload_file(tmp_path):
    import subprocess
    import sys

    from tests.collector_support import REPO

    f = tmp_path / "push.json"
    f.write_bytes(delta2_push(3, soc=42.5, watts_out=77))
    out = subprocess.run([sys.executable, "-m", "collector", "decode", "--topic", TOPIC, str(f)],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    [reading] = json.loads(out.stdout)
    assert reading["device_sn"] == SN
    assert reading["values"]["soc_percent"] == 42.5 and reading["values"]["watts_out_sum"] == 77


def test_bad_collector_setting_stops_start_up_naming_the_variable(db_url, mqtt_broker):
    import subprocess
    import sys

    from tests.collector_support import REPO

    env = collector_env(db_url, mqtt_broker, COLLECTOR_SOURCES="bridge,carrier-pigeon")
    out = subprocess.run([sys.executable, "-m", "collector"], env=env, capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode != 0
    assert "COLLECTOR_SOURCES" in out.stderr and "carrier-pigeon" in out.stderr
    assert "Traceback" not in out.stderr
