"""The shutdown rules: runs the SQL in policy/sql/ and folds each agent's supplies into one view."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache, lru_cache
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

SQL_DIR = Path(__file__).with_name("sql")


@cache
def load_sql(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


# The rules read the readings of this last day (on the station's clock). A station whose
# result may depend on older ones (history_cut in supply_state.sql) is evaluated again around
# its last reading, then from where its last all-history evaluation found it needed readings
# (_Floors), and only if neither is provably enough over all of its history.
HISTORY = timedelta(days=1)
_ALL_HISTORY = (datetime(1, 1, 2, tzinfo=timezone.utc), datetime(9999, 12, 30, tzinfo=timezone.utc))

# Devices' last reading (kept by the collector's writer), for the window of a silent station.
_LAST_SEEN = """
SELECT min(last_seen), max(last_seen), bool_and(last_seen IS NOT NULL)
  FROM devices WHERE device_sn = ANY(%s)
"""

# Stations with a reading before their floor that could change a result read from the floor
# on: any reading telling the grid (it could be a confirmed return, a re-arm or a loss that
# starts the outage earlier), or one received after the newest in the window (it would be the
# latest reading). No row: the window from the floor decides as all history would.
_BEFORE_FLOOR = """
SELECT DISTINCT f.sn
  FROM unnest(%(sns)s::text[], %(latest)s::timestamptz[]) AS f(sn, latest)
 WHERE EXISTS (
       SELECT 1 FROM ecoflow_measurements m
        WHERE m.device_sn = f.sn
          AND m.ts < %(floor)s
          AND (m.grid_connected IS NOT NULL
               OR (coalesce(m.received_at, m.ts) <= %(now)s
                   AND (f.latest IS NULL OR coalesce(m.received_at, m.ts) > f.latest))))
