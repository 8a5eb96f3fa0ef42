"""The writer's binary COPY stores exactly what its text COPY stored: the same values with
awkward inputs (NULLs in every column, integer limits, NaN and infinity, float4 rounding,
unicode and NUL in payloads, microsecond times, received_at set or not). Every test runs in
both formats (`collector.writer.BINARY_COPY`) and states the stored values; the text format is
how the collector wrote before binary COPY, so a difference shows as a failure of one of them."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

from collector import writer as writer_module
from collector.pipeline import Pipeline
from collector.rows import VALUE_COLUMNS, Row, SnapshotMerger, binary_safe
from collector.writer import Writer, _binary

T0 = datetime(2026, 5, 1, 10, 0, 0, 123456, tzinfo=timezone.utc)
US = timedelta(microseconds=1)
SELECT = ("SELECT ts, device_sn, " + ", ".join(VALUE_COLUMNS)
          + ", source, raw_data, received_at FROM ecoflow_measurements ORDER BY device_sn, ts")


@pytest.fixture(params=["binary", "text"])
def copy_format(request, monkeypatch):
    monkeypatch.setattr(writer_module, "BINARY_COPY", request.param == "binary")
    return request.param


def write(db_url: str, rows: list[Row]) -> None:
    w = Writer(db_url)
    for r in rows:
        w.add(r)
    w.flush()
    w.stop()


def row(i: int, sn: str = "SNBIN1", raw: dict | None = None, received_at=None,
        **values) -> Row:
    return Row(ts=T0 + i * US, device_sn=sn, source="bridge", raw_data=raw or {"i": i},
               values=values, model="DELTA 2", received_at=received_at)


def test_nulls_in_every_column_and_received_at_null_or_set(db_url, db, copy_format):
    received = datetime(2026, 5, 1, 10, 0, 1, 999999, tzinfo=timezone.utc)
    write(db_url, [row(0, sn="SNNULL1"), row(1, sn="SNNULL2", received_at=received)])
    got = db.execute(SELECT).fetchall()
    nulls = (None,) * len(VALUE_COLUMNS)
    assert got == [(T0, "SNNULL1", *nulls, "bridge", {"i": 0}, None),
                   (T0 + US, "SNNULL2", *nulls, "bridge", {"i": 1}, received)]


def test_integer_limits_and_numbers_no_column_holds(db_url, db, copy_format):
    """The largest integers a column holds are stored; NaN, infinity and integers beyond the
    column are not reported (the snapshot keeps the last known value, here none: NULL)."""
    big = 2**31 - 1
    write(db_url, [
        row(0, watts_in_sum=big, watts_out_sum=-big, remain_time_min=0, ac_in_watts=big),
        row(1, sn="SNNAN", soc_percent=math.nan, battery_temp_c=math.inf,
            watts_in_sum=math.nan, watts_out_sum=2**31, pv_in_watts=-math.inf),
    ])
    got = {r[0]: r[1:] for r in db.execute(
        "SELECT device_sn, watts_in_sum, watts_out_sum, remain_time_min, ac_in_watts,"
        " soc_percent, battery_temp_c, pv_in_watts FROM ecoflow_measurements")}
    assert got == {"SNBIN1": (big, -big, 0, big, None, None, None),
                   "SNNAN": (None, None, None, None, None, None, None)}


def test_reals_round_to_float4_as_from_their_text(db_url, db, copy_format):
    """Every SoC a decoder can produce (0.00 to 100.00), and doubles on a float4 rounding
    edge, store the float4 that PostgreSQL parses from the value's text."""
    tie = 1 + 2**-24  # exactly halfway between two float4s
    socs = [k / 100 for k in range(10001)]
    rows = [row(i, sn="SNSOC", soc_percent=v) for i, v in enumerate(socs)]
    odd = [tie, 25.000000059604645, 0.1, -0.0, 1e-29, 9.99e29, 2**53 + 1, 10**15, 37]
    rows += [row(i, sn="SNODD", battery_temp_c=v) for i, v in enumerate(odd)]
    write(db_url, rows)
    expected = db.execute(
        "SELECT array_agg(v::text::real ORDER BY o) FROM unnest(%s::text[]) WITH ORDINALITY"
        " AS t(v, o)", ([repr(v) for v in socs + odd],)).fetchone()[0]
    stored = [r[0] for r in db.execute(
        "SELECT coalesce(soc_percent, battery_temp_c) FROM ecoflow_measurements"
        " ORDER BY device_sn = 'SNODD', ts")]
    assert stored == expected
    assert math.copysign(1, stored[len(socs) + 3]) == -1  # -0.0 stays negative


