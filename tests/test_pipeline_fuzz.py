"""Whatever arrives, the pipeline turns it into rows or an ingest_errors entry: no exception
escapes and no payload disappears."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.pipeline import Pipeline
from collector.writer import Writer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner,
                                                                 max_size=6),
    max_leaves=20,
)
payloads = st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(payloads, min_size=1, max_size=10))
def test_every_payload_becomes_rows_or_a_dead_letter(db_url, db, batch):
    writer = Writer(db_url)
    pipeline = Pipeline(writer)
    acked = []
    before = db.execute("SELECT (SELECT count(*) FROM ingest_errors),"
                        " (SELECT count(*) FROM ecoflow_measurements)").fetchone()
    rows = dead = 0
    for i, payload in enumerate(batch):
        errors_before = writer.errors_written + len(writer._errors)
        produced = pipeline.handle(payload, "bridge-ecoflow/R351FUZZ000001/data", "bridge",
                                   on_commit=lambda i=i: acked.append(i))
        dead_letter = writer.errors_written + len(writer._errors) > errors_before
        # Exactly one outcome per payload: rows, or a dead letter, or (for a device's
        # "offline" reply, which carries no reading) neither.
        assert not (produced and dead_letter)
        if not produced and not dead_letter:
            assert _says_offline(payload), payload
        rows += produced
        dead += dead_letter
    writer.flush()
    writer.stop()
    after = db.execute("SELECT (SELECT count(*) FROM ingest_errors),"
                       " (SELECT count(*) FROM ecoflow_measurements)").fetchone()
    assert acked == list(range(len(batch)))
    assert after[0] - before[0] == dead
    # Random payloads may repeat a timestamp, and duplicates are dropped by design.
    assert after[1] - before[1] == writer.rows_written <= rows


def _says_offline(payload: bytes) -> bool:
    from collector.decoders import decode

    readings = decode(payload, topic="bridge-ecoflow/R351FUZZ000001/data")
    return all(r.online is False for r in readings)


def test_payloads_jsonb_cannot_store_are_dead_letters_and_do_not_block_the_batch(db_url, db):
    """NaN, Infinity and \\u0000 decode in Python but PostgreSQL's jsonb refuses them; one such
    row must not fail its batch forever."""
    topic = "bridge-ecoflow/R351FUZZ000002/data"
    bad = [b'{"params": {"bms_emsStatus.f32LcdShowSoc": NaN}}',
           b'{"params": {"pd.wattsOutSum": Infinity}}',
           b'{"params": {"bms_emsStatus.f32LcdShowSoc": 50, "pd.note": "a\\u0000b"}}']
    good = b'{"params": {"bms_emsStatus.f32LcdShowSoc": 42}}'
    writer = Writer(db_url)
    pipeline = Pipeline(writer)
    acked = []
    outcomes = [pipeline.handle(p, topic, "bridge", on_commit=lambda i=i: acked.append(i))
                for i, p in enumerate(bad + [good])]
    writer.flush()
    writer.stop()
    assert outcomes == [0, 0, 0, 1]
    assert acked == [0, 1, 2, 3]
    stored = db.execute("SELECT soc_percent FROM ecoflow_measurements WHERE device_sn ="
                        " 'R351FUZZ000002'").fetchall()
    assert stored == [(42,)]
    errors = db.execute("SELECT payload FROM ingest_errors WHERE topic = %s ORDER BY id",
                        (topic,)).fetchall()
    assert [bytes(e[0]) for e in errors] == bad


def test_readings_the_database_refuses_or_cannot_hold_lose_nothing(db_url, db):
    """A lone surrogate escape decodes in Python and is refused by jsonb only when the row is
    written: the row goes to ingest_errors with its payload and the rest of the batch is
    stored. A power no integer column holds counts as not reported."""
    topic = "bridge-ecoflow/R351FUZZ000003/data"
    payloads = [b'{"timestamp": 1767225600000, "params": {"bms_emsStatus.f32LcdShowSoc": 50,'
                b' "pd.wattsOutSum": 120}}',
                b'{"timestamp": 1767225601000, "params": {"bms_emsStatus.f32LcdShowSoc": 51,'
                b' "pd.wattsOutSum": 1e15}}',
                b'{"timestamp": 1767225602000, "params": {"bms_emsStatus.f32LcdShowSoc": 52,'
                b' "pd.name": "\\ud800"}}',
                b'{"timestamp": 1767225603000, "params": {"bms_emsStatus.f32LcdShowSoc": 53}}']
    writer = Writer(db_url)
    pipeline = Pipeline(writer)
    acked = []
    for i, p in enumerate(payloads):
        pipeline.handle(p, topic, "bridge", on_commit=lambda i=i: acked.append(i))
    writer.flush()
    writer.stop()
    assert acked == [0, 1, 2, 3]
    assert db.execute("SELECT soc_percent, watts_out_sum FROM ecoflow_measurements"
                      " WHERE device_sn = 'R351FUZZ000003' ORDER BY ts").fetchall() == [
        (50, 120), (51, 120), (53, 120)]
    [(payload, error)] = db.execute("SELECT payload, error FROM ingest_errors WHERE topic = %s",
                                    (topic,)).fetchall()
    assert bytes(payload) == payloads[2]
    assert "the database refused the reading" in error
