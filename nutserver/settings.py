"""ecoflow-nut's settings, from the environment. Passwords are never logged or echoed."""

from __future__ import annotations

import json
import re

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nutserver.protocol import User
from servicekit.settings import load

UPS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
USER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")

ENV = {
    "listen": "NUT_LISTEN", "port": "NUT_PORT", "ups_json": "NUT_UPS_JSON",
    "users_json": "NUT_USERS_JSON", "serve_serials": "NUT_SERVE_SERIALS",
    "poll_sec": "NUT_POLL_SEC", "max_clients": "NUT_MAX_CLIENTS",
    "soc_min": "POLICY_SOC_MIN",
}


def _env(name: str) -> dict:
    return {"validation_alias": ENV[name]}


class NutSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    listen: str = Field(default="0.0.0.0", **_env("listen"))
    port: int = Field(default=3493, ge=0, le=65535, **_env("port"))
    # UPS name -> station (serial number or friendly name): {"ups": "Study"}
    ups_json: str = Field(default="", **_env("ups_json"))
    # user -> password, or {"password": ..., "primary": true}: {"monuser": "secret"}
    users_json: SecretStr = Field(default=SecretStr(""), **_env("users_json"))
    serve_serials: bool = Field(default=True, **_env("serve_serials"))
    poll_sec: float = Field(default=2.0, ge=0.2, le=60, **_env("poll_sec"))
    max_clients: int = Field(default=64, ge=1, le=4096, **_env("max_clients"))
    soc_min: float = Field(default=10.0, ge=0, lt=100, **_env("soc_min"))

    @field_validator("ups_json")
    @classmethod
    def _ups_map(cls, value: str) -> str:
        if not value.strip():
            return ""
        try:
            data = json.loads(value)
        except ValueError:
            raise ValueError('is not JSON: write {"ups": "Study"} (UPS name: station serial '
                             "number or name)") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and UPS_NAME.match(k) and isinstance(v, str) and v
                for k, v in data.items()):
            raise ValueError('must map UPS names (letters, digits, "_", ".", "-") to a station '
                             'serial number or name: {"ups": "Study"}')
        return value

    @field_validator("users_json")
    @classmethod
    def _users(cls, value: SecretStr) -> SecretStr:
        _parse_users(value.get_secret_value())  # raises without the value in the message
        return value

    def ups_map(self) -> dict[str, str]:
        return json.loads(self.ups_json) if self.ups_json else {}

    def users(self) -> dict[str, User]:
        return _parse_users(self.users_json.get_secret_value())


def _parse_users(text: str) -> dict[str, User]:
    if not text.strip():
        return {}
    hint = ('must map user names to a password or to {"password": "...", "primary": true}: '
            '{"monuser": "secret"}')
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("is not JSON; it " + hint) from None
    if not isinstance(data, dict):
        raise ValueError(hint)
    users = {}
    for name, spec in data.items():
        if not (isinstance(name, str) and USER_NAME.match(name)):
            raise ValueError(hint + " (user names: letters, digits, '_', '.', '@', '-')")
        if isinstance(spec, str):
            spec = {"password": spec}
        if (not isinstance(spec, dict) or set(spec) - {"password", "primary"}
                or not isinstance(spec.get("password"), str) or not spec["password"]
                or not isinstance(spec.get("primary", False), bool)):
            raise ValueError(hint + f" (user {name})")
        users[name] = User(spec["password"], spec.get("primary", False))
    return users


def load_settings(**overrides) -> NutSettings:
    return load(NutSettings, ENV, **overrides)
