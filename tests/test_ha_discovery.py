"""ecoflow-ha against a real Mosquitto and the real database: what Home Assistant would read.

A subscriber on the discovery prefix and the state topics sees what Home Assistant sees. The
discovery configs are checked against Home Assistant's documented MQTT discovery schema (keys,
device classes and their units), the states against the database, and the energy counters for
what the energy dashboard needs: they never go down, not across a gap in the data, a restart
of the process or retention deleting the readings they were made from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from hadiscovery import entities
from hadiscovery.entities import Topics
from hadiscovery.service import Bridge

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0

# -- Home Assistant's documented discovery schema (MQTT sensor / binary sensor pages and the
# discovery page's abbreviation list), the parts these configs use. -------------------------
ABBREVIATIONS = {
    "availability": "avty", "availability_mode": "avty_mode", "default_entity_id": "def_ent_id",
    "device": "dev", "device_class": "dev_cla", "entity_category": "ent_cat",
    "has_entity_name": "has_entity_name", "json_attributes_template": "json_attr_tpl",
    "json_attributes_topic": "json_attr_t", "name": "name", "object_id": "obj_id",
    "origin": "o", "payload_off": "pl_off", "payload_on": "pl_on", "state_class": "stat_cla",
    "state_topic": "stat_t", "suggested_display_precision": "sug_dsp_prc",
    "unique_id": "uniq_id", "unit_of_measurement": "unit_of_meas",
    "value_template": "val_tpl",
}
DEVICE_KEYS = {"identifiers", "connections", "name", "manufacturer", "model", "model_id",
               "serial_number", "hw_version", "sw_version", "suggested_area", "via_device",
               "configuration_url"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
# Sensor device classes used here and the units Home Assistant accepts for each.
SENSOR_UNITS = {"battery": {"%"}, "power": {"W", "kW"}, "energy": {"Wh", "kWh", "MWh"},
                "temperature": {"°C", "°F"}, "duration": {"d", "h", "min", "s"},
                "timestamp": {None}}
BINARY_SENSOR_CLASSES = {"power", "connectivity", "battery", "plug", "problem", "running"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
DISCOVERY_TOPIC = r"^[^/]+/(sensor|binary_sensor)/[a-zA-Z0-9_-]+/[a-zA-Z0-9_-]+/config$"


def check_home_assistant_schema(topic: str, config: dict) -> None:
    import re

    assert re.match(DISCOVERY_TOPIC, topic), topic
    component = topic.split("/")[1]
    assert set(config) <= set(ABBREVIATIONS), set(config) - set(ABBREVIATIONS)
    for required in ("unique_id", "state_topic", "device", "origin", "availability", "name"):
        assert required in config, (topic, required)
    assert config["device"]["identifiers"] and set(config["device"]) <= DEVICE_KEYS
    assert config["origin"]["name"] and set(config["origin"]) <= ORIGIN_KEYS
    for entry in config["availability"]:
        assert entry["topic"] and set(entry) <= AVAILABILITY_KEYS
    assert config["availability_mode"] in ("all", "any", "latest")
    assert config["default_entity_id"] == f"{component}.{config['object_id']}"
    assert re.fullmatch(r"[a-z0-9_]+", config["object_id"])
    cls = config.get("device_class")
    if component == "sensor":
        if cls is not None:
            assert config.get("unit_of_measurement") in SENSOR_UNITS[cls], config
        if cls == "energy":
            assert config["state_class"] in ("total", "total_increasing")
        if cls == "timestamp":
            assert "state_class" not in config and "unit_of_measurement" not in config
        if "state_class" in config:
            assert config["state_class"] in STATE_CLASSES
    else:
        assert cls is None or cls in BINARY_SENSOR_CLASSES
        assert "unit_of_measurement" not in config and "state_class" not in config
        assert config["payload_on"] == entities.ON and config["payload_off"] == entities.OFF


# -- a Home Assistant stand-in: every retained message under the prefixes --------------------
class Watcher:
    def __init__(self, broker, *filters: str):
        self.latest: dict[str, bytes] = {}
        self.history: dict[str, list[bytes]] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"ha-test-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert subscribed.wait(5)

    def _message(self, client, userdata, message) -> None:
        with self.cond:
            if message.payload:
                self.latest[message.topic] = message.payload
            else:
                self.latest.pop(message.topic, None)
            self.history.setdefault(message.topic, []).append(message.payload)
            self.cond.notify_all()

    def wait(self, topic: str, predicate=lambda payload: True, timeout: float = WAIT):
        """The first value of `topic` (JSON when it is JSON) that satisfies predicate."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if topic in self.latest:
                    value = _decode(self.latest[topic])
                    if predicate(value):
                        return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{topic}: nothing matching in {timeout} s; last: "
                                         f"{self.latest.get(topic)!r}")
                self.cond.wait(left)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _decode(payload: bytes):
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode()


