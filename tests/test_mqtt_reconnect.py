"""The services' MQTT clients come back within seconds of the broker: a real Mosquitto stopped
for 15 s and started again."""

from __future__ import annotations

import threading
import time
import uuid

from servicekit.mqtt import make_client
from testbed.mosquitto import MosquittoServer


def test_client_reconnects_within_seconds_after_a_15_s_broker_outage():
    """After a 15 s broker outage the collector reconnected 16 s after the broker was back:
    paho's back-off had doubled to 16 s (of at most 30) while the broker was away."""
    with MosquittoServer() as broker:
        connected = threading.Event()
        client = make_client(f"reconnect-{uuid.uuid4().hex[:8]}")
        client.on_connect = lambda *a: connected.set()
        client.on_disconnect = lambda *a: connected.clear()
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            assert connected.wait(5)
            broker.halt()
            deadline = time.monotonic() + 5
            while connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not connected.is_set()
            time.sleep(15)
            broker.start()
            back = time.monotonic()
            assert connected.wait(40)
            late = time.monotonic() - back
        finally:
            client.loop_stop()
            client.disconnect()
    assert late < 6, f"reconnected {late:.1f} s after the broker came back"


def test_policy_link_warns_of_a_lost_connection_but_not_of_its_own_stop(caplog):
    """The policy worker's link logged "MQTT disconnected ...; reconnecting" as a warning when
    the worker itself stopped it (a normal disconnection, nothing to reconnect); a broker that
    goes away is still a warning."""
    import logging

    from policy.mqttlink import MqttLink, log

    def warnings():
        return [r.getMessage() for r in caplog.records
                if r.name == log.name and r.levelno >= logging.WARNING]

    with MosquittoServer() as broker:
        caplog.set_level(logging.INFO, logger=log.name)
        link = MqttLink(broker.host, broker.port, f"link-{uuid.uuid4().hex[:8]}")
        link.start()
        assert link.connected.is_set()
        link.stop()
        assert not warnings(), "a stop the worker asked for is not a lost connection"
        assert any("disconnected" in r.getMessage() for r in caplog.records
                   if r.name == log.name)

        link = MqttLink(broker.host, broker.port, f"link-{uuid.uuid4().hex[:8]}")
        link.start()
        try:
            broker.halt()
            deadline = time.monotonic() + 5
            while link.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert any("reconnecting" in w for w in warnings())
        finally:
            link.stop()