"""


_prepared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepare_session(conn) -> None:
    """The session settings the rules run with, sent once per autocommit connection (on
    another, a rolled-back transaction would undo them, so they are sent every evaluation)."""
    if conn in _prepared:
        return
    with conn.cursor() as cur:
        # The rules are many small index lookups whose estimated cost crosses jit_above_cost;
        # compiling them would take longer than running them.
        cur.execute("SET jit = off")
        # TimescaleDB re-checks every chunk of a lookup against its per-station bounds
        # (dev_now, confirmed_grid_ts, ...) at each rescan: it cost more than the index
        # probes it saves (measured: execution halved at a day's window, less time even over
        # all history). The window's chunks are still skipped at planning time.
        # (A TimescaleDB without the setting refuses it: the rules then run without it.)
        try:
            with conn.transaction():
                cur.execute("SET timescaledb.enable_runtime_exclusion = off")
        except psycopg.Error:
            pass
        cur.execute(f"SET plan_cache_mode = {PLAN_CACHE_MODE}")
    if conn.autocommit:
        _prepared[conn] = True


class _Floors:
    """Per connection and station: from which reading time on the rules decided the last time
    they read all of the station's history. Only a hint for choosing the next window; a window
    from it is taken only when proven to decide as all history would (supply_rows)."""

    def __init__(self) -> None:
        self.by_conn: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, conn, params: dict) -> dict[str, datetime]:
        key = _params_key(params)
        held = self.by_conn.get(conn)
        if held is None or held[0] != key:
            held = self.by_conn[conn] = (key, {})
        return held[1]


_FLOORS = _Floors()


def _params_key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def supply_rows(conn: psycopg.Connection, now: datetime, params: dict) -> list[dict]:
    """One dict per (agent, supply) as of `now`; see supply_state.sql for the columns.

    The cost of an evaluation follows the window it reads, not the history kept: a first run
    reads one day (HISTORY); the stations whose result may need older readings are evaluated
    again over the day around their last reading, then from their floor (what their last
    all-history evaluation rested on), and those still cut over all history."""
    floors = _FLOORS.get(conn, params)
    _prepare_session(conn)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = _evaluate(cur, now, params, now - HISTORY, _ALL_HISTORY[1], None)
        cut = sorted({r["device_sn"] for r in rows if r["history_cut"]})
        if cut:
            first, last, known = cur.execute(_LAST_SEEN, (cut,)).fetchone().values()
            if known and first is not None and first < now - HISTORY:
                again = _evaluate(cur, now, params, first - HISTORY, last + HISTORY, cut)
                rows = _replace(rows, again)
                cut = sorted({r["device_sn"] for r in again if r["history_cut"]})
        hinted = [sn for sn in cut if sn in floors]
        if hinted:
            decided = _from_floors(cur, now, params, {sn: floors[sn] for sn in hinted})
            rows = _replace(rows, decided)
            cut = sorted(set(cut) - {r["device_sn"] for r in decided})
        if cut:
            whole = _evaluate(cur, now, params, *_ALL_HISTORY, cut, bounded=False)
            rows = _replace(rows, whole)
            floors.update(_floors_of(whole, params))
        return rows


# How the rules' statement is planned: PostgreSQL's default, a plan per run for the first
# five runs of a statement, then its generic plan if that costs no more (psycopg prepares a
# statement on its fifth run). A generic plan cannot skip chunks by a parameter: each lookup
# would probe every chunk of the hypertable (about 0.7 ms per chunk at a year of sparse
# readings; at a week of 1 Hz readings, 159 ms an evaluation against 10 ms planned per run),
# while planning the statement costs about 10-20 ms whatever the history. So the window rounded
# out to whole days is written into the statement as constants (_statement): the generic plan
# skips the chunks outside them as a plan per run does, and the text, hence the plan, stays the
# same for the day. A plain table (no TimescaleDB) has no chunks: its statement keeps the
# whole range, one text and one plan. Every plan gives the same rows
# (tests/test_policy_history.py).
PLAN_CACHE_MODE = "auto"
_HYPERTABLE = ("SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables"
               " WHERE hypertable_name = 'ecoflow_measurements')")
_chunked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bounds_by_day(conn) -> bool:
    """Whether the rules' statement on `conn` carries its window's day bounds: the readings
    are a hypertable. Asked once per connection; a failed question answers yes (it costs
    only a plan per day)."""
    held = _chunked.get(conn)
    if held is None:
        held = True
        try:
            with conn.transaction(), conn.cursor() as cur:
                plain = cur.execute("SELECT NOT EXISTS (SELECT 1 FROM pg_extension"
                                    " WHERE extname = 'timescaledb')").fetchone()[0]
                held = not plain and cur.execute(_HYPERTABLE).fetchone()[0]
        except psycopg.Error:
            pass
        _chunked[conn] = held
    return held


def _statement(horizon: datetime, until: datetime, by_day: bool) -> sql.Composed:
    """supply_state.sql with its chunk bounds: [horizon, until] rounded out to whole days
    (UTC) when `by_day`, so every window within the same days gets the same text, hence the
    same plan; else the whole range."""
    day = timedelta(days=1)

    def midnight(t: datetime) -> datetime:
        return datetime.combine(t.astimezone(timezone.utc).date(), datetime.min.time(),
                                timezone.utc)

    start, end = _ALL_HISTORY
    if by_day and horizon >= _ALL_HISTORY[0] + day:
        start = midnight(horizon)
    if by_day and until <= _ALL_HISTORY[1] - day:
        end = midnight(until) + day
    return _bounded_statement(start, end)


@lru_cache(maxsize=64)  # a new pair a day, and one per floors window: bounded
def _bounded_statement(start: datetime, end: datetime) -> sql.Composed:
    """The statement for one pair of chunk bounds, composed once (a few pairs a day)."""
    return sql.SQL(load_sql("supply_state")).format(chunks_from=sql.Literal(start),
                                                    chunks_to=sql.Literal(end))


def _from_floors(cur, now, params, floors: dict[str, datetime]) -> list[dict]:
    """The rows of the stations that a window from their floor provably decides as all history
    would: either it finds the confirmed return and re-arm it rests on (not cut, as for the
    day's window), or the station has no reading before its floor that any rule could read
    (_BEFORE_FLOOR): the outage began within the window, or the grid was never seen before."""
    horizon = min(floors.values())
    rows = _evaluate(cur, now, params, horizon, _ALL_HISTORY[1], sorted(floors))
    unsure = {r["device_sn"]: r for r in rows if r["history_cut"]}
    if unsure:
        latest = [unsure[sn]["last_received_at"] for sn in unsure]
        spoiled = _spoiled(cur, {"sns": list(unsure), "latest": latest, "floor": horizon,
                                 "now": now})
        for r in rows:
            if r["device_sn"] in unsure and r["device_sn"] not in spoiled:
                r["history_cut"] = False  # as all history would say
    return [r for r in rows if not r["history_cut"]]


def _spoiled(cur, params: dict) -> set[str]:
    """The stations _BEFORE_FLOOR names, run with a generic plan made once per connection.

    Planned with its values, the statement would be planned over every chunk before the
    floor: about 50 ms at a year of daily chunks, against about 15 ms to run it (unlike the
    rules' statement, it reads every chunk before the floor anyway). A generic
    plan is made once; a chunk created afterwards (a backfill older than the history, from any
    session) invalidates it, so the next run plans again and reads that chunk too
    (tests/test_policy_history.py)."""
    cur.execute("SET plan_cache_mode = force_generic_plan")
    try:
        return {r["sn"] for r in cur.execute(_BEFORE_FLOOR, params, prepare=True).fetchall()}
    finally:
        cur.execute(f"SET plan_cache_mode = {PLAN_CACHE_MODE}")


def _floors_of(rows: list[dict], params: dict) -> dict[str, datetime]:
    """Where each station's all-history result rests: its confirmed return and re-arm, else
    the start of its outage (before which, with no confirmed return, the grid was never seen
    on), less the confirmation and cooldown periods those are proven over."""
    margin = timedelta(seconds=max(params["confirm_sec"], params["cooldown_sec"]) + 1)
    floors: dict[str, datetime] = {}
    for r in rows:
        points = [t for t in (r["confirmed_grid_ts"], r["rearm_ts"], r["on_battery_since"],
                              r["episode_start"], r["last_ts"]) if t is not None]
        if points:
            floor = min(points) - margin
            floors[r["device_sn"]] = min(floor, floors.get(r["device_sn"], floor))
    return floors


def _evaluate(cur, now, params, horizon, until, only, bounded=True) -> list[dict]:
    statement = _statement(horizon, until, _bounds_by_day(cur.connection))
    cur.execute(statement, dict(params, now=now, horizon=horizon, until=until, only=only,
                                bounded=bounded))
    return cur.fetchall()


def _replace(rows: list[dict], better: list[dict]) -> list[dict]:
    """`rows` with the rows of the stations in `better` taken from `better`."""
    stations = {r["device_sn"] for r in better}
    merged = [r for r in rows if r["device_sn"] not in stations] + better
    return sorted(merged, key=lambda r: (r["agent_id"], r["device_sn"]))


@dataclass
class AgentView:
    """One agent's supplies and what they add up to (S9: healthy supplies against the need)."""

    agent_id: str
    tier: int
    shutdown_delay_sec: int | None
    supplies: list[dict]

    @property
    def needed(self) -> int:
        wanted = self.supplies[0]["min_supplies"]
        return min(wanted or len(self.supplies), len(self.supplies))

    @property
    def healthy(self) -> int:
        return sum(1 for s in self.supplies if s["healthy"])

    @property
    def fired(self) -> list[dict]:
        """Supplies whose trigger fired, the earliest first."""
        fired = [s for s in self.supplies if s["trigger"]]
        return sorted(fired, key=lambda s: (_fires_at(s), s["device_sn"]))

    @property
    def shutdown_due(self) -> bool:
        # A trigger must have fired somewhere: missing or dead-on-grid supplies alone are an
        # alert, never a shutdown (S2, S3).
        return bool(self.fired) and self.healthy < self.needed

    @property
    def power_back(self) -> bool:
        return sum(1 for s in self.supplies if s["power_back"]) >= self.needed

    @property
    def episode_ids(self) -> set[str]:
        return {s["episode_id"] for s in self.supplies if s["episode_id"]}

    @property
    def in_episode(self) -> bool:
        return any(s["on_battery"] for s in self.supplies)


def _fires_at(supply: dict) -> datetime:
    return supply[f"{supply['trigger']}_fires_at".replace("dead_on_battery", "dead")]


def agent_views(rows: list[dict]) -> list[AgentView]:
    views: dict[str, AgentView] = {}
    for row in rows:
        view = views.get(row["agent_id"])
        if view is None:
            view = views[row["agent_id"]] = AgentView(
                row["agent_id"], row["tier"], row["shutdown_delay_sec"], []
            )
        view.supplies.append(row)
    # Lower tiers first, so in one evaluation the less important hosts are commanded first.
    return sorted(views.values(), key=lambda v: (v.tier, v.agent_id))


def trigger_reason(supply: dict) -> str:
    """Plain words for the trigger that fired, e.g. 'soc_min 14.5 <= 15 on battery'."""
    name = supply["trigger"]
    station = supply["device_name"] or supply["device_sn"]
    if name == "soc":
        text = f"soc_min {supply['soc']:.1f} <= {supply['soc_thr']:g} on battery"
    elif name == "runtime":
        left = supply["runtime_left_min"]
        text = (f"runtime left {left if left is None else round(left, 1)} min <= "
                f"{supply['runtime_thr']:g} min on battery")
    elif name == "battery_time":
        text = f"on battery for more than {supply['battery_limit_sec']:g} s"
    else:
        text = f"no data for {supply['age_sec']:.0f} s, last seen on battery"
    return f"{text} ({station})"
