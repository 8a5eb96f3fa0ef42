"""The broker's ACL (compose/mosquitto/acl) on a real Mosquitto: who may command whom."""

from __future__ import annotations

import queue
import uuid

import paho.mqtt.client as mqtt
import pytest

WAIT = 1.0


class Client:
    def __init__(self, broker, user: str, tls: bool = False):
        self.messages: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"acl-{user}-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(*broker.credentials(user))
        if tls:
            self.client.tls_set(ca_certs=str(broker.ca_file))
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        connected: queue.Queue = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: connected.put(rc)
        self.client.connect(broker.host, broker.tls_port if tls else broker.port)
        self.client.loop_start()
        self.connect_result = connected.get(timeout=5)

    def subscribe(self, topic: str) -> None:
        done: queue.Queue = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: done.put(rcs)
        self.client.subscribe(topic, qos=1)
        done.get(timeout=5)

    def publish(self, topic: str, payload: bytes = b"{}") -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def received(self, timeout: float = WAIT) -> list[tuple[str, bytes]]:
        items = []
        try:
            items.append(self.messages.get(timeout=timeout))
            while True:
                items.append(self.messages.get_nowait())
        except queue.Empty:
            return items

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def clients(secure_mqtt_broker):
    made = []

    def make(user: str, tls: bool = False) -> Client:
        made.append(Client(secure_mqtt_broker, user, tls))
        return made[-1]

    yield make
    for client in made:
        client.close()


def test_agent_cannot_publish_a_command_to_itself_or_another_agent(clients):
    nas, pc = clients("nas-01"), clients("pc-01")
    nas.subscribe("power-manager/nas-01/cmd")
    pc.subscribe("power-manager/pc-01/cmd")
    nas.publish("power-manager/nas-01/cmd", b"from nas-01")
    nas.publish("power-manager/pc-01/cmd", b"from nas-01")
    pc.publish("power-manager/nas-01/cmd", b"from pc-01")
    assert nas.received() == [] and pc.received(0.1) == []


def test_policy_user_can_publish_commands_to_agents(clients):
    nas, pc, policy = clients("nas-01"), clients("pc-01"), clients("policy")
    nas.subscribe("power-manager/nas-01/cmd")
    pc.subscribe("power-manager/pc-01/cmd")
    policy.publish("power-manager/nas-01/cmd", b"for nas")
    policy.publish("power-manager/pc-01/cmd", b"for pc")
    assert nas.received() == [("power-manager/nas-01/cmd", b"for nas")]
    assert pc.received() == [("power-manager/pc-01/cmd", b"for pc")]


def test_agent_cannot_read_another_agents_commands(clients):
    nas, policy = clients("nas-01"), clients("policy")
    nas.subscribe("power-manager/pc-01/cmd")
    nas.subscribe("power-manager/+/cmd")
    policy.publish("power-manager/pc-01/cmd", b"for pc only")
    assert nas.received() == []


def test_agent_acks_and_status_reach_the_policy_but_not_other_agents(clients):
    policy, pc, nas = clients("policy"), clients("pc-01"), clients("nas-01")
    policy.subscribe("power-manager/+/ack")
    pc.subscribe("power-manager/nas-01/ack")
    nas.publish("power-manager/nas-01/ack", b"ack")
    nas.publish("power-manager/pc-01/ack", b"forged ack")
    assert policy.received() == [("power-manager/nas-01/ack", b"ack")]
    assert pc.received(0.1) == []


def test_collector_writes_only_normalized_state(clients):
    policy, collector = clients("policy"), clients("collector")
    policy.subscribe("bridge-ecoflow/#")
    policy.subscribe("power-manager/+/ack")
    collector.publish("bridge-ecoflow/SN1/json/state", b"state")
    collector.publish("power-manager/nas-01/cmd", b"not allowed")
    collector.publish("power-manager/nas-01/ack", b"not allowed")
    assert policy.received() == [("bridge-ecoflow/SN1/json/state", b"state")]


def test_tls_listener_accepts_a_client_that_trusts_the_ca(clients):
    nas, policy = clients("nas-01", tls=True), clients("policy", tls=True)
    assert nas.connect_result == 0
    nas.subscribe("power-manager/nas-01/cmd")
    policy.publish("power-manager/nas-01/cmd", b"over tls")
    assert nas.received() == [("power-manager/nas-01/cmd", b"over tls")]


def test_anonymous_clients_are_refused(secure_mqtt_broker):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    result: queue.Queue = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: result.put(rc)
    client.connect(secure_mqtt_broker.host, secure_mqtt_broker.port)
    client.loop_start()
    try:
        assert result.get(timeout=5).is_failure
    finally:
        client.loop_stop()
