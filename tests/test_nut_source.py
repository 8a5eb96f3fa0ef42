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
                             "watts_out_sum": 85, "battery_temp_c": 24.5}
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
        upsd.write(dict(ON_BATTERY))
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
