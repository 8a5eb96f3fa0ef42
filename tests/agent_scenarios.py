"""Scenarios every host agent must pass, shared by the Linux and macOS agent tests.

Each scenario gets an `AgentRig`: a broker, a way to start the agent under test as a real
process in dry-run mode, and a commander playing the policy worker (publishing commands,
collecting acks and status).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
VECTORS = json.loads((REPO / "agents" / "contract" / "vectors.json").read_text())["vectors"]
KEY = "test-signing-key-" + uuid.uuid4().hex[:8]
SIGNED_FIELDS = ("agent", "id", "action", "delay_sec", "ttl_sec", "issued_at", "episode_id",
                 "cancels", "reason")
TIMEOUT = 10.0


def canonical(cmd: dict) -> str:
    return "\n".join(["ecoflow-cmd-v1"] + [str(cmd[f]) for f in SIGNED_FIELDS])


def signed(cmd: dict, key: str = KEY) -> dict:
    sig = hmac.new(key.encode(), canonical(cmd).encode(), hashlib.sha256).hexdigest()
    return dict(cmd, sig=sig)


def command(agent: str, action: str = "shutdown", **fields) -> dict:
    cmd = {"v": 1, "id": str(uuid.uuid4()), "agent": agent, "action": action,
           "delay_sec": 30, "ttl_sec": 300, "issued_at": int(time.time()),
           "episode_id": "EP-" + uuid.uuid4().hex[:6], "cancels": "",
           "reason": "soc_min 9 <= 10 on battery; test $(touch /tmp/pwned) `id` ;|&"}
    cmd.update(fields)
    return cmd


class Commander:
    """Plays the policy worker: publishes commands and watches an agent's ack and status."""

    def __init__(self, host: str, port: int, agent: str, username: str | None = None,
                 password: str | None = None):
        self.agent = agent
        self.messages: queue.Queue = queue.Queue()
        self.seen: list[tuple[str, dict, bool]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id="commander-" + uuid.uuid4().hex[:8],
                                  protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        subscribed = queue.Queue()
        self.client.on_subscribe = lambda *a: subscribed.put(True)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(f"power-manager/{agent}/ack", 1), (f"power-manager/{agent}/status", 1)])
        self.client.connect(host, port)
        self.client.loop_start()
        subscribed.get(timeout=TIMEOUT)

    def _on_message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"raw": msg.payload.decode(errors="replace")}
        self.messages.put((msg.topic.rsplit("/", 1)[-1], payload, bool(msg.retain)))

    def send(self, cmd: dict, retain: bool = False, expiry: int | None = None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = expiry or int(cmd.get("ttl_sec", 300))
        info = self.client.publish(f"power-manager/{self.agent}/cmd", json.dumps(cmd), qos=1,
                                   retain=retain, properties=props)
        info.wait_for_publish(TIMEOUT)

    def clear_retained_cmd(self) -> None:
        self.client.publish(f"power-manager/{self.agent}/cmd", b"", qos=1,
                            retain=True).wait_for_publish(TIMEOUT)

    def wait(self, kind: str, match, timeout: float = TIMEOUT) -> dict:
        """The first message of `kind` (ack/status) for which match(payload) is true,
        looking at those already seen first."""
        for k, payload, _ in self.seen:
            if k == kind and match(payload):
                return payload
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} matching within {timeout} s; seen: {self.seen}")
            try:
                item = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if item[0] == kind and match(item[1]):
                return item[1]

    def ack(self, command_id: str, timeout: float = TIMEOUT) -> dict:
        return self.wait("ack", lambda p: p.get("id") == command_id, timeout)

    def acks(self, command_id: str, settle: float = 1.0) -> list[dict]:
        """All acks for command_id that arrive within `settle` seconds of quiet."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.messages.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
        return [p for k, p, _ in self.seen if k == "ack" and p.get("id") == command_id]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class AgentProcess:
    """An agent started as a real process in its own process group."""

    argv: list[str]
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self):
        self.log_path = self.workdir / f"agent-{uuid.uuid4().hex[:6]}.log"

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the whole group, as systemd or launchd would on a hard stop."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def dry_run_entries(self) -> list[dict]:
        path = Path(self.env["DRY_RUN_LOG"])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class AgentRig:
    """One agent under test with its own id, state directory and commander."""

    def __init__(self, launcher, broker, tmp_path: Path, **env):
        self.agent_id = "agent-" + uuid.uuid4().hex[:8]
        self.broker = broker
        self.tmp = tmp_path
        self.env = {
            "AGENT_ID": self.agent_id,
            "MQTT_HOST": broker.host,
            "MQTT_PORT": str(broker.port),
            "COMMAND_SIGNING_KEY": KEY,
            "DRY_RUN": "true",
            "DRY_RUN_LOG": str(tmp_path / "dry-run.jsonl"),
            "STATE_DIR": str(tmp_path / "state"),
            "CLOCK_SKEW_SEC": "5",
            "PRE_SHUTDOWN_CMD_1": "systemctl stop pretend-workload",
            "PRE_SHUTDOWN_TIMEOUT_SEC": "5",
        }
        if getattr(broker, "username", None):
            self.env["MQTT_USER"], self.env["MQTT_PASS"] = broker.username, broker.password
        self.env.update(env)
        self.launcher = launcher
        self.commander = Commander(broker.host, broker.port, self.agent_id,
                                   getattr(broker, "username", None),
                                   getattr(broker, "password", None))
        self.processes: list[AgentProcess] = []

    def start(self) -> AgentProcess:
        mark = len(self.commander.seen)
        agent = self.launcher(self.env, self.tmp).start()
        self.processes.append(agent)
        try:
            self.wait_online(since=mark)
        except AssertionError:
            agent.stop()
            raise AssertionError(f"agent did not come online:\n{agent.output()}") from None
        return agent

    def wait_online(self, since: int = 0) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            fresh = self.commander.seen[since:]
            if any(k == "status" and p.get("state") == "online" for k, p, _ in fresh):
                return
            try:
                self.commander.seen.append(self.commander.messages.get(timeout=0.2))
            except queue.Empty:
                pass
        raise AssertionError("no online status")

    def command(self, action: str = "shutdown", **fields) -> dict:
        return command(self.agent_id, action, **fields)

    def close(self) -> None:
        for agent in self.processes:
            agent.stop()
        self.commander.close()


def shutdown_runs(agent: AgentProcess, command_id: str) -> list[dict]:
    return [e for e in agent.dry_run_entries()
            if e["command_id"] == command_id and e["step"] == "shutdown"]


# -- the scenarios --------------------------------------------------------------------------
def genuine_command_runs_once_and_redelivery_does_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = signed(rig.command(delay_sec=1))
    rig.commander.send(cmd)
    first = rig.commander.ack(cmd["id"])
    assert first["status"] == "dry_run", first
    assert first["agent"] == rig.agent_id and first["host"]
    rig.commander.send(cmd)
    rig.commander.wait("ack", lambda p: p.get("id") == cmd["id"] and p["detail"] == "duplicate")
    rig.commander.wait("ack", lambda p: p.get("id") == cmd["id"] and "commit" in p["detail"])
    assert len(shutdown_runs(agent, cmd["id"])) == 1, agent.dry_run_entries()
    steps = [e["step"] for e in agent.dry_run_entries() if e["command_id"] == cmd["id"]]
    assert steps == ["shutdown", "pre_shutdown_1"], steps


def retained_command_runs_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = signed(rig.command())
    rig.commander.send(cmd, retain=True)
    try:
        ack = rig.commander.ack(cmd["id"])
        assert (ack["status"], ack["detail"]) == ("rejected", "retained"), ack
    finally:
        rig.commander.clear_retained_cmd()
    assert agent.dry_run_entries() == []


def retained_command_waiting_at_start_runs_nothing(rig: AgentRig) -> None:
    cmd = signed(rig.command())
    rig.commander.send(cmd, retain=True)
    try:
        agent = rig.start()
        ack = rig.commander.ack(cmd["id"])
        assert (ack["status"], ack["detail"]) == ("rejected", "retained"), ack
    finally:
        rig.commander.clear_retained_cmd()
    assert agent.dry_run_entries() == []


def expired_command_runs_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = signed(rig.command(issued_at=int(time.time()) - 400, ttl_sec=300))
    rig.commander.send(cmd, expiry=300)
    ack = rig.commander.ack(cmd["id"])
    assert ack["status"] == "expired", ack
    assert agent.dry_run_entries() == []


def command_from_the_future_runs_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = signed(rig.command(issued_at=int(time.time()) + 120))
    rig.commander.send(cmd)
    assert rig.commander.ack(cmd["id"])["status"] == "rejected"
    assert agent.dry_run_entries() == []


def unsigned_command_runs_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = rig.command()
    rig.commander.send(cmd)
    ack = rig.commander.ack(cmd["id"])
    assert (ack["status"], ack["detail"]) == ("rejected", "missing signature"), ack
    assert agent.dry_run_entries() == []


def forged_command_runs_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    forged = signed(rig.command(), key="not-the-key")
    tampered = signed(rig.command(delay_sec=600))
    tampered["delay_sec"] = 0
    for cmd in (forged, tampered):
        rig.commander.send(cmd)
        ack = rig.commander.ack(cmd["id"])
        assert (ack["status"], ack["detail"]) == ("rejected", "bad signature"), ack
    assert agent.dry_run_entries() == []


def command_for_another_agent_runs_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = signed(command("some-other-host"))
    rig.commander.send(cmd)
    ack = rig.commander.ack(cmd["id"])
    assert (ack["status"], ack["detail"]) == ("rejected", "wrong agent"), ack
    assert agent.dry_run_entries() == []


def malformed_command_runs_nothing(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = signed(rig.command(reason='has a "quote"'))
    rig.commander.send(cmd)
    assert rig.commander.ack(cmd["id"])["status"] == "rejected"
    assert agent.dry_run_entries() == []


def abort_inside_the_window_cancels(rig: AgentRig) -> None:
    agent = rig.start()
    shutdown = signed(rig.command(delay_sec=2))
    rig.commander.send(shutdown)
    assert rig.commander.ack(shutdown["id"])["status"] == "dry_run"
    abort = signed(rig.command("abort", delay_sec=0, cancels=shutdown["id"],
                               episode_id=shutdown["episode_id"], reason="grid back"))
    rig.commander.send(abort)
    ack = rig.commander.ack(abort["id"])
    assert ack["status"] == "aborted", ack
    time.sleep(2.2)  # past the cancelled commit point: nothing more may happen
    steps = [e["step"] for e in agent.dry_run_entries()]
    assert steps == ["shutdown", "abort"], steps
    assert [a["status"] for a in rig.commander.acks(shutdown["id"], settle=0.2)] == ["dry_run"]


def abort_after_the_commit_point_is_refused(rig: AgentRig) -> None:
    agent = rig.start()
    shutdown = signed(rig.command(delay_sec=1))
    rig.commander.send(shutdown)
    rig.commander.wait("ack", lambda p: p.get("id") == shutdown["id"]
                       and "commit point" in p.get("detail", ""))
    abort = signed(rig.command("abort", delay_sec=0, cancels=shutdown["id"]))
    rig.commander.send(abort)
    ack = rig.commander.ack(abort["id"])
    assert (ack["status"], ack["detail"]) == ("rejected", "abort after commit point"), ack
    assert "abort" not in [e["step"] for e in agent.dry_run_entries()]


def action_test_runs_nothing_destructive(rig: AgentRig) -> None:
    agent = rig.start()
    cmd = signed(rig.command("test", delay_sec=0))
    rig.commander.send(cmd)
    ack = rig.commander.ack(cmd["id"])
    assert ack["status"] == "received", ack
    assert agent.dry_run_entries() == []


def command_sent_while_disconnected_arrives_after_reconnect(rig: AgentRig) -> None:
    first = rig.start()
    first.stop()
    rig.commander.wait("status", lambda p: p.get("state") == "offline")
    cmd = signed(rig.command(delay_sec=1))
    rig.commander.send(cmd)
    second = rig.start()
    assert rig.commander.ack(cmd["id"])["status"] == "dry_run"
    assert len(shutdown_runs(second, cmd["id"])) == 1


def killed_agent_is_reported_offline(rig: AgentRig) -> None:
    agent = rig.start()
    online = rig.commander.wait("status", lambda p: p.get("state") == "online")
    assert online["agent"] == rig.agent_id
    mark = len(rig.commander.seen)
    agent.kill()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(k == "status" and p.get("state") == "offline"
               for k, p, _ in rig.commander.seen[mark:]):
            return
        try:
            rig.commander.seen.append(rig.commander.messages.get(timeout=0.2))
        except queue.Empty:
            pass
    raise AssertionError(f"no offline status after SIGKILL: {rig.commander.seen}")


def wait_for_steps(agent: AgentProcess, count: int, timeout: float = TIMEOUT) -> list[dict]:
    """The dry-run entries once there are at least `count` of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = agent.dry_run_entries()
        if len(entries) >= count:
            return entries
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} dry-run entries: {agent.dry_run_entries()}")


