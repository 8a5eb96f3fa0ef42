"""What Home Assistant is told: MQTT discovery configs and the state payloads they read.

Pure functions, no I/O. One HA device per station and one per agent; every entity's
`unique_id` and `object_id` are made from the serial number or agent id (never the friendly
name), so renaming a station in `devices` renames the device in Home Assistant but keeps its
entities and their history. Keys are HA's full names, not the abbreviations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata

ORIGIN_NAME = "ecoflow-ups-stack"
ONLINE, OFFLINE = "online", "offline"
ON, OFF = "ON", "OFF"


@dataclass(frozen=True)
class Entity:
    key: str             # object id suffix and unique id suffix, never changed once released
    component: str       # sensor or binary_sensor
    name: str
    field: str           # the key in the state payload
    device_class: str | None = None
    state_class: str | None = None
    unit: str | None = None
    column: str | None = None   # optional entity: only when the station reports this column
    category: str | None = None  # entity_category
    precision: int | None = None


STATION_ENTITIES = (
    Entity("soc", "sensor", "Battery", "soc", "battery", "measurement", "%", precision=0),
    Entity("soc_min", "sensor", "Battery lowest module", "soc_min", "battery", "measurement",
           "%", column="soc_min_percent", precision=0),
    Entity("input_power", "sensor", "Input power", "watts_in", "power", "measurement", "W"),
    Entity("output_power", "sensor", "Output power", "watts_out", "power", "measurement", "W"),
    Entity("solar_power", "sensor", "Solar power", "solar_watts", "power", "measurement", "W",
           column="pv_in_watts"),
    Entity("ac_input_power", "sensor", "AC input power", "ac_in_watts", "power", "measurement",
           "W", column="ac_in_watts"),
    Entity("ac_output_power", "sensor", "AC output power", "ac_out_watts", "power",
           "measurement", "W", column="ac_out_watts"),
    Entity("runtime", "sensor", "Runtime remaining", "runtime_min", "duration", "measurement",
           "min", column="remain_time_min"),
    Entity("battery_temperature", "sensor", "Battery temperature", "battery_temp_c",
           "temperature", "measurement", "°C", column="battery_temp_c", precision=1),
    Entity("grid", "binary_sensor", "Grid power", "grid", "power", column="grid_connected"),
    Entity("last_reading", "sensor", "Last reading", "ts", "timestamp", category="diagnostic"),
)

# kWh counters for the energy dashboard: (key, name, energy_counters column, power column that
# must be reported for the counter to mean anything).
ENERGY_ENTITIES = (
    Entity("energy_charged", "sensor", "Energy charged", "charged_kwh", "energy",
           "total_increasing", "kWh", precision=3),
    Entity("energy_discharged", "sensor", "Energy discharged", "discharged_kwh", "energy",
           "total_increasing", "kWh", precision=3),
    Entity("energy_solar", "sensor", "Solar energy", "solar_kwh", "energy", "total_increasing",
           "kWh", column="pv_in_watts", precision=3),
    Entity("energy_ac_in", "sensor", "AC input energy", "ac_in_kwh", "energy",
           "total_increasing", "kWh", column="ac_in_watts", precision=3),
    Entity("energy_ac_out", "sensor", "AC output energy", "ac_out_kwh", "energy",
           "total_increasing", "kWh", column="ac_out_watts", precision=3),
)
# energy_counters column (Wh) for each kWh field of the energy payload.
ENERGY_COLUMNS = {"charged_kwh": "charged_wh", "discharged_kwh": "discharged_wh",
                  "solar_kwh": "solar_wh", "ac_in_kwh": "ac_in_wh", "ac_out_kwh": "ac_out_wh"}

AGENT_ENTITIES = (
    Entity("online", "binary_sensor", "Online", "online", "connectivity"),
    Entity("last_command", "sensor", "Last command", "last_command"),
    Entity("last_ack", "sensor", "Last ack", "last_ack"),
)


def slug(value: str) -> str:
    """A topic segment and object id: HA allows [a-zA-Z0-9_-] in discovery topics and
    [a-z0-9_] in entity ids."""
    return re.sub(r"[^a-z0-9_]+", "_", value.lower()).strip("_") or "_"


def sw_version() -> str:
    try:
        return metadata.version("ecoflow-ups-stack")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class Topics:
    """Where discovery configs and states go: `prefix` is HA's discovery prefix, `base` ours."""

    prefix: str = "homeassistant"
    base: str = "ecoflow-ha"

    @property
    def status(self) -> str:
        """Ours: retained `online`, `offline` as Last Will."""
        return f"{self.base}/status"

    def config(self, component: str, node: str, key: str) -> str:
        return f"{self.prefix}/{component}/{node}/{key}/config"

    def station(self, sn: str, what: str) -> str:
        return f"{self.base}/station/{slug(sn)}/{what}"

    def agent(self, agent_id: str, what: str) -> str:
        return f"{self.base}/agent/{slug(agent_id)}/{what}"


def _origin() -> dict:
    return {"name": ORIGIN_NAME, "sw_version": sw_version()}


def _entity_config(entity: Entity, node: str, ident: str, device: dict, state_topic: str,
                   availability: list[dict]) -> dict:
    object_id = f"{node}_{entity.key}"
    config = {
        "name": entity.name,
        "has_entity_name": True,
        # The serial number or agent id as it is: two ids that slug alike stay apart.
        "unique_id": f"{ident}_{entity.key}",
        "object_id": object_id,
        # object_id's successor (HA 2025.10); older releases drop the unknown key.
        "default_entity_id": f"{entity.component}.{object_id}",
        "device": device,
        "origin": _origin(),
        "state_topic": state_topic,
        "value_template": "{{ value_json." + entity.field + " }}",
        "availability": availability,
        "availability_mode": "all",
    }
    if entity.component == "binary_sensor":
        config["payload_on"], config["payload_off"] = ON, OFF
    if entity.device_class:
        config["device_class"] = entity.device_class
    if entity.state_class:
        config["state_class"] = entity.state_class
    if entity.unit:
        config["unit_of_measurement"] = entity.unit
    if entity.category:
        config["entity_category"] = entity.category
    if entity.precision is not None:
        config["suggested_display_precision"] = entity.precision
    return config


