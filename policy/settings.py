"""Policy worker settings: thresholds, timers, topology, MQTT and notifications, from the env."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servicekit import logging as logsetup
from servicekit.settings import DatabaseSettings, load

ENV_NAMES = {
    "soc_min": "POLICY_SOC_MIN",
    "soc_margin": "POLICY_SOC_CLEAR_MARGIN",
    "runtime_min": "POLICY_RUNTIME_MIN",
    "runtime_margin": "POLICY_RUNTIME_CLEAR_MARGIN_MIN",
    "max_on_battery_sec": "POLICY_MAX_ON_BATTERY_SEC",
    "debounce_sec": "POLICY_DEBOUNCE_SEC",
    "cooldown_sec": "POLICY_COOLDOWN_SEC",
    "confirm_sec": "POLICY_GRID_CONFIRM_SEC",
    "rearm_soc": "POLICY_REARM_SOC",
    "slope_window_sec": "POLICY_SLOPE_WINDOW_SEC",
    "shutdown_delay_sec": "POLICY_SHUTDOWN_DELAY_SEC",
    "command_ttl_sec": "POLICY_COMMAND_TTL_SEC",
    "resend_sec": "POLICY_RESEND_SEC",
    "interval_sec": "POLICY_INTERVAL_SEC",
    "config_file": "POLICY_CONFIG_FILE",
    "device_to_agents_json": "DEVICE_TO_AGENTS_JSON",
    "signing_key": "COMMAND_SIGNING_KEY",
    "mqtt_host": "MQTT_HOST",
    "mqtt_port": "MQTT_PORT",
    "mqtt_user": "MQTT_USER",
    "mqtt_pass": "MQTT_PASS",
    "mqtt_tls_ca": "MQTT_TLS_CA",
    "mqtt_client_id": "MQTT_CLIENT_ID",
    "notify_urls": "NOTIFY_URLS",
    "notify_on_shutdown": "NOTIFY_ON_SHUTDOWN",
    "notify_on_abort": "NOTIFY_ON_ABORT",
    "notify_on_power": "NOTIFY_ON_POWER",
    "notify_on_station": "NOTIFY_ON_STATION",
    "notify_on_agent": "NOTIFY_ON_AGENT",
    "notify_repeat_sec": "NOTIFY_REPEAT_SEC",
    "alert_low_soc_on_grid": "POLICY_ALERT_LOW_SOC_ON_GRID",
    "wol_dry_run": "POLICY_WOL_DRY_RUN",
    "wol_packets": "POLICY_WOL_PACKETS",
    "wol_gap_sec": "POLICY_WOL_GAP_SEC",
    "metrics_port": "POLICY_METRICS_PORT",
    "metrics_prefix": "METRICS_PREFIX",
}


def _env(field: str) -> dict:
    return {"validation_alias": ENV_NAMES[field]}


class PolicySettings(BaseSettings):
    """Everything the policy worker reads from the environment (names in ENV_NAMES)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    soc_min: float = Field(default=10.0, ge=0, lt=100, **_env("soc_min"))
    soc_margin: float = Field(default=5.0, ge=0, le=50, **_env("soc_margin"))
    runtime_min: int | None = Field(default=None, ge=0, le=1440, **_env("runtime_min"))
    runtime_margin: float = Field(default=2.0, ge=0, le=600, **_env("runtime_margin"))
    max_on_battery_sec: int | None = Field(default=None, gt=0, **_env("max_on_battery_sec"))
    debounce_sec: int = Field(default=180, ge=0, le=86400, **_env("debounce_sec"))
    cooldown_sec: int = Field(default=300, ge=0, le=7 * 86400, **_env("cooldown_sec"))
    confirm_sec: int = Field(default=60, ge=0, le=86400, **_env("confirm_sec"))
    rearm_soc: float | None = Field(default=None, ge=0, le=100, **_env("rearm_soc"))
    slope_window_sec: int = Field(default=600, ge=30, le=86400, **_env("slope_window_sec"))
    shutdown_delay_sec: int = Field(default=120, ge=0, le=3600, **_env("shutdown_delay_sec"))
    command_ttl_sec: int = Field(default=300, ge=10, le=86400, **_env("command_ttl_sec"))
    resend_sec: int = Field(default=15, ge=1, le=3600, **_env("resend_sec"))
    interval_sec: float = Field(default=5.0, gt=0, le=300, **_env("interval_sec"))
    config_file: Path | None = Field(default=None, **_env("config_file"))
    device_to_agents_json: str = Field(default="", **_env("device_to_agents_json"))
    alert_low_soc_on_grid: bool = Field(default=False, **_env("alert_low_soc_on_grid"))
    # Wake-on-LAN after power returns (docs/wake-on-lan.md): dry run records, sends nothing.
    wol_dry_run: bool = Field(default=False, **_env("wol_dry_run"))
    wol_packets: int = Field(default=3, ge=1, le=10, **_env("wol_packets"))
    wol_gap_sec: float = Field(default=1.0, ge=0, le=10, **_env("wol_gap_sec"))
    # Prometheus /metrics of the worker (docs/prometheus.md); 0 turns it off.
    metrics_port: int = Field(default=9091, ge=0, le=65535, **_env("metrics_port"))
    metrics_prefix: str = Field(default="ecoflow", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
                                **_env("metrics_prefix"))

    signing_key: SecretStr | None = Field(default=None, **_env("signing_key"))

    mqtt_host: str = Field(default="localhost", **_env("mqtt_host"))
    mqtt_port: int = Field(default=1883, ge=1, le=65535, **_env("mqtt_port"))
    mqtt_user: str | None = Field(default=None, **_env("mqtt_user"))
    mqtt_pass: SecretStr | None = Field(default=None, **_env("mqtt_pass"))
    mqtt_tls_ca: Path | None = Field(default=None, **_env("mqtt_tls_ca"))
    mqtt_client_id: str = Field(default="ecoflow-policy", min_length=1, **_env("mqtt_client_id"))

    notify_urls: SecretStr | None = Field(default=None, **_env("notify_urls"))
    notify_on_shutdown: bool = Field(default=True, **_env("notify_on_shutdown"))
    notify_on_abort: bool = Field(default=True, **_env("notify_on_abort"))
    notify_on_power: bool = Field(default=True, **_env("notify_on_power"))
    notify_on_station: bool = Field(default=True, **_env("notify_on_station"))
    notify_on_agent: bool = Field(default=True, **_env("notify_on_agent"))
    notify_repeat_sec: int = Field(default=1800, ge=60, **_env("notify_repeat_sec"))

    @field_validator("device_to_agents_json")
    @classmethod
    def _mapping_is_json(cls, value: str) -> str:
        if not value.strip():
            return ""
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"not valid JSON ({exc.msg} at character {exc.pos}); expected e.g. "
                '\'{"Study": ["study-pc"], "R331ZEB4ZEA0012345": ["nas-01"]}\''
            ) from None
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(a, str) for a in v)
            for k, v in mapping.items()
        ):
            raise ValueError("must map each device name or serial number to a list of agent ids")
        return value

    @field_validator("config_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} does not exist or is not a file")
        return value

    @model_validator(mode="after")
    def _rearm_above_threshold(self) -> PolicySettings:
        if self.rearm_soc is not None and self.rearm_soc <= self.soc_min:
            raise ValueError(
                f"POLICY_REARM_SOC ({self.rearm_soc}) must be above POLICY_SOC_MIN "
                f"({self.soc_min}), or a host could be shut down again at once after a restart"
            )
        return self

    @property
    def effective_rearm_soc(self) -> float:
        return self.rearm_soc if self.rearm_soc is not None else self.soc_min + self.soc_margin

    def device_to_agents(self) -> dict[str, list[str]]:
        return json.loads(self.device_to_agents_json) if self.device_to_agents_json else {}

    def rule_params(self) -> dict:
        """The global thresholds and timers the SQL rules take as parameters."""
        return {
            "soc_min": self.soc_min,
            "soc_margin": self.soc_margin,
            "runtime_min": self.runtime_min,
            "runtime_margin": self.runtime_margin,
            "max_on_battery_sec": self.max_on_battery_sec,
            "debounce_sec": self.debounce_sec,
            "confirm_sec": self.confirm_sec,
            "cooldown_sec": self.cooldown_sec,
            "rearm_soc": self.effective_rearm_soc,
            "slope_window_sec": self.slope_window_sec,
        }


def load_settings(**overrides) -> PolicySettings:
    """Read and validate the settings; secrets are registered so no log line shows them."""
    settings = load(PolicySettings, ENV_NAMES, **overrides)
    for secret in (settings.signing_key, settings.mqtt_pass, settings.notify_urls):
        if secret is not None:
            logsetup.register_secret(secret.get_secret_value())
    return settings


def load_database_settings() -> DatabaseSettings:
    return load(DatabaseSettings)
