"""The worker's MQTT connection: publishes commands, collects agents' acks and status messages."""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
from dataclasses import dataclass, replace

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("ecoflow.policy.mqtt")

ACK_TOPIC = "power-manager/+/ack"
STATUS_TOPIC = "power-manager/+/status"
# Acks sent while the worker was briefly away are kept by the broker for this long.
SESSION_EXPIRY_SEC = 3600
# Acks and status messages the broker may hand over before the worker has acknowledged any:
# a backlog that piled up while the database was away arrives in one go once it is back,
# instead of a broker window's worth (Mosquitto's default is 20) per evaluation.
RECEIVE_MAXIMUM = 1000


@dataclass(frozen=True)
class Incoming:
    agent: str
    kind: str  # "ack" or "status"
    payload: dict | None  # None when the message was not a JSON object
    raw: bytes
    # The broker's message id, acknowledged (PUBACK) only once the message is handled; 0 for
    # a message that needs no acknowledgement (QoS 0, or not from the broker).
    mid: int = 0
    # It may have been handled already: the broker's DUP flag (its copy of a message the
    # worker took but never acknowledged), or a second try after a failure.
    redelivered: bool = False
    connection: int = 0  # the connection it came on: a PUBACK goes only on that one


class MqttLink:
    """One MQTT v5 client; incoming acks and status messages wait in `inbox` for the worker.

    The broker learns that a message arrived only when the worker is done with it (`take`,
    then `done` after its database commit): until then it keeps the message in the worker's
    persistent session and hands it over again after a crash or a reconnect."""

    def __init__(self, host: str, port: int, client_id: str, username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None):
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.connected = threading.Event()
        self.connections = 0  # counts successful connects, so callers can re-announce state
        self._held: Incoming | None = None  # taken by the worker and not done yet
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if username:
            self._client.username_pw_set(username, password)
        if tls_ca:
            self._client.tls_set(ca_certs=tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        # Back within a couple of seconds of the broker's return: a shutdown decided during a
        # broker outage must not wait for a long back-off.
        self._client.reconnect_delay_set(1, 2)
        self._host, self._port = host, port

    @classmethod
    def from_settings(cls, settings, client_id: str | None = None) -> MqttLink:
        return cls(
            settings.mqtt_host,
            settings.mqtt_port,
            client_id or settings.mqtt_client_id,
            settings.mqtt_user,
            settings.mqtt_pass.get_secret_value() if settings.mqtt_pass else None,
            str(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None,
        )

    def start(self, wait_sec: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_SEC
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self._client.connect_async(self._host, self._port, keepalive=30, clean_start=False,
                                   properties=props)
        self._client.loop_start()
        if not self.connected.wait(wait_sec):
            log.warning("MQTT broker %s:%s not reachable yet; commands wait in the database "
                        "and are sent when it is", self._host, self._port)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish_command(self, agent: str, payload: dict, expiry_sec: int) -> bool:
        """QoS 1, never retained, MQTT v5 message expiry; False when not handed to the broker.
        Nothing is handed to the client while disconnected: paho would queue every copy and
        deliver them all on reconnect."""
        if not self.connected.is_set():
            return False
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = max(1, int(expiry_sec))
        info = self._client.publish(
            f"power-manager/{agent}/cmd", json.dumps(payload, separators=(",", ":")),
            qos=1, retain=False, properties=props,
        )
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish_supply(self, agent: str, payload: dict) -> bool:
        """The D9 fail-safe supply state: QoS 1, retained, so an agent that connects later
        still learns it."""
        info = self._client.publish(f"power-manager/{agent}/supply",
                                    json.dumps(payload, separators=(",", ":")), qos=1,
                                    retain=True)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def take(self) -> Incoming | None:
        """The oldest message the worker is not done with, or None. A message taken and not
        `done` (storing it failed) comes back first, marked `redelivered`, so the order holds
        and nothing is skipped."""
        with self._lock:
            if self._held is not None:
                if not self._held.redelivered:
                    self._held = replace(self._held, redelivered=True)
                return self._held
            try:
                self._held = self.inbox.get_nowait()
            except queue.Empty:
                return None
            return self._held

    def done(self, msg: Incoming) -> None:
        """`msg` is stored (or dropped on purpose): acknowledge it to the broker, which then
        forgets it. Acks go out in the order the messages came, as MQTT requires. One that
        came on an earlier connection is not acknowledged: the broker hands it over again,
        and the worker recognises the copy."""
        with self._lock:
            if self._held is msg:
                self._held = None
        if msg.mid and msg.connection == self.connections and self.connected.is_set():
            self._client.ack(msg.mid, 1)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("MQTT connection refused: %s", reason_code)
            return
        client.subscribe([(ACK_TOPIC, 1), (STATUS_TOPIC, 1)])
        self.connections += 1
        if flags.session_present:
            # The broker kept the session: it sends again every message not acknowledged, so
            # the copies of the last connection still waiting here would be handled twice.
            self._drop_waiting(before=self.connections)
        self.connected.set()
        log.info("connected to MQTT %s:%s", self._host, self._port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        if reason_code.value == 0:  # our own disconnect() (stop): nothing to reconnect
            log.info("MQTT disconnected")
            return
        log.warning("MQTT disconnected (%s); reconnecting", reason_code)

    def _drop_waiting(self, before: int) -> None:
        with self._lock:
            kept = []
            while True:
                try:
                    msg = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if not (msg.mid and msg.connection < before):
                    kept.append(msg)
            for msg in kept:
                self.inbox.put(msg)

    def _on_message(self, client, userdata, msg):
        mid = msg.mid if msg.qos > 0 else 0
        parts = msg.topic.split("/")
        if len(parts) != 3 or parts[2] not in ("ack", "status"):
            if mid:
                client.ack(mid, msg.qos)  # not ours to store: dropped, never sent again
            return
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            # Some agents publish a bare "online"/"offline" string as their status.
            text = msg.payload.decode("utf-8", "replace").strip().strip('"')
            payload = {"state": text} if parts[2] == "status" and text else None
        self.inbox.put(Incoming(parts[1], parts[2], payload, bytes(msg.payload), mid,
                                bool(msg.dup), self.connections))
