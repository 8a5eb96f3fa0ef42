"""The shutdown path under what the field sends (SAFETY, "Field conditions"): the same command
delivered many times with its acks in any order or lost, station clocks hours ahead or behind,
an agent offline for longer than a command's TTL, a host that boots again inside the outage,
and a broker down at the moment of decision. Real TimescaleDB, real Mosquitto."""
# ruff: noqa: F401, F811 (the scenario fixtures `agents` and `make_policy` are imported)

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import Counter
from datetime import timedelta

import pytest

from policy.commands import Command
from policy.mqttlink import Incoming
from testbed.mosquitto import MosquittoServer
from tests.test_policy_incidents import Downlink
from tests.test_policy_scenarios import (
    LONG_TTL,
    SN,
    T0,
    agent_name,
    agents,
    at,
    draining,
    insert,
    make_policy,
    series,
)

DUPLICATE = ("rejected", "duplicate")


def insert_from_clock(db, sn: str, rows, offset: timedelta) -> None:
    """Readings from a station whose clock is `offset` off: each is received (by the collector,
    on time) at its second, and stamped by the station at that second plus the offset."""
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO ecoflow_measurements (ts, received_at, device_sn, soc_percent,"
            " soc_min_percent, remain_time_min, grid_connected, source, raw_data)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, 'simulator', '{}')",
            [(at(r[0]) + offset, at(r[0]), sn, r[1], r[1], r[3] if len(r) > 3 else None, r[2])
             for r in rows])


def ack_message(agent: str, cmd_id, status: str, detail: str = "") -> Incoming:
    body = {"id": str(cmd_id), "agent": agent, "status": status, "host": f"{agent}.lan",
            "ts": int(T0.timestamp()), "detail": detail}
    return Incoming(agent, "ack", body, json.dumps(body).encode())


def status_message(agent: str, state: str) -> Incoming:
    body = {"state": state, "agent": agent, "version": "1.0.0", "platform": "linux"}
    return Incoming(agent, "status", body, json.dumps(body).encode())


def deliver_to_worker(policy, *messages: Incoming) -> None:
    """Hand acks/status straight to the worker's inbox, as its MQTT client would, and let it
    store them (at the policy's current time)."""
    for msg in messages:
        policy.link.inbox.put(msg)
    policy.worker.handle_incoming(at(policy.t))


# -- 1. redelivered commands and their acks ---------------------------------------------------
def test_redelivered_shutdown_acked_duplicate_still_aborts_when_the_grid_returns(
        db, make_policy, agents):
    """An agent reconnects and receives the queued re-send of a shutdown it already accepted;
    it answers `rejected` / `duplicate` as the contract says. That must not mark the shutdown
    rejected, raise a rejection, or cost the abort when the grid comes back in the window."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 150, 10, 14, False)
           + series(160, 400, 10, 14, True))
    policy = make_policy({SN: [agent]})
    policy.run_until(125)
    (shutdown_id, *_), = policy.commands("shutdown")
    agents.ack(agent, str(shutdown_id), "scheduled", "shutdown in 120 s")
    policy.wait_for_ack(shutdown_id)
    agents.ack(agent, str(shutdown_id), *DUPLICATE)
    agents.ack(agent, str(shutdown_id), *DUPLICATE)
    time.sleep(0.3)
    policy.run_until(400)
    (_, _, _, _, status, _, _), = policy.commands("shutdown")
    assert status == "scheduled"
    assert policy.events("command_rejected") == []
    (_, _, _, _, _, _, cancels), = policy.commands("abort")
    assert cancels == shutdown_id
    assert policy.first_command_time("abort") == at(190)  # grid back at 160 s + 30 s


def test_only_the_duplicate_ack_arrives_and_the_abort_is_still_sent(db, make_policy, agents):
    """The first ack (`scheduled`) is lost; only the answer to the re-send arrives."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 150, 10, 14, False)
           + series(160, 400, 10, 14, True))
    policy = make_policy({SN: [agent]})
    policy.run_until(145)
    (shutdown_id, _, _, _, _, sends, _), = policy.commands("shutdown")
    assert sends == 2  # the first ack never came, so it was sent again
    agents.ack(agent, str(shutdown_id), *DUPLICATE)
    policy.wait_for_ack(shutdown_id)
    policy.run_until(400)
    (_, _, _, _, status, sends, _), = policy.commands("shutdown")
    assert status == "received" and sends == 2  # delivered: no more re-sends
    assert policy.events("command_rejected") == []
    assert [c[6] for c in policy.commands("abort")] == [shutdown_id]


# Each case: the acks one command gets (in some order, some repeated) and the state every
# order must end in: its most advanced genuine ack.
ACK_SETS = [
    ([("scheduled", ""), DUPLICATE, DUPLICATE], "scheduled"),
    ([("scheduled", ""), ("executing", "commit point reached"), DUPLICATE,
      ("expired", "expired")], "executing"),
    ([DUPLICATE, DUPLICATE], "received"),
    ([("dry_run", "shutdown in 120 s"), DUPLICATE, ("dry_run", "commit point reached")],
     "dry_run"),
    ([("rejected", "bad signature"), ("rejected", "bad signature")], "rejected"),
    ([("scheduled", ""), ("expired", "expired")], "scheduled"),
]


