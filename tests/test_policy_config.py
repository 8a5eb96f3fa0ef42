"""Policy configuration: the seeds' variables, the per-agent file, and the errors they give."""

from __future__ import annotations

import json

import pytest

from policy import topology
from policy.settings import PolicySettings, load_settings
from servicekit.settings import SettingsError

SN = "R331ZEB4ZEA0012345"


def settings(**values) -> PolicySettings:
    return PolicySettings(**values)


def test_seed_variables_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("POLICY_SOC_MIN", "12")
    monkeypatch.setenv("POLICY_DEBOUNCE_SEC", "90")
    monkeypatch.setenv("POLICY_COOLDOWN_SEC", "600")
    monkeypatch.setenv("DEVICE_TO_AGENTS_JSON", '{"Study": ["study-pc"]}')
    loaded = load_settings()
    assert (loaded.soc_min, loaded.debounce_sec, loaded.cooldown_sec) == (12, 90, 600)
    assert loaded.device_to_agents() == {"Study": ["study-pc"]}


@pytest.mark.parametrize("value", ["100", "-1", "abc"])
def test_nonsense_soc_threshold_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("POLICY_SOC_MIN", value)
    with pytest.raises(SettingsError, match="POLICY_SOC_MIN"):
        load_settings()


def test_mapping_that_is_not_json_is_refused_with_an_example(monkeypatch):
    monkeypatch.setenv("DEVICE_TO_AGENTS_JSON", "{Study: study-pc}")
    with pytest.raises(SettingsError, match="DEVICE_TO_AGENTS_JSON: .*not valid JSON"):
        load_settings()


def test_secrets_never_appear_in_errors_or_repr(monkeypatch):
    monkeypatch.setenv("COMMAND_SIGNING_KEY", "super-secret-signing-key")
    monkeypatch.setenv("MQTT_PASS", "super-secret-mqtt-pass")
    monkeypatch.setenv("MQTT_PORT", "not-a-port")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "super-secret" not in str(err.value)
    monkeypatch.setenv("MQTT_PORT", "1883")
    assert "super-secret" not in repr(load_settings())


def test_friendly_names_and_serials_both_map_agents(db, tmp_path):
    db.execute("INSERT INTO devices (device_sn, name) VALUES ('R331ZEB4ZEA0099999', 'Study')")
    config = tmp_path / "policy.yaml"
    config.write_text(
        "devices:\n"
        f"  {SN}:\n    name: Meterkast\n    stale_after_sec: 60\n    dead_after_sec: 300\n"
        "agents:\n"
        "  nas-01:\n    soc_threshold: 25\n    runtime_threshold_min: 10\n"
        "    shutdown_delay_sec: 30\n    tier: 1\n")
    mapping = {"Study": ["study-pc"], "Meterkast": ["nas-01"], "R331ZEB4ZEA0077777": ["nas-01"]}
    topology.sync(db, settings(device_to_agents_json=json.dumps(mapping), config_file=config))
    supplies = db.execute("SELECT agent_id, device_sn FROM agent_supplies ORDER BY 1, 2").fetchall()
    assert supplies == [("nas-01", SN), ("nas-01", "R331ZEB4ZEA0077777"),
                        ("study-pc", "R331ZEB4ZEA0099999")]
    assert db.execute("SELECT soc_threshold, runtime_threshold_min, shutdown_delay_sec, tier"
                      " FROM agents WHERE agent_id = 'nas-01'").fetchone() == (25, 10, 30, 1)
    assert db.execute("SELECT name, stale_after_sec, dead_after_sec FROM devices"
                      " WHERE device_sn = %s", (SN,)).fetchone() == ("Meterkast", 60, 300)


def test_agents_dropped_from_the_configuration_are_disabled(db):
    topology.sync(db, settings(device_to_agents_json=json.dumps({SN: ["a", "b"]})))
    topology.sync(db, settings(device_to_agents_json=json.dumps({SN: ["a"]})))
    assert db.execute("SELECT agent_id, enabled FROM agents ORDER BY 1").fetchall() == [
        ("a", True), ("b", False)]


