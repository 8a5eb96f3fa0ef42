"""Operator commands: replay over stored history, status, explain, fire-test, and the migration."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import paho.mqtt.client as mqtt
import pytest

from policy import cli, topology
from policy.settings import load_settings
from servicekit.migrate import downgrade, upgrade
from servicekit.settings import DatabaseSettings
from testbed.forwarder import Forwarder
from testbed.ports import free_port
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


def test_replay_without_config_uses_the_mapping_from_the_environment(db, env, capsys):
    """`policy replay` without --config ignored DEVICE_TO_AGENTS_JSON and printed nothing."""
    outage(db)
    assert cli.main(["replay", "--from", at(0).isoformat(), "--to", at(400).isoformat(),
                     "--step", "5", "--json"]) == 0
    decisions = json.loads(capsys.readouterr().out)
    assert [(d["decision"], d["trigger"], d["agent_id"]) for d in decisions][:1] == [
        ("trigger_fired", "soc", "nas-01")]
    for table in ("commands", "policy_events", "agents", "agent_supplies", "devices"):
        assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


def test_replay_with_no_agents_anywhere_says_so_and_fails(db, db_url):
    outage(db)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEVICE_TO_AGENTS_JSON", "POLICY_CONFIG_FILE")}
    env["DATABASE_URL"] = db_url
    proc = subprocess.run([sys.executable, "-m", "policy", "replay", "--from",
                           at(0).isoformat(), "--to", at(400).isoformat()],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "no agents" in proc.stderr and "DEVICE_TO_AGENTS_JSON" in proc.stderr
    assert "--config" in proc.stderr and "Traceback" not in proc.stderr


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


@pytest.mark.parametrize("command", [[], ["run"], ["status"], ["explain"], ["fire-test"],
                                     ["replay"], ["plan"]])
def test_every_docs_page_the_help_points_to_exists(command, capsys):
    """`ecoflow-policy --help` sent people to docs/policy.md, which did not exist."""
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    pages = set(re.findall(r"docs/[\w./-]*\w", capsys.readouterr().out))
    if not command:
        assert "docs/policy.md" in pages
    repo = Path(__file__).resolve().parent.parent
    assert [page for page in sorted(pages) if not (repo / page).is_file()] == []


def test_policy_migration_downgrades_and_upgrades_again(db_url):
    settings = DatabaseSettings(database_url=db_url)
    downgrade(settings, "0001")
    upgrade(settings, "head")


def _wait_for_line(proc: subprocess.Popen, lines: list[str], text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return line
    raise AssertionError(f"no line with {text!r}:\n{''.join(lines)}")


@contextlib.contextmanager
def worker_process(database_url: str, mqtt_broker=None):
    """`python -m policy` against `database_url`; yields (process, lines read so far). On the
    way out it is killed if still running, and its whole output must hold no traceback."""
    env = dict(os.environ, DATABASE_URL=database_url, LOG_LEVEL="INFO")
    if mqtt_broker is not None:
        env.update(MQTT_HOST=mqtt_broker.host, MQTT_PORT=str(mqtt_broker.port),
                   DEVICE_TO_AGENTS_JSON=json.dumps({SN: ["nas-01"]}), POLICY_INTERVAL_SEC="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "policy"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + proc.stderr.read() + proc.stdout.read()
    assert "Traceback" not in output, output


def test_worker_started_before_the_database_waits_for_it_and_stops_on_sigterm(db_url,
                                                                             mqtt_broker):
    """Compose started the policy worker before PostgreSQL accepted connections: it died with
    a traceback. It must say it is waiting, once per attempt, and go on when the database
    comes up; SIGTERM while waiting or running ends it cleanly."""
    parts = urlsplit(db_url)
    forwarder = Forwarder((parts.hostname, parts.port))
    netloc = parts.netloc.rpartition("@")
    url = urlunsplit(parts._replace(
        netloc=f"{netloc[0]}{netloc[1]}127.0.0.1:{forwarder.port}"))
    try:
        with worker_process(url, mqtt_broker) as (proc, lines):
            first = _wait_for_line(proc, lines, "database unavailable at start", 20)
            assert "retrying" in first and "\n" == first[-1]
            _wait_for_line(proc, lines, "database unavailable at start", 20)
            assert proc.poll() is None
            forwarder.open()
            _wait_for_line(proc, lines, "1 agents on 1 stations", 40)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
    finally:
        forwarder.close()


def test_sigterm_while_waiting_for_the_database_ends_the_worker_cleanly():
    with worker_process(f"postgresql://u:pw@127.0.0.1:{free_port()}/db") as (proc, lines):
        _wait_for_line(proc, lines, "database unavailable at start", 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


@pytest.mark.parametrize("migrated_to, says", [(None, "no EcoFlow schema yet"),
                                                ("0007", "an older EcoFlow schema")])
def test_worker_started_before_the_migrations_waits_for_them(empty_db_url, mqtt_broker,
                                                             migrated_to, says):
    """A native install started the worker before `ecoflow-migrate`: it died with a traceback
    about a missing table. It must name the command to run and go on once the schema is there.
    Each revision commits on its own, so a worker starting while the migrations run can also
    find the first revisions' tables without the later columns (CI saw it die on
    `agents.kind`, added by 0008): it must wait for the rest as well."""
    if migrated_to:
        upgrade(DatabaseSettings(database_url=empty_db_url), migrated_to)
    with worker_process(empty_db_url, mqtt_broker) as (proc, lines):
        first = _wait_for_line(proc, lines, says, 20)
        assert "ecoflow-migrate" in first and "retrying" in first
        upgrade(DatabaseSettings(database_url=empty_db_url), "head")
        _wait_for_line(proc, lines, "1 agents on 1 stations", 40)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.parametrize("command", [["status"], ["explain"], ["plan"]])
def test_operator_commands_on_an_unmigrated_database_say_what_to_run(command, empty_db_url,
                                                                     monkeypatch, capfd):
    monkeypatch.setenv("DATABASE_URL", empty_db_url)
    monkeypatch.setenv("DEVICE_TO_AGENTS_JSON", json.dumps({SN: ["nas-01"]}))
    assert cli.main(command) == 2
    err = capfd.readouterr().err
    assert "no EcoFlow schema yet" in err and "run `ecoflow-migrate`" in err
    assert "Traceback" not in err
