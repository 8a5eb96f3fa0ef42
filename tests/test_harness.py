"""The test services are real: Mosquitto speaks MQTT v5, the secure broker enforces users,
ACL and TLS, and servers started by fixtures go away when stopped."""

from __future__ import annotations

import queue
import socket
import ssl
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from testbed.mosquitto import MosquittoServer
from testbed.postgres import PostgresServer


def client(host, port, user=None, password=None, ca_file=None) -> tuple[mqtt.Client, queue.Queue]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if user:
        c.username_pw_set(user, password)
    if ca_file:
        c.tls_set(ca_certs=str(ca_file), cert_reqs=ssl.CERT_REQUIRED)
    messages: queue.Queue = queue.Queue()
    connected: queue.Queue = queue.Queue()
    c.on_message = lambda _c, _u, msg: messages.put(msg)
    c.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason)
    c.connect(host, port)
    c.loop_start()
    reason = connected.get(timeout=10)
    if reason.is_failure:
        c.loop_stop()
        raise ConnectionRefusedError(str(reason))
    return c, messages


def roundtrip(pub: mqtt.Client, sub: mqtt.Client, inbox: queue.Queue, topic: str) -> bytes | None:
    sub.subscribe(topic, qos=1)
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 60
    pub.publish(topic, b"hello", qos=1, properties=props).wait_for_publish(5)
    try:
        return inbox.get(timeout=2).payload
    except queue.Empty:
        return None


def test_plain_broker_delivers_mqtt5_messages_with_expiry(mqtt_broker):
    pub, _ = client(mqtt_broker.host, mqtt_broker.port)
    sub, inbox = client(mqtt_broker.host, mqtt_broker.port)
    sub.subscribe("t/1", qos=1)
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 60
    time.sleep(0.2)
    pub.publish("t/1", b"x", qos=1, properties=props).wait_for_publish(5)
    msg = inbox.get(timeout=5)
    assert msg.payload == b"x"
    assert 0 < msg.properties.MessageExpiryInterval <= 60
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()


def test_secure_broker_refuses_anonymous_and_wrong_passwords(secure_mqtt_broker):
    b = secure_mqtt_broker
    with pytest.raises(ConnectionRefusedError):
        client(b.host, b.port)
    with pytest.raises(ConnectionRefusedError):
        client(b.host, b.port, "policy", "wrong")


def test_secure_broker_tls_listener_verifies_with_the_session_ca(secure_mqtt_broker):
    b = secure_mqtt_broker
    c, _ = client(b.host, b.tls_port, *b.credentials("policy"), ca_file=b.ca_file)
    c.loop_stop()
    c.disconnect()
    with pytest.raises(ssl.SSLCertVerificationError):
        client(b.host, b.tls_port, *b.credentials("policy"), ca_file=ssl.get_default_verify_paths().cafile)


def test_secure_broker_applies_the_projects_acl(secure_mqtt_broker):
    b = secure_mqtt_broker
    policy, _ = client(b.host, b.port, *b.credentials("policy"))
    agent, inbox = client(b.host, b.port, *b.credentials("nas-01"))
    agent.subscribe("power-manager/nas-01/cmd", qos=1)
    time.sleep(0.2)
    assert roundtrip(policy, agent, inbox, "power-manager/nas-01/cmd") == b"hello"
    # An agent cannot send itself a command.
    assert roundtrip(agent, agent, inbox, "power-manager/nas-01/cmd") is None
    for c in (policy, agent):
        c.loop_stop()
        c.disconnect()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stopped_servers_leave_nothing_behind():
    pg = PostgresServer(timescaledb=False).start()
    broker = MosquittoServer().start()
    assert _listening(pg.port) and _listening(broker.port)
    pg.stop()
    broker.stop()
    assert not _listening(pg.port) and not _listening(broker.port)
    assert not pg.base.exists() and not broker.base.exists()
