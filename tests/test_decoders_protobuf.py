"""Gen-3 protobuf decoding on payloads built from the protocol facts, and the generated code."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from collector.decoders import DecodeError, decode
from collector.proto import ecoflow_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def header(message, cmd_func: int, cmd_id: int, seq: int = 0x1234, xor: bool = False, **fields):
    """A Header carrying `message`, XOR-obfuscated with seq's low byte when asked."""
    pdata = message.SerializeToString()
    if xor:
        pdata = bytes(b ^ (seq & 0xFF) for b in pdata)
        fields["enc_type"] = 1
    return pb.Header(pdata=pdata, cmd_func=cmd_func, cmd_id=cmd_id, seq=seq, src=2, **fields)


def envelope(*headers: pb.Header) -> bytes:
    return pb.HeaderMessage(header=list(headers)).SerializeToString()


def test_display_upload_maps_gen3_fields_to_columns_with_output_magnitudes():
    display = pb.DisplayPropertyUpload(
        pow_in_sum_w=12.4, pow_out_sum_w=250.6, pow_get_ac_in=0.0, pow_get_ac_out=-240.2,
        pow_get_pv=12.4, cms_batt_soc=55.5, cms_dsg_rem_time=321, bms_batt_soc=54.0,
    )
    (reading,) = decode(envelope(header(display, 254, 21)))
    assert reading.values == {
        "soc_percent": 55.5, "soc_min_percent": 54.0, "remain_time_min": 321,
        "watts_in_sum": 12, "watts_out_sum": 251, "ac_in_watts": 0, "ac_out_watts": 240,
        "pv_in_watts": 12,
    }
    assert reading.family == "gen3"


def test_xor_obfuscated_pdata_is_undone_with_the_low_byte_of_seq():
    display = pb.DisplayPropertyUpload(cms_batt_soc=77.0, pow_get_ac_in=300.0)
    (reading,) = decode(envelope(header(display, 254, 21, seq=0x44D2A7, xor=True)))
    assert reading.values["soc_percent"] == 77.0
    assert reading.values["grid_connected"] is True


def test_cloud_messages_with_src_32_are_not_xored_even_with_enc_type_1():
    display = pb.DisplayPropertyUpload(cms_batt_soc=33.0)
    plain = header(display, 254, 21, seq=0x55, enc_type=1)
    plain.src = 32
    (reading,) = decode(envelope(plain))
    assert reading.values["soc_percent"] == 33.0


def test_river3_cms_heartbeat_on_the_wire_decrypts_and_decodes(tmp_path):
    import json

    fixture = json.loads(
        (ROOT / "tests" / "fixtures" / "payloads" / "river3_protobuf_1_cms_heartbeat.json")
        .read_text()
    )
    wire = bytes.fromhex(fixture["pdata_encrypted_hex_derived"])
    h = fixture["header"]
    message = pb.Header(pdata=wire, src=h["src"], enc_type=h["encType"], cmd_func=h["cmdFunc"],
                        cmd_id=h["cmdId"], seq=h["seq"])
    (reading,) = decode(envelope(message))
    assert reading.values["soc_percent"] == 100
    assert reading.values["remain_time_min"] == 2323


def test_base64_wrapped_message_decodes_like_the_binary_one():
    display = pb.DisplayPropertyUpload(cms_batt_soc=64.0, pow_out_sum_w=10.0)
    binary = envelope(header(display, 254, 21, xor=True))
    (from_binary,) = decode(binary)
    (from_text,) = decode(base64.b64encode(binary))
    assert from_text.values == from_binary.values
    assert from_text.raw["transport"] == "base64"


