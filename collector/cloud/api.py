"""EcoFlow's REST endpoints: the developer API (signed) and the app login.

Every error EcoFlow answers becomes an `EcoflowApiError` whose text says what to do about it;
nothing here logs or raises a secret (keys, passwords, tokens, signatures).
"""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import requests

from collector.cloud.signing import signed_headers

if TYPE_CHECKING:
    from collector.settings import CollectorSettings

log = logging.getLogger(__name__)

OPEN_PREFIX = "/iot-open/sign"
API_HOSTS = ("api-e.ecoflow.com", "api-a.ecoflow.com", "api.ecoflow.com")
NOT_OPENED = "not allowed to get device info"


def advice_for(code: str, message: str, host: str) -> str:
    """What a user should do about an error EcoFlow answered."""
    others = ", ".join(h for h in API_HOSTS if h != host)
    if code == "8513":
        return (f"{host} does not know this access key: check ECOFLOW_ACCESS_KEY (copy it again "
                "from the EcoFlow developer portal), and try the other regional API host "
                f"(ECOFLOW_API_HOST={others}); keys only work in the region where the "
                "developer account was created")
    if code == "8521":
        return ("EcoFlow rejected the request signature: check ECOFLOW_SECRET_KEY (copy it again, "
                "no spaces or quotes) and this machine's clock (it must be within a few minutes "
                "of the real time: enable NTP)")
    if code == "6012":
        return "the station is offline: check its Wi-Fi connection in the EcoFlow app"
    if NOT_OPENED in message:
        return ("EcoFlow has not opened this model (or this station) for the developer API: use "
                "the app-login source for it (ECOFLOW_ACCOUNT_USER / ECOFLOW_ACCOUNT_PASSWORD), "
                "or ask EcoFlow developer support to enable it")
    return "see EcoFlow's message; run `ecoflow-collector doctor` for a full check"


class EcoflowApiError(RuntimeError):
    """An error answered by EcoFlow (or the network on the way), with advice.

    `persistent` errors (bad key, bad signature, device not opened) will not go away by
    retrying soon; callers back off to their longest delay on them.
    """

    def __init__(self, endpoint: str, code: str, message: str, advice: str,
                 persistent: bool = False):
        self.endpoint, self.code, self.message, self.advice = endpoint, code, message, advice
        self.persistent = persistent
        super().__init__(f"EcoFlow {endpoint} answered {code} ({message}): {advice}")


class EcoflowTransportError(EcoflowApiError):
    """The request did not get an EcoFlow answer (DNS, TLS, timeout, HTTP 5xx)."""


@dataclass(frozen=True)
class MqttCredentials:
    host: str
    port: int
    user: str
    password: str
    protocol: str = "mqtts"

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"MqttCredentials({self.protocol}://{self.user}@{self.host}:{self.port})"


def base_url(host: str) -> str:
    """`ECOFLOW_API_HOST` may be a host name, host:port, or a full URL."""
    host = host.strip().rstrip("/")
    return host if "://" in host else f"https://{host}"


def host_name(host: str) -> str:
    return base_url(host).split("://", 1)[1]


def _credentials(data: Any, endpoint: str) -> MqttCredentials:
    try:
        return MqttCredentials(host=str(data["url"]), port=int(data["port"]),
                               user=str(data["certificateAccount"]),
                               password=str(data["certificatePassword"]),
                               protocol=str(data.get("protocol") or "mqtts"))
    except (KeyError, TypeError, ValueError):
        raise EcoflowApiError(endpoint, "format", "answer without broker credentials",
                              "EcoFlow changed its answer format; please report it") from None


