"""The simulator's stations, in their native formats, go through the broker and the collector
into the database, and the outage scenario plays out."""

from __future__ import annotations

import time

from collector.decoders import decode
from collector.service import Collector
from collector.settings import CollectorSettings
from collector.sources.simulator import SCENARIOS, Simulator, Station, default_stations
from servicekit.settings import DatabaseSettings
from tests.collector_support import wait_rows


def test_each_station_payload_decodes_as_its_family():
    families = {}
    for st in default_stations("steady"):
        [reading] = decode(st.payload(), topic=f"bridge-ecoflow/{st.sn}/data")
        families[st.family] = reading.family
        assert reading.device_sn == st.sn
        assert reading.values["grid_connected"] is True
    assert families == {"deltamax": "delta_gen1", "delta2": "delta_gen2", "river3": "gen3"}


def test_outage_scenario_discharges_to_the_low_soc_and_recovers():
    st = Station("SN", "delta2", capacity_wh=1000, soc=50, scenario=SCENARIOS["outage"])
    seen_grid, lowest = [], st.soc
    while st.phase_index < len(st.scenario) - 1:
        st.step(10)
        seen_grid.append(st.phase.grid)
        lowest = min(lowest, st.soc)
    # Down past the low mark (8 %), then on battery a while longer before the grid returns.
    assert 0 < lowest < 8
    assert False in seen_grid and seen_grid[-1] is True
    for _ in range(100):
        st.step(60)
    assert st.soc > 50


def test_simulated_stations_reach_the_database_labelled_simulator(db_url, mqtt_broker, db):
    settings = CollectorSettings(MQTT_HOST=mqtt_broker.host, MQTT_PORT=mqtt_broker.port,
                                 EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.2,
                                 COLLECTOR_CLIENT_ID="collector-simulator-test")
    collector = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
    collector.start()
    assert collector.sources[0].subscribed.wait(10)
    sim = Simulator(default_stations("outage"), mqtt_broker.host, mqtt_broker.port,
                    interval=0.05, accel=200, client_id="simulator-test")
    sim.start()
    try:
        wait_rows(db_url, 300, timeout=30)
    finally:
        sim.stop()
        time.sleep(0.5)
        collector.stop()
    rows = db.execute(
        "SELECT device_sn, count(*), bool_or(NOT grid_connected), min(soc_min_percent),"
        " bool_and(source = 'simulator') FROM ecoflow_measurements GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert len(rows) == 3
    start_soc = {st.sn: st.soc for st in default_stations("outage")}
    for sn, count, had_outage, soc_min, all_simulator in rows:
        assert count >= 50 and had_outage and all_simulator
        assert soc_min < start_soc[sn]  # discharging on battery
