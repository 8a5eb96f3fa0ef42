"""Issue 17: cloud telemetry that never freezes silently, end to end against the fake cloud
(testbed/fakecloud.py) into the real database.

Each failure mode shows the stale state, the failover or re-certification, and no lost
readings once data flows again: pushes that stop while the connection stays up (REST fails
over), app pushes that stop (latestQuotas asked again), a password rotation (fresh credentials,
same client id, what was published meanwhile still arrives), a CONNACK that never comes, and a
reconnect storm that sends no downlink.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time

import psycopg
import pytest

from collector.sources.liveness import FRESH, QUIET, STALE, Liveness, classify
from testbed.fakecloud import FakeEcoflowCloud
from tests.test_cloud_sources import (
    D2M,
    DP3,
    Running,
    _fixture,
    devices,
    rows,
    settings_for,
    wait_for,
)

FAST = dict(ecoflow_push_period_sec=0.5, liveness_quiet_periods=2, liveness_stale_periods=5,
            collecting_interval=5, ecoflow_connack_timeout_sec=3)
PD_STATUS = _fixture("delta2max_open_mqtt_1_pdStatus.json")
_ids = itertools.count(900_000)


def marked_push(cloud: FakeEcoflowCloud, sn: str = D2M) -> int:
    """Push one open-MQTT message with a unique id; returns the id."""
    doc = copy.deepcopy(PD_STATUS)
    doc["id"] = next(_ids)
    cloud.push(sn, "open", json.dumps(doc).encode())
    return doc["id"]


def flowing(cloud: FakeEcoflowCloud, db_url: str, timeout: float = 20.0) -> None:
    """Push until a push is stored. `connected` is set on CONNACK, before the broker has taken
    the SUBSCRIBE; a push sent in between reaches nobody (a real station just pushes again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sent = marked_push(cloud)
        if wait_for(lambda sent=sent: sent in stored_ids(db_url), 0.5):
            return
    raise AssertionError(f"no push stored within {timeout:.0f} s of the connection")


def stored_ids(db_url: str, source: str = "open_mqtt") -> set[int]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        got = conn.execute("SELECT raw_data->>'id' FROM ecoflow_measurements "
                           "WHERE source = %s AND raw_data ? 'id'", (source,)).fetchall()
    return {int(r[0]) for r in got if r[0] and r[0].isdigit()}


def quota_calls(cloud: FakeEcoflowCloud, sn: str) -> int:
    return sum(1 for r in list(cloud.requests)
               if r["path"].endswith("/quota/all") and r["query"].get("sn") == sn)


@pytest.fixture(autouse=True)
def _no_ecoflow_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(("ECOFLOW_", "COLLECTOR_", "COLLECTING_", "LIVENESS_")):
            monkeypatch.delenv(name)


# -- the states ----------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_connected_source_that_delivers_nothing_goes_quiet_then_stale():
    clock = Clock()
    live = Liveness(quiet_periods=2, stale_periods=5, clock=clock)
    live.expect("open_mqtt", 10, [D2M])
    live.set_connected("open_mqtt", True)
    assert live.state("open_mqtt", D2M) == QUIET  # nothing delivered yet is not fresh
    live.seen("open_mqtt", D2M)
    assert live.state("open_mqtt", D2M) == FRESH
    clock.now += 21
    assert live.state("open_mqtt", D2M) == QUIET
    clock.now += 30
    entry = live.entry("open_mqtt", D2M)
    assert entry.state == STALE and entry.connected is True  # connected, yet stale
    assert "stale" in entry.describe() and "connected" in entry.describe()


def test_a_disconnected_source_is_quiet_at_once_and_stale_after_the_quiet_limit():
    clock = Clock()
    live = Liveness(quiet_periods=2, stale_periods=5, clock=clock)
    live.expect("app_mqtt", 10, [D2M])
    live.set_connected("app_mqtt", True)
    live.seen("app_mqtt", D2M)
    live.set_connected("app_mqtt", False)
    assert live.state("app_mqtt", D2M) == QUIET
    clock.now += 21
    assert live.state("app_mqtt", D2M) == STALE
    assert classify(49, 10, 2, 5) == QUIET and classify(51, 10, 2, 5) == STALE


def test_a_failover_source_is_aged_from_when_it_began_and_forgotten_when_it_ends():
    clock = Clock()
    live = Liveness(clock=clock)
    live.expect("rest", 30)
    clock.now += 3600
    live.begin("rest", D2M)
    assert live.state("rest", D2M) == QUIET  # not stale because of the hour before
    live.seen("rest", D2M)
    assert live.state("rest", D2M) == FRESH
    live.forget("rest", D2M)
    assert [e for e in live.entries() if e.source == "rest"] == []


# -- end to end ----------------------------------------------------------------------------
def scrape(collector) -> str:
    from prometheus_client import generate_latest

    return generate_latest(collector.metrics.registry).decode()


def test_pushes_that_stop_while_connected_go_stale_and_rest_fails_over_until_they_return(
        db_url):
    with FakeEcoflowCloud(devices()) as cloud, \
            Running(settings_for(cloud, **FAST), db_url) as collector:
        by_name = {s.name: s for s in collector.sources}
        mqtt_source, rest = by_name["open_mqtt"], by_name["rest"]
        assert wait_for(mqtt_source.connected.is_set, 15)
        cloud.start_pushing(0.1)
        assert wait_for(lambda: collector.liveness.state("open_mqtt", D2M) == FRESH)
        # Fresh pushes: REST stands by for D2M (after at most the one start-up poll).
        before = quota_calls(cloud, D2M)
        time.sleep(6)
        assert quota_calls(cloud, D2M) <= before + 1

        cloud.silence(D2M)
        silenced = time.time()
        assert wait_for(lambda: collector.liveness.state("open_mqtt", D2M) == STALE, 15)
        assert mqtt_source.connected.is_set(), "stale although the connection stays up"
        assert 'source="open_mqtt",state="stale"} 1.0' in scrape(collector).replace(
            f'device="{D2M}",', "")
        # REST fails over: quota/all rows for D2M after the silence.
        assert wait_for(lambda: rows(db_url, "device_sn = %s AND source = 'rest' AND "
                                     "received_at > to_timestamp(%s)", (D2M, silenced)), 20)
        assert rest.failover_polls >= 1

        cloud.resume(D2M)
        cloud.stop_pushing()
        sent = {marked_push(cloud) for _ in range(5)}
        assert wait_for(lambda: sent <= stored_ids(db_url), 20), "readings lost after resume"
        cloud.start_pushing(0.1)
        assert wait_for(lambda: collector.liveness.state("open_mqtt", D2M) == FRESH, 15)
        time.sleep(1)
        settled = quota_calls(cloud, D2M)
        time.sleep(6)  # more than COLLECTING_INTERVAL
        assert quota_calls(cloud, D2M) == settled, "REST must stand by once pushes are back"
        assert [e for e in collector.liveness.entries()
                if e.source == "rest" and e.device_sn == D2M] == []
    # DP3 never pushes: REST kept it collected all along.
    assert rows(db_url, "device_sn = %s AND source = 'rest'", (DP3,))


def test_app_pushes_that_stop_are_asked_for_again_with_latest_quotas(db_url):
    with FakeEcoflowCloud(devices(), keepalive_window_sec=2) as cloud:
        settings = settings_for(cloud, developer=False, app=True, ecoflow_device_list=D2M,
                                ecoflow_latest_quotas_sec=3600, **FAST)
        cloud.start_pushing(0.1)
        with Running(settings, db_url) as collector:
            source = collector.sources[0]
            assert wait_for(lambda: cloud.latest_quotas_requests.get(D2M, 0) >= 1, 15)
            # The window closes after 2 s; the periodic request is an hour away, so only the
            # quiet rule can keep the station pushing.
            assert wait_for(lambda: cloud.latest_quotas_requests.get(D2M, 0) >= 3, 20)
            assert source.quiet_requests >= 2
            asked_at = time.time()
            assert wait_for(lambda: rows(db_url, "source = 'app_mqtt' AND received_at > "
                                         "to_timestamp(%s)", (asked_at,)), 10)
    assert cloud.downlinks() == []


def test_a_password_rotation_recertifies_under_the_same_client_id_without_losing_readings(
        db_url, caplog):
    caplog.set_level(logging.INFO)
    with FakeEcoflowCloud(devices()) as cloud, \
            Running(settings_for(cloud, ecoflow_sources="open_mqtt", **FAST), db_url) as c:
        source = c.sources[0]
        assert wait_for(source.connected.is_set, 15)
        flowing(cloud, db_url)
        first = {marked_push(cloud) for _ in range(3)}
        assert wait_for(lambda: first <= stored_ids(db_url), 15)
        client_id = source.client_id_used
        cloud.rotate_mqtt_password()
        # Published while the collector is refused: kept by its persistent session.
        meanwhile = {marked_push(cloud) for _ in range(5)}
        assert wait_for(lambda: source.credential_fetches >= 2, 30)
        assert wait_for(source.connected.is_set, 30)
        assert wait_for(lambda: meanwhile <= stored_ids(db_url), 20), "readings lost"
        after = {marked_push(cloud) for _ in range(3)}
        assert wait_for(lambda: after <= stored_ids(db_url), 15)
        assert source.client_id_used == client_id
        assert source.client._client_id.decode() == client_id
        assert source.incidents == 1
    incident = [r.getMessage() for r in caplog.records
                if "fetching fresh credentials" in r.getMessage()]
    assert len(incident) == 1, "one log line per incident"
    assert "Not authorized" in incident[0] and "client ids" in incident[0]  # doctor's advice
    assert "connected again" in caplog.text


def test_a_connack_that_never_comes_is_timed_out_and_recertified(db_url, caplog):
    caplog.set_level(logging.INFO)
    with FakeEcoflowCloud(devices()) as cloud:
        cloud.connack_never_comes = True
        with Running(settings_for(cloud, ecoflow_sources="open_mqtt", **FAST), db_url) as c:
            source = c.sources[0]
            assert wait_for(lambda: source.credential_fetches >= 3, 40)
            assert not source.connected.is_set()
            assert cloud._silent.connects >= 2  # the CONNECT was sent, and never answered
            assert c.liveness.state("open_mqtt", D2M) == STALE
            cloud.connack_never_comes = False
            assert wait_for(source.connected.is_set, 30)
            flowing(cloud, db_url)
            sent = {marked_push(cloud) for _ in range(3)}
            assert wait_for(lambda: sent <= stored_ids(db_url), 15)
            assert wait_for(lambda: c.liveness.state("open_mqtt", D2M) == FRESH, 10)
            assert source.incidents == 1
    incident = [r.getMessage() for r in caplog.records
                if "fetching fresh credentials" in r.getMessage()]
    assert len(incident) == 1 and "no CONNACK" in incident[0]
    assert "firewall" in incident[0]  # doctor's advice for a broker that does not answer


def test_a_reconnect_storm_sends_no_downlink(db_url):
    """Control allowed, every source running, the broker rotated, restarted and silent in
    turn: the collector sends nothing towards a device (latestQuotas is a get)."""
    with FakeEcoflowCloud(devices()) as cloud:
        settings = settings_for(cloud, app=True, ecoflow_device_list=f"{D2M},{DP3}",
                                ecoflow_app_api_host=cloud.api_host,
                                ecoflow_allow_control=True, **FAST)
        cloud.start_pushing(0.1)
        with Running(settings, db_url) as collector:
            sources = [s for s in collector.sources if hasattr(s, "connected")]
            assert wait_for(lambda: all(s.connected.is_set() for s in sources), 20)
            for round_ in range(3):
                cloud.rotate_mqtt_password()
                if round_ == 1:
                    cloud.connack_never_comes = True
                    time.sleep(4)
                    cloud.connack_never_comes = False
                cloud.silence()
                time.sleep(1)
                cloud.resume()
                assert wait_for(lambda: all(s.connected.is_set() for s in sources), 40)
            sent = {marked_push(cloud) for _ in range(3)}
            assert wait_for(lambda: sent <= stored_ids(db_url), 20)
            assert all(s.incidents >= 1 for s in sources)
    assert cloud.downlinks() == []
    assert cloud.mqtt_downlinks == [] and cloud.set_quota_calls == []
    assert cloud.latest_quotas_requests.get(D2M, 0) >= 1  # gets did go out


# -- status and doctor ---------------------------------------------------------------------------
def _store(db_url: str, sn: str, source: str, seconds_ago: float) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO ecoflow_measurements (ts, device_sn, source, raw_data, "
                     "received_at) VALUES (now() - make_interval(secs => %s), %s, %s, '{}', "
                     "now() - make_interval(secs => %s))", (seconds_ago, sn, source, seconds_ago))


def test_status_and_doctor_show_each_sources_state_from_the_database(db_url, monkeypatch):
    import os
    import subprocess
    import sys

    from collector.cloud.doctor import Report, source_liveness
    from collector.settings import collector_settings
    from tests.test_cloud_sources import REPO

    _store(db_url, D2M, "open_mqtt", 900)  # pushes stopped 15 min ago
    _store(db_url, D2M, "rest", 10)  # REST failover keeps it fresh
    _store(db_url, DP3, "app_mqtt", 100)  # quiet at a 30 s cadence
    _store(db_url, "R331ZEB4ZEA00099", "bridge", 3600)  # stale everywhere
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECOFLOW_", "COLLECTOR_"))}
    env.update(DATABASE_URL=db_url)
    done = subprocess.run([sys.executable, "-m", "collector", "status"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert f"{D2M}   open_mqtt  stale  newest 15.0 min ago (expected every 30 s)" in out
    assert f"{D2M}   rest       fresh" in out
    assert f"{D2M}   fresh  (best source rest" in out
    assert f"{DP3}   quiet  (best source app_mqtt" in out
    assert "R331ZEB4ZEA00099   stale" in out

    report = Report()
    source_liveness(report, collector_settings(sources="bridge"), db_url)
    text = report.text()
    assert f"ok    {D2M}: fresh from rest" in text
    assert "FAIL  R331ZEB4ZEA00099: stale" in text and len(report.problems) == 1
    assert f"open_mqtt {D2M}: stale, newest reading 90" in text


# -- in the database, for the collector-health dashboard -----------------------------------------
def liveness_rows(db_url: str) -> dict[tuple[str, str], dict]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        cur = conn.execute("SELECT * FROM source_liveness")
        names = [c.name for c in cur.description]
        return {(r[0], r[1]): dict(zip(names, r)) for r in cur.fetchall()}


def liveness_changes(db_url: str, sn: str, source: str) -> list[str]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT state FROM source_liveness_changes WHERE device_sn = %s AND source = %s "
            "ORDER BY ts, state", (sn, source)).fetchall()]


def test_the_recorder_writes_changes_at_once_and_refreshes_every_row(db_url):
    from collector.sources.liveness import LivenessRecorder

    clock = Clock()
    live = Liveness(quiet_periods=2, stale_periods=5, clock=clock)
    live.expect("open_mqtt", 10, [D2M, DP3])
    live.set_connected("open_mqtt", True)
    live.seen("open_mqtt", D2M)
    recorder = LivenessRecorder(live, db_url, collector="test", refresh_sec=3600)
    assert recorder.record() == 2  # the first check writes every row
    got = liveness_rows(db_url)
    assert got[(D2M, "open_mqtt")]["state"] == FRESH
    assert got[(DP3, "open_mqtt")]["state"] == QUIET  # nothing delivered yet
    assert got[(DP3, "open_mqtt")]["last_reading_received_at"] is None
    row = got[(D2M, "open_mqtt")]
    assert (row["expected_period_sec"], row["quiet_after_sec"], row["stale_after_sec"],
            row["connected"], row["refresh_sec"]) == (10, 20, 50, True, 3600)
    assert recorder.record() == 0  # nothing changed, no refresh due: nothing written

    clock.now += 51  # D2M: nothing for more than 5 periods, while connected
    live.seen("open_mqtt", DP3)
    assert recorder.record() == 2
    got = liveness_rows(db_url)
    assert got[(D2M, "open_mqtt")]["state"] == STALE
    assert got[(D2M, "open_mqtt")]["age_sec"] == pytest.approx(51)
    assert got[(D2M, "open_mqtt")]["connected"] is True
    assert got[(DP3, "open_mqtt")]["state"] == FRESH
    changed_at = got[(D2M, "open_mqtt")]["changed_at"]
    assert recorder.record(force=True) == 2  # a refresh rewrites every row...
    again = liveness_rows(db_url)[(D2M, "open_mqtt")]
    assert again["changed_at"] == changed_at  # ...but keeps when the state changed
    assert again["updated_at"] > got[(D2M, "open_mqtt")]["updated_at"]
    assert liveness_changes(db_url, D2M, "open_mqtt") == [FRESH, STALE]

    live.begin("rest", D2M)  # a failover, then its end: the row goes at the next refresh
    assert recorder.record() == 1 and (D2M, "rest") in liveness_rows(db_url)
    live.forget("rest", D2M)
    recorder.record(force=True)
    assert (D2M, "rest") not in liveness_rows(db_url)
    assert liveness_changes(db_url, D2M, "rest") == [QUIET, "gone"]


def test_the_recorder_survives_a_database_that_does_not_answer(db_url, caplog):
    from collector.sources.liveness import LivenessRecorder

    live = Liveness()
    live.expect("nut", 5, ["NUT1"])
    recorder = LivenessRecorder(live, "postgresql://nobody@127.0.0.1:1/none", refresh_sec=0.1)
    assert recorder.record() == 0
    assert recorder.record() == 0
    assert len([r for r in caplog.records if "liveness not written" in r.getMessage()]) == 1
    recorder.db_url = db_url
    time.sleep(0.2)
    assert recorder.record() == 1
    assert liveness_rows(db_url)[("NUT1", "nut")]["state"] == QUIET
    recorder.stop()


def test_a_silenced_cloud_source_is_written_stale_for_the_dashboard(db_url):
    """End to end: pushes stop while the connection stays up, and the collector writes
    'stale' into source_liveness (what the collector-health dashboard shows), then fresh
    again once they resume."""
    with FakeEcoflowCloud(devices()) as cloud, \
            Running(settings_for(cloud, ecoflow_sources="open_mqtt", **FAST),
                    db_url) as collector:
        source = collector.sources[0]
        assert wait_for(source.connected.is_set, 15)
        cloud.start_pushing(0.1)

        def written(state):
            row = liveness_rows(db_url).get((D2M, "open_mqtt"))
            return row if row and row["state"] == state else None

        assert wait_for(lambda: written(FRESH), 15)
        cloud.silence(D2M)
        row = wait_for(lambda: written(STALE), 15)
        assert row, liveness_rows(db_url)
        assert row["connected"] is True  # stale although connected
        assert row["age_sec"] > 5 * 0.5 and row["expected_period_sec"] == 0.5
        assert row["collector"] == collector.settings.client_id
        cloud.resume(D2M)
        assert wait_for(lambda: written(FRESH), 15)
    changes = liveness_changes(db_url, D2M, "open_mqtt")
    assert STALE in changes and changes[-1] == FRESH
