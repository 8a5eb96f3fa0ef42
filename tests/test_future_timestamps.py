"""Readings that claim a time in the future (issue 15, item 9).

A station's clock jumps ahead for one message: that reading claims ts = now + 4 min. Ordered
by the station's clock it stayed "the latest" until the clock caught up, and the policy saw
its grid and SoC instead of the real ones that arrived after it. The latest reading is the
one received last (SAFETY S1: decide by received time); the collector bounds what a device
clock may claim. Real TimescaleDB, real Mosquitto."""
# ruff: noqa: F401, F811 (the scenario fixtures `agents` and `make_policy` are imported)

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from collector.pipeline import MAX_CLOCK_AHEAD, Pipeline
from collector.rows import SnapshotMerger
from tests.test_policy_field import insert_from_clock
from tests.test_policy_scenarios import (
    LONG_TTL,
    SN,
    agent_name,
    agents,
    at,
    draining,
    make_policy,
    series,
)

PAYLOADS = Path(__file__).resolve().parent / "fixtures" / "payloads"


def insert_received(db, sn: str, ts_sec: float, received_sec: float, soc: float,
                    grid: bool) -> None:
    db.execute("INSERT INTO ecoflow_measurements (ts, received_at, device_sn, soc_percent,"
               " soc_min_percent, grid_connected, source, raw_data)"
               " VALUES (%s, %s, %s, %s, %s, %s, 'simulator', '{}')",
               (at(ts_sec), at(received_sec), sn, soc, soc, grid))


def test_a_reading_from_the_future_does_not_hide_the_real_latest_state(db, make_policy,
                                                                        agents):
    """On grid at 80 % until t=300. At t=300.5 one message claims t=540 (4 min ahead) with
    the grid on at 90 %; at t=310 the real reading says grid off, 40 %. The policy must see
    the grid off and 40 % at once, not the future reading until the clock reaches t=540."""
    agent = agent_name()
    insert_from_clock(db, SN, series(0, 300, 10, 80, True), timedelta(0))
    insert_received(db, SN, 300 + 240, 300.5, 90, True)
    insert_received(db, SN, 310, 310, 40, False)
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    view, = policy.worker.step(at(311))
    supply, = view.supplies
    assert supply["grid_on"] is False, "the reading from the future hides the grid loss"
    assert supply["on_battery"] is True
    assert supply["soc"] == 40
    assert supply["last_ts"] == at(310)
    assert supply["freshness"] == "fresh"
    assert supply["clock_offset_sec"] == 0


def test_a_reading_from_the_future_changes_no_shutdown(db, make_policy, agents):
    """The same glitch inside an outage: the shutdown comes at the same moment as without it
    (SoC at or below 15 % from t=2010, debounce 60 s), and the episode is the same."""
    agent = agent_name()
    insert_from_clock(db, SN, series(0, 50, 10, 80, True)
                      + series(60, 2200, 10, draining(80, 2, 60), False), timedelta(0))
    # At t=1900.5 a message claims t=2140, grid on, 95 %.
    insert_received(db, SN, 2140.2, 1900.5, 95, True)
    policy = make_policy({SN: [agent]}, command_ttl_sec=LONG_TTL)
    policy.run_until(1950)
    view, = policy.worker.step(at(policy.t))
    supply, = view.supplies
    assert supply["grid_on"] is False and supply["on_battery"] is True
    assert supply["soc"] < 20
    policy.run_until(2200)
    (_, _, _, episode, _, _, _), = policy.commands("shutdown")
    assert policy.first_command_time() == at(2010 + 60)
    assert episode == f"{SN}-{int(at(60).timestamp())}"


def test_the_collector_bounds_what_a_device_clock_may_claim():
    """A device stamp more than MAX_CLOCK_AHEAD ahead of the receive time is not believed: the
    reading is stored at its receive time (and received_at says when that was). A stamp within
    the bound is kept as the station said it; the policy then orders by received time
    (above), so it cannot stand for the station's latest state."""

    class Writer:  # the pipeline's side of the writer, without a database
        def __init__(self):
            self.rows = []
            self.snapshots = SnapshotMerger()

        def add_rows(self, rows, on_commit=None):
            self.rows.extend(rows)

    document = json.loads((PAYLOADS / "river2pro_app_mqtt_2.json").read_text())
    received = datetime(2024, 1, 3, 10, 43, 15, tzinfo=timezone.utc)
    writer = Writer()
    pipeline = Pipeline(writer)
    aheads = (timedelta(0), MAX_CLOCK_AHEAD - timedelta(seconds=1),
              MAX_CLOCK_AHEAD + timedelta(seconds=1), timedelta(hours=3))
    for ahead in aheads:
        payload = dict(document["payload"], timestamp=int((received + ahead).timestamp()))
        assert pipeline.handle(json.dumps(payload).encode(), document["topic"], "app_mqtt",
                               received_at=received) == 1
    assert [r.ts - received for r in writer.rows] == [
        timedelta(0), MAX_CLOCK_AHEAD - timedelta(seconds=1), timedelta(0), timedelta(0)]
    assert all(r.received_at == received for r in writer.rows)
