"""Bridge source: subscribe to raw device payloads on any MQTT broker.

At-least-once: QoS 1, a fixed client id, a persistent session, and manual acks sent only
after the rows a message produced are committed. Messages not yet acked when the collector
dies are redelivered by the broker; the table's uniqueness makes the redelivery harmless.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque

import paho.mqtt.client as mqtt

from collector.pipeline import Pipeline
from servicekit.mqtt import make_client, persistent_session

log = logging.getLogger(__name__)


def receive_window(batch_rows: int) -> int:
    """Unacknowledged messages the broker may send us: two batches, so one fills while the
    previous one is written. At one batch or less, a full batch could never form and every
    write would wait for the flush interval."""
    return max(1000, 2 * batch_rows)


class BridgeSource:
    name = "bridge"

    def __init__(self, pipeline: Pipeline, host: str, port: int, topics: list[str],
                 client_id: str, user: str | None = None, password: str | None = None,
                 tls_ca: str | None = None, source_label: str = "bridge"):
        self.pipeline = pipeline
        self.host, self.port = host, port
        self.topics = topics
        self.source_label = source_label
        self.client = make_client(client_id, user, password, tls_ca, manual_ack=True,
                                  fast_receive=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        # Message ids restart with every connection: an ack that arrives after a reconnect
        # would hit another message, so it is dropped (the broker redelivers the original).
        self._generation = 0
        # (connection generation, message id) of committed messages, acknowledged together
        # once the writer has run a batch's callbacks.
        self._committed: deque[tuple[int, int]] = deque()
        pipeline.writer.after_acks(self._send_acks)

    def start(self) -> None:
        log.info("bridge source: connecting to %s:%d, topics %s", self.host, self.port,
                 ", ".join(self.topics))
        window = receive_window(self.pipeline.writer.batch_rows)
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False,
                                  properties=persistent_session(window))
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish_state(self, topic: str, state: dict) -> None:
        self.client.publish(topic, json.dumps(state, separators=(",", ":")), qos=0, retain=True)

    def _on_connect(self, client, _userdata, _flags, reason, _props) -> None:
        if reason.is_failure:
            log.error("bridge source: broker refused the connection: %s", reason)
            return
        self._generation += 1
        client.subscribe([(t, 1) for t in self.topics])
        self.connected.set()
        log.info("bridge source: connected to %s:%d", self.host, self.port)

    def _on_disconnect(self, _client, _userdata, _flags, reason, _props) -> None:
        self.connected.clear()
        if reason.value != 0:
            log.warning("bridge source: disconnected (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, _userdata, msg: mqtt.MQTTMessage) -> None:
        label = self.source_label if msg.properties is None else _label(msg, self.source_label)
        if msg.qos != 1:
            hand_over(self, client, msg, label)
            return
        self.pipeline.handle(msg.payload, msg.topic, label,
                             on_commit=_Committed(self._committed, self._generation, msg.mid))

    def _send_acks(self) -> None:
        """Acknowledge every message committed so far that came on the current connection."""
        committed, generation, mids = self._committed, self._generation, []
        while committed:
            gen, mid = committed.popleft()
            if gen == generation:
                mids.append(mid)
        if mids and self.connected.is_set() and generation == self._generation:
            self.client.ack_many(mids)


def hand_over(source, client: mqtt.Client, msg: mqtt.MQTTMessage, label: str) -> int:
    """Give one message to `source.pipeline`, acking it once its rows are committed.

    `source` has `pipeline`, `connected` (an Event) and `_generation` (bumped on every
    connect): an ack from an earlier connection would hit another message, so it is dropped
    and the broker redelivers the original.
    """
    mid, qos, generation = msg.mid, msg.qos, source._generation

    def ack() -> None:
        if qos > 0 and generation == source._generation and source.connected.is_set():
            client.ack(mid, qos)

    return source.pipeline.handle(msg.payload, msg.topic, label, on_commit=ack)


def _label(msg: mqtt.MQTTMessage, default: str) -> str:
    """Rows from the simulator say so (an MQTT v5 user property), whatever broker carried them."""
    props = getattr(msg, "properties", None)
    for key, value in getattr(props, "UserProperty", None) or []:
        if key == "source" and value == "simulator":
            return "simulator"
    return default


class _Committed:
    """The on-commit callback of one message: notes it for `BridgeSource._send_acks`."""

    __slots__ = ("_done", "_item")

    def __init__(self, done: deque, generation: int, mid: int):
        self._done = done
        self._item = (generation, mid)

    def __call__(self) -> None:
        self._done.append(self._item)
