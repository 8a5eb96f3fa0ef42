"""The batch writer stores complete snapshots, deduplicates, keeps dead letters and acks only
after commit, and loses nothing while the database is away."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from collector.metrics import Metrics
from collector.rows import Row
from collector.writer import IngestError, Writer
from servicekit.migrate import upgrade
from testbed.postgres import PostgresServer
from tests.services import DatabaseServer

T0 = datetime(2026, 5, 1, 10, 0, tzinfo=timezone.utc)
S = timedelta(seconds=1)


def row(i: int, sn: str = "SN1", **values) -> Row:
    return Row(ts=T0 + i * S, device_sn=sn, source="bridge", raw_data={"i": i, **values},
               values=values, model="DELTA 2")


def test_partial_messages_are_stored_as_complete_snapshots(db_url, db):
    w = Writer(db_url)
    w.add(row(0, soc_percent=80, grid_connected=True))
    w.add(row(1, ac_out_watts=120))
    w.add(row(2, soc_percent=79, remain_time_min=None))
    w.flush()
    got = db.execute(
        "SELECT soc_percent, grid_connected, ac_out_watts, remain_time_min, raw_data"
        " FROM ecoflow_measurements ORDER BY ts").fetchall()
    assert got == [
        (80, True, None, None, {"i": 0, "soc_percent": 80, "grid_connected": True}),
        (80, True, 120, None, {"i": 1, "ac_out_watts": 120}),
        (79, True, 120, None, {"i": 2, "soc_percent": 79, "remain_time_min": None}),
    ]
    w.stop()


def test_snapshot_continues_from_the_stored_row_after_a_restart(db_url, db):
    w = Writer(db_url)
    w.add(row(0, soc_percent=55, pv_in_watts=300))
    w.flush()
    w.stop()
    restarted = Writer(db_url)
    restarted.seed_snapshots()
    restarted.add(row(1, ac_out_watts=10))
    restarted.flush()
    restarted.stop()
    assert db.execute("SELECT soc_percent, pv_in_watts, ac_out_watts FROM ecoflow_latest"
                      ).fetchone() == (55, 300, 10)


def test_redelivered_readings_are_written_once_and_devices_are_upserted(db_url, db):
    w = Writer(db_url)
    for _ in range(2):
        for i in range(5):
            w.add(row(i, soc_percent=50 + i))
        w.flush()
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (5,)
    assert (w.rows_written, w.rows_duplicate) == (5, 5)
    assert w.direct_conflicts == 1  # the second batch met the stored rows on the direct path
    assert db.execute("SELECT model, first_seen, last_seen FROM devices").fetchone() == (
        "DELTA 2", T0, T0 + 4 * S)
    w.stop()


def test_after_a_redelivery_batches_go_through_staging_then_direct_again(db_url, db):
    w = Writer(db_url)
    w.add(row(0, soc_percent=1))
    w.flush()
    w.add_rows([row(0, soc_percent=1), row(1, soc_percent=2)])  # a redelivery, and a new one
    w.flush()
    assert w.direct_conflicts == 1
    w.add_rows([row(1, soc_percent=2), row(2, soc_percent=3)])  # staged: no second conflict
    w.flush()
    assert (w.direct_conflicts, w.rows_written, w.rows_duplicate) == (1, 3, 2)
    w._staged_until = 0.0  # as if the minute were over
    w.add_rows([row(2, soc_percent=3), row(3, soc_percent=4)])
    w.flush()
    assert (w.direct_conflicts, w.rows_written, w.rows_duplicate) == (2, 4, 3)
    assert db.execute("SELECT array_agg(soc_percent ORDER BY ts) FROM ecoflow_measurements"
                      ).fetchone() == ([1, 2, 3, 4],)
    w.stop()


def test_a_reading_repeated_inside_one_batch_is_stored_once(db_url, db):
    w = Writer(db_url)
    w.add_rows([row(0, soc_percent=40), row(0, soc_percent=40), row(1, soc_percent=42)])
    w.flush()
    assert (w.rows_written, w.rows_duplicate, w.direct_conflicts) == (2, 1, 0)
    assert db.execute("SELECT array_agg(raw_data->>'soc_percent' ORDER BY ts)"
                      " FROM ecoflow_measurements").fetchone() == (["40", "42"],)
    assert db.execute("SELECT count(*) FROM ecoflow_merged_payloads").fetchone() == (0,)
    w.stop()


def test_distinct_messages_with_the_same_time_in_one_batch_are_merged_newest_wins(db_url, db):
    # Not a redelivery: a different message that happens to carry the same timestamp.
    w = Writer(db_url)
    w.add_rows([row(0, soc_percent=40, grid_connected=True), row(0, grid_connected=False),
                row(1, soc_percent=42)])
    w.flush()
    assert db.execute("SELECT soc_percent, grid_connected, raw_data FROM ecoflow_measurements"
                      " ORDER BY ts").fetchall() == [
        (40, False, {"i": 0, "grid_connected": False}), (42, False, {"i": 1, "soc_percent": 42})]
    assert db.execute("SELECT device_sn, ts, raw_data FROM ecoflow_merged_payloads").fetchall() == [
        ("SN1", T0, {"i": 0, "soc_percent": 40, "grid_connected": True})]
    assert (w.rows_written, w.rows_merged, w.rows_duplicate) == (2, 1, 0)
    w.stop()


def test_a_reading_the_database_refuses_goes_to_ingest_errors_and_the_rest_is_stored(
        db_url, db):
    # Python's json reads a lone surrogate; PostgreSQL's jsonb refuses it. Before the rows
    # were isolated, such a reading failed its whole batch on every retry.
    m = Metrics()
    w = Writer(db_url, metrics=m)
    acks = []
    bad = row(3, soc_percent=13)
    bad.raw_json, bad.topic = '{"name": "\\ud800", "i": 3}', "bridge-ecoflow/SN1/data"
    bad.payload = bad.raw_json.encode()
    for i in range(8):
        r = bad if i == 3 else row(i, soc_percent=10 + i)
        w.add(r, on_commit=lambda i=i: acks.append(i))
    w.flush()
    assert acks == list(range(8))  # the refused reading is handled too: it is an error row
    assert db.execute("SELECT array_agg(soc_percent ORDER BY ts) FROM ecoflow_measurements"
                      ).fetchone() == ([10, 11, 12, 14, 15, 16, 17],)
    [(topic, sn, payload, error)] = db.execute(
        "SELECT topic, device_sn, payload, error FROM ingest_errors").fetchall()
    assert (topic, sn, bytes(payload)) == ("bridge-ecoflow/SN1/data", "SN1", bad.payload)
    assert error.startswith("the database refused the reading: 22P02")
    assert (w.rows_written, w.rows_rejected, w.rows_duplicate) == (7, 1, 0)
    assert m.rows_rejected._value.get() == 1
    # The station's next readings are stored: the refusal did not stick to its snapshot.
    w.add(row(8, soc_percent=18))
    w.flush()
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (8,)
    w.stop()


def test_values_the_columns_cannot_hold_count_as_not_reported(db_url, db):
    w = Writer(db_url)
    w.add(row(0, soc_percent=50, watts_out_sum=120, battery_temp_c=25.0))
    w.add(row(1, watts_out_sum=10**12, battery_temp_c=1e-45, remain_time_min=-(2**40)))
    w.flush()
    assert db.execute("SELECT watts_out_sum, battery_temp_c, remain_time_min,"
                      " raw_data->>'watts_out_sum' FROM ecoflow_measurements ORDER BY ts"
                      ).fetchall() == [(120, 25.0, None, "120"), (120, 25.0, None, str(10**12))]
    assert w.rows_rejected == 0
    w.stop()


def test_undecodable_payloads_land_in_ingest_errors_with_their_bytes(db_url, db):
    w = Writer(db_url)
    w.add_error(IngestError("bridge", "bridge-ecoflow/SN9/data", b"\xff\x00junk", "not JSON"))
    w.flush()
    assert db.execute("SELECT topic, payload, error FROM ingest_errors").fetchone() == (
        "bridge-ecoflow/SN9/data", b"\xff\x00junk", "not JSON")
    w.stop()


def test_acks_run_only_after_the_rows_are_committed(db_url, db):
    w = Writer(db_url)
    seen = []

    def ack():
        seen.append(db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone()[0])

    w.add(row(0, soc_percent=1), on_commit=ack)
    w.add(row(1, soc_percent=2), on_commit=ack)
    assert seen == []
    w.flush()
    assert seen == [2, 2]
    w.stop()


def test_batch_hooks_run_once_per_commit_after_the_batchs_acks(db_url, db):
    w = Writer(db_url)
    events = []
    w.after_acks(lambda: events.append("hook"))
    w.add_rows([row(0, soc_percent=1), row(1, soc_percent=2)], on_commit=lambda: events.append(1))
    w.add_rows([], on_commit=lambda: events.append("offline reply"))
    w.add(row(2, soc_percent=3), on_commit=lambda: events.append(2))
    assert events == []
    w.flush()
    assert events == [1, "offline reply", 2, "hook"]
    w.flush()  # nothing committed, nothing to acknowledge
    assert events == [1, "offline reply", 2, "hook"]
    w.stop()


def test_the_payloads_json_text_is_stored_as_it_came(db_url, db):
    w = Writer(db_url)
    text = '{"id": 7, "params": {"pd.wattsOutSum": 120.50, "note": "tab\\there"}}'
    r = row(0, soc_percent=50)
    r.raw_json = text
    w.add(r)
    w.flush()
    assert db.execute("SELECT raw_data::text = %s::jsonb::text FROM ecoflow_measurements",
                      (text,)).fetchone() == (True,)
    assert db.execute("SELECT raw_data->'params'->>'pd.wattsOutSum' FROM ecoflow_measurements"
                      ).fetchone() == ("120.50",)
    w.stop()


def test_database_outage_keeps_rows_and_acks_until_it_returns():
    server = PostgresServer().start()  # its own server, so stopping it disturbs no other test
    try:
        ds = DatabaseServer(server.url(), server.timescaledb, "native")
        ds.create_database("w")
        upgrade(ds.settings("w"))
        acks = []
        w = Writer(ds.url("w"), batch_rows=10, flush_interval=0.2, retry_max_sec=0.5)
        w.start()
        w.add(row(0, soc_percent=10), on_commit=lambda: acks.append(0))
        _wait(lambda: acks == [0])
        server.halt()
        for i in range(1, 40):
            w.add(row(i, soc_percent=10 + i), on_commit=lambda i=i: acks.append(i))
        time.sleep(1.0)
        assert acks == [0] and w.pending == 39
        server.start()
        _wait(lambda: len(acks) == 40, timeout=15)
        w.stop()
        with psycopg.connect(ds.url("w")) as conn:
            assert conn.execute("SELECT count(*), max(soc_percent) FROM ecoflow_measurements"
                                ).fetchone() == (40, 49)
    finally:
        server.stop()


def test_a_full_buffer_blocks_the_producer_instead_of_dropping(db_url):
    w = Writer(db_url, batch_rows=1000, max_buffer=3)
    for i in range(3):
        w.add(row(i, soc_percent=i))
    done = threading.Event()
    threading.Thread(target=lambda: (w.add(row(3, soc_percent=3)), done.set()), daemon=True).start()
    assert not done.wait(0.5)
    w.flush()
    assert done.wait(2)
    w.flush()
    assert w.rows_written == 4
    w.stop()


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.05)


def test_a_dead_letter_the_database_would_refuse_is_stored_cleaned_and_never_wedges(db_url, db):
    # '{"code":1,"message":"\u0000"}' decodes to an error text holding a NUL byte, which no
    # PostgreSQL text column accepts; a lone surrogate cannot even be encoded. Before, such a
    # dead letter failed its batch on every retry and nothing behind it was stored or acked.
    w = Writer(db_url)
    acks = []
    w.add_error(IngestError("bridge", "bridge-ecoflow/SN1/data", b'{"code":1,"message":"\\u0000"}',
                            "EcoFlow answered with error code 1: \x00", "SN\x001"),
                on_commit=lambda: acks.append("nul"))
    w.add_error(IngestError("bridge", "bridge-ecoflow/SN1/data", b"\xed\xa0\x80",
                            "bad text \ud800 here"), on_commit=lambda: acks.append("surrogate"))
    w.add(row(0, soc_percent=50), on_commit=lambda: acks.append("reading"))
    w.flush()
    assert acks == ["nul", "surrogate", "reading"]
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (1,)
    got = db.execute("SELECT device_sn, payload, error FROM ingest_errors ORDER BY id").fetchall()
    assert [(sn, bytes(p), e) for sn, p, e in got] == [
        ("SN\\u00001", b'{"code":1,"message":"\\u0000"}',
         "EcoFlow answered with error code 1: \\u0000"),
        (None, b"\xed\xa0\x80", "bad text \\ud800 here"),
    ]
    assert w.errors_written == 2
    w.stop()


def test_a_reading_with_text_the_driver_cannot_encode_is_isolated(db_url, db):
    # A lone surrogate in a serial number fails in the driver (UnicodeEncodeError), not in the
    # server: it is still the row's own content, set aside like a refused row.
    w = Writer(db_url)
    bad = row(1, sn="SN\ud8001", soc_percent=1)
    bad.payload = b'{"sn": "SN\\ud8001"}'
    w.add_rows([row(0, soc_percent=10), bad, row(2, soc_percent=12)])
    w.flush()
    assert db.execute("SELECT array_agg(soc_percent ORDER BY ts) FROM ecoflow_measurements"
                      ).fetchone() == ([10, 12],)
    [(sn, payload, error)] = db.execute(
        "SELECT device_sn, payload, error FROM ingest_errors").fetchall()
    assert (sn, bytes(payload)) == ("SN\\ud8001", bad.payload)
    assert error.startswith("the database refused the reading")
    w.stop()


def test_only_connection_failures_count_as_an_outage(db_url, db, caplog):
    # A database error about what we sent (here: the schema lacks a table) is not an outage:
    # the log says what the database said, not "database unavailable".
    w = Writer(db_url, flush_interval=0.1, retry_max_sec=0.2)
    db.execute("ALTER TABLE ingest_errors RENAME TO ingest_errors_away")
    w.start()
    w.add_error(IngestError("bridge", "t", b"x", "undecodable"))
    _wait(lambda: any("ingest_errors" in r.getMessage() for r in caplog.records))
    assert not any("database unavailable" in r.getMessage() for r in caplog.records)
    db.execute("ALTER TABLE ingest_errors_away RENAME TO ingest_errors")
    _wait(lambda: db.execute("SELECT count(*) FROM ingest_errors").fetchone() == (1,))
    w.stop()


def test_a_reading_after_a_quiet_period_is_written_without_waiting_for_the_timer(db_url, db):
    # The flush interval is 5 s: a lone reading stored well within a second was written
    # because it came after quiet, not because a timer fired. (Before, it waited the 5 s.)
    w = Writer(db_url, flush_interval=5.0)
    w.start()
    try:
        time.sleep(0.3)  # quiet
        started = time.monotonic()
        w.add(row(0, soc_percent=12))
        _wait(lambda: db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (1,),
              timeout=4.0)
        assert time.monotonic() - started < 1.5
        time.sleep(0.3)  # quiet again: the next lone reading goes at once too
        started = time.monotonic()
        w.add_error(IngestError("bridge", "t", b"junk", "not JSON"))
        _wait(lambda: db.execute("SELECT count(*) FROM ingest_errors").fetchone() == (1,),
              timeout=4.0)
        assert time.monotonic() - started < 1.5
    finally:
        w.stop()


def test_a_burst_is_still_written_in_few_batches(db_url, db):
    w = Writer(db_url, flush_interval=5.0, batch_rows=1000)
    w.start()
    try:
        time.sleep(0.3)
        for i in range(2500):
            w.add(row(i, soc_percent=i % 100))
        _wait(lambda: w.rows_written == 2500, timeout=15)
        # The first reading goes at once; the rest fill batches of 1000 or wait for the burst
        # to end: a handful of commits, not one per reading.
        assert w.batches_written <= 6
    finally:
        w.stop()
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (2500,)


def _fixture(name: str) -> dict:
    import json
    from pathlib import Path

    return json.loads((Path("/work/shared/fixtures") / name).read_text())


def test_two_app_pushes_in_the_same_second_both_count(db_url, db):
    """App pushes carry whole seconds: the grid-lost push in the same second as a BMS push used
    to be dropped as a duplicate of (device_sn, ts), its payload gone. Both now count, in one
    batch or in two, and a redelivery of either changes nothing."""
    import json

    from collector.pipeline import Pipeline

    fx = _fixture("river2pro_app_mqtt_2.json")
    bms = json.dumps(fx["payload"]).encode()
    grid_lost = json.dumps(dict(fx["payload"], id=fx["payload"]["id"] + 1,
                                params={"inv.acInVol": 0, "inv.inputWatts": 0})).encode()
    w = Writer(db_url)
    pipeline = Pipeline(w)
    pipeline.handle(bms, fx["topic"], "app_mqtt")
    w.flush()
    pipeline.handle(grid_lost, fx["topic"], "app_mqtt")
    w.flush()
    got = db.execute("SELECT ts, soc_percent, grid_connected, raw_data->'params'"
                     " FROM ecoflow_measurements").fetchall()
    assert got == [(datetime(2024, 1, 3, 10, 43, 15, tzinfo=timezone.utc), 100, False,
                     {"inv.acInVol": 0, "inv.inputWatts": 0})]
    [(merged,)] = db.execute("SELECT raw_data FROM ecoflow_merged_payloads").fetchall()
    assert merged == json.loads(bms)
    assert (w.rows_written, w.rows_merged, w.rows_duplicate) == (1, 1, 0)
    for payload in (bms, grid_lost, bms):  # redeliveries, after a restart say
        pipeline.handle(payload, fx["topic"], "app_mqtt")
        w.flush()
    assert (w.rows_written, w.rows_merged, w.rows_duplicate) == (1, 1, 3)
    assert db.execute("SELECT count(*) FROM ecoflow_merged_payloads").fetchone() == (1,)
    assert db.execute("SELECT grid_connected FROM ecoflow_measurements").fetchone() == (False,)
    w.stop()


def test_identical_polls_are_new_readings(db_url, db):
    """A REST poll that reads the same values as the last one is a new observation of the
    station (its freshness depends on it), never a redelivery."""
    import json

    from collector.pipeline import Pipeline

    fx = _fixture("deltapro3_rest_quota_all_1.json")
    raw = json.dumps({"code": "0", "message": "Success",
                      "data": fx["payload"]["quota_all"]}).encode()
    w = Writer(db_url)
    pipeline = Pipeline(w)
    for i in range(3):
        assert pipeline.handle(raw, "rest:api/device/quota/all?sn=MR51ZAS2PG330026", "rest",
                               received_at=T0 + i * S, device_sn="MR51ZAS2PG330026") == 1
        w.flush()
    assert db.execute("SELECT count(*) FROM ecoflow_measurements").fetchone() == (3,)
    w.stop()
