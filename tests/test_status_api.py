"""The status API against the real database over real HTTP, served as the read-only role."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from servicekit.settings import SettingsError, load
from statusapi.cli import ENV_NAMES, StatusApiSettings, build_server, parse_bind
from statusapi.server import connect
from tests.services import READONLY_PASSWORD, READONLY_USER

SIGNATURE = "sig-" + uuid.uuid4().hex


def reader_url(db_url: str) -> str:
    parts = urlsplit(db_url)
    netloc = f"{READONLY_USER}:{READONLY_PASSWORD}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


READING = """
INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent, remain_time_min,
    watts_in_sum, watts_out_sum, ac_in_watts, ac_out_watts, pv_in_watts, grid_connected,
    battery_temp_c, source, raw_data)
VALUES (now() - make_interval(secs => %(age)s), %(sn)s, %(soc)s, %(soc)s - 1, %(runtime)s,
        %(win)s, %(wout)s, %(win)s, %(wout)s, 0, %(grid)s, 25.5, 'rest',
        jsonb_build_object('password', 'in-the-raw-payload'))
"""


@pytest.fixture
def stack(db):
    db.execute("""INSERT INTO devices (device_sn, name, model, stale_after_sec, dead_after_sec)
                  VALUES ('FRESH1', 'Study', 'DELTA 2', 60, 300),
                         ('STALE1', NULL, NULL, 120, 600),
                         ('DEAD1', 'Garage', NULL, 60, 300),
                         ('NEVER1', 'Boxed', NULL, 120, 600)""")
    for sn, age, soc, grid in (("FRESH1", 5, 81.5, True), ("STALE1", 200, 40, False),
                               ("DEAD1", 1000, 12, False)):
        db.execute(READING, {"sn": sn, "age": age, "soc": soc, "runtime": 95, "win": 120,
                             "wout": 310, "grid": grid})
    db.execute("INSERT INTO agents (agent_id, name) VALUES ('nas-01', 'NAS'), ('pc-01', 'PC')")
    db.execute("INSERT INTO agent_supplies VALUES ('nas-01', 'FRESH1'), ('nas-01', 'STALE1')")
    db.execute("""INSERT INTO agent_status (agent_id, online, version, platform, host, payload)
                  VALUES ('nas-01', true, '1.2', 'linux', 'nas', '{"token": "agent-secret"}')""")
    command = uuid.uuid4()
    db.execute("""INSERT INTO commands (id, agent_id, action, episode_id, reason, ttl_sec,
                      issued_at, expires_at, payload, status)
                  VALUES (%s, 'nas-01', 'shutdown', 'ep-1', 'SoC 9 %% below 10 %%', 300,
                          now() - interval '1 minute', now() + interval '4 minutes',
                          jsonb_build_object('signature', %s::text), 'scheduled')""",
               [command, SIGNATURE])
    db.execute("""INSERT INTO command_acks (command_id, agent_id, status, host, detail, payload)
                  VALUES (%s, 'nas-01', 'scheduled', 'nas', 'in 120 s',
                          jsonb_build_object('signature', %s::text))""", [command, SIGNATURE])
    return command


@pytest.fixture
def api(db_url, stack):
    settings = StatusApiSettings(database_url=reader_url(db_url), bind="127.0.0.1:0",
                                 heartbeat_sec=0.5, poll_sec=0.5)
    server = build_server(settings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def get(server, path: str, method: str = "GET") -> tuple[int, dict, object]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(body)
    finally:
        conn.close()


def owner_latest(db) -> dict[str, tuple]:
    rows = db.execute("""SELECT device_sn, ts, soc_percent, soc_min_percent, remain_time_min,
                                grid_connected, watts_in_sum, watts_out_sum, battery_temp_c
                           FROM ecoflow_latest""").fetchall()
    return {r[0]: r[1:] for r in rows}


def parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- JSON --------------------------------------------------------------------------------------
def test_stations_equal_the_database_state(api, db):
    status, headers, body = get(api, "/api/stations")
    assert status == 200 and headers["Content-Type"] == "application/json"
    by_sn = {s["sn"]: s for s in body}
    assert sorted(by_sn) == ["DEAD1", "FRESH1", "NEVER1", "STALE1"]
    for sn, (ts, soc, soc_min, runtime, grid, w_in, w_out, temp) in owner_latest(db).items():
        s = by_sn[sn]
        assert parse_ts(s["last_seen"]) == ts
        assert (s["soc_percent"], s["soc_min_percent"], s["runtime_min"], s["grid_connected"],
                s["watts_in"], s["watts_out"], s["battery_temp_c"]) == (
                    soc, soc_min, runtime, grid, w_in, w_out, temp)
    # Liveness from each station's own stale_after_sec and dead_after_sec.
    assert {sn: s["liveness"] for sn, s in by_sn.items()} == {
        "FRESH1": "fresh", "STALE1": "stale", "DEAD1": "dead", "NEVER1": "unknown"}
    assert by_sn["FRESH1"]["name"] == "Study" and by_sn["STALE1"]["name"] == "STALE1"
    assert by_sn["FRESH1"]["stale_after_sec"] == 60
    assert by_sn["NEVER1"]["last_seen"] is None and by_sn["NEVER1"]["soc_percent"] is None
    assert 190 <= by_sn["STALE1"]["age_sec"] < 260


def test_one_station_and_an_unknown_one(api):
    status, _, body = get(api, "/api/stations/FRESH1")
    assert status == 200 and body["sn"] == "FRESH1" and body["soc_percent"] == 81.5
    assert body["grid_connected"] is True and body["liveness"] == "fresh"
    status, _, body = get(api, "/api/stations/NOPE")
    assert status == 404 and body == {"error": "no station NOPE"}
    status, _, _ = get(api, "/api/nothing-here")
    assert status == 404


def test_agents_show_status_last_command_and_last_ack(api, stack):
    status, _, body = get(api, "/api/agents")
    assert status == 200
    nas, pc = body
    assert nas["agent_id"] == "nas-01" and nas["status"] == "online"
    assert nas["supplies"] == ["FRESH1", "STALE1"]
    assert nas["version"] == "1.2" and nas["host"] == "nas"
    assert nas["last_command"]["id"] == str(stack)
    assert nas["last_command"]["action"] == "shutdown"
    assert nas["last_command"]["status"] == "scheduled"
    assert nas["last_ack"]["status"] == "scheduled" and nas["last_ack"]["detail"] == "in 120 s"
    assert pc == {**pc, "agent_id": "pc-01", "status": "unknown", "last_command": None,
                  "last_ack": None, "supplies": []}


def test_no_secret_reaches_the_output(api):
    text = "".join(json.dumps(get(api, p)[2]) for p in
                   ("/api/stations", "/api/agents", "/api/stations/FRESH1", "/api/health"))
    for secret in (SIGNATURE, "agent-secret", "in-the-raw-payload", READONLY_PASSWORD):
        assert secret not in text
    assert "payload" not in text and "raw_data" not in text


def test_health_says_the_database_answers(api):
    status, _, body = get(api, "/api/health")
    assert status == 200 and body["status"] == "ok" and body["database"] == "ok"


def test_writes_are_refused_with_405(api):
    status, headers, body = get(api, "/api/stations", method="POST")
    assert status == 405 and headers["Allow"] == "GET"


# -- server-sent events ------------------------------------------------------------------------
class EventStream:
    def __init__(self, server):
        host, port = server.server_address[:2]
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        self.conn.request("GET", "/api/events")
        self.resp = self.conn.getresponse()

    def next(self, deadline: float) -> tuple[str | None, str | None, list[str]]:
        """The next event (name, data) with the comment lines before it."""
        event = data = None
        comments = []
        while time.monotonic() < deadline:
            line = self.resp.fp.readline().decode()
            if line == "":
                raise EOFError
            line = line.rstrip("\n")
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and event:
                return event, data, comments
        raise TimeoutError("no event in time")

    def close(self):
        self.conn.close()


def test_events_start_with_the_state_and_push_a_new_reading_within_seconds(api, db):
    stream = EventStream(api)
    try:
        assert stream.resp.getheader("Content-Type") == "text/event-stream"
        deadline = time.monotonic() + 10
        event, data, _ = stream.next(deadline)
        assert event == "stations" and len(json.loads(data)) == 4
        assert stream.next(deadline)[0] == "agents"
        db.execute(READING, {"sn": "FRESH1", "age": 0, "soc": 64, "runtime": 50, "win": 0,
                             "wout": 400, "grid": False})
        inserted = time.monotonic()
        changed = []
        while True:
            event, data, _ = stream.next(inserted + 5)
            if event == "station":
                changed.append(json.loads(data))
                if changed[-1]["soc_percent"] == 64:
                    break
        assert time.monotonic() - inserted < 5
        # Only the station that changed.
        assert {s["sn"] for s in changed} == {"FRESH1"}
        assert changed[-1]["grid_connected"] is False and changed[-1]["watts_out"] == 400
    finally:
        stream.close()


def test_events_carry_heartbeat_comments(api):
    stream = EventStream(api)
    try:
        deadline = time.monotonic() + 10
        stream.next(deadline)
        stream.next(deadline)
        line = ""
        while not line.startswith(":"):
            line = stream.resp.fp.readline().decode()
            assert time.monotonic() < deadline
        assert line.strip() == ": heartbeat"
    finally:
        stream.close()


# -- the read-only role ------------------------------------------------------------------------
def test_the_servers_sessions_cannot_write(api):
    with connect(api.db_url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (READONLY_USER,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("DELETE FROM devices")
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM devices")


def test_a_role_that_may_write_is_refused(db_url):
    settings = StatusApiSettings(database_url=db_url, bind="127.0.0.1:0")
    with pytest.raises(SettingsError, match="may write.*read-only role"):
        build_server(settings)


# -- the bind address --------------------------------------------------------------------------
def test_bind_default_is_loopback(monkeypatch):
    monkeypatch.delenv("STATUS_API_BIND", raising=False)
    assert parse_bind(StatusApiSettings().bind) == ("127.0.0.1", 8088)


def test_bind_is_configurable(monkeypatch):
    monkeypatch.setenv("STATUS_API_BIND", "0.0.0.0:9000")
    assert parse_bind(load(StatusApiSettings, ENV_NAMES).bind) == ("0.0.0.0", 9000)
    assert parse_bind("[::1]:8088") == ("::1", 8088)


def test_a_bad_bind_names_the_variable(monkeypatch):
    monkeypatch.setenv("STATUS_API_BIND", "8088")
    with pytest.raises(SettingsError, match="STATUS_API_BIND: .*host:port"):
        load(StatusApiSettings, ENV_NAMES)


def test_it_listens_where_it_was_told(db_url, stack):
    server = build_server(StatusApiSettings(database_url=reader_url(db_url),
                                            bind="127.0.0.1:0"))
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_timestamps_are_utc(api):
    _, _, body = get(api, "/api/stations/FRESH1")
    assert body["last_seen"].endswith("Z")
    assert parse_ts(body["last_seen"]).tzinfo is not None
    assert abs((datetime.now(timezone.utc) - parse_ts(body["last_seen"])).total_seconds()) < 60


def test_the_command_serves_until_sigterm(db_url, stack):
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "STATUS_"))}
    env.update(DATABASE_URL=reader_url(db_url), STATUS_API_BIND=f"127.0.0.1:{port}")
    proc = subprocess.Popen([sys.executable, "-m", "statusapi.cli"], env=env,
                            cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/health")
                assert conn.getresponse().status == 200
                conn.close()
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode()
    assert f"http://127.0.0.1:{port}/api/stations" in output
    assert READONLY_PASSWORD not in output
