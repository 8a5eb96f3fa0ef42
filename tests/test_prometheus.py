"""Prometheus: the collector's and the policy worker's /metrics read by promtool and by a real
Prometheus server (Debian's package), the shipped config and alert rules checked and
unit-tested with promtool. Needs `prometheus` (scripts/install-system-deps installs it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from collector.settings import CollectorSettings
from servicekit.settings import SettingsError
from testbed.ports import free_port, wait_for_port
from testbed.prometheus import SHIPPED_DIR, PrometheusServer, adapted_config, find, promtool
from tests.collector_support import REPO, collector_env, start_collector_process
from tests.helpers import insert_reading

SILENT = "R331ZEB4ZEA0SILENT"  # known, last heard long ago: must read online 0 after a restart
SLOW = "R331ZEB4ZEA000SLOW"  # reports every few minutes: online within its own stale_after_sec
NEVER = "R331ZEB4ZEA00NEVER"  # in the devices table, never heard
AGENT = "nas-01"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, metric: str, /, **labels) -> float | None:
    return samples(text).get((metric, tuple(sorted(labels.items()))))


def check_metrics(text: str) -> None:
    """promtool's lint of an exposition: names, units, help, types."""
    result = promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


def seed_stations(db) -> None:
    now = datetime.now(timezone.utc)
    db.execute("INSERT INTO devices (device_sn, name, model, stale_after_sec, dead_after_sec)"
               " VALUES (%s, 'Study', 'Delta 2 Max', 120, 600), (%s, NULL, 'River 2', 600, 900),"
               " (%s, 'Garage', NULL, 120, 600)", (SILENT, SLOW, NEVER))
    insert_reading(db, now - timedelta(hours=3), SILENT, soc_percent=55, grid_connected=True,
                   watts_out_sum=80, remain_time_min=90)
    insert_reading(db, now - timedelta(seconds=200), SLOW, soc_percent=90, watts_in_sum=12)


def _serving(proc: subprocess.Popen, port: int) -> tuple[subprocess.Popen, int]:
    """The process once its metrics port answers; its output as the failure when it never does."""
    try:
        wait_for_port(port, timeout=30)
    except TimeoutError:
        proc.kill()
        raise AssertionError(proc.communicate()[0]) from None
    return proc, port


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to the ones still running, for a clean shutdown; killed after 20 s."""
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def collector_proc(db_url, mqtt_broker):
    started = []

    def start(**extra):
        port = free_port()
        env = collector_env(db_url, mqtt_broker, **extra)
        env["EXPORTER_PORT"] = str(port)
        for name in ("METRICS_PREFIX", "ECOFLOW_DEVICE_SN", "ECOFLOW_DEVICE_NAME"):
            if name not in extra:
                env.pop(name, None)
        proc = start_collector_process(env)
        started.append(proc)
        return _serving(proc, port)

    yield start
    _stop(started)


@pytest.fixture
def policy_proc(db_url, mqtt_broker):
    started = []

    def start(**extra):
        port = free_port()
        env = dict(os.environ, DATABASE_URL=db_url, MQTT_HOST=mqtt_broker.host,
                   MQTT_PORT=str(mqtt_broker.port), POLICY_INTERVAL_SEC="0.5",
                   DEVICE_TO_AGENTS_JSON=json.dumps({SILENT: [AGENT]}),
                   POLICY_METRICS_PORT=str(port), LOG_LEVEL="INFO",
                   MQTT_CLIENT_ID=f"policy-{port}", **extra)
        for name in ("POLICY_CONFIG_FILE", "METRICS_PREFIX"):
            if name not in extra:
                env.pop(name, None)
        proc = subprocess.Popen([sys.executable, "-m", "policy"], env=env, cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append(proc)
        return _serving(proc, port)

    yield start
    _stop(started)


def wait_until(fn, timeout: float = 20.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result or time.monotonic() > deadline:
            assert result, f"timed out waiting for {what}"
            return result
        time.sleep(0.2)


# -- the collector --------------------------------------------------------------------------
def test_a_restarted_collector_reports_known_silent_stations_offline(db, collector_proc):
    """After a restart the series of a station that stays silent disappeared, so an alert on
    `ecoflow_online == 0` could never fire; liveness is rebuilt from the database, with each
    station's own stale_after_sec."""
    seed_stations(db)
    _proc, port = collector_proc()
    text = scrape(port)
    check_metrics(text)
    assert value(text, "ecoflow_online", device=SILENT) == 0
    assert value(text, "ecoflow_online", device=NEVER) == 0
    # 200 s old, within its own 600 s (a hard-coded 120 s said offline).
    assert value(text, "ecoflow_online", device=SLOW) == 1
    assert value(text, "ecoflow_stale_after_seconds", device=SLOW) == 600
    assert value(text, "ecoflow_seconds_since_last_reading", device=SILENT) > 3 * 3600 - 60
    assert value(text, "ecoflow_seconds_since_last_reading", device=NEVER) is None
    # Its last known values, as a collector that had heard it would show them.
    assert value(text, "ecoflow_soc_percent", device=SILENT) == 55
    assert value(text, "ecoflow_output_watts", device=SILENT) == 80
    assert value(text, "ecoflow_remain_time_seconds", device=SILENT) == 90 * 60
    assert value(text, "ecoflow_grid_connected", device=SILENT) == 1
    assert value(text, "ecoflow_input_watts", device=SLOW) == 12
    assert value(text, "ecoflow_device_info", device=SILENT, name="Study",
                 model="Delta 2 Max") == 1
    assert value(text, "ecoflow_device_info", device=SLOW, name=SLOW, model="River 2") == 1
    assert value(text, "ecoflow_device_info", device=NEVER, name="Garage", model="") == 1
    # Never reported: no sample rather than a 0 an alert would read as a flat battery.
    assert value(text, "ecoflow_soc_percent", device=NEVER) is None
    assert value(text, "ecoflow_battery_temp_celsius", device=SILENT) is None


