"""Bridge source: subscribe to raw device payloads on any MQTT broker.

At-least-once: QoS 1, a fixed client id, a persistent session, and manual acks sent only
after the rows a message produced are committed. Messages not yet acked when the collector
dies are redelivered by the broker; the table's uniqueness makes the redelivery harmless.

A message without a device time is stored at its receive time, so its redelivery would become
a second reading at a second, made-up time (issue 15 item 8). `Redeliveries` remembers the
receive time of recent QoS 1 messages by topic and payload; a message the broker marks as a
redelivery (the MQTT DUP flag) gets its original's receive time, so it is the same reading
again and the writer skips it. A message that merely repeats an earlier payload without the
DUP flag is a new reading (devices repeat themselves).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict, deque
from datetime import datetime, timezone

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
    liveness = None  # collector.sources.liveness.Liveness, told when the connection comes and goes

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
        self.client.on_subscribe = self._on_subscribe
        self.connected = threading.Event()
        # Set once the broker has granted the subscriptions (SUBACK) on the current connection:
        # from then on a message published reaches this source. `connected` comes earlier.
        self.subscribed = threading.Event()
        self._down = threading.Event()  # set by on_disconnect
        # Message ids restart with every connection: an ack that arrives after a reconnect
        # would hit another message, so it is dropped (the broker redelivers the original).
        self._generation = 0
        # (connection generation, message id) of committed messages, acknowledged together
        # once the writer has run a batch's callbacks.
        self._committed: deque[tuple[int, int]] = deque()
        self.redeliveries = Redeliveries()
        pipeline.writer.after_acks(self._send_acks)

    def start(self) -> None:
        log.info("bridge source: connecting to %s:%d, topics %s", self.host, self.port,
                 ", ".join(self.topics))
        window = receive_window(self.pipeline.writer.batch_rows)
        self.client.connect_async(self.host, self.port, keepalive=30, clean_start=False,
                                  properties=persistent_session(window))
        self.client.loop_start()

    def stop(self) -> None:
        # The acks of the last batch (Collector.stop flushes the writer first) are queued
        # before the DISCONNECT. paho writes packets in order and calls on_disconnect once the
        # DISCONNECT is out: stopping its network thread before that could drop the acks, and
        # the broker would deliver those messages again at the next start.
        was_up = self.connected.is_set()
        self._down.clear()
        self.client.disconnect()
        if was_up:
            self._down.wait(5)
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
        if self.liveness is not None:
            self.liveness.set_connected(self.source_label, True)
        log.info("bridge source: connected to %s:%d", self.host, self.port)

    def _on_subscribe(self, _client, _userdata, _mid, reasons, _props) -> None:
        if all(not r.is_failure for r in reasons):
            self.subscribed.set()
        else:
            log.error("bridge source: the broker refused a subscription: %s",
                      ", ".join(str(r) for r in reasons))

    def _on_disconnect(self, _client, _userdata, _flags, reason, _props) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self._down.set()
        if self.liveness is not None:
            self.liveness.set_connected(self.source_label, False)
        if reason.value != 0:
            log.warning("bridge source: disconnected (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, _userdata, msg: mqtt.MQTTMessage) -> None:
        label = self.source_label if msg.properties is None else _label(msg, self.source_label)
        if msg.qos != 1:
            hand_over(self, client, msg, label)
            return
        self.pipeline.handle(msg.payload, msg.topic, label,
                             on_commit=_Committed(self._committed, self._generation, msg.mid),
                             received_at=self.redeliveries.received_at(msg))

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
    redeliveries = getattr(source, "redeliveries", None)
    if redeliveries is None:
        redeliveries = source.redeliveries = Redeliveries()

    def ack() -> None:
        if qos > 0 and generation == source._generation and source.connected.is_set():
            client.ack(mid, qos)

    return source.pipeline.handle(msg.payload, msg.topic, label, on_commit=ack,
                                  received_at=redeliveries.received_at(msg))


class Redeliveries:
    """Receive times of the last `size` QoS 1 messages by (topic, payload): a message with the
    DUP flag whose original is among them is given the original's receive time."""

    def __init__(self, size: int = 20_000):
        self.size = size
        self.matched = 0  # redeliveries recognised
        self._times: OrderedDict[tuple[str, int, int], datetime] = OrderedDict()

    def received_at(self, msg: mqtt.MQTTMessage) -> datetime:
        now = datetime.now(timezone.utc)
        if not msg.qos:
            return now  # QoS 0 is never redelivered
        payload = msg.payload
        key = (msg.topic, len(payload), hash(payload))
        if msg.dup:
            first = self._times.get(key)
            if first is not None:
                self.matched += 1
                return first
        self._times[key] = now
        self._times.move_to_end(key)
        if len(self._times) > self.size:
            self._times.popitem(last=False)
        return now


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