def test_payload_text_unicode_and_nul_are_kept_as_received(db_url, db, copy_format):
    """raw_data is the payload's JSON as received, unicode and escapes included; a payload
    jsonb cannot hold (\\u0000) is a dead letter with its bytes, in either format."""
    topic = "bridge-ecoflow/R351BINARY0001/data"
    good = ('{"timestamp": 1767225600000, "params": {"bms_emsStatus.f32LcdShowSoc": 50,'
            ' "pd.name": "Stéphane ☃ 😀 \\"q\\" \\\\ \\n\\t", "pd.big": 123456789012345678901234567890,'
            ' "pd.tiny": 1e-400}}').encode()
    nul = b'{"timestamp": 1767225601000, "params": {"pd.name": "a\\u0000b"}}'
    w = Writer(db_url)
    pipeline = Pipeline(w)
    assert [pipeline.handle(p, topic, "bridge") for p in (good, nul)] == [1, 0]
    w.flush()
    w.stop()
    [(raw, text, soc)] = db.execute(
        "SELECT raw_data, raw_data::text, soc_percent FROM ecoflow_measurements"
        " WHERE device_sn = 'R351BINARY0001'").fetchall()
    assert raw["params"]["pd.name"] == 'Stéphane ☃ 😀 "q" \\ \n\t'
    assert raw["params"]["pd.big"] == 123456789012345678901234567890
    assert db.execute("SELECT %s::text::jsonb::text", (good.decode(),)).fetchone()[0] == text
    assert soc == 50
    assert [bytes(p) for (p,) in db.execute(
        "SELECT payload FROM ingest_errors WHERE topic = %s", (topic,))] == [nul]


def test_microsecond_times_survive(db_url, db, copy_format):
    received = T0 + timedelta(seconds=2, microseconds=1)
    write(db_url, [row(i, received_at=received + i * US, soc_percent=50) for i in range(3)])
    assert db.execute("SELECT ts, received_at FROM ecoflow_measurements ORDER BY ts"
                      ).fetchall() == [(T0 + i * US, received + i * US) for i in range(3)]


def test_a_value_of_another_type_than_its_column_is_decided_by_the_database(db_url, db,
                                                                               copy_format):
    """A float in an integer column or a number in the boolean one (no decoder makes such a
    value) is sent as text, so the database decides as before: it refuses the row, which
    goes to ingest_errors; the rest of the batch is stored."""
    write(db_url, [row(0, soc_percent=40), row(1, ac_out_watts=12.5),
                   row(2, sn="SNBOOL", grid_connected=5), row(3, sn="SNOK", soc_percent=41)])
    assert db.execute("SELECT device_sn, soc_percent FROM ecoflow_measurements ORDER BY ts"
                      ).fetchall() == [("SNBIN1", 40), ("SNOK", 41)]
    errors = [e for (e,) in db.execute("SELECT error FROM ingest_errors")]
    assert len(errors) == 2
    assert all("the database refused the reading" in e for e in errors)


def test_binary_copy_is_chosen_only_for_rows_it_stores_as_text_copy_would():
    merger = SnapshotMerger()

    def merged(sn: str, **values) -> Row:
        r = row(0, sn=sn)
        r.values = merger.merge(sn, values)
        r.binary = merger.binary_safe(sn)
        return r

    assert _binary([merged("A", soc_percent=50.5, watts_in_sum=3, grid_connected=True)])
    odd = merged("B", ac_out_watts=12.5)
    assert not _binary([odd])
    # Once the odd value is replaced, the device's rows go binary again.
    assert _binary([merged("B", ac_out_watts=12)])
    naive = merged("C", soc_percent=1.0)
    naive.ts = naive.ts.replace(tzinfo=None)
    assert not _binary([naive])
    assert not binary_safe("battery_temp_c", 1 + 2**-24)
    assert binary_safe("battery_temp_c", 1 + 2**-23)
    assert not binary_safe("soc_percent", 2**53 + 1)
    assert not binary_safe("watts_in_sum", True)
