"""The provisioned Grafana dashboards: static checks, and every SQL they hold run for real.

Every panel target, template variable and annotation query is expanded the way Grafana's
PostgreSQL data source expands it (testbed.grafana_sql) and executed against a migrated
database seeded with two stations, a grid-loss episode, policy events, commands with acks,
host agents and ingest errors, both as the owner and as the read-only role Grafana uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import yaml

from testbed.dashboards import (
    DASHBOARDS,
    Query,
    dashboard_files,
    data_panels,
    load,
    panels,
    queries,
)
from testbed.grafana_sql import auto_interval, expand
from tests.services import READONLY_PASSWORD, READONLY_USER

ROOT = Path(__file__).resolve().parent.parent
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "ecoflow.yaml"
PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "ecoflow.yaml"

DATASOURCE_UID = "ecoflow-timescaledb"
DATASOURCE_TYPE = "grafana-postgresql-datasource"
FOLDER_UID = "ecoflow"
# Links, bookmarks and the home dashboard setting depend on these: they never change.
STABLE_UIDS = {
    "overview.json": "ecoflow-overview",
    "station.json": "ecoflow-station",
    "outages.json": "ecoflow-outages",
    "energy.json": "ecoflow-energy",
    "collector.json": "ecoflow-collector",
}

OFFICE = "R331ZEB4ZEA0012345"
GARAGE = "DCABZ8ZE1234567"
RANGES = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "30d": timedelta(days=30)}

NUMERIC_OIDS = {20, 21, 23, 700, 701, 1700}  # int8, int2, int4, float4, float8, numeric
TIME_OIDS = {1082, 1114, 1184}  # date, timestamp, timestamptz


QUERIES = queries()


# -- static checks ------------------------------------------------------------------------
def test_every_dashboard_keeps_its_stable_uid():
    uids = {path.name: load(path)["uid"] for path in dashboard_files()}
    assert uids == STABLE_UIDS
    assert len(set(uids.values())) == len(uids)


def test_every_datasource_reference_is_the_provisioned_one():
    expected = {"type": DATASOURCE_TYPE, "uid": DATASOURCE_UID}
    for path in dashboard_files():
        dash = load(path)
        for panel in data_panels(dash):
            assert panel["datasource"] == expected, (path.name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == expected, (path.name, panel["title"])
        for var in dash["templating"]["list"]:
            assert var["datasource"] == expected, (path.name, var["name"])
        for anno in dash["annotations"]["list"]:
            if not anno.get("builtIn"):
                assert anno["datasource"] == expected, (path.name, anno["name"])


def test_provisioning_files_agree_with_each_other_and_the_dashboards():
    datasources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [(d["uid"], d["type"]) for d in datasources] == [(DATASOURCE_UID, DATASOURCE_TYPE)]
    ds = datasources[0]
    json_data = ds["jsonData"]
    assert json_data["timescaledb"] is True and json_data["sslmode"] == "disable"
    assert json_data["database"] == "${POSTGRES_DB}" and json_data["postgresVersion"] >= 1200
    assert ds["user"] == "${POSTGRES_READONLY_USER}"
    assert ds["secureJsonData"]["password"] == "${POSTGRES_READONLY_PASSWORD}"

    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert len(providers) == 1
    assert providers[0]["folderUid"] == FOLDER_UID
    assert providers[0]["type"] == "file"
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_every_panel_has_a_query_a_unique_title_and_id_and_its_own_place():
    for path in dashboard_files():
        dash = load(path)
        ids = [p["id"] for p in panels(dash)]
        assert len(ids) == len(set(ids)), path.name
        cells = set()
        for panel in panels(dash):
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (path.name, panel["title"])
            mine = {(pos["x"] + dx, pos["y"] + dy)
                    for dx in range(pos["w"]) for dy in range(pos["h"])}
            assert not cells & mine, f"{path.name}: {panel['title']} overlaps another panel"
            cells |= mine
        titles = [p["title"] for p in panels(dash)]
        assert len(titles) == len(set(titles)), f"{path.name}: panel titles repeat"
        for panel in data_panels(dash):
            assert panel["targets"], (path.name, panel["title"])
            assert all(t["rawSql"].strip() for t in panel["targets"]), panel["title"]
            assert panel.get("description"), (path.name, panel["title"])


def test_every_template_variable_used_is_defined():
    reference = re.compile(r"\$\{?([A-Za-z_]\w*)|\[\[(\w+)")
    for path in dashboard_files():
        dash = load(path)
        defined = {v["name"] for v in dash["templating"]["list"]}
        used = set()
        for query in (q for q in QUERIES if q.dashboard == path.stem):
            used |= {a or b for a, b in reference.findall(query.sql)}
        used = {name for name in used if not name.startswith("__")}
        assert used <= defined, (path.name, used - defined)


# -- the macro expander ---------------------------------------------------------------------
def test_expander_writes_macros_and_variables_as_grafana_does():
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    sql = expand(
        "SELECT $__timeGroupAlias(ts, $__interval), $__timeGroup(ts, '5m') FROM t"
        " WHERE $__timeFilter(ts) AND sn IN ($device) AND site = '$site' AND $__interval_ms > 0"
        " AND $__unixEpochFilter(e)",
        start, start + timedelta(hours=1), interval=timedelta(seconds=30),
        variables={"device": ["A", "O'B"], "site": "home"},
    )
    assert sql == (
        "SELECT time_bucket('30.000s',ts) AS \"time\", time_bucket('300.000s',ts) FROM t"
        " WHERE ts BETWEEN '2026-01-02T03:04:05Z' AND '2026-01-02T04:04:05Z'"
        " AND sn IN ('A','O''B') AND site = 'home' AND 30000 > 0"
        " AND e >= 1767323045 AND e <= 1767326645"
    )
    plain = expand("SELECT $__timeGroup(ts, 1h)", start, start, timescaledb=False)
    assert plain == "SELECT floor(extract(epoch from ts)/3600)*3600"
    with pytest.raises(ValueError, match="undefined template variable"):
        expand("SELECT '$nope'", start, start)


def test_expander_writes_a_variable_without_options_as_grafana_does():
    # No reading yet: the variable's query finds nothing. A multi-value variable (and its
    # "All") is then an empty list, which Grafana's SQL data sources write as nothing at all
    # (the quoted values joined by commas); a single-value one is the empty string.
    start = datetime(2026, 1, 2, tzinfo=timezone.utc)
    assert expand("sn IN ($device)", start, start, variables={"device": []}) == "sn IN ()"
    assert expand("sn = ANY(ARRAY[$device]::text[])", start, start,
                  variables={"device": []}) == "sn = ANY(ARRAY[]::text[])"
    assert expand("sn = '$device'", start, start, variables={"device": ""}) == "sn = ''"


def test_default_ranges_reach_every_rollup_tier():
    # The tiered panels read raw rows below 1-minute buckets, ecoflow_rollup_1m or
    # ecoflow_stats_1m up to 1-hour buckets and the 1-hour views beyond: the three test ranges
    # land in one tier each.
    now = datetime.now(timezone.utc)
    tiers = [auto_interval(now - span, now).total_seconds() for span in RANGES.values()]
    assert tiers[0] < 60 <= tiers[1] < 3600 <= tiers[2]


# -- the SQL, run for real ----------------------------------------------------------------
SEED = """
INSERT INTO devices (device_sn, name, model, site, capacity_wh, first_seen, last_seen)
VALUES (%(office)s, 'Office Delta 2', 'Delta 2', 'home', 1024, %(now)s - interval '2 days', %(now)s),
       (%(garage)s, 'Garage Delta Pro', 'Delta Pro', 'home', 3600, %(now)s - interval '2 days', %(now)s);

