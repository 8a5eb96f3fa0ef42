"""The `ecoflow-ha` command: settings, then the discovery bridge until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from hadiscovery.entities import Topics
from hadiscovery.service import Bridge
from servicekit import logging as logsetup
from servicekit.settings import DatabaseSettings, load

log = logging.getLogger("ecoflow.ha")

TOPIC_PATTERN = r"^[^#+\s]+$"

ENV_NAMES = {
    "mqtt_host": "MQTT_HOST",
    "mqtt_port": "MQTT_PORT",
    "mqtt_user": "MQTT_USER",
    "mqtt_pass": "MQTT_PASS",
    "mqtt_tls_ca": "MQTT_TLS_CA",
    "mqtt_client_id": "MQTT_CLIENT_ID",
    "discovery_prefix": "HA_DISCOVERY_PREFIX",
    "status_topic": "HA_STATUS_TOPIC",
    "base_topic": "HA_BASE_TOPIC",
    "poll_sec": "HA_POLL_SEC",
    "max_gap_sec": "HA_ENERGY_MAX_GAP_SEC",
}


class HaSettings(DatabaseSettings):
    """The database settings (the stack's own role: it writes energy_counters) and MQTT."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    mqtt_host: str = Field(default="localhost", validation_alias="MQTT_HOST")
    mqtt_port: int = Field(default=1883, ge=1, le=65535, validation_alias="MQTT_PORT")
    mqtt_user: str | None = Field(default=None, validation_alias="MQTT_USER")
    mqtt_pass: SecretStr | None = Field(default=None, validation_alias="MQTT_PASS")
    mqtt_tls_ca: Path | None = Field(default=None, validation_alias="MQTT_TLS_CA")
    mqtt_client_id: str = Field(default="ecoflow-ha", min_length=1,
                                validation_alias="MQTT_CLIENT_ID")
    discovery_prefix: str = Field(default="homeassistant", pattern=TOPIC_PATTERN,
                                  validation_alias="HA_DISCOVERY_PREFIX")
    # Home Assistant's birth and last-will topic; default <discovery prefix>/status.
    status_topic: str | None = Field(default=None, pattern=TOPIC_PATTERN,
                                     validation_alias="HA_STATUS_TOPIC")
    base_topic: str = Field(default="ecoflow-ha", pattern=TOPIC_PATTERN,
                            validation_alias="HA_BASE_TOPIC")
    poll_sec: float = Field(default=5.0, ge=0.2, le=300, validation_alias="HA_POLL_SEC")
    max_gap_sec: float = Field(default=900.0, gt=0, le=86400,
                               validation_alias="HA_ENERGY_MAX_GAP_SEC")


def build_bridge(settings: HaSettings) -> Bridge:
    return Bridge(
        settings.libpq_url(),
        Topics(prefix=settings.discovery_prefix.rstrip("/"),
               base=settings.base_topic.rstrip("/")),
        mqtt_host=settings.mqtt_host, mqtt_port=settings.mqtt_port,
        mqtt_user=settings.mqtt_user,
        mqtt_pass=settings.mqtt_pass.get_secret_value() if settings.mqtt_pass else None,
        mqtt_tls_ca=str(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None,
        client_id=settings.mqtt_client_id, ha_status_topic=settings.status_topic,
        poll_sec=settings.poll_sec, max_gap_sec=settings.max_gap_sec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ecoflow-ha",
        description="Stations and agents in Home Assistant through MQTT discovery, with energy "
                    "counters for its energy dashboard (docs/ha-discovery.md).")
    parser.parse_args(argv)
    logsetup.setup()
    settings = load(HaSettings, ENV_NAMES)
    logsetup.register_secret(settings.postgres_password)
    if settings.mqtt_pass:
        logsetup.register_secret(settings.mqtt_pass.get_secret_value())
    bridge = build_bridge(settings)
    signal.signal(signal.SIGTERM, lambda *_: bridge.stop.set())
    log.info("publishing discovery under %s/ and states under %s/",
             bridge.topics.prefix, bridge.topics.base)
    try:
        bridge.run()
    except KeyboardInterrupt:
        bridge.stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
