"""Liveness of every source per station: the age of its newest reading, the cadence expected
of it, and a state.

- fresh: a reading came within `quiet_periods` expected periods;
- quiet: nothing for longer than that, nothing yet since the start, or the source has just
  lost its connection;
- stale: nothing for `stale_periods` expected periods, or disconnected for longer than the quiet
  limit.

A source that stays connected but delivers nothing goes quiet, then stale, exactly like one
that disconnected: the connection is never taken as proof of data. A station a source should
deliver but never did is aged from when the source started. Ages are by the collector's own
receive clock, not the device's (a device clock may be wrong).

The collector feeds it from the pipeline (every decoded row), the sources tell it when they
connect and which stations they expect; the cloud sources read it for failover (REST polling
while pushes are quiet, `latestQuotas` again when app pushes stop). `ecoflow-collector status`
and `doctor` compute the same states from the database (`states_from_db`); `LivenessRecorder`
writes the collector's own states into `source_liveness` for the collector-health dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FRESH, QUIET, STALE = "fresh", "quiet", "stale"
STATES = (FRESH, QUIET, STALE)
DEFAULT_QUIET_PERIODS = 2.0
DEFAULT_STALE_PERIODS = 5.0


@dataclass(frozen=True)
class Entry:
    device_sn: str
    source: str
    period: float  # expected seconds between readings
    age: float  # seconds since the newest reading (or since the source started, if none)
    seen: bool  # a reading arrived since the collector started
    connected: bool | None  # None: the source has no connection to speak of (REST, NUT)
    state: str

    def describe(self) -> str:
        newest = f"newest reading {self.age:.0f} s ago" if self.seen else \
            f"no reading in {self.age:.0f} s"
        link = "" if self.connected is None else \
            ("; connected" if self.connected else "; disconnected")
        return (f"{self.source} {self.device_sn}: {self.state}, {newest} "
                f"(expected every {self.period:g} s){link}")


def classify(age: float, period: float, quiet_periods: float = DEFAULT_QUIET_PERIODS,
             stale_periods: float = DEFAULT_STALE_PERIODS, connected: bool | None = None,
             down_for: float = 0.0) -> str:
    """The state of one source for one station (see the module docstring)."""
    if age > stale_periods * period:
        return STALE
    if connected is False:
        return STALE if down_for > quiet_periods * period else QUIET
    if age > quiet_periods * period:
        return QUIET
    return FRESH


class Liveness:
    def __init__(self, quiet_periods: float = DEFAULT_QUIET_PERIODS,
                 stale_periods: float = DEFAULT_STALE_PERIODS, default_period: float = 30.0,
                 clock=time.time):
        if not 0 < quiet_periods < stale_periods:
            raise ValueError("need 0 < quiet_periods < stale_periods")
        self.quiet_periods, self.stale_periods = quiet_periods, stale_periods
        self.default_period = default_period
        self.clock = clock
        self._lock = threading.Lock()
        self._periods: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._last: dict[tuple[str, str], float] = {}  # (sn, source) -> receive time
        self._stations: set[tuple[str, str]] = set()
        self._begun: dict[tuple[str, str], float] = {}
        self._links: dict[str, tuple[bool, float]] = {}  # source -> (connected, since)
        self._logged: dict[tuple[str, str], str] = {}

    # -- what sources say --------------------------------------------------------------------
    def expect(self, source: str, period: float, stations: Iterable[str] = ()) -> None:
        """`source` should deliver a reading per station about every `period` seconds."""
        with self._lock:
            self._periods[source] = period
            self._started.setdefault(source, self.clock())
            self._stations.update((sn, source) for sn in stations)

    def add_stations(self, source: str, stations: Iterable[str]) -> None:
        with self._lock:
            self._started.setdefault(source, self.clock())
            self._stations.update((sn, source) for sn in stations)

    def set_connected(self, source: str, connected: bool) -> None:
        with self._lock:
            before = self._links.get(source)
            if before is None or before[0] != connected:
                self._links[source] = (connected, self.clock())

    def begin(self, source: str, sn: str) -> None:
        """`source` starts delivering `sn` now (e.g. REST polling as a failover): aged from now."""
        with self._lock:
            self._last.pop((sn, source), None)
            self._begun[(sn, source)] = self.clock()
            self._stations.add((sn, source))

    def forget(self, source: str, sn: str) -> None:
        """`source` no longer has to deliver `sn` (a failover that ended): no entry."""
        with self._lock:
            self._last.pop((sn, source), None)
            self._begun.pop((sn, source), None)
            self._stations.discard((sn, source))

    def seen(self, source: str, sn: str, at: float | None = None) -> None:
        with self._lock:
            self._last[(sn, source)] = self.clock() if at is None else at

    def seen_rows(self, source: str, rows) -> None:
        """Every decoded row (called by the pipeline's metrics hook)."""
        if not rows:
            return
        now = self.clock()
        with self._lock:
            for row in rows:
                self._last[(row.device_sn, source)] = now

    # -- what others ask -----------------------------------------------------------------------
    def period(self, source: str) -> float:
        return self._periods.get(source, self.default_period)

    def entry(self, source: str, sn: str, now: float | None = None) -> Entry:
        now = self.clock() if now is None else now
        with self._lock:
            period = self._periods.get(source, self.default_period)
            last = self._last.get((sn, source))
            link = self._links.get(source)
            started = self._begun.get((sn, source)) or self._started.get(source, now)
        age = now - (last if last is not None else started)
        connected = None if link is None else link[0]
        down_for = 0.0 if link is None or link[0] else now - link[1]
        state = classify(max(age, 0.0), period, self.quiet_periods, self.stale_periods,
                         connected, down_for)
        if last is None and state == FRESH:
            state = QUIET  # nothing delivered yet is not fresh
        return Entry(sn, source, period, max(age, 0.0), last is not None, connected, state)

    def state(self, source: str, sn: str) -> str:
        return self.entry(source, sn).state

    def fresh(self, sn: str, sources: Iterable[str]) -> bool:
        """Whether any of `sources` delivers `sn` freshly."""
        return any(self.entry(source, sn).state == FRESH for source in sources)

    def entries(self, now: float | None = None) -> list[Entry]:
        now = self.clock() if now is None else now
        with self._lock:
            keys = set(self._last) | self._stations
        return [self.entry(source, sn, now) for sn, source in sorted(keys)]

    def log_changes(self) -> list[Entry]:
        """Log each station's source when its state changes (once, not every check); returns
        the entries that changed."""
        changed = []
        for entry in self.entries():
            key = (entry.device_sn, entry.source)
            before = self._logged.get(key)
            if before == entry.state or (before is None and entry.state == FRESH):
                self._logged[key] = entry.state
                continue
            self._logged[key] = entry.state
            changed.append(entry)
            level = logging.INFO if entry.state == FRESH else logging.WARNING
            log.log(level, "liveness: %s", entry.describe())
        return changed


class LivenessMetrics:
    """Prometheus samples made from a Liveness at scrape time."""

    def __init__(self, liveness: Liveness, prefix: str = "ecoflow"):
        self.liveness = liveness
        self.prefix = prefix

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        age = GaugeMetricFamily(f"{self.prefix}_source_reading_age_seconds",
                                "Seconds since the newest reading from this source for this "
                                "station (since the source started, if none yet)",
                                labels=["device", "source"])
        period = GaugeMetricFamily(f"{self.prefix}_source_expected_period_seconds",
                                   "Expected seconds between readings from this source",
                                   labels=["device", "source"])
        state = GaugeMetricFamily(f"{self.prefix}_source_state",
                                  "1 for the source's current liveness state (fresh, quiet, "
                                  "stale) for this station", labels=["device", "source", "state"])
        station = GaugeMetricFamily(f"{self.prefix}_station_fresh",
                                    "1 when at least one source delivers this station freshly",
                                    labels=["device"])
        best: dict[str, int] = {}
        for e in self.liveness.entries():
            age.add_metric([e.device_sn, e.source], e.age)
            period.add_metric([e.device_sn, e.source], e.period)
            for name in STATES:
                state.add_metric([e.device_sn, e.source, name], 1 if e.state == name else 0)
            best[e.device_sn] = max(best.get(e.device_sn, 0), 1 if e.state == FRESH else 0)
        for sn, fresh in best.items():
            station.add_metric([sn], fresh)
        yield from (age, period, state, station)


# -- into the database (the collector-health dashboard) ---------------------------------------------
UPSERT_SQL = """
INSERT INTO source_liveness AS l (device_sn, source, state, age_sec, expected_period_sec,
    quiet_after_sec, stale_after_sec, connected, last_reading_received_at, changed_at,
    updated_at, refresh_sec, collector)
VALUES (%(sn)s, %(source)s, %(state)s, %(age)s, %(period)s, %(quiet)s, %(stale)s,
        %(connected)s, CASE WHEN %(seen)s THEN now() - make_interval(secs => %(age)s) END,
        now(), now(), %(refresh)s, %(collector)s)
ON CONFLICT (device_sn, source) DO UPDATE SET
    state = excluded.state, age_sec = excluded.age_sec,
    expected_period_sec = excluded.expected_period_sec,
    quiet_after_sec = excluded.quiet_after_sec, stale_after_sec = excluded.stale_after_sec,
    connected = excluded.connected,
    last_reading_received_at = excluded.last_reading_received_at,
    changed_at = CASE WHEN l.state = excluded.state THEN l.changed_at ELSE now() END,
    updated_at = now(), refresh_sec = excluded.refresh_sec, collector = excluded.collector
RETURNING (xmax = 0) OR l.changed_at = now()
"""
CHANGE_SQL = """
INSERT INTO source_liveness_changes (device_sn, source, state, age_sec)
VALUES (%(sn)s, %(source)s, %(state)s, %(age)s)
"""
GONE_SQL = """
WITH gone AS (
    DELETE FROM source_liveness
     WHERE collector = %(collector)s
       AND (device_sn, source) NOT IN (
           SELECT * FROM unnest(%(sns)s::text[], %(sources)s::text[]))
    RETURNING device_sn, source)
INSERT INTO source_liveness_changes (device_sn, source, state)
SELECT device_sn, source, 'gone' FROM gone
"""
PRUNE_SQL = "DELETE FROM source_liveness_changes WHERE ts < now() - make_interval(days => %s)"


class LivenessRecorder:
    """Writes what a Liveness computes into `source_liveness` (migration 0012), so Grafana shows
    the collector's own states: each (station, source) whose state changed at once (checked
    every `check_sec`), every row every `refresh_sec` (so a row older than two `refresh_sec`
    tells the dashboard that the collector stopped writing), and each change into
    `source_liveness_changes`. Rows this collector wrote for a (station, source) it no longer
    expects are removed at the refresh. A database that does not answer is retried at the next
    check; liveness itself never waits for it."""

    def __init__(self, liveness: Liveness, db_url: str, collector: str = "",
                 refresh_sec: float = 30.0, check_sec: float = 1.0, keep_days: int = 90):
        self.liveness = liveness
        self.db_url = db_url
        self.collector = collector
        self.refresh_sec, self.check_sec, self.keep_days = refresh_sec, check_sec, keep_days
        self.writes = 0
        self._written: dict[tuple[str, str], str] = {}
        self._refreshed = 0.0
        self._conn = None
        self._failing = False
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="liveness-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()

    def _run(self) -> None:
        while True:
            self.record()
            if self._stop.wait(self.check_sec):
                return

    def record(self, force: bool = False) -> int:
        """Write the changed entries (all of them when a refresh is due); the rows written."""
        entries = self.liveness.entries()
        now = time.monotonic()
        refresh = force or now - self._refreshed >= self.refresh_sec
        todo = [e for e in entries
                if refresh or self._written.get((e.device_sn, e.source)) != e.state]
        if (not todo and not refresh) or now < self._retry_at:
            return 0
        try:
            conn = self._connection()
            with conn.transaction():
                for e in todo:
                    params = {"sn": e.device_sn, "source": e.source, "state": e.state,
                              "age": e.age, "period": e.period,
                              "quiet": self.liveness.quiet_periods * e.period,
                              "stale": self.liveness.stale_periods * e.period,
                              "connected": e.connected, "seen": e.seen,
                              "refresh": self.refresh_sec, "collector": self.collector}
                    changed = conn.execute(UPSERT_SQL, params).fetchone()[0]
                    if changed:
                        conn.execute(CHANGE_SQL, params)
                if refresh:
                    conn.execute(GONE_SQL, {"collector": self.collector,
                                            "sns": [e.device_sn for e in entries],
                                            "sources": [e.source for e in entries]})
                    conn.execute(PRUNE_SQL, (self.keep_days,))
        except Exception as exc:  # noqa: BLE001 - the database may be down; retry next check
            if not self._failing:
                hint = " (run ecoflow-migrate)" if "source_liveness" in str(exc) else ""
                log.warning("liveness not written to the database%s (%s: %s); retrying every "
                            "%g s", hint, type(exc).__name__, str(exc).strip()[:200],
                            self.refresh_sec)
            self._failing = True
            self._retry_at = now + self.refresh_sec
            self._close()
            return 0
        if self._failing:
            log.info("liveness written to the database again")
        self._failing = False
        self._written = {(e.device_sn, e.source): e.state for e in entries}
        if refresh:
            self._refreshed = now
        self.writes += len(todo)
        return len(todo)

    def _connection(self):
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.db_url, connect_timeout=5, autocommit=True,
                                         application_name="ecoflow-collector liveness")
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None


