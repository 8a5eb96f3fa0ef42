"""The policy decides, NUT clients obey: a real Debian `upsmon` secondary logged in to the NUT
server runs its SHUTDOWNCMD exactly once when the policy worker decides a shutdown for its
`kind: nut` agent, never for a blip under the debounce, and not when the grid is back before
the decision. The worker runs on the real clock, readings are stamped by the database's."""

from __future__ import annotations

import json
import time

import pytest

from policy import topology
from policy.mqttlink import MqttLink
from policy.settings import PolicySettings
from policy.worker import Worker
from testbed.upsmon import Upsmon, find_upsmon
from tests.nut_support import SN, Client, add_station, reading, start_server
from tests.test_policy_scenarios import Listener

pytestmark = pytest.mark.skipif(find_upsmon() is None,
                                reason="upsmon not installed (scripts/install-system-deps)")

DEBOUNCE = 4
DELAY = 2


@pytest.fixture
def rig(request, db, db_url, mqtt_broker, tmp_path):
    delay = getattr(request, "param", DELAY)
    add_station(db)
    reading(db, soc=80, grid=True)
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps({"agents": {"nas": {
        "kind": "nut", "ups": "ups", "supplies": [SN], "shutdown_delay_sec": delay}}}))
    policy_file = policy_file.rename(tmp_path / "policy.json")
    settings = PolicySettings(soc_min=20, soc_margin=5, debounce_sec=DEBOUNCE, confirm_sec=2,
                              cooldown_sec=300, command_ttl_sec=300, resend_sec=1,
                              config_file=policy_file, signing_key="k",
                              mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port)
    topology.sync(db, settings)
    listener = Listener(mqtt_broker)
    link = MqttLink.from_settings(settings, client_id="policy-nut-test")
    link.start()
    worker = Worker(db, settings, link)
    # No NUT_UPS_JSON: the agent's UPS name serves its one supply.
    server = start_server(db_url, ups_json="", serve_serials=False)
    upsmon = Upsmon(f"ups@127.0.0.1:{server.port}", "monuser", "secret").start()
    probe = Client(server.port)
    deadline = time.monotonic() + 20
    while probe.ask("GET NUMLOGINS ups") != "NUMLOGINS ups 1":
        assert time.monotonic() < deadline, upsmon.log()
        time.sleep(0.2)
    yield db, worker, upsmon, probe, listener
    probe.close()
    upsmon.stop()
    server.stop()
    link.stop()
    listener.close()


def drive(db, worker, probe, seconds: float, soc, grid) -> list[str]:
    """Every half second: a reading (soc and grid may be functions of the elapsed time), an
    evaluation, and the UPS status as a NUT client sees it. Returns the statuses seen."""
    seen = []
    start = time.monotonic()
    while (t := time.monotonic() - start) < seconds:
        reading(db, soc=soc(t) if callable(soc) else soc, grid=grid(t) if callable(grid) else grid)
        worker.step()
        seen.append(probe.ask("GET VAR ups ups.status"))
        time.sleep(0.5)
    return seen


def shutdowns(db) -> list[tuple]:
    return db.execute("SELECT id, status, ack_status FROM commands WHERE agent_id = 'nas'"
                      " AND action = 'shutdown'").fetchall()


def test_upsmon_shuts_down_exactly_once_when_the_policy_decides(rig):
    db, worker, upsmon, probe, listener = rig
    # The NUT client's login is the agent's liveness (reported within a poll).
    deadline = time.monotonic() + 5
    while db.execute("SELECT online FROM agent_status WHERE agent_id = 'nas'").fetchone() != (
            True,):
        assert time.monotonic() < deadline
        worker.step()
        time.sleep(0.2)

    # Low SoC on battery: nothing shows LB while the debounce runs.
    seen = drive(db, worker, probe, DEBOUNCE - 1, soc=15, grid=False)
    assert all("LB" not in s and "FSD" not in s for s in seen), seen
    assert upsmon.shutdowns() == 0 and shutdowns(db) == []

    seen = drive(db, worker, probe, DEBOUNCE + DELAY + 6, soc=14, grid=False)
    assert 'VAR ups ups.status "OB LB FSD"' in seen
    assert upsmon.shutdowns() == 1, upsmon.log()
    # The policy's record, as for any agent; the NUT server's acks are in it.
    (cmd_id, status, _ack), = shutdowns(db)
    assert status == "executing"
    kinds = [k for (k,) in db.execute(
        "SELECT kind FROM policy_events WHERE agent_id = 'nas' ORDER BY id").fetchall()]
    assert "trigger_fired" in kinds and kinds.count("command_acked") == 2
    detail = db.execute("SELECT ack_detail FROM commands WHERE id = %s", (cmd_id,)).fetchone()[0]
    assert detail.startswith("FSD seen on ups by monuser@127.0.0.1")
    # Nothing went to the broker for a NUT agent.
    assert not [m for m in listener.messages if m["topic"] == "power-manager/nas/cmd"]

    # With the grid back FSD holds (SAFETY S7: the shutdown goes through) until it has: upsmon
    # read FSD and logged out as it halted, and the grid is confirmed back. Then the UPS shows
    # the grid as it is, for a host switched on again; never FSD again. Still one run.
    seen = drive(db, worker, probe, 5, soc=30, grid=True)
    assert seen[0] == 'VAR ups ups.status "OB LB FSD"', seen
    assert seen[-1] == 'VAR ups ups.status "OL"', seen
    first_ol = seen.index('VAR ups ups.status "OL"')
    assert set(seen[first_ol:]) == {'VAR ups ups.status "OL"'}, seen
    time.sleep(2)
    assert upsmon.shutdowns() == 1


