"""Incidents other projects' users filed, replayed as policy scenarios: the same harness as
test_policy_scenarios (timestamped readings in a real TimescaleDB, the worker stepped on a
controlled clock, commands observed on a real Mosquitto), each test named after what went
wrong elsewhere and telling the story in its docstring."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from policy.mqttlink import MqttLink
from policy.notify import Notifier
from policy.worker import Worker
from testbed.mosquitto import MosquittoServer
from tests import test_policy_scenarios as scenarios
from tests.test_policy_scenarios import (
    SN,
    SN2,
    STEP,
    Listener,
    Policy,
    agent_name,
    at,
    draining,
    insert,
    series,
    wait_for,
)

# The HTTP notification endpoint the scenarios use (a fixture: pytest finds it by this name).
inbox = scenarios.inbox

SN3 = "R331ZEB4ZEA0024680"
# Everything the stack may put on the broker. The worker writes only commands and the supply
# state; acks and status come from the agents. Nothing else, least of all a station's "set"
# topic: the UPS stack never switches a station's outputs.
STACK_TOPIC = re.compile(r"power-manager/[A-Za-z0-9_.-]+/(cmd|supply|ack|status)")


# -- helpers -------------------------------------------------------------------------------
class NamedPolicy(Policy):
    """A Policy whose MQTT client id is known, so a test can connect a second client with the
    same id and make the broker throw the worker off (MQTT session takeover)."""

    def start(self):
        self.client_id = f"policy-{uuid.uuid4().hex[:8]}"
        self.link = MqttLink.from_settings(self.settings, client_id=self.client_id)
        self.link.start()
        self.worker = Worker(self.db, self.settings, self.link)


class Downlink:
    """Everything published on the broker ('#'), recorded with the DUP flag the broker set.

    A persistent session (fixed id, clean_start off, an hour's expiry, as agents use, D4), so
    what is published while this recorder is cut off by a broker restart is queued for it.
    `dup` marks the broker re-delivering its own unacknowledged copy to this recorder after a
    reconnect; every copy the worker caused reaches it with dup unset."""

    def __init__(self, broker):
        self.messages: list[dict] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"downlink-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)  # back as soon as the broker is
        ready = threading.Event()
        self.client.on_connect = lambda c, *a: (c.subscribe("#", qos=1), ready.set())
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert ready.wait(5)
        time.sleep(0.1)

    def _on_message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = None
        with self.lock:
            self.messages.append({"topic": msg.topic, "dup": bool(msg.dup),
                                  "retain": msg.retain, "payload": payload})

    def settle(self, quiet: float = 1.0, timeout: float = 10.0) -> None:
        """Wait until nothing has arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        seen, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self.lock:
                count = len(self.messages)
            if count != seen:
                seen, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.05)

    def command_copies(self) -> Counter:
        """Copies of each command id that the worker's publishes caused (see `dup`)."""
        with self.lock:
            return Counter(m["payload"]["id"] for m in self.messages
                           if m["topic"].endswith("/cmd") and not m["dup"])

    def topics(self) -> set[str]:
        with self.lock:
            return {m["topic"] for m in self.messages}

    def close(self):
        self.client.disconnect()
        threading.Thread(target=self.client.loop_stop, daemon=True).start()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def storm(policy: Policy, cut_off: Callable[[], None], restore: Callable[[], None],
          times: int, steps_cut_off: int = 2) -> None:
    """`times` reconnects, one every `steps_cut_off` controlled steps: each cuts the worker off
    the broker, lets it evaluate (and try to send) while cut off, and waits for it to be back."""
    link = policy.link
    for _ in range(times):
        cut_off()
        wait_until(lambda: not link.connected.is_set(), 5, "the worker to notice the cut")
        policy.run_until(policy.t + STEP * (steps_cut_off - 1))
        restore()
        wait_until(link.connected.is_set, 15, "the worker to reconnect")


