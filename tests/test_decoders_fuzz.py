"""Property-based fuzzing: whatever arrives, decode returns readings or raises DecodeError."""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.decoders import COLUMNS, DecodeError, Reading, decode
from collector.proto import ecoflow_pb2 as pb

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=30,
)

# Keys that steer the decoders into every family and envelope branch.
ecoflow_keys = st.sampled_from([
    "pd.soc", "pd.remainTime", "pd.wattsInSum", "pd.usb1Watts", "inv.acInVol", "inv.inputWatts",
    "mppt.inWatts", "mppt.pv2InWatts", "ems.f32LcdShowSoc", "bmsMaster.soc",
    "bms_emsStatus.lcdShowSoc", "bms_bmsStatus.f32ShowSoc", "bms_kitInfo.watts",
    "20_1.batSoc", "20_1.pv1InputWatts", "2_1.watts", "cmsBattSoc", "powInSumW",
    "powGetAcHvOut", "plugInInfoAcInFlag", "soc", "remainTime",
])
quota_maps = st.dictionaries(ecoflow_keys | st.text(max_size=10), json_values, max_size=8)
envelopes = st.one_of(
    quota_maps,
    st.fixed_dictionaries({"params": quota_maps}),
    st.fixed_dictionaries({"typeCode": st.text(max_size=10) | st.just("pdStatus"),
                           "params": st.dictionaries(st.text(max_size=10), json_values)}),
    st.fixed_dictionaries({"cmdFunc": json_values, "cmdId": json_values, "param": quota_maps}),
    st.fixed_dictionaries({"code": json_values, "data": json_values | quota_maps}),
    st.fixed_dictionaries({"data": st.fixed_dictionaries(
        {"online": json_values, "quotaMap": json_values | quota_maps, "sn": json_values,
         "productType": json_values})}),
)


def check(payload: bytes, topic: str | None = None) -> None:
    try:
        readings = decode(payload, topic=topic)
    except DecodeError as exc:
        assert str(exc)
        return
    for reading in readings:
        assert isinstance(reading, Reading)
        assert set(reading.values) <= set(COLUMNS)
        # A value, or None for a column the payload clears ("not applicable"): no markers.
        assert all(v is None or type(v) in (bool, int, float) or isinstance(v, float)
                   for v in reading.values.values()), reading.values
        json.dumps(reading.to_json())


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_decode_error(payload):
    check(payload)


@FUZZ
@given(json_values)
def test_random_json_only_ever_raises_decode_error(document):
    check(json.dumps(document).encode())


@FUZZ
@given(envelopes, st.none() | st.text(max_size=40) | st.just("/app/device/property/R351ABC"))
def test_ecoflow_shaped_json_with_random_values_only_ever_raises_decode_error(document, topic):
    check(json.dumps(document).encode(), topic)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([(254, 21), (254, 22), (32, 2), (32, 50), (20, 1),
                                           (2, 1), (20, 134), (0, 0)]),
                          st.binary(max_size=64), st.integers(0, 2), st.integers(-2**31, 2**31 - 1)),
                min_size=1, max_size=4),
       st.booleans())
def test_random_pdata_in_real_headers_only_ever_raises_decode_error(headers, as_base64):
    message = pb.HeaderMessage(header=[
        pb.Header(pdata=pdata, cmd_func=route[0], cmd_id=route[1], enc_type=enc, seq=seq)
        for route, pdata, enc, seq in headers
    ]).SerializeToString()
    check(base64.b64encode(message) if as_base64 else message)