# -- from the database (status, doctor) ---------------------------------------------------------
NEWEST_SQL = """
SELECT device_sn, source, extract(epoch FROM now() - max(coalesce(received_at, ts)))::float8
FROM ecoflow_measurements
WHERE ts > now() - make_interval(secs => %s)
GROUP BY device_sn, source
ORDER BY device_sn, source
"""


def periods_from_settings(s) -> dict[str, float]:
    """The expected cadence of each source label, from the collector settings."""
    push = s.ecoflow_push_period_sec
    return {"open_mqtt": push, "app_mqtt": push, "rest": s.collecting_interval,
            "bridge": s.bridge_period_sec, "simulator": s.simulator_interval_sec,
            "nut": s.nut_poll_sec}


def states_from_db(conn, periods: dict[str, float], quiet_periods: float,
                   stale_periods: float, window_sec: float = 86400) -> list[Entry]:
    """Each (station, source) with a reading in the last `window_sec`, aged by receive time
    (the connection state is the running collector's and is not known here)."""
    out = []
    for sn, source, age in conn.execute(NEWEST_SQL, (window_sec,)).fetchall():
        period = periods.get(source, 30.0)
        age = max(float(age), 0.0)
        out.append(Entry(sn, source, period, age, True, None,
                         classify(age, period, quiet_periods, stale_periods)))
    return out


