"""The NUT server's protocol against NUT's own clients (Debian's nut-client: upsc) and a raw
socket: variables from the database, NUT's ERR answers, staleness, abuse."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tests.nut_support import SN, Client, add_station, reading, start_server

pytestmark = pytest.mark.skipif(shutil.which("upsc") is None,
                                reason="upsc not installed (scripts/install-system-deps)")


@pytest.fixture
def nut(db, db_url):
    add_station(db)
    reading(db, soc=87.0, grid=True, remain_min=95, watts_in=300, watts_out=120,
            raw='{"input.voltage": 229.7}')
    server = start_server(db_url)
    yield server
    server.stop()


def upsc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["upsc", *args], capture_output=True, text=True, timeout=20)


def upsc_vars(target: str) -> dict[str, str]:
    result = upsc(target)
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def test_upsc_lists_the_station_as_the_database_has_it(nut, db):
    port = nut.port
    assert upsc("-l", f"127.0.0.1:{port}").stdout.split() == sorted([SN, "ups"])
    v = upsc_vars(f"ups@127.0.0.1:{port}")
    assert v["ups.status"] == "OL CHRG"
    assert v["battery.charge"] == "87"
    assert v["battery.runtime"] == str(95 * 60)
    assert v["battery.charge.low"] == "10"
    assert v["input.voltage"] == "229.7"
    assert v["ups.realpower"] == "120" and v["input.realpower"] == "300"
    assert v["battery.temperature"] == "24.5"
    assert v["device.mfr"] == v["ups.mfr"] == "EcoFlow"
    assert v["device.model"] == v["ups.model"] == "DELTA 3 Plus"
    assert v["device.serial"] == v["ups.serial"] == SN
    assert v["device.type"] == "ups"
    # The same station under its serial number, and one variable at a time.
    assert upsc_vars(f"{SN}@127.0.0.1:{port}") == v
    assert upsc(f"ups@127.0.0.1:{port}", "battery.charge").stdout.strip() == "87"

    # A new reading on battery is served within a poll; no LB without a policy decision.
    reading(db, soc=9.5, grid=False, remain_min=4, watts_in=0, watts_out=150)
    time.sleep(1)
    v = upsc_vars(f"ups@127.0.0.1:{port}")
    assert v["ups.status"] == "OB DISCHRG"
    assert v["battery.charge"] == "9.5" and v["battery.runtime"] == "240"


def test_upsc_errors_are_nuts_own(nut):
    port = nut.port
    result = upsc(f"nosuch@127.0.0.1:{port}")
    assert result.returncode != 0 and "Unknown UPS" in result.stderr
    result = upsc(f"ups@127.0.0.1:{port}", "ups.nosuch")
    assert result.returncode != 0 and "Variable not supported" in result.stderr


def test_protocol_commands_and_errors(nut):
    c = Client(nut.port)
    try:
        assert c.ask("NETVER") == "1.3"
        assert "ecoflow-nut" in c.ask("VER")
        assert c.ask("HELP").startswith("Commands: ")
        assert c.ask_list("LIST UPS") == [
            "BEGIN LIST UPS", f'UPS {SN} "EcoFlow Study ({SN})"', 'UPS ups "EcoFlow Study ('
            f'{SN})"', "END LIST UPS"]
        assert c.ask("GET VAR ups ups.status") == 'VAR ups ups.status "OL CHRG"'
        assert c.ask("get var ups battery.charge") == 'VAR ups battery.charge "87"'
        assert c.ask("GET UPSDESC ups") == f'UPSDESC ups "EcoFlow Study ({SN})"'
        assert c.ask("GET TYPE ups battery.charge") == "TYPE ups battery.charge NUMBER"
        assert c.ask("GET TYPE ups ups.status").startswith("TYPE ups ups.status STRING:")
        assert c.ask("GET DESC ups ups.status") == 'DESC ups ups.status "UPS status"'
        assert c.ask("GET NUMLOGINS ups") == "NUMLOGINS ups 0"
        assert c.ask_list("LIST CMD ups") == ["BEGIN LIST CMD ups", "END LIST CMD ups"]
        assert c.ask_list("LIST RW ups") == ["BEGIN LIST RW ups", "END LIST RW ups"]
        assert c.ask_list("LIST ENUM ups ups.status") == [
            "BEGIN LIST ENUM ups ups.status", "END LIST ENUM ups ups.status"]
        assert c.ask_list("LIST RANGE ups battery.charge") == [
            "BEGIN LIST RANGE ups battery.charge", "END LIST RANGE ups battery.charge"]
        listing = c.ask_list("LIST VAR ups")
        assert listing[0] == "BEGIN LIST VAR ups" and listing[-1] == "END LIST VAR ups"
        assert 'VAR ups ups.status "OL CHRG"' in listing

        # NUT's error words.
        assert c.ask("GET VAR nosuch ups.status") == "ERR UNKNOWN-UPS"
        assert c.ask("LIST VAR nosuch") == "ERR UNKNOWN-UPS"
        assert c.ask("GET VAR ups no.such.var") == "ERR VAR-NOT-SUPPORTED"
        assert c.ask("GET VAR ups") == "ERR INVALID-ARGUMENT"
        assert c.ask("GET NOSUCH ups") == "ERR INVALID-ARGUMENT"
        assert c.ask("LIST") == "ERR INVALID-ARGUMENT"
        assert c.ask("GET CMDDESC ups load.off") == "ERR CMD-NOT-SUPPORTED"
        assert c.ask("FROBNICATE") == "ERR UNKNOWN-COMMAND"
        assert c.ask('GET VAR "ups') == "ERR INVALID-ARGUMENT"
        assert c.ask("STARTTLS") == "ERR FEATURE-NOT-CONFIGURED"
        # Read-only: nothing is written, nobody may force a shutdown.
        assert c.ask("FSD ups") == "ERR USERNAME-REQUIRED"
        assert c.ask('SET VAR ups ups.id "x"') == "ERR USERNAME-REQUIRED"
        assert c.ask("LOGIN ups") == "ERR USERNAME-REQUIRED"
        assert c.ask("USERNAME admin") == "OK"
        assert c.ask("USERNAME other") == "ERR ALREADY-SET-USERNAME"
        assert c.ask("LOGIN ups") == "ERR PASSWORD-REQUIRED"
        assert c.ask("PASSWORD adminpw") == "OK"
        assert c.ask("PASSWORD again") == "ERR ALREADY-SET-PASSWORD"
        assert c.ask("LOGIN nosuch") == "ERR UNKNOWN-UPS"
        assert c.ask("PRIMARY ups") == "OK PRIMARY-GRANTED"
        assert c.ask("MASTER ups") == "OK MASTER-GRANTED"
        assert c.ask("FSD ups") == "ERR ACCESS-DENIED"
        assert c.ask('SET VAR ups ups.id "x"') == "ERR ACCESS-DENIED"
        assert c.ask("INSTCMD ups shutdown.return") == "ERR ACCESS-DENIED"
        assert c.ask("LOGIN ups") == "OK"
        assert c.ask("LOGIN ups") == "ERR ALREADY-LOGGED-IN"

        other = Client(nut.port)
        assert other.ask("GET NUMLOGINS ups") == "NUMLOGINS ups 1"
        assert other.ask_list("LIST CLIENT ups") == [
            "BEGIN LIST CLIENT ups", "CLIENT ups 127.0.0.1", "END LIST CLIENT ups"]
        assert other.ask("USERNAME monuser") == "OK"
        assert other.ask("PASSWORD wrong") == "OK"
        assert other.ask("LOGIN ups") == "ERR ACCESS-DENIED"
        assert other.ask("GET NUMLOGINS ups") == "NUMLOGINS ups 1"
        other.close()
        secondary = Client(nut.port)
        for line in ("USERNAME monuser", "PASSWORD secret"):
            assert secondary.ask(line) == "OK"
        assert secondary.ask("PRIMARY ups") == "ERR ACCESS-DENIED"
        assert secondary.ask("LOGIN ups") == "OK"
        assert secondary.ask("GET NUMLOGINS ups") == "NUMLOGINS ups 2"
        assert secondary.ask("LOGOUT") == "OK Goodbye"
        secondary.close()
        assert c.ask("GET NUMLOGINS ups") == "NUMLOGINS ups 1"
        nobody = Client(nut.port)
        for line in ("USERNAME nobody", "PASSWORD secret"):
            assert nobody.ask(line) == "OK"
        assert nobody.ask("LOGIN ups") == "ERR ACCESS-DENIED"
        nobody.close()
    finally:
        c.close()


def test_garbage_and_a_megabyte_line_do_not_hurt_the_server(nut):
    junk = Client(nut.port)
    junk.send(bytes(range(256)) * 4 + b"\n\x00\xff\xfe\n   \n\"\"\"\n")
    answers = [junk.line() for _ in range(2)]
    assert all(a.startswith("ERR ") for a in answers), answers
    junk.close()

    big = Client(nut.port)
    try:
        big.send(b"GET VAR ups " + b"A" * (1 << 20) + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server hung up before all of it was written: that is the point
    try:
        assert big.line() in ("ERR INVALID-ARGUMENT", "")
    except ConnectionResetError:
        pass
    big.close()

    # Many connections at once, each dropped mid-line.
    for _ in range(20):
        c = Client(nut.port)
        c.send(b"GET VAR ups ups.st")
        c.close()
    ok = Client(nut.port)
    assert ok.ask("GET VAR ups ups.status") == 'VAR ups ups.status "OL CHRG"'
    ok.close()


def test_stale_follows_upsd_but_never_before_the_policy_would_act(db, db_url):
    add_station(db, stale_after=60, dead_after=300)
    add_station(db, sn="R331ZEB4ZEA0067890", name="Garage", stale_after=60, dead_after=300)
    add_station(db, sn="R331ZEB4ZEA0011111", name="Shed", stale_after=60, dead_after=300)
    reading(db, soc=80, grid=True, age=90)                              # stale on grid
    reading(db, soc=50, grid=False, age=90, sn="R331ZEB4ZEA0067890")    # stale on battery
    reading(db, soc=50, grid=False, age=400, sn="R331ZEB4ZEA0011111")   # dead on battery
    server = start_server(db_url, ups_json='{"ups": "Study", "garage": "Garage",'
                                           ' "shed": "Shed"}')
    try:
        c = Client(server.port)
        assert c.ask("GET VAR ups ups.status") == "ERR DATA-STALE"
        assert c.ask("LIST VAR ups") == "ERR DATA-STALE"
        # Still listed and described: only the variables are withheld.
        assert c.ask("GET UPSDESC ups").startswith("UPSDESC ups ")
        # Last seen on battery: upsmon would call a stale UPS critical after DEADTIME, so it is
        # served until the station is dead (SAFETY S2), then stale like any other.
        assert c.ask("GET VAR garage ups.status") == 'VAR garage ups.status "OB DISCHRG"'
        assert c.ask("GET VAR shed ups.status") == "ERR DATA-STALE"
        result = upsc(f"ups@127.0.0.1:{server.port}")
        assert result.returncode != 0 and "Data stale" in result.stderr
        reading(db, soc=80, grid=True)
        time.sleep(1)
        assert c.ask("GET VAR ups ups.status") == 'VAR ups ups.status "OL"'
        c.close()
    finally:
        server.stop()


def test_nut_agents_and_settings_are_checked_at_start(tmp_path):
    from nutserver.settings import load_settings
    from policy.settings import PolicySettings
    from policy.topology import build
    from servicekit.settings import SettingsError

    def topo(agents: dict):
        path = tmp_path / "policy.json"
        path.write_text(__import__("json").dumps({"agents": agents}))
        return build(PolicySettings(config_file=path), {SN: "Study"})

    assert topo({"nas": {"kind": "nut", "ups": "ups", "supplies": [SN]}}).agents["nas"].ups == "ups"
    with pytest.raises(SettingsError, match="kind nut needs 'ups'"):
        topo({"nas": {"kind": "nut", "supplies": [SN]}})
    with pytest.raises(SettingsError, match="both watch NUT UPS 'ups'"):
        topo({"a": {"kind": "nut", "ups": "ups", "supplies": [SN]},
              "b": {"kind": "nut", "ups": "ups", "supplies": [SN]}})
    with pytest.raises(SettingsError, match="only for kind: nut"):
        topo({"a": {"ups": "ups", "supplies": [SN]}})
    with pytest.raises(SettingsError, match="kind = 'snmp'"):
        topo({"a": {"kind": "snmp", "supplies": [SN]}})

    with pytest.raises(SettingsError) as exc:
        load_settings(users_json='{"monuser": "hunter2", "x y": "pw"}')
    assert "NUT_USERS_JSON" in str(exc.value) and "hunter2" not in str(exc.value)
    with pytest.raises(SettingsError, match="NUT_UPS_JSON"):
        load_settings(ups_json='{"bad name": "Study"}')
    assert load_settings(users_json='{"monuser": "secret"}').users()["monuser"].password == "secret"


def test_database_unreachable_ages_the_last_state_as_upsd_ages_a_lost_driver(
        db, db_url, monkeypatch):
    """The server loses the database: it must neither serve `OL` forever (upsmon would never
    learn the grid is gone) nor invent anything. As upsd with a driver gone past MAXAGE, the
    last state is served until it is older than the station's limit, then DATA-STALE: on grid
    past `stale_after_sec`; last seen on battery only past `dead_after_sec` (SAFETY S2), from
    when upsmon treats it as critical, as the policy's `dead_on_battery` does."""
    import psycopg

    from nutserver.state import Poller

    add_station(db, stale_after=2, dead_after=4)
    add_station(db, sn="R331ZEB4ZEA0067890", name="Garage", stale_after=2, dead_after=4)
    reading(db, soc=80, grid=True)
    reading(db, soc=50, grid=False, sn="R331ZEB4ZEA0067890")
    server = start_server(db_url, ups_json='{"ups": "Study", "garage": "Garage"}')
    c = Client(server.port)
    try:
        assert c.ask("GET VAR ups ups.status") == 'VAR ups ups.status "OL"'

        def unreachable(self):
            raise psycopg.OperationalError("connection refused (test)")

        monkeypatch.setattr(Poller, "refresh", unreachable)
        time.sleep(3)
        assert c.ask("GET VAR ups ups.status") == "ERR DATA-STALE"
        assert c.ask("LIST VAR ups") == "ERR DATA-STALE"
        assert c.ask("GET VAR garage ups.status") == 'VAR garage ups.status "OB DISCHRG"'
        time.sleep(2)
        assert c.ask("GET VAR garage ups.status") == "ERR DATA-STALE"
        # Back: served again from the database.
        monkeypatch.undo()
        reading(db, soc=80, grid=True)
        time.sleep(1.5)
        assert c.ask("GET VAR ups ups.status") == 'VAR ups ups.status "OL"'
    finally:
        c.close()
        server.stop()