-- Two days of one reading a minute per station. The office station loses the grid from 2 h
-- to 1.5 h ago; both have solar around midday-like hours of the sample.
INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent,
    remain_time_min, watts_in_sum, watts_out_sum, ac_in_watts, ac_out_watts, dc_out_watts,
    typec_out_watts, usb_out_watts, pv_in_watts, grid_connected, battery_temp_c, source, raw_data,
    received_at)
SELECT ts, sn,
       CASE WHEN outage THEN 90 - minute_in_outage ELSE 90 END,
       CASE WHEN outage THEN 88 - minute_in_outage ELSE 88 END,
       CASE WHEN outage THEN 120 - minute_in_outage END,
       CASE WHEN outage THEN 0 ELSE 150 END + solar,
       120, CASE WHEN outage THEN 0 ELSE 150 END, 90, 12, 10, 8, solar,
       NOT outage, 24.5, src,
       jsonb_build_object('bms_bmsStatus', jsonb_build_object('soc', 90, 'temp', 25),
                          'bms_slave.soc', 88, 'bms_slave.temp', 26, 'pd.wattsOutSum', 120),
       -- The office's clock runs 2 s behind (received 2 s after its stamp), the garage's 90 s
       -- ahead.
       ts + CASE WHEN sn = %(office)s THEN interval '2 seconds' ELSE interval '-90 seconds' END
  FROM (
    SELECT ts, sn, src,
           sn = %(office)s AND ts >= %(now)s - interval '2 hours'
               AND ts < %(now)s - interval '90 minutes' AS outage,
           (extract(epoch FROM ts - (%(now)s - interval '2 hours')) / 60)::int AS minute_in_outage,
           CASE WHEN extract(hour FROM ts) BETWEEN 10 AND 15 THEN 200 ELSE 0 END AS solar
      FROM generate_series(%(now)s - interval '2 days', %(now)s, interval '1 minute') ts,
           (VALUES (%(office)s, 'open_mqtt'), (%(garage)s, 'rest')) AS s(sn, src)
  ) r;

