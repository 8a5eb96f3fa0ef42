"""The NUT source against a real upsd with the dummy-ups driver: a UPS going on battery and low
shows up in the readings."""

from __future__ import annotations

import time

import pytest

from collector.decoders.nut import decode_vars
from collector.service import Collector
from collector.settings import CollectorSettings
from collector.sources.nut import NutError, list_vars
from servicekit.settings import DatabaseSettings
from testbed.nut import NutNotFound, NutServer
from tests.collector_support import wait_rows

ONLINE = {"battery.charge": "97", "battery.runtime": "5400", "ups.status": "OL",
          "input.voltage": "230.0", "ups.realpower": "85", "battery.temperature": "24.5",
          "ups.serial": "R631ZEB4WH000777", "device.mfr": "EcoFlow", "device.model": "River 3 Plus"}
ON_BATTERY = {**ONLINE, "battery.charge": "18", "battery.runtime": "840", "ups.status": "OB LB",
              "input.voltage": "0.0"}


@pytest.fixture
def upsd():
    try:
        server = NutServer(dict(ONLINE)).start()
    except NutNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


def test_nut_variables_map_to_columns():
    online = decode_vars("river", ONLINE)
    assert online.device_sn == "R631ZEB4WH000777" and online.model == "EcoFlow River 3 Plus"
    assert online.values == {"soc_percent": 97.0, "soc_min_percent": 97.0, "grid_connected": True,
                             "watts_out_sum": 85, "battery_temp_c": 24.5,
                             "remain_time_min": None}  # on line: the last outage's runtime clears
    low = decode_vars("river", ON_BATTERY, device_sn="MY-SN")
    assert low.device_sn == "MY-SN"
    assert low.values["grid_connected"] is False and low.values["remain_time_min"] == 14


def test_load_percentage_gives_power_when_realpower_is_missing():
    v = {"ups.status": "OB", "ups.load": "25", "ups.realpower.nominal": "600"}
    assert decode_vars("u", v).values == {"grid_connected": False, "watts_out_sum": 150}


def test_list_var_reads_the_real_upsd(upsd):
    variables, raw = list_vars(upsd.host, upsd.port, upsd.ups)
    assert variables["battery.charge"] == "97" and variables["ups.status"] == "OL"
    assert raw.startswith(b"BEGIN LIST VAR")


def test_unknown_ups_name_is_a_clear_error(upsd):
    with pytest.raises(NutError, match="NUT_UPS"):
        list_vars(upsd.host, upsd.port, "nosuchups")


def test_ups_going_on_battery_is_stored_from_the_nut_source(upsd, db_url, db, mqtt_broker):
    settings = CollectorSettings(COLLECTOR_SOURCES="nut", NUT_HOST=upsd.host, NUT_PORT=upsd.port,
                                 NUT_UPS=upsd.ups, NUT_POLL_SEC=0.3, EXPORTER_PORT=0,
                                 FLUSH_INTERVAL_SEC=0.2, MQTT_HOST=mqtt_broker.host,
                                 MQTT_PORT=mqtt_broker.port)
    c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
    c.start()
    try:
        wait_rows(db_url, 2)
        # As the River 3 Plus did: on battery and low, with input.voltage still at 230 V.
        upsd.write({**ON_BATTERY, "input.voltage": "230.0"})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            row = db.execute("SELECT grid_connected FROM ecoflow_latest").fetchone()
            if row and row[0] is False:
                break
            time.sleep(0.2)
    finally:
        c.stop()
    latest = db.execute("SELECT device_sn, soc_percent, grid_connected, remain_time_min, source"
                        " FROM ecoflow_latest").fetchone()
    assert latest == ("R631ZEB4WH000777", 18.0, False, 14, "nut")
    assert db.execute("SELECT bool_or(grid_connected) FROM ecoflow_measurements").fetchone() == (
        True,)
    # OB LB: the UPS says the battery is done, so the value decisions use is 0 (see the decoder).
    assert db.execute("SELECT soc_min_percent FROM ecoflow_measurements ORDER BY ts DESC"
                      " LIMIT 1").fetchone() == (0.0,)


# Status flags are what the UPS knows; input.voltage is only a measurement, and some drivers
# keep reporting the last value (or the nominal one) while the UPS runs on battery.

def test_low_battery_on_battery_wins_over_a_stale_input_voltage():
    """A River 3 Plus reported `OB LB` with input.voltage still at 230 V: it is on battery."""
    low = decode_vars("river", {**ON_BATTERY, "input.voltage": "230.0"})
    assert low.values["grid_connected"] is False


def test_online_flag_wins_over_a_zero_input_voltage():
    assert decode_vars("u", {"ups.status": "OL", "input.voltage": "0"}).values[
        "grid_connected"] is True


@pytest.mark.parametrize("volts, grid", [("230.0", True), ("0.0", False)])
def test_input_voltage_decides_only_when_there_are_no_status_flags(volts, grid):
    assert decode_vars("u", {"input.voltage": volts}).values["grid_connected"] is grid
    assert decode_vars("u", {"input.voltage": volts, "ups.status": ""}).values[
        "grid_connected"] is grid


@pytest.mark.parametrize("status, grid, low", [
    ("OL", True, False),
    ("OL CHRG", True, False),
    ("OL BOOST", True, False),
    ("OL TRIM", True, False),
    ("OB", False, False),
    ("OB DISCHRG", False, False),
    ("OB LB", False, True),
    ("OB LB RB", False, True),
    ("OB DISCHRG LB", False, True),
    ("FSD OB LB", False, True),
    ("FSD OL", False, True),
    ("OL LB", True, False),  # charging after an outage: low SoC on grid is never a trigger (S3)
])
def test_status_flag_variants(status, grid, low):
    r = decode_vars("u", {"ups.status": status, "battery.charge": "40", "input.voltage": "120"})
    assert r.values["grid_connected"] is grid
    assert r.values["soc_percent"] == 40.0
    assert r.values["soc_min_percent"] == (0.0 if low else 40.0)


def test_low_battery_without_a_charge_reading_is_still_empty():
    assert decode_vars("u", {"ups.status": "OB LB"}).values == {
        "grid_connected": False, "soc_min_percent": 0.0}


def test_low_battery_flag_fires_the_soc_trigger_above_the_threshold(db):
    """The UPS says LB at 40 % charge (its own low-battery point is above our threshold): the
    policy's SoC trigger fires after the debounce, as for a battery at the threshold."""
    from policy import topology
    from policy.rules import supply_rows
    from policy.settings import PolicySettings
    from tests.test_policy_scenarios import at

    settings = PolicySettings(POLICY_SOC_MIN=10, POLICY_DEBOUNCE_SEC=60,
                              DEVICE_TO_AGENTS_JSON='{"R631ZEB4WH000777": ["nas-01"]}')
    topology.sync(db, settings)
    flags = ["OL"] * 3 + ["OB DISCHRG"] * 3 + ["OB LB"] * 20
    for i, status in enumerate(flags):
        r = decode_vars("river", {**ONLINE, "ups.status": status, "battery.charge": "40"})
        db.execute("INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent,"
                   " grid_connected, source, raw_data) VALUES (%s, %s, %s, %s, %s, 'nut', '{}')",
                   (at(i * 5), r.device_sn, r.values["soc_percent"], r.values["soc_min_percent"],
                    r.values["grid_connected"]))
    lb_since = at(flags.index("OB LB") * 5)
    (row,) = supply_rows(db, at(len(flags) * 5), settings.rule_params())
    assert row["soc"] == 0 and row["soc_low_since"] == lb_since
    assert row["trigger"] == "soc"
