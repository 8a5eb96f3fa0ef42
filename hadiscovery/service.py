"""The bridge's loop: read the database, publish discovery configs and states to the broker.

One thread owns the database connection and does all publishing; paho's thread only sets
flags (connected, Home Assistant's birth message seen). Everything is published retained, and
a payload is sent again only when it changed, or after a (re)connect or a birth message, when
everything is sent again (a broker without persistence forgets retained messages).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import paho.mqtt.client as mqtt
import psycopg

from hadiscovery import entities, queries
from hadiscovery.entities import OFFLINE, ONLINE, Topics
from servicekit import logging as logsetup
from servicekit.mqtt import make_client

log = logging.getLogger("ecoflow.ha")

READINGS_CHANNEL = "ecoflow_readings"  # the insert trigger's channel (migration 0002)


class Bridge:
    def __init__(self, db_url: str, topics: Topics, *, mqtt_host: str, mqtt_port: int = 1883,
                 mqtt_user: str | None = None, mqtt_pass: str | None = None,
                 mqtt_tls_ca: str | None = None, client_id: str = "ecoflow-ha",
                 ha_status_topic: str | None = None, poll_sec: float = 5.0,
                 max_gap_sec: float = 900.0):
        self.db_url = db_url
        self.topics = topics
        self.ha_status_topic = ha_status_topic or f"{topics.prefix}/status"
        self.poll_sec = poll_sec
        self.max_gap_sec = max_gap_sec
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._resend = threading.Event()  # connected again, or HA was (re)born
        self._sent: dict[str, bytes] = {}
        self._configs: set[str] = set()
        self.rounds = 0
        self.client = make_client(client_id, mqtt_user, mqtt_pass, mqtt_tls_ca)
        self.client.will_set(topics.status, OFFLINE, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._mqtt = (mqtt_host, mqtt_port)

    # -- paho's thread ----------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe(self.ha_status_topic, qos=1)
        self._resend.set()
        self._wake.set()

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.ha_status_topic and message.payload.strip() == b"online":
            log.info("Home Assistant is online: publishing discovery again")
            self._resend.set()
            self._wake.set()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.client.connect_async(*self._mqtt)
        self.client.loop_start()
        try:
            while not self.stop.is_set():
                try:
                    with psycopg.connect(self.db_url, autocommit=True,
                                         connect_timeout=10) as conn, \
                            psycopg.connect(self.db_url, autocommit=True,
                                            connect_timeout=10) as listener:
                        conn.execute("SET TimeZone = 'UTC'")
                        listener.execute(f"LISTEN {READINGS_CHANNEL}")
                        while not self.stop.is_set():
                            self.round(conn)
                            self._wait(listener)
                except psycopg.Error as exc:
                    log.error("database unavailable (%s); retrying in %.0f s",
                              logsetup.redact(str(exc).strip()) or type(exc).__name__,
                              max(self.poll_sec, 1.0))
                    self.stop.wait(max(self.poll_sec, 1.0))
        finally:
            if self.client.is_connected():
                # A clean disconnect sends no Last Will: say it ourselves.
                self.client.publish(self.topics.status, OFFLINE, qos=1,
                                    retain=True).wait_for_publish(5)
            self.client.disconnect()
            self.client.loop_stop()

    def _wait(self, listener: psycopg.Connection) -> None:
        """Until a reading is stored, a flag is set, or poll_sec (liveness ages by itself)."""
        deadline = time.monotonic() + self.poll_sec
        while not self.stop.is_set() and not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for _ in listener.notifies(timeout=min(left, 0.5), stop_after=1):
                return
        self._wake.clear()

    def round(self, conn: psycopg.Connection) -> None:
        if not self.client.is_connected():
            return
        force = self._resend.is_set()
        self._resend.clear()
        if force:
            self._sent.clear()
            self._publish(self.topics.status, ONLINE)
        stations = queries.stations(conn)
        agents = queries.agents(conn)
        counters = queries.advance_counters(conn, self.max_gap_sec)
        configs: dict[str, dict] = {}
        states: dict[str, object] = {}
        for station in stations:
            sn = station["sn"]
            configs.update(entities.station_configs(self.topics, station))
            states[self.topics.station(sn, "state")] = entities.station_state(station)
            states[self.topics.station(sn, "availability")] = entities.station_availability(
                station)
            if sn in counters:
                states[self.topics.station(sn, "energy")] = entities.energy_state(counters[sn])
        for agent in agents:
            configs.update(entities.agent_configs(self.topics, agent))
            states[self.topics.agent(agent["agent_id"], "state")] = entities.agent_state(agent)
        # Configs first: HA subscribes to an entity's state topic when its config arrives.
        for topic, config in configs.items():
            self._publish(topic, config)
        self._configs.update(configs)
        for topic, state in states.items():
            self._publish(topic, state)
        self.rounds += 1

    def _publish(self, topic: str, payload) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(
            payload, separators=(",", ":"), ensure_ascii=False).encode()
        if self._sent.get(topic) == data:
            return
        info = self.client.publish(topic, data, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("publish to %s failed (%s); it is sent again next round", topic, info.rc)
            return
        self._sent[topic] = data