INSERT INTO agents (agent_id, name, tier, soc_threshold)
VALUES ('nas-01', 'NAS', 1, 30), ('pc-01', 'Workstation', 2, 40);
INSERT INTO agent_supplies VALUES ('nas-01', %(office)s), ('pc-01', %(office)s), ('pc-01', %(garage)s);
INSERT INTO agent_status (agent_id, online, last_seen, version, platform, host)
VALUES ('nas-01', true, %(now)s, '0.1.0', 'linux', 'nas'),
       ('pc-01', false, %(now)s - interval '1 hour', '0.1.0', 'windows', 'pc');

INSERT INTO policy_events (ts, kind, device_sn, agent_id, episode_id, trigger, message)
VALUES (%(now)s - interval '119 minutes', 'grid_lost', %(office)s, NULL, 'ep-1', 'grid', 'grid lost'),
       (%(now)s - interval '100 minutes', 'shutdown_sent', %(office)s, 'nas-01', 'ep-1', 'soc',
        'SoC below 80%%');
INSERT INTO commands (id, agent_id, action, episode_id, reason, delay_sec, ttl_sec, issued_at,
                      expires_at, payload, status, send_count, acked_at, ack_status, ack_host)
VALUES ('00000000-0000-0000-0000-000000000001', 'nas-01', 'shutdown', 'ep-1', 'soc', 60, 120,
        %(now)s - interval '100 minutes', %(now)s - interval '98 minutes', '{}', 'executing', 1,
        %(now)s - interval '99 minutes', 'executing', 'nas');
INSERT INTO command_acks (command_id, agent_id, status, host, received_at)
VALUES ('00000000-0000-0000-0000-000000000001', 'nas-01', 'received', 'nas',
        %(now)s - interval '100 minutes'),
       ('00000000-0000-0000-0000-000000000001', 'nas-01', 'executing', 'nas',
        %(now)s - interval '99 minutes');

INSERT INTO ingest_errors (ts, source, topic, device_sn, payload, error)
VALUES (%(now)s - interval '5 minutes', 'open_mqtt', '/open/user/quota', %(office)s,
        '\\x0a0b0c'::bytea, 'protobuf: truncated message');

-- Pack health (migration 0011), hourly for two days, steady: the office's two packs at 99 and
-- 98 %% SoH, the garage's one at 100 %%.
INSERT INTO battery_packs (ts, device_sn, pack, soh_percent, cycles, full_cap_mah,
    design_cap_mah, cell_mv_min, cell_mv_max, temp_c_min, temp_c_max)
SELECT ts, sn, pack, soh, 120, 19800, 20000, 3300, 3312, 24, 26
  FROM generate_series(%(now)s - interval '2 days', %(now)s, interval '1 hour') ts,
       (VALUES (%(office)s, 'master', 99), (%(office)s, 'slave1', 98),
               (%(garage)s, 'master', 100)) AS p(sn, pack, soh);

-- Liveness as a collector wrote it (migration 0012): the office pushes freshly; the garage's
-- REST went stale 12.5 min ago; its app_mqtt row was last written 10 min ago by a collector
-- that stopped (unknown).
INSERT INTO source_liveness (device_sn, source, state, age_sec, expected_period_sec,
    quiet_after_sec, stale_after_sec, connected, last_reading_received_at, changed_at,
    updated_at, refresh_sec, collector)