@pytest.mark.parametrize("acks,final", ACK_SETS, ids=[c[1] for c in ACK_SETS])
def test_any_order_and_repetition_of_acks_ends_in_the_most_advanced_genuine_ack(
        db, make_policy, acks, final):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 80, True))
    policy = make_policy({SN: [agent]})
    orders = sorted(set(itertools.permutations(acks)))
    for order in orders:
        cmd = Command(agent, "shutdown", 120, 300, int(T0.timestamp()), f"ep-{uuid.uuid4()}")
        policy.worker.create_command(cmd, T0)
        deliver_to_worker(policy, *(ack_message(agent, cmd.id, s, d) for s, d in order))
        status, ack_status = db.execute(
            "SELECT status, ack_status FROM commands WHERE id = %s", (cmd.id,)).fetchone()
        assert (status, ack_status) == (final, final), order
        rejections = db.execute(
            "SELECT count(*) FROM policy_events WHERE kind = 'command_rejected'"
            " AND command_id = %s", (cmd.id,)).fetchone()[0]
        assert rejections == (1 if final == "rejected" else 0), order


def test_a_failed_halt_after_executing_keeps_the_state_and_is_reported(db, make_policy):
    """The agent reached its commit point (`executing`), then its SHUTDOWN_CMD failed: the host
    is still up. The report must not be lost under the better-ranked `executing`."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 80, True))
    policy = make_policy({SN: [agent]})
    cmd = Command(agent, "shutdown", 120, 300, int(T0.timestamp()), "ep-halt")
    policy.worker.create_command(cmd, T0)
    deliver_to_worker(policy, ack_message(agent, cmd.id, "scheduled"),
                      ack_message(agent, cmd.id, "executing", "commit point reached"),
                      ack_message(agent, cmd.id, "rejected", "SHUTDOWN_CMD failed: exit 1"))
    assert db.execute("SELECT status FROM commands WHERE id = %s",
                      (cmd.id,)).fetchone() == ("executing",)
    (_, _, _, _, message, _), = policy.events("command_failed")
    assert "SHUTDOWN_CMD failed" in message


# -- 2. station clocks ------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [timedelta(hours=-3), timedelta(minutes=-11), timedelta(0),
                                    timedelta(minutes=11), timedelta(hours=3)],
                         ids=["3h-behind", "11min-behind", "in-sync", "11min-ahead",
                              "3h-ahead"])
def test_station_clock_off_by_hours_changes_no_decision(db, make_policy, agents, offset):
    """A station whose clock runs 11 minutes behind, reporting every 10 s on battery, was
    judged dead and its host shut down at once. Age is measured by when readings arrive
    (S1); debounce and the rest compare readings on the station's own clock. Whatever the
    offset, the shutdown comes at the same moment as for a station in sync."""
    agent = agent_name()
    # On battery from t=60 at 80 %, draining 2 %/min: at or below 15 % from t=2010.
    insert_from_clock(db, SN, series(0, 50, 10, 80, True)
                      + series(60, 2200, 10, draining(80, 2, 60), False), offset)
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    policy.run_until(1000)
    assert policy.commands() == [], "a station reporting every 10 s is neither dead nor stale"
    view, = policy.worker.step(at(policy.t))
    supply, = view.supplies
    assert supply["freshness"] == "fresh" and supply["age_sec"] <= 10
    assert supply["clock_offset_sec"] == pytest.approx(-offset.total_seconds())
    policy.run_until(2200)
    (_, _, _, episode, _, _, _), = policy.commands("shutdown")
    assert policy.first_command_time() == at(2010 + 60)
    assert policy.events("trigger_fired")[0][1] == "soc"
    assert episode == f"{SN}-{int((at(60) + offset).timestamp())}"


@pytest.mark.parametrize("offset", [timedelta(hours=-3), timedelta(hours=3)],
                         ids=["3h-behind", "3h-ahead"])
def test_station_going_silent_on_battery_is_dead_by_arrival_time_whatever_its_clock(
        db, make_policy, agents, offset):
    """Readings stop at 300 s while on battery at 80 %: the station is dead (and the host shut
    down, S2) `dead_after_sec` after the last reading arrived, not after its stamp."""
    agent = agent_name()
    insert_from_clock(db, SN, series(0, 50, 10, 80, True) + series(60, 300, 10, 80, False),
                      offset)
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    dead_after = db.execute("SELECT dead_after_sec FROM devices WHERE device_sn = %s",
                            (SN,)).fetchone()[0]
    policy.run_until(300 + dead_after)
    assert policy.commands() == []
    policy.run_until(300 + dead_after + 5)
    assert policy.first_command_time() == at(300 + dead_after + 5)
    assert policy.events("trigger_fired")[0][1] == "dead_on_battery"


# -- 3. an agent out of reach, a host that boots again ----------------------------------------
def test_agent_offline_longer_than_the_ttl_gets_a_new_shutdown_in_the_same_episode(
        db, make_policy, agents):
    """The host is offline while its shutdown is sent, re-sent and expires. The shutdown is
    still due: it gets a new command (new id, same episode, audited), and once it answers,
    nothing more."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 900, 10, 14, False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=60, resend_sec=20)
    policy.run_until(180)
    (first_id, _, _, episode, status, _, _), = policy.commands("shutdown")
    assert status == "expired"
    policy.run_until(185)
    (_, _, _, _, _, _, _), (second_id, _, _, again_episode, status, sends, _) = \
        policy.commands("shutdown")
    assert second_id != first_id and again_episode == episode and sends == 1
    attempts = [a for (a,) in db.execute(
        "SELECT attempt FROM commands WHERE action = 'shutdown' ORDER BY attempt")]
    assert attempts == [1, 2]
    (_, _, _, _, message, details), = policy.events("command_reissued")
    assert details["replaces"] == str(first_id) and "expired unacknowledged" in message
    assert str(second_id) in {m["payload"]["id"] for m in agents.commands(agent, wait_for=4)}
    # The host comes back and takes it.
    agents.ack(agent, str(second_id), "scheduled", "shutdown in 120 s")
    policy.wait_for_ack(second_id)
    policy.run_until(900)
    assert len(policy.commands("shutdown")) == 2