# Issue 13, item 4: the earlier tool's SHUTDOWN_CMD="shutdown -h now" meant "halt after the
# pre-shutdown commands"; run when the command was accepted, it halted at once, with no abort
# window and with the pre-shutdown commands after the halt.
SEED_HALT = "shutdown -h now"


def seed_halt_now_runs_at_the_commit_point_after_the_pre_shutdown_commands(rig: AgentRig) -> None:
    rig.env["SHUTDOWN_CMD"] = SEED_HALT
    agent = rig.start()
    cmd = signed(rig.command(delay_sec=2))
    accepted = time.time()
    rig.commander.send(cmd)
    ack = rig.commander.ack(cmd["id"])
    assert ack["status"] == "dry_run", ack
    assert "abort possible until" in ack["detail"], ack
    assert agent.dry_run_entries() == [], "halted at acceptance, before the abort window"
    rig.commander.wait("ack", lambda p: p.get("id") == cmd["id"]
                       and "commit point" in p.get("detail", ""))
    entries = wait_for_steps(agent, 2)
    assert [e["step"] for e in entries] == ["pre_shutdown_1", "shutdown"], entries
    assert entries[1]["argv"] == ["shutdown", "-h", "now"], entries
    assert entries[1]["ts"] >= accepted + 1.0, (accepted, entries)
    assert entries[0]["ts"] <= entries[1]["ts"]


