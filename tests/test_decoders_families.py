"""More device families against their captures: every decoded column equals what the device reported.

Fixtures live in tests/fixtures/families/ (provenance in each file): first-generation River
(River Pro latestQuotas reply, River Max app pushes), first-generation Delta (Delta mini,
Delta Max and Delta Pro latestQuotas replies, Delta mini and Delta Max pd pushes), River 3 Plus and Delta 3 gen-3 messages
(BMS heartbeats of both packs, CMS heartbeat, display and runtime uploads), Stream AC Pro and
Ultra, Delta Pro Ultra, Smart Home Panel 2 and PowerOcean protobuf messages. A product type we
do not map is kept raw, marked unmapped, counted, and named by `decode` and `doctor`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from collector.decode_cli import main as decode_main
from collector.decode_cli import payload_from_fixture
from collector.decoders import COLUMNS, Reading, decode
from collector.decoders.protobuf import header_message
from collector.decoders.registry import unmapped_reason
from collector.proto import ecoflow_pb2 as pb

FAMILIES = Path(__file__).resolve().parent / "fixtures" / "families"
FIXTURES = sorted(p.name for p in FAMILIES.glob("*.json"))


def load(name: str) -> dict[str, Any]:
    return json.loads((FAMILIES / name).read_text())


def _fill(message: Message, captured: dict[str, Any]) -> None:
    """Copy the captured fields our schema carries, by their JSON names. The adapter keeps an
    underscore before a digit (`outAcL1_1Pwr`, `inAc_5p8Pwr`) where protobuf's JSON name drops
    it (`outAcL11Pwr`): the same field."""
    by_name = message.DESCRIPTOR.fields_by_camelcase_name
    for key, value in captured.items():
        field = by_name.get(key) or by_name.get(key.replace("_", ""))
        if field is None:
            continue
        if field.message_type is not None:
            if isinstance(value, list):
                for item in value:
                    _fill(getattr(message, field.name).add(), item)
            else:
                _fill(getattr(message, field.name), value)
        elif field.type == field.TYPE_BYTES or isinstance(value, (dict, list)):
            continue  # e.g. bmsIsConnt, logged by the adapter as a list of numbers
        else:
            json_format.ParseDict({field.json_name: value}, message, ignore_unknown_fields=True)


def protobuf_payload(document: dict[str, Any]) -> bytes:
    """The HeaderMessage the captured (decoded) message travels in, encoded with our schema."""
    message = getattr(pb, document["message_type"])()
    captured = dict(document["message"])
    if document["message_type"] == "CmsHeartbeat":
        # The adapter names sub-message 1 `v1p0`; our schema names it `status`.
        captured = {"status": captured["v1p0"]}
    _fill(message, captured)
    cmd_func, cmd_id = document["route"]
    return header_message({"cmdFunc": cmd_func, "cmdId": cmd_id, "src": 3, "dest": 32},
                          message.SerializeToString())


def decode_fixture(name: str) -> Reading:
    document = load(name)
    if "message" in document:
        (reading,) = decode(protobuf_payload(document), topic=document.get("topic"))
    else:
        payload, topic = payload_from_fixture(document)
        (reading,) = decode(payload, topic=topic)
    return reading


def test_every_family_fixture_records_where_it_was_captured():
    assert len(FIXTURES) >= 15
    for name in FIXTURES:
        document = load(name)
        assert document["provenance"].startswith("https://github.com/"), name
        assert "/blob/" in document["provenance"], f"{name}: provenance names no commit"
        assert set(document["expected"]) <= set(COLUMNS), name


@pytest.mark.parametrize("name", FIXTURES)
def test_every_decoded_column_is_what_the_device_reported(name):
    """Every column the decoder fills is in the fixture's `expected` with the reported value,
    and nothing more: a column the message does not carry stays unknown."""
    reading = decode_fixture(name)
    expected = load(name)["expected"]
    assert set(reading.values) == set(expected), (name, reading.values)
    for column, value in expected.items():
        actual = reading.values[column]
        if value is None or isinstance(value, bool):
            assert actual is value, (column, actual)
        else:
            assert actual is not None and abs(actual - value) <= 0.01, (column, actual, value)


def test_first_generation_river_pro_is_named_by_its_product_type_and_decoded_from_pd_and_bms():
    reading = decode_fixture("riverpro_app_mqtt_1_latest_quotas.json")
    assert reading.model == "River Pro"
    assert reading.family == "river_gen1"
    assert reading.soc_modules == {"master": 84.0}


def test_first_generation_river_positive_remain_time_while_discharging_is_minutes_to_empty():
    values = decode_fixture("riverpro_app_mqtt_1_latest_quotas.json").values
    assert values["watts_out_sum"] > values["watts_in_sum"]
    assert values["remain_time_min"] == 370


def test_river_max_remain_time_while_taking_more_in_than_out_clears_the_runtime():
    """A River Max at its charge limit passing 215 W through reported pd.remainTime 698: not a
    runtime to empty, so the last discharge figure must not survive in the snapshot."""
    values = decode_fixture("rivermax_app_mqtt_3_pd.json").values
    assert "remain_time_min" in values and values["remain_time_min"] is None


def test_river_gen1_remain_time_sentinel_clears_and_unknown_direction_says_nothing():
    sentinel = {"params": {"pd.remainTime": 5999, "pd.usb3Watts": 0}}
    (reading,) = decode(json.dumps(sentinel).encode())
    assert reading.family == "river_gen1"
    assert reading.values["remain_time_min"] is None and "remain_time_min" in reading.values
    lone = {"params": {"pd.remainTime": 300, "pd.usb3Watts": 0}}
    (reading,) = decode(json.dumps(lone).encode())
    assert "remain_time_min" not in reading.values


def test_river_gen1_grid_from_ac_in_power_first_then_invInVol():
    power = decode_fixture("rivermax_app_mqtt_1_inv.json").values
    assert power["grid_connected"] is True and power["ac_in_watts"] == 201
    # Power first: 83 W flowing in on AC with the voltage field at 0 is the grid.
    (reading,) = decode(json.dumps(
        {"params": {"inv.invInVol": 0, "inv.inputWatts": 83}}).encode())
    assert reading.values["grid_connected"] is True
    # Voltage only: 232 V with no power in (a full River Pro on mains).
    (reading,) = decode(json.dumps(
        {"params": {"inv.invInVol": 232000, "inv.inputWatts": 0}}).encode())
    assert reading.values["grid_connected"] is True
    off = decode_fixture("riverpro_app_mqtt_1_latest_quotas.json").values
    assert off["grid_connected"] is False


def test_river_max_headline_soc_is_pd_soc_and_packs_give_the_minimum():
    """pd.soc 89 sits between the packs' 87 and 91: the combined figure, kept as the headline,
    while soc_min is the lowest pack the snapshot knows (collector merge)."""
    pd = decode_fixture("rivermax_app_mqtt_3_pd.json")
    master = decode_fixture("rivermax_app_mqtt_4_bmsMaster.json")
    slave = decode_fixture("rivermax_app_mqtt_2_bmsSlave1.json")
    assert pd.values["soc_percent"] == 89
    assert master.soc_modules == {"master": 87} and slave.soc_modules == {"slave1": 91}


def test_first_generation_delta_models_are_named_by_their_product_type():
    """productType 13 Delta Max, 14 Delta Pro, 15 Delta mini: latestQuotas replies of all three
    decode as first-generation Deltas (15 was unmapped, so a Delta mini was stored raw)."""
    for name, model in (("deltamini_app_mqtt_1_latest_quotas.json", "Delta Mini"),
                        ("deltamax_app_mqtt_1_latest_quotas_extra_battery.json", "Delta Max"),
                        ("deltapro_app_mqtt_1_latest_quotas_extra_battery.json", "Delta Pro")):
        reading = decode_fixture(name)
        assert (reading.family, reading.model) == ("delta_gen1", model), name


def test_first_generation_delta_headline_soc_is_ems_and_packs_give_the_minimum():
    """pd.soc (90) is the Delta Pro's master pack; the app shows ems.f32LcdShowSoc (84.57)."""
    pro = decode_fixture("deltapro_app_mqtt_1_latest_quotas_extra_battery.json")
    assert pro.values["soc_percent"] == pytest.approx(84.57, abs=0.01)
    assert pro.soc_modules == {"master": pytest.approx(89.52, abs=0.01),
                               "slave1": pytest.approx(80.66, abs=0.01)}
    assert pro.values["soc_min_percent"] == pytest.approx(80.66, abs=0.01)


