"""Home Assistant's own loader, validation and `sql` query path over a docs page's YAML.

Run with the Python of `.venv-ha` (Home Assistant 2024.3 and psycopg2), not the project's:

    .venv-ha/bin/python tests/ha_harness.py PAGE.md DB_URL OUT.json

It writes `secrets.yaml` and `configuration.yaml` into a temporary config directory exactly as
the page shows them (the `ecoflow_db` secret pointing at DB_URL, the page's `sql:` and
`template:` lists merged), loads them with Home Assistant's YAML loader (`!secret` resolved by
it), checks them with its config checker, sets up the `sql` and `template` integrations the
way bootstrap does, lets every sensor query the database, and writes what Home Assistant ended
up with: config errors, entity registry unique ids, and each entity's state and attributes.
tests/test_homeassistant.py drives it.

    .venv-ha/bin/python tests/ha_harness.py mqtt HOST PORT DISCOVERY_PREFIX

boots Home Assistant with its MQTT integration instead: a config entry for the broker at
HOST:PORT (discovery on, under DISCOVERY_PREFIX, birth and will on DISCOVERY_PREFIX/status) is
added the way the UI's config flow would add it. Then it answers JSON lines on stdin, one JSON
line on stdout each: `{"wait": {ENTITY_ID: STATE}, "timeout": SECONDS}` waits until each
entity has that state (`"*"`: exists; null: has a value, neither unknown nor unavailable)
and answers `{"ok": ..., "states": ..., "entities": ...}` (states and attributes; registry
entries with their devices); `{"stop": true}` stops Home Assistant.
tests/test_homeassistant_mqtt.py drives it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path

import yaml


class Secret(str):
    """A `!secret name` kept as such, so Home Assistant resolves it, not this script."""


def _secret(loader, node):
    return Secret(loader.construct_scalar(node))


def _dump_secret(dumper, data):
    return dumper.represent_scalar("!secret", str(data))


yaml.SafeLoader.add_constructor("!secret", _secret)
yaml.SafeDumper.add_representer(Secret, _dump_secret)


def page_config(page: Path) -> tuple[dict, dict]:
    """The page's `# secrets.yaml` and merged `# configuration.yaml` blocks."""
    secrets: dict = {}
    config: dict = {}
    for block in re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S):
        first = block.splitlines()[0].strip()
        loaded = yaml.safe_load(block)
        if first == "# secrets.yaml":
            secrets.update(loaded)
        elif first == "# configuration.yaml":
            for key, value in loaded.items():
                config.setdefault(key, []).extend(value)
    return secrets, config


async def run(config_dir: Path) -> dict:
    from homeassistant import bootstrap, config_entries, loader
    from homeassistant import config as conf_util
    from homeassistant.core import HomeAssistant
    from homeassistant.helpers import entity_registry
    from homeassistant.helpers.check_config import async_check_ha_config_file
    from homeassistant.setup import async_setup_component

    hass = HomeAssistant(str(config_dir))
    hass.config.skip_pip = True
    loader.async_setup(hass)
    result: dict = {}
    try:
        checked = await async_check_ha_config_file(hass)
        result["errors"] = [f"{e.domain}: {e.message}" for e in checked.errors]
        config = await conf_util.async_hass_config_yaml(hass)
        hass.config_entries = config_entries.ConfigEntries(hass, config)
        await bootstrap.async_load_base_functionality(hass)
        for domain in sorted(bootstrap.CORE_INTEGRATIONS):
            assert await async_setup_component(hass, domain, config), domain
        await conf_util.async_process_ha_core_config(hass, config.get("homeassistant", {}))
        result["setup"] = {}
        for domain in ("sql", "template"):
            if domain in config:
                result["setup"][domain] = await async_setup_component(hass, domain, config)
        await hass.async_block_till_done()
        # Start as `hass` does after bootstrap: template entities begin tracking their
        # templates (here the SQL sensors' attributes) at the start event.
        await hass.async_start()
        await hass.async_block_till_done()
        registry = entity_registry.async_get(hass)
        result["unique_ids"] = {entry.unique_id: entry.entity_id
                                for entry in registry.entities.values()}
        result["states"] = {
            state.entity_id: {"state": state.state, "attributes": dict(state.attributes)}
            for state in hass.states.async_all()
            if state.domain in ("sensor", "binary_sensor")
        }
    finally:
        await hass.async_stop(force=True)
    return result


