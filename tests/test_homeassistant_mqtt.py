"""ecoflow-ha through the real Home Assistant (2024.3, `.venv-ha`): the entities HA creates.

Home Assistant runs in its own venv (tests/ha_harness.py, `mqtt` mode) with its MQTT
integration set up from a config entry for the test's Mosquitto, discovery under the test's
own prefix. `python -m hadiscovery` publishes the seeded database to that broker. What Home
Assistant's state machine and registries then hold is what a user gets: entity ids, unique
ids, devices, device and state classes, units, and states equal to the database; a station that
goes stale turns its live entities `unavailable` (not its energy counters), and a stopped
ecoflow-ha turns everything `unavailable`. `make test-ha` builds `.venv-ha`; without it (or
without the MQTT integration's paho-mqtt in it) this test skips.
"""

from __future__ import annotations

import json
import select
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from hadiscovery import entities
from tests.test_ha_discovery import (  # noqa: F401 (stack and topics are fixtures)
    MINI_KEYS,
    STUDY_KEYS,
    reading,
    run_process,
    stack,
    stop_process,
    topics,
)

ROOT = Path(__file__).resolve().parent.parent
HA_VENV = ROOT / ".venv-ha"
HA_PYTHON = HA_VENV / "bin" / "python"
HARNESS = ROOT / "tests" / "ha_harness.py"
# The MQTT integration's requirement and its dependency file_upload's (their manifest.json):
# Home Assistant installs them only at run time, the harness does not.
HAS_MQTT_REQUIREMENTS = all(any(HA_VENV.glob(f"lib/python3*/site-packages/{module}"))
                            for module in ("paho/mqtt/client.py", "janus/__init__.py"))

pytestmark = [
    pytest.mark.homeassistant,
    pytest.mark.skipif(not (HA_VENV / ".installed").exists(),
                       reason="Home Assistant's venv .venv-ha is absent: `make test-ha` builds it"),
    pytest.mark.skipif(not HAS_MQTT_REQUIREMENTS,
                       reason="paho-mqtt==1.6.1 and janus==1.0.0 (Home Assistant's MQTT "
                              "integration needs them) are not in .venv-ha"),
]

STUDY, MINI = "R331ZEB4ZEA0001", "P2MINI0002"


class HomeAssistant:
    """The harness subprocess: one JSON request line in, one JSON reply line out."""

    def __init__(self, broker, prefix: str, log: Path):
        self.log = log
        self._stderr = log.open("w")
        self.proc = subprocess.Popen(
            [str(HA_PYTHON), str(HARNESS), "mqtt", broker.host, str(broker.port), prefix],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0)

    def wait(self, wanted: dict[str, str | None], timeout: float = 20.0) -> dict:
        """Home Assistant's states and registry once `wanted` holds (or after timeout)."""
        try:
            self.proc.stdin.write(json.dumps({"wait": wanted, "timeout": timeout}).encode()
                                  + b"\n")
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 30)
            line = self.proc.stdout.readline() if ready else b""
        except BrokenPipeError:  # it has exited: its log says why
            line = b""
        assert line, f"Home Assistant did not answer: {self.tail()}"
        reply = json.loads(line)
        missing = {e: (reply["states"].get(e) or {}).get("state") for e in wanted}
        assert reply["ok"], f"waited for {wanted}, got {missing}; {self.tail()}"
        return reply

    def tail(self) -> str:
        self._stderr.flush()
        return self.log.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"stop": true}\n')
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def home_assistant(mqtt_broker, topics, tmp_path):  # noqa: F811 (topics is the imported fixture)
    ha = HomeAssistant(mqtt_broker, topics.prefix, tmp_path / "home-assistant.log")
    try:
        yield ha
    finally:
        ha.stop()


def entity_id(component: str, node: str, key: str) -> str:
    return f"{component}.{node}_{key}"


def station_ids(sn: str, keys: set[str]) -> dict[str, str]:
    """key -> entity id, for the keys the station has."""
    node = entities.station_node(sn)
    return {e.key: entity_id(e.component, node, e.key)
            for e in entities.STATION_ENTITIES + entities.ENERGY_ENTITIES if e.key in keys}


