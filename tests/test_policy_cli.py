"""Operator commands: replay over stored history, status, explain, fire-test, and the migration."""

from __future__ import annotations

import json
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest

from policy import cli, topology
from policy.settings import load_settings
from servicekit.migrate import downgrade, upgrade
from servicekit.settings import DatabaseSettings
from tests.test_policy_scenarios import SN, at, insert, series


@pytest.fixture
def env(monkeypatch, db_url, mqtt_broker):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("MQTT_HOST", mqtt_broker.host)
    monkeypatch.setenv("MQTT_PORT", str(mqtt_broker.port))
    monkeypatch.setenv("POLICY_SOC_MIN", "15")
    monkeypatch.setenv("POLICY_DEBOUNCE_SEC", "60")
    monkeypatch.setenv("POLICY_GRID_CONFIRM_SEC", "30")
    monkeypatch.setenv("DEVICE_TO_AGENTS_JSON", json.dumps({SN: ["nas-01"]}))


def outage(db):
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 150, 10, 14, False)
           + series(160, 400, 10, 14, True))


def test_replay_prints_the_decisions_and_sends_and_keeps_nothing(db, env, capsys, tmp_path):
    outage(db)
    config = tmp_path / "policy.yaml"
    config.write_text(f"agents:\n  nas-01:\n    supplies: [{SN}]\n    shutdown_delay_sec: 300\n")
    assert cli.main(["replay", "--from", at(0).isoformat(), "--to", at(400).isoformat(),
                     "--step", "5", "--config", str(config), "--json"]) == 0
    decisions = json.loads(capsys.readouterr().out)
    assert [(d["decision"], d["trigger"]) for d in decisions] == [
        ("trigger_fired", "soc"), ("command_aborted", None)]
    assert decisions[0]["ts"].startswith("2026-01-01 12:02:00")
    for table in ("commands", "policy_events", "policy_conditions", "agents"):
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


def test_status_and_explain_show_stations_and_agents(db, env, capsys):
    db.execute("INSERT INTO ecoflow_measurements (ts, device_sn, soc_min_percent, grid_connected,"
               " source, raw_data) VALUES (now(), %s, 50, true, 'simulator', '{}')", (SN,))
    topology.sync(db, load_settings())  # what the running worker does at start
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert SN in out and "fresh" in out and "nas-01" in out
    assert cli.main(["explain", "nas-01"]) == 0
    assert "no shutdown due" in capsys.readouterr().out


def test_fire_test_goes_through_an_agent_and_reports_its_ack(db, env, mqtt_broker, capsys):
    agent = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"nas-{uuid.uuid4().hex[:6]}",
                        protocol=mqtt.MQTTv5)
    ready = threading.Event()

    def on_message(client, userdata, msg):
        cmd = json.loads(msg.payload)
        client.publish("power-manager/nas-01/ack", json.dumps(
            {"id": cmd["id"], "agent": "nas-01", "status": "dry_run", "host": "nas01.lan",
             "ts": cmd["issued_at"], "detail": "test"}), qos=1)

    agent.on_connect = lambda c, *a: (c.subscribe("power-manager/nas-01/cmd", qos=1),
                                      ready.set())
    agent.on_message = on_message
    agent.connect(mqtt_broker.host, mqtt_broker.port)
    agent.loop_start()
    try:
        assert ready.wait(5)
        assert cli.main(["fire-test", "--agent", "nas-01", "--wait", "5"]) == 0
        assert "ack: dry_run from nas01.lan" in capsys.readouterr().out
        assert db.execute("SELECT action, status FROM commands").fetchall() == [("test", "dry_run")]
    finally:
        agent.loop_stop()
        agent.disconnect()


def test_policy_migration_downgrades_and_upgrades_again(db_url):
    settings = DatabaseSettings(database_url=db_url)
    downgrade(settings, "0001")
    upgrade(settings, "head")
