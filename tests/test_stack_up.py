"""scripts/stack-up: the first-start files for `docker compose up`, checked natively (no Docker
engine here): compose/.env with every password filled, and a Mosquitto password file that a
real Mosquitto accepts."""

from __future__ import annotations

import contextlib
import getpass
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from testbed.mosquitto import find_mosquitto
from testbed.ports import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "stack-up"
SECRETS = ("POSTGRES_PASSWORD", "POSTGRES_READONLY_PASSWORD", "GRAFANA_ADMIN_PASSWORD",
           "COMMAND_SIGNING_KEY", "POLICY_MQTT_PASS", "COLLECTOR_MQTT_PASS", "BRIDGE_MQTT_PASS",
           "DEMO_AGENT_MQTT_PASS", "HA_MQTT_PASS", "HOMEASSISTANT_MQTT_PASS")


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    target = tmp_path / "compose"
    target.mkdir()
    shutil.copyfile(REPO / "compose" / ".env.example", target / ".env.example")
    shutil.copytree(REPO / "compose" / "mosquitto", target / "mosquitto")
    (target / "mosquitto" / "passwd").unlink(missing_ok=True)
    return target


def run(compose_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--no-start", "--compose-dir",
                           str(compose_dir), *args], capture_output=True, text=True, timeout=60)