def test_power_is_in_watts_and_runtime_in_seconds_everywhere(db, collector_proc):
    seed_stations(db)
    _proc, port = collector_proc()
    names = {f.name for f in text_string_to_metric_families(scrape(port))}
    power = {n for n in names if "watt" in n}
    assert power and all(n.endswith("_watts") for n in power), power
    assert not any(n.endswith(("_min", "_minutes")) for n in names), names
    assert "ecoflow_remain_time_seconds" in names


def test_metrics_prefix_and_device_name_as_the_seed_exporter_reads_them(db, collector_proc):
    seed_stations(db)
    _proc, port = collector_proc(METRICS_PREFIX="powerstation", ECOFLOW_DEVICE_SN=SILENT,
                                 ECOFLOW_DEVICE_NAME="Basement UPS")
    text = scrape(port)
    check_metrics(text)
    ours = [f.name for f in text_string_to_metric_families(text)
            if not f.name.startswith(("python_", "process_"))]
    assert ours and all(n.startswith("powerstation_") for n in ours), [
        n for n in ours if not n.startswith("powerstation_")]
    assert value(text, "powerstation_online", device=SILENT) == 0
    assert value(text, "powerstation_device_info", device=SILENT, name="Basement UPS",
                 model="Delta 2 Max") == 1
    assert value(text, "powerstation_device_info", device=NEVER, name="Garage", model="") == 1


def test_device_name_needs_exactly_one_serial():
    from collector.settings import ENV_NAMES
    from servicekit.settings import load

    with pytest.raises(SettingsError, match="ECOFLOW_DEVICE_NAME"):
        load(CollectorSettings, ENV_NAMES, ECOFLOW_DEVICE_NAME="UPS")
    with pytest.raises(SettingsError, match="ECOFLOW_DEVICE_NAME"):
        load(CollectorSettings, ENV_NAMES, ECOFLOW_DEVICE_NAME="UPS",
             ECOFLOW_DEVICE_SN="A1,B2")
    with pytest.raises(SettingsError, match="METRICS_PREFIX"):
        load(CollectorSettings, ENV_NAMES, METRICS_PREFIX="eco-flow")
    s = load(CollectorSettings, ENV_NAMES, ECOFLOW_DEVICE_NAME="UPS", ECOFLOW_DEVICE_SN="A1")
    assert s.metrics_names == {"A1": "UPS"}


# -- the policy worker ----------------------------------------------------------------------
def test_policy_worker_metrics(db, policy_proc, mqtt_broker):
    from tests.collector_support import publisher

    seed_stations(db)
    _proc, port = policy_proc()
    def evaluated_three_times():
        t = scrape(port)
        return t if ((value(t, "ecoflow_policy_evaluations_total") or 0) >= 3
                     and value(t, "ecoflow_agent_online", agent=AGENT) is not None) else None

    text = wait_until(evaluated_three_times, what="three evaluations and the agent's gauge")
    check_metrics(text)
    assert value(text, "ecoflow_policy_evaluation_duration_seconds_count") >= 3
    assert value(text, "ecoflow_policy_last_evaluation_timestamp_seconds") > time.time() - 60
    assert value(text, "ecoflow_policy_decisions_total", kind="shutdown") == 0
    assert value(text, "ecoflow_policy_commands", status="expired") == 0
    assert value(text, "ecoflow_agent_online", agent=AGENT) == 0
    assert value(text, "ecoflow_policy_agents_online") == 0
    assert value(text, "ecoflow_policy_agents") == 1

    pub = publisher(mqtt_broker.host, mqtt_broker.port, "agent-status-publisher")
    pub.publish(f"power-manager/{AGENT}/status", json.dumps({"state": "online"}), qos=1,
                retain=True).wait_for_publish(10)
    pub.disconnect()
    def agent_online():
        t = scrape(port)
        return t if value(t, "ecoflow_policy_agents_online") == 1 else None

    text = wait_until(agent_online, what="the agent online", timeout=30)
    assert value(text, "ecoflow_agent_online", agent=AGENT) == 1


