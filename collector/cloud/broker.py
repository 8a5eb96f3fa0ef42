"""EcoFlow's MQTT broker as a client sees it: the TLS client both brokers need, and the CONNACK
codes that mean "these credentials are no good"."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from collector.cloud.api import MqttCredentials

# MQTT CONNACK reason codes that mean "these credentials are no good" (v3 4 and 5, as paho maps
# them to v5 codes), and their v5 equivalents.
AUTH_REFUSED = {134, 135, 4, 5}


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
