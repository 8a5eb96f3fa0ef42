"""Collector settings: which sources to run, the local broker, batching, metrics."""

from __future__ import annotations

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from collector.cloud.plan import cloud_plan
from servicekit.settings import load

DEFAULT_BRIDGE_TOPICS = "bridge-ecoflow/+/data"


class CollectorSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    sources: str = Field(default="bridge", validation_alias="COLLECTOR_SOURCES")
    mqtt_host: str = Field(default="localhost", validation_alias="MQTT_HOST")
    mqtt_port: int = Field(default=1883, ge=1, le=65535, validation_alias="MQTT_PORT")
    mqtt_user: str | None = Field(default=None, validation_alias="MQTT_USER")
    mqtt_pass: str | None = Field(
        default=None, validation_alias=AliasChoices("MQTT_PASS", "MQTT_PASSWORD")
    )
    mqtt_tls_ca: str | None = Field(default=None, validation_alias="MQTT_TLS_CA")
    client_id: str = Field(default="ecoflow-collector", validation_alias="COLLECTOR_CLIENT_ID")
    bridge_topics: str = Field(default=DEFAULT_BRIDGE_TOPICS, validation_alias="BRIDGE_TOPICS")
    publish_state: bool = Field(default=True, validation_alias="PUBLISH_STATE")
    state_interval_sec: float = Field(default=1.0, ge=0, le=3600,
                                      validation_alias="STATE_INTERVAL_SEC")
    batch_rows: int = Field(default=1000, ge=1, le=100_000, validation_alias="BATCH_ROWS")
    flush_interval_sec: float = Field(default=1.0, gt=0, le=60, validation_alias="FLUSH_INTERVAL_SEC")
    max_buffer_rows: int = Field(default=50_000, ge=100, validation_alias="MAX_BUFFER_ROWS")
    exporter_port: int = Field(default=9090, ge=0, le=65535, validation_alias="EXPORTER_PORT")
    # The seed Prometheus exporter's prefix of every metric name (docs/prometheus.md).
    metrics_prefix: str = Field(default="ecoflow", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
                                validation_alias="METRICS_PREFIX")

    simulator_scenario: str = Field(default="outage", validation_alias="SIMULATOR_SCENARIO")
    simulator_accel: float = Field(default=1.0, gt=0, le=10_000, validation_alias="SIMULATOR_ACCEL")
    simulator_interval_sec: float = Field(default=5.0, gt=0, le=3600,
                                          validation_alias="SIMULATOR_INTERVAL_SEC")

    nut_host: str = Field(default="localhost", validation_alias="NUT_HOST")
    nut_port: int = Field(default=3493, ge=1, le=65535, validation_alias="NUT_PORT")
    nut_ups: str = Field(default="ups", validation_alias="NUT_UPS")
    nut_user: str | None = Field(default=None, validation_alias="NUT_USER")
    nut_password: str | None = Field(default=None, validation_alias="NUT_PASSWORD")
    nut_poll_sec: float = Field(default=5.0, gt=0, le=3600, validation_alias="NUT_POLL_SEC")
    nut_device_sn: str | None = Field(default=None, validation_alias="NUT_DEVICE_SN")

    # EcoFlow cloud (COLLECTOR_SOURCES=ecoflow); the seeds' variable names.
    ecoflow_access_key: str | None = Field(default=None, validation_alias="ECOFLOW_ACCESS_KEY")
    ecoflow_secret_key: str | None = Field(default=None, validation_alias="ECOFLOW_SECRET_KEY")
    ecoflow_account_user: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ECOFLOW_ACCOUNT_USER", "ECOFLOW_USERNAME", "ECOFLOW_USER"),
    )
    ecoflow_account_password: str | None = Field(
        default=None, validation_alias=AliasChoices("ECOFLOW_ACCOUNT_PASSWORD", "ECOFLOW_PASSWORD")
    )
    ecoflow_api_host: str | None = Field(default=None, validation_alias="ECOFLOW_API_HOST")
    ecoflow_app_api_host: str | None = Field(default=None, validation_alias="ECOFLOW_APP_API_HOST")
    ecoflow_device_sn: str | None = Field(default=None, validation_alias="ECOFLOW_DEVICE_SN")
    ecoflow_device_list: str | None = Field(default=None, validation_alias="ECOFLOW_DEVICE_LIST")
    # The seed exporter's name for ECOFLOW_DEVICE_SN's station in the metrics
    # (<prefix>_device_info), instead of devices.name.
    ecoflow_device_name: str | None = Field(default=None, validation_alias="ECOFLOW_DEVICE_NAME")
    ecoflow_sources: str = Field(default="auto", validation_alias="ECOFLOW_SOURCES")
    collecting_interval: float = Field(default=30.0, ge=5, le=3600,
                                       validation_alias="COLLECTING_INTERVAL")
    ecoflow_tls_ca: str | None = Field(default=None, validation_alias="ECOFLOW_TLS_CA")
    ecoflow_mqtt_client_id: str | None = Field(default=None,
                                               validation_alias="ECOFLOW_MQTT_CLIENT_ID")
    ecoflow_latest_quotas_sec: float = Field(default=300.0, ge=10, le=3600,
                                             validation_alias="ECOFLOW_LATEST_QUOTAS_SEC")
    ecoflow_allow_control: bool = Field(default=False, validation_alias="ECOFLOW_ALLOW_CONTROL")
    # Liveness (collector.sources.liveness): the cadence expected of the push sources, and how
    # many expected periods without a reading make a source quiet, then stale.
    ecoflow_push_period_sec: float = Field(default=30.0, gt=0, le=3600,
                                           validation_alias="ECOFLOW_PUSH_PERIOD_SEC")
    bridge_period_sec: float = Field(default=30.0, gt=0, le=3600,
                                     validation_alias="BRIDGE_PERIOD_SEC")
    liveness_quiet_periods: float = Field(default=2.0, gt=0, le=100,
                                          validation_alias="LIVENESS_QUIET_PERIODS")
    liveness_stale_periods: float = Field(default=5.0, gt=0, le=1000,
                                          validation_alias="LIVENESS_STALE_PERIODS")
    # "failover": with a push source running, quota/all is polled only for stations whose
    # pushes are not fresh; "always": every COLLECTING_INTERVAL regardless.
    ecoflow_rest_poll: str = Field(default="failover", pattern="^(failover|always)$",
                                   validation_alias="ECOFLOW_REST_POLL")
    # A CONNACK that does not come within this long counts as refused: fresh credentials.
    ecoflow_connack_timeout_sec: float = Field(default=30.0, ge=1, le=600,
                                               validation_alias="ECOFLOW_CONNACK_TIMEOUT_SEC")

    @field_validator("liveness_stale_periods")
    @classmethod
    def _stale_after_quiet(cls, value: float, info) -> float:
        quiet = info.data.get("liveness_quiet_periods")
        if quiet is not None and value <= quiet:
            raise ValueError(f"must be more than LIVENESS_QUIET_PERIODS ({quiet:g})")
        return value

    @field_validator("ecoflow_sources")
    @classmethod
    def _cloud_sources(cls, value: str) -> str:
        chosen = {s.strip() for s in value.split(",") if s.strip()} or {"auto"}
        known = {"rest", "open_mqtt", "app_mqtt"}
        if chosen == {"auto"}:
            return "auto"
        unknown = chosen - known
        if unknown:
            raise ValueError(f"unknown EcoFlow source(s) {sorted(unknown)}: give auto, or a "
                             f"comma-separated choice of {sorted(known)}")
        return ",".join(sorted(chosen))

    @field_validator("ecoflow_tls_ca")
    @classmethod
    def _ca_exists(cls, value: str | None) -> str | None:
        import os

        if value and not os.path.isfile(value):
            raise ValueError(f"no such file: {value} (a PEM file of CA certificates)")
        return value or None

    @property
    def device_serials(self) -> list[str]:
        """ECOFLOW_DEVICE_SN and ECOFLOW_DEVICE_LIST together, in order, without repeats."""
        serials: list[str] = []
        for text in (self.ecoflow_device_sn, self.ecoflow_device_list):
            for sn in (text or "").replace(";", ",").split(","):
                if sn.strip() and sn.strip() not in serials:
                    serials.append(sn.strip())
        return serials

    @field_validator("simulator_scenario")
    @classmethod
    def _scenario(cls, value: str) -> str:
        from collector.sources.simulator import SCENARIOS

        if value not in SCENARIOS:
            raise ValueError(f"unknown scenario {value!r}: choose from {sorted(SCENARIOS)}")
        return value

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, value: str) -> str:
        known = {"bridge", "simulator", "nut", "ecoflow"}
        chosen = {s.strip() for s in value.split(",") if s.strip()}
        unknown = chosen - known
        if not chosen or unknown:
            raise ValueError(
                f"unknown source(s) {sorted(unknown)}: choose from {sorted(known)}, comma-separated"
            )
        return ",".join(sorted(chosen))

    @field_validator("bridge_topics")
    @classmethod
    def _topics(cls, value: str) -> str:
        topics = [t.strip() for t in value.split(",") if t.strip()]
        if not topics:
            raise ValueError("give at least one MQTT topic pattern, e.g. bridge-ecoflow/+/data")
        return ",".join(topics)

    @field_validator("ecoflow_device_name")
    @classmethod
    def _name_needs_one_serial(cls, value: str | None, info: ValidationInfo) -> str | None:
        value = (value or "").strip() or None
        if value and len(_serials(info.data.get("ecoflow_device_sn"))) != 1:
            raise ValueError("names the station in ECOFLOW_DEVICE_SN: set ECOFLOW_DEVICE_SN to "
                             "exactly one serial number, or name stations in the devices table "
                             "(devices.name) instead")
        return value

    @property
    def metrics_names(self) -> dict[str, str]:
        """Serial -> ECOFLOW_DEVICE_NAME, for the station ECOFLOW_DEVICE_SN names."""
        if not self.ecoflow_device_name:
            return {}
        return {_serials(self.ecoflow_device_sn)[0]: self.ecoflow_device_name}

    @property
    def topic_list(self) -> list[str]:
        return self.bridge_topics.split(",")

    @property
    def source_list(self) -> list[str]:
        return self.sources.split(",")


