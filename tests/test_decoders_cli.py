"""The decode command: what the collector would store for one captured payload, or why not."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from collector.decode_cli import main

PAYLOADS = Path(__file__).resolve().parent / "fixtures" / "payloads"


def run(capsys, *argv: str) -> tuple[int, object]:
    status = main(list(argv))
    return status, json.loads(capsys.readouterr().out)


def test_decode_prints_the_reading_of_a_fixture_file(capsys):
    status, out = run(capsys, str(PAYLOADS / "delta2_app_mqtt_1.json"))
    assert status == 0
    (reading,) = out
    assert reading["values"]["watts_out_sum"] == 344
    assert reading["family"] == "delta_gen2"
    assert reading["raw"]["operateType"] == "latestQuotas"


def test_decode_takes_the_serial_from_topic_for_a_plain_json_payload(capsys, tmp_path):
    document = json.loads((PAYLOADS / "river2pro_app_mqtt_2.json").read_text())["payload"]
    path = tmp_path / "push.json"
    path.write_text(json.dumps(document))
    status, out = run(capsys, "--topic", "/app/device/property/R621ZEB4XECV1192", str(path))
    assert status == 0
    assert out[0]["device_sn"] == "R621ZEB4XECV1192"
    assert out[0]["ts"].startswith("2024-01-03")


def test_decode_reads_binary_raw_hex_and_base64_alike(capsys, tmp_path):
    hex_text = json.loads((PAYLOADS / "powerstream_protobuf_3.json").read_text())["payload_hex"]
    raw = bytes.fromhex(hex_text)
    outputs = []
    for name, content in (("raw.bin", raw), ("hex.txt", hex_text.encode() + b"\n"),
                          ("b64.txt", base64.b64encode(raw))):
        path = tmp_path / name
        path.write_bytes(content)
        status, out = run(capsys, str(path))
        assert status == 0, name
        outputs.append(out[0]["values"])
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0]["pv_in_watts"] == 23


def test_decode_rebuilds_the_envelope_for_inner_pdata_captures(capsys):
    status, out = run(capsys, str(PAYLOADS / "river3_protobuf_1_cms_heartbeat.json"))
    assert status == 0
    assert out[0]["values"]["remain_time_min"] == 2323


def test_decode_prints_a_not_applicable_runtime_as_an_explicit_null(capsys):
    """5999 minutes ("not discharging"): the column is in the output, null, because the
    collector stores NULL for it rather than keeping the last discharge figure."""
    status, out = run(capsys, str(PAYLOADS / "river2pro_app_mqtt_1.json"))
    assert status == 0
    assert "remain_time_min" in out[0]["values"] and out[0]["values"]["remain_time_min"] is None


def test_decode_says_device_offline_for_an_offline_reply(capsys):
    status, out = run(capsys, str(PAYLOADS / "deltamax_app_mqtt_2_offline.json"))
    assert status == 0
    assert out[0]["online"] is False
    assert out[0]["values"] == {}


def test_decode_prints_the_reason_when_it_cannot_decode(capsys, tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x0a\x05abc")
    status, out = run(capsys, str(path))
    assert status == 1
    assert "HeaderMessage" in out["error"]


def test_decode_reports_a_truncated_capture(capsys, tmp_path):
    document = json.loads(
        (PAYLOADS / "deltapro3_protobuf_2_get_reply_truncated.json").read_text()
    )
    path = tmp_path / "truncated.b64"
    path.write_text(document["payload_b64"])
    status, out = run(capsys, str(path))
    assert status == 1
    assert "error" in out


def test_decode_of_a_missing_file_exits_2(capsys, tmp_path):
    assert main([str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