def takeover(broker, policy: NamedPolicy) -> tuple[Callable[[], None], Callable[[], None]]:
    """Cut the worker off as a second client with its client id does: the broker closes the
    older connection; the intruder leaves again at once, so the worker can come back."""
    intruder: list[mqtt.Client] = []

    def cut_off():
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=policy.client_id,
                             protocol=mqtt.MQTTv5)
        connected = threading.Event()
        client.on_connect = lambda *a: connected.set()
        client.connect(broker.host, broker.port)
        client.loop_start()
        assert connected.wait(5)
        intruder.append(client)

    def restore():
        client = intruder.pop()
        client.disconnect()
        client.loop_stop()

    return cut_off, restore


def assert_no_unrecorded_copies(policy: Policy, downlink: Downlink) -> None:
    """Each command id reached the agents at most as often as the worker recorded sending it,
    and the worker's events agree with its send counts."""
    sends = {str(cmd_id): send_count for cmd_id, _, _, _, _, send_count, _ in policy.commands()}
    copies = downlink.command_copies()
    assert set(copies) <= set(sends), "a command reached the agents that the worker never made"
    for cmd_id, count in copies.items():
        assert count <= sends[cmd_id], (
            f"command {cmd_id} reached the agents {count} times, recorded as sent "
            f"{sends[cmd_id]} times")
    events = Counter(str(row[0]) for row in policy.db.execute(
        "SELECT command_id FROM policy_events"
        " WHERE kind IN ('command_sent', 'command_resent')").fetchall())
    assert dict(events) == {k: v for k, v in sends.items() if v}


def assert_no_other_downlink(downlink: Downlink, agent: str) -> None:
    topics = downlink.topics()
    assert all(STACK_TOPIC.fullmatch(t) for t in topics), (
        f"unexpected downlink: {sorted(t for t in topics if not STACK_TOPIC.fullmatch(t))}")
    assert {t for t in topics if t.endswith("/cmd")} == {f"power-manager/{agent}/cmd"}


def on_battery_alerts(db) -> list[tuple]:
    return db.execute(
        "SELECT ts, message FROM policy_events WHERE kind = 'alert_sent'"
        " AND details->>'category' = 'power' AND message LIKE %s ORDER BY ts",
        ("%is on battery%",)).fetchall()


@pytest.fixture
def own_broker():
    """A broker of this test's own, which it may stop and start; persistent, so sessions and
    queued messages survive a restart as they do in the stack's compose setup."""
    with MosquittoServer(persistence=True) as server:
        yield server


# -- reconnect storms ----------------------------------------------------------------------
def run_reconnect_storm(db, broker, policy: Policy, agent: str, cut_off, restore) -> None:
    """Ten reconnects while a shutdown is due and then unacknowledged, an ack, and ten more
    reconnects: no copy beyond the recorded sends, one shutdown id, nothing after the ack."""
    downlink = Downlink(broker)
    agents = Listener(broker)
    try:
        policy.run_until(100)
        assert policy.commands() == []
        # The shutdown falls due at 120 s, inside the storm; re-sends are due every 20 s.
        storm(policy, cut_off, restore, times=10)
        policy.run_until(policy.t + STEP)
        downlink.settle()
        (shutdown_id, *_), = policy.commands("shutdown")
        assert downlink.command_copies()[str(shutdown_id)] >= 1, "never delivered at all"
        assert_no_unrecorded_copies(policy, downlink)

        wait_until(agents.client.is_connected, 15, "the agent to reconnect")
        agents.ack(agent, str(shutdown_id), "scheduled", "shutdown in 120 s")
        time.sleep(0.3)
        policy.run_until(policy.t + STEP)
        assert db.execute("SELECT acked_at FROM commands WHERE id = %s",
                          (shutdown_id,)).fetchone()[0] is not None
        downlink.settle()
        before = downlink.command_copies()

        storm(policy, cut_off, restore, times=10)
        policy.run_until(policy.t + 4 * STEP)
        downlink.settle()
        assert downlink.command_copies() == before, "copies arrived after the ack"
        assert_no_unrecorded_copies(policy, downlink)
        assert [c[0] for c in policy.commands("shutdown")] == [shutdown_id]
        assert policy.commands("abort") == []
        assert_no_other_downlink(downlink, agent)
    finally:
        agents.close()
        downlink.close()