class _Http:
    def __init__(self, host: str, ca_file: str | None, timeout: float,
                 session: requests.Session | None):
        self.host = host
        self.url = base_url(host)
        self.verify: str | bool = ca_file or True
        self.timeout = timeout
        self.session = session or requests.Session()
        self.clock_skew_sec: float | None = None  # EcoFlow's clock minus ours, from Date

    def send(self, method: str, path: str, endpoint: str, *, params=None, json_body=None,
             headers=None) -> Any:
        url = self.url + path
        if params:
            url += "?" + urlencode(params)
        try:
            response = self.session.request(method, url, json=json_body, headers=headers,
                                            timeout=self.timeout, verify=self.verify)
        except requests.exceptions.SSLError as exc:
            raise EcoflowTransportError(
                endpoint, "tls", type(exc).__name__,
                f"the TLS certificate of {host_name(self.host)} could not be verified; if a "
                "proxy re-signs traffic, give its CA with ECOFLOW_TLS_CA") from None
        except requests.RequestException as exc:
            raise EcoflowTransportError(
                endpoint, "network", type(exc).__name__,
                f"could not reach {host_name(self.host)}: check DNS, the internet connection "
                "and ECOFLOW_API_HOST") from None
        self._note_clock(response)
        if response.status_code >= 500 or response.status_code == 429:
            raise EcoflowTransportError(endpoint, f"HTTP {response.status_code}",
                                        response.reason or "server error",
                                        "EcoFlow's service is struggling; retrying later")
        try:
            document = response.json()
        except ValueError:
            raise EcoflowApiError(endpoint, f"HTTP {response.status_code}", "answer is not JSON",
                                  f"is ECOFLOW_API_HOST ({host_name(self.host)}) really an "
                                  "EcoFlow API host?", persistent=True) from None
        if not isinstance(document, dict):
            raise EcoflowApiError(endpoint, "format", "answer is not a JSON object",
                                  "EcoFlow changed its answer format; please report it")
        code = str(document.get("code", ""))
        if code not in ("0", "200"):
            message = str(document.get("message") or document.get("msg") or "no message")
            persistent = code in ("8513", "8521") or NOT_OPENED in message
            advice = advice_for(code, message, host_name(self.host))
            if code == "8521" and self.clock_skew_sec is not None \
                    and abs(self.clock_skew_sec) > 60:
                advice = (f"this machine's clock is {abs(self.clock_skew_sec):.0f} s "
                          f"{'behind' if self.clock_skew_sec > 0 else 'ahead of'} EcoFlow's: "
                          "fix the time (enable NTP); " + advice)
            raise EcoflowApiError(endpoint, code or "?", message, advice, persistent=persistent)
        return document.get("data"), response.content

    def _note_clock(self, response: requests.Response) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        try:
            theirs = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        self.clock_skew_sec = theirs - time.time()


class OpenApi:
    """The developer ("open") REST API, signed with the access and secret key."""

    def __init__(self, host: str, access_key: str, secret_key: str, *,
                 ca_file: str | None = None, timeout: float = 15,
                 session: requests.Session | None = None):
        self.http = _Http(host, ca_file, timeout, session)
        self._access_key = access_key
        self._secret_key = secret_key

    @property
    def host(self) -> str:
        return self.http.host

    def _call(self, method: str, path: str, params: dict | None = None,
              body: dict | None = None) -> tuple[Any, bytes]:
        endpoint = path
        headers = signed_headers(self._access_key, self._secret_key,
                                 body if body is not None else params)
        if body is not None:
            headers["Content-Type"] = "application/json;charset=UTF-8"
        return self.http.send(method, OPEN_PREFIX + path, endpoint, params=params,
                              json_body=body, headers=headers)

    def device_list(self) -> list[dict]:
        data, _ = self._call("GET", "/device/list")
        if not isinstance(data, list):
            raise EcoflowApiError("/device/list", "format", "device list is not a list",
                                  "EcoFlow changed its answer format; please report it")
        return [d for d in data if isinstance(d, dict) and d.get("sn")]

    def quota_all(self, sn: str) -> tuple[dict, bytes]:
        """The device's flat quota map, and the whole answer as received."""
        data, raw = self._call("GET", "/device/quota/all", params={"sn": sn})
        if not isinstance(data, dict):
            raise EcoflowApiError("/device/quota/all", "format", "no quota map in the answer",
                                  "EcoFlow answered without data for this station")
        return data, raw

    def certification(self) -> MqttCredentials:
        data, _ = self._call("GET", "/certification")
        return _credentials(data, "/certification")

    def set_quota(self, sn: str, command: dict, *, allow_control: bool) -> Any:
        """Downlink: `PUT /device/quota` with `{sn, ...command}`. Refused unless the operator
        turned control on (ECOFLOW_ALLOW_CONTROL=true)."""
        if not allow_control:
            raise PermissionError("sending commands to stations is off: set "
                                  "ECOFLOW_ALLOW_CONTROL=true to allow it")
        data, _ = self._call("PUT", "/device/quota", body={"sn": sn, **command})
        return data


