"""The rules read one day of readings (policy/rules.py HISTORY) so that a year of history costs
what a day does; a station whose decision needs older readings is evaluated again over a
wider window. These prove the window changes no decision: every state below is evaluated
with the window and with all history, and the rows must be the same."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from policy import rules, topology
from policy.rules import supply_rows
from policy.settings import PolicySettings

END = datetime(2026, 3, 10, 12, tzinfo=timezone.utc)
SN = "R331ZEB4ZEA0054321"
SN2 = "R331ZEB4ZEA0098765"


def readings(db, sn: str, start: datetime, end: datetime, every: int, soc: str, grid: str,
             last_seen: bool = True) -> None:
    """Readings from start to end; `soc` and `grid` are SQL over t (the reading's time)."""
    db.execute(
        "INSERT INTO ecoflow_measurements (ts, received_at, device_sn, soc_percent,"
        " soc_min_percent, grid_connected, source, raw_data)"
        f" SELECT t, t, %(sn)s, {soc}, {soc}, {grid}, 'simulator', '{{}}'"
        "   FROM generate_series(%(start)s::timestamptz, %(end)s, make_interval(secs => %(every)s)) t",
        {"sn": sn, "start": start, "end": end, "every": every})
    if last_seen:  # as the collector's writer keeps it
        db.execute("UPDATE devices SET last_seen = (SELECT max(ts) FROM ecoflow_measurements"
                   " WHERE device_sn = %s) WHERE device_sn = %s", (sn, sn))


def settings_for(db, **overrides) -> PolicySettings:
    values = dict(soc_min=15, debounce_sec=60, cooldown_sec=300, confirm_sec=30,
                  device_to_agents_json=json.dumps({SN: ["nas"], SN2: ["nas", "pc"]}))
    values.update(overrides)
    settings = PolicySettings(**values)
    topology.sync(db, settings)
    return settings


def windowed_and_whole(db, settings, now, monkeypatch) -> tuple[list[dict], list[dict]]:
    params = settings.rule_params()
    windowed = supply_rows(db, now, params)
    with monkeypatch.context() as m:
        m.setattr(rules, "HISTORY", timedelta(days=100_000))
        whole = supply_rows(db, now, params)
    drop = ("history_cut",)
    return ([{k: v for k, v in r.items() if k not in drop} for r in windowed],
            [{k: v for k, v in r.items() if k not in drop} for r in whole])


def test_outage_longer_than_the_window_keeps_its_start_and_its_episode(db, monkeypatch):
    """On battery for two days at 90 % (a station on solar): the battery-time limit counts
    from the real loss, and the episode keeps its name, though the loss is outside the day
    the rules read."""
    settings = settings_for(db, max_on_battery_sec=36 * 3600)
    lost = END - timedelta(days=2)
    readings(db, SN, lost - timedelta(hours=2), END, 60, "90", f"t < '{lost.isoformat()}'")
    readings(db, SN2, END - timedelta(days=3), END, 60, "80", "true")
    windowed, whole = windowed_and_whole(db, settings, END, monkeypatch)
    assert windowed == whole
    row = next(r for r in windowed if r["device_sn"] == SN)
    assert row["on_battery_since"] == lost
    assert row["episode_id"] == f"{SN}-{int(lost.timestamp())}"
    assert row["trigger"] == "battery_time"
    assert row["battery_time_fires_at"] == lost + timedelta(hours=36)


def test_station_silent_for_days_is_still_dead_on_battery(db, monkeypatch):
    """Last seen on battery three days ago: still dead on battery (S2), from its last reading,
    which lies outside the day the rules read."""
    settings = settings_for(db)
    gone = END - timedelta(days=3)
    readings(db, SN, gone - timedelta(hours=3), gone, 60, "70",
             f"t < '{(gone - timedelta(hours=1)).isoformat()}'")
    readings(db, SN2, END - timedelta(days=2), END, 60, "80", "true")
    windowed, whole = windowed_and_whole(db, settings, END, monkeypatch)
    assert windowed == whole
    row = next(r for r in windowed if r["device_sn"] == SN)
    assert row["freshness"] == "dead" and row["on_battery"] is True
    assert row["trigger"] == "dead_on_battery"
    assert row["last_ts"] == gone


@pytest.mark.parametrize("last_seen", [True, False], ids=["last-seen-kept", "no-last-seen"])
def test_grid_flapping_for_two_days_without_rearm_keeps_one_episode(db, monkeypatch,
                                                                    last_seen):
    """The grid drops for 5 minutes every 2 minutes of return (never the cooldown) for two
    days: one episode all along, named by its first loss, whatever the window."""
    settings = settings_for(db)
    start = END - timedelta(days=2)
    readings(db, SN, start - timedelta(hours=1), END, 30, "60",
             f"t < '{start.isoformat()}' OR (extract(epoch FROM t)::bigint %% 420) >= 300",
             last_seen)
    readings(db, SN2, END - timedelta(days=2), END, 60, "80", "true", last_seen)
    windowed, whole = windowed_and_whole(db, settings, END, monkeypatch)
    assert windowed == whole
    row = next(r for r in windowed if r["device_sn"] == SN)
    first_loss = db.execute(
        "SELECT min(ts) FROM ecoflow_measurements WHERE device_sn = %s AND NOT grid_connected",
        (SN,)).fetchone()[0]
    assert row["episode_start"] == first_loss


def test_quiet_year_on_grid_is_read_from_one_day_only(db, monkeypatch):
    """The usual state: on grid, reporting. The first, windowed run decides every station;
    none needs a wider one."""
    settings = settings_for(db)
    readings(db, SN, END - timedelta(days=20), END, 600, "95", "true")
    readings(db, SN2, END - timedelta(days=20), END, 600, "95",
             "extract(day FROM t) <> 1")  # an old outage, long re-armed
    runs = []
    real = rules._evaluate

    def counting(cur, now, params, horizon, until, only, bounded=True):
        runs.append((horizon, only))
        return real(cur, now, params, horizon, until, only, bounded)

    monkeypatch.setattr(rules, "_evaluate", counting)
    rows = supply_rows(db, END, settings.rule_params())
    assert [r["trigger"] for r in rows] == [None, None, None]
    assert runs == [(END - rules.HISTORY, None)]


def test_long_outages_decide_as_all_history_at_every_moment(db, db_url):
    """Five days: a station loses the grid for three days on solar (SoC up by day, down by
    night), one never sees the grid at all, and late in the run readings from a week ago
    arrive (a backfill: one of them a grid loss older than anything the rules had read). At
    every moment the rows supply_rows gives, reading from the floor its last all-history run
    found, are those of an evaluation over all history; and the floors are really used."""
    settings = settings_for(db, max_on_battery_sec=int(2.5 * 86400), runtime_min=20)
    params = settings.rule_params()
    start = END - timedelta(days=5)
    lost = END - timedelta(days=3, hours=7)
    solar = "50 + 35 * sin(extract(epoch FROM t) / 86400 * 2 * pi()) - extract(epoch FROM t - " \
            f"'{start.isoformat()}') / 86400 * 4"
    readings(db, SN, start, END, 300, solar, f"t < '{lost.isoformat()}'", last_seen=False)
    readings(db, SN2, start + timedelta(hours=5), END, 300, solar, "false", last_seen=False)
    backfill_at = END - timedelta(hours=20)
    used = []
    real = rules._from_floors

    def counting(cur, now, params, floors):
        decided = real(cur, now, params, floors)
        used.extend(r["device_sn"] for r in decided)
        return decided

    def whole(now):
        with db.cursor(row_factory=psycopg.rows.dict_row) as cur:
            rows = rules._evaluate(cur, now, params, *rules._ALL_HISTORY, None, bounded=False)
        return rows

    with pytest.MonkeyPatch.context() as m, psycopg.connect(db_url, autocommit=True) as other:
        m.setattr(rules, "_from_floors", counting)
        now, backfilled, triggers = start + timedelta(hours=6), False, set()
        while now <= END:
            if not backfilled and now >= backfill_at:
                # A week-old loss of the off-grid station and a day of old grid readings of the
                # other, received now, from another session (as the collector writes them):
                # their chunks are new, older than any the rules' prepared plans know.
                other.execute(
                    "INSERT INTO ecoflow_measurements (ts, received_at, device_sn, soc_percent,"
                    " soc_min_percent, grid_connected, source, raw_data)"
                    " SELECT t, %(now)s, sn, 70, 70, sn = %(sn)s, 'simulator', '{}'"
                    "   FROM (VALUES (%(sn)s), (%(sn2)s)) s(sn),"
                    "        generate_series(%(from)s::timestamptz, %(to)s, interval '1 hour') t",
                    {"now": now, "sn": SN, "sn2": SN2, "from": start - timedelta(days=2),
                     "to": start - timedelta(days=1)})
                backfilled = True
            fast = supply_rows(db, now, params)
            slow = whole(now)
            drop = ("history_cut",)
            assert ([{k: v for k, v in r.items() if k not in drop} for r in fast]
                    == [{k: v for k, v in r.items() if k not in drop} for r in slow]), now
            triggers |= {(r["device_sn"], r["trigger"]) for r in fast}
            now += timedelta(minutes=47)
    assert SN in used and SN2 in used, used
    assert (SN, "battery_time") in triggers and (SN2, "battery_time") in triggers, triggers


# -- how the statement is planned ------------------------------------------------------------------

def _chunk_scans(conn, url: str) -> dict[str, int]:
    """Index and sequential scans of each chunk of the readings so far, as `conn` counted them
    (its pending statistics flushed first), read over a connection to `url`."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT 1")  # the flush happens at the end of a statement
    with psycopg.connect(url, autocommit=True) as reader:
        return dict(reader.execute(
            "SELECT c.chunk_name, coalesce(s.idx_scan, 0) + coalesce(s.seq_scan, 0)"
            "  FROM timescaledb_information.chunks c"
            "  JOIN pg_stat_user_tables s"
            "    ON s.schemaname = c.chunk_schema AND s.relname = c.chunk_name"
            " WHERE c.hypertable_name = 'ecoflow_measurements'"
            "   AND c.range_end <= %s", (END - timedelta(days=2),)).fetchall())


def test_a_steady_evaluation_reads_no_chunk_outside_its_window_however_few(db, db_url):
    """A week of readings every 10 s is seven daily chunks. Once the worker's connection runs
    the rules on a generic plan (after five runs), each lookup read every chunk of the
    hypertable: 159 ms an evaluation against 10 ms planned per run, at one week of 1 Hz
    readings of 5 stations (tests/test_policy_bench.py). The window's day bounds are now in
    the statement however few the chunks: the chunks older than the window are not read."""
    if not db.execute("SELECT EXISTS (SELECT 1 FROM pg_extension"
                      " WHERE extname = 'timescaledb')").fetchone()[0]:
        pytest.skip("chunks need TimescaleDB")
    settings = settings_for(db)
    readings(db, SN, END - timedelta(days=7), END, 10, "90", "true")
    readings(db, SN2, END - timedelta(days=7), END, 10, "80", "true")
    db.execute("ANALYZE ecoflow_measurements")
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(8):  # past PostgreSQL's five custom plans
            supply_rows(conn, END - timedelta(seconds=i), settings.rule_params())
        before = _chunk_scans(conn, db_url)
        assert len(before) >= 4, before
        for i in range(8):
            rows = supply_rows(conn, END - timedelta(seconds=8 + i), settings.rule_params())
            assert not any(r["history_cut"] for r in rows)
        after = _chunk_scans(conn, db_url)
        generic = conn.execute("SELECT coalesce(sum(generic_plans), 0) FROM pg_prepared_statements"
                               " WHERE statement LIKE '%FROM ecoflow_measurements%'").fetchone()[0]
    assert generic > 0
    assert after == before, {c: after[c] - before[c] for c in after if after[c] != before[c]}


def test_the_statement_carries_the_window_days_on_timescaledb(db):
    """rules._bounds_by_day: on a hypertable the statement's chunk bounds are the window's
    days (the text, hence the plan, stays the same for the day); a plain table has no chunks
    to skip, so its statement keeps the whole range and one plan."""
    timescale = db.execute("SELECT EXISTS (SELECT 1 FROM pg_extension"
                           " WHERE extname = 'timescaledb')").fetchone()[0]
    assert rules._bounds_by_day(db) is timescale
    day = rules._statement(END - timedelta(hours=30), END, True).as_string(db)
    whole = rules._statement(END - timedelta(hours=30), END, False).as_string(db)
    assert "'2026-03-09 00:00:00+00:00'::timestamptz" in day
    assert "'2026-03-11 00:00:00+00:00'::timestamptz" in day
    assert "2026-03" not in whole
    assert day == rules._statement(END - timedelta(hours=25), END - timedelta(hours=1),
                                   True).as_string(db)


def test_the_day_is_planned_once_whatever_the_history(db, db_url):
    """With more chunks than a day's window reads, the evaluation still runs on one generic
    plan after PostgreSQL's five custom plans: the window's day bounds are constants in the
    statement's text, so that plan skips the other chunks as a plan per run does."""
    settings = settings_for(db)
    readings(db, SN, END - timedelta(days=20), END, 3600, "90", "true")
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(12):
            supply_rows(conn, END - timedelta(minutes=i), settings.rule_params())
        generic = conn.execute("SELECT coalesce(sum(generic_plans), 0) FROM pg_prepared_statements"
                               " WHERE statement LIKE '%FROM ecoflow_measurements%'").fetchone()[0]
    assert generic > 0


@pytest.mark.parametrize("by_day", [False, True])
def test_the_generic_plan_and_a_plan_for_each_run_decide_alike(db, db_url, monkeypatch,
                                                               by_day):
    """The same rows from both plans, with the whole range or the window's days as chunk
    bounds, at every moment of an outage with a flap, a drain below the threshold and a
    return, over more evaluations than PostgreSQL makes custom plans before it takes the
    generic one (five)."""
    monkeypatch.setattr(rules, "_bounds_by_day", lambda conn: by_day)
    settings = settings_for(db)
    start = END - timedelta(hours=6)
    flap, lost, back = (start + timedelta(hours=h) for h in (1, 2, 5))
    readings(db, SN, start, END, 30,
             f"greatest(5, 90 - greatest(0, extract(epoch FROM t - '{lost.isoformat()}'))"
             " / 60)",
             f"NOT (t BETWEEN '{flap.isoformat()}' AND '{(flap + timedelta(seconds=20)).isoformat()}'"
             f" OR t BETWEEN '{lost.isoformat()}' AND '{back.isoformat()}')")
    readings(db, SN2, start, END, 60, "80", "true")
    moments = [start + timedelta(minutes=20 * i) for i in range(19)]
    results = {}
    for mode in ("auto", "force_custom_plan"):
        monkeypatch.setattr(rules, "PLAN_CACHE_MODE", mode)
        with psycopg.connect(db_url, autocommit=True) as conn:
            results[mode] = [supply_rows(conn, now, settings.rule_params()) for now in moments]
    assert results["auto"] == results["force_custom_plan"]
    triggers = {r["trigger"] for rows in results["auto"] for r in rows}
    assert "soc" in triggers and None in triggers
