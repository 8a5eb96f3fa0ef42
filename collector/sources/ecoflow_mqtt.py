"""EcoFlow's MQTT brokers as collector sources: the common client (`CloudMqttSource`) and the
developer ("open") MQTT source; the app-login source is in `collector.sources.app_mqtt`.

Rows say where they came from (`source` = open_mqtt, app_mqtt). A message is acknowledged only
after its rows are committed (a persistent session under one stable client id keeps the rest on
EcoFlow's broker); fresh broker credentials are fetched when the broker refuses the old ones,
and the source reconnects with back-off. Persistent errors (bad key, bad signature) are logged
once per change with advice, then retried at the longest back-off: never hammered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from collector.cloud.api import Backoff, EcoflowApiError, MqttCredentials, OpenApi
from collector.cloud.broker import AUTH_REFUSED, cloud_client
from collector.pipeline import Pipeline
from collector.sources.bridge import hand_over
from collector.sources.ecoflow_common import (
    DEVICE_LIST_REFRESH_SEC,
    DeviceDirectory,
    OnceLog,
    Worker,
)
from servicekit.logging import register_secret

log = logging.getLogger(__name__)

# A subscription the broker refused (SUBACK failure) is asked for again after this long, not on
# every tick: the station may be added to the account (or its ACL) meanwhile.
REFUSED_RETRY_SEC = 300.0


class CloudMqttSource(Worker):
    """Subscribe to EcoFlow's broker with credentials from a certification endpoint.

    `credentials()` fetches broker credentials, `client_id()` gives the installation's stable
    client id, `topics(creds)` the subscriptions for the current device set.

    Re-certification: a CONNACK refusing the credentials ("Not authorized", "Bad user name or
    password") or no CONNACK within `connack_timeout` starts an incident: the client is
    dropped, fresh credentials are fetched after a jittered back-off, and the source reconnects
    under the same client id (the persistent session on EcoFlow's broker keeps what was sent
    meanwhile). An incident is logged once, with the advice `doctor` gives, and once more when
    the broker accepts again. Messages are only received and acknowledged: nothing is ever
    published from here but what a subclass asks (the app's `latestQuotas` get).
    """

    liveness = None  # collector.sources.liveness.Liveness
    tick_sec = 5.0

    def __init__(self, pipeline: Pipeline, name: str, credentials: Callable[[], MqttCredentials],
                 client_id: Callable[[], str], topics: Callable[[MqttCredentials], list[str]],
                 ca_file: str | None = None, keepalive: int = 60, backoff: Backoff | None = None,
                 connack_timeout: float = 30.0):
        super().__init__()
        self.pipeline = pipeline
        self.name = self.source_label = name
        self.thread_name = f"ecoflow-{name}"
        self._fetch_credentials = credentials
        self._client_id = client_id
        self._topics = topics
        self.ca_file = ca_file
        self.keepalive = keepalive
        self.connack_timeout = connack_timeout
        self.backoff = backoff or Backoff(base=5, cap=300)
        self.connected = threading.Event()
        self._generation = 0
        self._refresh = threading.Event()
        self._refusal: str | None = None  # why the current incident began
        self._incident: str | None = None  # set while re-certifying, for the log
        self._attempt_since = 0.0  # monotonic: when the client last started (re)connecting
        self._wake = threading.Event()
        self._subscribed: set[str] = set()
        # Topics the broker refused -> monotonic time to ask again; SUBSCRIBEs awaiting their
        # SUBACK by message id (under _sub_lock: the SUBACK may come before subscribe returns).
        self.refused: dict[str, float] = {}
        self.subscriptions_refused = 0
        self._awaiting: dict[int, list[str]] = {}
        self._sub_lock = threading.Lock()
        self.client: mqtt.Client | None = None
        self.creds: MqttCredentials | None = None
        self.client_id_used: str | None = None
        self.credential_fetches = 0
        self.incidents = 0
        self.recertifications = 0
        self._log = OnceLog(f"ecoflow {name}", log)

    # -- life cycle ------------------------------------------------------------------------
    def _run(self) -> None:
        client_id = self._retry("the client id", self._client_id)
        if client_id is None:
            return
        self.client_id_used = client_id
        while not self._stop.is_set():
            creds = self._retry("broker credentials", self._get_credentials)
            if creds is None:
                return
            self._connect(client_id, creds)
            while not self._stop.is_set() and not self._refresh.is_set():
                self._wake.wait(self.tick_sec)
                self._wake.clear()
                if self.connected.is_set():
                    self._tick()
                elif time.monotonic() - self._attempt_since > self.connack_timeout:
                    self._refuse(f"no CONNACK from {creds.host}:{creds.port} within "
                                 f"{self.connack_timeout:g} s")
            self._disconnect()
            if self._refresh.is_set() and not self._stop.is_set():
                self._refresh.clear()
                self._recertify(client_id)

    def _refuse(self, why: str) -> None:
        """The broker refused us or never answered: re-certify (from the source's thread)."""
        if self._refusal is None:
            self._refusal = why
        self._refresh.set()
        self._wake.set()

    def _recertify(self, client_id: str) -> None:
        why, self._refusal = self._refusal or "the broker refused the connection", None
        delay = self.backoff.next_delay()
        self.recertifications += 1
        if self._incident is None:
            from collector.cloud.doctor import _mqtt_advice

            self._incident = why
            self.incidents += 1
            log.warning("%s: %s; fetching fresh credentials and reconnecting as %s (back-off "
                        "%.0f s, growing with jitter while it lasts). Advice: %s", self.name,
                        why, client_id, delay, _mqtt_advice(why))
        else:
            log.debug("%s: still refused (%s); next try in %.0f s", self.name, why, delay)
        self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        super().stop()
        self._disconnect()

    def _retry(self, what: str, fn: Callable):
        backoff = Backoff(base=2, cap=300)
        while not self._stop.is_set():
            try:
                value = fn()
                self._log.ok(what, f"got {what}")
                return value
            except EcoflowApiError as exc:
                delay = backoff.next_delay(exc.persistent)
                self._log.problem(what, f"getting {what} failed: {exc} (next try in {delay:.0f} s)",
                                  logging.ERROR if exc.persistent else logging.WARNING)
            except Exception as exc:  # e.g. the database for the client id is down
                delay = backoff.next_delay()
                self._log.problem(what, f"getting {what} failed: {type(exc).__name__}: {exc} "
                                  f"(next try in {delay:.0f} s)")
            self._stop.wait(delay)
        return None

    def _get_credentials(self) -> MqttCredentials:
        creds = self._fetch_credentials()
        register_secret(creds.password)
        self.credential_fetches += 1
        return creds

    def _connect(self, client_id: str, creds: MqttCredentials) -> None:
        self.creds = creds
        client = cloud_client(client_id, creds, self.ca_file, persistent=True)
        client.reconnect_delay_set(min_delay=1, max_delay=5)  # back within seconds of the broker
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self.client = client
        self._subscribed = set()
        self._attempt_since = time.monotonic()
        log.info("%s: connecting to %s:%d as %s (client id %s)", self.name, creds.host,
                 creds.port, creds.user, client_id)
        client.connect_async(creds.host, creds.port, keepalive=self.keepalive)
        client.loop_start()

    def _disconnect(self) -> None:
        client, self.client = self.client, None
        self._set_connected(False)
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _set_connected(self, connected: bool) -> None:
        if connected:
            self.connected.set()
        else:
            self.connected.clear()
        if self.liveness is not None:
            self.liveness.set_connected(self.source_label, connected)

    # -- callbacks ---------------------------------------------------------------------------
    def _on_connect(self, client, _userdata, _flags, reason, _props) -> None:
        if client is not self.client:
            return  # a client being dropped
        if reason.is_failure:
            if reason.value in AUTH_REFUSED:
                self._refuse(f"the broker refused the credentials ({reason})")
            else:
                self._log.problem("connect", f"the broker refused the connection: {reason}")
            return
        self._log.ok("connect")
        self._generation += 1
        self._set_connected(True)
        self._subscribed = set()
        self._subscribe(client)
        if self._incident is not None:
            log.info("%s: connected again after %d credential fetch(es) (%s)", self.name,
                     self.recertifications, self._incident)
            self._incident = None
        self.backoff.reset()
        log.info("%s: connected to %s:%d, %d topics", self.name, self.creds.host,
                 self.creds.port, len(self._subscribed))
        self.on_connected(client)

    def _on_disconnect(self, client, _userdata, _flags, reason, _props) -> None:
        if client is not self.client:
            return
        self._set_connected(False)
        self._attempt_since = time.monotonic()  # paho reconnects by itself; time the CONNACK
        if reason.value != 0 and not self._stop.is_set():
            log.warning("%s: disconnected (%s); reconnecting", self.name, reason)

    def _on_message(self, client, _userdata, msg: mqtt.MQTTMessage) -> None:
        hand_over(self, client, msg, self.source_label)

    def _subscribe(self, client: mqtt.Client) -> None:
        try:
            wanted = set(self._topics(self.creds))
        except EcoflowApiError as exc:
            self._log.problem("topics", f"device list unavailable: {exc}")
            return
        now = time.monotonic()
        new = sorted(t for t in wanted - self._subscribed if self.refused.get(t, 0.0) <= now)
        if new:
            with self._sub_lock:
                result, mid = client.subscribe([(t, 1) for t in new])
                if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                    self._awaiting[mid] = new
            self._subscribed |= set(new)

    def _on_subscribe(self, client, _userdata, mid, reasons, _props) -> None:
        """A refused topic is logged once with advice and asked for again after
        REFUSED_RETRY_SEC; a granted one ends its refusal."""
        with self._sub_lock:
            topics = self._awaiting.pop(mid, [])
        if client is not self.client:
            return
        for topic, reason in zip(topics, reasons):
            if reason.is_failure:
                self._subscribed.discard(topic)
                self.refused[topic] = time.monotonic() + REFUSED_RETRY_SEC
                self.subscriptions_refused += 1
                self._log.problem(
                    f"subscribe {topic}",
                    f"the broker refused the subscription to {topic} ({reason}): these "
                    "credentials may not read that station. Check that it is on this account "
                    "and its serial number is right (`ecoflow-collector doctor` lists the "
                    f"account's stations); asked again every {REFUSED_RETRY_SEC:g} s",
                    logging.ERROR)
            elif self.refused.pop(topic, None) is not None:
                self._log.ok(f"subscribe {topic}", f"the broker granted {topic} now")

    # -- periodic work (override) -------------------------------------------------------------
    def on_connected(self, client: mqtt.Client) -> None:
        pass

    def _tick(self) -> None:
        client = self.client
        if client is not None:
            self._subscribe(client)  # stations added to the account since the last look
        directory = getattr(self, "directory", None)
        if self.liveness is not None and directory is not None:
            self.liveness.add_stations(self.source_label, directory.serials())


class OpenMqttSource(CloudMqttSource):
    """Developer MQTT: `/open/<certificateAccount>/<sn>/quota` and `/status` per station."""

    def __init__(self, pipeline: Pipeline, api: OpenApi, directory: DeviceDirectory,
                 client_id: Callable[[], str], ca_file: str | None = None):
        self.directory = directory

        def topics(creds: MqttCredentials) -> list[str]:
            directory.refresh_if_older(DEVICE_LIST_REFRESH_SEC)
            return [f"/open/{creds.user}/{sn}/{kind}"
                    for sn in directory.serials() for kind in ("quota", "status")]

        super().__init__(pipeline, "open_mqtt", api.certification, client_id, topics, ca_file)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if not msg.topic.endswith("/status"):
            return super()._on_message(client, userdata, msg)
        # A liveness notice, not a reading: it updates the online flag, and stores no row.
        sn = msg.topic.split("/")[3]
        online = _status_online(msg.payload)
        if online is not None:
            self.directory.set_online(sn, online)
        else:
            log.warning("open_mqtt: status message for %s without a status flag (%d bytes)", sn,
                        len(msg.payload))
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)


def _status_online(payload: bytes) -> bool | None:
    try:
        params = json.loads(payload).get("params") or {}
        status = params.get("status")
    except (ValueError, AttributeError):
        return None
    return None if status is None else str(status) == "1"
