"""Collector sources fed by EcoFlow's cloud: REST polling, developer MQTT, app-login MQTT.

All three hand payloads to the same pipeline as the local sources; rows say where they came
from (`source` = rest, open_mqtt, app_mqtt). The MQTT sources acknowledge a message only after
its rows are committed (a persistent session under one stable client id keeps the rest on
EcoFlow's broker), fetch fresh broker credentials when the broker refuses the old ones, and
reconnect with back-off. Persistent errors (bad key, bad signature) are logged once per change
with advice, then retried at the longest back-off: never hammered.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from collector.cloud.api import AppApi, Backoff, EcoflowApiError, MqttCredentials, OpenApi
from collector.pipeline import Pipeline
from collector.sources.bridge import hand_over
from servicekit.logging import register_secret

log = logging.getLogger(__name__)

# MQTT CONNACK reason codes that mean "these credentials are no good" (v3 4 and 5, as paho maps
# them to v5 codes), and their v5 equivalents.
_AUTH_REFUSED = {134, 135, 4, 5}
# A station that device/list says is offline has its quota/all skipped (it would repeat stale
# values); a station EcoFlow has not opened for the API is asked again only after this long.
NOT_OPENED_RETRY_SEC = 3600
DEVICE_LIST_REFRESH_SEC = 600


class _OnceLog:
    """Log a repeating problem when it starts or changes, not on every retry."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.last: dict[str, str] = {}

    def problem(self, key: str, text: str, level: int = logging.WARNING) -> None:
        if self.last.get(key) != text:
            self.last[key] = text
            log.log(level, "%s: %s", self.prefix, text)

    def ok(self, key: str, text: str | None = None) -> None:
        if self.last.pop(key, None) is not None and text:
            log.info("%s: %s", self.prefix, text)


def cloud_client(client_id: str, creds: MqttCredentials, ca_file: str | None,
                 persistent: bool) -> mqtt.Client:
    """An MQTT 3.1.1 client for EcoFlow's broker: `persistent` keeps the session and acks by
    hand; certificate and host name are verified (ECOFLOW_TLS_CA replaces the system CAs)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=not persistent,
                         manual_ack=persistent)
    client.username_pw_set(creds.user, creds.password)
    if creds.protocol in ("mqtts", "ssl", "tls") or creds.port == 8883:
        client.tls_set(ca_certs=ca_file, cert_reqs=ssl.CERT_REQUIRED)
    return client


class DeviceDirectory:
    """The account's stations from `device/list` (or the configured serial numbers), with
    EcoFlow's own online flag: the liveness signal, as quota/all repeats stale values."""

    def __init__(self, api: OpenApi | None, serials: tuple[str, ...] = (), metrics=None):
        self.api = api
        self.wanted = tuple(serials)
        self.metrics = metrics
        self.devices: dict[str, dict] = {sn: {"sn": sn, "online": None} for sn in serials}
        self.fetched_at: float | None = None
        self._lock = threading.Lock()
        self._log = _OnceLog("ecoflow device list")

    def refresh(self) -> dict[str, dict]:
        if self.api is None:
            return self.devices
        listed = {d["sn"]: d for d in self.api.device_list()}
        with self._lock:
            chosen = {sn: d for sn, d in listed.items() if not self.wanted or sn in self.wanted}
            for sn in self.wanted:
                if sn not in listed:
                    self._log.problem(f"missing:{sn}", (
                        f"{sn} (ECOFLOW_DEVICE_SN / ECOFLOW_DEVICE_LIST) is not on this "
                        f"account's device list ({', '.join(sorted(listed)) or 'empty'}): check "
                        "the serial number, and that the station is bound to this account"))
            for sn, device in chosen.items():
                online = str(device.get("online")) == "1"
                before = self.devices.get(sn, {}).get("online")
                if before is not None and before != online:
                    log.info("EcoFlow reports %s %s", sn, "online" if online else "offline")
                self.devices[sn] = {**device, "online": online}
                if self.metrics:
                    self.metrics.cloud_online.labels(sn).set(1 if online else 0)
            for sn in list(self.devices):
                if sn not in chosen:
                    del self.devices[sn]
            self.fetched_at = time.monotonic()
        return self.devices

    def set_online(self, sn: str, online: bool) -> None:
        with self._lock:
            device = self.devices.get(sn)
            if device is None:
                return
            if device.get("online") is not None and device["online"] != online:
                log.info("EcoFlow reports %s %s", sn, "online" if online else "offline")
            device["online"] = online
        if self.metrics:
            self.metrics.cloud_online.labels(sn).set(1 if online else 0)

    def refresh_if_older(self, max_age: float) -> None:
        if self.fetched_at is None or time.monotonic() - self.fetched_at > max_age:
            self.refresh()

    def serials(self) -> list[str]:
        with self._lock:
            return sorted(self.devices)

    def online(self, sn: str) -> bool | None:
        with self._lock:
            return self.devices.get(sn, {}).get("online")


