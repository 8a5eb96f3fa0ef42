"""A local fake of EcoFlow's cloud at the protocol level: signed HTTPS API, app login, MQTT broker.

It plays what /work/shared/PROTOCOL.md describes, for the tests of the cloud sources:

- the developer ("open") API under /iot-open/sign/ with EcoFlow's request signing, over HTTPS
  with a CA generated for the run (`ca_file`);
- the app login (/auth/login) and the app MQTT credentials (/iot-auth/app/certification);
- its own Mosquitto with TLS (same CA) and an ACL per account, on which the fake publishes as
  the devices (/open/<account>/<sn>/quota, /app/device/property/<sn>) and answers latestQuotas.

Real EcoFlow quirks it keeps on purpose: quota/all answers the last known values for an offline
device; a stale timestamp answers "signature is wrong"; app telemetry stops unless someone asked
for latestQuotas recently (`app_push_needs_request`).

Failure scenarios (issue 17), each on demand:

- `silence(sn)` / `resume(sn)`: a device stops pushing while every connection stays up (and
  REST keeps answering): telemetry that freezes silently;
- `rotate_mqtt_password()`: new broker passwords, the old ones refused ("Not authorized"); the
  broker keeps persistent sessions across the restart, so what was published meanwhile waits
  for the same client id;
- `connack_never_comes = True`: certification hands out a TLS listener that accepts the MQTT
  CONNECT and never answers it;
- `downlinks()`: every command sent towards a device (MQTT `set` topics and REST PUT quota),
  to prove a collector never sends one by itself.

Nothing secret is logged or recorded: `requests` holds method, path, query and the code answered.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import http.server
import json
import logging
import secrets
import socket
import ssl
import string
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

import paho.mqtt.client as mqtt

from testbed.mosquitto import MosquittoServer

log = logging.getLogger(__name__)

SIGNED_PREFIX = "/iot-open/sign/"
# The fake's own MQTT user: it publishes as every device and listens for app requests.
DEVICE_USER = "device"
OFFLINE_MESSAGE = "设备不在线"  # "device offline": what a real latestQuotas reply says


# -- signing (PROTOCOL.md "Signing") ---------------------------------------------------------
def flatten_params(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Business parameters as (key, text) pairs: nested objects joined with dots, arrays
    indexed with [i]."""
    if isinstance(value, dict):
        pairs: list[tuple[str, str]] = []
        for key, item in value.items():
            pairs += flatten_params(item, f"{prefix}.{key}" if prefix else str(key))
        return pairs
    if isinstance(value, list):
        pairs = []
        for index, item in enumerate(value):
            pairs += flatten_params(item, f"{prefix}[{index}]")
        return pairs
    return [(prefix, _param_text(value))]


def _param_text(value: Any) -> str:
    # JSON spellings, as a Java server turns JSON scalars into text.
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    return str(value)


def string_to_sign(params: dict | list[tuple[str, str]], access_key: str, nonce: str,
                   timestamp: str) -> str:
    pairs = flatten_params(params) if isinstance(params, dict) else list(params)
    pairs.sort(key=lambda pair: pair[0])
    auth = f"accessKey={access_key}&nonce={nonce}&timestamp={timestamp}"
    business = "&".join(f"{key}={value}" for key, value in pairs)
    return f"{business}&{auth}" if business else auth


def hmac_sign(secret_key: str, text: str) -> str:
    return hmac.new(secret_key.encode(), text.encode(), hashlib.sha256).hexdigest()


# -- the fake --------------------------------------------------------------------------------
@dataclass
class FakeDevice:
    """One station on the fake account. Messages are bytes (a str or a JSON-able object is
    accepted too) and are pushed round-robin."""

    sn: str
    name: str  # deviceName
    product_name: str  # productName, e.g. "DELTA 2 Max"
    online: bool = True
    quota: dict = field(default_factory=dict)  # the flat REST quota/all data map
    open_messages: list[bytes] = field(default_factory=list)  # /open/<account>/<sn>/quota
    app_messages: list[bytes] = field(default_factory=list)  # /app/device/property/<sn>
    pushing: bool = True  # False: silent, though online and connected (`silence`)
    product_type: int | None = None  # for latestQuotas replies
    developer_enabled: bool = True  # False: quota/all answers "not allowed to get device info"
    # False: in the account's device list, but the broker refuses the account's subscriptions
    # to its telemetry (SUBACK "not authorized"), as a broker whose ACL does not grant it does.
    readable: bool = True