def test_broker_restart_storm_sends_no_command_more_often_than_recorded(db, own_broker):
    """domoticz/domoticz#100 ("MQTT: fix double message after broker restart"): after every
    reconnect to a restarted broker, one more identical message went out. Here the broker is
    restarted ten times around the moment a shutdown falls due, and ten times after the agent
    acknowledged it, with the worker evaluating while it is cut off. QoS 1 re-sends by design
    (D5), so the bound is the worker's own record: no command id reaches the agents more often
    than the sends it recorded, the episode has one shutdown id, nothing arrives after the
    ack, and nothing but power-manager traffic ever appears on the broker."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 900, 10, 14, False))
    policy = Policy(db, own_broker, {SN: [agent]})
    try:
        run_reconnect_storm(db, own_broker, policy, agent, own_broker.halt, own_broker.start)
    finally:
        policy.stop()


def test_duplicate_client_id_kick_storm_sends_no_command_more_often_than_recorded(
        db, own_broker):
    """knolleary/pubsubclient#129: two clients sharing one client id kick each other off the
    broker in an endless connect/disconnect cycle. Here another client takes the worker's id
    ten times while a shutdown is due and unacknowledged, and ten times after the ack; the
    broker stays up, so every copy the agents see was handed over by the worker. Each command
    id arrives at most as often as the worker recorded sending it, there is one shutdown id,
    nothing arrives after the ack, and no other downlink appears."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 900, 10, 14, False))
    policy = NamedPolicy(db, own_broker, {SN: [agent]})
    try:
        cut_off, restore = takeover(own_broker, policy)
        run_reconnect_storm(db, own_broker, policy, agent, cut_off, restore)
    finally:
        policy.stop()


# -- grid flapping -------------------------------------------------------------------------
def test_grid_flapping_every_minute_for_an_hour_notifies_once_per_period_and_shuts_nothing(
        db, mqtt_broker, inbox):
    """jgyates/genmon#532: on a line with "crappy power during high winds", every outage of
    less than a second produced its own notifications, at its start and at its end, a burst of
    them within seconds. Here the grid drops for 10 s at the top of every minute for an hour
    at 90 % SoC: nothing is shut down, and the "on battery" notification goes out at most once
    per notify_repeat_sec (S6: alerts repeat on a schedule, not on every change)."""
    url, received = inbox
    agent = agent_name()
    repeat = 900
    insert(db, SN, [(t, 90, t < 60 or t % 60 >= 10) for t in range(0, 3600 + 60 + 1, 5)])
    policy = Policy(db, mqtt_broker, {SN: [agent]}, notify_urls=url, notify_repeat_sec=repeat)
    try:
        policy.worker.notifier = Notifier.from_settings(policy.settings)
        policy.run_until(3660)
        assert policy.commands() == []
        assert policy.events("trigger_fired") == []
        alerts = on_battery_alerts(db)
        assert alerts, "the first loss of the grid is notified"
        gaps = [b[0] - a[0] for a, b in zip(alerts, alerts[1:])]
        assert all(gap >= timedelta(seconds=repeat) for gap in gaps), (
            f"{len(alerts)} on-battery notifications in an hour, "
            f"shortest gap {min(gaps, default=None)}")
        assert len(alerts) <= 3600 // repeat + 1
        delivered = [m for m in wait_for(received, len(alerts)) if "is on battery" in m["message"]]
        assert len(delivered) == len(alerts)
    finally:
        policy.stop()


