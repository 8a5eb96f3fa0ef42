"""Issue 15 item 8: a QoS 1 message without a device time, redelivered by the broker (the DUP
flag), is the same reading again, not a second one at a second, made-up receive time.

Real Mosquitto, real bridge source, real writer and database: the collector receives a message,
its row is not committed yet (so no ack), the connection drops, the broker resends the message
with DUP set on the resumed session; one row is stored. A repeated payload without the DUP flag
is still a new reading."""

from __future__ import annotations

import json
import socket
import time
import uuid

import psycopg

from collector.pipeline import Pipeline
from collector.sources.bridge import BridgeSource
from collector.writer import Writer
from testbed.mosquitto import MosquittoServer
from tests.collector_support import publisher
from tests.test_cloud_sources import _fixture, wait_for

SN = "R351ZFB4HF000001"
TOPIC = f"bridge-ecoflow/{SN}/data"
NO_TIME = json.dumps(_fixture("delta2max_open_mqtt_1_pdStatus.json")).encode()  # no timestamp


def _count(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM ecoflow_measurements WHERE device_sn = %s",
                            (SN,)).fetchone()[0]


def test_a_redelivery_without_device_time_is_not_a_second_reading(db_url):
    with MosquittoServer() as broker:
        writer = Writer(db_url, flush_interval=0.1)
        pipeline = Pipeline(writer)
        source = BridgeSource(pipeline, broker.host, broker.port, ["bridge-ecoflow/+/data"],
                              f"redelivery-{uuid.uuid4().hex[:8]}")
        source.start()
        pub = publisher(broker.host, broker.port, f"pub-{uuid.uuid4().hex[:8]}")
        try:
            assert source.subscribed.wait(10)
            # The writer is not running yet: the row waits, so the message is not acked.
            pub.publish(TOPIC, NO_TIME, qos=1).wait_for_publish(5)
            assert wait_for(lambda: writer.pending, 20), "the message never reached the writer"
            generation = source._generation
            source.client.socket().shutdown(socket.SHUT_RDWR)  # the connection drops
            assert wait_for(lambda: source._generation > generation and
                            source.connected.is_set(), 20)
            assert wait_for(lambda: source.redeliveries.matched >= 1, 10), \
                "the broker did not redeliver with DUP"
            writer.start()
            assert wait_for(lambda: _count(db_url) >= 1, 10)
            time.sleep(1)
            assert _count(db_url) == 1, "a redelivery became a second reading"
            # The same payload again, not a redelivery: a new reading at its own time.
            time.sleep(0.01)
            pub.publish(TOPIC, NO_TIME, qos=1).wait_for_publish(5)
            assert wait_for(lambda: _count(db_url) == 2, 10)
        finally:
            pub.loop_stop()
            pub.disconnect()
            source.stop()
            writer.stop()
