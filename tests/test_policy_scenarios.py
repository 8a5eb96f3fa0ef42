"""Shutdown policy scenarios, NUT dummy-ups style: timestamped readings in a real TimescaleDB,
the worker stepped along a controlled clock, commands observed on a real Mosquitto."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import paho.mqtt.client as mqtt
import psycopg
import pytest

from policy import topology
from policy.commands import sign
from policy.mqttlink import MqttLink
from policy.notify import Notifier
from policy.settings import PolicySettings
from policy.worker import Worker, serve

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
SN = "R331ZEB4ZEA0012345"
SN2 = "R331ZEB4ZEA0067890"
KEY = "test-signing-key"
STEP = 5  # seconds between evaluations, as the worker runs in production
# For scenarios that run far past a command's TTL without an agent answering: a real agent
# acks, and the re-issue of an expired shutdown is proven on its own (test_policy_field.py).
LONG_TTL = 3600


def at(sec: float) -> datetime:
    return T0 + timedelta(seconds=sec)


def insert(db, sn: str, rows) -> None:
    """rows: (second, soc_min, grid_connected[, remain_time_min])."""
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent,"
            " remain_time_min, grid_connected, source, raw_data)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'simulator', '{}')",
            [(at(r[0]), sn, r[1], r[1], r[3] if len(r) > 3 else None, r[2]) for r in rows],
        )


def series(start: int, end: int, every: int, soc, grid, remain=None):
    """Readings from start to end (inclusive); soc and remain may be functions of the second."""
    return [
        (t, soc(t) if callable(soc) else soc, grid(t) if callable(grid) else grid,
         remain(t) if callable(remain) else remain)
        for t in range(start, end + 1, every)
    ]


class Listener:
    """Plays the agents' side of the broker: records every command and can ack or announce."""

    def __init__(self, broker):
        self.messages: list[dict] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"agents-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.client.on_connect = lambda c, *a: (c.subscribe("power-manager/+/cmd", qos=1),
                                                ready.set())
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert ready.wait(5)
        time.sleep(0.1)  # let the subscription settle

    def _on_message(self, client, userdata, msg):
        expiry = getattr(msg.properties, "MessageExpiryInterval", None)
        with self.lock:
            self.messages.append({"topic": msg.topic, "retain": msg.retain, "expiry": expiry,
                                  "qos": msg.qos, "payload": json.loads(msg.payload)})

    def commands(self, agent: str | None = None, wait_for: int = 0, timeout: float = 2.0):
        deadline = time.monotonic() + (timeout if wait_for else 0.3)
        while True:
            with self.lock:
                got = [m for m in self.messages
                       if agent is None or m["topic"] == f"power-manager/{agent}/cmd"]
            if (wait_for and len(got) >= wait_for) or time.monotonic() >= deadline:
                return got
            time.sleep(0.02)

    def ack(self, agent: str, cmd_id: str, status: str, detail: str = "") -> None:
        body = {"id": cmd_id, "agent": agent, "status": status, "host": f"{agent}.lan",
                "ts": int(T0.timestamp()), "detail": detail}
        self.client.publish(f"power-manager/{agent}/ack", json.dumps(body), qos=1).wait_for_publish(2)

    def status(self, agent: str, state: str) -> None:
        body = {"state": state, "agent": agent, "version": "1.0.0", "platform": "linux"}
        self.client.publish(f"power-manager/{agent}/status", json.dumps(body), qos=1,
                            retain=True).wait_for_publish(2)

    def close(self):
        self.client.disconnect()
        # Joining paho's network thread takes up to a second; nothing waits for it.
        threading.Thread(target=self.client.loop_stop, daemon=True).start()


