"""Decoders against real captured payloads: every fixture's `expected` columns come out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from collector.decode_cli import payload_from_fixture
from collector.decoders import COLUMNS, DecodeError, Reading, decode

LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "payloads"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def fixture_files() -> dict[str, Path]:
    """Fixture files by name: the shared captures when present, else the copies kept here."""
    files = {p.name: p for p in sorted(LOCAL_FIXTURES.glob("*.json"))}
    if SHARED_FIXTURES.is_dir():
        files.update({p.name: p for p in sorted(SHARED_FIXTURES.glob("*.json"))})
    return files


FIXTURES = fixture_files()


def load(name: str) -> dict[str, Any]:
    return json.loads(FIXTURES[name].read_text())


def decode_fixture(name: str) -> Reading:
    document = load(name)
    if "payload" in document or "payload_hex" in document:
        payload, topic = payload_from_fixture(document)
    else:
        # A truncated capture: its complete prefix is a valid payload on its own.
        payload, topic = bytes.fromhex(document["complete_prefix_hex"]), document.get("topic")
    (reading,) = decode(payload, topic=topic)
    return reading


def assert_close(column: str, actual: Any, expected: Any) -> None:
    if isinstance(expected, bool) or expected is None:
        assert actual is expected, f"{column}: {actual!r} != {expected!r}"
    else:
        # The fixtures README: SoC and watts within 1 unit (firmware rounds differently).
        assert actual is not None, f"{column} missing, expected {expected!r}"
        assert abs(actual - expected) <= 1, f"{column}: {actual!r} != {expected!r}"


def test_local_fixture_copies_match_the_shared_captures():
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("shared fixtures not present (clean clone): the local copies are used")
    for path in LOCAL_FIXTURES.glob("*.json"):
        assert path.read_text() == (SHARED_FIXTURES / path.name).read_text(), path.name


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_expected_columns_come_out(name):
    reading = decode_fixture(name)
    for column, expected in load(name)["expected"].items():
        assert_close(column, reading.values.get(column), expected)
    assert set(reading.values) <= set(COLUMNS)
    assert reading.raw


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_columns_stated_unknown_stay_absent(name):
    """`facts` naming a column as null: the payload does not carry it, so it is not filled."""
    reading = decode_fixture(name)
    document = load(name)
    for column, value in document.get("facts", {}).items():
        # `expected` wins where a fixture's facts and expectations disagree (Delta Pro 3 REST).
        if column in COLUMNS and value is None and column not in document["expected"]:
            assert column not in reading.values, f"{column} = {reading.values[column]!r}"


def test_offline_latest_quotas_reply_decodes_to_device_offline_not_zeros():
    reading = decode_fixture("deltamax_app_mqtt_2_offline.json")
    assert reading.online is False
    assert reading.values == {}
    assert reading.device_sn == "DAEBZ5ZE4151148"


def test_delta2max_pd_status_partial_leaves_battery_columns_unknown():
    values = decode_fixture("delta2max_open_mqtt_6_pdStatus_partial.json").values
    assert values == {"watts_out_sum": 136}


def test_delta2_negative_pd_remain_time_is_minutes_to_empty():
    assert decode_fixture("delta2_app_mqtt_1.json").values["remain_time_min"] == 132


def test_delta2_grid_connected_from_ac_in_voltage_although_no_ac_power_flows():
    values = decode_fixture("delta2_app_mqtt_1.json").values
    assert values["ac_in_watts"] == 0
    assert values["grid_connected"] is True


def test_remain_time_sentinel_5999_is_not_a_number_but_an_explicit_clear():
    values = decode_fixture("river2pro_app_mqtt_1.json").values
    assert "remain_time_min" in values and values["remain_time_min"] is None


# Each family's "not applicable" remaining time in the real captures: the decoder says the
# column is cleared (present, None), so the collector stores NULL instead of carrying over the
# last discharge figure. Real figures come out as they are; payloads without one say nothing.
REMAIN_CLEARED = [
    "deltamax_app_mqtt_1.json",  # gen 1: ems.dsgRemainTime 5999
    "delta2max_app_mqtt_1.json",  # gen 2, charging: pd.remainTime +81, dsgRemainTime 5999
    "delta2max_open_mqtt_1_pdStatus.json",  # gen 2 pdStatus: remainTime 5999
    "delta2max_open_mqtt_5_emsStatus.json",  # gen 2 emsStatus: dsgRemainTime 5999
    "river2pro_app_mqtt_1.json",  # gen 2, full on mains: 5999
    "river2pro_app_mqtt_2.json",  # gen 2 push: dsgRemainTime 5999
    "deltapro3_rest_quota_all_1.json",  # gen 3 REST, charging: cmsDsgRemTime 5939
    "powerstream_protobuf_1.json",  # PowerStream: batDischargingTime 5999
    "powerstream_protobuf_3.json",  # PowerStream, charging: batDischargingTime 5999
]
REMAIN_REAL = {
    "delta2_app_mqtt_1.json": 132,
    "delta3plus_protobuf_1_get_reply.json": 1018,
    "river3_protobuf_1_cms_heartbeat.json": 2323,
    "powerstream_open_mqtt_1.json": 2425,
    "powerstream_rest_quota_all_1.json": 1657,
    "powerstream_protobuf_4_pdata_only.json": 623,
}
REMAIN_UNSAID = [
    "delta2max_open_mqtt_2_mpptStatus.json", "delta2max_open_mqtt_4_bmsStatus.json",
    "delta2max_open_mqtt_7_kitInfo.json", "smartplug_open_mqtt_1.json",
    # A positive pd.remainTime alone is minutes to full on the Delta 2 family: not a runtime,
    # but not a "not applicable" either (gen-1 Rivers count down with it).
    "delta2max_open_mqtt_6_pdStatus_partial.json", "river2_rest_quota_legacy_1.json",
]


@pytest.mark.parametrize("name", REMAIN_CLEARED)
def test_not_applicable_remaining_time_is_reported_as_cleared(name):
    values = decode_fixture(name).values
    assert "remain_time_min" in values and values["remain_time_min"] is None


@pytest.mark.parametrize("name", sorted(REMAIN_REAL))
def test_real_remaining_time_comes_out_as_reported(name):
    assert decode_fixture(name).values["remain_time_min"] == REMAIN_REAL[name]


@pytest.mark.parametrize("name", REMAIN_UNSAID)
def test_payload_without_a_discharge_figure_leaves_remaining_time_unknown(name):
    assert "remain_time_min" not in decode_fixture(name).values


@pytest.mark.parametrize("params", [
    {"pd.remainTime": 5939}, {"bms_emsStatus.dsgRemainTime": 5939},
    {"ems.dsgRemainTime": 5939}, {"cmsBattSoc": 50, "cmsDsgRemTime": 5999},
    {"20_1.dsgRemainTime": 5939},
    # 0 minutes while the same message says "charging" (gen-3 state 2, Delta 2 family
    # pd.chgDsgState 2, PowerStream battery watts negative) is not "empty": not applicable.
    {"cmsBattSoc": 50, "cmsDsgRemTime": 0, "cmsChgDsgState": 2},
    {"bms_emsStatus.dsgRemainTime": 0, "pd.chgDsgState": 2},
    {"20_1.dsgRemainTime": 0, "20_1.batInputWatts": -223},
])
def test_every_family_sentinel_clears_remaining_time(params):
    (reading,) = decode(json.dumps({"params": params}).encode())
    assert "remain_time_min" in reading.values and reading.values["remain_time_min"] is None


@pytest.mark.parametrize("params", [
    {"cmsBattSoc": 50, "cmsDsgRemTime": 0, "cmsChgDsgState": 1},
    {"bms_emsStatus.dsgRemainTime": 0, "pd.chgDsgState": 1},
    {"20_1.dsgRemainTime": 0, "20_1.batInputWatts": 650},
])
def test_zero_minutes_while_discharging_is_a_real_empty_battery(params):
    (reading,) = decode(json.dumps({"params": params}).encode())
    assert reading.values["remain_time_min"] == 0


def test_delta_max_without_ac_in_voltage_is_off_grid():
    assert decode_fixture("deltamax_app_mqtt_1.json").values["grid_connected"] is False


def test_extra_battery_kit_lowers_soc_min_without_inventing_a_headline_soc():
    reading = decode_fixture("delta2max_open_mqtt_7_kitInfo.json")
    assert reading.soc_modules == {"kit2": 26.25}
    assert reading.values == {"soc_min_percent": 26.25}


def test_soc_min_is_the_lowest_pack_when_packs_are_reported():
    reading = decode_fixture("deltapro3_rest_quota_all_1.json")
    assert reading.values["soc_percent"] == pytest.approx(44.34, abs=0.01)
    assert reading.values["soc_min_percent"] == pytest.approx(42.99, abs=0.01)


def test_soc_min_equals_headline_soc_when_no_pack_is_reported():
    values = decode_fixture("river2pro_app_mqtt_2.json").values
    assert values["soc_min_percent"] == values["soc_percent"] == 100


def test_mppt_status_alone_gives_pv_and_no_soc():
    values = decode_fixture("delta2max_open_mqtt_2_mpptStatus.json").values
    assert values == {"pv_in_watts": 0}


def test_delta_pro3_rest_ac_power_in_means_grid_although_ac_in_flag_reads_zero():
    values = decode_fixture("deltapro3_rest_quota_all_1.json").values
    assert values["grid_connected"] is True
    assert values["ac_in_watts"] == 1701


def test_powerstream_rest_powers_are_scaled_from_tenths_of_a_watt():
    values = decode_fixture("powerstream_rest_quota_all_1.json").values
    assert values["pv_in_watts"] == 204
    assert values["ac_out_watts"] == 269
    assert "grid_connected" not in values


def test_powerstream_pdata_only_heartbeat_gives_discharge_minutes():
    reading = decode_fixture("powerstream_protobuf_4_pdata_only.json")
    assert reading.values == {"remain_time_min": 623}
    assert reading.family == "powerstream"


def test_smart_plug_heartbeat_fills_no_station_column_but_keeps_its_watts_raw():
    reading = decode_fixture("smartplug_open_mqtt_1.json")
    assert reading.values == {}
    assert reading.raw["param"]["watts"] == 10
    plug = decode_fixture("smartplug_protobuf_1.json")
    assert plug.values == {}
    assert plug.device_sn == "HW52ZDH4SF666937"
    assert plug.raw["headers"][0]["pdata"]["watts"] == 760


def test_backend_addr_message_is_kept_without_guessing_grid_from_battery_watts():
    reading = decode_fixture("delta2max_open_mqtt_8_backend_addr.json")
    assert reading.values == {}
    assert reading.family == "unmapped"


def test_serial_number_comes_from_the_topic():
    document = load("river2pro_app_mqtt_2.json")
    (reading,) = decode(json.dumps(document["payload"]).encode(), topic=document["topic"])
    assert reading.device_sn == "R621ZEB4XECV1192"
    assert reading.model == "River 2 Pro"
    assert reading.ts is not None and reading.ts.year == 2024


def test_placeholder_topics_and_masked_serials_give_no_serial_number():
    assert decode_fixture("delta2_app_mqtt_1.json").device_sn is None


def test_raw_keeps_the_json_exactly_as_received():
    document = load("delta2max_open_mqtt_5_emsStatus.json")
    (reading,) = decode(json.dumps(document["payload"]).encode())
    assert reading.raw == document["payload"]


def test_powerstream_protobuf_serial_comes_from_the_header():
    assert decode_fixture("powerstream_protobuf_3.json").device_sn == "HW51ZOH4SF4U1217"


def test_truncated_protobuf_capture_is_a_decode_error_with_the_reason():
    document = load("deltapro3_protobuf_2_get_reply_truncated.json")
    with pytest.raises(DecodeError, match="HeaderMessage"):
        decode(document["payload_b64"].encode())


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b'{"code": "8513", "message": "accessKey is invalid"}', "8513"),
        (b'{"hello": "world"}', "no EcoFlow quota keys"),
        (b"[1, 2, 3]", "not an object"),
        (b"\xff\xfe\x00garbage", "protobuf"),
    ],
)
def test_undecodable_payloads_raise_decode_error_saying_why(payload, reason):
    with pytest.raises(DecodeError, match=reason):
        decode(payload)


def test_gen1_pv_power_is_left_unknown_when_the_model_and_so_its_unit_are_unknown():
    (reading,) = decode(json.dumps({"params": {"mppt.inWatts": 1234, "ems.lcdShowSoc": 50}}).encode())
    assert reading.family == "delta_gen1"
    assert "pv_in_watts" not in reading.values
    assert reading.values["soc_percent"] == 50


def test_delta_pro_pv_power_is_in_tenths_of_a_watt():
    payload = json.dumps({"params": {"mppt.inWatts": 1234}}).encode()
    (reading,) = decode(payload, topic="/app/device/property/DCABZ1234567890")
    assert reading.model == "Delta Pro"
    assert reading.values["pv_in_watts"] == 123


def test_gen1_soc_min_is_the_lowest_of_master_and_slave_packs():
    payload = {"params": {"ems.lcdShowSoc": 60, "bmsMaster.soc": 70, "bmsSlave1.soc": 50}}
    (reading,) = decode(json.dumps(payload).encode())
    assert reading.values["soc_percent"] == 60
    assert reading.values["soc_min_percent"] == 50
    assert reading.soc_modules == {"master": 70, "slave1": 50}


def test_usb_total_needs_every_port_so_a_partial_update_leaves_it_unknown():
    (reading,) = decode(json.dumps({"params": {"pd.usb1Watts": 5}}).encode())
    assert "usb_out_watts" not in reading.values
    ports = {"pd.usb1Watts": 5, "pd.usb2Watts": 6, "pd.qcUsb1Watts": 7, "pd.qcUsb2Watts": 8}
    (reading,) = decode(json.dumps({"params": ports}).encode())
    assert reading.values["usb_out_watts"] == 26


def test_ac_in_voltage_below_50_volts_is_off_grid_even_with_a_flag():
    payload = {"params": {"inv.acInVol": 7000, "inv.inputWatts": 0}}
    (reading,) = decode(json.dumps(payload).encode())
    assert reading.values["grid_connected"] is False


def grid(params: dict, topic: str | None = None) -> bool | None:
    (reading,) = decode(json.dumps({"params": params}).encode(), topic=topic)
    return reading.values.get("grid_connected")


# PROTOCOL.md `grid_connected`: AC-in power flowing in (above about 5 W) wins whatever the
# voltage field says (a River 3 Plus read 0 V and AC-in flag 0 while 83 W came in on AC);
# otherwise the AC-in voltage decides; otherwise the flags, as weak evidence; otherwise null.
POWER_FIRST = {
    "gen 1 (Delta Max)": {"ems.lcdShowSoc": 50, "inv.acInVol": 0, "inv.inputWatts": 83},
    "gen 1 (River, invInVol)": {"ems.lcdShowSoc": 50, "inv.invInVol": 0, "inv.inputWatts": 83},
    "gen 2 (Delta 2 family)": {"bms_emsStatus.lcdShowSoc": 50, "inv.acInVol": 0,
                               "inv.inputWatts": 83},
    "gen 3 REST (Delta Pro 3)": {"cmsBattSoc": 50, "plugInInfoAcInVol": 0.0,
                                 "plugInInfoAcInFlag": 0, "plugInInfoAcChargerFlag": True,
                                 "powGetAcIn": 83.0},
}
VOLTAGE_ONLY = {
    "gen 1 (Delta Max)": ({"ems.lcdShowSoc": 50, "inv.acInVol": 230000},
                          {"ems.lcdShowSoc": 50, "inv.acInVol": 0}),
    "gen 1 (River, invInVol)": ({"ems.lcdShowSoc": 50, "inv.invInVol": 120000},
                                {"ems.lcdShowSoc": 50, "inv.invInVol": 0}),
    "gen 2 (Delta 2 family)": ({"bms_emsStatus.lcdShowSoc": 50, "inv.acInVol": 230000},
                               {"bms_emsStatus.lcdShowSoc": 50, "inv.acInVol": 0}),
    "gen 3 REST (Delta Pro 3)": ({"cmsBattSoc": 50, "plugInInfoAcInVol": 230.0},
                                 {"cmsBattSoc": 50, "plugInInfoAcInVol": 0.0}),
}


@pytest.mark.parametrize("family", sorted(POWER_FIRST))
def test_ac_in_power_means_grid_whatever_the_voltage_field_says(family):
    assert grid(POWER_FIRST[family]) is True


@pytest.mark.parametrize("family", sorted(VOLTAGE_ONLY))
def test_ac_in_voltage_alone_decides_grid(family):
    present, absent = VOLTAGE_ONLY[family]
    assert grid(present) is True
    assert grid(absent) is False


@pytest.mark.parametrize("family", sorted(POWER_FIRST))
def test_a_few_watts_of_ac_in_are_noise_and_leave_the_voltage_to_decide(family):
    params = dict(POWER_FIRST[family])
    power_key = "powGetAcIn" if "powGetAcIn" in params else "inv.inputWatts"
    params[power_key] = 3
    params.pop("plugInInfoAcChargerFlag", None)
    assert grid(params) is False
    without_voltage = {k: v for k, v in params.items() if "Vol" not in k and "Flag" not in k}
    assert grid(without_voltage) is None


def test_gen3_ac_charger_flag_alone_is_weak_evidence_for_grid():
    assert grid({"cmsBattSoc": 50, "plugInInfoAcChargerFlag": True}) is True
    assert grid({"cmsBattSoc": 50, "plugInInfoAcChargerFlag": False,
                 "plugInInfoAcInFlag": 0}) is False


def test_on_a_ghost_voltage_family_voltage_without_power_is_not_proof(monkeypatch):
    from collector.decoders import reading

    monkeypatch.setattr(reading, "GHOST_VOLTAGE_FAMILIES", frozenset({"ghostly"}))
    assert reading.grid_from(230.0, 0, family="ghostly") is None
    assert reading.grid_from(230.0, 0, 0, family="ghostly") is False
    assert reading.grid_from(230.0, 0, 1, family="ghostly") is True
    assert reading.grid_from(230.0, 83, family="ghostly") is True
    assert reading.grid_from(0.0, 0, 1, family="ghostly") is False
    assert reading.grid_from(230.0, 0, family="delta_gen2") is True


def test_powerstream_and_smart_plug_say_nothing_about_grid():
    assert grid({"20_1.invOpVolt": 2358, "20_1.invOutputWatts": 2690}) is None
    assert "grid_connected" not in decode_fixture("smartplug_open_mqtt_1.json").values