def seed_halt_now_aborted_inside_the_window_never_runs(rig: AgentRig) -> None:
    rig.env["SHUTDOWN_CMD"] = SEED_HALT
    agent = rig.start()
    shutdown = signed(rig.command(delay_sec=2))
    rig.commander.send(shutdown)
    assert rig.commander.ack(shutdown["id"])["status"] == "dry_run"
    abort = signed(rig.command("abort", delay_sec=0, cancels=shutdown["id"],
                               episode_id=shutdown["episode_id"], reason="grid back"))
    rig.commander.send(abort)
    ack = rig.commander.ack(abort["id"])
    assert (ack["status"], ack["detail"]) == ("aborted", f"cancelled {shutdown['id']} (dry run)")
    time.sleep(2.5)  # past the cancelled commit point
    # No halt, no pre-shutdown command, and no ABORT_CMD: nothing was handed to the OS.
    assert agent.dry_run_entries() == []
    assert [a["status"] for a in rig.commander.acks(shutdown["id"], settle=0.2)] == ["dry_run"]


def seed_halt_now_in_live_mode_halts_last(rig: AgentRig) -> None:
    """Real processes: fake pre-shutdown and halt commands that record when they ran."""
    calls = rig.tmp / "calls.log"
    bindir = rig.tmp / "seed-bin"
    bindir.mkdir(exist_ok=True)
    for name in ("shutdown", "stop-workload"):
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "$(date +%s.%N) {name} $*" >> "{calls}"\n')
        script.chmod(0o755)
    rig.env.update(DRY_RUN="false", SHUTDOWN_CMD=f"{bindir}/shutdown -h now",
                   PRE_SHUTDOWN_CMD_1=f"{bindir}/stop-workload")
    rig.start()
    cmd = signed(rig.command(delay_sec=2))
    accepted = time.time()
    rig.commander.send(cmd)
    assert rig.commander.ack(cmd["id"])["status"] == "scheduled"
    assert not calls.exists(), calls.read_text()
    done = rig.commander.wait("ack", lambda p: p.get("id") == cmd["id"]
                              and p["status"] == "executing")
    assert done["detail"] == "commit point reached; pre-shutdown: 1 ok; halting now", done
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and len(_lines(calls)) < 2:
        time.sleep(0.1)
    lines = [line.split(" ", 1) for line in _lines(calls)]
    assert [what for _, what in lines] == ["stop-workload ", "shutdown -h now"], lines
    assert float(lines[0][0]) >= accepted + 1.0, (accepted, lines)
    assert float(lines[0][0]) <= float(lines[1][0])


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# What each refusal must tell the user to write instead.
UNUSABLE_SHUTDOWN_CMDS = {
    "reboot": "write SHUTDOWN_CMD=shutdown -h +{delay_min}",
    "shutdown -r now": "write SHUTDOWN_CMD=shutdown -h +{delay_min}",
    "/usr/local/bin/my-halt-script": "or SHUTDOWN_CMD=shutdown -h now",
    "halt -f": "or SHUTDOWN_CMD=shutdown -h now",
    "my-timer --in {delay_sec}": "set ABORT_CMD",
}