VALUES (%(office)s, 'open_mqtt', 'fresh', 4, 30, 60, 150, true, %(now)s - interval '9 seconds',
        %(now)s - interval '178 minutes', %(now)s - interval '5 seconds', 30, 'ecoflow-collector'),
       (%(garage)s, 'rest', 'stale', 900, 30, 60, 150, NULL, %(now)s - interval '905 seconds',
        %(now)s - interval '750 seconds', %(now)s - interval '5 seconds', 30, 'ecoflow-collector'),
       (%(garage)s, 'app_mqtt', 'fresh', 3, 30, 60, 150, true, %(now)s - interval '603 seconds',
        %(now)s - interval '1 hour', %(now)s - interval '10 minutes', 30, 'old-collector');
INSERT INTO source_liveness_changes (ts, device_sn, source, state, age_sec)
VALUES (%(now)s - interval '2 days', %(office)s, 'open_mqtt', 'fresh', 0),
       (%(now)s - interval '3 hours', %(office)s, 'open_mqtt', 'quiet', 61),
       (%(now)s - interval '178 minutes', %(office)s, 'open_mqtt', 'fresh', 0),
       (%(now)s - interval '1 day', %(garage)s, 'rest', 'fresh', 0),
       (%(now)s - interval '750 seconds', %(garage)s, 'rest', 'stale', 151),
       (%(now)s - interval '1 hour', %(garage)s, 'app_mqtt', 'fresh', 0);
"""


@dataclass
class Seeded:
    conn: psycopg.Connection
    now: datetime  # the seeded history ends here
    timescaledb: bool


@pytest.fixture
def seeded(db, pg_server) -> Seeded:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    params = {"now": now, "office": OFFICE, "garage": GARAGE}
    for statement in SEED.split(";\n"):
        if statement.strip():
            db.execute(statement, params)
    # Materialize the summaries up to 100 minutes ago, inside the office's grid loss: every
    # query then reads the summary tables for the older part and the live computation over raw
    # readings for the rest, and the grid-loss episode is joined from both.
    db.execute("UPDATE ecoflow_summary_state SET settle = interval '100 minutes'")
    db.execute("SELECT ecoflow_refresh_summaries()")
    return Seeded(db, now, pg_server.timescaledb)


@pytest.fixture(params=["owner", "reader"])
def conn(request, seeded, db_url):
    """The seeded database as its owner, and as the read-only role Grafana connects with."""
    if request.param == "owner":
        yield seeded
        return
    parts = urlsplit(db_url)
    netloc = f"{READONLY_USER}:{READONLY_PASSWORD}@{parts.hostname}:{parts.port}"
    with psycopg.connect(urlunsplit(parts._replace(netloc=netloc)), autocommit=True) as reader:
        yield Seeded(reader, seeded.now, seeded.timescaledb)


def variable_values(db: Seeded, dashboard: str, allow_empty: bool = False) -> dict:
    """Every variable of a dashboard at what Grafana selects by default: all values of a
    multi-value variable with "All", the first value otherwise.

    A variable whose query finds nothing (no reading yet) takes the value Grafana gives it
    then: no values at all for a multi-value variable (its "All" is the empty list of
    options), the empty string for a single-value one."""
    values = {}
    dash = load(DASHBOARDS / f"{dashboard}.json")
    for var in dash["templating"]["list"]:
        sql = expand(var["query"], db.now - timedelta(hours=6), db.now,
                     timescaledb=db.timescaledb)
        rows = db.conn.execute(sql).fetchall()
        options = [row[0] for row in rows]
        assert options or allow_empty, f"variable {var['name']} of {dashboard} has no options"
        multi = var.get("multi") or var.get("includeAll")
        values[var["name"]] = options if multi else (options[0] if options else "")
    return values


def run(db: Seeded, query: Query, span: timedelta, allow_empty: bool = False):
    """The query as Grafana would send it for a panel showing the last `span`."""
    start = db.now - span
    variables = variable_values(db, query.dashboard, allow_empty)
    sql = expand(query.sql, start, db.now, interval=auto_interval(start, db.now),
                 variables=variables, timescaledb=db.timescaledb)
    with db.conn.cursor() as cur:
        cur.execute(sql)
        columns = [(c.name, c.type_code) for c in cur.description]
        return columns, cur.fetchall()


def default_span(dashboard: str) -> timedelta:
    text = load(DASHBOARDS / f"{dashboard}.json")["time"]["from"]
    amount, unit = re.fullmatch(r"now-(\d+)([hd])", text).groups()
    return timedelta(hours=int(amount) * (24 if unit == "d" else 1))


def names_the_panel_needs(panel: dict) -> tuple[set[str], list[str]]:
    """Column names a panel's options refer to, exactly and as regular expressions."""
    exact, patterns = set(), []
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override["matcher"]
        if matcher["id"] == "byName":
            exact.add(matcher["options"])
        elif matcher["id"] == "byRegexp":
            patterns.append(matcher["options"])
    fields = panel.get("options", {}).get("reduceOptions", {}).get("fields", "")
    if fields:
        patterns.append(fields.strip("/"))
    exact |= set(re.findall(r"__data\.fields\.(\w+)", json.dumps(panel)))
    return exact, patterns