def test_a_blip_under_the_debounce_shuts_nothing_down(rig):
    db, worker, upsmon, probe, _listener = rig
    seen = drive(db, worker, probe, DEBOUNCE + DELAY + 5,
                 soc=lambda t: 15 if t < DEBOUNCE / 2 else 40, grid=False)
    assert all("LB" not in s for s in seen), seen
    assert 'VAR ups ups.status "OB DISCHRG"' in seen
    assert shutdowns(db) == []
    assert upsmon.shutdowns() == 0, upsmon.log()


def test_grid_back_before_the_decision_shuts_nothing_down(rig):
    db, worker, upsmon, probe, _listener = rig
    seen = drive(db, worker, probe, DEBOUNCE + DELAY + 5, soc=15,
                 grid=lambda t: t >= DEBOUNCE / 2)
    assert all("LB" not in s for s in seen), seen
    assert seen[-1] == 'VAR ups ups.status "OL"'
    assert shutdowns(db) == []
    assert upsmon.shutdowns() == 0, upsmon.log()


@pytest.mark.parametrize("rig", [8], indirect=True)
def test_grid_back_inside_the_abort_window_never_shows_fsd(rig):
    """Decided, then the grid is back for the confirmation period before the commit point:
    the abort is acknowledged by the NUT server, FSD is never shown, upsmon never runs."""
    db, worker, upsmon, probe, _listener = rig
    drive(db, worker, probe, DEBOUNCE + 1.5, soc=15, grid=False)
    assert len(shutdowns(db)) == 1
    seen = drive(db, worker, probe, 8 + 2, soc=15, grid=True)
    assert all("LB" not in s and "FSD" not in s for s in seen), seen
    assert upsmon.shutdowns() == 0, upsmon.log()
    assert db.execute("SELECT status FROM commands WHERE agent_id = 'nas' AND action = 'abort'"
                      ).fetchall() == [("aborted",)]


def agent_online(db) -> bool | None:
    row = db.execute("SELECT online FROM agent_status WHERE agent_id = 'nas'").fetchone()
    return row[0] if row else None


def wait_online(db, worker, want: bool, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while agent_online(db) is not want:
        assert time.monotonic() < deadline, f"agent online {agent_online(db)}, want {want}"
        worker.step()
        time.sleep(0.2)


def test_a_host_booted_after_the_power_returned_is_not_shut_down_again(rig):
    """The shutdown went through (upsmon saw FSD, ran SHUTDOWNCMD, logged out), then the grid
    came back and stayed (confirmed) inside the cooldown, so the episode is still open. The
    host is switched on again (Wake-on-LAN, BIOS "restore on AC", the button): its upsmon
    logs in and must see `OL`, not the FSD of a shutdown that is over (SAFETY S3, S8)."""
    db, worker, upsmon, probe, _listener = rig
    wait_online(db, worker, True)
    drive(db, worker, probe, DEBOUNCE + DELAY + 6, soc=14, grid=False)
    assert upsmon.shutdowns() == 1, upsmon.log()
    upsmon.stop()  # the host halted: its upsmon is gone, the agent offline
    wait_online(db, worker, False)
    # Battery still critical, grid still out: a host booted now is shut down again.
    seen = drive(db, worker, probe, 1, soc=14, grid=False)
    assert set(seen) == {'VAR ups ups.status "OB LB FSD"'}
    # Grid back and confirmed (2 s), within the 300 s cooldown: the episode stays open.
    drive(db, worker, probe, 4, soc=30, grid=True)
    assert db.execute("SELECT count(*) FROM policy_events WHERE agent_id = 'nas'"
                      " AND kind = 'power_returned_after_commit'").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM policy_conditions WHERE condition = 'episode'"
                      ).fetchone()[0] == 1
    booted = Upsmon(upsmon.monitor, "monuser", "secret").start()
    try:
        seen = drive(db, worker, probe, 8, soc=31, grid=True)
        assert booted.shutdowns() == 0, booted.log()
        assert set(seen) == {'VAR ups ups.status "OL"'}, seen
        assert probe.ask("GET NUMLOGINS ups") == "NUMLOGINS ups 1", booted.log()
        wait_online(db, worker, True)
    finally:
        booted.stop()