# -- fixtures ---------------------------------------------------------------------------------
READING = """
INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent, remain_time_min,
    watts_in_sum, watts_out_sum, ac_in_watts, ac_out_watts, pv_in_watts, grid_connected,
    battery_temp_c, source, raw_data)
VALUES (coalesce(%(base)s::timestamptz, now()) - make_interval(secs => %(age)s), %(sn)s, %(soc)s, %(soc)s - 2, %(runtime)s,
        %(win)s, %(wout)s, %(ac_in)s, %(ac_out)s, %(pv)s, %(grid)s, %(temp)s, 'rest', '{}')
"""


def reading(db, sn: str, age: float, *, soc=80.5, runtime=95, win=500, wout=100, ac_in=300,
            ac_out=90, pv=200, grid=True, temp=25.5, base=None) -> None:
    """A reading `age` seconds before `base` (default: now)."""
    db.execute(READING, {"base": base, "sn": sn, "age": age, "soc": soc, "runtime": runtime, "win": win,
                         "wout": wout, "ac_in": ac_in, "ac_out": ac_out, "pv": pv,
                         "grid": grid, "temp": temp})


@pytest.fixture
def topics() -> Topics:
    tag = uuid.uuid4().hex[:8]  # the broker is shared by the session: retained messages stay
    return Topics(prefix=f"ha-{tag}", base=f"ecoflow-ha-{tag}")


@pytest.fixture
def watcher(mqtt_broker, topics):
    w = Watcher(mqtt_broker, f"{topics.prefix}/#", f"{topics.base}/#")
    yield w
    w.close()


