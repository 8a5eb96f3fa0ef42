"""Each station's clock skew (issue 15, item 2): device time against when the collector
received each reading, as `ecoflow-policy status` and `ecoflow-collector doctor` show it (the
collector-health dashboard's panel is tested in test_dashboards.py). Real TimescaleDB."""

from __future__ import annotations

from collector.cloud.doctor import Report, station_clocks
from policy import cli, topology
from policy.settings import load_settings
from servicekit.clock_skew import describe, station_skews
from tests.test_policy_cli import env  # noqa: F401 (fixture)
from tests.test_policy_scenarios import SN

BEHIND = "R331ZEB4ZEA0099901"
NO_CLOCK = "R331ZEB4ZEA0099902"


def seed(db) -> None:
    """SN: clock 2 s behind; BEHIND: 3 hours behind; NO_CLOCK: every reading stamped on
    receipt (a payload without a device time). 30 readings each, one every 10 s, up to now."""
    for sn, behind in ((SN, "2 seconds"), (BEHIND, "3 hours"), (NO_CLOCK, "0 seconds")):
        db.execute(
            "INSERT INTO ecoflow_measurements (ts, received_at, device_sn, soc_min_percent,"
            " grid_connected, source, raw_data)"
            " SELECT t - %s::interval, t, %s, 50, true, 'simulator', '{}'"
            "   FROM generate_series(now() - interval '290 seconds', now(), interval '10 s') t",
            (behind, sn))
    # A row from another writer, without a receive time, counts nowhere.
    db.execute("INSERT INTO ecoflow_measurements (ts, device_sn, source, raw_data)"
               " VALUES (now() - interval '1 hour', %s, 'simulator', '{}')", (SN,))
    for sn, name in ((SN, "Study"), (BEHIND, None), (NO_CLOCK, None)):  # as the writer keeps it
        db.execute("INSERT INTO devices (device_sn, name) VALUES (%s, %s)"
                   " ON CONFLICT (device_sn) DO UPDATE SET name = excluded.name", (sn, name))


def test_station_skews_are_the_median_device_time_minus_receipt(db):
    seed(db)
    rows = {r["device_sn"]: r for r in station_skews(db)}
    assert set(rows) == {SN, BEHIND, NO_CLOCK}
    assert rows[SN]["skew_sec"] == -2 and rows[SN]["readings"] == 30
    assert rows[BEHIND]["skew_sec"] == -3 * 3600
    assert rows[NO_CLOCK]["skew_sec"] == 0 and rows[NO_CLOCK]["on_receipt"] == 30
    assert describe(rows[SN]) == "clock 2 s behind receipt (median of 30 readings)"
    assert describe(rows[BEHIND]) == "clock 3 h 0 min behind receipt (median of 30 readings)"
    assert describe(rows[NO_CLOCK]).startswith("no device time")


def test_doctor_shows_each_stations_clock(db, db_url):
    seed(db)
    report = Report()
    station_clocks(report, db_url)
    text = report.text()
    assert f'  ok    {SN} "Study": clock 2 s behind receipt' in text
    assert f"        {BEHIND}: clock 3 h 0 min behind receipt" in text
    assert "check the station's time" in text
    assert not report.problems  # a skew is shown, never a failure of the credentials check


def test_doctor_without_a_database_says_so(capsys):
    report = Report()
    station_clocks(report, "postgresql://nobody@127.0.0.1:1/none")
    assert "not checked: database not reachable" in report.text()


def test_policy_status_shows_each_stations_clock_skew(db, env, capsys):  # noqa: F811
    seed(db)
    topology.sync(db, load_settings())
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    header, line = [row for row in out.splitlines() if "clock_skew_s" in row or SN in row
                    or "Study" in row][:2]
    assert "clock_skew_s" in header
    assert line.split()[header.split().index("clock_skew_s")] == "-2"