@pytest.mark.parametrize("span", RANGES.values(), ids=RANGES.keys())
@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_every_query_runs_and_returns_the_columns_its_panel_needs(conn, query, span):
    columns, _rows = run(conn, query, span)
    check_columns(conn, query, columns)


@pytest.fixture(params=["owner", "reader"])
def empty(request, db, db_url, pg_server):
    """A migrated database before the first reading, as its owner and as Grafana's role."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    if request.param == "owner":
        yield Seeded(db, now, pg_server.timescaledb)
        return
    parts = urlsplit(db_url)
    netloc = f"{READONLY_USER}:{READONLY_PASSWORD}@{parts.hostname}:{parts.port}"
    with psycopg.connect(urlunsplit(parts._replace(netloc=netloc)), autocommit=True) as reader:
        yield Seeded(reader, now, pg_server.timescaledb)


@pytest.mark.parametrize("span", RANGES.values(), ids=RANGES.keys())
@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_every_query_shows_no_data_rather_than_an_error_before_the_first_reading(
        empty, query, span):
    # Before the first reading the device variable has no options: Grafana then sends an
    # empty value list for it, and a panel must come back empty (Grafana's "No data"), not
    # with a syntax error.
    columns, rows = run(empty, query, span, allow_empty=True)
    check_columns(empty, query, columns)
    if query.format == "time_series" or query.kind in ("variable", "annotation"):
        assert rows == [], rows


def check_columns(conn: Seeded, query: Query, columns) -> None:
    names = [name for name, _ in columns]
    assert len(names) == len(set(names)), f"duplicate column names: {names}"
    types = dict(columns)
    if query.kind == "variable":
        assert names[:2] == ["__value", "__text"]
    elif query.kind == "annotation":
        assert {"time", "timeend", "text"} <= set(names)
    elif query.format == "time_series":
        assert "time" in names, "a time series needs a column named time"
        # Without TimescaleDB, $__timeGroup yields epoch seconds, which Grafana accepts too.
        time_ok = TIME_OIDS | (set() if conn.timescaledb else NUMERIC_OIDS)
        assert types["time"] in time_ok
        values = [n for n in names if n not in ("time", "metric")]
        assert values and all(types[n] in NUMERIC_OIDS for n in values), columns
    else:
        exact, patterns = names_the_panel_needs(query.panel)
        assert exact <= set(names), f"panel refers to missing columns {exact - set(names)}"
        for pattern in patterns:
            assert any(re.search(pattern, n) for n in names), f"no column matches /{pattern}/"


@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_every_query_shows_seeded_data_over_its_dashboards_default_range(seeded, query):
    if "date_trunc('day', now())" in query.sql:
        midnight = seeded.conn.execute("SELECT now() - date_trunc('day', now())").fetchone()[0]
        if midnight < timedelta(minutes=3):
            pytest.skip("today holds no whole reading interval yet")
    _columns, rows = run(seeded, query, default_span(query.dashboard))
    assert rows, "no rows on seeded data: a dead panel"


def panel_query(dashboard: str, title: str) -> Query:
    return next(q for q in QUERIES if q.dashboard == dashboard and q.where == f"{title}/A")


def as_dicts(db: Seeded, query: Query, span: timedelta) -> list[dict]:
    columns, rows = run(db, query, span)
    return [dict(zip([c for c, _ in columns], row)) for row in rows]


def test_overview_lists_every_station_with_its_latest_reading(seeded):
    rows = as_dicts(seeded, panel_query("overview", "Stations"), timedelta(hours=24))
    assert [(r["Station"], r["SoC"], r["Grid"], r["Online"]) for r in rows] == [
        ("Garage Delta Pro", 90, 1, True), ("Office Delta 2", 90, 1, True)]


@pytest.mark.parametrize("span", RANGES.values(), ids=RANGES.keys())
def test_soc_over_time_reads_raw_or_rollups_and_agrees_on_the_level(seeded, span):
    rows = as_dicts(seeded, panel_query("overview", "State of charge over time"), span)
    garage = [r["value"] for r in rows if r["metric"] == "Garage Delta Pro"]
    assert garage and all(abs(v - 90) < 1e-6 for v in garage)
    assert {r["metric"] for r in rows} == {"Garage Delta Pro", "Office Delta 2"}


def test_outages_table_shows_the_seeded_grid_loss_episode(seeded):
    rows = as_dicts(seeded, panel_query("outages", "Grid-loss episodes"), timedelta(days=7))
    assert len(rows) == 1
    episode = rows[0]
    assert episode["Station"] == "Office Delta 2" and episode["Ongoing"] is False
    assert episode["Duration"] == pytest.approx(30 * 60)
    assert episode["SoC at start"] == 90 and episode["SoC at end"] == 61


def test_commands_table_lists_every_ack_in_order(seeded):
    rows = as_dicts(seeded, panel_query("outages", "Commands and acknowledgements"),
                    timedelta(days=7))
    assert len(rows) == 1
    assert re.fullmatch(r"received \S+, executing \S+", rows[0]["Acknowledgements"])


def test_hosts_online_counts_online_and_offline_agents(seeded):
    rows = as_dicts(seeded, panel_query("outages", "Hosts online"), timedelta(days=7))
    assert rows == [{"Online": 1, "Offline or never seen": 1}]


def test_station_dashboard_shows_pack_values_from_the_raw_payload(seeded):
    rows = as_dicts(seeded, panel_query("station", "Pack state of charge"), timedelta(hours=6))
    assert {r["metric"] for r in rows} == {"bms_bmsStatus.soc", "bms_slave.soc"}


def test_station_dashboard_shows_the_state_of_health_of_each_pack(seeded):
    rows = as_dicts(seeded, panel_query("station", "Pack state of health"), timedelta(days=30))
    # The first station by name is the garage: one pack at 100 %.
    assert rows and {(r["metric"], r["value"]) for r in rows} == {("master", 100)}


def test_collector_health_counts_one_reading_a_minute_per_source(seeded):
    # 24 h: two-minute buckets, so every whole bucket holds readings.
    rows = as_dicts(seeded, panel_query("collector", "Readings per minute by source"),
                    timedelta(hours=24))
    # Whole buckets only: the first and last may be cut by the range.
    middle = [r["value"] for r in rows[4:-4]]
    assert middle and all(v == pytest.approx(1) for v in middle)
    assert {r["metric"] for r in rows} == {"open_mqtt", "rest"}


def test_collector_health_shows_each_stations_clock_skew(seeded):
    """Item 2 of issue 15: the median of device time minus receive time per station."""
    rows = as_dicts(seeded, panel_query("collector", "Station clock skew"), timedelta(hours=6))
    assert [(r["Station"], r["Clock skew"], r["Readings"], r["Stamped on receipt"])
            for r in rows] == [("Garage Delta Pro", 90, 100, 0), ("Office Delta 2", -2, 100, 0)]


def test_collector_health_shows_the_liveness_the_collector_wrote(seeded):
    """Issue 17: per source and per station, fresh / quiet / stale with age and expected
    period as the collector computed them, and unknown where the collector stopped writing."""
    rows = as_dicts(seeded, panel_query("collector", "Source liveness"), timedelta(hours=6))
    assert [(r["Station"], r["Source"], r["State"], r["Age"], r["Expected every"],
             r["Connected"]) for r in rows] == [
        ("Garage Delta Pro", "app_mqtt", "unknown", 3, 30, "yes"),
        ("Garage Delta Pro", "rest", "stale", 900, 30, "-"),
        ("Office Delta 2", "open_mqtt", "fresh", 4, 30, "yes")]
    assert rows[0]["As of"] == seeded.now - timedelta(minutes=10)
    stations = as_dicts(seeded, panel_query("collector", "Station liveness"), timedelta(hours=6))
    assert [(r["Station"], r["State"], r["Best source"]) for r in stations] == [
        ("Garage Delta Pro", "stale", "rest"), ("Office Delta 2", "fresh", "open_mqtt")]

    timeline = as_dicts(seeded, panel_query("collector", "Source liveness over time"),
                        timedelta(hours=6))
    by_series: dict[str, list] = {}
    for r in timeline:
        by_series.setdefault(r["metric"], []).append((seeded.now - r["time"], r["value"]))
    start = timedelta(hours=6)
    assert by_series == {
        "Office Delta 2 open_mqtt": [(start, 0), (timedelta(hours=3), 1),
                                     (timedelta(minutes=178), 0)],
        "Garage Delta Pro rest": [(start, 0), (timedelta(seconds=750), 2)],
        "Garage Delta Pro app_mqtt": [(timedelta(hours=1), 0), (timedelta(minutes=9), 3)]}


def home_assistant_sensors() -> list[dict]:
    """Every `sql:` sensor in the README and docs' YAML examples."""
    sensors = []
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for block in re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S):
            loaded = yaml.safe_load(block.replace("!secret ", ""))
            if isinstance(loaded, dict) and "sql" in loaded:
                sensors.extend(loaded["sql"])
    return sensors