def unusable_shutdown_cmd_is_refused_at_start(rig: AgentRig) -> None:
    for value, advice in UNUSABLE_SHUTDOWN_CMDS.items():
        agent = rig.launcher(dict(rig.env, SHUTDOWN_CMD=value), rig.tmp).start()
        try:
            code = agent.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            agent.stop()
            raise AssertionError(f"SHUTDOWN_CMD={value!r} was accepted:\n{agent.output()}") from None
        agent.stop()
        assert code != 0, (value, agent.output())
        assert f"SHUTDOWN_CMD='{value}'" in agent.output(), agent.output()
        assert advice in agent.output(), (value, agent.output())
    assert rig.commander.messages.empty(), "a refused configuration must not come online"


def agent_is_back_online_soon_after_the_broker_returns(launch, tmp_path: Path) -> None:
    """Issue 13, item 9: after a 15 s broker outage the agent came back 16 s late (its
    reconnect back-off had doubled up to 30 s). `launch` is the agent's launcher."""
    from testbed.mosquitto import MosquittoServer

    # A private broker, because this test stops it; without persistence, so the agent's
    # retained status is gone with it and only the agent itself can announce "online" again.
    with MosquittoServer() as broker:
        rig = AgentRig(launch, broker, tmp_path)
        try:
            rig.start()
            rig.commander.close()
            broker.halt()
            time.sleep(16)
            broker.start()
            returned = time.monotonic()
            rig.commander = Commander(broker.host, broker.port, rig.agent_id)
            rig.wait_online()
            late = time.monotonic() - returned
            assert late <= 6, f"online {late:.1f} s after the broker returned"
            cmd = signed(rig.command("test", delay_sec=0))
            rig.commander.send(cmd)
            assert rig.commander.ack(cmd["id"])["status"] == "received"
        finally:
            rig.close()


SCENARIOS = [
    genuine_command_runs_once_and_redelivery_does_nothing,
    retained_command_runs_nothing,
    retained_command_waiting_at_start_runs_nothing,
    expired_command_runs_nothing,
    command_from_the_future_runs_nothing,
    unsigned_command_runs_nothing,
    forged_command_runs_nothing,
    command_for_another_agent_runs_nothing,
    malformed_command_runs_nothing,
    abort_inside_the_window_cancels,
    abort_after_the_commit_point_is_refused,
    action_test_runs_nothing_destructive,
    command_sent_while_disconnected_arrives_after_reconnect,
    killed_agent_is_reported_offline,
    seed_halt_now_runs_at_the_commit_point_after_the_pre_shutdown_commands,
    seed_halt_now_aborted_inside_the_window_never_runs,
    seed_halt_now_in_live_mode_halts_last,
    unusable_shutdown_cmd_is_refused_at_start,
]