def test_policy_decisions_and_commands_are_counted(db):
    """The worker's hooks: a decision counted by kind, commands by their status."""
    import psycopg

    from policy import topology
    from policy.metrics import PolicyMetrics
    from policy.settings import PolicySettings
    from policy.worker import Worker

    settings = PolicySettings(DEVICE_TO_AGENTS_JSON=json.dumps({SILENT: [AGENT]}))
    seed_stations(db)
    topology.sync(db, settings)
    metrics = PolicyMetrics()
    with psycopg.connect(db.info.dsn, autocommit=True) as conn:
        worker = Worker(conn, settings, metrics=metrics)
        worker.step()
        worker.fire_test(AGENT)
        metrics.read_database(conn)
    reg = metrics.registry
    assert reg.get_sample_value("ecoflow_policy_decisions_total", {"kind": "test"}) == 1
    assert reg.get_sample_value("ecoflow_policy_commands", {"status": "pending"}) == 1
    assert reg.get_sample_value("ecoflow_policy_evaluations_total") == 1


def test_policy_metrics_port_taken_is_not_fatal(caplog):
    import socket

    from policy.metrics import PolicyMetrics

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert PolicyMetrics().serve(s.getsockname()[1]) is False
    assert "policy metrics not served" in caplog.text
    assert PolicyMetrics().serve(0) is False


# -- the shipped Prometheus files -----------------------------------------------------------
def test_shipped_config_and_rules_pass_promtool(tmp_path):
    result = promtool("check", "config", "prometheus.yml", cwd=SHIPPED_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "rules", "rules.yml", cwd=SHIPPED_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    # The adapted copy the server tests run is still a valid config.
    adapted = tmp_path / "prometheus.yml"
    adapted.write_text(yaml.safe_dump(adapted_config({"ecoflow-collector": ["127.0.0.1:1"]})))
    result = promtool("check", "config", str(adapted))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass():
    result = promtool("test", "rules", "rules.test.yml", cwd=SHIPPED_DIR)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_the_issue_asks_for_is_shipped_and_unit_tested():
    rules = yaml.safe_load((SHIPPED_DIR / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"EcoFlowGridLost", "EcoFlowSocLow", "EcoFlowStationOffline", "EcoFlowAgentOffline",
            "EcoFlowDeadLettersRising", "EcoFlowRowsRejected",
            "EcoFlowPolicyNotEvaluating"} <= alerts
    tests = yaml.safe_load((SHIPPED_DIR / "rules.test.yml").read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])
              if t.get("exp_alerts")}
    assert alerts <= tested, f"alerts never seen firing in rules.test.yml: {alerts - tested}"


# -- a real Prometheus server scraping both processes ---------------------------------------
def test_prometheus_scrapes_the_collector_and_the_policy_worker(db, collector_proc,
                                                                policy_proc):
    find("prometheus")
    seed_stations(db)
    _c, collector_port = collector_proc()
    _p, policy_port = policy_proc()
    server = PrometheusServer(adapted_config({
        "ecoflow-collector": [f"127.0.0.1:{collector_port}"],
        "ecoflow-policy": [f"127.0.0.1:{policy_port}"]}))
    started = time.monotonic()
    try:
        server.start()
        def both_up():
            t = server.api("targets")["activeTargets"]
            return t if len(t) == 2 and all(x["health"] == "up" for x in t) else None

        targets = wait_until(both_up, what="both targets up", timeout=30)
        assert {t["labels"]["job"] for t in targets} == {"ecoflow-collector", "ecoflow-policy"}
        offline = server.wait_for(f'ecoflow_online{{device="{SILENT}"}} == 0')
        assert offline and offline[0]["metric"]["job"] == "ecoflow-collector"
        assert server.wait_for("ecoflow_policy_evaluations_total > 0")
        # The alert rules load and evaluate against the live series: the silent station's
        # alert is on its way (pending for its `for`), the renamed-metric record exists.
        pending = wait_until(lambda: [a for a in server.api("alerts")["alerts"]
                                      if a["labels"]["alertname"] == "EcoFlowStationOffline"
                                      and a["labels"].get("device") == SILENT],
                             what="EcoFlowStationOffline pending", timeout=30)
        assert pending[0]["labels"]["name"] == "Study"
        groups = server.api("rules")["groups"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
        assert server.wait_for(f'ecoflow_watts_out{{device="{SILENT}"}}')
    except BaseException:
        print(server.log())
        raise
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    print(f"prometheus ready in {server.startup_seconds:.1f} s, test body {elapsed:.1f} s")