class Running:
    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.thread = threading.Thread(target=bridge.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.bridge.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def start_bridge(db_url, mqtt_broker, topics):
    running: list[Running] = []

    def start(**kw) -> Running:
        kw.setdefault("poll_sec", 0.3)
        bridge = Bridge(db_url, topics, mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port,
                        client_id=f"ecoflow-ha-{uuid.uuid4().hex[:6]}", **kw)
        running.append(Running(bridge))
        return running[-1]

    yield start
    for r in running:
        r.stop()


@pytest.fixture
def stack(db):
    db.execute("""INSERT INTO devices (device_sn, name, model, site, stale_after_sec,
                                       dead_after_sec)
                  VALUES ('R331ZEB4ZEA0001', 'Study', 'DELTA 2', 'Office', 60, 300),
                         ('P2MINI0002', NULL, NULL, NULL, 60, 300)""")
    reading(db, "R331ZEB4ZEA0001", 3)
    # A station that reports no temperature, solar, AC ports or grid state.
    reading(db, "P2MINI0002", 3, soc=42, ac_in=None, ac_out=None, pv=None, grid=None,
            temp=None)
    db.execute("INSERT INTO agents (agent_id, name) VALUES ('nas-01', 'NAS'), ('pc.02', NULL)")
    db.execute("""INSERT INTO agent_status (agent_id, online, version, platform, host)
                  VALUES ('nas-01', true, '1.4', 'linux', 'nas')""")
    command = uuid.uuid4()
    db.execute("""INSERT INTO commands (id, agent_id, action, episode_id, reason, ttl_sec,
                      issued_at, expires_at, payload, status)
                  VALUES (%s, 'nas-01', 'shutdown', 'ep-1', 'SoC 9 %% below 10 %%', 300,
                          now() - interval '1 minute', now() + interval '4 minutes',
                          '{"sig": "secret-signature"}', 'scheduled')""", [command])
    db.execute("""INSERT INTO command_acks (command_id, agent_id, status, host, detail, payload)
                  VALUES (%s, 'nas-01', 'scheduled', 'nas', 'in 120 s', '{}')""", [command])
    return command


def configs(watcher: Watcher, topics: Topics) -> dict[str, dict]:
    return {t: json.loads(p) for t, p in watcher.latest.items()
            if t.startswith(topics.prefix + "/") and t.endswith("/config")}


def wait_configs(watcher, topics, count: int) -> dict[str, dict]:
    deadline = time.monotonic() + WAIT
    while len(configs(watcher, topics)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return configs(watcher, topics)


STUDY_KEYS = {e.key for e in entities.STATION_ENTITIES + entities.ENERGY_ENTITIES}
MINI_KEYS = {"soc", "soc_min", "input_power", "output_power", "runtime", "last_reading",
             "energy_charged", "energy_discharged"}
EXPECTED = len(STUDY_KEYS) + len(MINI_KEYS) + 2 * len(entities.AGENT_ENTITIES)


# -- discovery --------------------------------------------------------------------------------
def test_discovery_configs_follow_home_assistants_schema(stack, watcher, topics, start_bridge,
                                                        mqtt_broker):
    start_bridge()
    found = wait_configs(watcher, topics, EXPECTED)
    assert len(found) == EXPECTED, sorted(found)
    for topic, config in found.items():
        check_home_assistant_schema(topic, config)
    by_id = {c["unique_id"]: c for c in found.values()}
    assert len(by_id) == len(found), "unique ids must be unique"
    # One device per station and per agent; ids made from the serial number, not the name.
    study = {k: v for k, v in by_id.items() if k.startswith("ecoflow_R331ZEB4ZEA0001_")}
    assert {k.removeprefix("ecoflow_R331ZEB4ZEA0001_") for k in study} == STUDY_KEYS
    mini = {k.removeprefix("ecoflow_P2MINI0002_") for k in by_id
            if k.startswith("ecoflow_P2MINI0002_")}
    assert mini == MINI_KEYS, "only what the station reports"
    device = by_id["ecoflow_R331ZEB4ZEA0001_soc"]["device"]
    assert device == {"identifiers": ["ecoflow_R331ZEB4ZEA0001"], "name": "Study",
                      "manufacturer": "EcoFlow", "serial_number": "R331ZEB4ZEA0001",
                      "model": "DELTA 2", "suggested_area": "Office"}
    assert by_id["ecoflow_P2MINI0002_soc"]["device"]["name"] == "P2MINI0002"
    expect = {
        "soc": ("battery", "measurement", "%"),
        "input_power": ("power", "measurement", "W"),
        "solar_power": ("power", "measurement", "W"),
        "ac_output_power": ("power", "measurement", "W"),
        "runtime": ("duration", "measurement", "min"),
        "battery_temperature": ("temperature", "measurement", "°C"),
        "energy_charged": ("energy", "total_increasing", "kWh"),
        "energy_solar": ("energy", "total_increasing", "kWh"),
        "energy_ac_in": ("energy", "total_increasing", "kWh"),
    }
    for key, (cls, state_class, unit) in expect.items():
        c = study[f"ecoflow_R331ZEB4ZEA0001_{key}"]
        assert (c["device_class"], c["state_class"], c["unit_of_measurement"]) == (
            cls, state_class, unit), key
    grid = study["ecoflow_R331ZEB4ZEA0001_grid"]
    assert grid["device_class"] == "power"
    assert f"{topics.prefix}/binary_sensor/ecoflow_r331zeb4zea0001/grid/config" in found
    # Live values follow the station's liveness and ours; the counters only ours.
    soc = study["ecoflow_R331ZEB4ZEA0001_soc"]
    assert [a["topic"] for a in soc["availability"]] == [
        topics.status, topics.station("R331ZEB4ZEA0001", "availability")]
    assert soc["availability_mode"] == "all"
    energy = study["ecoflow_R331ZEB4ZEA0001_energy_charged"]
    assert [a["topic"] for a in energy["availability"]] == [topics.status]
    # Agents: online as connectivity, last command and last ack with their details.
    online = by_id["ecoflow_agent_nas-01_online"]
    assert online["device_class"] == "connectivity"
    assert online["device"]["name"] == "NAS" and online["device"]["sw_version"] == "1.4"
    assert by_id["ecoflow_agent_pc.02_online"]["device"]["name"] == "pc.02"
    assert by_id["ecoflow_agent_nas-01_last_ack"]["json_attributes_topic"] == topics.agent(
        "nas-01", "state")
    # Discovery configs and states are retained (HA restarts, late subscribers).
    late = Watcher(mqtt_broker, f"{topics.prefix}/#", f"{topics.base}/#")
    try:
        assert len(wait_configs(late, topics, EXPECTED)) == EXPECTED
        assert late.wait(topics.station("R331ZEB4ZEA0001", "state"))["soc"] == 80.5
        assert late.wait(topics.status) == "online"
    finally:
        late.close()


def test_unique_ids_do_not_change_when_a_station_is_renamed(stack, db, watcher, topics,
                                                            start_bridge):
    start_bridge()
    before = wait_configs(watcher, topics, EXPECTED)
    db.execute("UPDATE devices SET name = 'Garage' WHERE device_sn = 'R331ZEB4ZEA0001'")
    soc_topic = f"{topics.prefix}/sensor/ecoflow_r331zeb4zea0001/soc/config"
    watcher.wait(soc_topic, lambda c: c["device"]["name"] == "Garage")
    after = configs(watcher, topics)
    assert set(after) == set(before)
    assert {t: (c["unique_id"], c["object_id"]) for t, c in after.items()} == {
        t: (c["unique_id"], c["object_id"]) for t, c in before.items()}


# -- states -----------------------------------------------------------------------------------
def test_station_and_agent_states_equal_the_database(stack, db, watcher, topics, start_bridge):
    start_bridge()
    state = watcher.wait(topics.station("R331ZEB4ZEA0001", "state"))
    row = db.execute("""SELECT soc_percent, soc_min_percent, watts_in_sum, watts_out_sum,
                               pv_in_watts, ac_in_watts, ac_out_watts, remain_time_min,
                               battery_temp_c, grid_connected,
                               to_char(ts AT TIME ZONE 'UTC',
                                       'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                          FROM ecoflow_latest WHERE device_sn = 'R331ZEB4ZEA0001'""").fetchone()
    assert (state["soc"], state["soc_min"], state["watts_in"], state["watts_out"],
            state["solar_watts"], state["ac_in_watts"], state["ac_out_watts"],
            state["runtime_min"], state["battery_temp_c"]) == row[:9]
    assert state["grid"] == "ON" and row[9] is True
    assert state["ts"] == row[10]
    mini = watcher.wait(topics.station("P2MINI0002", "state"))
    assert mini["grid"] is None and mini["battery_temp_c"] is None and mini["soc"] == 42
    assert watcher.wait(topics.station("R331ZEB4ZEA0001", "availability")) == "online"

    agent = watcher.wait(topics.agent("nas-01", "state"))
    assert agent["online"] == "ON"
    assert agent["last_command"]["state"] == "shutdown"
    assert agent["last_command"]["id"] == str(stack)
    assert agent["last_command"]["status"] == "scheduled"
    assert agent["last_command"]["reason"] == "SoC 9 % below 10 %"
    assert agent["last_ack"] == {"state": "scheduled", "command_id": str(stack),
                                 "received_at": agent["last_ack"]["received_at"],
                                 "host": "nas", "detail": "in 120 s"}
    assert b"secret-signature" not in b"".join(watcher.latest.values())
    unseen = watcher.wait(topics.agent("pc.02", "state"))
    assert unseen == {"online": None, "last_seen": None, "last_command": None,
                      "last_ack": None}

    # A new reading reaches Home Assistant without waiting for the poll.
    reading(db, "R331ZEB4ZEA0001", 0, soc=61.0, grid=False)
    state = watcher.wait(topics.station("R331ZEB4ZEA0001", "state"),
                         lambda s: s["soc"] == 61.0)
    assert state["grid"] == "OFF"
    db.execute("UPDATE agent_status SET online = false WHERE agent_id = 'nas-01'")
    watcher.wait(topics.agent("nas-01", "state"), lambda s: s["online"] == "OFF")


def test_availability_goes_offline_when_the_station_goes_stale(db, watcher, topics,
                                                               start_bridge):
    db.execute("""INSERT INTO devices (device_sn, stale_after_sec, dead_after_sec)
                  VALUES ('STALE01', 2, 600)""")
    reading(db, "STALE01", 0)
    start_bridge()
    topic = topics.station("STALE01", "availability")
    assert watcher.wait(topic) == "online"
    # No reading for longer than stale_after_sec: offline, with no new reading to trigger it.
    assert watcher.wait(topic, lambda v: v == "offline", timeout=6) == "offline"
    reading(db, "STALE01", 0)
    assert watcher.wait(topic, lambda v: v == "online") == "online"


def test_our_own_status_is_offline_once_the_bridge_stops(stack, watcher, topics, start_bridge):
    running = start_bridge()
    assert watcher.wait(topics.status) == "online"
    running.stop()
    assert watcher.wait(topics.status, lambda v: v == "offline") == "offline"


def test_home_assistant_birth_message_makes_discovery_published_again(stack, watcher, topics,
                                                                      start_bridge):
    """Home Assistant restarted with a broker that lost its retained messages: its birth
    message (`online` on homeassistant/status) must bring every entity back."""
    running = start_bridge()
    found = wait_configs(watcher, topics, EXPECTED)
    assert len(found) == EXPECTED
    for topic in found:  # what a broker without persistence forgets
        watcher.publish(topic, b"", retain=True)
    watcher.publish(topics.station("R331ZEB4ZEA0001", "state"), b"", retain=True)
    deadline = time.monotonic() + 2
    while configs(watcher, topics) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert configs(watcher, topics) == {}
    time.sleep(2 * running.bridge.poll_sec)
    assert configs(watcher, topics) == {}, "unchanged payloads are not sent again by themselves"

    watcher.publish(f"{topics.prefix}/status", "online")
    assert len(wait_configs(watcher, topics, EXPECTED)) == EXPECTED
    assert watcher.wait(topics.station("R331ZEB4ZEA0001", "state"))["soc"] == 80.5


# -- energy counters --------------------------------------------------------------------------
def wh(power_w: float, seconds: float) -> float:
    return power_w * seconds / 3600.0


def counters_of(db, sn: str) -> dict:
    row = db.execute("""SELECT charged_wh, discharged_wh, solar_wh, ac_in_wh, ac_out_wh
                          FROM energy_counters WHERE device_sn = %s""", [sn]).fetchone()
    return dict(zip(("charged_wh", "discharged_wh", "solar_wh", "ac_in_wh", "ac_out_wh"), row))


def assert_never_decreasing(history: list[bytes]) -> None:
    values = [json.loads(p) for p in history if p]
    assert values
    for before, after in zip(values, values[1:]):
        for field in entities.ENERGY_COLUMNS:
            assert after[field] >= before[field], (field, before, after)


def run_process(db_url: str, broker, topics: Topics) -> subprocess.Popen:
    env = dict(os.environ, DATABASE_URL=db_url, MQTT_HOST=broker.host,
               MQTT_PORT=str(broker.port), HA_DISCOVERY_PREFIX=topics.prefix,
               HA_BASE_TOPIC=topics.base, HA_POLL_SEC="0.3",
               MQTT_CLIENT_ID=f"ecoflow-ha-{uuid.uuid4().hex[:6]}")
    return subprocess.Popen([sys.executable, "-m", "hadiscovery"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_process(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    return out


def test_energy_counters_survive_a_restart_and_skip_a_gap(db, db_url, mqtt_broker, watcher,
                                                          topics):
    """Counters come from the database: a restarted process continues them, a gap in the data
    (readings further apart than 900 s) adds nothing, and they equal energy_daily's
    integration of the same readings."""
    sn = "ENERGY01"
    db.execute("INSERT INTO devices (device_sn, stale_after_sec) VALUES (%s, 60)", [sn])
    t0 = 4000
    base = db.execute("SELECT now()").fetchone()[0]
    reading(db, sn, t0, base=base, win=500, wout=100, pv=200, ac_in=300, ac_out=90)
    topic = topics.station(sn, "energy")

    proc = run_process(db_url, mqtt_broker, topics)
    try:
        first = watcher.wait(topic)
        assert {f: first[f] for f in entities.ENERGY_COLUMNS} == dict.fromkeys(
            entities.ENERGY_COLUMNS, 0.0), "a counter starts at 0 at the latest reading"
    finally:
        stop_process(proc)

    # While the process is down: two readings 60 s apart, then 30 minutes of nothing, then two
    # more 60 s apart.
    reading(db, sn, t0 - 60, base=base, win=100, wout=400, pv=0, ac_in=0, ac_out=380)
    reading(db, sn, t0 - 120, base=base, win=500, wout=100, pv=200, ac_in=300, ac_out=90)
    reading(db, sn, t0 - 1920, base=base, win=300, wout=300, pv=50, ac_in=250, ac_out=280)
    reading(db, sn, t0 - 1980, base=base, win=0, wout=0, pv=0, ac_in=0, ac_out=0)
    expected_wh = {
        "charged_wh": wh(400, 60) + 0 + 0,
        "discharged_wh": 0 + wh(300, 60) + 0,
        "solar_wh": wh(200, 60) + 0 + wh(50, 60),
        "ac_in_wh": wh(300, 60) + 0 + wh(250, 60),
        "ac_out_wh": wh(90, 60) + wh(380, 60) + wh(280, 60),
    }

    proc = run_process(db_url, mqtt_broker, topics)
    try:
        after = watcher.wait(topic, lambda v: v["ac_out_kwh"] > 0)
        stored = counters_of(db, sn)
        for column, value in expected_wh.items():
            assert stored[column] == pytest.approx(value, abs=1e-9), column
        for field, column in entities.ENERGY_COLUMNS.items():
            assert after[field] == pytest.approx(expected_wh[column] / 1000, abs=1e-6), field
        # The same integration as energy_daily's (same readings, same 900 s gap rule).
        daily = db.execute("SELECT sum(wh_solar), sum(wh_in), sum(wh_out) FROM energy_daily "
                           "WHERE device_sn = %s", [sn]).fetchone()
        assert stored["solar_wh"] == pytest.approx(daily[0], abs=1e-9)
        in_out = db.execute("SELECT in_wh, out_wh FROM energy_counters WHERE device_sn = %s",
                            [sn]).fetchone()
        assert in_out == pytest.approx(daily[1:], abs=1e-9)

        # Retention drops the readings the counters were made from: the counters stay.
        db.execute("DELETE FROM ecoflow_measurements WHERE device_sn = %s AND ts < now() - "
                   "interval '3000 seconds'", [sn])
        reading(db, sn, 0, win=0, wout=0, pv=0, ac_in=0, ac_out=0)
        watcher.wait(topic, lambda v: v["through"] != after["through"])
        assert counters_of(db, sn) == stored
        # A late reading behind the counted readings is not counted (it would change the past).
        reading(db, sn, t0 - 30, base=base, win=5000, wout=0, pv=5000, ac_in=5000, ac_out=0)
        time.sleep(1)
        assert counters_of(db, sn) == stored
    finally:
        stop_process(proc)
    assert_never_decreasing(watcher.history[topic])


def test_two_bridges_at_once_do_not_count_the_same_readings_twice(db, db_url):
    """The advisory lock: counters advanced from two connections add each reading once."""
    import psycopg

    from hadiscovery import queries

    sn = "TWICE01"
    base = db.execute("SELECT now()").fetchone()[0]
    reading(db, sn, 600, win=360, wout=0, base=base)
    queries.advance_counters(db, 900)
    for age in range(590, 0, -10):
        reading(db, sn, age, win=360, wout=0, base=base)
    with psycopg.connect(db_url, autocommit=True) as other:
        threads = [threading.Thread(target=queries.advance_counters, args=(conn, 900))
                   for conn in (db, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert counters_of(db, sn)["charged_wh"] == pytest.approx(wh(360, 590), abs=1e-9)


# -- the broker's ACL (compose/mosquitto/acl) -------------------------------------------------
def test_acl_lets_ecoflow_ha_publish_for_home_assistant_and_nothing_else(stack, db_url):
    """As the compose stack runs it: ecoflow-ha and Home Assistant each with its own broker
    user under the project's ACL, the default prefixes."""
    from testbed.mosquitto import MosquittoServer, random_users

    users = random_users("ecoflow-ha", "homeassistant")
    with MosquittoServer(users=users) as server:
        ha = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ha-acl",
                         protocol=mqtt.MQTTv5)
        ha.username_pw_set("homeassistant", users["homeassistant"])
        seen: dict[str, bytes] = {}
        ha.on_message = lambda c, u, m: seen.__setitem__(m.topic, m.payload)
        ha.connect(server.host, server.port)
        ha.loop_start()
        ha.subscribe([("homeassistant/#", 1), ("ecoflow-ha/#", 1), ("power-manager/#", 1),
                      ("bridge-ecoflow/#", 1)])
        bridge = Bridge(db_url, Topics(), mqtt_host=server.host, mqtt_port=server.port,
                        mqtt_user="ecoflow-ha", mqtt_pass=users["ecoflow-ha"], poll_sec=0.3)
        running = Running(bridge)
        try:
            state = "ecoflow-ha/station/r331zeb4zea0001/state"
            deadline = time.monotonic() + WAIT
            while (len([t for t in seen if t.endswith("/config")]) < EXPECTED
                   or state not in seen) and time.monotonic() < deadline:
                time.sleep(0.05)  # the states follow the configs
            assert len([t for t in seen if t.endswith("/config")]) == EXPECTED
            assert seen["ecoflow-ha/status"] == b"online"
            assert state in seen
            # Home Assistant's birth message reaches ecoflow-ha through the ACL.
            rounds = bridge.rounds
            seen.clear()
            ha.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)
            deadline = time.monotonic() + WAIT
            while len([t for t in seen if t.endswith("/config")]) < EXPECTED \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len([t for t in seen if t.endswith("/config")]) == EXPECTED
            assert bridge.rounds > rounds
            # ecoflow-ha may not command agents nor fake readings.
            bridge.client.publish("power-manager/nas-01/cmd", b"{}", qos=1).wait_for_publish(5)
            bridge.client.publish("bridge-ecoflow/X/data", b"{}", qos=1).wait_for_publish(5)
            time.sleep(0.5)
            assert not [t for t in seen if t.startswith(("power-manager/", "bridge-ecoflow/"))]
        finally:
            running.stop()
            ha.loop_stop()
            ha.disconnect()