def station_verdicts(entries: list[Entry]) -> dict[str, Entry]:
    """Each station's best source (fresh beats quiet beats stale; then the youngest)."""
    rank = {FRESH: 0, QUIET: 1, STALE: 2}
    best: dict[str, Entry] = {}
    for e in entries:
        known = best.get(e.device_sn)
        if known is None or (rank[e.state], e.age) < (rank[known.state], known.age):
            best[e.device_sn] = e
    return best


def _age_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def table(entries: list[Entry]) -> list[str]:
    lines = []
    for e in entries:
        lines.append(f"{e.device_sn:<18} {e.source:<10} {e.state:<6} newest "
                     f"{_age_text(e.age)} ago (expected every {e.period:g} s)")
    return lines


def status_main(argv: list[str]) -> int:
    """`ecoflow-collector status`: each station's sources with the age of their newest
    reading (receive time) and fresh / quiet / stale, from the database. Exit status 0 when
    every station has a fresh source, 1 when one has none, 2 when the database does not answer."""
    import argparse

    import psycopg

    from collector.settings import collector_settings
    from servicekit.settings import database_settings

    parser = argparse.ArgumentParser(prog="ecoflow-collector status",
                                     description=status_main.__doc__.split("\n")[0])
    parser.add_argument("--window", type=float, default=86400,
                        help="only sources with a reading in this many seconds (default a day)")
    args = parser.parse_args(argv)
    s = collector_settings(sources="bridge")
    try:
        with psycopg.connect(database_settings().libpq_url(), connect_timeout=5,
                             autocommit=True) as conn:
            entries = states_from_db(conn, periods_from_settings(s), s.liveness_quiet_periods,
                                     s.liveness_stale_periods, args.window)
    except psycopg.Error as exc:
        print(f"database not reachable: {type(exc).__name__}: {exc}".strip())
        return 2
    print(f"Sources by station (quiet after {s.liveness_quiet_periods:g} expected periods "
          f"without a reading, stale after {s.liveness_stale_periods:g}):")
    for line in table(entries):
        print("  " + line)
    verdicts = station_verdicts(entries)
    print("Stations:")
    for sn, e in sorted(verdicts.items()):
        print(f"  {sn:<18} {e.state:<6} (best source {e.source}, newest {_age_text(e.age)} ago)")
    if not verdicts:
        print("  none with a reading in the window")
    return 0 if all(e.state == FRESH for e in verdicts.values()) else 1