def test_host_booted_again_inside_the_episode_is_shut_down_again(db, make_policy, agents):
    """Someone powers the NAS on again while the station is still on battery at 14 %: as
    upsmon would, the host is shut down again (a new command with its own abort window), once
    per boot, audited; not silently left running until the battery dies."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 1200, 10, 14, False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    policy.run_until(125)
    (first_id, *_), = policy.commands("shutdown")
    deliver_to_worker(policy, ack_message(agent, first_id, "scheduled", "shutdown in 120 s"))
    policy.run_until(245)
    deliver_to_worker(policy, ack_message(agent, first_id, "executing", "commit point"),
                      status_message(agent, "offline"))
    policy.run_until(600)
    assert len(policy.commands("shutdown")) == 1, "halted: nothing to do"
    deliver_to_worker(policy, status_message(agent, "online"))  # booted again at 605 s
    policy.run_until(610)
    (_, _, _, episode, *_), (second_id, _, _, again_episode, *_) = policy.commands("shutdown")
    assert again_episode == episode
    (_, _, _, _, message, details), = policy.events("command_reissued")
    assert "back online" in message and details["attempt"] == 2
    deliver_to_worker(policy, ack_message(agent, second_id, "scheduled", "shutdown in 120 s"))
    policy.run_until(1200)
    assert len(policy.commands("shutdown")) == 2


def test_a_genuine_rejection_is_not_repeated(db, make_policy, agents):
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 600, 10, 14, False))
    policy = make_policy({SN: [agent]}, command_ttl_sec=60)
    policy.run_until(125)
    (cmd_id, *_), = policy.commands("shutdown")
    deliver_to_worker(policy, ack_message(agent, cmd_id, "rejected", "bad signature"))
    policy.run_until(600)
    assert len(policy.commands("shutdown")) == 1
    assert len(policy.events("command_rejected")) == 1


# -- 9. a broker down at the moment of decision -----------------------------------------------
def test_broker_down_at_the_decision_sends_the_command_once_when_it_returns(db, make_policy):
    """With the broker gone for 10 s, the worker used to hand the same command to its MQTT
    client on every evaluation; the client queued each copy and the agent received them all on
    reconnect (30 copies of one shutdown in the field), and the client's back-off (up to 30 s)
    left the worker away well after the broker was back."""
    broker = MosquittoServer(persistence=True).start()
    agent = agent_name()
    host = None
    try:
        # The agent's side as D4 has it: a persistent session, so what the broker queued for it
        # while it was away is delivered on return.
        host = Downlink(broker)
        insert(db, SN, series(0, 50, 10, 14, True) + series(60, 600, 10, 14, False))
        policy = make_policy({SN: [agent]}, mqtt_host=broker.host, mqtt_port=broker.port,
                             resend_sec=3600, command_ttl_sec=LONG_TTL)
        policy.run_until(100)
        broker.halt()
        down = time.monotonic()
        while policy.link.connected.is_set() and time.monotonic() < down + 5:
            time.sleep(0.05)
        assert not policy.link.connected.is_set()
        # The shutdown falls due at 120 s: 37 evaluations while the broker is away.
        policy.run_until(300)
        (cmd_id, _, _, _, status, sends, _), = policy.commands("shutdown")
        assert (status, sends) == ("pending", 0)
        time.sleep(max(0.0, down + 10 - time.monotonic()))
        broker.start()
        returned = time.monotonic()
        while not policy.link.connected.is_set() and time.monotonic() < returned + 20:
            time.sleep(0.05)
        assert time.monotonic() - returned < 3, "reconnect within a few seconds of the return"
        policy.run_until(310)
        host.settle(quiet=1.5)
        assert host.command_copies() == Counter({str(cmd_id): 1})
    finally:
        if host is not None:
            host.close()
        broker.stop()