def env_values(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_first_start_fills_every_password_and_maps_the_demo_stations(compose_dir):
    done = run(compose_dir)
    assert done.returncode == 0, done.stderr
    values = env_values(compose_dir / ".env")
    assert set(env_values(compose_dir / ".env.example")) == set(values)
    for name in SECRETS:
        assert len(values[name]) >= 20, name
    assert len({values[name] for name in SECRETS}) == len(SECRETS)
    mapping = json.loads(values["DEVICE_TO_AGENTS_JSON"].strip("'"))
    assert mapping == {sn: ["demo-host"] for sn in
                       ("DAEBZ5ZE4000123", "R351ZFB4HF123456", "R631ZEB4WH123456")}
    assert (compose_dir / ".env").stat().st_mode & 0o077 == 0
    for name in SECRETS:  # nothing secret printed
        assert values[name] not in done.stdout + done.stderr


def test_a_second_run_changes_no_value_and_keeps_other_broker_users(compose_dir):
    run(compose_dir)
    first = env_values(compose_dir / ".env")
    passwd = compose_dir / "mosquitto" / "passwd"
    passwd.write_text(passwd.read_text() + "nas-01:$7$101$abc$def\n")
    assert run(compose_dir).returncode == 0
    assert env_values(compose_dir / ".env") == first
    users = [line.split(":")[0] for line in passwd.read_text().splitlines()]
    assert sorted(users) == ["bridge", "collector", "demo-host", "ecoflow-ha", "homeassistant",
                             "nas-01", "policy"]


def test_every_broker_password_the_stack_reads_is_generated(compose_dir):
    """A password variable .env.example leaves empty and the init step needs must be filled by
    stack-up, or its profile starts with a broker user nobody can log in as."""
    assert run(compose_dir).returncode == 0
    values = env_values(compose_dir / ".env")
    empty = [name for name, value in values.items() if name.endswith("_MQTT_PASS") and not value]
    assert not empty


def test_the_ecoflow_profile_needs_credentials(compose_dir):
    done = run(compose_dir, "--profile", "ecoflow")
    assert done.returncode == 2 and "Connect to EcoFlow" in done.stderr


def _login(port: int, user: str, password: str) -> bool:
    result = {}

    def on_connect(_c, _u, _f, reason, _p):
        result["ok"] = not reason.is_failure

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{user}", protocol=mqtt.MQTTv5)
    client.username_pw_set(user, password)
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while "ok" not in result and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return result.get("ok", False)


@contextlib.contextmanager
def broker_with(tmp_path: Path, passwd: Path, *extra: str):
    """A real Mosquitto that only admits the users of `passwd`; yields its port."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(["per_listener_settings false", "allow_anonymous false",
                               f"password_file {passwd}", *extra,
                               f"listener {port} 127.0.0.1", f"user {getpass.getuser()}"])
                    + "\n")
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_mosquitto_accepts_the_generated_password_file(compose_dir, tmp_path):
    assert run(compose_dir).returncode == 0
    values = env_values(compose_dir / ".env")
    with broker_with(tmp_path, compose_dir / "mosquitto" / "passwd",
                     f"acl_file {compose_dir / 'mosquitto' / 'acl'}") as port:
        assert _login(port, "policy", values["POLICY_MQTT_PASS"])
        assert _login(port, "collector", values["COLLECTOR_MQTT_PASS"])
        assert _login(port, "demo-host", values["DEMO_AGENT_MQTT_PASS"])
        assert not _login(port, "policy", values["COLLECTOR_MQTT_PASS"])


def test_add_mqtt_user_writes_a_user_the_compose_broker_can_read(tmp_path):
    import os

    passwd = tmp_path / "compose" / "mosquitto" / "passwd"
    passwd.parent.mkdir(parents=True)
    mosquitto_passwd = shutil.which("mosquitto_passwd") or str(
        Path(find_mosquitto()).parent / "mosquitto_passwd")
    env = dict(os.environ, MQTT_NEW_PASSWORD="s3cret-for-nas",
               PATH=f"{Path(mosquitto_passwd).parent}:{os.environ['PATH']}")
    out = subprocess.run([str(REPO / "scripts" / "add-mqtt-user"), "nas-01", str(passwd)],
                         env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "s3cret-for-nas" not in out.stdout + out.stderr
    st = passwd.stat()
    if os.geteuid() == 0:  # the container's broker (uid 1883) owns it
        assert (st.st_uid, st.st_mode & 0o777) == (1883, 0o600)
    else:  # readable by the container's broker
        assert st.st_mode & 0o777 == 0o644
    with broker_with(tmp_path, passwd) as port:
        assert _login(port, "nas-01", "s3cret-for-nas")
        assert not _login(port, "nas-01", "wrong")


# -- the stack's own first start: compose/.env alone ----------------------------------------
# `docker compose up` runs compose/mosquitto/init-users.sh in the eclipse-mosquitto image
# (mosquitto-users) before the broker starts: here it runs with this machine's sh and
# mosquitto_passwd, and the broker is a real Mosquitto started with the shipped mosquitto.conf,
# only its container paths and the listener moved to temporary ones.
CONF = REPO / "compose" / "mosquitto" / "mosquitto.conf"
INIT = REPO / "compose" / "mosquitto" / "init-users.sh"


def filled_env_example() -> dict[str, str]:
    """.env.example as a user fills it: every empty password set."""
    values = env_values(REPO / "compose" / ".env.example")
    for name in SECRETS:
        values[name] = f"{name.lower()}-S3cret"
    return values


def run_init(config_dir: Path, users_dir: Path, env: dict[str, str]):
    import os

    mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    full = {"PATH": f"{Path(mosquitto_passwd).parent}:{os.environ['PATH']}",
            "MOSQUITTO_CONFIG_DIR": str(config_dir), "MOSQUITTO_USERS_DIR": str(users_dir),
            **env}
    return subprocess.run(["sh", str(INIT)], env=full, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


class ShippedBroker:
    """Mosquitto with compose/mosquitto/mosquitto.conf, paths moved under `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.config = base / "config"
        self.users = base / "users"
        self.data = base / "data"
        for d in (self.users, self.data):
            d.mkdir(parents=True, exist_ok=True)
        if not self.config.exists():
            shutil.copytree(REPO / "compose" / "mosquitto", self.config)
        self.port = free_port()
        self.proc = None

    def conf(self) -> Path:
        text = CONF.read_text()
        for container, here in (("/mosquitto/config", self.config),
                                ("/mosquitto/users", self.users),
                                ("/mosquitto/data", self.data)):
            text = text.replace(container, str(here))
        text, listeners = re.subn(r"^listener 1883$", f"listener {self.port} 127.0.0.1",
                                  text, flags=re.M)
        assert listeners == 1
        path = self.base / "mosquitto.conf"
        path.write_text(text + f"\nuser {getpass.getuser()}\n")
        return path

    def start(self) -> ShippedBroker:
        self.proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf())],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for_port(self.port)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def shipped(tmp_path):
    broker = ShippedBroker(tmp_path / "broker")
    yield broker
    broker.stop()


def test_the_init_step_makes_every_user_the_stack_logs_in_as(shipped, tmp_path):
    values = filled_env_example()
    # A host agent added with scripts/add-mqtt-user is kept.
    agent_file = shipped.config / "passwd"
    subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-c", "-b",
                    str(agent_file), "nas-01", "nas-S3cret"], check=True)
    done = run_init(shipped.config, shipped.users, values)
    assert done.returncode == 0, done.stderr
    for name in SECRETS:
        assert values[name] not in done.stdout + done.stderr
    assert (shipped.users / "passwd").stat().st_mode & 0o077 == 0
    shipped.start()
    assert _login(shipped.port, "policy", values["POLICY_MQTT_PASS"])
    assert _login(shipped.port, "collector", values["COLLECTOR_MQTT_PASS"])
    assert _login(shipped.port, "bridge", values["BRIDGE_MQTT_PASS"])
    assert _login(shipped.port, "demo-host", values["DEMO_AGENT_MQTT_PASS"])
    assert _login(shipped.port, "nas-01", "nas-S3cret")
    assert not _login(shipped.port, "policy", values["COLLECTOR_MQTT_PASS"])


def test_the_init_step_runs_again_with_changed_passwords(shipped):
    values = filled_env_example()
    assert run_init(shipped.config, shipped.users, values).returncode == 0
    values["POLICY_MQTT_PASS"] = "rotated-S3cret"
    values["BRIDGE_MQTT_PASS"] = ""  # optional: the bridge user is then not made
    done = run_init(shipped.config, shipped.users, values)
    assert done.returncode == 0, done.stderr
    assert "BRIDGE_MQTT_PASS" in done.stderr
    shipped.start()
    assert _login(shipped.port, "policy", "rotated-S3cret")
    assert not _login(shipped.port, "policy", "policy_mqtt_pass-S3cret")
    assert not _login(shipped.port, "bridge", "bridge_mqtt_pass-S3cret")


@pytest.mark.parametrize("missing", ["POLICY_MQTT_PASS", "COLLECTOR_MQTT_PASS"])
def test_the_init_step_refuses_without_the_passwords_every_profile_needs(shipped, missing):
    values = filled_env_example()
    values[missing] = ""
    done = run_init(shipped.config, shipped.users, values)
    assert done.returncode != 0
    assert missing in done.stderr and "scripts/stack-up" in done.stderr
    assert not (shipped.users / "passwd").exists()


def _session(port: int, user: str, password: str, client_id: str, received: list):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=False)
    client.username_pw_set(user, password)
    client.max_inflight_messages_set(100)
    client.on_message = lambda _c, _u, m: received.append(m.payload)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _publish_all(port: int, password: str, count: int) -> None:
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t-bridge",
                            protocol=mqtt.MQTTv311)
    publisher.username_pw_set("bridge", password)
    publisher.max_inflight_messages_set(1000)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    infos = [publisher.publish("bridge-ecoflow/SN1/data", str(i).encode(), qos=1)
             for i in range(count)]
    for info in infos:
        info.wait_for_publish(30)
    publisher.disconnect()
    publisher.loop_stop()


def _wait_for(received: list, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(set(received)) < count and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("broker_restart", [None, "terminate", "kill"])
def test_the_shipped_broker_keeps_every_reading_for_a_collector_that_is_away(
        shipped, broker_restart):
    """A persistent-session QoS 1 subscriber away while 5,000 readings arrive gets all 5,000
    back, also across a broker restart and a broker killed after its autosave interval."""
    values = filled_env_example()
    assert run_init(shipped.config, shipped.users, values).returncode == 0
    shipped.start()
    count = 5000
    received: list[bytes] = []
    collector = _session(shipped.port, "collector", values["COLLECTOR_MQTT_PASS"],
                         "t-collector", received)
    collector.subscribe("bridge-ecoflow/+/data", qos=1)
    time.sleep(0.5)
    collector.disconnect()
    collector.loop_stop()

    _publish_all(shipped.port, values["BRIDGE_MQTT_PASS"], count)
    if broker_restart:
        autosave = int(re.search(r"^autosave_interval (\d+)$", CONF.read_text(), re.M)
                       .group(1))
        time.sleep(autosave + 1.5)
        shipped.stop(kill=broker_restart == "kill")
        shipped.start()

    received.clear()
    collector = _session(shipped.port, "collector", values["COLLECTOR_MQTT_PASS"],
                         "t-collector", received)
    try:
        _wait_for(received, count)
    finally:
        collector.disconnect()
        collector.loop_stop()
    assert len(set(received)) == count