class _Worker:
    """A daemon thread with a stop event."""

    thread_name = "cloud"

    def __init__(self):
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class RestSource(_Worker):
    """Poll `quota/all` for every online station at COLLECTING_INTERVAL."""

    name = "rest"
    thread_name = "ecoflow-rest"

    def __init__(self, pipeline: Pipeline, api: OpenApi, directory: DeviceDirectory,
                 interval: float = 30.0, backoff: Backoff | None = None):
        super().__init__()
        self.pipeline, self.api, self.directory = pipeline, api, directory
        self.interval = interval
        self.backoff = backoff or Backoff(base=interval, cap=600)
        self.polls = 0
        self._skip_until: dict[str, float] = {}
        self._log = _OnceLog("ecoflow rest")

    def _run(self) -> None:
        log.info("ecoflow rest: polling %s every %.0f s", self.api.host, self.interval)
        while not self._stop.is_set():
            delay = self.interval
            try:
                self.poll_once()
                self.backoff.reset()
            except EcoflowApiError as exc:
                delay = self.backoff.next_delay(exc.persistent)
                self._log.problem("cycle", f"{exc} (next try in {delay:.0f} s)",
                                  logging.ERROR if exc.persistent else logging.WARNING)
            self._stop.wait(delay)

    def poll_once(self) -> int:
        """One cycle: the device list, then quota/all per online station; rows queued."""
        self.directory.refresh()
        self._log.ok("cycle", "EcoFlow answers again")
        queued = 0
        for sn in self.directory.serials():
            if self._stop.is_set():
                break
            if not self.directory.online(sn):
                continue  # quota/all would repeat the last values it knew
            if time.monotonic() < self._skip_until.get(sn, 0):
                continue
            try:
                _data, raw = self.api.quota_all(sn)
            except EcoflowApiError as exc:
                if exc.persistent and exc.code not in ("8513", "8521"):
                    self._skip_until[sn] = time.monotonic() + NOT_OPENED_RETRY_SEC
                    self._log.problem(f"quota:{sn}", f"{sn}: {exc}", logging.ERROR)
                    continue
                raise
            self._log.ok(f"quota:{sn}")
            self.polls += 1
            queued += self.pipeline.handle(raw, f"rest:{self.api.host}/device/quota/all?sn={sn}",
                                           "rest", device_sn=sn)
        return queued


