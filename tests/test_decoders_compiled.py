"""The compiled key-to-column tables (collector.decoders.compiled) decode exactly what running
every rule decodes: on what each captured payload (both fixture folders, JSON and protobuf)
hands its family's table, and on random key subsets with awkward values. A rule that reads a
key it does not declare would be skipped for a message carrying only that key; the recording
test catches it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.decode_cli import payload_from_fixture
from collector.decoders import (
    compiled,
    decode,
    delta_gen1,
    delta_gen2,
    gen3,
    powerstream,
    river_gen1,
    stream,
)
from collector.rows import HeadlineSoc
from tests.test_decoders_families import protobuf_payload

FIXTURES = Path(__file__).parent / "fixtures"
# Every table, by name: a family whose decoding depends on the model has one per model group.
TABLES = {delta_gen2.FAMILY: delta_gen2.TABLE, river_gen1.FAMILY: river_gen1.TABLE,
          powerstream.FAMILY: powerstream.TABLE, gen3.FAMILY: gen3.TABLE,
          stream.FAMILY: stream.TABLE,
          **{f"{delta_gen1.FAMILY} (PV x{scale})": table
             for scale, table in delta_gen1.TABLES.items()}}


def _same(a, b) -> bool:
    """Equal values of equal types, in the same column order (NaN never reaches a column)."""
    (va, pa), (vb, pb) = a, b
    return (list(va) == list(vb) and pa == pb
            and all(type(va[k]) is type(vb[k]) and va[k] == vb[k] for k in va))


def _family_fields():
    """(table name, the key map it was given) for every table call decoding the captures
    makes: recorded at `Table.decode`, so a map is exactly what the decoders hand over."""
    names = {id(table): name for name, table in TABLES.items()}
    calls: list[tuple[str, dict]] = []
    original = compiled.Table.decode

    def recording(table, fields):
        calls.append((names[id(table)], fields))
        return original(table, fields)

    out = []
    compiled.Table.decode = recording
    try:
        for path in sorted([*FIXTURES.glob("payloads/*.json"),
                            *FIXTURES.glob("families/*.json")]):
            document = json.loads(path.read_text())
            if "message_type" in document:  # a decoded protobuf message (families/)
                found = (protobuf_payload(document), document.get("topic"))
            else:
                found = payload_from_fixture(document)
            if found is None:
                continue
            calls.clear()
            try:
                decode(found[0], topic=found[1])
            except ValueError:
                continue
            out += [pytest.param(name, fields, id=f"{path.stem}-{i}")
                    for i, (name, fields) in enumerate(calls)]
    finally:
        compiled.Table.decode = original
    return out


FAMILY_FIELDS = _family_fields()


def test_fixtures_of_every_compiled_family_are_found():
    assert {p.values[0] for p in FAMILY_FIELDS} == set(TABLES)
    assert len(FAMILY_FIELDS) >= 30


@pytest.mark.parametrize(("family", "fields"), FAMILY_FIELDS)
def test_a_capture_decodes_as_with_every_rule(family, fields):
    table = TABLES[family]
    assert _same(table.decode(fields), table.decode_all(fields))


@pytest.mark.parametrize(("family", "fields"), FAMILY_FIELDS)
def test_every_key_a_rule_reads_is_declared(family, fields):
    table = TABLES[family]
    packs = table.packs(fields.get)
    for r in table.rules:
        read: set[str] = set()

        def get(key, default=None, read=read):
            read.add(key)
            return fields.get(key, default)

        r.value(get, packs)
        assert read <= r.keys, f"{r.column} reads undeclared keys {read - r.keys}"
    read = set()
    table.packs(lambda key, default=None: read.add(key) or fields.get(key, default))
    assert read <= table.pack_keys


_NUMBERS = st.one_of(
    st.integers(-10, 300), st.integers(-2**63, 2**63), st.integers(2**53 - 3, 2**53 + 3),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-1, 101),
    st.sampled_from([0, 2, 5999, 5939, 143999, -5999, 230000, 49999, 50001, 0.5, 100.0]))
_VALUES = st.one_of(_NUMBERS, st.none(), st.booleans(), st.text(max_size=3),
                    st.lists(st.fixed_dictionaries({"avaFlag": st.sampled_from([0, 1]),
                                                    "f32Soc": _NUMBERS, "soc": _NUMBERS}),
                             max_size=3))
_SCALARS = st.one_of(_NUMBERS, st.none(), st.booleans(), st.text(max_size=3))
# The gen-3 CMS status and BMS heartbeats the protobuf decoder hands over beside the fields.
_PART_VALUES = {
    gen3.CMS: st.dictionaries(st.sampled_from(["f32LcdShowSoc", "lcdShowSoc", "dsgRemainTime",
                                               "chgRemainTime"]), _SCALARS, max_size=3),
    gen3.BMS: st.lists(st.dictionaries(st.sampled_from(["f32ShowSoc", "soc", "num", "temp"]),
                                       _SCALARS, max_size=4), max_size=3),
}


@st.composite
def _messages(draw):
    table = TABLES[draw(st.sampled_from(sorted(TABLES)))]
    keys = draw(st.lists(st.sampled_from(sorted(table.keys, key=repr)), unique=True,
                         max_size=8))
    extra = draw(st.lists(st.sampled_from(["pd.other", "inv.cfgAcEnabled", "x", "batTemp"]),
                          unique=True, max_size=2))
    fields = {k: draw(_PART_VALUES.get(k, _VALUES)) for k in [*keys, *extra]}
    return table, fields


@settings(max_examples=1000, deadline=None)
@given(_messages())
def test_random_key_subsets_decode_as_with_every_rule(message):
    table, fields = message
    first = table.decode(fields)
    assert _same(first, table.decode_all(fields))
    assert _same(table.decode(fields), first)  # the plan reused for the same keys


def test_nothing_known_gives_no_columns():
    for table in TABLES.values():
        assert table.decode({}) == ({}, {})
        assert table.decode({"pd.unknownKey": 5}) == ({}, {})


def test_the_headline_soc_stands_in_for_the_packs_only_without_packs():
    values, packs = delta_gen2.decode({"bms_emsStatus.f32LcdShowSoc": 55.126}, None)
    assert values == {"soc_percent": 55.13, "soc_min_percent": 55.13} and packs == {}
    assert isinstance(values["soc_min_percent"], HeadlineSoc)
    values, packs = delta_gen2.decode({"bms_emsStatus.f32LcdShowSoc": 55,
                                       "bms_bmsStatus.soc": 41}, None)
    assert values["soc_min_percent"] == 41 and not isinstance(values["soc_min_percent"],
                                                               HeadlineSoc)
    assert not math.isnan(values["soc_percent"])


def test_the_plans_kept_stay_bounded_and_right_past_the_limit(monkeypatch):
    """A bridge that sends ever new key sets (unknown keys beside known ones) does not grow the
    plan cache past PLAN_CACHE_SIZE, and a plan built again after the cache was emptied
    decodes as before."""
    from collector.decoders import compiled

    monkeypatch.setattr(compiled, "PLAN_CACHE_SIZE", 16)
    table = delta_gen2.TABLE
    table._plans.clear()
    for i in range(40):
        fields = {"pd.wattsOutSum": i, f"pd.unknown{i}": 1, "inv.acInVol": 230000}
        assert table.decode(fields) == ({"watts_out_sum": i, "grid_connected": True}, {})
        assert len(table._plans) <= 16