class Policy:
    """The worker under test plus its clock; `run_until` evaluates every STEP seconds."""

    def __init__(self, db, broker, mapping: dict, **overrides):
        self.db, self.broker = db, broker
        values = dict(soc_min=15, debounce_sec=60, cooldown_sec=300, confirm_sec=30,
                      shutdown_delay_sec=120, command_ttl_sec=300, resend_sec=20,
                      signing_key=KEY, mqtt_host=broker.host, mqtt_port=broker.port,
                      device_to_agents_json=json.dumps(mapping))
        values.update(overrides)
        self.settings = PolicySettings(**values)
        topology.sync(db, self.settings)
        self.t = 0
        self.start()

    def start(self):
        self.link = MqttLink.from_settings(self.settings, client_id=f"policy-{uuid.uuid4().hex[:8]}")
        self.link.start()
        self.worker = Worker(self.db, self.settings, self.link)

    def restart(self):
        """Throw the worker and its connection away, as a crash would."""
        self.link.stop()
        self.start()

    def run_until(self, sec: int) -> None:
        while self.t <= sec:
            self.worker.step(at(self.t))
            self.t += STEP

    def wait_for_ack(self, cmd_id, timeout: float = 5.0) -> None:
        """Step the worker (at the current time) until it has stored an ack for `cmd_id`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.worker.handle_incoming(at(self.t))
            if self.db.execute("SELECT acked_at IS NOT NULL FROM commands WHERE id = %s",
                               (cmd_id,)).fetchone()[0]:
                return
            time.sleep(0.02)
        raise AssertionError(f"no ack for {cmd_id} within {timeout} s")

    def first_command_time(self, action: str = "shutdown"):
        row = self.db.execute("SELECT min(issued_at) FROM commands WHERE action = %s",
                              (action,)).fetchone()
        return row[0]

    def events(self, kind: str | None = None) -> list[tuple]:
        return self.db.execute(
            "SELECT kind, trigger, agent_id, device_sn, message, details FROM policy_events"
            " WHERE %(kind)s::text IS NULL OR kind = %(kind)s ORDER BY id", {"kind": kind}
        ).fetchall()

    def commands(self, action: str | None = None) -> list[tuple]:
        return self.db.execute(
            "SELECT id, agent_id, action, episode_id, status, send_count, cancels_id"
            " FROM commands WHERE %(a)s::text IS NULL OR action = %(a)s ORDER BY issued_at",
            {"a": action}).fetchall()

    def stop(self):
        threading.Thread(target=self.link.stop, daemon=True).start()


@pytest.fixture
def agents(mqtt_broker):
    listener = Listener(mqtt_broker)
    yield listener
    listener.close()


@pytest.fixture
def make_policy(db, mqtt_broker):
    made = []

    def make(mapping, **overrides):
        policy = Policy(db, mqtt_broker, mapping, **overrides)
        made.append(policy)
        return policy

    yield make
    for policy in made:
        policy.stop()


def agent_name(prefix: str = "nas") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def draining(start_soc: float, per_min: float, from_sec: int = 0):
    return lambda t: round(start_soc - per_min * (t - from_sec) / 60, 2)


# -- scenarios ---------------------------------------------------------------------------
def test_normal_running_on_grid_sends_nothing(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 600, 10, 90, True))
    policy = make_policy({SN: [agent]})
    policy.run_until(600)
    assert policy.commands() == []
    assert agents.commands(agent) == []
    assert [e for e in policy.events() if e[0] == "condition_started"] == []


def test_blip_shorter_than_debounce_sends_nothing(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 100, 10, 12, True)
           + series(110, 150, 10, 12, False)      # 40 s on battery, below the SoC threshold
           + series(160, 600, 10, 12, True))
    policy = make_policy({SN: [agent]})
    policy.run_until(600)
    assert policy.commands() == []
    assert agents.commands(agent) == []
    started = [e[1] for e in policy.events("condition_started")]
    cleared = [e[1] for e in policy.events("condition_cleared")]
    assert "on_battery" in started and "soc_low" in started
    assert "on_battery" in cleared and "soc_low" in cleared


def test_on_battery_above_thresholds_sends_nothing(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 60, 10, 80, True) + series(70, 900, 10, draining(80, 1, 70), False))
    policy = make_policy({SN: [agent]})
    policy.run_until(900)
    assert policy.commands() == []
    assert "on_battery" in [e[1] for e in policy.events("condition_started")]
    assert "episode" in [e[1] for e in policy.events("condition_started")]


def test_on_battery_reaching_soc_threshold_shuts_down_once_after_debounce(db, make_policy,
                                                                          agents):
    agent = agent_name()
    # On battery from t=60, 20 % dropping 2 %/min: at or below 15 % from t=210.
    insert(db, SN, series(0, 50, 10, 20, True) + series(60, 600, 10, draining(20, 2, 60), False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    policy.run_until(265)
    assert policy.commands() == [], "must wait for the whole debounce window"
    policy.run_until(600)

    (cmd_id, cmd_agent, action, episode, status, sends, _), = policy.commands()
    assert (cmd_agent, action) == (agent, "shutdown")
    assert policy.first_command_time() == at(270)  # first evaluation at 210 s + 60 s debounce
    assert episode == f"{SN}-{int(at(60).timestamp())}"

    msg = agents.commands(agent, wait_for=1)[0]
    body = msg["payload"]
    assert msg["retain"] is False and msg["qos"] == 1
    assert 0 < msg["expiry"] <= LONG_TTL
    assert body["id"] == str(cmd_id) and body["action"] == "shutdown"
    assert body["delay_sec"] == 120 and body["ttl_sec"] == LONG_TTL
    assert body["issued_at"] == int(at(270).timestamp())
    assert body["reason"] == f"soc_min 13.0 <= 15 on battery ({SN})"
    canonical = "\n".join(["ecoflow-cmd-v1", agent, body["id"], "shutdown", "120", str(LONG_TTL),
                           str(body["issued_at"]), episode, "", body["reason"]])
    assert body["sig"] == sign(canonical, KEY)

    fired = policy.events("trigger_fired")
    assert len(fired) == 1 and fired[0][1] == "soc"
    assert fired[0][5]["soc"] <= 15 and fired[0][5]["soc_thr"] == 15
    assert [e[0] for e in policy.events() if e[0].startswith("command_")][0] == "command_sent"


def test_runtime_threshold_fires_on_device_estimate(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 60, True)
           + series(60, 400, 10, 60, False, remain=lambda t: 30 - (t - 60) // 20))
    policy = make_policy({SN: [agent]}, runtime_min=20)
    policy.run_until(400)
    # remain_time_min reaches 20 at t=260; debounce 60 s.
    assert policy.first_command_time() == at(320)
    assert policy.events("trigger_fired")[0][1] == "runtime"
    assert "runtime left" in agents.commands(agent, wait_for=1)[0]["payload"]["reason"]


def test_runtime_projection_from_discharge_slope_when_device_gives_none(db, make_policy,
                                                                        agents):
    agent = agent_name()
    # 1 %/min from 40.25 %: runtime left falls below 25 min at the reading of t=980.
    insert(db, SN, series(0, 50, 10, 40, True)
           + series(60, 1200, 10, draining(40.25, 1, 60), False))
    policy = make_policy({SN: [agent]}, runtime_min=25)
    policy.run_until(1200)
    fired = policy.events("trigger_fired")
    assert fired and fired[0][1] == "runtime"
    assert abs(fired[0][5]["discharge_pct_per_min"] - 1.0) < 0.01
    assert policy.first_command_time() == at(980 + 60)


def test_station_dead_while_on_battery_shuts_down(db, make_policy, agents):
    agent = agent_name()
    # The cloud dies with the grid: three readings on battery at 70 %, then silence.
    insert(db, SN, series(0, 50, 10, 70, True) + series(60, 80, 10, 70, False))
    policy = make_policy({SN: [agent]})
    policy.run_until(600)
    assert policy.commands() == [], "stale (not yet dead) is never a trigger by itself"
    assert "stale" in [e[1] for e in policy.events("condition_started")]
    policy.run_until(700)
    # Dead means more than dead_after (600 s) since the last reading at 80 s.
    assert policy.first_command_time() == at(685)
    assert policy.events("trigger_fired")[0][1] == "dead_on_battery"
    assert agents.commands(agent, wait_for=1)


def test_station_dead_while_on_grid_only_alerts(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 60, 10, 12, True))
    policy = make_policy({SN: [agent]})
    policy.run_until(1500)
    assert policy.commands() == []
    started = [e[1] for e in policy.events("condition_started")]
    assert "stale" in started and "dead" in started


def test_low_soc_while_on_grid_never_shuts_down(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 900, 10, 5, True))
    policy = make_policy({SN: [agent]}, alert_low_soc_on_grid=True)
    policy.run_until(900)
    assert policy.commands() == []
    assert "low_soc_on_grid" in [e[1] for e in policy.events("condition_started")]


def test_flapping_grid_neither_resets_the_debounce_nor_aborts(db, make_policy, agents):
    agent = agent_name()
    # Below the threshold on battery from t=60; the grid "returns" for one 5 s reading in
    # every 30 s, never for the 30 s confirmation period.
    rows = [(t, 12, (t % 30 == 25) if t >= 60 else True) for t in range(0, 600, 5)]
    insert(db, SN, rows)
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    policy.run_until(600)
    assert policy.first_command_time() == at(120)
    assert policy.commands("abort") == []
    assert len(policy.commands("shutdown")) == 1


def test_grid_back_inside_abort_window_sends_abort(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 150, 10, 14, False)
           + series(160, 400, 10, 14, True))
    policy = make_policy({SN: [agent]})
    policy.run_until(185)
    (shutdown_id, *_), = policy.commands("shutdown")
    assert policy.first_command_time() == at(120)
    assert policy.commands("abort") == [], "power must hold for the confirmation period first"
    policy.run_until(400)
    (abort_id, _, _, episode, _, _, cancels), = policy.commands("abort")
    assert cancels == shutdown_id
    assert policy.first_command_time("abort") == at(190)  # grid back at 160 s + 30 s
    abort = [m for m in agents.commands(agent, wait_for=2) if m["payload"]["action"] == "abort"]
    assert abort[0]["payload"]["cancels"] == str(shutdown_id)
    assert abort[0]["payload"]["episode_id"] == episode
    assert policy.events("command_aborted")


def test_grid_back_after_commit_point_sends_no_abort_and_records_it(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 300, 10, 14, False)
           + series(310, 600, 10, 14, True))
    policy = make_policy({SN: [agent]})
    policy.run_until(600)
    assert policy.first_command_time() == at(120)  # commit point 120 + 120 s delay = 240 s
    assert policy.commands("abort") == []
    assert len(policy.events("power_returned_after_commit")) == 1


def test_grid_loss_again_after_abort_protects_the_host_again(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 150, 10, 14, False)
           + series(160, 250, 10, 14, True) + series(260, 500, 10, 14, False))
    policy = make_policy({SN: [agent]})
    policy.run_until(500)
    shutdowns = policy.commands("shutdown")
    assert len(shutdowns) == 2 and shutdowns[0][3] != shutdowns[1][3]
    assert len(policy.commands("abort")) == 1


def test_second_grid_loss_inside_cooldown_is_the_same_episode(db, make_policy, agents):
    agent = agent_name()
    # Shut down, grid back for 200 s (past the commit point, inside the 300 s cooldown),
    # then lost again: the same episode, so no second shutdown.
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 300, 10, 14, False)
           + series(310, 500, 10, 30, True) + series(510, 800, 10, 14, False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    policy.run_until(800)
    assert len(policy.commands("shutdown")) == 1


def test_new_episode_after_cooldown_with_soc_recovered_shuts_down_again(db, make_policy,
                                                                        agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 300, 10, 14, False)
           + series(310, 700, 10, 60, True) + series(710, 900, 10, 14, False))
    policy = make_policy({SN: [agent]})
    policy.run_until(900)
    shutdowns = policy.commands("shutdown")
    assert len(shutdowns) == 2
    assert shutdowns[1][3] == f"{SN}-{int(at(710).timestamp())}"


def test_time_on_battery_limit_fires_whatever_the_soc(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 90, True) + series(60, 400, 10, 90, False))
    policy = make_policy({SN: [agent]}, max_on_battery_sec=300)
    policy.run_until(400)
    assert policy.first_command_time() == at(360)
    assert policy.events("trigger_fired")[0][1] == "battery_time"


def test_multi_supply_host_survives_one_failed_supply_when_one_suffices(db, make_policy,
                                                                        agents, tmp_path):
    needs_one, needs_all = agent_name("one"), agent_name("all")
    config = tmp_path / "policy.yaml"
    config.write_text(f"agents:\n  {needs_one}:\n    min_supplies: 1\n")
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 600, 10, 14, False))
    insert(db, SN2, series(0, 300, 10, 80, True) + series(310, 600, 10, 12, False))
    policy = make_policy({SN: [needs_one, needs_all], SN2: [needs_one, needs_all]},
                         config_file=config)
    policy.run_until(600)
    times = dict(db.execute(
        "SELECT agent_id, issued_at FROM commands WHERE action = 'shutdown'").fetchall())
    assert times[needs_all] == at(120), "needs both supplies: one failing is enough"
    assert times[needs_one] == at(370), "needs one: only when the second fails too"
    reason = [m for m in agents.commands(needs_one, wait_for=1)][0]["payload"]["reason"]
    assert "healthy supplies 0 < 1" in reason


def test_tiers_give_each_agent_its_own_threshold(db, make_policy, agents, tmp_path):
    early, late = agent_name("pc"), agent_name("nas")
    config = tmp_path / "policy.json"
    config.write_text(json.dumps({"agents": {early: {"soc_threshold": 40, "tier": 0},
                                             late: {"soc_threshold": 15, "tier": 1}}}))
    insert(db, SN, series(0, 50, 10, 50, True) + series(60, 1200, 10, draining(50, 2, 60), False))
    policy = make_policy({SN: [early, late]}, config_file=config, command_ttl_sec=LONG_TTL)
    policy.run_until(1200)
    times = dict(db.execute(
        "SELECT agent_id, issued_at FROM commands WHERE action = 'shutdown'").fetchall())
    assert times[early] == at(360 + 60)
    assert times[late] == at(1110 + 60)


def test_restart_mid_debounce_fires_at_the_same_moment(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 20, True) + series(60, 600, 10, draining(20, 2, 60), False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    policy.run_until(240)  # SoC low since 210 s: half-way through the 60 s debounce
    policy.restart()
    policy.run_until(600)
    assert policy.first_command_time() == at(270)
    assert len(policy.commands()) == 1


def test_restart_after_sending_does_not_send_again(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 600, 10, 14, False))
    policy = make_policy({SN: [agent]})
    policy.run_until(125)
    (cmd_id, *_), = policy.commands()
    agents.ack(agent, str(cmd_id), "scheduled", "shutdown in 120 s")
    policy.wait_for_ack(cmd_id)
    policy.restart()
    time.sleep(0.2)
    policy.run_until(600)
    assert len(policy.commands()) == 1
    assert {m["payload"]["id"] for m in agents.commands(agent, wait_for=1)} == {str(cmd_id)}


def test_unacked_command_is_resent_with_the_same_id_until_it_expires(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 600, 10, 14, False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=60, resend_sec=20)
    policy.run_until(175)
    (cmd_id, _, _, _, status, sends, _), = policy.commands()
    assert status == "sent" and sends == 3
    policy.run_until(180)
    (cmd_id, _, _, _, status, sends, _), *reissued = policy.commands()
    assert status == "expired" and sends == 3  # at 120, 140 and 160 s; expired at 180 s
    msgs = agents.commands(agent, wait_for=3)
    assert [m["payload"]["id"] for m in msgs] == [str(cmd_id)] * 3
    assert [m["expiry"] for m in msgs] == [60, 40, 20]
    kinds = [e[0] for e in policy.events() if e[0].startswith("command_")]
    assert kinds == ["command_sent", "command_resent", "command_resent", "command_expired"]
    # Still due: the next evaluation re-issues it (tested in test_policy_field.py).
    policy.run_until(185)
    assert len(policy.commands()) == 2


def test_ack_stops_resending_and_duplicates_are_stored_not_acted_on(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 600, 10, 14, False))
    policy = make_policy({SN: [agent]}, resend_sec=10)
    policy.run_until(120)
    (cmd_id, *_), = policy.commands()
    agents.ack(agent, str(cmd_id), "scheduled", "shutdown in 120 s")
    agents.ack(agent, str(cmd_id), "received")  # late duplicate must not move it back
    agents.ack(agent, str(uuid.uuid4()), "rejected", "duplicate")
    time.sleep(0.3)
    policy.run_until(300)
    (_, _, _, _, status, sends, _), = policy.commands()
    assert status == "scheduled" and sends == 1
    acks = db.execute("SELECT status FROM command_acks WHERE command_id = %s ORDER BY id",
                      (cmd_id,)).fetchall()
    assert [a[0] for a in acks] == ["scheduled", "received"]
    assert len(policy.events("ack_unknown_command")) == 1
    assert len(policy.events("command_acked")) == 2


def test_rejected_command_is_recorded_and_not_resent(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 600, 10, 14, False))
    policy = make_policy({SN: [agent]}, resend_sec=10)
    policy.run_until(120)
    (cmd_id, *_), = policy.commands()
    agents.ack(agent, str(cmd_id), "rejected", "bad signature")
    time.sleep(0.3)
    policy.run_until(300)
    (_, _, _, _, status, sends, _), = policy.commands()
    assert status == "rejected" and sends == 1
    assert "bad signature" in policy.events("command_rejected")[0][4]


def test_agent_offline_during_an_episode_is_reported(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 80, True) + series(60, 300, 10, 80, False))
    policy = make_policy({SN: [agent]})
    agents.status(agent, "online")
    time.sleep(0.2)
    policy.run_until(50)
    agents.status(agent, "offline")
    time.sleep(0.2)
    policy.run_until(300)
    kinds = [e[0] for e in policy.events() if e[2] == agent]
    assert kinds[:2] == ["agent_online", "agent_offline"]
    started = [e for e in policy.events("condition_started") if e[1] == "offline_in_episode"]
    assert started and started[0][2] == agent
    assert db.execute("SELECT online FROM agent_status WHERE agent_id = %s",
                      (agent,)).fetchone()[0] is False


def test_decision_follows_its_decisive_reading_within_a_second(db, db_url, mqtt_broker, agents):
    agent = agent_name()
    settings = PolicySettings(soc_min=15, debounce_sec=0, interval_sec=30, signing_key=KEY,
                              mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port,
                              device_to_agents_json=json.dumps({SN: [agent]}))
    topology.sync(db, settings)
    db.execute("INSERT INTO ecoflow_measurements (ts, device_sn, soc_min_percent, grid_connected,"
               " source, raw_data) VALUES (now() - interval '20 s', %s, 50, false, 'simulator',"
               " '{}')", (SN,))
    link = MqttLink.from_settings(settings, client_id=f"policy-{uuid.uuid4().hex[:8]}")
    link.start()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(db_url, settings, link, None, stop))
    thread.start()
    try:
        time.sleep(1.0)  # the first evaluation has run; the next one waits 30 s or a NOTIFY
        assert agents.commands(agent) == []
        started = time.monotonic()
        with psycopg.connect(db_url, autocommit=True) as other:
            other.execute("INSERT INTO ecoflow_measurements (ts, device_sn, soc_min_percent,"
                          " grid_connected, source, raw_data)"
                          " VALUES (now(), %s, 10, false, 'simulator', '{}')", (SN,))
        assert agents.commands(agent, wait_for=1, timeout=3)
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        thread.join(35)
        link.stop()


def test_message_expiry_and_payload_expiry_agree(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 200, 10, 14, False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=90)
    policy.run_until(125)
    msg = agents.commands(agent, wait_for=1)[0]
    assert msg["expiry"] == msg["payload"]["ttl_sec"] == 90


# -- notifications (S6) ------------------------------------------------------------------
@pytest.fixture
def inbox():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"json://127.0.0.1:{server.server_port}/", received
    server.shutdown()


def wait_for(received: list, count: int, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return received


def test_power_loss_and_shutdown_are_notified_once_each(db, make_policy, agents, inbox):
    url, received = inbox
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 400, 10, 14, False))
    policy = make_policy({SN: [agent]}, notify_urls=url)
    policy.worker.notifier = Notifier.from_settings(policy.settings)
    policy.run_until(400)
    bodies = [m["message"] for m in wait_for(received, 2)]
    assert len(bodies) == 2
    assert "is on battery" in bodies[0] and f"Shutting down {agent}" in bodies[1]
    assert len(policy.events("alert_sent")) == 2


def test_offline_agent_alert_repeats_on_its_schedule_not_every_evaluation(db, make_policy,
                                                                         agents, inbox):
    url, received = inbox
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 80, True) + series(60, 400, 10, 80, False))
    policy = make_policy({SN: [agent]}, notify_urls=url, notify_on_power=False,
                         notify_repeat_sec=120)
    policy.worker.notifier = Notifier.from_settings(policy.settings)
    agents.status(agent, "offline")
    time.sleep(0.2)
    policy.run_until(400)
    offline = [m for m in wait_for(received, 3) if "offline" in m["message"]]
    # Offline seen from 60 s: alerts at 60, 180 and 300 s.
    assert len(offline) == 3


def test_notifications_toggled_off_are_not_sent(db, make_policy, agents, inbox):
    url, received = inbox
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 300, 10, 14, False))
    policy = make_policy({SN: [agent]}, notify_urls=url, notify_on_power=False,
                         notify_on_shutdown=False)
    policy.worker.notifier = Notifier.from_settings(policy.settings)
    policy.run_until(300)
    time.sleep(0.3)
    assert received == [] and policy.events("alert_sent") == []


def test_supply_state_is_published_retained_on_every_change_for_the_agents_fail_safe(
        db, make_policy, mqtt_broker):
    agent = agent_name()
    seen: list[tuple[bool, dict]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sup-{uuid.uuid4().hex[:6]}",
                      protocol=mqtt.MQTTv5)
    ready = threading.Event()
    sub.on_connect = lambda c, *a: (c.subscribe(f"power-manager/{agent}/supply", qos=1),
                                    ready.set())
    sub.on_message = lambda c, u, m: seen.append((m.retain, json.loads(m.payload)))
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    sub.loop_start()
    try:
        assert ready.wait(5)
        time.sleep(0.1)
        # Grid until 60 s, battery (high SoC: no shutdown) until 300 s, grid again after.
        insert(db, SN, series(0, 50, 10, 90, True) + series(60, 290, 10, 80, False)
               + series(300, 600, 10, 80, True))
        policy = make_policy({SN: [agent]})
        policy.run_until(600)
        deadline = time.monotonic() + 3
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        states = [body["on_battery"] for _, body in seen]
        assert states == [False, True, False], "once per change, not once per evaluation"
        assert all(body["agent"] == agent for _, body in seen)
        assert policy.commands() == []
        # A restarted worker announces the current state again (the broker may have lost it).
        policy.restart()
        policy.run_until(620)
        deadline = time.monotonic() + 3
        while len(seen) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [body["on_battery"] for _, body in seen] == [False, True, False, False]
    finally:
        sub.disconnect()
        sub.loop_stop()
    # Retained: a late subscriber (an agent starting up) gets the last state at once.
    late: list[dict] = []
    got = threading.Event()
    again = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"late-{uuid.uuid4().hex[:6]}",
                        protocol=mqtt.MQTTv5)
    again.on_connect = lambda c, *a: c.subscribe(f"power-manager/{agent}/supply", qos=1)
    again.on_message = lambda c, u, m: (late.append(json.loads(m.payload)), got.set())
    again.connect(mqtt_broker.host, mqtt_broker.port)
    again.loop_start()
    try:
        assert got.wait(5)
        assert late[0]["on_battery"] is False and late[0]["agent"] == agent
    finally:
        again.disconnect()
        again.loop_stop()