# -- a station that never says "low battery" -----------------------------------------------
def test_station_that_never_reports_low_battery_still_trips_the_soc_threshold(
        db, mqtt_broker):
    """networkupstools/nut#2619: an Eaton UPS on SNMP stayed "OB DISCHRG" down to its low
    battery warning and never set LB, so NUT's shutdown, which waits for LB, never came. A
    station has no such flag to wait for, and its own runtime estimate can be useless: here it
    reports 5999 min (its "no estimate" value) all the way down while SoC falls 2 %/min. The
    SoC threshold alone fires, after its debounce, and names itself."""
    agent = agent_name()
    # On battery from 60 s, 30 % falling 2 %/min: 15 % (the threshold) at 510 s.
    insert(db, SN, series(0, 50, 10, 30, True, remain=5999)
           + series(60, 900, 10, draining(30, 2, 60), False, remain=5999))
    policy = Policy(db, mqtt_broker, {SN: [agent]}, runtime_min=10)
    try:
        policy.run_until(600)
        (cmd_id, _, action, *_), = policy.commands()
        assert action == "shutdown"
        assert policy.first_command_time() == at(510 + 60)
        fired = policy.events("trigger_fired")
        assert [f[1] for f in fired] == ["soc"]
        assert fired[0][5]["remain_time_min"] == 5999
    finally:
        policy.stop()


# -- connected but silent ------------------------------------------------------------------
def silent_while_connected(db, sn: str, last: int, end: int) -> None:
    """After `last` the station sends nothing the collector can store, while the connection it
    shares with a second station of the same account keeps delivering that one's readings and
    the station's own undecodable messages keep arriving (ingest_errors)."""
    insert(db, SN2, series(0, end, 10, 80, True))
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO ingest_errors (ts, source, topic, device_sn, payload, error)"
            " VALUES (%s, 'simulator', %s, %s, %s, 'no measurement in payload')",
            [(at(t), f"/app/device/property/{sn}", sn, b"\x0a\x00")
             for t in range(last + 10, end + 1, 10)])


def test_source_connected_but_silent_on_battery_is_judged_dead_like_a_disconnect(
        db, mqtt_broker):
    """tolwi/hassio-ecoflow-cloud#830 (and #560): values stop updating a few minutes after the
    EcoFlow app is closed, while the integration still shows the device as connected. Here one
    station's readings stop at 80 s on battery while the cloud connection stays up (a second
    station on the account keeps reporting, the silent one's undecodable messages keep coming),
    and a third station simply disconnects at the same moment. Both are stale, never a trigger
    by themselves, then dead on battery: both hosts are shut down at the same moment, for the
    same reason, as for a plain disconnect."""
    silent, gone = agent_name("silent"), agent_name("gone")
    for sn in (SN, SN3):
        insert(db, sn, series(0, 50, 10, 70, True) + series(60, 80, 10, 70, False))
    silent_while_connected(db, SN, last=80, end=800)
    policy = Policy(db, mqtt_broker, {SN: [silent], SN3: [gone]})
    try:
        policy.run_until(600)
        assert policy.commands() == [], "stale (not yet dead) is never a trigger by itself"
        stale = {e[3] for e in policy.events("condition_started") if e[1] == "stale"}
        assert stale == {SN, SN3}
        policy.run_until(800)
        times = dict(db.execute(
            "SELECT agent_id, issued_at FROM commands WHERE action = 'shutdown'").fetchall())
        assert times == {silent: at(685), gone: at(685)}
        assert {(f[2], f[1]) for f in policy.events("trigger_fired")} == {
            (silent, "dead_on_battery"), (gone, "dead_on_battery")}
    finally:
        policy.stop()


def test_source_connected_but_silent_on_grid_only_alerts(db, mqtt_broker, inbox):
    """The same silence (tolwi/hassio-ecoflow-cloud#830) while the station was last seen on
    grid: stale, then dead, each alerted, and nothing shut down (S2)."""
    url, received = inbox
    agent = agent_name()
    insert(db, SN, series(0, 60, 10, 12, True))
    silent_while_connected(db, SN, last=60, end=1500)
    policy = Policy(db, mqtt_broker, {SN: [agent]}, notify_urls=url)
    try:
        policy.worker.notifier = Notifier.from_settings(policy.settings)
        policy.run_until(1500)
        assert policy.commands() == []
        assert policy.events("trigger_fired") == []
        started = [e[1] for e in policy.events("condition_started") if e[3] == SN]
        assert "stale" in started and "dead" in started
        messages = [m["message"] for m in wait_for(received, 2)]
        assert any(f"{SN} is stale" in m for m in messages)
        assert any(f"{SN} is dead" in m for m in messages)
        assert not any("Shutting down" in m for m in messages)
    finally:
        policy.stop()