def test_home_assistant_sensors_are_single_selects_with_one_row_each(seeded, conn):
    sensors = home_assistant_sensors()
    assert len(sensors) >= 7
    for sensor in sensors:
        query = sensor["query"].strip()
        assert query.upper().startswith("SELECT") and ";" not in query, sensor["name"]
        with conn.conn.cursor() as cur:
            cur.execute(query)
            rows = cur.fetchall()
            assert len(rows) == 1, sensor["name"]
            assert sensor["column"] in [c.name for c in cur.description], sensor["name"]
            assert rows[0][0] is not None or sensor["column"] == "remain_time_min", sensor["name"]


# -- alert rules (grafana/provisioning/alerting) -------------------------------------------
ALERTING = ROOT / "grafana" / "provisioning" / "alerting" / "ecoflow.yaml"
# Grafana provisions every file of the folder: battery-health.yaml holds the SoH rule.
ALERTING_FILES = sorted(ALERTING.parent.glob("*.yaml"))
ALERT_UIDS = {"ecoflow-grid-lost", "ecoflow-soc-low", "ecoflow-station-silent",
              "ecoflow-agent-offline", "ecoflow-dead-letters", "ecoflow-soh-dropping"}
EVALUATORS = {"gt": lambda v, p: v > p[0], "lt": lambda v, p: v < p[0],
              "within_range": lambda v, p: p[0] < v < p[1],
              "outside_range": lambda v, p: v < p[0] or v > p[1]}