class _Reply(NamedTuple):
    code: str
    message: str
    data: Any = None
    has_data: bool = False
    reason: str = ""  # why an error was answered, for `requests` (never a secret)
    status: int = 200


def _ok(data: Any = None, *, has_data: bool = True) -> _Reply:
    return _Reply("0", "Success", data, has_data)


def _error(code: str, message: str, reason: str = "", status: int = 200) -> _Reply:
    return _Reply(code, message, reason=reason or message, status=status)


class _Request(NamedTuple):
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: Any  # http.client.HTTPMessage: case-insensitive
    body: bytes


def _random_text(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _as_bytes(payload: bytes | str | dict | list) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode()
    return json.dumps(payload).encode()


def _is_json(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "application/json"


class FakeEcoflowCloud:
    """EcoFlow's cloud for one account: see the module docstring. Start it (or use it as a
    context manager), point a client at `api_url` trusting `ca_file`, and drive the devices
    with `push` / `start_pushing`."""

    def __init__(self, devices: list[FakeDevice], *, access_key: str | None = None,
                 secret_key: str | None = None, email: str | None = None,
                 password: str | None = None, timestamp_tolerance_sec: float = 300,
                 app_push_needs_request: bool = True, keepalive_window_sec: float = 600):
        self.devices = list(devices)
        self.access_key = access_key or _random_text(32)
        self.secret_key = secret_key or _random_text(32)
        self.email = email or f"user-{secrets.token_hex(4)}@example.com"
        self.password = password or secrets.token_urlsafe(12)
        self.timestamp_tolerance_sec = timestamp_tolerance_sec
        self.app_push_needs_request = app_push_needs_request
        self.keepalive_window_sec = keepalive_window_sec
        self.user_id = str(10**18 + secrets.randbelow(9 * 10**18))
        self.open_account = f"open-{secrets.token_hex(16)}"
        self.app_account = f"app-{secrets.token_hex(16)}"
        self.region_ok = True
        self.clock_offset_sec = 0.0
        self.requests: list[dict] = []
        self.set_quota_calls: list[dict] = []
        self.latest_quotas_requests: dict[str, int] = {}
        self.mqtt_downlinks: list[tuple[str, bytes]] = []  # (topic, payload) of set messages
        self.connack_never_comes = False
        self._silent: _SilentBroker | None = None

        self._lock = threading.RLock()
        self._mqtt_passwords = {self.open_account: secrets.token_hex(16),
                                self.app_account: secrets.token_hex(16)}
        self._past_mqtt_passwords: list[str] = []
        self._device_password = secrets.token_urlsafe(16)
        self._tokens: list[str] = []
        self._nonces: dict[str, float] = {}  # nonce -> when it was accepted (fake clock)
        self._last_latest_quotas: dict[str, float] = {}  # sn -> time.monotonic()
        self._cursors: dict[tuple[str, str], int] = {}
        self._broker: MosquittoServer | None = None
        self._httpd: _HttpsServer | None = None
        self._http_thread: threading.Thread | None = None
        self._device_client: mqtt.Client | None = None
        self._device_ready = threading.Event()
        self._publish_lock = threading.Lock()
        self._pusher: threading.Thread | None = None
        self._stop_pushing = threading.Event()
        self._push_interval = 0.2

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> FakeEcoflowCloud:
        # Persistent sessions survive a restart (a rotation), as on a real broker.
        broker = MosquittoServer(users=self._broker_users(), tls=True, persistence=True)
        broker.acl_file = broker.base / "fakecloud_acl"
        broker.acl_file.write_text(self._acl())
        if not all(d.readable for d in self.devices):
            # The same grants through the plugin that refuses a subscription in its SUBACK
            # (the ACL file grants every subscription and only filters what it delivers).
            broker.dynsec_acls = self._dynsec_acls()
        self._broker = broker
        try:
            broker.start()
            self._connect_device_client()
            self._start_https()
        except BaseException:
            self.stop()
            raise
        log.info("fake EcoFlow cloud: API %s, MQTT %s:%s", self.api_url, self.broker_host,
                 self.broker_tls_port)
        return self

    def stop(self) -> None:
        self._stop_pushing.set()
        if self._pusher is not None:
            self._pusher.join(timeout=5)
            self._pusher = None
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()
            self._httpd = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
        self._disconnect_device_client()
        if self._silent is not None:
            self._silent.close()
            self._silent = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def __enter__(self) -> FakeEcoflowCloud:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- where things are ----------------------------------------------------------------------
    def _started(self) -> MosquittoServer:
        if self._broker is None or self._httpd is None:
            raise RuntimeError("the fake EcoFlow cloud is not running: call start() first")
        return self._broker

    @property
    def api_host(self) -> str:
        self._started()
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def api_url(self) -> str:
        return f"https://{self.api_host}"

    @property
    def ca_file(self) -> Path:
        return self._started().tls_files.ca_cert

    @property
    def broker_host(self) -> str:
        return self._started().host

    @property
    def broker_tls_port(self) -> int:
        return self._started().tls_port

    def now(self) -> float:
        """The fake's wall clock (epoch seconds), skewed by `clock_offset_sec`."""
        return time.time() + self.clock_offset_sec

    def secrets(self) -> list[str]:
        """Every secret value the fake handed out or accepts, past MQTT passwords included:
        for tests that search logs for leaks."""
        with self._lock:
            values = [self.secret_key, self.password,
                      base64.b64encode(self.password.encode()).decode(),
                      self._device_password, *self._tokens,
                      *self._mqtt_passwords.values(), *self._past_mqtt_passwords]
        return list(dict.fromkeys(values))

    # -- MQTT ----------------------------------------------------------------------------------
    def _broker_users(self) -> dict[str, str]:
        return {**self._mqtt_passwords, DEVICE_USER: self._device_password}

    def _acl(self) -> str:
        acct, uid = self.open_account, self.user_id
        if all(d.readable for d in self.devices):
            open_read, app_read = [f"topic read /open/{acct}/#"], ["topic read /app/device/property/#"]
        else:  # a grant per readable station: Mosquitto's ACL has no "deny"
            readable = [d.sn for d in self.devices if d.readable]
            open_read = [f"topic read /open/{acct}/{sn}/#" for sn in readable]
            app_read = [f"topic read /app/device/property/{sn}" for sn in readable]
        return "\n".join([
            "# EcoFlow's cloud broker as testbed/fakecloud.py plays it: each account reads only",
            "# its own telemetry; the device user is the fake itself.",
            f"user {acct}",
            *open_read,
            f"topic write /open/{acct}/+/set",
            f"topic write /open/{acct}/+/get",
            f"user {self.app_account}",
            *app_read,
            f"topic write /app/{uid}/+/thing/property/get",
            f"topic write /app/{uid}/+/thing/property/set",
            f"topic read /app/{uid}/+/thing/property/get_reply",
            f"topic read /app/{uid}/+/thing/property/set_reply",
            f"user {DEVICE_USER}",
            "topic readwrite #",
            "",
        ])

    def _dynsec_acls(self) -> dict[str, list[tuple[str, str]]]:
        """_acl() as the dynamic-security plugin's allowances per user."""
        kinds = {"read": ("subscribePattern", "publishClientReceive"),
                 "write": ("publishClientSend",),
                 "readwrite": ("subscribePattern", "publishClientReceive", "publishClientSend")}
        acls: dict[str, list[tuple[str, str]]] = {}
        user = None
        for line in self._acl().splitlines():
            words = line.split()
            if words[:1] == ["user"]:
                user = words[1]
                acls[user] = []
            elif words[:1] == ["topic"] and user is not None:
                acls[user] += [(kind, words[2]) for kind in kinds[words[1]]]
        return acls

    def _connect_device_client(self) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"fakecloud-devices-{secrets.token_hex(4)}",
                             protocol=mqtt.MQTTv311)
        client.username_pw_set(DEVICE_USER, self._device_password)
        client.on_connect = self._on_device_connect
        client.on_subscribe = lambda *_: self._device_ready.set()
        client.on_disconnect = lambda *_: self._device_ready.clear()
        client.on_message = self._on_device_message
        self._device_ready.clear()
        self._device_client = client
        client.connect(self._broker.host, self._broker.port)
        client.loop_start()
        if not self._device_ready.wait(10):
            raise RuntimeError("the fake's device client could not subscribe on its own broker")

    def _disconnect_device_client(self) -> None:
        client, self._device_client = self._device_client, None
        self._device_ready.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _on_device_connect(self, client, _userdata, _flags, reason_code, _properties) -> None:
        if reason_code.is_failure:
            log.warning("fake device client refused by its broker: %s", reason_code)
            return
        client.subscribe([(f"/app/{self.user_id}/+/thing/property/get", 1),
                          (f"/app/{self.user_id}/+/thing/property/set", 1),
                          (f"/open/{self.open_account}/+/set", 1)])

    def _on_device_message(self, client, _userdata, msg) -> None:
        if msg.topic.endswith("/set"):
            with self._lock:
                self.mqtt_downlinks.append((msg.topic, bytes(msg.payload)))
            return
        # /app/<userId>/<sn>/thing/property/get
        parts = msg.topic.split("/")
        if len(parts) != 7:
            return
        sn = parts[3]
        try:
            request = json.loads(msg.payload)
        except ValueError:
            log.debug("ignored a get request for %s that is not JSON", sn)
            return
        if not isinstance(request, dict) or request.get("operateType") != "latestQuotas":
            log.debug("ignored a get request for %s: not latestQuotas", sn)
            return
        device = self._device(sn)
        if device is None:
            log.debug("ignored latestQuotas for unknown device %s", sn)
            return
        with self._lock:
            self.latest_quotas_requests[sn] = self.latest_quotas_requests.get(sn, 0) + 1
            self._last_latest_quotas[sn] = time.monotonic()
        data: dict[str, Any] = {"sn": sn, "productType": device.product_type,
                                "online": 1 if device.online else 0}
        if device.online:
            data["quotaMap"] = dict(device.quota)
        reply = {"id": request.get("id"), "version": request.get("version", "1.1"),
                 "moduleType": request.get("moduleType", 0), "operateType": "latestQuotas",
                 "code": "0", "message": "Success" if device.online else OFFLINE_MESSAGE,
                 "data": data}
        # No wait_for_publish here: this runs on the client's network thread.
        client.publish(msg.topic + "_reply", json.dumps(reply, ensure_ascii=False), qos=1)

    def _publish(self, topic: str, payload: bytes) -> None:
        with self._publish_lock:
            if not self._device_ready.wait(10) or self._device_client is None:
                raise RuntimeError("the fake's device client is not connected to its broker")
            self._device_client.publish(topic, payload, qos=1).wait_for_publish(5)

    def rotate_mqtt_password(self) -> None:
        """New MQTT passwords for both accounts. The broker restarts on the same ports with the
        same CA, which drops every connection; the old passwords stop working."""
        broker = self._started()
        # Pushes wait for the restart; the lock of the fake's state is not held across it,
        # since the device client's network thread may need it before it can stop.
        with self._publish_lock:
            with self._lock:
                self._past_mqtt_passwords += self._mqtt_passwords.values()
                self._mqtt_passwords = {name: secrets.token_hex(16)
                                        for name in self._mqtt_passwords}
                broker.users = self._broker_users()
            self._disconnect_device_client()
            broker.halt()
            broker.start()
            self._connect_device_client()
        log.info("fake EcoFlow cloud: MQTT passwords rotated, broker restarted")

    def downlinks(self) -> list:
        """Every command that reached a device: MQTT set messages and REST PUT quota bodies."""
        with self._lock:
            return [*self.mqtt_downlinks, *self.set_quota_calls]

    # -- devices pushing -----------------------------------------------------------------------
    def silence(self, sn: str | None = None) -> None:
        """The device (every device without `sn`) stops pushing; connections stay up, REST and
        latestQuotas still answer."""
        for device in self.devices:
            if sn is None or device.sn == sn:
                device.pushing = False

    def resume(self, sn: str | None = None) -> None:
        for device in self.devices:
            if sn is None or device.sn == sn:
                device.pushing = True

    def _device(self, sn: str) -> FakeDevice | None:
        return next((d for d in self.devices if d.sn == sn), None)

    def push(self, sn: str, kind: str = "open", payload: bytes | None = None) -> None:
        """Publish one message now, whatever the keepalive rule and `online` say: `kind`
        "open" (the device's next open message), "app" (its next app message) or "status"
        (its online state on /open/<account>/<sn>/status)."""
        device = self._device(sn)
        if device is None:
            raise KeyError(f"no fake device with sn {sn!r}")
        if kind == "status":
            topic = f"/open/{self.open_account}/{sn}/status"
            if payload is None:
                payload = {"id": str(secrets.randbelow(10**9)), "version": "1.0",
                           "timestamp": int(self.now() * 1000),
                           "params": {"status": 1 if device.online else 0}}
        elif kind in ("open", "app"):
            topic = (f"/open/{self.open_account}/{sn}/quota" if kind == "open"
                     else f"/app/device/property/{sn}")
            if payload is None:
                payload = self._next_message(device, kind)
                if payload is None:
                    raise ValueError(f"fake device {sn} has no {kind} messages to push")
        else:
            raise ValueError(f"kind must be 'open', 'app' or 'status', not {kind!r}")
        self._publish(topic, _as_bytes(payload))

    def _next_message(self, device: FakeDevice, kind: str) -> bytes | None:
        messages = device.open_messages if kind == "open" else device.app_messages
        if not messages:
            return None
        with self._lock:
            index = self._cursors.get((device.sn, kind), 0) % len(messages)
            self._cursors[(device.sn, kind)] = index + 1
        return messages[index]

    def app_push_allowed(self, sn: str) -> bool:
        """Whether the device pushes app telemetry now: always, or (as real devices do) only
        within `keepalive_window_sec` of a latestQuotas request for it."""
        if not self.app_push_needs_request:
            return True
        with self._lock:
            last = self._last_latest_quotas.get(sn)
        return last is not None and time.monotonic() - last <= self.keepalive_window_sec

    def start_pushing(self, interval: float = 0.2) -> None:
        """Every `interval` seconds each online device pushes its next open message and, when
        `app_push_allowed`, its next app message. Calling it again changes the interval."""
        self._push_interval = interval
        if self._pusher is not None and self._pusher.is_alive():
            return
        self._stop_pushing.clear()
        self._pusher = threading.Thread(target=self._push_loop, name="fakecloud-pusher",
                                        daemon=True)
        self._pusher.start()

    def stop_pushing(self) -> None:
        self._stop_pushing.set()
        if self._pusher is not None:
            self._pusher.join(timeout=5)
            self._pusher = None

    def _push_loop(self) -> None:
        while not self._stop_pushing.wait(self._push_interval):
            for device in list(self.devices):
                if not device.online or not device.pushing:
                    continue
                kinds = ["open"] + (["app"] if self.app_push_allowed(device.sn) else [])
                for kind in kinds:
                    payload = self._next_message(device, kind)
                    if payload is None:
                        continue
                    try:
                        self.push(device.sn, kind, payload)
                    except (RuntimeError, ValueError, OSError) as exc:
                        log.warning("fake device %s could not push: %s", device.sn, exc)

    # -- HTTPS ---------------------------------------------------------------------------------
    def _start_https(self) -> None:
        tls = self._broker.tls_files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.server_cert, tls.server_key)
        self._httpd = _HttpsServer(self, context)
        self._http_thread = threading.Thread(target=self._httpd.serve_forever,
                                             kwargs={"poll_interval": 0.1},
                                             name="fakecloud-https", daemon=True)
        self._http_thread.start()

    def _routes(self) -> dict[tuple[str, str], Any]:
        return {
            ("GET", "/iot-open/sign/certification"): self._open_certification,
            ("GET", "/iot-open/sign/device/list"): self._device_list,
            ("GET", "/iot-open/sign/device/quota/all"): self._quota_all,
            ("PUT", "/iot-open/sign/device/quota"): self._set_quota,
            ("POST", "/iot-open/sign/device/quota"): self._quota_selected,
            ("POST", "/auth/login"): self._login,
            ("GET", "/iot-auth/app/certification"): self._app_certification,
        }

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> _Reply:
        """Answer one HTTP request (what the HTTPS handler calls) and record it."""
        url = urlsplit(target)
        request = _Request(method, url.path, parse_qsl(url.query, keep_blank_values=True),
                           headers, body)
        routes = self._routes()
        route = routes.get((method, url.path))
        if route is None:
            if any(path == url.path for _, path in routes):
                reply = _error("405", "Method Not Allowed", status=405)
            else:
                reply = _error("404", "Not Found", status=404)
        elif url.path.startswith(SIGNED_PREFIX):
            reply = self._check_signature(request) or route(request)
        else:
            reply = route(request)
        self._record(request, reply)
        return reply

    def _record(self, request: _Request, reply: _Reply) -> None:
        secret_values = set(self.secrets())
        query = {key: ("<redacted>" if value in secret_values else value)
                 for key, value in request.query}
        with self._lock:
            self.requests.append({"method": request.method, "path": request.path,
                                  "query": query, "code": reply.code, "reason": reply.reason,
                                  "time": self.now()})
        log.debug("%s %s -> %s %s", request.method, request.path, reply.code, reply.reason)

    def _check_signature(self, request: _Request) -> _Reply | None:
        names = ("accessKey", "nonce", "timestamp", "sign")
        values = {name: request.headers.get(name) or "" for name in names}
        missing = [name for name in names if not values[name]]
        if missing:
            return _error("8520", "accessKey, nonce, timestamp and sign headers are required",
                          reason="missing header " + ", ".join(missing))
        if not self.region_ok:
            return _error("8513", "accessKey is invalid", reason="wrong region")
        if not hmac.compare_digest(values["accessKey"].encode(), self.access_key.encode()):
            return _error("8513", "accessKey is invalid", reason="unknown accessKey")
        params = self._business_params(request)
        if params is None:
            return _error("8521", "signature is wrong", reason="JSON body does not parse")
        expected = hmac_sign(self.secret_key, string_to_sign(
            params, values["accessKey"], values["nonce"], values["timestamp"]))
        if not hmac.compare_digest(expected.encode(), values["sign"].encode()):
            return _error("8521", "signature is wrong", reason="sign does not match")
        try:
            skew = int(values["timestamp"]) / 1000 - self.now()
        except ValueError:
            return _error("8521", "signature is wrong", reason="timestamp is not epoch ms")
        if abs(skew) > self.timestamp_tolerance_sec:
            return _error("8521", "signature is wrong",
                          reason=f"timestamp {skew:+.0f} s off the server clock")
        with self._lock:
            now = self.now()
            self._nonces = {nonce: seen for nonce, seen in self._nonces.items()
                            if now - seen <= self.timestamp_tolerance_sec}
            if values["nonce"] in self._nonces:
                return _error("8521", "signature is wrong", reason="nonce reused")
            self._nonces[values["nonce"]] = now
        return None

    @staticmethod
    def _business_params(request: _Request) -> dict | list[tuple[str, str]] | None:
        if request.method != "GET" and _is_json(request.headers.get("Content-Type")):
            try:
                body = json.loads(request.body or b"{}")
            except ValueError:
                return None
            return body if isinstance(body, dict) else flatten_params(body)
        return request.query

    @staticmethod
    def _json_body(request: _Request) -> dict | None:
        try:
            body = json.loads(request.body or b"")
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def _mqtt_certificate(self, account: str) -> dict:
        broker = self._started()
        with self._lock:
            password = self._mqtt_passwords[account]
        port = broker.tls_port
        if self.connack_never_comes:
            if self._silent is None:
                self._silent = _SilentBroker(broker.tls_files)
            port = self._silent.port
        return {"certificateAccount": account, "certificatePassword": password,
                "url": broker.host, "port": str(port), "protocol": "mqtts"}

    def _device_for_quota(self, sn: str | None) -> FakeDevice | _Reply:
        if not sn:
            return _error("1000", "sn is required", reason="no sn")
        device = self._device(sn)
        if device is None:
            return _error("1006", "current device is not allowed to get device info",
                          reason="unknown sn")
        if not device.developer_enabled:
            return _error("1006", "current device is not allowed to get device info",
                          reason="developer access not enabled for this device")
        return device

    # Each endpoint: request -> reply.
    def _open_certification(self, _request: _Request) -> _Reply:
        return _ok(self._mqtt_certificate(self.open_account))

    def _device_list(self, _request: _Request) -> _Reply:
        return _ok([{"sn": d.sn, "deviceName": d.name, "online": 1 if d.online else 0,
                     "productName": d.product_name} for d in self.devices])

    def _quota_all(self, request: _Request) -> _Reply:
        found = self._device_for_quota(dict(request.query).get("sn"))
        if isinstance(found, _Reply):
            return found
        # The last known values, online or not: real EcoFlow does not say the device is gone.
        return _ok(dict(found.quota))

    def _quota_selected(self, request: _Request) -> _Reply:
        body = self._json_body(request) or {}
        found = self._device_for_quota(body.get("sn"))
        if isinstance(found, _Reply):
            return found
        wanted = (body.get("params") or {}).get("quotas") or []
        return _ok({key: found.quota[key] for key in wanted if key in found.quota})

    def _set_quota(self, request: _Request) -> _Reply:
        body = self._json_body(request)
        if body is None:
            return _error("1000", "a JSON object body is required", reason="no JSON body")
        found = self._device_for_quota(body.get("sn"))
        if isinstance(found, _Reply):
            return found
        with self._lock:
            self.set_quota_calls.append(body)
        return _ok(has_data=False)

    def _login(self, request: _Request) -> _Reply:
        body = self._json_body(request) or {}
        try:
            password = base64.b64decode(str(body.get("password", "")), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            password = None
        if body.get("email") != self.email or password is None or not hmac.compare_digest(
                password.encode(), self.password.encode()):
            return _error("2026", "account or password is incorrect", reason="bad login")
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens.append(token)
        return _ok({"token": token, "user": {"userId": self.user_id, "email": self.email,
                                             "name": self.email.split("@")[0]}})

    def _app_certification(self, request: _Request) -> _Reply:
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        with self._lock:
            known = scheme.lower() == "bearer" and token in self._tokens
        if not known:
            return _error("401", "token is invalid or expired: log in again",
                          reason="missing or unknown bearer token")
        return _ok(self._mqtt_certificate(self.app_account))


class _SilentBroker:
    """A TLS listener that completes the handshake, reads the MQTT CONNECT and never answers:
    a CONNACK that never comes."""

    def __init__(self, tls_files):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tls_files.server_cert, tls_files.server_key)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connects = 0
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, name="fakecloud-silent", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
            self._held.append(tls)
            if tls.recv(65536):
                self.connects += 1
            while tls.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for conn in self._held:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _HttpsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeEcoflowCloud, context: ssl.SSLContext):
        self.fake = fake
        self.context = context
        self._connections: set[ssl.SSLSocket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def close_connections(self) -> None:
        """End kept-alive connections too: once stopped, the fake answers nothing."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish_request(self, request, client_address) -> None:
        # The TLS handshake happens here, in the request's own thread, so a stuck client
        # cannot hold up the accept loop.
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        with self._connections_lock:
            self._connections.add(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            with self._connections_lock:
                self._connections.discard(conn)
            conn.close()

    def handle_error(self, request, client_address) -> None:
        log.debug("HTTPS request from %s failed", client_address, exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakecloud"
    sys_version = ""
    timeout = 30

    def date_time_string(self, timestamp: float | None = None) -> str:
        return email.utils.formatdate(self.server.fake.now() if timestamp is None else timestamp,
                                      usegmt=True)

    def log_message(self, *_args) -> None:
        # The fake logs each request itself (FakeEcoflowCloud._record), without secrets.
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        reply = self.server.fake.handle(self.command, self.path, self.headers, body)
        envelope: dict[str, Any] = {"code": reply.code, "message": reply.message}
        if reply.has_data:
            envelope["data"] = reply.data
        envelope |= {"eagleEyeTraceId": secrets.token_hex(16), "tid": ""}
        payload = json.dumps(envelope, ensure_ascii=False).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _answer
