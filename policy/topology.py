"""Which stations power which hosts: read from DEVICE_TO_AGENTS_JSON and the policy file,
validated, and written into devices / agents / agent_supplies at start."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from policy import wol
from policy.settings import PolicySettings
from servicekit.settings import SettingsError

log = logging.getLogger("ecoflow.policy")

AGENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# What an EcoFlow serial number looks like, so a new station can be named before it reports.
SERIAL = re.compile(r"^[A-Z0-9]{8,32}$")

AGENT_KEYS = {
    "supplies", "name", "tier", "min_supplies", "soc_threshold", "runtime_threshold_min",
    "shutdown_delay_sec", "max_on_battery_sec", "enabled", "kind", "ups",
}
AGENT_KEYS |= set(wol.WOL_KEYS)  # Wake-on-LAN after power returns (policy/wol.py)
AGENT_KINDS = ("mqtt", "nut")
# A NUT UPS name as upsd takes it in ups.conf and on the command line (ups@host).
NUT_UPS_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEVICE_KEYS = {"name", "model", "site", "capacity_wh", "stale_after_sec", "dead_after_sec"}


@dataclass
class AgentConfig:
    agent_id: str
    supplies: list[str] = field(default_factory=list)  # serial numbers once resolved
    name: str | None = None
    tier: int = 0
    min_supplies: int | None = None
    soc_threshold: float | None = None
    runtime_threshold_min: int | None = None
    shutdown_delay_sec: int | None = None
    max_on_battery_sec: int | None = None
    enabled: bool = True
    kind: str = "mqtt"  # "nut": a NUT client of ecoflow-nut (docs/nut-server.md)
    ups: str | None = None  # kind nut: the UPS name it watches
    mac: str | None = None  # Wake-on-LAN (policy/wol.py, docs/wake-on-lan.md)
    wol_broadcast: str | None = None
    wol_port: int | None = None
    restart_soc: float | None = None


@dataclass
class Topology:
    devices: dict[str, dict]  # serial -> attributes from the policy file
    agents: dict[str, AgentConfig]


def read_policy_file(path: Path) -> dict:
    """The per-agent overrides file, YAML or JSON (chosen by the file's extension)."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # both parsers' errors say where the file is broken
        raise SettingsError(f"POLICY_CONFIG_FILE: {path} cannot be read: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"devices", "agents"}:
        raise SettingsError(
            f"POLICY_CONFIG_FILE: {path} must hold a mapping with 'devices' and/or 'agents'"
        )
    return data


def build(settings: PolicySettings, known: dict[str, str | None]) -> Topology:
    """Merge the mapping and the file and check them; `known` maps serials to names already in
    the database. Raises SettingsError naming the variable and what to change."""
    file = read_policy_file(settings.config_file) if settings.config_file else {}
    where = "POLICY_CONFIG_FILE"
    devices: dict[str, dict] = {}
    for sn, attrs in (file.get("devices") or {}).items():
        attrs = attrs or {}
        unknown = set(attrs) - DEVICE_KEYS
        if unknown:
            raise SettingsError(f"{where}: device {sn}: unknown keys {sorted(unknown)}; "
                                f"allowed: {sorted(DEVICE_KEYS)}")
        stale = attrs.get("stale_after_sec", 120)
        dead = attrs.get("dead_after_sec", max(600, stale))
        if not (isinstance(stale, int) and stale > 0 and isinstance(dead, int) and dead >= stale):
            raise SettingsError(f"{where}: device {sn}: stale_after_sec must be a positive "
                                "number of seconds and dead_after_sec at least as large")
        devices[str(sn)] = dict(attrs, stale_after_sec=stale, dead_after_sec=dead)

    names = {name: sn for sn, name in known.items() if name}
    names.update({a["name"]: sn for sn, a in devices.items() if a.get("name")})

    unseen: list[tuple[str, str]] = []  # (what, ref): taken for a serial on its looks alone

    def resolve(ref: str, source: str, what: str) -> str:
        if ref in devices or ref in known:
            return ref
        if ref in names:
            return names[ref]
        if SERIAL.match(ref):
            unseen.append((what, ref))
            return ref
        raise SettingsError(
            f"{source}: unknown device {ref!r}: no station has that serial number or name. "
            "Use the serial number, or name it in POLICY_CONFIG_FILE "
            f"(devices: {{SERIAL: {{name: {ref}}}}})"
        )

    agents: dict[str, AgentConfig] = {}
    for ref, agent_ids in settings.device_to_agents().items():
        sn = resolve(ref, "DEVICE_TO_AGENTS_JSON", f"DEVICE_TO_AGENTS_JSON key {ref!r}")
        for agent_id in agent_ids:
            agent = agents.setdefault(agent_id, AgentConfig(agent_id))
            if sn not in agent.supplies:
                agent.supplies.append(sn)

    for agent_id, attrs in (file.get("agents") or {}).items():
        attrs = dict(attrs or {})
        unknown = set(attrs) - AGENT_KEYS
        if unknown:
            raise SettingsError(f"{where}: agent {agent_id}: unknown keys {sorted(unknown)}; "
                                f"allowed: {sorted(AGENT_KEYS)}")
        agent = agents.setdefault(str(agent_id), AgentConfig(str(agent_id)))
        for ref in attrs.pop("supplies", None) or []:
            sn = resolve(str(ref), f"{where}: agent {agent_id}",
                         f"{where}: agent {agent_id}: supply {str(ref)!r}")
            if sn not in agent.supplies:
                agent.supplies.append(sn)
        for key, value in attrs.items():
            setattr(agent, key, value)

    watched: dict[str, str] = {}
    for agent in agents.values():
        _check_agent(agent)
        if agent.kind == "nut":
            if agent.ups in watched:
                raise SettingsError(
                    f"{where}: agents {watched[agent.ups]} and {agent.agent_id} both watch NUT "
                    f"UPS {agent.ups!r}: FSD on a UPS reaches every client of it, so give each "
                    "agent its own UPS name (NUT_UPS_JSON may serve a station under several)")
            watched[agent.ups] = agent.agent_id
        for sn in agent.supplies:
            devices.setdefault(sn, {"stale_after_sec": 120, "dead_after_sec": 600})
    for what, ref in unseen:
        _warn_unseen_serial(what, ref, [a.agent_id for a in agents.values() if ref in a.supplies],
                            names)
    return Topology(devices, agents)


def _warn_unseen_serial(what: str, ref: str, agent_ids: list[str], names: dict[str, str]) -> None:
    """A key like STUDYROOM passes for a serial number: if it is a name, the agents wait for a
    station that never reports, and no trigger can ever fire for them. Say so at start."""
    def fold(text: str) -> str:
        return "".join(c for c in text.casefold() if c.isalnum())

    near = [f"{name!r} ({sn})" for name, sn in sorted(names.items()) if fold(name) == fold(ref)]
    log.warning(
        "%s looks like a serial number, but no station with that serial has reported, so %s "
        "cannot be shut down for it until one does. If it is a friendly name, %suse the "
        "station's serial number, or name the station in POLICY_CONFIG_FILE "
        "(devices: {SERIAL: {name: %s}})",
        what, ", ".join(agent_ids) or "no agent",
        f"did you mean {' or '.join(near)}? Otherwise " if near else "", ref)


def _check_agent(a: AgentConfig) -> None:
    where = f"agent {a.agent_id}"
    if not AGENT_ID.match(a.agent_id):
        raise SettingsError(f"{where}: an agent id may hold only letters, digits, '_', '.' and "
                            "'-' (at most 64): it is part of the MQTT topic and the broker ACL")
    if not a.supplies:
        raise SettingsError(f"{where} has no supply: list the stations that power it in "
                            "DEVICE_TO_AGENTS_JSON or under 'supplies' in POLICY_CONFIG_FILE")
    checks = [
        ("soc_threshold", a.soc_threshold, 0, 99.9, "a SoC percentage from 0 to below 100"),
        ("runtime_threshold_min", a.runtime_threshold_min, 0, 1440, "minutes, 0 to 1440"),
        ("shutdown_delay_sec", a.shutdown_delay_sec, 0, 3600, "seconds, 0 to 3600"),
        ("max_on_battery_sec", a.max_on_battery_sec, 1, 7 * 86400, "seconds, 1 to 604800"),
        ("min_supplies", a.min_supplies, 1, len(a.supplies),
         f"1 to its number of supplies ({len(a.supplies)})"),
    ]
    for key, value, low, high, expected in checks:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            low <= value <= high
        ):
            raise SettingsError(f"POLICY_CONFIG_FILE: {where}: {key} = {value!r} is out of "
                                f"range: expected {expected}")
    if not isinstance(a.tier, int) or isinstance(a.tier, bool):
        raise SettingsError(f"POLICY_CONFIG_FILE: {where}: tier must be an integer")
    if a.kind not in AGENT_KINDS:
        raise SettingsError(f"POLICY_CONFIG_FILE: {where}: kind = {a.kind!r}: expected one of "
                            f"{', '.join(AGENT_KINDS)}")
    if a.kind == "nut" and not (isinstance(a.ups, str) and NUT_UPS_NAME.match(a.ups)):
        raise SettingsError(f"POLICY_CONFIG_FILE: {where}: kind nut needs 'ups', the NUT UPS "
                            "name its clients watch (letters, digits, '_', '.', '-'), e.g. ups")
    if a.kind != "nut" and a.ups is not None:
        raise SettingsError(f"POLICY_CONFIG_FILE: {where}: 'ups' is only for kind: nut")
    wol.check(a.agent_id, {k: getattr(a, k) for k in wol.WOL_KEYS})


def sync(conn: psycopg.Connection, settings: PolicySettings) -> Topology:
    """Validate the configuration and make the topology tables match it, in one transaction.
    Agents no longer configured are disabled, not deleted, so their history stays readable."""
    known = dict(conn.execute("SELECT device_sn, name FROM devices").fetchall())
    topo = build(settings, known)
    with conn.transaction():
        for sn, attrs in topo.devices.items():
            conn.execute(
                """INSERT INTO devices (device_sn, name, model, site, capacity_wh,
                                        stale_after_sec, dead_after_sec)
                   VALUES (%(sn)s, %(name)s, %(model)s, %(site)s, %(capacity_wh)s,
                           %(stale_after_sec)s, %(dead_after_sec)s)
                   ON CONFLICT (device_sn) DO UPDATE SET
                       name = coalesce(EXCLUDED.name, devices.name),
                       model = coalesce(EXCLUDED.model, devices.model),
                       site = coalesce(EXCLUDED.site, devices.site),
                       capacity_wh = coalesce(EXCLUDED.capacity_wh, devices.capacity_wh),
                       stale_after_sec = EXCLUDED.stale_after_sec,
                       dead_after_sec = EXCLUDED.dead_after_sec,
                       updated_at = now()""",
                {"sn": sn, "name": attrs.get("name"), "model": attrs.get("model"),
                 "site": attrs.get("site"), "capacity_wh": attrs.get("capacity_wh"),
                 "stale_after_sec": attrs["stale_after_sec"],
                 "dead_after_sec": attrs["dead_after_sec"]},
            )
        for a in topo.agents.values():
            conn.execute(
                """INSERT INTO agents (agent_id, name, tier, min_supplies, soc_threshold,
                                       runtime_threshold_min, shutdown_delay_sec,
                                       max_on_battery_sec, enabled, kind, nut_ups)
                   VALUES (%(agent_id)s, %(name)s, %(tier)s, %(min_supplies)s, %(soc_threshold)s,
                           %(runtime_threshold_min)s, %(shutdown_delay_sec)s,
                           %(max_on_battery_sec)s, %(enabled)s, %(kind)s, %(ups)s)
                   ON CONFLICT (agent_id) DO UPDATE SET
                       name = EXCLUDED.name, tier = EXCLUDED.tier,
                       min_supplies = EXCLUDED.min_supplies,
                       soc_threshold = EXCLUDED.soc_threshold,
                       runtime_threshold_min = EXCLUDED.runtime_threshold_min,
                       shutdown_delay_sec = EXCLUDED.shutdown_delay_sec,
                       max_on_battery_sec = EXCLUDED.max_on_battery_sec,
                       enabled = EXCLUDED.enabled, kind = EXCLUDED.kind,
                       nut_ups = EXCLUDED.nut_ups, updated_at = now()""",
                vars(a),
            )
            conn.execute("DELETE FROM agent_supplies WHERE agent_id = %s", (a.agent_id,))
            for sn in a.supplies:
                conn.execute("INSERT INTO agent_supplies (agent_id, device_sn) VALUES (%s, %s)",
                             (a.agent_id, sn))
        conn.execute(
            "UPDATE agents SET enabled = false, updated_at = now()"
            " WHERE enabled AND NOT (agent_id = ANY(%s))",
            (list(topo.agents),),
        )
    return topo
