"""The snapshot merge through the real pipeline, writer and database: soc_min_percent is the
lowest SoC over every pack the snapshot knows, and a "not applicable" sentinel clears a column
until the device reports a real value again (issue 15, items 3 and 4)."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.decoders.nut import decode_vars
from collector.pipeline import Pipeline
from collector.proto import ecoflow_pb2 as pb
from collector.rows import SnapshotMerger
from collector.writer import Writer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "payloads"
S = timedelta(seconds=1)
_serials = itertools.count(1)


def fixture_payload(name: str) -> bytes:
    return json.dumps(json.loads((FIXTURES / name).read_text())["payload"]).encode()


class Station:
    """One station's messages through a real Pipeline and Writer into the database, each
    received one second after the previous one."""

    def __init__(self, pipeline: Pipeline, prefix: str, topic: str = "bridge-ecoflow/{}/data"):
        self.pipeline = pipeline
        self.sn = f"{prefix}{next(_serials):08d}"
        self.topic = topic.format(self.sn)
        self.t = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)
        self.sent = 0

    def send(self, payload: bytes) -> None:
        self.t += S
        assert self.pipeline.handle(payload, self.topic, "bridge", received_at=self.t) == 1
        self.sent += 1

    def stored(self, db, column: str) -> list:
        self.pipeline.writer.flush()
        rows = db.execute(f"SELECT {column} FROM ecoflow_measurements WHERE device_sn = %s"
                          " ORDER BY ts", (self.sn,)).fetchall()
        assert len(rows) == self.sent
        return [r[0] for r in rows]


@pytest.fixture
def pipeline(db_url):
    writer = Writer(db_url)
    yield Pipeline(writer)
    writer.stop()


def approx_list(values: list) -> list:
    return [None if v is None else pytest.approx(v, abs=0.01) for v in values]


# -- item 3: soc_min_percent over the packs the snapshot knows ---------------------------------

def test_a_message_without_packs_keeps_the_lowest_pack_not_the_headline_soc(pipeline, db):
    """The issue's sequence on real open-MQTT captures: bmsStatus (master 82.6) -> kitInfo
    (extra battery 26.25) -> emsStatus (headline 82.6). Before the fix the emsStatus row
    stored 82.6, hiding the extra battery at 26 % from the SoC trigger."""
    station = Station(pipeline, "R351ZSM", topic="/open/account/{}/quota")
    for name in ("delta2max_open_mqtt_4_bmsStatus.json", "delta2max_open_mqtt_7_kitInfo.json",
                 "delta2max_open_mqtt_5_emsStatus.json"):
        station.send(fixture_payload(name))
    assert station.stored(db, "soc_min_percent") == approx_list([82.6, 26.25, 26.25])
    assert station.stored(db, "soc_percent") == approx_list([82.6, 82.6, 82.6])


def test_headline_soc_is_soc_min_only_while_no_pack_is_known(pipeline, db):
    station = Station(pipeline, "R351ZSM", topic="/open/account/{}/quota")
    station.send(fixture_payload("delta2max_open_mqtt_5_emsStatus.json"))  # headline 82.6
    station.send(fixture_payload("delta2max_open_mqtt_7_kitInfo.json"))  # kit 26.25
    station.send(fixture_payload("delta2max_open_mqtt_1_pdStatus.json"))  # pd.soc 83
    assert station.stored(db, "soc_min_percent") == approx_list([82.6, 26.25, 26.25])


def test_gen3_cms_heartbeat_does_not_reset_soc_min_to_the_headline(pipeline, db):
    station = Station(pipeline, "R631ZSM")

    def send(*messages):
        headers = [pb.Header(pdata=m.SerializeToString(), cmd_func=f, cmd_id=i, src=2)
                   for m, f, i in messages]
        station.send(pb.HeaderMessage(header=headers).SerializeToString())

    send((pb.BmsHeartbeat(num=0, soc=70), 32, 50), (pb.BmsHeartbeat(num=1, soc=20), 32, 50))
    send((pb.CmsHeartbeat(status=pb.CmsStatus(lcd_show_soc=45)), 32, 2))
    send((pb.DisplayPropertyUpload(cms_batt_soc=44.0), 254, 21))
    assert station.stored(db, "soc_min_percent") == approx_list([20, 20, 20])
    assert station.stored(db, "soc_percent") == approx_list([None, 45, 44])


def test_ups_low_battery_zero_is_stored_although_packs_are_known(pipeline, db):
    """NUT's `OB LB` is the UPS saying the battery is done (soc_min 0, see the NUT decoder):
    an explicit value, not a headline fallback, so packs known from the cloud do not hide it."""
    station = Station(pipeline, "R631ZSM")
    station.send(json.dumps({"id": 1, "params": {"bms_bmsStatus.soc": 40}}).encode())
    reading = decode_vars("river", {"ups.status": "OB LB", "battery.charge": "40"},
                          device_sn=station.sn)
    station.t += S
    pipeline.handle_readings([reading], b"LIST VAR", None, "nut", received_at=station.t)
    station.sent += 1
    online = decode_vars("river", {"ups.status": "OL", "battery.charge": "41"},
                         device_sn=station.sn)
    station.t += S
    pipeline.handle_readings([online], b"LIST VAR", None, "nut", received_at=station.t)
    station.sent += 1
    # Back on line, the UPS's charge is a headline: the known pack (40) is the minimum again.
    assert station.stored(db, "soc_min_percent") == approx_list([40, 0, 40])


# Random orders of pack and headline messages, per family: each entry makes (payload, packs the
# message reports by our pack name, headline SoC it reports or None).

def _gen2(kind: str, slot: int, soc: float, n: int):
    if kind == "master":
        return {"bms_bmsStatus.f32ShowSoc": soc}, {"master": soc}, soc
    if kind == "slave":
        return {"bms_slave.soc": soc}, {"slave1": soc}, None
    if kind == "kit":
        kits = [{"avaFlag": 0, "soc": 0}, {"avaFlag": 0, "soc": 0}]
        kits[slot] = {"avaFlag": 1, "f32Soc": soc, "soc": round(soc)}
        return {"bms_kitInfo.watts": kits}, {f"kit{slot + 1}": soc}, None
    if kind == "ems":
        return {"bms_emsStatus.f32LcdShowSoc": soc}, {}, soc
    if kind == "pd":
        return {"pd.soc": soc}, {}, soc
    return {"pd.wattsOutSum": n}, {}, None


def _gen1(kind: str, slot: int, soc: float, n: int):
    if kind == "master":
        return {"bmsMaster.f32ShowSoc": soc}, {"master": soc}, None
    if kind in ("slave", "kit"):
        return {f"bmsSlave{slot + 1}.soc": soc}, {f"slave{slot + 1}": soc}, None
    if kind in ("ems", "pd"):
        return {"ems.f32LcdShowSoc": soc}, {}, soc
    return {"pd.wattsOutSum": n, "ems.dsgCmd": 1}, {}, None


def _gen3(kind: str, slot: int, soc: float, n: int):
    if kind in ("master", "slave", "kit"):
        num = {"master": 0, "slave": 1, "kit": 2 + slot}[kind]
        return (pb.BmsHeartbeat(num=num, soc=int(soc)), 32, 50), {f"pack{num}": int(soc)}, None
    if kind == "ems":
        cms = pb.CmsHeartbeat(status=pb.CmsStatus(lcd_show_soc=int(soc)))
        return (cms, 32, 2), {}, int(soc)
    if kind == "pd":
        return (pb.DisplayPropertyUpload(cms_batt_soc=soc), 254, 21), {}, soc
    return (pb.DisplayPropertyUpload(pow_out_sum_w=float(n)), 254, 21), {}, None


FAMILIES = {"R351": _gen2, "DAEB": _gen1, "R631": _gen3}

messages = st.lists(
    st.tuples(st.sampled_from(["master", "slave", "kit", "ems", "pd", "other"]),
              st.integers(0, 1), st.integers(0, 200).map(lambda x: x / 2), st.integers(0, 500)),
    min_size=1, max_size=12,
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(family=st.sampled_from(sorted(FAMILIES)), sequence=messages)
def test_every_stored_soc_min_is_the_minimum_over_the_packs_known_so_far(pipeline, db, family,
                                                                         sequence):
    make = FAMILIES[family]
    station = Station(pipeline, family)
    packs: dict[str, float] = {}
    headline = None
    expected = []
    for n, (kind, slot, soc, watts) in enumerate(sequence):
        content, reported, head = make(kind, slot, soc, watts)
        if family == "R631":
            message, func, cmd = content
            header = pb.Header(pdata=message.SerializeToString(), cmd_func=func, cmd_id=cmd,
                               src=2, seq=n)
            station.send(pb.HeaderMessage(header=[header]).SerializeToString())
        else:
            station.send(json.dumps({"id": n, "params": content}).encode())
        packs.update(reported)
        headline = head if head is not None else headline
        expected.append(min(packs.values()) if packs else headline)
    assert station.stored(db, "soc_min_percent") == approx_list(expected)


# -- item 4: "not applicable" sentinels clear the stored value ---------------------------------

def test_remaining_time_sentinel_clears_the_stored_runtime_until_a_real_value(pipeline, db):
    """Real captures under one serial: a Delta 2 discharging (pd.remainTime -132), then an
    emsStatus saying 5999 (not discharging), then a message about PV only, then a real
    discharge figure. Before the fix the 132 minutes stayed in every later row."""
    station = Station(pipeline, "R331ZSM", topic="/open/account/{}/quota")
    station.send(fixture_payload("delta2_app_mqtt_1.json"))
    station.send(fixture_payload("delta2max_open_mqtt_5_emsStatus.json"))
    station.send(fixture_payload("delta2max_open_mqtt_2_mpptStatus.json"))
    station.send(json.dumps({"typeCode": "pdStatus", "params": {"remainTime": -45}}).encode())
    assert station.stored(db, "remain_time_min") == [132, None, None, 45]
    # Only the sentinel's column is cleared: the rest of the snapshot is carried over.
    assert station.stored(db, "watts_out_sum") == [344, 344, 344, 344]


@pytest.mark.parametrize(("family", "discharging", "not_applicable"), [
    ("DAEB", {"ems.dsgRemainTime": 12}, {"ems.dsgRemainTime": 5999}),
    ("R621", {"bms_emsStatus.dsgRemainTime": 12}, {"bms_emsStatus.dsgRemainTime": 5999}),
    ("R621", {"pd.remainTime": -12}, {"pd.remainTime": 5999}),
    ("MR51", {"cmsBattSoc": 50, "cmsDsgRemTime": 12}, {"cmsBattSoc": 50, "cmsDsgRemTime": 5939}),
    ("MR51", {"cmsBattSoc": 50, "cmsDsgRemTime": 12},
     {"cmsBattSoc": 50, "cmsDsgRemTime": 0, "cmsChgDsgState": 2}),
    ("HW51", {"20_1.dsgRemainTime": 12}, {"20_1.dsgRemainTime": 5999}),
])
def test_charging_station_stops_showing_the_last_discharge_runtime(pipeline, db, family,
                                                                   discharging, not_applicable):
    station = Station(pipeline, family)
    station.send(json.dumps({"id": 1, "params": discharging}).encode())
    station.send(json.dumps({"id": 2, "params": not_applicable}).encode())
    assert station.stored(db, "remain_time_min") == [12, None]


def test_merger_clears_a_column_reported_not_applicable_and_keeps_the_others():
    merger = SnapshotMerger()
    merger.merge("SN", {"remain_time_min": 12, "soc_percent": 50})
    assert merger.merge("SN", {"remain_time_min": None}) == {"soc_percent": 50}
    assert merger.merge("SN", {"watts_out_sum": 5}) == {"soc_percent": 50, "watts_out_sum": 5}
    assert merger.merge("SN", {"remain_time_min": 30}) == {
        "soc_percent": 50, "watts_out_sum": 5, "remain_time_min": 30}
