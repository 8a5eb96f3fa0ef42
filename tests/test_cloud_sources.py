"""EcoFlow cloud sources against a local fake of EcoFlow's cloud (testbed/fakecloud.py): an HTTPS
API that checks signatures the way EcoFlow does, and a TLS Mosquitto playing its broker.

End to end for each source: fake cloud -> collector -> TimescaleDB rows. Also: error advice,
credential rotation, the persisted client id, the opt-in downlink, start-up errors, and that
no secret reaches the logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from collector.cloud.api import AppApi, EcoflowApiError, OpenApi
from collector.cloud.plan import cloud_plan
from collector.service import Collector
from collector.settings import collector_settings
from servicekit.settings import DatabaseSettings, SettingsError
from testbed.fakecloud import FakeDevice, FakeEcoflowCloud

REPO = Path(__file__).resolve().parent.parent
PAYLOADS = REPO / "tests" / "fixtures" / "payloads"

D2M = "R351ZFB4HF000001"  # Delta 2 Max: REST, open MQTT and app MQTT
OFFLINE = "R331ZEB4ZEA00099"  # Delta 2 that device/list reports offline (stale quota)


def _fixture(name: str) -> dict:
    return json.loads((PAYLOADS / name).read_text())["payload"]


def _bytes(doc) -> bytes:
    return json.dumps(doc).encode()


DP3_DOC = _fixture("deltapro3_rest_quota_all_1.json")
DP3 = "MR51ZAS4PG000274"  # Delta Pro 3 (the capture masked its serial)
PS = "HW51ZOH4SF000007"  # PowerStream EcoFlow has not opened for this account's API


def devices() -> list[FakeDevice]:
    d2m_quota = _fixture("delta2max_app_mqtt_1.json")["data"]["quotaMap"]
    open_messages = [_bytes(_fixture(f"delta2max_open_mqtt_{n}.json"))
                     for n in ("1_pdStatus", "4_bmsStatus", "5_emsStatus")]
    # No timestamp: the fake repeats this message, and rows are unique per (device, time).
    app_push = {"id": 1, "version": "1.0",
                "params": {"bms_emsStatus.f32LcdShowSoc": 55.5, "pd.wattsOutSum": 123}}
    return [
        FakeDevice(D2M, "Rack UPS", "DELTA 2 Max", quota=d2m_quota,
                   open_messages=open_messages, app_messages=[_bytes(app_push)],
                   product_type=81),
        FakeDevice(DP3, "Garage", "DELTA Pro 3", quota=DP3_DOC["quota_all"]),
        FakeDevice(OFFLINE, "Cabin", "DELTA 2", online=False,
                   quota=_fixture("delta2_app_mqtt_1.json")["data"]["quotaMap"]),
        FakeDevice(PS, "Balcony", "PowerStream",
                   quota=_fixture("powerstream_rest_quota_all_1.json"), developer_enabled=False),
    ]


@pytest.fixture
def cloud():
    with FakeEcoflowCloud(devices()) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _no_ecoflow_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("ECOFLOW_", "COLLECTOR_", "COLLECTING_")):
            monkeypatch.delenv(name)


@pytest.fixture
def no_secrets_logged(caplog):
    """Collects every log record (all levels) and fails the test if a secret shows up."""
    caplog.set_level(logging.DEBUG)
    fakes: list[FakeEcoflowCloud] = []
    yield fakes
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for fake in fakes:
        for secret in fake.secrets():
            assert secret not in text, "a secret reached the logs"


def settings_for(cloud: FakeEcoflowCloud, **kw):
    base = dict(sources="ecoflow", ecoflow_api_host=cloud.api_host,
                ecoflow_tls_ca=str(cloud.ca_file), exporter_port=0, flush_interval_sec=0.2)
    if kw.pop("developer", True):
        base.update(ecoflow_access_key=cloud.access_key, ecoflow_secret_key=cloud.secret_key)
    if kw.pop("app", False):
        base.update(ecoflow_account_user=cloud.email, ecoflow_account_password=cloud.password)
    base.update(kw)
    return collector_settings(**base)


def open_api(cloud: FakeEcoflowCloud, **kw) -> OpenApi:
    return OpenApi(kw.pop("host", cloud.api_host), kw.pop("access_key", cloud.access_key),
                   kw.pop("secret_key", cloud.secret_key), ca_file=str(cloud.ca_file), **kw)


def rows(url: str, where: str = "true", params=()) -> list[dict]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(
            f"SELECT device_sn, source, soc_percent, watts_out_sum, raw_data FROM "
            f"ecoflow_measurements WHERE {where} ORDER BY ts", params)
        names = [c.name for c in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class Running:
    """A collector in this process (so its logs land in caplog)."""

    def __init__(self, settings, db_url: str):
        self.collector = Collector(settings, DatabaseSettings(database_url=db_url))

    def __enter__(self) -> Collector:
        self.collector.start()
        return self.collector

    def __exit__(self, *exc) -> None:
        self.collector.stop()


# -- REST client ----------------------------------------------------------------------------
def test_device_list_quota_and_credentials_from_the_fake(cloud):
    api = open_api(cloud)
    listed = {d["sn"]: d for d in api.device_list()}
    assert set(listed) == {D2M, DP3, OFFLINE, PS}
    assert listed[OFFLINE]["online"] == 0 and listed[D2M]["online"] == 1
    data, raw = api.quota_all(D2M)
    assert data == cloud.devices[0].quota
    assert json.loads(raw)["code"] == "0"
    creds = api.certification()
    assert (creds.host, creds.port, creds.user) == (cloud.broker_host, cloud.broker_tls_port,
                                                    cloud.open_account)
    assert creds.password not in repr(creds)


def test_a_wrong_secret_is_8521_with_advice_about_the_secret_and_the_clock(cloud):
    with pytest.raises(EcoflowApiError) as err:
        open_api(cloud, secret_key=cloud.secret_key[:-1] + "x").device_list()
    assert err.value.code == "8521" and err.value.persistent
    assert "ECOFLOW_SECRET_KEY" in str(err.value) and "clock" in str(err.value)
    assert cloud.secret_key[:-1] not in str(err.value)


def test_a_skewed_clock_is_named_with_its_size(cloud):
    cloud.clock_offset_sec = 3600  # EcoFlow's clock an hour ahead of ours
    with pytest.raises(EcoflowApiError) as err:
        open_api(cloud).device_list()
    assert err.value.code == "8521"
    # The Date header has one-second resolution.
    skew = re.search(r"clock is (\d+) s behind EcoFlow's", err.value.advice)
    assert skew and 3595 <= int(skew.group(1)) <= 3605


@pytest.mark.parametrize("wrong", ["key", "region"])
def test_an_unknown_key_or_the_wrong_region_is_8513_with_advice_about_the_host(cloud, wrong):
    if wrong == "key":
        api = open_api(cloud, access_key="A" * len(cloud.access_key))
    else:
        cloud.region_ok = False
        api = open_api(cloud)
    with pytest.raises(EcoflowApiError) as err:
        api.device_list()
    assert err.value.code == "8513" and err.value.persistent
    assert "ECOFLOW_API_HOST" in err.value.advice and "api-a.ecoflow.com" in err.value.advice


def test_a_station_not_opened_for_the_api_points_to_the_app_login(cloud):
    with pytest.raises(EcoflowApiError) as err:
        open_api(cloud).quota_all(PS)
    assert err.value.persistent
    assert "ECOFLOW_ACCOUNT_USER" in err.value.advice


def test_an_unreachable_host_is_a_transport_error_naming_the_host():
    from testbed.ports import free_port

    api = OpenApi(f"127.0.0.1:{free_port()}", "ak", "sk", timeout=3)
    with pytest.raises(EcoflowApiError) as err:
        api.device_list()
    assert err.value.code == "network" and not err.value.persistent
    assert "127.0.0.1" in err.value.advice


def test_app_login_and_certification(cloud):
    api = AppApi(cloud.api_host, cloud.email, cloud.password, ca_file=str(cloud.ca_file))
    assert api.login() == cloud.user_id
    creds = api.certification()
    assert creds.user == cloud.app_account and creds.port == cloud.broker_tls_port
    with pytest.raises(EcoflowApiError) as err:
        AppApi(cloud.api_host, cloud.email, "wrong-password", ca_file=str(cloud.ca_file)).login()
    assert "ECOFLOW_ACCOUNT_PASSWORD" in err.value.advice


def test_downlink_is_refused_unless_control_is_allowed(cloud):
    api = open_api(cloud)
    with pytest.raises(PermissionError, match="ECOFLOW_ALLOW_CONTROL"):
        api.set_quota(D2M, {"moduleType": 3}, allow_control=False)
    assert cloud.set_quota_calls == []
    command = {"moduleType": 3, "operateType": "acOutCfg", "params": {"enabled": 0}}
    api.set_quota(D2M, command, allow_control=True)
    assert cloud.set_quota_calls == [{"sn": D2M, **command}]


def test_control_command_needs_the_opt_in(cloud):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECOFLOW_")}
    env.update(ECOFLOW_ACCESS_KEY=cloud.access_key, ECOFLOW_SECRET_KEY=cloud.secret_key,
               ECOFLOW_API_HOST=cloud.api_host, ECOFLOW_TLS_CA=str(cloud.ca_file))
    cmd = [sys.executable, "-m", "collector", "control", "--sn", D2M, "--ac-output", "off"]
    refused = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and "ECOFLOW_ALLOW_CONTROL=true" in refused.stdout
    assert cloud.set_quota_calls == []
    env["ECOFLOW_ALLOW_CONTROL"] = "true"
    sent = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert cloud.set_quota_calls == [{"sn": D2M, "moduleType": 3, "operateType": "acOutCfg",
                                      "params": {"enabled": 0}}]
    assert cloud.secret_key not in sent.stdout + sent.stderr


# -- source selection --------------------------------------------------------------------------
def test_sources_follow_the_credentials(cloud):
    assert cloud_plan(settings_for(cloud)).sources == ("open_mqtt", "rest")
    both = cloud_plan(settings_for(cloud, app=True))
    assert both.sources == ("app_mqtt", "open_mqtt", "rest")
    assert both.app_host == "api.ecoflow.com"  # the app API has its own default host
    only_app = cloud_plan(settings_for(cloud, developer=False, app=True,
                                       ecoflow_device_list=f"{D2M}, {DP3}"))
    assert only_app.sources == ("app_mqtt",) and only_app.serials == (D2M, DP3)
    assert only_app.app_host == cloud.api_host  # ECOFLOW_API_HOST, as the earlier exporters
    assert cloud_plan(settings_for(cloud, ecoflow_sources="rest")).sources == ("rest",)


@pytest.mark.parametrize("kw, names", [
    ({"developer": False}, ["ECOFLOW_ACCESS_KEY", "ECOFLOW_ACCOUNT_USER"]),
    ({"developer": False, "ecoflow_access_key": "ak"}, ["ECOFLOW_SECRET_KEY"]),
    ({"developer": False, "ecoflow_account_user": "a@b.c"}, ["ECOFLOW_ACCOUNT_PASSWORD"]),
    ({"developer": False, "app": True}, ["ECOFLOW_DEVICE_LIST"]),
    ({"ecoflow_sources": "app_mqtt"}, ["ECOFLOW_SOURCES", "ECOFLOW_ACCOUNT_USER"]),
    ({"ecoflow_sources": "rest,carrier_pigeon"}, ["ECOFLOW_SOURCES"]),
])
def test_missing_or_contradicting_credentials_stop_start_up_naming_the_variable(cloud, kw,
                                                                               names):
    with pytest.raises(SettingsError) as err:
        settings_for(cloud, **kw)
    for name in names:
        assert name in str(err.value)


def test_the_collector_process_refuses_to_start_without_credentials(db_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECOFLOW_", "COLLECTOR_"))}
    env.update(DATABASE_URL=db_url, COLLECTOR_SOURCES="ecoflow", EXPORTER_PORT="0")
    done = subprocess.run([sys.executable, "-m", "collector"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ECOFLOW_ACCESS_KEY" in done.stderr + done.stdout


# -- end to end: fake cloud -> collector -> TimescaleDB --------------------------------------
def test_rest_source_end_to_end(cloud, db_url, no_secrets_logged, caplog):
    no_secrets_logged.append(cloud)
    with Running(settings_for(cloud, ecoflow_sources="rest"), db_url):
        got = wait_for(lambda: {r["device_sn"] for r in rows(db_url)} >= {D2M, DP3})
        assert got
        time.sleep(0.5)
    stored = rows(db_url)
    assert {r["source"] for r in stored} == {"rest"}
    by_sn = {r["device_sn"]: r for r in stored}
    # Liveness comes from device/list: the offline station's stale quota is not stored.
    assert OFFLINE not in by_sn
    # The not-opened PowerStream is skipped with advice, the others still collected.
    assert PS not in by_sn
    assert "not allowed to get device info" in caplog.text and "ECOFLOW_ACCOUNT_USER" in caplog.text
    assert by_sn[D2M]["soc_percent"] == pytest.approx(10, abs=1)  # the fixture's quotaMap
    assert by_sn[DP3]["soc_percent"] == pytest.approx(44.3, abs=1)
    assert by_sn[D2M]["raw_data"]["data"] == cloud.devices[0].quota
    quota_calls = [r for r in cloud.requests if r["path"].endswith("/quota/all")]
    assert {r["query"].get("sn") for r in quota_calls} == {D2M, DP3, PS}


def test_rest_source_does_not_hammer_on_a_persistent_error(cloud, db_url, caplog):
    bad = settings_for(cloud, ecoflow_sources="rest", ecoflow_secret_key="not-the-secret")
    with Running(bad, db_url):
        wait_for(lambda: any(r["path"].endswith("/device/list") for r in cloud.requests), 10)
        time.sleep(3)
    calls = [r for r in cloud.requests if r["path"].endswith("/device/list")]
    assert len(calls) == 1, "a rejected signature must back off, not retry at once"
    assert caplog.text.count("signature is wrong") == 1
    assert "next try in" in caplog.text


def test_open_mqtt_source_end_to_end(cloud, db_url, no_secrets_logged):
    no_secrets_logged.append(cloud)
    with Running(settings_for(cloud, ecoflow_sources="open_mqtt"), db_url) as collector:
        source = collector.sources[0]
        assert wait_for(source.connected.is_set, 15)
        cloud.start_pushing(0.1)
        assert wait_for(lambda: len(rows(db_url, "device_sn = %s", (D2M,))) >= 6)
        cloud.push(D2M, "status")
        time.sleep(0.5)
    stored = rows(db_url, "device_sn = %s", (D2M,))
    assert {r["source"] for r in stored} == {"open_mqtt"}
    assert stored[-1]["soc_percent"] == pytest.approx(83, abs=1)
    # The status notice updates EcoFlow's online flag and stores no row of its own.
    assert all("status" not in (r["raw_data"].get("params") or {}) for r in stored)
    assert collector.metrics.cloud_online.labels(D2M)._value.get() == 1


def test_a_refused_subscription_is_named_and_asked_again_later_not_every_tick(db_url, caplog,
                                                                             monkeypatch):
    """A broker answers a subscription the credentials may not read with a SUBACK failure
    ("not authorized"). The cloud MQTT sources took every subscription as granted: a station
    whose topics were refused delivered nothing, with no word why, and was never asked for
    again. Now the refusal is logged once, naming the topic, with advice; the other stations
    keep delivering; and the topic is asked for again after REFUSED_RETRY_SEC, not on every
    tick (EcoFlow's broker would see a refused SUBSCRIBE every 5 s per topic)."""
    from collector.sources import ecoflow_mqtt

    monkeypatch.setattr(ecoflow_mqtt, "REFUSED_RETRY_SEC", 1.0)
    shed = "R351ZFB4HF000002"
    fleet = devices()
    fleet.append(FakeDevice(shed, "Shed", "DELTA 2 Max", quota=dict(fleet[0].quota),
                            open_messages=list(fleet[0].open_messages), readable=False))
    caplog.set_level(logging.INFO)
    with FakeEcoflowCloud(fleet) as cloud, \
            Running(settings_for(cloud, ecoflow_sources="open_mqtt"), db_url) as collector:
        source = collector.sources[0]
        source.tick_sec = 0.1
        assert wait_for(source.connected.is_set, 15)
        cloud.start_pushing(0.1)
        assert wait_for(lambda: len(rows(db_url, "device_sn = %s", (D2M,))) >= 6)
        topic = f"/open/{cloud.open_account}/{shed}/quota"
        assert wait_for(lambda: topic in source.refused)
        time.sleep(2.5)  # about 25 ticks, two or three retry periods
        refusals = source.subscriptions_refused
    assert not rows(db_url, "device_sn = %s", (shed,))
    said = [r for r in caplog.records if topic in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert said[0].levelno == logging.ERROR
    assert "refused" in said[0].getMessage() and "doctor" in said[0].getMessage()
    # Two topics per station (quota, status), asked again every second: not every 0.1 s.
    assert 4 <= refusals <= 12, refusals


def test_app_mqtt_source_keeps_stations_pushing_with_latest_quotas(cloud, db_url,
                                                                  no_secrets_logged):
    no_secrets_logged.append(cloud)
    settings = settings_for(cloud, developer=False, app=True, ecoflow_device_list=D2M)
    cloud.start_pushing(0.1)
    time.sleep(0.5)
    assert rows(db_url) == []  # devices stay quiet until someone asks for their quotas
    with Running(settings, db_url) as collector:
        assert wait_for(lambda: len(rows(db_url)) >= 5)
    stored = rows(db_url)
    assert {r["source"] for r in stored} == {"app_mqtt"}
    assert cloud.latest_quotas_requests.get(D2M, 0) >= 1
    assert collector.sources[0].requests_sent >= 1
    # The latestQuotas reply carries the full quota map; pushes carry the app's params.
    assert any(r["raw_data"].get("operateType") == "latestQuotas" for r in stored)
    assert stored[-1]["soc_percent"] == pytest.approx(55.5, abs=0.1)
    assert stored[-1]["watts_out_sum"] == 123


def test_the_collector_recovers_when_the_broker_password_is_rotated(cloud, db_url,
                                                                    no_secrets_logged):
    no_secrets_logged.append(cloud)
    with Running(settings_for(cloud, ecoflow_sources="open_mqtt"), db_url) as collector:
        source = collector.sources[0]
        assert wait_for(source.connected.is_set, 15)
        cloud.start_pushing(0.1)
        assert wait_for(lambda: len(rows(db_url)) >= 3)
        cloud.rotate_mqtt_password()
        rotated_at = time.time()
        assert wait_for(lambda: source.credential_fetches >= 2, 30)
        assert wait_for(lambda: rows(db_url, "ts > to_timestamp(%s) + interval '0.5 s'",
                                     (rotated_at,)), 30)
        assert source.connected.is_set()


def test_the_mqtt_client_id_is_kept_across_restarts(cloud, db_url):
    ids = []
    for _ in range(2):
        with Running(settings_for(cloud, ecoflow_sources="open_mqtt"), db_url) as collector:
            source = collector.sources[0]
            assert wait_for(source.connected.is_set, 15)
            ids.append(source.client._client_id.decode())
    assert ids[0] == ids[1] and ids[0].startswith("ecoflow-ups-")
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT key, value FROM collector_state").fetchall()
    assert len(stored) == 1 and stored[0][1] == ids[0]
    assert cloud.access_key not in stored[0][0]


# -- doctor --------------------------------------------------------------------------------------
def _doctor(env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECOFLOW_", "COLLECTOR_"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "collector", "doctor"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _doctor_env(cloud: FakeEcoflowCloud, **extra) -> dict:
    env = dict(ECOFLOW_ACCESS_KEY=cloud.access_key, ECOFLOW_SECRET_KEY=cloud.secret_key,
               ECOFLOW_API_HOST=cloud.api_host, ECOFLOW_TLS_CA=str(cloud.ca_file))
    env.update(extra)
    return env


def test_doctor_reports_a_working_account():
    healthy = [d for d in devices() if d.sn != PS]
    with FakeEcoflowCloud(healthy) as cloud:
        done = _doctor(_doctor_env(cloud, ECOFLOW_ACCOUNT_USER=cloud.email,
                                   ECOFLOW_ACCOUNT_PASSWORD=cloud.password,
                                   ECOFLOW_APP_API_HOST=cloud.api_host,
                                   ECOFLOW_DEVICE_LIST=f"{D2M},{DP3}"))
        out = done.stdout
        assert done.returncode == 0, out + done.stderr
        assert "3 station(s) on the account" in out
        assert f"{D2M}  DELTA 2 Max  \"Rack UPS\"  online" in out
        assert f"{OFFLINE}  DELTA 2  \"Cabin\"  OFFLINE" in out
        assert f"quota/all {D2M}: SoC 9.5 %, in 625 W, out 38 W, grid yes" in out
        assert f"quota/all {DP3}: SoC 44.3 %, in 1701 W" in out
        assert "MQTT broker accepted the login over TLS" in out
        assert f"  ok    {D2M}: SoC 9.5 %" in out  # the app latestQuotas reply, decoded
        assert "Everything works." in out
        for secret in cloud.secrets():
            assert secret not in out + done.stderr


def test_doctor_explains_a_rejected_signature(cloud):
    done = _doctor(_doctor_env(cloud, ECOFLOW_SECRET_KEY="wrong-" + cloud.secret_key[:8]))
    assert done.returncode == 1
    assert "FAIL  device/list: 8521 signature is wrong" in done.stdout
    assert "ECOFLOW_SECRET_KEY" in done.stdout and "clock" in done.stdout


def test_doctor_explains_a_wrong_region(cloud):
    cloud.region_ok = False
    done = _doctor(_doctor_env(cloud))
    assert done.returncode == 1
    assert "FAIL  device/list: 8513 accessKey is invalid" in done.stdout
    assert "ECOFLOW_API_HOST=" in done.stdout


def test_doctor_flags_a_station_not_opened_for_the_api(cloud):
    done = _doctor(_doctor_env(cloud))
    assert done.returncode == 1
    assert f"FAIL  quota/all {PS}" in done.stdout
    assert "ECOFLOW_ACCOUNT_USER" in done.stdout
    assert f"quota/all {D2M}: SoC 9.5 %, in 625 W, out 38 W, grid yes" in done.stdout


def test_doctor_names_missing_credentials():
    done = _doctor({})
    assert done.returncode == 2
    assert "ECOFLOW_ACCESS_KEY" in done.stdout and "ECOFLOW_ACCOUNT_USER" in done.stdout


def test_the_seed_spellings_of_the_app_login_are_accepted(cloud, monkeypatch):
    monkeypatch.setenv("ECOFLOW_USERNAME", cloud.email)
    monkeypatch.setenv("ECOFLOW_PASSWORD", cloud.password)
    s = settings_for(cloud, developer=False, ecoflow_device_sn=D2M)
    assert (s.ecoflow_account_user, s.ecoflow_account_password) == (cloud.email, cloud.password)
    assert cloud_plan(s).sources == ("app_mqtt",)


def test_device_sn_narrows_collection_to_the_named_station(cloud, db_url, caplog):
    settings = settings_for(cloud, ecoflow_sources="rest", ecoflow_device_sn=f"{D2M},R3310000NOPE")
    with Running(settings, db_url):
        assert wait_for(lambda: rows(db_url))
        time.sleep(0.5)
    assert {r["device_sn"] for r in rows(db_url)} == {D2M}
    asked = {r["query"].get("sn") for r in cloud.requests if r["path"].endswith("/quota/all")}
    assert asked == {D2M}
    assert "R3310000NOPE (ECOFLOW_DEVICE_SN / ECOFLOW_DEVICE_LIST) is not on this account" \
        in caplog.text