def test_several_headers_merge_into_one_reading_later_headers_winning():
    cms = pb.CmsHeartbeat(status=pb.CmsStatus(lcd_show_soc=40, f32_lcd_show_soc=40.4,
                                                dsg_remain_time=5939))
    runtime = pb.RuntimePropertyUpload(plug_in_info_ac_in_vol=231.0)
    pack0 = pb.BmsHeartbeat(num=0, soc=41, f32_show_soc=41.2, temp=24)
    pack1 = pb.BmsHeartbeat(num=1, soc=38, temp=22)
    display = pb.DisplayPropertyUpload(cms_batt_soc=40.1, cms_dsg_rem_time=600)
    payload = envelope(
        header(cms, 32, 2, xor=True, seq=9), header(runtime, 254, 22, seq=10, xor=True),
        header(pack0, 32, 50), header(pack1, 32, 50), header(display, 254, 21, device_sn="R631X"),
    )
    (reading,) = decode(payload)
    assert reading.values["soc_percent"] == 40.1
    assert reading.values["remain_time_min"] == 600
    assert reading.values["grid_connected"] is True
    assert reading.values["battery_temp_c"] == 24
    assert reading.soc_modules == {"pack0": 41.2, "pack1": 38}
    assert reading.values["soc_min_percent"] == 38
    assert [h["message"] for h in reading.raw["headers"]] == [
        "CmsHeartbeat", "RuntimePropertyUpload", "BmsHeartbeat", "BmsHeartbeat",
        "DisplayPropertyUpload",
    ]
    assert reading.device_sn == "R631X"


def test_ac_in_flag_alone_is_weak_evidence_for_grid():
    on = pb.DisplayPropertyUpload(plug_in_info_ac_in_flag=1)
    off = pb.DisplayPropertyUpload(plug_in_info_ac_in_flag=0)
    assert decode(envelope(header(on, 254, 21)))[0].values["grid_connected"] is True
    assert decode(envelope(header(off, 254, 21)))[0].values["grid_connected"] is False


def test_ac_in_power_beats_an_ac_in_flag_reading_zero():
    display = pb.DisplayPropertyUpload(plug_in_info_ac_in_flag=0, pow_get_ac_in=1701.0)
    assert decode(envelope(header(display, 254, 21)))[0].values["grid_connected"] is True


def test_river3_plus_ac_in_power_means_grid_although_voltage_and_flag_read_zero():
    """The River 3 Plus capture of PROTOCOL.md: runtime 68 at 0 V and field 61 at 0 while 83 W
    came in on AC: power flowing in is the grid, whatever the voltage field says."""
    runtime = pb.RuntimePropertyUpload(plug_in_info_ac_in_vol=0.0)
    display = pb.DisplayPropertyUpload(plug_in_info_ac_in_flag=0, pow_get_ac_in=83.0)
    (reading,) = decode(envelope(header(runtime, 254, 22, xor=True, seq=3),
                                 header(display, 254, 21, xor=True, seq=4)))
    assert reading.values["grid_connected"] is True
    assert reading.values["ac_in_watts"] == 83


@pytest.mark.parametrize(("volts", "grid"), [(230.0, True), (120.0, True), (7.2, False),
                                            (0.0, False)])
def test_gen3_ac_in_voltage_alone_decides_grid(volts, grid):
    runtime = pb.RuntimePropertyUpload(plug_in_info_ac_in_vol=volts)
    assert decode(envelope(header(runtime, 254, 22)))[0].values["grid_connected"] is grid


def test_gen3_a_few_watts_of_ac_in_with_no_voltage_or_flag_decide_nothing():
    display = pb.DisplayPropertyUpload(pow_get_ac_in=3.0)
    assert "grid_connected" not in decode(envelope(header(display, 254, 21)))[0].values


def test_gen3_not_applicable_discharge_minutes_clear_the_runtime():
    cms = pb.CmsHeartbeat(status=pb.CmsStatus(lcd_show_soc=80, dsg_remain_time=5939))
    values = decode(envelope(header(cms, 32, 2)))[0].values
    assert "remain_time_min" in values and values["remain_time_min"] is None
    charging = pb.DisplayPropertyUpload(cms_dsg_rem_time=0, cms_chg_dsg_state=2)
    values = decode(envelope(header(charging, 254, 21)))[0].values
    assert "remain_time_min" in values and values["remain_time_min"] is None
    discharging = pb.DisplayPropertyUpload(cms_dsg_rem_time=0, cms_chg_dsg_state=1)
    assert decode(envelope(header(discharging, 254, 21)))[0].values["remain_time_min"] == 0