def test_first_generation_delta_pd_push_is_read_as_first_generation_not_delta_2():
    """A Delta mini's pd push carries no ems./bmsMaster. key and no serial: its pd.soc is the
    master pack, not the headline a Delta 2 reading would make of it, and 5999 clears."""
    reading = decode_fixture("deltamini_app_mqtt_2_pd.json")
    assert reading.family == "delta_gen1"
    assert "soc_percent" not in reading.values
    assert "remain_time_min" in reading.values and reading.values["remain_time_min"] is None


def test_first_generation_delta_positive_remain_time_while_discharging_is_minutes_to_empty():
    """Delta Max pd push: pd.remainTime 722 while 101 W go out and 0 come in; the battery's
    111 W (2.05 A x 54.3 V) out of 1325 Wh last 716 min."""
    values = decode_fixture("deltamax_app_mqtt_2_pd_discharging.json").values
    assert values["watts_out_sum"] > values["watts_in_sum"]
    assert values["remain_time_min"] == 722


def test_first_generation_delta_positive_remain_time_while_charging_clears():
    """The Delta Max reply's pd.remainTime 5172 equals ems.chgRemainTime while 309 W come in
    and 116 W go out: minutes to full. Alone in a pd push it must clear, not become a runtime."""
    quota = load("deltamax_app_mqtt_1_latest_quotas_extra_battery.json")["payload"]["data"]["quotaMap"]
    assert quota["pd.remainTime"] == quota["ems.chgRemainTime"] == 5172
    pd = {k: v for k, v in quota.items() if k.startswith("pd.")}
    (reading,) = decode(json.dumps({"params": pd}).encode())
    assert reading.family == "delta_gen1"
    assert "remain_time_min" in reading.values and reading.values["remain_time_min"] is None
    # Direction unknown (no watts in the message): say nothing rather than guess.
    (reading,) = decode(json.dumps({"params": {"pd.remainTime": 300, "bmsMaster.soc": 50}}).encode())
    assert "remain_time_min" not in reading.values