def station_node(sn: str) -> str:
    return f"ecoflow_{slug(sn)}"


def agent_node(agent_id: str) -> str:
    return f"ecoflow_agent_{slug(agent_id)}"


def station_configs(topics: Topics, station: dict) -> dict[str, dict]:
    """Discovery topic -> config for one station (a row of queries.STATIONS)."""
    sn = station["sn"]
    node = station_node(sn)
    ident = f"ecoflow_{sn}"
    device = {"identifiers": [ident], "name": station["name"] or sn, "manufacturer": "EcoFlow",
              "serial_number": sn}
    if station.get("model"):
        device["model"] = station["model"]
    if station.get("site"):
        device["suggested_area"] = station["site"]
    bridge = {"topic": topics.status, "payload_available": ONLINE,
              "payload_not_available": OFFLINE}
    live = [bridge, {"topic": topics.station(sn, "availability"),
                     "payload_available": ONLINE, "payload_not_available": OFFLINE}]
    reported = station.get("reported") or set()
    out = {}
    for entity in STATION_ENTITIES:
        if entity.column is None or entity.column in reported:
            out[topics.config(entity.component, node, entity.key)] = _entity_config(
                entity, node, ident, device, topics.station(sn, "state"), live)
    # The counters stay valid while the station is away: only our own liveness counts.
    for entity in ENERGY_ENTITIES:
        if entity.column is None or entity.column in reported:
            out[topics.config(entity.component, node, entity.key)] = _entity_config(
                entity, node, ident, device, topics.station(sn, "energy"), [bridge])
    return out


def agent_configs(topics: Topics, agent: dict) -> dict[str, dict]:
    """Discovery topic -> config for one agent (a row of servicekit.agents.AGENTS)."""
    agent_id = agent["agent_id"]
    node = agent_node(agent_id)
    ident = f"ecoflow_agent_{agent_id}"
    device = {"identifiers": [ident], "name": agent["name"] or agent_id,
              "manufacturer": "ecoflow-ups-stack", "model": "host agent"}
    if agent.get("platform"):
        device["model"] = f"host agent ({agent['platform']})"
    if agent.get("version"):
        device["sw_version"] = agent["version"]
    bridge = [{"topic": topics.status, "payload_available": ONLINE,
               "payload_not_available": OFFLINE}]
    state = topics.agent(agent_id, "state")
    out = {}
    for entity in AGENT_ENTITIES:
        config = _entity_config(entity, node, ident, device, state, bridge)
        if entity.key in ("last_command", "last_ack"):
            # The state is the action (ack status); the rest are the entity's attributes.
            field = "value_json." + entity.field
            config["value_template"] = "{{ " + field + ".state if " + field + " else None }}"
            config["json_attributes_topic"] = state
            config["json_attributes_template"] = "{{ (" + field + " or {}) | tojson }}"
        out[topics.config(entity.component, node, entity.key)] = config
    return out


# -- state payloads ------------------------------------------------------------------------
def _num(value):
    return None if value is None else float(value) if not isinstance(value, int) else value


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def station_state(station: dict) -> dict:
    grid = station.get("grid_connected")
    return {
        "soc": _num(station.get("soc_percent")),
        "soc_min": _num(station.get("soc_min_percent")),
        "watts_in": station.get("watts_in"),
        "watts_out": station.get("watts_out"),
        "solar_watts": station.get("pv_in_watts"),
        "ac_in_watts": station.get("ac_in_watts"),
        "ac_out_watts": station.get("ac_out_watts"),
        "runtime_min": station.get("runtime_min"),
        "battery_temp_c": _num(station.get("battery_temp_c")),
        "grid": None if grid is None else ON if grid else OFF,
        "ts": _iso(station.get("last_seen")),
    }


def station_availability(station: dict) -> str:
    """online while the latest reading is within the station's stale_after_sec."""
    return ONLINE if station.get("liveness") == "fresh" else OFFLINE


def energy_state(counters: dict) -> dict:
    # round() is monotonic: a counter that never goes down in Wh never goes down in kWh.
    out = {field: round(float(counters[column]) / 1000.0, 6)
           for field, column in ENERGY_COLUMNS.items()}
    out["since"] = _iso(counters.get("started_at"))
    out["through"] = _iso(counters.get("through_ts"))
    return out


def agent_state(agent: dict) -> dict:
    command = None
    if agent.get("command_id") is not None:
        command = {"state": agent["command_action"], "id": str(agent["command_id"]),
                   "status": agent["command_status"],
                   "issued_at": _iso(agent["command_issued_at"]),
                   "reason": agent["command_reason"], "episode_id": agent["command_episode_id"]}
    ack = None
    if agent.get("ack_status") is not None:
        ack = {"state": agent["ack_status"], "command_id": str(agent["ack_command_id"]),
               "received_at": _iso(agent["ack_received_at"]), "host": agent["ack_host"],
               "detail": agent["ack_detail"]}
    # Never seen ('unknown') is neither ON nor OFF.
    return {"online": {"online": ON, "offline": OFF}.get(agent.get("status")),
            "last_seen": _iso(agent.get("last_seen")),
            "last_command": command, "last_ack": ack}
