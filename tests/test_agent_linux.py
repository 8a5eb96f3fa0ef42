"""The Linux agent (agents/linux/ecoflow-agent.py) as a real process against a real Mosquitto."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

from testbed.mosquitto import MosquittoServer
from tests.agent_scenarios import (
    KEY,
    REPO,
    SCENARIOS,
    VECTORS,
    AgentProcess,
    AgentRig,
    Commander,
    agent_is_back_online_soon_after_the_broker_returns,
    signed,
)

SCRIPT = REPO / "agents" / "linux" / "ecoflow-agent.py"


def _load_agent_module():
    spec = importlib.util.spec_from_file_location("ecoflow_agent_linux", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


agent_module = _load_agent_module()


def launch(env: dict, workdir: Path) -> AgentProcess:
    return AgentProcess([sys.executable, str(SCRIPT)], env, workdir)


@pytest.fixture
def rig(mqtt_broker, tmp_path):
    rig = AgentRig(launch, mqtt_broker, tmp_path)
    yield rig
    rig.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_linux_agent(scenario, rig):
    scenario(rig)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_canonical_form_and_signature_match_the_shared_vectors(vector):
    assert agent_module.canonical(vector["command"]) == vector["canonical"]
    assert agent_module.sign(vector["key"], vector["command"]) == vector["sig"]


def test_signing_key_never_appears_in_the_log(rig):
    agent = rig.start()
    cmd = signed(rig.command(delay_sec=1))
    rig.commander.send(cmd)
    rig.commander.ack(cmd["id"])
    agent.stop()
    assert KEY not in agent.output()
    assert f"command {cmd['id']}" in agent.output()


def test_payload_text_is_never_executed(rig):
    agent = rig.start()
    cmd = signed(rig.command(delay_sec=0))
    rig.commander.send(cmd)
    rig.commander.wait("ack", lambda p: p.get("id") == cmd["id"] and "commit" in p["detail"])
    argvs = [e["argv"] for e in agent.dry_run_entries()]
    assert argvs == [["shutdown", "-h", "+1"], ["systemctl", "stop", "pretend-workload"]]


def test_failing_pre_shutdown_command_is_reported_and_does_not_block(mqtt_broker, tmp_path):
    rig = AgentRig(launch, mqtt_broker, tmp_path, DRY_RUN="false",
                   PRE_SHUTDOWN_CMD_1="false", PRE_SHUTDOWN_CMD_2="sleep 30",
                   PRE_SHUTDOWN_TIMEOUT_SEC="1",
                   SHUTDOWN_CMD=f"sh -c 'echo halt-in {{delay_sec}} >> {tmp_path}/halted'",
                   ABORT_CMD="true")
    try:
        rig.start()
        cmd = signed(rig.command(delay_sec=0))
        rig.commander.send(cmd)
        assert rig.commander.ack(cmd["id"])["status"] == "scheduled"
        done = rig.commander.wait("ack", lambda p: p.get("id") == cmd["id"]
                                  and p["status"] == "executing")
        assert "PRE_SHUTDOWN_CMD_1: false exited 1" in done["detail"]
        assert "PRE_SHUTDOWN_CMD_2: sleep timed out after 1 s" in done["detail"]
        # Two pre-shutdown commands of 1 s each: the OS halt leaves them that time.
        assert (tmp_path / "halted").read_text() == "halt-in 2\n"
    finally:
        rig.close()


def test_executed_ids_survive_a_restart(rig):
    first = rig.start()
    cmd = signed(rig.command(delay_sec=0))
    rig.commander.send(cmd)
    rig.commander.ack(cmd["id"])
    first.stop()
    rig.start()
    rig.commander.send(cmd)
    rig.commander.wait("ack", lambda p: p.get("id") == cmd["id"] and p["detail"] == "duplicate")


def test_abort_still_works_after_a_restart_inside_the_window(rig):
    first = rig.start()
    shutdown = signed(rig.command(delay_sec=20))
    rig.commander.send(shutdown)
    rig.commander.ack(shutdown["id"])
    first.stop()
    second = rig.start()
    abort = signed(rig.command("abort", delay_sec=0, cancels=shutdown["id"]))
    rig.commander.send(abort)
    assert rig.commander.ack(abort["id"])["status"] == "aborted"
    assert [e["step"] for e in second.dry_run_entries()] == ["shutdown", "abort"]


@pytest.mark.parametrize(("shutdown_cmd", "steps"), [
    # A timer first, leaving time for the pre-shutdown commands...
    ("shutdown -h +{delay_min}", ["failsafe_shutdown", "pre_shutdown_1"]),
    # ...an immediate halt (the earlier tool's setting) last.
    ("shutdown -h now", ["pre_shutdown_1", "failsafe_shutdown"]),
])
def test_failsafe_halts_when_on_battery_and_the_broker_is_gone(shutdown_cmd, steps, tmp_path):
    # A private broker, because this test stops it.
    with MosquittoServer() as broker:
        rig = AgentRig(launch, broker, tmp_path, FAILSAFE_AFTER_SEC="1",
                       SHUTDOWN_CMD=shutdown_cmd)
        try:
            agent = rig.start()
            rig.commander.client.publish(
                f"power-manager/{rig.agent_id}/supply",
                json.dumps({"agent": rig.agent_id, "on_battery": True}), qos=1, retain=True,
            ).wait_for_publish(5)
            rig.commander.close()
            time.sleep(0.5)
            broker.stop()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if len(agent.dry_run_entries()) >= 2:
                    break
                time.sleep(0.2)
            assert [e["step"] for e in agent.dry_run_entries()] == steps
        finally:
            for process in rig.processes:
                process.stop()


def test_agent_over_tls_with_its_own_broker_user(secure_mqtt_broker, tmp_path):
    broker = secure_mqtt_broker
    agent_env = {
        "AGENT_ID": "nas-01", "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.tls_port),
        "MQTT_PASS": broker.users["nas-01"], "MQTT_TLS_CA": str(broker.ca_file),
        "COMMAND_SIGNING_KEY": KEY, "DRY_RUN": "true",
        "DRY_RUN_LOG": str(tmp_path / "dry-run.jsonl"), "STATE_DIR": str(tmp_path / "state"),
    }
    user, password = broker.credentials("policy")
    commander = Commander(broker.host, broker.port, "nas-01", user, password)
    agent = AgentProcess([sys.executable, str(SCRIPT)], agent_env, tmp_path).start()
    try:
        commander.wait("status", lambda p: p.get("state") == "online")
        cmd = signed(dict(
            v=1, id="tls-" + tmp_path.name, agent="nas-01", action="test", delay_sec=0,
            ttl_sec=60, issued_at=int(time.time()), episode_id="", cancels="",
            reason="fire-test"))
        commander.send(cmd)
        assert commander.ack(cmd["id"])["status"] == "received"
    finally:
        agent.stop()
        commander.close()
    assert broker.users["nas-01"] not in agent.output()


def test_agent_is_back_online_soon_after_the_broker_returns(tmp_path):
    agent_is_back_online_soon_after_the_broker_returns(launch, tmp_path)


@pytest.mark.parametrize(("value", "mode"), [
    ("shutdown -h +{delay_min}", "timer"),
    ("/sbin/shutdown -h +{delay_min} UPS battery low", "timer"),
    ("shutdown -h now", "halt_at_commit"),
    ("shutdown -P now 'UPS battery low'", "halt_at_commit"),
    ("shutdown -h 0", "halt_at_commit"),
    ("poweroff", "halt_at_commit"),
    ("systemctl poweroff", "halt_at_commit"),
    ("halt -p", "halt_at_commit"),
])
def test_seed_and_default_shutdown_cmds_keep_their_meaning(value, mode):
    argv = agent_module.shlex.split(value)
    assert agent_module.classify_shutdown_cmd(argv, abort_cmd_set=False) == mode


@pytest.mark.parametrize("value", [
    "reboot", "shutdown -r +{delay_min}", "systemctl reboot", "halt -f", "shutdown now -h",
    "sudo shutdown -h now", "sh -c 'sleep {delay_sec} && poweroff'",
])
def test_shutdown_cmds_the_agent_cannot_use_safely_are_refused(value):
    with pytest.raises(agent_module.ConfigError, match=r"^SHUTDOWN_CMD=.*(write|set ABORT_CMD)"):
        agent_module.classify_shutdown_cmd(agent_module.shlex.split(value), abort_cmd_set=False)


@pytest.mark.parametrize("field", ["id", "agent", "episode_id", "cancels", "reason"])
def test_a_trailing_newline_is_outside_the_contract_alphabet(field):
    # Python's `$` also matches before a final newline; the canonical form is newline-joined, so a
    # field ending in one must be refused like any other control character.
    cmd = dict(VECTORS[0]["command"])
    cmd[field] = (cmd[field] or "x") + "\n"
    with pytest.raises(ValueError, match=f"^{field} has characters outside"):
        agent_module.parse_command(json.dumps(cmd).encode())