def test_first_generation_delta_discharge_field_wins_over_pd_remain_time():
    """Delta mini: ems.dsgRemainTime 1688 while the battery gives out 33 W (0.573 A x 58.1 V)
    with every port at 0 W: 937 Wh / 33.3 W = 1687 min. The discharge field decides, not
    the (0 W / 0 W) port sums; and on the Delta Max, dsgRemainTime 5999 clears although
    pd.remainTime is 5172."""
    mini = decode_fixture("deltamini_app_mqtt_1_latest_quotas.json").values
    assert mini["remain_time_min"] == 1688
    charging = decode_fixture("deltamax_app_mqtt_1_latest_quotas_extra_battery.json").values
    assert "remain_time_min" in charging and charging["remain_time_min"] is None


def test_first_generation_delta_max_pv_is_in_tenths_of_a_watt():
    """mppt.inWatts 3092 with 65.8 V x 4.70 A on the PV input and pd.wattsInSum 309."""
    values = decode_fixture("deltamax_app_mqtt_1_latest_quotas_extra_battery.json").values
    assert values["pv_in_watts"] == 309 == values["watts_in_sum"]


def test_first_generation_delta_grid_from_ac_in_power_first_then_acInVol():
    topic = "/app/device/property/DAEBZ5ZE0000001"  # a Delta Max serial prefix
    (reading,) = decode(json.dumps({"params": {"inv.acInVol": 0, "inv.inputWatts": 83}}).encode(),
                        topic=topic)
    assert reading.family == "delta_gen1" and reading.values["grid_connected"] is True
    (reading,) = decode(json.dumps({"params": {"inv.acInVol": 231000, "inv.inputWatts": 0}}).encode(),
                        topic=topic)
    assert reading.values["grid_connected"] is True
    off = decode_fixture("deltapro_app_mqtt_1_latest_quotas_extra_battery.json").values
    assert off["grid_connected"] is False