ENV_NAMES = {
    "sources": "COLLECTOR_SOURCES", "mqtt_host": "MQTT_HOST", "mqtt_port": "MQTT_PORT",
    "mqtt_user": "MQTT_USER", "mqtt_pass": "MQTT_PASS", "mqtt_tls_ca": "MQTT_TLS_CA",
    "client_id": "COLLECTOR_CLIENT_ID", "bridge_topics": "BRIDGE_TOPICS",
    "publish_state": "PUBLISH_STATE", "state_interval_sec": "STATE_INTERVAL_SEC",
    "batch_rows": "BATCH_ROWS",
    "flush_interval_sec": "FLUSH_INTERVAL_SEC", "max_buffer_rows": "MAX_BUFFER_ROWS",
    "exporter_port": "EXPORTER_PORT", "simulator_scenario": "SIMULATOR_SCENARIO",
    "metrics_prefix": "METRICS_PREFIX", "ecoflow_device_name": "ECOFLOW_DEVICE_NAME",
    "simulator_accel": "SIMULATOR_ACCEL", "simulator_interval_sec": "SIMULATOR_INTERVAL_SEC",
    "nut_host": "NUT_HOST", "nut_port": "NUT_PORT", "nut_ups": "NUT_UPS", "nut_user": "NUT_USER",
    "nut_password": "NUT_PASSWORD", "nut_poll_sec": "NUT_POLL_SEC",
    "nut_device_sn": "NUT_DEVICE_SN",
    "ecoflow_access_key": "ECOFLOW_ACCESS_KEY", "ecoflow_secret_key": "ECOFLOW_SECRET_KEY",
    "ecoflow_account_user": "ECOFLOW_ACCOUNT_USER",
    "ecoflow_account_password": "ECOFLOW_ACCOUNT_PASSWORD",
    "ecoflow_api_host": "ECOFLOW_API_HOST", "ecoflow_app_api_host": "ECOFLOW_APP_API_HOST",
    "ecoflow_device_sn": "ECOFLOW_DEVICE_SN", "ecoflow_device_list": "ECOFLOW_DEVICE_LIST",
    "ecoflow_sources": "ECOFLOW_SOURCES", "collecting_interval": "COLLECTING_INTERVAL",
    "ecoflow_tls_ca": "ECOFLOW_TLS_CA", "ecoflow_mqtt_client_id": "ECOFLOW_MQTT_CLIENT_ID",
    "ecoflow_latest_quotas_sec": "ECOFLOW_LATEST_QUOTAS_SEC",
    "ecoflow_allow_control": "ECOFLOW_ALLOW_CONTROL",
    "ecoflow_push_period_sec": "ECOFLOW_PUSH_PERIOD_SEC", "bridge_period_sec": "BRIDGE_PERIOD_SEC",
    "liveness_quiet_periods": "LIVENESS_QUIET_PERIODS",
    "liveness_stale_periods": "LIVENESS_STALE_PERIODS",
    "ecoflow_rest_poll": "ECOFLOW_REST_POLL",
    "ecoflow_connack_timeout_sec": "ECOFLOW_CONNACK_TIMEOUT_SEC",
}


def _serials(text: str | None) -> list[str]:
    return [sn.strip() for sn in (text or "").replace(";", ",").split(",") if sn.strip()]


def collector_settings(**kw) -> CollectorSettings:
    settings = load(CollectorSettings, ENV_NAMES, **kw)
    if "ecoflow" in settings.source_list:
        cloud_plan(settings)  # credentials present and consistent, or a clear start-up error
    return settings
