"""Wake-on-LAN after power returns (SAFETY S11, docs/wake-on-lan.md): the magic packet is
captured on a real UDP socket on loopback, the episode is played as timestamped readings in a
real TimescaleDB and the worker is stepped along a controlled clock with a real Mosquitto."""
# ruff: noqa: F401, F811 (the scenario fixture `make_policy` is imported)

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest

from policy import topology, wol
from policy.settings import PolicySettings
from policy.worker import Worker
from servicekit.settings import SettingsError
from tests.test_policy_field import ack_message, deliver_to_worker, status_message
from tests.test_policy_scenarios import SN, agent_name, at, insert, make_policy, series

MAC = "00:1A:2b:3C:4d:5E"
MAC_BYTES = bytes.fromhex("001a2b3c4d5e")
MAGIC = b"\xff" * 6 + MAC_BYTES * 16
RESTART_SOC = 30


class Catcher:
    """A UDP socket on loopback standing in for the host's network card; a thread stamps each
    packet as it arrives."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.got: list[tuple[float, bytes]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self):
        while not self.stop.is_set():
            try:
                data = self.sock.recv(2048)
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.got.append((time.monotonic(), data))

    def packets(self, wait: float = 0.2) -> list[bytes]:
        time.sleep(wait)
        with self.lock:
            return [d for _, d in self.got]

    def close(self):
        self.stop.set()
        self.thread.join(1)
        self.sock.close()


@pytest.fixture
def catcher():
    c = Catcher()
    yield c
    c.close()


def policy_file(tmp_path, agents: dict) -> str:
    path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"agents": agents}), encoding="utf-8")
    return str(path)


def wol_policy(make_policy, tmp_path, catcher, agent, **overrides):
    attrs = {"mac": MAC, "wol_broadcast": "127.0.0.1", "wol_port": catcher.port,
             "restart_soc": RESTART_SOC}
    attrs.update(overrides.pop("attrs", {}))
    overrides.setdefault("wol_gap_sec", 0.01)
    return make_policy({SN: [agent]}, config_file=policy_file(tmp_path, {agent: attrs}),
                       **overrides)


def outage(db, back: list) -> None:
    """On grid at 14 %, on battery from 60 s to 300 s (the SoC trigger fires at 120 s, commit
    point at 240 s), then `back`: the readings from 310 s on."""
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 300, 10, 14, False) + back)


def charging(start: int, end: int, from_soc: float = 14):
    """Grid back from `start`, charging 1 % every 10 s: 30 % at start + 160 s."""
    return series(start, end, 10, lambda t: from_soc + (t - start) / 10, True)


def shut_down(policy, agent, status: str = "executing") -> str:
    """Step through the outage and have the agent take the shutdown and reach its commit."""
    policy.run_until(125)
    (cmd_id, *_), = policy.commands("shutdown")
    deliver_to_worker(policy, ack_message(agent, cmd_id, "dry_run" if status == "dry_run"
                                          else "scheduled", "shutdown in 120 s"))
    policy.run_until(245)
    deliver_to_worker(policy, ack_message(agent, cmd_id, status, "commit point reached"))
    return cmd_id


def wol_events(db, agent):
    return db.execute(
        "SELECT kind, ts, episode_id, command_id, details FROM policy_events"
        " WHERE kind LIKE 'wol%%' AND agent_id = %s ORDER BY id", (agent,)).fetchall()


# -- the packet ---------------------------------------------------------------------------------
def test_magic_packet_is_six_ff_and_sixteen_macs():
    assert wol.magic_packet(MAC_BYTES) == MAGIC and len(MAGIC) == 102
    for text in ("00:1a:2b:3c:4d:5e", "00-1A-2B-3C-4D-5E", "001a.2b3c.4d5e", "001A2B3C4D5E"):
        assert wol.parse_mac(text) == MAC_BYTES, text


@pytest.mark.parametrize("mac", ["00:1a:2b:3c:4d", "00:1a:2b:3c:4d:5e:6f", "00:1a-2b:3c:4d:5e",
                                 "zz:1a:2b:3c:4d:5e", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff",
                                 "01:00:5e:00:00:01", 1234])
def test_a_bad_mac_stops_start_up_naming_the_agent_and_the_fix(db, tmp_path, mac):
    agent = agent_name("pc")
    settings = PolicySettings(device_to_agents_json=json.dumps({SN: [agent]}),
                              config_file=policy_file(tmp_path, {agent: {"mac": mac}}))
    with pytest.raises(SettingsError) as sync_error:
        topology.sync(db, settings)
    with pytest.raises(SettingsError) as worker_error:
        Worker(db, settings)
    for error in (sync_error.value, worker_error.value):
        text = str(error)
        assert f"agent {agent}" in text and "mac" in text and "00:11:22:33:44:55" in text


@pytest.mark.parametrize("attrs, key", [
    ({"mac": MAC, "wol_port": 0}, "wol_port"),
    ({"mac": MAC, "wol_broadcast": "lan"}, "wol_broadcast"),
    ({"mac": MAC, "restart_soc": 101}, "restart_soc"),
    ({"wol_port": 9}, "without 'mac'"),
])
def test_bad_wake_on_lan_settings_stop_start_up(db, tmp_path, attrs, key):
    agent = agent_name("pc")
    settings = PolicySettings(device_to_agents_json=json.dumps({SN: [agent]}),
                              config_file=policy_file(tmp_path, {agent: attrs}))
    with pytest.raises(SettingsError, match=f"agent {agent}.*{key}"):
        topology.sync(db, settings)


# -- the episode --------------------------------------------------------------------------------
def test_host_shut_down_is_woken_once_when_power_is_back_and_charged(
        db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    # Power back from 310 s (confirmed at 340 s); the SoC reaches the restart level of 30 %
    # at the reading of 470 s.
    outage(db, charging(310, 900))
    policy = wol_policy(make_policy, tmp_path, catcher, agent, wol_gap_sec=1.0)
    cmd_id = shut_down(policy, agent)
    policy.run_until(465)
    assert catcher.packets(wait=0.05) == [], "not below the restart level"
    assert wol_events(db, agent) == []
    policy.run_until(470)
    # The first packet goes at once; the evaluation does not wait for the repeats (another
    # station may still be on battery), they follow a gap apart.
    assert catcher.packets(wait=0.05) == [MAGIC]
    assert catcher.packets(wait=2.4) == [MAGIC] * 3
    gaps = [b - a for (a, _), (b, _) in zip(catcher.got, catcher.got[1:])]
    assert all(g >= 0.9 for g in gaps), gaps

    (kind, ts, episode, command_id, details), = wol_events(db, agent)
    assert (kind, ts, command_id) == ("wol_sent", at(470), cmd_id)
    assert episode == f"{SN}-{int(at(60).timestamp())}"
    assert details["mac"] == MAC.lower() and details["port"] == catcher.port
    assert details["packets"] == 3 and details["restart_soc"] == RESTART_SOC
    assert details["soc"] == [30.0]

    # Not twice: neither later in the episode, nor after a restart of the worker, nor after
    # the episode has re-armed (cooldown 300 s with the SoC back).
    policy.run_until(600)
    policy.restart()
    policy.run_until(900)
    assert catcher.packets(wait=0.1) == [MAGIC] * 3
    assert [e[0] for e in wol_events(db, agent)] == ["wol_sent"]


def test_host_never_shut_down_is_not_woken(db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    # An outage above every threshold: no shutdown, so nothing to wake.
    insert(db, SN, series(0, 50, 10, 80, True) + series(60, 300, 10, 70, False)
           + series(310, 900, 10, 90, True))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    policy.run_until(900)
    assert policy.commands("shutdown") == []
    assert catcher.packets() == [] and wol_events(db, agent) == []


def test_shutdown_aborted_inside_its_window_wakes_nothing(db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    # Shutdown at 120 s, grid back at 160 s (confirmed at 190 s, inside the abort window).
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 150, 10, 14, False)
           + series(160, 900, 10, 60, True))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    policy.run_until(125)
    (cmd_id, *_), = policy.commands("shutdown")
    deliver_to_worker(policy, ack_message(agent, cmd_id, "scheduled"))
    policy.run_until(900)
    assert len(policy.commands("abort")) == 1
    assert catcher.packets() == [] and wol_events(db, agent) == []


def test_shutdown_taken_but_not_executed_wakes_nothing(db, make_policy, tmp_path, catcher):
    """Acked `scheduled`, no `executing`, the agent never went offline: no proof the host
    went down."""
    agent = agent_name("pc")
    outage(db, charging(310, 700))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    policy.run_until(125)
    (cmd_id, *_), = policy.commands("shutdown")
    deliver_to_worker(policy, ack_message(agent, cmd_id, "scheduled"))
    policy.run_until(700)
    assert catcher.packets() == [] and wol_events(db, agent) == []


def test_executing_ack_lost_but_agent_went_offline_after_the_commit_point_wakes(
        db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    outage(db, charging(310, 700))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    deliver_to_worker(policy, status_message(agent, "online"))
    policy.run_until(125)
    (cmd_id, *_), = policy.commands("shutdown")
    deliver_to_worker(policy, ack_message(agent, cmd_id, "scheduled"))
    policy.run_until(250)
    deliver_to_worker(policy, status_message(agent, "offline"))  # the Last Will
    policy.run_until(700)
    assert catcher.packets() == [MAGIC] * 3
    assert [e[0] for e in wol_events(db, agent)] == ["wol_sent"]


def test_no_wake_while_the_grid_flaps(db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    # After the commit point the grid returns for 20 s at a time (shorter than the 30 s
    # confirmation period) with the battery well above the restart level, until 500 s.
    flapping = []
    for start in range(310, 500, 40):
        flapping += series(start, start + 20, 10, 50, True)
        flapping += series(start + 30, start + 30, 10, 50, False)
    outage(db, flapping + series(510, 800, 10, 50, True))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    shut_down(policy, agent)
    policy.run_until(535)
    assert catcher.packets(wait=0.05) == [] and wol_events(db, agent) == []
    policy.run_until(800)
    assert catcher.packets() == [MAGIC] * 3
    (kind, ts, *_), = wol_events(db, agent)
    assert (kind, ts) == ("wol_sent", at(540))  # grid back at 510 s + 30 s confirmation


def test_no_wake_below_the_restart_soc(db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    outage(db, series(310, 900, 10, 25, True))  # back, but charged only to 25 % of 30 %
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    shut_down(policy, agent)
    policy.run_until(900)
    assert catcher.packets() == [] and wol_events(db, agent) == []


def test_default_restart_level_is_the_rearm_soc(db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    outage(db, charging(310, 700))
    # No restart_soc: POLICY_REARM_SOC (here 40 %, reached at the reading of 570 s).
    policy = wol_policy(make_policy, tmp_path, catcher, agent, rearm_soc=40,
                        attrs={"restart_soc": None})
    shut_down(policy, agent)
    policy.run_until(700)
    (kind, ts, *_, details), = wol_events(db, agent)
    assert (kind, ts, details["restart_soc"]) == ("wol_sent", at(570), 40)
    assert catcher.packets() == [MAGIC] * 3


def test_dry_run_records_the_wake_up_and_sends_nothing(db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    outage(db, charging(310, 700))
    policy = wol_policy(make_policy, tmp_path, catcher, agent, wol_dry_run=True)
    cmd_id = shut_down(policy, agent)
    policy.run_until(700)
    assert catcher.packets() == []
    (kind, ts, _, command_id, details), = wol_events(db, agent)
    assert (kind, ts, command_id) == ("wol_dry_run", at(470), cmd_id)
    assert details["dry_run"] is True and details["mac"] == MAC.lower()


def test_shutdown_of_a_dry_run_agent_is_woken_in_dry_run_only(db, make_policy, tmp_path,
                                                              catcher):
    """A dry-run agent never halted its host: the wake-up is recorded, not sent."""
    agent = agent_name("pc")
    outage(db, charging(310, 700))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    shut_down(policy, agent, status="dry_run")
    policy.run_until(700)
    assert catcher.packets() == []
    assert [(e[0], e[1]) for e in wol_events(db, agent)] == [("wol_dry_run", at(470))]


def test_host_already_back_online_is_not_woken(db, make_policy, tmp_path, catcher):
    agent = agent_name("pc")
    outage(db, charging(310, 700))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    shut_down(policy, agent)
    deliver_to_worker(policy, status_message(agent, "offline"))
    policy.run_until(400)
    deliver_to_worker(policy, status_message(agent, "online"))  # BIOS "power on after loss"
    policy.run_until(700)
    assert catcher.packets() == []
    assert [e[0] for e in wol_events(db, agent)] == ["wol_not_needed"]


def test_replay_never_sends_a_packet(db, tmp_path, catcher):
    """A worker without an MQTT link (replay) records what it would do; nothing goes out."""
    agent = agent_name("pc")
    settings = PolicySettings(
        device_to_agents_json=json.dumps({SN: [agent]}), wol_gap_sec=0.01,
        config_file=policy_file(tmp_path, {agent: {"mac": MAC, "wol_broadcast": "127.0.0.1",
                                                   "wol_port": catcher.port}}))
    topology.sync(db, settings)
    assert Worker(db, settings).wol.dry_run


def test_host_still_halting_is_woken_only_once_its_agent_has_gone_offline(
        db, make_policy, tmp_path, catcher):
    """The agent acked `executing` and is still online (a NAS takes minutes to halt) when the
    power is back and charged: a magic packet now reaches a running host, which then halts
    and is never woken, since the packet goes out once per episode. Wait for the halt (the
    agent's Last Will, or a NUT client's logout), then wake it."""
    agent = agent_name("pc")
    outage(db, charging(310, 700))
    policy = wol_policy(make_policy, tmp_path, catcher, agent)
    deliver_to_worker(policy, status_message(agent, "online"))
    shut_down(policy, agent)
    policy.run_until(520)  # power back confirmed at 340 s, 30 % reached at 470 s
    assert catcher.packets(wait=0.05) == [] and wol_events(db, agent) == []
    deliver_to_worker(policy, status_message(agent, "offline"))  # halted at last
    policy.run_until(530)
    assert catcher.packets() == [MAGIC] * 3
    (kind, ts, *_), = wol_events(db, agent)
    assert (kind, ts) == ("wol_sent", at(525))