def test_unknown_device_name_is_refused(db):
    with pytest.raises(SettingsError, match="DEVICE_TO_AGENTS_JSON: unknown device 'Garage'"):
        topology.sync(db, settings(device_to_agents_json='{"Garage": ["pc"]}'))


def test_agent_with_no_supply_is_refused(db, tmp_path):
    config = tmp_path / "policy.json"
    config.write_text(json.dumps({"agents": {"lonely-pc": {"soc_threshold": 20}}}))
    with pytest.raises(SettingsError, match="agent lonely-pc has no supply"):
        topology.sync(db, settings(config_file=config))


@pytest.mark.parametrize("override, message", [
    ({"soc_threshold": 100}, "soc_threshold = 100 is out of range"),
    ({"runtime_threshold_min": -5}, "runtime_threshold_min = -5 is out of range"),
    ({"min_supplies": 2}, "min_supplies = 2 is out of range"),
    ({"shutdown_delay_sec": "soon"}, "shutdown_delay_sec = 'soon' is out of range"),
    ({"colour": "red"}, "unknown keys"),
])
def test_per_agent_override_out_of_range_is_refused(db, tmp_path, override, message):
    config = tmp_path / "policy.json"
    config.write_text(json.dumps({"agents": {"pc": dict(override, supplies=[SN])}}))
    with pytest.raises(SettingsError, match=message):
        topology.sync(db, settings(config_file=config))
    assert db.execute("SELECT count(*) FROM agents").fetchone()[0] == 0


def test_missing_policy_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("POLICY_CONFIG_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(SettingsError, match="POLICY_CONFIG_FILE"):
        load_settings()


def test_friendly_name_that_looks_like_a_serial_is_warned_about_at_start(db, caplog):
    """`STUDYROOM` (8-32 capitals) was taken for a serial number: its agent waited for a
    station that never reports and could never be shut down, and nothing said so."""
    with caplog.at_level("WARNING"):
        topology.sync(db, settings(device_to_agents_json='{"STUDYROOM": ["study-pc"]}'))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "DEVICE_TO_AGENTS_JSON key 'STUDYROOM' looks like a serial number" in warning
    assert "no station with that serial has reported" in warning
    assert "study-pc" in warning and "friendly name" in warning


def test_supply_in_the_policy_file_that_looks_like_a_serial_is_warned_about(db, tmp_path,
                                                                           caplog):
    config = tmp_path / "policy.yaml"
    config.write_text("agents:\n  nas-01:\n    supplies: [GARAGE42]\n")
    with caplog.at_level("WARNING"):
        topology.sync(db, settings(config_file=config))
    assert any("POLICY_CONFIG_FILE: agent nas-01: supply 'GARAGE42' looks like a serial number"
               in r.getMessage() for r in caplog.records)


def test_a_near_miss_of_a_known_name_is_suggested(db, caplog):
    db.execute("INSERT INTO devices (device_sn, name) VALUES ('R331ZEB4ZEA0099999', 'Study Room')")
    with caplog.at_level("WARNING"):
        topology.sync(db, settings(device_to_agents_json='{"STUDYROOM": ["study-pc"]}'))
    assert any("did you mean 'Study Room' (R331ZEB4ZEA0099999)" in r.getMessage()
               for r in caplog.records)


def test_known_serials_and_names_that_look_like_serials_are_not_warned_about(db, caplog):
    db.execute("INSERT INTO devices (device_sn, name) VALUES (%s, NULL),"
               " ('R331ZEB4ZEA0099999', 'STUDYROOM')", (SN,))
    with caplog.at_level("WARNING"):
        topology.sync(db, settings(
            device_to_agents_json=json.dumps({SN: ["nas-01"], "STUDYROOM": ["study-pc"]})))
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    assert db.execute("SELECT agent_id, device_sn FROM agent_supplies ORDER BY 1").fetchall() == [
        ("nas-01", SN), ("study-pc", "R331ZEB4ZEA0099999")]