def test_gen3_extra_battery_heartbeats_report_each_pack():
    pack0 = decode_fixture("river3plus_protobuf_1_bms_heartbeat_pack0.json")
    pack1 = decode_fixture("river3plus_protobuf_2_bms_heartbeat_pack1.json")
    assert set(pack0.soc_modules) == {"pack0"} and set(pack1.soc_modules) == {"pack1"}
    assert min(pack0.soc_modules["pack0"], pack1.soc_modules["pack1"]) == pytest.approx(87.84, abs=0.01)


def test_delta3_discharge_time_143999_while_charging_clears_the_runtime():
    values = decode_fixture("delta3_protobuf_2_cms_heartbeat.json").values
    assert "remain_time_min" in values and values["remain_time_min"] is None


def _latest_quotas(product_type: Any) -> dict[str, Any]:
    document = load("riverpro_app_mqtt_1_latest_quotas.json")["payload"]
    document = json.loads(json.dumps(document))
    document["data"]["productType"] = product_type
    return document


def test_unknown_product_type_is_stored_raw_marked_unmapped_and_named():
    """A latestQuotas reply from a model we do not map: its keys could mean other units or
    packs there, so no column is guessed; the payload is kept and the product type named."""
    document = _latest_quotas(9999)
    (reading,) = decode(json.dumps(document).encode())
    assert reading.family == "unmapped"
    assert reading.values == {}
    assert reading.model is None
    assert reading.raw == document
    assert unmapped_reason(reading) == "productType 9999 is not a model this collector decodes"


def test_unknown_module_is_named_too_and_decoded_readings_have_no_reason():
    (reading,) = decode(json.dumps({"params": {"bms_bmsInfo.x": 1}}).encode())
    assert reading.family == "unmapped"
    assert "bms_bmsInfo" in unmapped_reason(reading)
    assert unmapped_reason(decode_fixture("riverpro_app_mqtt_1_latest_quotas.json")) is None


def test_decode_command_names_an_unknown_product_type(tmp_path, capsys):
    path = tmp_path / "unknown.json"
    path.write_text(json.dumps(_latest_quotas(9999)))
    assert decode_main([str(path)]) == 0
    (printed,) = json.loads(capsys.readouterr().out)
    assert printed["family"] == "unmapped"
    assert printed["unmapped"] == "productType 9999 is not a model this collector decodes"
    assert printed["values"] == {}


def test_doctor_summary_names_an_unknown_product_type():
    from collector.cloud.doctor import summary

    text = summary(json.dumps(_latest_quotas(9999)).encode(), "SN", "app_mqtt")
    assert "productType 9999" in text


def test_unmapped_payloads_are_counted_by_source_and_product():
    from collector.metrics import Metrics
    from collector.pipeline import Pipeline

    class Writer:
        def __init__(self):
            from collector.rows import SnapshotMerger
            self.snapshots = SnapshotMerger()
            self.rows = []

        def add_rows(self, rows, on_commit=None):
            self.rows += rows

        def add_error(self, error, on_commit=None):
            raise AssertionError(error)

    metrics = Metrics()
    writer = Writer()
    pipeline = Pipeline(writer, metrics=metrics)
    payload = json.dumps(_latest_quotas(9999)).encode()
    topic = "/app/1234/R999ZZZ1234567/thing/property/get_reply"
    assert pipeline.handle(payload, topic, "app_mqtt") == 1
    assert writer.rows[0].raw_data["data"]["productType"] == 9999  # stored raw
    pipeline.handle(json.dumps(_latest_quotas(12)).encode(), topic, "app_mqtt")
    samples = {(s.labels["source"], s.labels["product"]): s.value
               for family in metrics.registry.collect() for s in family.samples
               if s.name.startswith("ecoflow_collector_messages_unmapped")
               and s.name.endswith("_total")}
    assert samples == {("app_mqtt", "productType 9999"): 1}


def _stream_display(**fields: Any) -> Reading:
    message = pb.DisplayPropertyUpload()
    json_format.ParseDict(fields, message)
    (reading,) = decode(header_message({"cmdFunc": 254, "cmdId": 21, "src": 2, "dest": 32},
                                       message.SerializeToString()))
    return reading