# The developer API's AC-output switch differs by family (EcoFlow's per-model documents).
# Unverified on hardware here: `ecoflow-collector control` prints what it sends.
_AC_OUTPUT = {
    "Delta Pro": lambda on: {"params": {"cmdSet": 32, "id": 66, "enabled": int(on)}},
    "Delta Max": lambda on: {"params": {"cmdSet": 32, "id": 66, "enabled": int(on)}},
    "Delta 2": lambda on: {"moduleType": 3, "operateType": "acOutCfg",
                           "params": {"enabled": int(on)}},
    "Delta 2 Max": lambda on: {"moduleType": 3, "operateType": "acOutCfg",
                               "params": {"enabled": int(on)}},
    "River 2": lambda on: {"moduleType": 3, "operateType": "acOutCfg",
                           "params": {"enabled": int(on)}},
    "River 2 Max": lambda on: {"moduleType": 3, "operateType": "acOutCfg",
                               "params": {"enabled": int(on)}},
    "River 2 Pro": lambda on: {"moduleType": 3, "operateType": "acOutCfg",
                               "params": {"enabled": int(on)}},
}


def ac_output_command(model: str | None, enabled: bool) -> dict:
    """The `PUT /device/quota` command (without `sn`) that switches a station's AC output."""
    build = _AC_OUTPUT.get(model or "")
    if build is None:
        raise ValueError(f"no known AC-output command for model {model or 'unknown'}: send the "
                         "command from EcoFlow's documentation for it with --json")
    return build(enabled)


class AppApi:
    """The app ("private") API: e-mail and password login, then MQTT credentials."""

    def __init__(self, host: str, email_address: str, password: str, *,
                 ca_file: str | None = None, timeout: float = 15,
                 session: requests.Session | None = None):
        self.http = _Http(host, ca_file, timeout, session)
        self._email = email_address
        self._password = password
        self._token: str | None = None
        self.user_id: str | None = None

    @property
    def host(self) -> str:
        return self.http.host

    def login(self) -> str:
        body = {"email": self._email,
                "password": base64.b64encode(self._password.encode()).decode(),
                "scene": "IOT_APP", "userType": "ECOFLOW"}
        try:
            data, _ = self.http.send("POST", "/auth/login", "/auth/login", json_body=body,
                                     headers={"lang": "en_US"})
        except EcoflowApiError as exc:
            if isinstance(exc, EcoflowTransportError):
                raise
            raise EcoflowApiError(
                "/auth/login", exc.code, exc.message,
                "the EcoFlow app login failed: check ECOFLOW_ACCOUNT_USER (the e-mail you use "
                "in the EcoFlow app) and ECOFLOW_ACCOUNT_PASSWORD", persistent=True) from None
        try:
            self._token = str(data["token"])
            self.user_id = str(data["user"]["userId"])
        except (KeyError, TypeError):
            raise EcoflowApiError("/auth/login", "format", "no token in the answer",
                                  "EcoFlow changed its login answer; please report it") from None
        from servicekit.logging import register_secret

        register_secret(self._token)
        return self.user_id

    def certification(self) -> MqttCredentials:
        if self._token is None:
            self.login()
        try:
            data, _ = self.http.send("GET", "/iot-auth/app/certification",
                                     "/iot-auth/app/certification",
                                     headers={"Authorization": f"Bearer {self._token}",
                                              "lang": "en_US"})
        except EcoflowApiError as exc:
            if isinstance(exc, EcoflowTransportError):
                raise
            self._token = None  # log in again next time: tokens expire
            raise
        return _credentials(data, "/iot-auth/app/certification")


class Backoff:
    """Exponential back-off with full jitter; `persistent` errors jump to the cap."""

    def __init__(self, base: float = 5.0, cap: float = 600.0, rng: random.Random | None = None):
        self.base, self.cap = base, cap
        self.failures = 0
        self.rng = rng or random.Random()

    def next_delay(self, persistent: bool = False) -> float:
        self.failures += 1
        ceiling = self.cap if persistent else min(self.cap, self.base * 2 ** (self.failures - 1))
        # Full jitter, but never less than half the ceiling: spread out, yet still backing off.
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


def open_api(s: CollectorSettings, host: str) -> OpenApi:
    """The developer API client for the keys in the settings."""
    return OpenApi(host, s.ecoflow_access_key or "", s.ecoflow_secret_key or "",
                   ca_file=s.ecoflow_tls_ca)


def app_api(s: CollectorSettings, host: str) -> AppApi:
    """The app-login API client for the account in the settings."""
    return AppApi(host, s.ecoflow_account_user or "", s.ecoflow_account_password or "",
                  ca_file=s.ecoflow_tls_ca)
