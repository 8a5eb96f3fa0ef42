"""docs/home-assistant.md's YAML through the real Home Assistant (2024.3, `.venv-ha`).

Home Assistant's YAML loader resolves the page's `!secret`, its config checker validates the
`sql` and `template` lists, the integrations set up as bootstrap sets them up and every SQL
sensor queries the seeded test database as the read-only role through SQLAlchemy and psycopg2
(what a pip-installed Home Assistant needs for a `postgresql://` URL). What Home Assistant shows
must be what the database says. `make test-ha` builds `.venv-ha`; without it these tests skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.services import READONLY_PASSWORD, READONLY_USER
from tests.test_dashboards import OFFICE, seeded  # noqa: F401 (the seeded database fixture)

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "home-assistant.md"
HA_VENV = ROOT / ".venv-ha"
HA_PYTHON = HA_VENV / "bin" / "python"
HARNESS = ROOT / "tests" / "ha_harness.py"

pytestmark = [
    pytest.mark.homeassistant,
    pytest.mark.skipif(not (HA_VENV / ".installed").exists(),
                       reason="Home Assistant's venv .venv-ha is absent: `make test-ha` builds it"),
]


def page_config() -> tuple[dict, dict]:
    sys.path.insert(0, str(HARNESS.parent))
    try:
        import ha_harness
    finally:
        sys.path.pop(0)
    return ha_harness.page_config(PAGE)


@pytest.fixture
def home_assistant(seeded, db_url, tmp_path):  # noqa: F811 (seeded is the imported fixture)
    """Run the page's configuration through Home Assistant against the seeded database."""
    parts = urlsplit(db_url)
    netloc = f"{READONLY_USER}:{READONLY_PASSWORD}@{parts.hostname}:{parts.port}"
    reader_url = urlunsplit(parts._replace(netloc=netloc))
    out = tmp_path / "ha.json"
    done = subprocess.run([str(HA_PYTHON), str(HARNESS), str(PAGE), reader_url, str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    assert READONLY_PASSWORD not in done.stderr, "Home Assistant logged the database password"
    return json.loads(out.read_text()), seeded


def tolerance(column: str) -> float:
    """Ages grow between Home Assistant's query and the test's; everything else is exact."""
    return 60.0 if column == "age_sec" else 1e-9


def test_every_sql_sensor_on_the_page_has_a_unique_id():
    _, config = page_config()
    ids = [s.get("unique_id") for s in config["sql"]]
    ids += [s.get("unique_id") for group in config.get("template", [])
            for kind in ("sensor", "binary_sensor") for s in group.get(kind, [])]
    assert all(ids) and len(ids) == len(set(ids)), ids


def test_home_assistant_accepts_the_page_and_shows_what_the_database_holds(home_assistant):
    result, db = home_assistant
    assert result["errors"] == [], result["errors"]
    assert result["setup"] == {"sql": True, "template": True}, result
    _, config = page_config()
    states = result["states"]
    for sensor in config["sql"]:
        entity_id = result["unique_ids"].get(sensor["unique_id"])
        assert entity_id, f"{sensor['name']}: no entity registered under its unique_id"
        with db.conn.cursor() as cur:
            cur.execute(sensor["query"])
            names = [c.name for c in cur.description]
            row = dict(zip(names, cur.fetchone()))
        expected = row[sensor["column"]]
        shown = states[entity_id]
        if expected is None:
            assert shown["state"] == "unknown", (sensor["name"], shown)
        elif isinstance(expected, str):
            assert shown["state"] == expected, (sensor["name"], shown)
        else:
            assert float(shown["state"]) == pytest.approx(float(expected), abs=tolerance(
                sensor["column"])), (sensor["name"], shown)
        # Every column of the row is an attribute: one query brings all of a station's values.
        for name, value in row.items():
            if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
                assert shown["attributes"][name] == pytest.approx(
                    float(value), abs=tolerance(name)), (name, shown)
            elif isinstance(value, (str, bool)) or value is None:
                assert shown["attributes"][name] == value, (name, shown)
            else:  # timestamps and dates arrive as ISO 8601 text
                assert shown["attributes"][name] == value.isoformat(), (name, shown)


def test_one_query_per_station_gives_every_value_as_an_attribute(home_assistant):
    result, db = home_assistant
    station = result["states"][result["unique_ids"]["ecoflow_office"]]
    with db.conn.cursor() as cur:
        cur.execute("SELECT soc_percent, watts_in_sum, watts_out_sum, grid_connected, online"
                    " FROM ecoflow_latest WHERE device_sn = %s", (OFFICE,))
        soc, watts_in, watts_out, grid, online = cur.fetchone()
    assert float(station["state"]) == pytest.approx(soc)
    assert station["attributes"]["unit_of_measurement"] == "%"
    assert station["attributes"]["watts_in_sum"] == watts_in
    assert station["attributes"]["grid"] == ("on" if grid else "off")
    assert station["attributes"]["online"] is online is True
    assert "raw_data" not in station["attributes"]
    # The template sensors derived from the attributes.
    output = result["states"][result["unique_ids"]["ecoflow_office_watts_out"]]
    assert float(output["state"]) == watts_out and output["attributes"]["unit_of_measurement"] == "W"
    grid_sensor = result["states"][result["unique_ids"]["ecoflow_office_grid_attr"]]
    assert grid_sensor["state"] == ("on" if grid else "off")