def test_stream_display_upload_is_the_stream_family_and_pv_is_the_sum_not_pv1():
    """Stream Ultra: powGetPv (361) is PV input 1 (0 W) while powGetPvSum (517) is 142 W."""
    reading = decode_fixture("streamultra_protobuf_1_display.json")
    assert reading.family == "stream"
    assert reading.raw["headers"][0]["pdata"]["powGetPv"] == 0
    assert reading.values["pv_in_watts"] == 142
    assert reading.values["ac_out_watts"] == 108 and reading.values["ac_in_watts"] == 0
    assert "watts_in_sum" not in reading.values and "watts_out_sum" not in reading.values


def test_stream_heartbeats_decode_as_gen3_battery_messages():
    assert decode_fixture("streamultra_protobuf_2_cms_heartbeat.json").family == "gen3"
    pack = decode_fixture("streamacpro_protobuf_3_bms_heartbeat.json")
    assert pack.soc_modules == {"pack0": pytest.approx(10.59, abs=0.01)}


def test_stream_grid_port_drawing_in_is_ac_in_and_grid_power_first_then_voltage():
    # tolwi/hassio-ecoflow-cloud's Stream sample: -967.2 W with gridConnectionSta GRID_IN.
    drawing = _stream_display(gridConnectionPower=-967.2364, gridConnectionSta=1).values
    assert drawing["ac_in_watts"] == 967 and drawing["ac_out_watts"] == 0
    assert drawing["grid_connected"] is True
    # Power first: inflow with the voltage field at 0 is still the grid.
    assert _stream_display(gridConnectionPower=-83.0, gridConnectionVol=0.0).values[
        "grid_connected"] is True
    # Voltage only.
    assert _stream_display(gridConnectionVol=229.5).values["grid_connected"] is True
    off = _stream_display(gridConnectionVol=0.0, gridConnectionPower=0.0).values
    assert off["grid_connected"] is False
    # Nothing about the grid port: unknown, not false.
    assert "grid_connected" not in _stream_display(powGetPvSum=10.0).values


def test_stream_rest_map_is_not_read_as_gen3():
    document = {"code": "0", "message": "Success", "data": {
        "cmsBattSoc": 11, "powGetPv": 0, "powGetPvSum": 142.0, "gridConnectionPower": 108.3}}
    (reading,) = decode(json.dumps(document).encode())
    assert reading.family == "stream"
    assert reading.values["pv_in_watts"] == 142 and reading.values["ac_out_watts"] == 108


DPU_TOPIC = "/app/device/property/Y711ZZ0000000001"


def _dpu(message: Message, cmd_id: int, topic: str | None = DPU_TOPIC,
         device_sn: str | None = None) -> Reading:
    header = {"cmdFunc": 2, "cmdId": cmd_id, "src": 2, "dest": 32}
    if device_sn:
        header["deviceSn"] = device_sn
    (reading,) = decode(header_message(header, message.SerializeToString()), topic=topic)
    return reading


def test_delta_pro_ultra_routes_need_its_serial_else_2_1_stays_the_smart_plug_heartbeat():
    show = pb.DpuAppShowHeartbeat(soc=88, watts_in_sum=0.0, watts_out_sum=0.0)
    dpu = _dpu(show, 1)
    assert dpu.family == "delta_pro_ultra" and dpu.model == "Delta Pro Ultra"
    assert dpu.values["soc_percent"] == 88
    # The serial in the header names the model too.
    assert _dpu(show, 1, topic=None, device_sn="Y711ZZ0000000001").family == "delta_pro_ultra"
    plug = _dpu(pb.PlugHeartbeat(watts=125), 1, topic="/app/device/property/HW52ZZ0000000001")
    assert plug.family == "smartplug"


def test_delta_pro_ultra_remain_time_counts_to_empty_only_while_more_goes_out():
    out = _dpu(pb.DpuAppShowHeartbeat(remain_time=600, watts_in_sum=0.0, watts_out_sum=250.0), 1)
    assert out.values["remain_time_min"] == 600
    charging = _dpu(pb.DpuAppShowHeartbeat(remain_time=90, watts_in_sum=1800.0,
                                           watts_out_sum=20.0), 1)
    assert "remain_time_min" in charging.values and charging.values["remain_time_min"] is None
    idle = decode_fixture("deltaproultra_protobuf_1_app_show_heartbeat.json")
    assert "remain_time_min" not in idle.values


