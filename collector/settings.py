"""Collector settings: which sources to run, the local broker, batching, metrics."""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servicekit.settings import load

DEFAULT_BRIDGE_TOPICS = "bridge-ecoflow/+/data"


class CollectorSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

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
    batch_rows: int = Field(default=1000, ge=1, le=100_000, validation_alias="BATCH_ROWS")
    flush_interval_sec: float = Field(default=1.0, gt=0, le=60, validation_alias="FLUSH_INTERVAL_SEC")
    max_buffer_rows: int = Field(default=50_000, ge=100, validation_alias="MAX_BUFFER_ROWS")
    exporter_port: int = Field(default=9090, ge=0, le=65535, validation_alias="EXPORTER_PORT")

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
        known = {"bridge", "simulator", "nut"}
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
    "publish_state": "PUBLISH_STATE", "batch_rows": "BATCH_ROWS",
    "flush_interval_sec": "FLUSH_INTERVAL_SEC", "max_buffer_rows": "MAX_BUFFER_ROWS",
    "exporter_port": "EXPORTER_PORT", "simulator_scenario": "SIMULATOR_SCENARIO",
    "simulator_accel": "SIMULATOR_ACCEL", "simulator_interval_sec": "SIMULATOR_INTERVAL_SEC",
    "nut_host": "NUT_HOST", "nut_port": "NUT_PORT", "nut_ups": "NUT_UPS", "nut_user": "NUT_USER",
    "nut_password": "NUT_PASSWORD", "nut_poll_sec": "NUT_POLL_SEC",
    "nut_device_sn": "NUT_DEVICE_SN",
}


def collector_settings(**kw) -> CollectorSettings:
    return load(CollectorSettings, ENV_NAMES, **kw)
