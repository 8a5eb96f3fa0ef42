"""Battery health per pack: what each family reports about its packs is stored as reported,
through the real pipeline and writer, into `battery_packs`; the daily view, the read-only role
and the "SoH dropping fast" alert read it (docs/battery-health.md)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from collector.decode_cli import payload_from_fixture
from collector.decoders.pack_health import COLUMNS
from collector.pipeline import Pipeline
from collector.proto import ecoflow_pb2 as pb
from collector.writer import Writer
from testbed.grafana_sql import expand
from tests.services import READONLY_PASSWORD, READONLY_USER
from tests.test_decoders_families import protobuf_payload

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ROOT = FIXTURES.parent.parent
ALERT_FILE = ROOT / "grafana" / "provisioning" / "alerting" / "battery-health.yaml"
FALLBACK_SN = "TESTSN0001"

# The BMS's own names for each column (gen-1 / gen-2 JSON after the pack prefix, gen-3 BMS
# heartbeat fields).
BMS_KEYS = {"soh_percent": "soh", "cycles": "cycles", "full_cap_mah": "fullCap",
            "design_cap_mah": "designCap", "cell_mv_min": "minCellVol",
            "cell_mv_max": "maxCellVol", "temp_c_min": "minCellTemp",
            "temp_c_max": "maxCellTemp"}
GEN3_SUMMARY_KEYS = {"soh_percent": "bmsBattSoh", "cycles": "bmsCycles",
                     "full_cap_mah": "bmsFullCap", "design_cap_mah": "bmsDesignCap",
                     "cell_mv_min": "bmsMinCellVol", "cell_mv_max": "bmsMaxCellVol",
                     "temp_c_min": "bmsMinCellTemp", "temp_c_max": "bmsMaxCellTemp"}

# JSON captures: fixture, where its key map is, the pack, the key prefix of that pack.
JSON_CASES = {
    "delta2 (gen 2, app push)": ("payloads/delta2_app_mqtt_1.json", ("data", "quotaMap"), "master",
                                 "bms_bmsStatus."),
    "delta2max (gen 2, app push)": ("payloads/delta2max_app_mqtt_1.json", ("data", "quotaMap"),
                                    "master", "bms_bmsStatus."),
    "delta2max (gen 2, open bmsStatus)": ("payloads/delta2max_open_mqtt_4_bmsStatus.json",
                                          ("params",), "master", ""),
    "river2pro (gen 2, app push)": ("payloads/river2pro_app_mqtt_1.json", ("data", "quotaMap"),
                                    "master", "bms_bmsStatus."),
    "deltamax (gen 1 bmsMaster)": ("payloads/deltamax_app_mqtt_1.json", ("data", "quotaMap"), "master",
                                   "bmsMaster."),
    "rivermax (gen 1 bmsMaster)": ("families/rivermax_app_mqtt_4_bmsMaster.json", ("params",),
                                   "master", "bmsMaster."),
    "rivermax (gen 1 bmsSlave1)": ("families/rivermax_app_mqtt_2_bmsSlave1.json", ("params",),
                                   "slave1", "bmsSlave1."),
    "riverpro (gen 1 latestQuotas)": ("families/riverpro_app_mqtt_1_latest_quotas.json",
                                      ("data", "quotaMap"), "master", "bmsMaster."),
}

# Gen-3 BMS heartbeats (protobuf, encoded with our schema as the collector would receive them).
HEARTBEATS = ["delta3_protobuf_4_bms_heartbeat_pack0.json",
              "delta3_protobuf_5_bms_heartbeat_pack1.json",
              "river3plus_protobuf_1_bms_heartbeat_pack0.json",
              "river3plus_protobuf_2_bms_heartbeat_pack1.json",
              "streamacpro_protobuf_3_bms_heartbeat.json",
              "streamultra_protobuf_3_bms_heartbeat.json"]
CARRIED = set(pb.BmsHeartbeat.DESCRIPTOR.fields_by_camelcase_name)


def load(relative: str) -> dict[str, Any]:
    return json.loads((FIXTURES / relative).read_text())


def store(db_url: str, payload: bytes, topic: str | None, source: str = "app_mqtt") -> None:
    """The payload through the collector's own pipeline and writer, committed."""
    writer = Writer(db_url)
    assert Pipeline(writer).handle(payload, topic, source, device_sn=FALLBACK_SN) == 1
    writer.flush()
    writer.stop()


def stored_packs(db) -> dict[str, dict[str, Any]]:
    rows = db.execute(f"SELECT pack, {', '.join(COLUMNS)} FROM battery_packs").fetchall()
    return {r[0]: dict(zip(COLUMNS, r[1:])) for r in rows}