def _snapshot(hass) -> dict:
    """Every sensor and binary sensor: state and attributes, and its registry entry and device."""
    from homeassistant.helpers import device_registry, entity_registry

    entities = entity_registry.async_get(hass)
    devices = device_registry.async_get(hass)
    registered = {}
    for entry in entities.entities.values():
        device = devices.async_get(entry.device_id) if entry.device_id else None
        registered[entry.entity_id] = {
            "unique_id": entry.unique_id, "platform": entry.platform,
            "entity_category": entry.entity_category,
            "device": None if device is None else {
                "name": device.name, "manufacturer": device.manufacturer,
                "model": device.model, "serial_number": device.serial_number,
                "sw_version": device.sw_version, "suggested_area": device.suggested_area,
                "identifiers": sorted("|".join(i) for i in device.identifiers)},
        }
    states = {state.entity_id: {"state": state.state, "attributes": dict(state.attributes)}
              for state in hass.states.async_all() if state.domain in ("sensor", "binary_sensor")}
    return {"states": states, "entities": registered}


def _met(hass, wanted: dict) -> bool:
    """Every entity in `wanted` has its state: `"*"` any, None any but unknown/unavailable."""
    for entity_id, expected in wanted.items():
        state = hass.states.get(entity_id)
        if state is None:
            return False
        if expected is None and state.state in ("unknown", "unavailable"):
            return False
        if expected not in (None, "*") and state.state != expected:
            return False
    return True


async def run_mqtt(config_dir: Path, host: str, port: int, prefix: str) -> None:
    """Home Assistant with the MQTT integration on HOST:PORT, answering stdin (see above)."""
    import socket

    from homeassistant import bootstrap, config_entries, loader
    from homeassistant import config as conf_util
    from homeassistant.core import HomeAssistant
    from homeassistant.setup import async_setup_component

    with socket.socket() as sock:  # http (an MQTT dependency) listens once started
        sock.bind(("127.0.0.1", 0))
        http_port = sock.getsockname()[1]
    (config_dir / "configuration.yaml").write_text(yaml.safe_dump(
        {"http": {"server_host": ["127.0.0.1"], "server_port": http_port}}))
    hass = HomeAssistant(str(config_dir))
    hass.config.skip_pip = True
    loader.async_setup(hass)
    try:
        config = await conf_util.async_hass_config_yaml(hass)
        hass.config_entries = config_entries.ConfigEntries(hass, config)
        await hass.config_entries.async_initialize()
        await bootstrap.async_load_base_functionality(hass)
        for domain in sorted(bootstrap.CORE_INTEGRATIONS):
            assert await async_setup_component(hass, domain, config), domain
        await conf_util.async_process_ha_core_config(hass, config.get("homeassistant", {}))
        assert await async_setup_component(hass, "http", config)
        # What the config flow stores in entry.data (its broker step, then its options step's
        # discovery prefix, birth and will); async_add sets the integration up from it.
        status = f"{prefix}/status"
        entry = config_entries.ConfigEntry(
            version=1, minor_version=1, domain="mqtt", title=host, source="user",
            data={"broker": host, "port": port, "discovery": True,
                  "discovery_prefix": prefix,
                  "birth_message": {"topic": status, "payload": "online", "qos": 0,
                                    "retain": False},
                  "will_message": {"topic": status, "payload": "offline", "qos": 0,
                                   "retain": False}})
        # The entry forwards to every MQTT platform; `camera` fails to import (stream needs
        # numpy, not installed) and logs it, which touches nothing this harness looks at.
        await hass.config_entries.async_add(entry)
        await hass.async_block_till_done()
        assert entry.state is config_entries.ConfigEntryState.LOADED, entry.state
        await hass.async_start()
        await hass.async_block_till_done()
        while line := await hass.async_add_executor_job(sys.stdin.readline):
            request = json.loads(line)
            if request.get("stop"):
                break
            wanted = request.get("wait", {})
            deadline = hass.loop.time() + float(request.get("timeout", 30))
            while not _met(hass, wanted) and hass.loop.time() < deadline:
                await asyncio.sleep(0.1)
            reply = {"ok": _met(hass, wanted), **_snapshot(hass)}
            sys.stdout.write(json.dumps(reply, default=str) + "\n")
            sys.stdout.flush()
    finally:
        await hass.async_stop(force=True)


def main_mqtt(host: str, port: str, prefix: str) -> None:
    with tempfile.TemporaryDirectory(prefix="ha-config-") as tmp:
        asyncio.run(run_mqtt(Path(tmp), host, int(port), prefix))


def main() -> None:
    if sys.argv[1] == "mqtt":
        return main_mqtt(*sys.argv[2:5])
    page, db_url, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    secrets, config = page_config(page)
    secrets = {name: db_url for name in secrets}
    with tempfile.TemporaryDirectory(prefix="ha-config-") as tmp:
        config_dir = Path(tmp)
        (config_dir / "secrets.yaml").write_text(yaml.safe_dump(secrets))
        (config_dir / "configuration.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False, width=200))
        result = asyncio.run(run(config_dir))
        result["configuration.yaml"] = (config_dir / "configuration.yaml").read_text()
    out.write_text(json.dumps(result, default=str, indent=1))


if __name__ == "__main__":
    main()
