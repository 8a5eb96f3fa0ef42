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


def main() -> None:
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