def assert_reported(stored: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sum(v is not None for v in expected.values()) >= 3, "a fixture without pack data"
    assert stored == expected


@pytest.mark.parametrize("case", JSON_CASES, ids=list(JSON_CASES))
def test_json_families_store_every_health_column_the_pack_reported(db_url, db, case):
    name, path, pack, prefix = JSON_CASES[case]
    document = load(name)
    payload, topic = payload_from_fixture(document)
    store(db_url, payload, topic)
    reported = document["payload"]
    for step in path:
        reported = reported[step]
    expected = {column: reported.get(prefix + key) for column, key in BMS_KEYS.items()}
    assert_reported(stored_packs(db)[pack], expected)
    assert set(stored_packs(db)) == {pack}


def test_river_max_without_soh_in_its_payload_stores_none_rather_than_a_guess(db_url, db):
    document = load("families/rivermax_app_mqtt_4_bmsMaster.json")
    assert "bmsMaster.soh" not in document["payload"]["params"]
    store(db_url, *payload_from_fixture(document))
    pack = stored_packs(db)["master"]
    assert pack["soh_percent"] is None and pack["design_cap_mah"] is None
    assert pack["cycles"] == document["payload"]["params"]["bmsMaster.cycles"]


@pytest.mark.parametrize("name", HEARTBEATS)
def test_gen3_bms_heartbeats_store_what_the_schema_carries_per_pack(db_url, db, name):
    document = load(f"families/{name}")
    message = document["message"]
    store(db_url, protobuf_payload(document), document.get("topic"), "open_mqtt")
    expected = {column: message.get(key) if key in CARRIED else None
                for column, key in BMS_KEYS.items()}
    assert_reported(stored_packs(db)[f"pack{message['num']}"], expected)


def test_delta3_plus_wire_capture_stores_its_pack_and_the_bms_summary(db_url, db):
    """Real bytes: a latestQuotas reply of four headers, one of them a BMS heartbeat."""
    document = load("payloads/delta3plus_protobuf_1_get_reply.json")
    facts = document["facts"]
    store(db_url, *payload_from_fixture(document))
    heartbeat, runtime = facts["bms_heartbeat_32_50"], facts["runtime_254_22"]
    packs = stored_packs(db)
    assert packs[f"pack{heartbeat['num_f1']}"] == {
        **dict.fromkeys(COLUMNS), "cycles": heartbeat["cycles_f14"],
        "full_cap_mah": heartbeat["full_cap_f13"], "design_cap_mah": heartbeat["design_cap_f11"]}
    assert packs["bms"] == {**dict.fromkeys(COLUMNS),
                            "full_cap_mah": runtime["bms_full_cap_mah_f247"]}


def test_delta_pro3_rest_stores_the_bms_summary_it_reports(db_url, db):
    document = load("payloads/deltapro3_rest_quota_all_1.json")
    store(db_url, *payload_from_fixture(document), source="rest")
    reported = document["payload"]["quota_all"]
    expected = {column: reported.get(key) for column, key in GEN3_SUMMARY_KEYS.items()}
    assert_reported(stored_packs(db)["bms"], expected)


def test_a_message_without_pack_data_writes_no_pack_row(db_url, db):
    document = load("payloads/delta2max_open_mqtt_1_pdStatus.json")
    store(db_url, *payload_from_fixture(document))
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM battery_packs").fetchone() == (0,)


def test_pack_row_has_the_readings_time_and_a_redelivery_stores_it_once(db_url, db):
    document = load("families/rivermax_app_mqtt_4_bmsMaster.json")  # stamped by the device
    payload, topic = payload_from_fixture(document)
    writer = Writer(db_url)
    pipeline = Pipeline(writer)
    for _ in range(2):
        pipeline.handle(payload, topic, "app_mqtt", device_sn=FALLBACK_SN)
        writer.flush()
    writer.stop()
    assert db.execute(
        "SELECT count(*), bool_and(b.ts = m.ts AND b.device_sn = m.device_sn)"
        "  FROM battery_packs b, ecoflow_measurements m").fetchone() == (1, True)


def test_two_messages_about_a_pack_at_one_time_fill_each_others_gaps(db_url, db):
    """App pushes carry whole seconds: a bmsStatus with SoH and one with cycles may share one."""
    base = {"id": 1, "version": "1.0", "timestamp": 1767225600000}
    first = {**base, "params": {"bms_bmsStatus.soh": 97, "bms_bmsStatus.fullCap": 38800}}
    second = {**base, "id": 2, "params": {"bms_bmsStatus.cycles": 311,
                                          "bms_bmsStatus.fullCap": 38790}}
    writer = Writer(db_url)
    pipeline = Pipeline(writer)
    for message in (first, second):
        pipeline.handle(json.dumps(message).encode(), "/app/device/property/R331ZEB4ZEA0012345",
                        "app_mqtt")
        writer.flush()
    writer.stop()
    assert stored_packs(db)["master"] == {**dict.fromkeys(COLUMNS), "soh_percent": 97,
                                          "cycles": 311, "full_cap_mah": 38790}


def test_a_soh_of_zero_is_not_measured_and_is_not_stored(db_url, db):
    message = {"id": 1, "version": "1.0", "timestamp": 1767225600000,
               "params": {"bms_bmsStatus.soh": 0, "bms_bmsStatus.cycles": 3}}
    store(db_url, json.dumps(message).encode(), "/app/device/property/R331ZEB4ZEA0012345")
    assert stored_packs(db)["master"]["soh_percent"] is None


# -- the daily view, the reader, the alert ---------------------------------------------------
def seed_history(db, sn: str, pack: str, points: list[tuple[timedelta, float, int]]) -> None:
    """SoH and cycles `ago` before now, with a 12 mV cell spread."""
    for ago, soh, cycles in points:
        db.execute("INSERT INTO battery_packs (ts, device_sn, pack, soh_percent, cycles,"
                   " cell_mv_min, cell_mv_max) VALUES (now() - %s, %s, %s, %s, %s, 3300, 3312)",
                   [ago, sn, pack, soh, cycles])


def test_daily_view_has_the_lowest_soh_most_cycles_and_mean_spread_per_pack_and_day(db):
    day = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
    db.execute("SET TIME ZONE 'UTC'")
    for hour, soh, cycles, low, high in [(0, 98, 40, 3300, 3310), (1, 97, 41, 3300, 3320),
                                         (25, 96, 42, 3290, 3292)]:
        db.execute("INSERT INTO battery_packs (ts, device_sn, pack, soh_percent, cycles,"
                   " cell_mv_min, cell_mv_max, temp_c_min, temp_c_max)"
                   " VALUES (%s, 'SN1', 'master', %s, %s, %s, %s, 20, 31)",
                   [day + timedelta(hours=hour), soh, cycles, low, high])
    rows = db.execute("SELECT day, soh_min_percent, cycles_max, cell_mv_spread_avg,"
                      " cell_mv_spread_max, temp_c_max, reports FROM battery_health_daily"
                      " WHERE device_sn = 'SN1' AND pack = 'master' ORDER BY day").fetchall()
    assert rows == [(datetime(2026, 3, 1, tzinfo=timezone.utc), 97, 41, 15, 20, 31, 2),
                    (datetime(2026, 3, 2, tzinfo=timezone.utc), 96, 42, 2, 2, 31, 1)]


def test_the_read_only_role_reads_pack_health_and_cannot_write_it(pg_server, db_url, db):
    seed_history(db, "SN1", "master", [(timedelta(days=1), 99, 10)])
    name = db_url.rsplit("/", 1)[1]
    url = pg_server.url(name).replace("postgres@", f"{READONLY_USER}:{READONLY_PASSWORD}@", 1)
    with psycopg.connect(url, autocommit=True) as reader:
        assert reader.execute("SELECT count(*) FROM battery_packs").fetchone() == (1,)
        assert reader.execute("SELECT reports FROM battery_health_daily").fetchone() == (1,)
        reader.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute("DELETE FROM battery_packs")


def soh_alert(db) -> dict[tuple, float]:
    """The "SoH dropping fast" rule's query as Grafana runs it, and its threshold applied:
    the (device_sn, pack, station) that fire, with their drop."""
    rule = yaml.safe_load(ALERT_FILE.read_text())["groups"][0]["rules"][0]
    query = next(n for n in rule["data"] if n["datasourceUid"] != "__expr__")
    threshold = next(n for n in rule["data"] if n["refId"] == rule["condition"])
    evaluator = threshold["model"]["conditions"][0]["evaluator"]
    assert evaluator["type"] == "gt"
    now = db.execute("SELECT now()").fetchone()[0]
    span = query["relativeTimeRange"]
    sql = expand(query["model"]["rawSql"], now - timedelta(seconds=span["from"]), now)
    cur = db.execute(sql)
    names = [c.name for c in cur.description]
    value = names.index("soh_drop")
    return {tuple(v for i, v in enumerate(row) if i != value): row[value]
            for row in cur.fetchall() if row[value] > evaluator["params"][0]}


def test_soh_alert_fires_for_a_drop_of_more_than_two_points_in_30_days(db):
    days = timedelta(days=1)
    seed_history(db, "SNFAST", "master", [(29 * days, 98, 100), (10 * days, 97, 120),
                                          (timedelta(minutes=5), 95, 140)])
    seed_history(db, "SNFAST", "slave1", [(29 * days, 98, 100), (timedelta(minutes=5), 96, 140)])
    # Slow wear: 100 -> 94 over a year, never more than 2 points within 30 days.
    seed_history(db, "SNSLOW", "master", [(d * days, 100 - (365 - d) / 61, 0)
                                          for d in range(365, 0, -5)])
    # Recovered: the BMS recalibrated upwards after a dip.
    seed_history(db, "SNBACK", "master", [(20 * days, 93, 5), (timedelta(hours=1), 97, 6)])
    db.execute("INSERT INTO devices (device_sn, name) VALUES ('SNFAST', 'Cabin Delta 2')")
    assert soh_alert(db) == {("SNFAST", "master", "Cabin Delta 2"): 3}


def test_soh_alert_is_quiet_on_an_empty_database(db):
    assert soh_alert(db) == {}