def alert_rules() -> list[dict]:
    if not ALERTING.exists():
        return []
    return [rule for path in ALERTING_FILES
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


RULES = alert_rules()


def sql_node(rule: dict) -> dict:
    nodes = [n for n in rule["data"] if n["datasourceUid"] != "__expr__"]
    assert len(nodes) == 1, rule["uid"]
    return nodes[0]


def test_alert_rules_are_provisioned_for_each_condition_a_user_must_hear_about():
    documents = [yaml.safe_load(path.read_text()) for path in ALERTING_FILES]
    assert all(document["apiVersion"] == 1 for document in documents)
    folder = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["folder"]
    groups = [group for document in documents for group in document["groups"]]
    assert len({group["name"] for group in groups}) == len(groups)
    for group in groups:
        assert group["orgId"] == 1 and group["folder"] == folder
        assert re.fullmatch(r"\d+[smh]", group["interval"])
    assert {rule["uid"] for rule in RULES} == ALERT_UIDS
    titles = [rule["title"] for rule in RULES]
    assert len(titles) == len(set(titles))
    for rule in RULES:
        refs = {node["refId"]: node for node in rule["data"]}
        assert rule["condition"] in refs, rule["uid"]
        query = sql_node(rule)
        assert query["datasourceUid"] == DATASOURCE_UID
        assert query["model"]["format"] == "table" and query["model"]["rawSql"].strip()
        assert query["relativeTimeRange"]["from"] > query["relativeTimeRange"]["to"] >= 0
        condition = refs[rule["condition"]]
        assert condition["datasourceUid"] == "__expr__"
        assert condition["model"]["type"] == "threshold"
        assert condition["model"]["expression"] == query["refId"], rule["uid"]
        evaluator = condition["model"]["conditions"][0]["evaluator"]
        assert evaluator["type"] in EVALUATORS, rule["uid"]
        # No station or agent yet is no reason to alert; a failing query is.
        assert rule["noDataState"] == "OK" and rule["execErrState"] in ("Error", "Alerting")
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["uid"]
        assert rule["annotations"]["summary"] and rule["labels"]["severity"]
        # Grafana expands $NAME from its environment in provisioned labels (not in
        # annotations or the query model): a template there would be eaten.
        assert "$" not in json.dumps(rule["labels"]), rule["uid"]


def run_alert(db: Seeded, rule: dict):
    """The rule's query as Grafana's alerting sends it: its relative time range, no
    template variables."""
    node = sql_node(rule)
    now = db.conn.execute("SELECT now()").fetchone()[0]
    span = node["relativeTimeRange"]
    sql = expand(node["model"]["rawSql"], now - timedelta(seconds=span["from"]),
                 now - timedelta(seconds=span["to"]),
                 interval=timedelta(milliseconds=node["model"].get("intervalMs", 1000)),
                 timescaledb=db.timescaledb)
    with db.conn.cursor() as cur:
        cur.execute(sql)
        columns = [(c.name, c.type_code) for c in cur.description]
        rows = cur.fetchall()
    # Grafana turns a table into one number per row: exactly one numeric column, the text
    # columns become the labels, which must tell the rows apart; a time column would make
    # it a time series that needs a reduce step.
    numeric = [name for name, oid in columns if oid in NUMERIC_OIDS]
    assert len(numeric) == 1, columns
    assert all(oid == 25 for name, oid in columns if name not in numeric), columns  # text
    labels = [tuple(v for (name, _), v in zip(columns, row) if name != numeric[0])
              for row in rows]
    assert len(labels) == len(set(labels)), labels
    value_at = [name for name, _ in columns].index(numeric[0])
    return {label: row[value_at] for label, row in zip(labels, rows)}


def firing(db: Seeded, uid: str) -> set[tuple]:
    rule = next(r for r in RULES if r["uid"] == uid)
    values = run_alert(db, rule)
    condition = next(n for n in rule["data"] if n["refId"] == rule["condition"])
    evaluator = condition["model"]["conditions"][0]["evaluator"]
    check = EVALUATORS[evaluator["type"]]
    return {label for label, value in values.items()
            if value is not None and check(float(value), evaluator["params"])}


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_every_alert_query_is_quiet_on_an_empty_database(empty, rule):
    assert run_alert(empty, rule) == {}


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_every_alert_query_runs_on_the_seeded_database(conn, rule):
    run_alert(conn, rule)


def test_alerts_fire_for_what_the_seeded_history_holds_and_nothing_else(seeded):
    # Both stations on grid at 90 %, fresh; nas-01 online, pc-01 offline; one dead letter.
    assert firing(seeded, "ecoflow-grid-lost") == set()
    assert firing(seeded, "ecoflow-soc-low") == set()
    assert firing(seeded, "ecoflow-station-silent") == set()
    assert firing(seeded, "ecoflow-agent-offline") == {("pc-01", "Workstation")}
    assert firing(seeded, "ecoflow-dead-letters") == set()
    assert firing(seeded, "ecoflow-soh-dropping") == set()


def test_alerts_fire_when_the_grid_goes_soc_drops_a_station_falls_silent_and_errors_pile_up(
        seeded):
    db = seeded.conn
    db.execute("INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, grid_connected,"
               " source, raw_data) VALUES (now(), %s, 12, false, 'open_mqtt', '{}')", [OFFICE])
    db.execute("DELETE FROM ecoflow_measurements WHERE device_sn = %s"
               " AND ts > now() - interval '10 minutes'", [GARAGE])
    db.execute("INSERT INTO ingest_errors (source, payload, error)"
               " SELECT 'rest', '\\x00'::bytea, 'bad' FROM generate_series(1, 20)")
    db.execute("INSERT INTO agent_status (agent_id, online) VALUES ('pc-01', true)"
               " ON CONFLICT (agent_id) DO UPDATE SET online = true")
    office = (OFFICE, "Office Delta 2")
    assert firing(seeded, "ecoflow-grid-lost") == {office}
    assert firing(seeded, "ecoflow-soc-low") == {office}
    assert firing(seeded, "ecoflow-station-silent") == {(GARAGE, "Garage Delta Pro")}
    assert firing(seeded, "ecoflow-agent-offline") == set()
    assert firing(seeded, "ecoflow-dead-letters") == {("rest",)}
