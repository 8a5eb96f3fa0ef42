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
    "exporter_port": "EXPORTER_PORT",
}


def collector_settings(**kw) -> CollectorSettings:
    return load(CollectorSettings, ENV_NAMES, **kw)