def test_fsd_from_the_commit_point_until_the_shutdown_has_gone_through(db, db_url, tmp_path):
    """The server's side of the rule, from the rows the worker writes: no FSD inside the abort
    window; `OB LB FSD` from the commit point, also with the grid back, until the shutdown
    has gone through (a logged-in client read FSD, all clients logged out, the grid is back
    confirmed); never `LB` without a decision."""
    import json
    import uuid

    import psycopg
    from psycopg.types.json import Jsonb

    from nutserver.protocol import Registry, Session, User
    from nutserver.state import Poller
    from policy import topology
    from policy.settings import PolicySettings

    add_station(db)
    reading(db, soc=5, grid=False, remain_min=2)  # the station's own low battery
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"agents": {"nas": {"kind": "nut", "ups": "ups",
                                                   "supplies": [SN]}}}))
    topology.sync(db, PolicySettings(config_file=path))
    episode = f"{SN}-1"
    db.execute("INSERT INTO policy_conditions (subject, condition, since, device_sn, details)"
               " VALUES (%s, 'episode', now(), %s, %s)",
               (f"device:{SN}", SN, Jsonb({"identity": episode})))
    cmd = uuid.uuid4()
    db.execute("INSERT INTO commands (id, agent_id, action, episode_id, reason, delay_sec,"
               " ttl_sec, issued_at, expires_at, payload, attempt) VALUES (%s, 'nas',"
               " 'shutdown', %s, 'soc', 60, 300, now(), now() + interval '300 s', '{}', 1)",
               (cmd, episode))
    registry = Registry({"monuser": User("secret")})
    with psycopg.connect(db_url, autocommit=True) as conn:
        poller = Poller(conn, registry, {}, False, 10.0)

        def status() -> str:
            poller.refresh()
            session = Session(registry, "192.0.2.10")
            for line in ("USERNAME monuser", "PASSWORD secret", "LOGIN ups"):
                assert session.handle(line) == (["OK"], False)
            answer, _ = session.handle("GET VAR ups ups.status")
            session.close()
            poller.refresh()
            return answer[0].split('"')[1]

        assert status() == "OB DISCHRG"  # decided, inside its abort window: no LB, no FSD
        db.execute("UPDATE commands SET issued_at = now() - interval '61 s' WHERE id = %s",
                   (cmd,))
        assert status() == "OB LB FSD"  # the commit point
        # The grid is back, confirmed, but no client has read FSD since: it goes through.
        reading(db, soc=6, grid=True)
        db.execute("INSERT INTO policy_events (ts, kind, agent_id, command_id)"
                   " VALUES (now(), 'power_returned_after_commit', 'nas', %s)", (cmd,))
        assert status() == "OB LB FSD"
        # A client read it (executing) and every client logged out (the host halted).
        db.execute("INSERT INTO command_acks (command_id, agent_id, status, received_at)"
                   " VALUES (%s, 'nas', 'executing', now())", (cmd,))
        db.execute("INSERT INTO policy_events (ts, kind, agent_id)"
                   " VALUES (now(), 'agent_offline', 'nas')")
        assert status() == "OL"
