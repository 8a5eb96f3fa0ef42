"""scripts/stack-up: the first-start files for `docker compose up`, checked natively (no Docker
engine here): compose/.env with every password filled, and a Mosquitto password file that a
real Mosquitto accepts."""

from __future__ import annotations

import contextlib
import getpass
import json
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
           "DEMO_AGENT_MQTT_PASS")


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
    assert sorted(users) == ["bridge", "collector", "demo-host", "nas-01", "policy"]


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
