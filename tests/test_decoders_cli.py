"""The decode command: what the collector would store for one captured payload, or why not."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from collector.decode_cli import main
from collector.rows import VALUE_COLUMNS

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


# -- several payloads: the rows the collector would write (issue 15, item 6) ------------------
OPEN_TOPIC = "/open/account/R351ZSM00000001/quota"


def fixture_document(name: str) -> dict:
    return json.loads((PAYLOADS / name).read_text())


def test_decode_of_a_directory_prints_the_merged_rows_in_order(capsys, tmp_path):
    """bmsStatus -> kitInfo -> emsStatus, one file each, named in the order they arrive: three
    rows, each the complete snapshot the collector stores, with the columns a row only carries
    over from an earlier message marked, and a "not applicable" runtime marked cleared."""
    for i, name in enumerate(("delta2max_open_mqtt_4_bmsStatus.json",
                              "delta2max_open_mqtt_7_kitInfo.json",
                              "delta2max_open_mqtt_5_emsStatus.json"), 1):
        (tmp_path / f"{i}-{name}").write_text((PAYLOADS / name).read_text())
    status, rows = run(capsys, "--topic", OPEN_TOPIC, str(tmp_path))
    assert status == 0
    assert [r["payloads"] for r in rows] == [["1-delta2max_open_mqtt_4_bmsStatus.json"],
                                             ["2-delta2max_open_mqtt_7_kitInfo.json"],
                                             ["3-delta2max_open_mqtt_5_emsStatus.json"]]
    assert {r["device_sn"] for r in rows} == {"R351ZSM00000001"}
    # The lowest pack over the snapshot, not the headline SoC of the last message (item 3).
    assert [r["values"]["soc_min_percent"] for r in rows] == [
        pytest.approx(82.6), pytest.approx(26.25), pytest.approx(26.25)]
    # kitInfo names no headline SoC: the stored row carries the bmsStatus one over.
    assert rows[1]["values"]["soc_percent"] == pytest.approx(82.6)
    assert "soc_percent" in rows[1]["carried_over"]
    assert rows[0]["carried_over"] == []
    # emsStatus gives only the headline SoC: the snapshot keeps the extra battery's 26.25 %.
    assert "soc_min_percent" in rows[2]["carried_over"]
    for row in rows:
        assert set(row["values"]) == set(VALUE_COLUMNS)
        for column in row["carried_over"]:
            assert row["values"][column] is not None
    assert [r["received_at"] for r in rows] == sorted(r["received_at"] for r in rows)


def test_decode_of_json_lines_merges_distinct_messages_of_the_same_second(capsys, tmp_path):
    """App pushes carry whole seconds (item 1): two different pushes in the same second become
    one row, newest value winning, naming both payloads; a redelivery of the first adds
    nothing. The same payloads as a JSON array give the same rows."""
    document = fixture_document("river2pro_app_mqtt_2.json")
    first = document["payload"]
    second = json.loads(json.dumps(first))
    second["params"] = {"bms_emsStatus.f32LcdShowSoc": 42, "bms_emsStatus.lcdShowSoc": 42}
    lines = tmp_path / "pushes.jsonl"
    lines.write_text("\n".join(json.dumps(p) for p in (first, second, first)) + "\n")
    status, rows = run(capsys, "--topic", document["topic"], str(lines))
    assert status == 0
    (row,) = rows
    assert row["payloads"] == ["pushes.jsonl#1", "pushes.jsonl#2"]
    assert row["values"]["soc_percent"] == 42
    assert row["ts"].startswith("2024-01-03T10:43:15")
    assert row["carried_over"] == []
    array = tmp_path / "pushes.json"
    array.write_text(json.dumps([first, second, first]))
    status, again = run(capsys, "--topic", document["topic"], str(array))
    assert status == 0
    assert [r["values"] for r in again] == [row["values"]]


def test_decode_of_several_payloads_marks_carried_over_and_cleared_columns(capsys, tmp_path):
    """A discharge estimate, then a push saying "not discharging" (5999), then a power-only
    push: the runtime is cleared (item 4), never carried over, and SoC is carried."""
    base = {"addr": 0, "cmdFunc": 0, "cmdId": 0, "version": "1.0", "moduleType": "2"}
    pushes = [
        dict(base, id=1, timestamp=1704278595, params={"bms_emsStatus.f32LcdShowSoc": 60,
                                                       "bms_emsStatus.dsgRemainTime": 90,
                                                       "bms_emsStatus.chgRemainTime": 5999}),
        dict(base, id=2, timestamp=1704278600, params={"bms_emsStatus.dsgRemainTime": 5999,
                                                       "bms_emsStatus.chgRemainTime": 5999}),
        dict(base, id=3, timestamp=1704278605, moduleType="1",
             params={"pd.wattsOutSum": 120, "pd.wattsInSum": 0}),
    ]
    path = tmp_path / "sequence.json"
    path.write_text(json.dumps(pushes))
    status, rows = run(capsys, "--topic", "/app/device/property/R621ZEB4XECV1192", str(path))
    assert status == 0
    assert [r["values"]["remain_time_min"] for r in rows] == [90, None, None]
    assert "remain_time_min" in rows[1]["cleared"]
    assert "remain_time_min" not in rows[2]["carried_over"]
    assert [r["values"]["soc_percent"] for r in rows] == [60, 60, 60]
    assert "soc_percent" in rows[1]["carried_over"] and "soc_percent" in rows[2]["carried_over"]
    assert rows[2]["values"]["watts_out_sum"] == 120
    assert "watts_out_sum" not in rows[2]["carried_over"]


def test_decode_of_several_payloads_shows_a_dead_letter_in_its_place(capsys, tmp_path):
    (tmp_path / "1.json").write_text((PAYLOADS / "delta2max_open_mqtt_4_bmsStatus.json")
                                     .read_text())
    (tmp_path / "2.bin").write_bytes(b"\x0a\x05abc")
    (tmp_path / "3.json").write_text((PAYLOADS / "delta2max_open_mqtt_5_emsStatus.json")
                                     .read_text())
    status, rows = run(capsys, "--topic", OPEN_TOPIC, str(tmp_path))
    assert status == 1
    assert [r["payloads"] for r in rows] == [["1.json"], ["2.bin"], ["3.json"]]
    assert "HeaderMessage" in rows[1]["dead_letter"]
    assert "dead_letter" not in rows[0] and "dead_letter" not in rows[2]


def test_decode_rows_of_one_payload(capsys):
    """--rows for one payload: the row it is stored as; without a serial in the topic or the
    payload it would be a dead letter, and decode says so."""
    status, rows = run(capsys, "--rows", str(PAYLOADS / "river2pro_app_mqtt_2.json"))
    assert status == 0
    (row,) = rows
    assert row["device_sn"] == "R621ZEB4XECV1192" and row["source"] == "app_mqtt"
    assert row["values"]["soc_percent"] == 100 and row["carried_over"] == []
    assert "remain_time_min" in row["cleared"]
    status, rows = run(capsys, "--rows", str(PAYLOADS / "delta2_app_mqtt_1.json"))
    assert status == 1
    assert rows[0]["dead_letter"] == "no serial number in the topic or the payload"