class CloudMqttSource(_Worker):
    """Subscribe to EcoFlow's broker with credentials from a certification endpoint.

    `credentials()` fetches broker credentials (called again whenever the broker refuses
    them), `client_id()` gives the installation's stable client id, `topics(creds)` the
    subscriptions for the current device set.
    """

    def __init__(self, pipeline: Pipeline, name: str, credentials: Callable[[], MqttCredentials],
                 client_id: Callable[[], str], topics: Callable[[MqttCredentials], list[str]],
                 ca_file: str | None = None, keepalive: int = 60, backoff: Backoff | None = None):
        super().__init__()
        self.pipeline = pipeline
        self.name = self.source_label = name
        self.thread_name = f"ecoflow-{name}"
        self._fetch_credentials = credentials
        self._client_id = client_id
        self._topics = topics
        self.ca_file = ca_file
        self.keepalive = keepalive
        self.backoff = backoff or Backoff(base=5, cap=300)
        self.connected = threading.Event()
        self._generation = 0
        self._refresh = threading.Event()
        self._wake = threading.Event()
        self._subscribed: set[str] = set()
        self.client: mqtt.Client | None = None
        self.creds: MqttCredentials | None = None
        self.credential_fetches = 0
        self._log = _OnceLog(f"ecoflow {name}")

    # -- life cycle ------------------------------------------------------------------------
    def _run(self) -> None:
        client_id = self._retry("the client id", self._client_id)
        if client_id is None:
            return
        while not self._stop.is_set():
            creds = self._retry("broker credentials", self._get_credentials)
            if creds is None:
                return
            self._connect(client_id, creds)
            while not self._stop.is_set() and not self._refresh.is_set():
                self._wake.wait(5)
                self._wake.clear()
                if self.connected.is_set():
                    self._tick()
            self._disconnect()
            if self._refresh.is_set():
                self._refresh.clear()
                log.info("%s: the broker refused the credentials; fetching new ones", self.name)

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
        self.client = client
        self._subscribed = set()
        log.info("%s: connecting to %s:%d as %s (client id %s)", self.name, creds.host,
                 creds.port, creds.user, client_id)
        client.connect_async(creds.host, creds.port, keepalive=self.keepalive)
        client.loop_start()

    def _disconnect(self) -> None:
        client, self.client = self.client, None
        self.connected.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()

    # -- callbacks ---------------------------------------------------------------------------
    def _on_connect(self, client, _userdata, _flags, reason, _props) -> None:
        if reason.is_failure:
            if reason.value in _AUTH_REFUSED:
                self._refresh.set()
                self._wake.set()
            self._log.problem("connect", f"the broker refused the connection: {reason}")
            return
        self._log.ok("connect")
        self._generation += 1
        self.connected.set()
        self._subscribed = set()
        self._subscribe(client)
        log.info("%s: connected to %s:%d, %d topics", self.name, self.creds.host,
                 self.creds.port, len(self._subscribed))
        self.on_connected(client)

    def _on_disconnect(self, _client, _userdata, _flags, reason, _props) -> None:
        self.connected.clear()
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
        new = sorted(wanted - self._subscribed)
        if new:
            client.subscribe([(t, 1) for t in new])
            self._subscribed |= set(new)

    # -- periodic work (override) -------------------------------------------------------------
    def on_connected(self, client: mqtt.Client) -> None:
        pass

    def _tick(self) -> None:
        client = self.client
        if client is not None:
            self._subscribe(client)  # stations added to the account since the last look


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


class AppMqttSource(CloudMqttSource):
    """App-login MQTT: `/app/device/property/<sn>`, plus the periodic `latestQuotas` request
    that keeps stations pushing (they go quiet when no app asks), whose replies are decoded."""

    def __init__(self, pipeline: Pipeline, api: AppApi, directory: DeviceDirectory,
                 client_id: Callable[[], str], ca_file: str | None = None,
                 latest_quotas_sec: float = 300.0):
        self.api = api
        self.directory = directory
        self.latest_quotas_sec = latest_quotas_sec
        self._last_request: float | None = None  # monotonic time; None: ask at once
        self._request_id = int(time.time() * 1000) % 1_000_000_000
        self.requests_sent = 0

        def topics(_creds: MqttCredentials) -> list[str]:
            directory.refresh_if_older(DEVICE_LIST_REFRESH_SEC)
            user_id = api.user_id
            return [t for sn in directory.serials()
                    for t in (f"/app/device/property/{sn}",
                              f"/app/{user_id}/{sn}/thing/property/get_reply")]

        super().__init__(pipeline, "app_mqtt", api.certification, client_id, topics, ca_file)

    def on_connected(self, client: mqtt.Client) -> None:
        # Not 0.0: the monotonic clock starts near zero at boot, so "long ago" must be explicit.
        self._last_request = None
        self._wake.set()

    def _tick(self) -> None:
        super()._tick()
        client = self.client
        if client is None or (self._last_request is not None and
                              time.monotonic() - self._last_request < self.latest_quotas_sec):
            return
        self._last_request = time.monotonic()
        for sn in self.directory.serials():
            self._request_id += 1
            request = {"id": self._request_id, "version": "1.1", "from": "Android",
                       "moduleType": 0, "operateType": "latestQuotas", "params": {}}
            client.publish(f"/app/{self.api.user_id}/{sn}/thing/property/get",
                           json.dumps(request, separators=(",", ":")), qos=1)
            self.requests_sent += 1