# -- AC pulses during an outage ------------------------------------------------------------
def test_ac_pulses_shorter_than_the_confirmation_never_count_as_grid_back(db, mqtt_broker):
    """During an outage the AC input comes back for a few seconds now and then (a generator
    cranking, a failing line re-closing) and is gone again. Here AC is present for 10 s in
    every minute of the outage, never for the 30 s confirmation period: the battery-time limit
    keeps counting from the first loss, nothing is aborted once the shutdown is sent, the
    outage stays one episode, the agents are never told the grid is back (D9 supply state: a
    pulse must not disarm their fail-safe) and the on-battery condition is never cleared."""
    agent = agent_name()
    # Grid lost at 60 s; from then on AC only at :30 and :35 of each minute (10 s with it).
    insert(db, SN, [(t, 80, t < 60 or t % 60 in (30, 35)) for t in range(0, 1200, 5)])
    downlink = Downlink(mqtt_broker)
    policy = Policy(db, mqtt_broker, {SN: [agent]}, max_on_battery_sec=300)
    agents = Listener(mqtt_broker)
    try:
        policy.run_until(360)
        (shutdown_id, _, _, episode, *_), = policy.commands("shutdown")
        assert policy.first_command_time() == at(60 + 300)
        # The host takes it: its 120 s abort window runs to 480 s, through two more pulses.
        agents.ack(agent, str(shutdown_id), "scheduled", "shutdown in 120 s")
        time.sleep(0.3)
        policy.run_until(1195)
        assert [c[0] for c in policy.commands("shutdown")] == [shutdown_id]
        fired = policy.events("trigger_fired")
        assert [f[1] for f in fired] == ["battery_time"]
        assert datetime.fromisoformat(fired[0][5]["on_battery_since"]) == at(60)
        assert policy.commands("abort") == []
        assert policy.events("command_aborted") == []
        assert episode == f"{SN}-{int(at(60).timestamp())}"
        downlink.settle(quiet=0.5)
        with downlink.lock:
            told = [m["payload"]["on_battery"] for m in downlink.messages
                    if m["topic"] == f"power-manager/{agent}/supply"]
        assert told == [False, True], "a pulse told the agents the grid was back"
        assert [e[1] for e in policy.events("condition_started")].count("on_battery") == 1
        assert "on_battery" not in [e[1] for e in policy.events("condition_cleared")]
    finally:
        agents.close()
        downlink.close()
        policy.stop()


# -- readings without a grid field ---------------------------------------------------------
def test_reading_without_a_grid_field_never_cancels_a_running_countdown(db, mqtt_broker):
    """TarasKhust/ecoflow-api-mqtt#74: a station's quota payload carried only some of its
    fields, and every entity fed by an absent field stayed "Unknown". A payload without the
    AC-input field is stored with grid_connected NULL ("cannot tell"). Here, while a shutdown's
    120 s abort window runs, every reading lacks the grid field: unknown is not "grid back", so
    no abort is sent and no condition is cleared, and the shutdown stands past its commit
    point."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 120, 10, 14, False)
           + series(130, 400, 10, 14, None))
    policy = Policy(db, mqtt_broker, {SN: [agent]})
    try:
        policy.run_until(125)
        (shutdown_id, *_), = policy.commands("shutdown")
        assert policy.first_command_time() == at(120)
        policy.run_until(400)
        assert [c[0] for c in policy.commands()] == [shutdown_id]
        assert policy.events("command_aborted") == []
        assert policy.events("condition_cleared") == []
        assert policy.events("power_returned_after_commit") == []
    finally:
        policy.stop()
