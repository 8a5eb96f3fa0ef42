"""MQTT v5 client set-up shared by the services: credentials, TLS, persistent sessions."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SESSION_EXPIRY_SEC = 7 * 24 * 3600


def make_client(client_id: str, user: str | None = None, password: str | None = None,
                tls_ca: str | None = None, manual_ack: bool = False) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    if user:
        client.username_pw_set(user, password)
    if tls_ca:
        client.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def persistent_session(receive_maximum: int = 1000) -> Properties:
    """CONNECT properties for a session the broker keeps while we are away, and a receive
    window wide enough that acking after a batch commit does not throttle delivery."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = SESSION_EXPIRY_SEC
    props.ReceiveMaximum = receive_maximum
    return props
