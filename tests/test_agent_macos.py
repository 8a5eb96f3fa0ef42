"""The macOS agent (agents/macos/ecoflow-agent.sh) run under bash here, with the real
mosquitto clients and openssl, against a real Mosquitto; fake `shutdown`/`killall` on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.agent_scenarios import (
    REPO,
    SCENARIOS,
    VECTORS,
    AgentProcess,
    AgentRig,
    agent_is_back_online_soon_after_the_broker_returns,
    signed,
)

SCRIPT = REPO / "agents" / "macos" / "ecoflow-agent.sh"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "mosquitto_sub", "mosquitto_pub", "openssl")),
    reason="needs bash, mosquitto-clients and openssl",
)


def fake_bin(workdir: Path) -> Path:
    """`shutdown` and `killall` that only record how they were called."""
    bindir = workdir / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("shutdown", "killall"):
        path = bindir / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{workdir}/calls"\n')
        path.chmod(0o755)
    return bindir


def launch(env: dict, workdir: Path) -> AgentProcess:
    env = dict(env, PATH=f"{fake_bin(workdir)}:{os.environ['PATH']}")
    return AgentProcess(["bash", str(SCRIPT)], env, workdir)


@pytest.fixture
def rig(mqtt_broker, tmp_path):
    rig = AgentRig(launch, mqtt_broker, tmp_path)
    yield rig
    rig.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_macos_agent(scenario, rig):
    scenario(rig)


def _shell_signature(key: str, command: dict) -> str:
    """The script's own canonical form and HMAC, run in bash with the vector's fields."""
    program = (
        f'source <(sed -n "/^# -- contract/,/^# -- MQTT output/p" {SCRIPT})\n'
        "make_pads\n"
        'hmac_hex "$(canonical)"\n'
    )
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C", "KEY": key}
    for field in ("agent", "id", "action", "delay_sec", "ttl_sec", "issued_at", "episode_id",
                  "cancels", "reason"):
        env[f"C_{field}"] = str(command[field])
    out = subprocess.run(["bash", "-c", program], env=env, capture_output=True, check=True)
    return out.stdout.decode().strip()


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_shell_signature_matches_the_shared_vectors(vector):
    assert _shell_signature(vector["key"], vector["command"]) == vector["sig"]


def test_live_mode_runs_the_fixed_commands_only(mqtt_broker, tmp_path):
    rig = AgentRig(launch, mqtt_broker, tmp_path, DRY_RUN="false",
                   PRE_SHUTDOWN_CMD_1="", PRE_SHUTDOWN_TIMEOUT_SEC="5")
    try:
        rig.start()
        shutdown = signed(rig.command(delay_sec=30))
        rig.commander.send(shutdown)
        assert rig.commander.ack(shutdown["id"])["status"] == "scheduled"
        abort = signed(rig.command("abort", delay_sec=0, cancels=shutdown["id"]))
        rig.commander.send(abort)
        assert rig.commander.ack(abort["id"])["status"] == "aborted"
        assert (tmp_path / "calls").read_text().splitlines() == [
            "shutdown -h +1", "killall shutdown"]
        assert not Path("/tmp/pwned").exists()
    finally:
        rig.close()


def test_password_is_not_on_the_command_line(secure_mqtt_broker, tmp_path):
    broker = secure_mqtt_broker
    env = {"AGENT_ID": "pc-01", "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.tls_port),
           "MQTT_PASS": broker.users["pc-01"], "MQTT_TLS_CA": str(broker.ca_file),
           "DRY_RUN": "true", "STATE_DIR": str(tmp_path / "state"),
           "DRY_RUN_LOG": str(tmp_path / "dry.jsonl")}
    agent = launch(env, tmp_path).start()
    try:
        deadline = time.monotonic() + 10
        while "connected and subscribed" not in agent.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "subscribed to power-manager/pc-01/cmd" in agent.output(), agent.output()
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert broker.users["pc-01"] not in ps
    finally:
        agent.stop()


def test_agent_is_back_online_soon_after_the_broker_returns(tmp_path):
    agent_is_back_online_soon_after_the_broker_returns(launch, tmp_path)
