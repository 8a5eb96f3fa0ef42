"""The JSON parse (orjson, with Python's json wherever the two could differ) gives every payload
exactly the document Python's json gives it: same values, same types, same refusals."""

from __future__ import annotations

import json
import math

import pytest

from collector.decoders import registry
from tests.test_decoders import FIXTURES, load

REFERENCE = json.JSONDecoder(parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


def reference(payload: bytes):
    if payload.lstrip()[:1] not in (b"{", b"["):
        return None, None
    try:
        text = payload.decode("utf-8")
        return REFERENCE.decode(text), text
    except (UnicodeDecodeError, ValueError):
        return None, None


def same(a, b) -> bool:
    """Equal with the same types all the way down (1 and 1.0 differ; NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


AWKWARD = [
    b'{"a": 123456789012345678901234567890}',  # beyond 64 bits: orjson would give a float
    b'{"a": -9223372036854775809, "b": 18446744073709551615, "c": -9223372036854775808}',
    b'{"a": 1234567890123456789.5}',
    b'{"a": 1e400, "b": -1e400, "c": 1e-400}',  # json: inf, -inf, 0.0
    b'{"a": "\\ud800"}', b'{"a": "\\udfff\\u0000\\ud800"}',  # lone surrogates
    b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
    b'{"a": 1, "a": 2}', b'{"a": -0, "b": -0.0, "c": 1E2, "d": 0.1}',
    b'{"a": "\\u0000", "b": "St\\u00e9phane \xe2\x98\x83"}',
    b'  {"a": 1} \n', b'[1, 2.5, "x", null, true]', b'{"a": [}', b'{"a": "\xff"}',
    b'{"params":' * 3000 + b"1" + b"}" * 3000,
    b'{"a": "tab\there"}', b"{'a': 1}", b'{"a": 01}', b"{}", b"[]",
]


@pytest.mark.parametrize("payload", AWKWARD, ids=range(len(AWKWARD)))
def test_awkward_payloads_parse_as_pythons_json_parses_them(payload):
    try:
        expected = reference(payload)
    except RecursionError:
        with pytest.raises(RecursionError):
            registry._as_json(payload)
        return
    got = registry._as_json(payload)
    assert same(got, expected)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_payloads_parse_as_pythons_json_parses_them(name):
    document = load(name)
    payload = document.get("payload")
    if payload is None:
        pytest.skip("not a JSON payload")
    for encoded in (json.dumps(payload).encode(), json.dumps(payload, indent=1).encode()):
        assert same(registry._as_json(encoded), reference(encoded))