def test_delta_pro_ultra_grid_power_first_then_ac_in_voltage():
    power = _dpu(pb.DpuAppShowHeartbeat(in_ac_c20_pwr=83.0, in_ac_5p8_pwr=0.0), 1).values
    assert power["ac_in_watts"] == 83 and power["grid_connected"] is True
    volts = _dpu(pb.DpuBackendHeartbeat(in_ac_c20_vol=0.0, in_ac_5p8_vol=241.5), 2).values
    assert volts["grid_connected"] is True
    assert decode_fixture("deltaproultra_protobuf_2_backend_heartbeat.json").values[
        "grid_connected"] is False


def test_delta_pro_ultra_packs_give_the_minimum():
    reading = decode_fixture("deltaproultra_protobuf_3_battery_packs.json")
    assert reading.soc_modules == {"pack1": 81, "pack2": 89, "pack3": 94, "pack4": 94}


def test_gen3_usb_ports_and_ac_charger_flag_decode_from_protobuf():
    display = decode_fixture("delta3_protobuf_1_display.json").values
    assert display["usb_out_watts"] == 2 and display["typec_out_watts"] == 0
    # Field 202 (AC charger) is weak evidence when neither power nor voltage is reported.
    message = pb.DisplayPropertyUpload(plug_in_info_ac_charger_flag=1)
    (reading,) = decode(header_message({"cmdFunc": 254, "cmdId": 21, "src": 2, "dest": 32},
                                       message.SerializeToString()))
    assert reading.values["grid_connected"] is True


def test_smart_home_panel_2_packs_are_the_connected_batteries_only():
    reading = decode_fixture("panel2_protobuf_1_push_and_set.json")
    assert reading.family == "panel2"
    assert reading.soc_modules == {"energy1": 100, "energy2": 100}  # slot 3 is empty (0 %)


def test_smart_home_panel_2_grid_from_the_houses_grid_power_first_then_volts():
    def panel(message: Message, cmd_id: int) -> dict[str, Any]:
        (reading,) = decode(header_message({"cmdFunc": 12, "cmdId": cmd_id, "src": 11,
                                            "dest": 32}, message.SerializeToString()))
        return reading.values

    stat = pb.Panel2TimeStat()
    stat.master_info.grid_watt = 830.0
    assert panel(stat, 1) == {"grid_connected": True}
    push = pb.Panel2PushAndSet(grid_vol=0)
    push.master_incre_info.grid_vol = 0
    assert panel(push, 32)["grid_connected"] is False
    push.master_incre_info.grid_vol = 241
    assert panel(push, 32)["grid_connected"] is True


def test_powerocean_packs_are_named_by_serial_and_messages_are_the_powerocean_family():
    packs = decode_fixture("powerocean_protobuf_2_battery_packs.json")
    assert packs.family == "powerocean"
    assert packs.soc_modules == {"HJ3AZ12345678": 37}


def test_powerocean_wire_frame_without_columns_decodes_to_nothing_guessed():
    """A whole 96/8 frame as a PowerOcean sent it (shuette42/ecoflow-energy-ha issue #225,
    https://github.com/shuette42/ecoflow-energy-ha/issues/225; module serial masked as X by the
    reporter): its pdata carries only fields 612 and 613, which we do not decode."""
    frame = bytes.fromhex(
        "0a3c0a06a02601a8260110601820200128013803406048085006580170c7c99a047881ac01800103"
        "880101c2011058585858585858585858585858585858")
    (reading,) = decode(frame)
    assert reading.family == "powerocean"
    assert reading.values == {} and reading.soc_modules == {}
    assert reading.raw["headers"][0]["cmdFunc"] == 96 and reading.raw["headers"][0]["cmdId"] == 8


def test_powerocean_pv_is_unknown_when_a_string_has_no_power():
    heartbeat = pb.PowerOceanEmsHeartbeat()
    mppt = heartbeat.mpptHeartBeat.add()
    mppt.mpptPv.add(pwr=1749.2)
    mppt.mpptPv.add(vol=363.3)
    (reading,) = decode(header_message({"cmdFunc": 96, "cmdId": 1, "src": 96, "dest": 32},
                                       heartbeat.SerializeToString()))
    assert "pv_in_watts" not in reading.values
