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


def test_deeply_nested_json_is_a_dead_letter_logged_in_one_line(db_url, db, caplog):
    writer = Writer(db_url)
    pipeline = Pipeline(writer)
    deep = b'{"params":' * 5000 + b"1" + b"}" * 5000
    for _ in range(3):
        assert pipeline.handle(deep, "bridge-ecoflow/R351FUZZ000004/data", "bridge") == 0
    writer.flush()
    writer.stop()
    assert [bytes(p) for (p,) in db.execute("SELECT payload FROM ingest_errors")] == [deep] * 3
    assert not [r for r in caplog.records if r.exc_info]
    assert all(len(r.getMessage()) < 1000 for r in caplog.records)


POISON = [
    b'{"code":1,"message":"\\u0000"}',  # the payload that wedged the collector (issue 15)
    b'{"code":"\\u0000","message":"\\ud800"}',
    b'{"code":1,"message":"\\udfff\\u0000\\ud800"}',
    b'{"params":' * 3000 + b"1" + b"}" * 3000,
    b"[" * 100_000,
    b"\x00" * 16,
    b"\xff\xfe\xfd not utf-8",
    b'{"params": {"bms_emsStatus.f32LcdShowSoc": NaN}}',
    b'{"timestamp": 1767225600000, "params": {"bms_emsStatus.f32LcdShowSoc": 5,'
    b' "pd.name": "\\ud800"}}',
    b'{"sn": "\\u0000", "params": {"bms_emsStatus.f32LcdShowSoc": 50}}',
    b'{"sn": "\\ud800", "params": {"bms_emsStatus.f32LcdShowSoc": 50}}',
]


def _random_payloads(seed: int, count: int) -> list[bytes]:
    """Payloads made of what databases and decoders trip over: NUL, lone surrogates, invalid
    UTF-8, huge and non-finite numbers, odd types where envelopes expect others."""
    import random

    rnd = random.Random(seed)
    nasty = ["\x00", "\ud800", "\udfff", "\uffff", "\U0001f50b", "\\", '"', "\n", "é", "a"]

    def text() -> str:
        return "".join(rnd.choice(nasty) for _ in range(rnd.randint(0, 6)))

    def value(depth: int = 0):
        kind = rnd.randint(0, 6 if depth < 3 else 3)
        return [lambda: None, lambda: rnd.choice([0, -1, 2**63, 1e308, 0.5]), text,
                lambda: rnd.random() < 0.5,
                lambda: [value(depth + 1) for _ in range(rnd.randint(0, 3))],
                lambda: {text(): value(depth + 1) for _ in range(rnd.randint(0, 3))},
                lambda: {"bms_emsStatus.f32LcdShowSoc": value(depth + 1)}][kind]()

    out = []
    for _ in range(count):
        shape = rnd.randint(0, 4)
        if shape == 0:
            out.append(rnd.randbytes(rnd.randint(0, 64)))
            continue
        doc = [{"code": value(), "message": value()},
               {"params": {text(): value() for _ in range(3)}},
               {"sn": value(), "timestamp": value(), "params": value()},
               {"id": value(), "version": "1.0", "params": {
                   "bms_emsStatus.f32LcdShowSoc": value(), "pd.wattsOutSum": value()}}][shape - 1]
        text_doc = json.dumps(doc, ensure_ascii=rnd.random() < 0.5)
        out.append(text_doc.encode("utf-8", "surrogatepass"))
    return out


def test_poison_payloads_through_the_broker_never_stop_good_readings(db_url, db, mqtt_broker,
                                                                     caplog):
    """Payloads that no database column accepts as they are, published through the real
    broker into a running collector between good readings: every good reading is stored,
    every payload is acknowledged (none comes back on the resumed session) and the writer
    never mistakes a refusal for an outage."""
    import logging
    import time

    from collector.service import Collector
    from collector.settings import CollectorSettings
    from servicekit.settings import DatabaseSettings
    from tests.collector_support import (
        SN,
        delta2_push,
        publish_all,
        publisher,
        redelivered,
        wait_rows,
    )

    caplog.set_level(logging.INFO)
    client_id = "collector-poison-test"
    settings = CollectorSettings(MQTT_HOST=mqtt_broker.host, MQTT_PORT=mqtt_broker.port,
                                 EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.2, PUBLISH_STATE=False,
                                 COLLECTOR_CLIENT_ID=client_id)
    c = Collector(settings, DatabaseSettings(DATABASE_URL=db_url))
    c.start()
    pub = publisher(mqtt_broker.host, mqtt_broker.port, "poison-publisher")
    try:
        assert c.sources[0].subscribed.wait(10)
        fuzz_topic = "bridge-ecoflow/R351FUZZ000009/data"
        good_topic = f"bridge-ecoflow/{SN}/data"
        poison = POISON + _random_payloads(15, 300)
        for i, payload in enumerate(poison):
            publish_all(pub, fuzz_topic, [payload])
            publish_all(pub, good_topic, [delta2_push(i)])
        # The good station's rows: some random payloads decode into rows of the fuzz station,
        # so the table's total can reach this count before the last good reading is stored.
        assert wait_rows(db_url, len(poison), timeout=30, device_sn=SN) >= len(poison)
        assert db.execute("SELECT count(*) FROM ecoflow_measurements WHERE device_sn = %s",
                          (SN,)).fetchone() == (len(poison),)
        dead = {bytes(p) for (p,) in db.execute("SELECT payload FROM ingest_errors")}
        assert set(POISON) - {POISON[8]} <= dead | {POISON[9], POISON[10]}
        assert POISON[0] in dead and POISON[8] in dead
        time.sleep(0.5)  # the last acknowledgements
    finally:
        pub.disconnect()
        c.stop()
    assert c.writer.rows_written >= len(poison)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "database unavailable" in m or "refused a batch" in m]
    assert not [r for r in caplog.records if r.exc_info]
    # The same session, resumed: a payload left unacknowledged would be delivered again.
    assert redelivered(mqtt_broker, client_id) == []