def test_powerstream_charging_battery_clears_the_runtime():
    beat = pb.InverterHeartbeat(bat_input_watts=-223, bat_discharging_time=0)
    values = decode(envelope(header(beat, 20, 1)))[0].values
    assert "remain_time_min" in values and values["remain_time_min"] is None


def test_battery_output_watts_never_decide_grid():
    pack = pb.BmsHeartbeat(num=0, soc=50, output_watts=84, input_watts=0)
    (reading,) = decode(envelope(header(pack, 32, 50)))
    assert "grid_connected" not in reading.values


def test_delta_pro3_sums_both_ac_outlets_and_both_pv_inputs():
    display = pb.DisplayPropertyUpload(pow_get_ac_hv_out=-100.0, pow_get_ac_lv_out=-50.4,
                                       pow_get_pv_h=200.0, pow_get_pv_l=99.6)
    values = decode(envelope(header(display, 254, 21)))[0].values
    assert values["ac_out_watts"] == 150
    assert values["pv_in_watts"] == 300


def test_powerstream_heartbeat_scales_tenths_of_a_watt_and_negative_varints():
    beat = pb.InverterHeartbeat(pv1_input_watts=1190, pv2_input_watts=850, bat_input_watts=-223,
                                bat_soc=51, inv_output_watts=2690, bat_discharging_time=5999)
    (reading,) = decode(envelope(header(beat, 20, 1, device_sn="HW51ZOH4SF4U1217")))
    # batDischargingTime 5999: "not discharging", reported as a cleared runtime (None).
    assert reading.values == {"soc_percent": 51, "soc_min_percent": 51, "pv_in_watts": 204,
                              "ac_out_watts": 269, "remain_time_min": None}
    assert reading.raw["headers"][0]["pdata"]["batInputWatts"] == -223
    assert reading.model == "PowerStream"


def test_topic_serial_wins_over_the_header_serial():
    beat = pb.InverterHeartbeat(bat_soc=10)
    payload = envelope(header(beat, 20, 1, device_sn="HW51AAAA"))
    (reading,) = decode(payload, topic="/app/device/property/HW51BBBB")
    assert reading.device_sn == "HW51BBBB"


def test_known_routes_without_columns_are_kept_as_hex_not_errors():
    (reading,) = decode(envelope(pb.Header(pdata=b"\x08\x01", cmd_func=20, cmd_id=134)))
    assert reading.values == {}
    assert reading.raw["headers"][0]["pdataHex"] == "0801"


def test_unknown_routes_only_is_a_decode_error_naming_them():
    with pytest.raises(DecodeError, match="7/7"):
        decode(envelope(pb.Header(pdata=b"\x08\x01", cmd_func=7, cmd_id=7)))


def test_corrupt_pdata_is_a_decode_error_naming_the_message():
    with pytest.raises(DecodeError, match="254/21"):
        decode(envelope(pb.Header(pdata=b"\x1d\x00", cmd_func=254, cmd_id=21)))


def test_generated_protobuf_code_is_current(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-proto"), str(tmp_path)],
                   check=True, capture_output=True)
    committed = sorted((ROOT / "collector" / "proto").glob("*_pb2.py"))
    assert committed
    for path in committed:
        fresh = tmp_path / path.name
        assert fresh.exists(), f"{path.name}: no .proto generates it any more"
        # protoc stamps its own version in a comment; a newer protoc alone is not staleness.
        strip = lambda text: [ln for ln in text.splitlines() if "Protobuf Python Version" not in ln]  # noqa: E731
        assert strip(fresh.read_text()) == strip(path.read_text()), (
            f"{path.name} is stale: run `make proto` (scripts/gen-proto)"
        )


def test_generated_code_has_no_runtime_version_pin():
    # The package supports protobuf>=5.26,<8: a gencode pin to protoc's version would break that.
    text = (ROOT / "collector" / "proto" / "ecoflow_pb2.py").read_text()
    assert "ValidateProtobufRuntimeVersion" not in text