def test_home_assistant_creates_the_entities_with_the_databases_values(
        stack, db, db_url, mqtt_broker, topics, home_assistant):  # noqa: F811
    study = station_ids(STUDY, STUDY_KEYS)
    mini = station_ids(MINI, MINI_KEYS)
    nas, pc = entities.agent_node("nas-01"), entities.agent_node("pc.02")
    nas_online = entity_id("binary_sensor", nas, "online")
    proc = run_process(db_url, mqtt_broker, topics)
    try:
        ha = home_assistant.wait(
            {**dict.fromkeys(study.values()), **dict.fromkeys(mini.values()),
             nas_online: "on", f"sensor.{nas}_last_command": "shutdown",
             f"sensor.{nas}_last_ack": "scheduled", f"binary_sensor.{pc}_online": "*"})
        states, registry = ha["states"], ha["entities"]

        # Only what each station reports: no solar, AC or grid entities for the mini.
        ours = {e for e in states if ".ecoflow_" in e}
        assert ours == set(study.values()) | set(mini.values()) | {
            entity_id(e.component, node, e.key) for node in (nas, pc)
            for e in entities.AGENT_ENTITIES}, ours

        # Classes, units, unique ids and the device, as Home Assistant registered them.
        for e in entities.STATION_ENTITIES + entities.ENERGY_ENTITIES:
            attrs, entry = states[study[e.key]]["attributes"], registry[study[e.key]]
            assert attrs.get("device_class") == e.device_class, e.key
            assert attrs.get("state_class") == e.state_class, e.key
            assert attrs.get("unit_of_measurement") == e.unit, e.key
            assert entry["unique_id"] == f"ecoflow_{STUDY}_{e.key}"
            assert entry["platform"] == "mqtt"
            assert entry["entity_category"] == e.category, e.key
            assert entry["device"] == {
                "name": "Study", "manufacturer": "EcoFlow", "model": "DELTA 2",
                "serial_number": STUDY, "sw_version": None, "suggested_area": "Office",
                "identifiers": [f"mqtt|ecoflow_{STUDY}"]}, e.key
        assert states[study["soc"]]["attributes"]["friendly_name"] == "Study Battery"
        assert registry[mini["soc"]]["device"]["name"] == MINI
        energy = states[study["energy_charged"]]["attributes"]
        assert (energy["device_class"], energy["state_class"], energy["unit_of_measurement"]
                ) == ("energy", "total_increasing", "kWh")

        # States equal the database.
        row = db.execute("""SELECT soc_percent, soc_min_percent, watts_in_sum, watts_out_sum,
                                   pv_in_watts, ac_in_watts, ac_out_watts, remain_time_min,
                                   battery_temp_c, grid_connected, ts
                              FROM ecoflow_latest WHERE device_sn = %s""", [STUDY]).fetchone()
        keys = ("soc", "soc_min", "input_power", "output_power", "solar_power",
                "ac_input_power", "ac_output_power", "runtime", "battery_temperature")
        for key, value in zip(keys, row[:9]):
            assert float(states[study[key]]["state"]) == pytest.approx(float(value)), key
        assert states[study["grid"]]["state"] == ("on" if row[9] else "off") == "on"
        # Home Assistant shows a timestamp sensor to the second.
        assert datetime.fromisoformat(states[study["last_reading"]]["state"]) == row[10].replace(
            microsecond=0)
        assert float(states[mini["soc"]]["state"]) == 42
        wh = db.execute("""SELECT device_sn, charged_wh, discharged_wh, solar_wh, ac_in_wh,
                                  ac_out_wh FROM energy_counters""").fetchall()
        counters = {r[0]: r[1:] for r in wh}
        for key, value in zip(("energy_charged", "energy_discharged", "energy_solar",
                               "energy_ac_in", "energy_ac_out"), counters[STUDY]):
            assert float(states[study[key]]["state"]) == pytest.approx(float(value) / 1000), key

        # Agents: connectivity, the last command and ack with their details.
        online = states[nas_online]
        assert online["attributes"]["device_class"] == "connectivity"
        assert registry[nas_online]["unique_id"] == "ecoflow_agent_nas-01_online"
        assert registry[nas_online]["device"]["name"] == "NAS"
        assert registry[nas_online]["device"]["sw_version"] == "1.4"
        command = states[f"sensor.{nas}_last_command"]["attributes"]
        assert (command["id"], command["status"], command["reason"]) == (
            str(stack), "scheduled", "SoC 9 % below 10 %")
        assert states[f"sensor.{nas}_last_ack"]["attributes"]["detail"] == "in 120 s"
        assert states[f"binary_sensor.{pc}_online"]["state"] == "unknown", "never seen"

        # The station goes stale (its stale_after_sec is below the reading's age): its live
        # entities become unavailable with no new reading; its counters stay.
        db.execute("UPDATE devices SET stale_after_sec = 1 WHERE device_sn = %s", [STUDY])
        ha = home_assistant.wait({study["soc"]: "unavailable", study["grid"]: "unavailable",
                                  study["last_reading"]: "unavailable"})
        assert ha["states"][study["energy_charged"]]["state"] != "unavailable"
        assert ha["states"][mini["soc"]]["state"] != "unavailable"
        assert ha["states"][nas_online]["state"] == "on"
        # A new reading brings it back, with the new values.
        db.execute("UPDATE devices SET stale_after_sec = 60 WHERE device_sn = %s", [STUDY])
        reading(db, STUDY, 0, soc=61.0, grid=False)
        ha = home_assistant.wait({study["grid"]: "off", study["soc"]: "*"})
        assert float(ha["states"][study["soc"]]["state"]) == 61.0
    finally:
        stop_process(proc)
    # ecoflow-ha stopped (its status `offline`): everything is unavailable, counters too.
    home_assistant.wait({study["energy_charged"]: "unavailable", nas_online: "unavailable",
                         mini["soc"]: "unavailable"})
