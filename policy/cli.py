"""Command line: run the worker, and status, explain, fire-test and replay for operators."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from datetime import datetime

import psycopg

from policy import topology
from policy.metrics import PolicyMetrics
from policy.mqttlink import MqttLink
from policy.notify import Notifier
from policy.plan import print_plan
from policy.replay import replay
from policy.rules import agent_views, supply_rows
from policy.settings import load_database_settings, load_settings
from policy.worker import Worker, rows_as_dicts, serve
from servicekit import logging as logsetup
from servicekit.clock_skew import station_skews

log = logging.getLogger("ecoflow.policy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ecoflow-policy",
        description="Shutdown policy worker for EcoFlow stations (see docs/policy.md).")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the worker (the default)")
    sub.add_parser("status", help="stations and agents as the rules see them now")
    why = sub.add_parser("explain", help="why the last decisions were taken")
    why.add_argument("agent", nargs="?")
    why.add_argument("--limit", type=int, default=20)
    fire = sub.add_parser("fire-test", help="send a `test` command to an agent and wait for its ack")
    fire.add_argument("--agent", required=True)
    fire.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the ack")
    rep = sub.add_parser("replay", help="run the rules over stored history; sends nothing")
    rep.add_argument("--from", dest="start", required=True, type=datetime.fromisoformat)
    rep.add_argument("--to", dest="end", required=True, type=datetime.fromisoformat)
    rep.add_argument("--config", help="a policy file to try instead of POLICY_CONFIG_FILE")
    rep.add_argument("--step", type=float, help="seconds between evaluations")
    rep.add_argument("--json", action="store_true")
    pln = sub.add_parser("plan", help="the shutdown timeline if the grid were lost now;"
                         " reads only, sends nothing")
    pln.add_argument("--at", type=datetime.fromisoformat,
                     help="plan a loss at this moment instead, from the readings up to it")
    pln.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)

    logsetup.setup()
    overrides = {"config_file": args.config} if getattr(args, "config", None) else {}
    settings = load_settings(**overrides)
    db = load_database_settings()
    db_url = db.libpq_url()
    command = args.command or "run"
    if command == "run":
        return run(db_url, settings, db.retention_days)
    try:
        if command == "plan":
            return print_plan(db_url, settings, _aware(args.at) if args.at else None,
                              args.json)
        if command == "replay":
            decisions = replay(db_url, settings, _aware(args.start), _aware(args.end),
                               args.step)
            if args.json:
                print(json.dumps(decisions, default=str, indent=2))
            else:
                _table(decisions, ("ts", "decision", "agent_id", "trigger", "episode_id",
                                   "reason"))
            return 0
        with psycopg.connect(db_url, autocommit=True) as conn:
            if command == "status":
                return status(conn, settings)
            if command == "explain":
                return explain(conn, settings, args.agent, args.limit)
            return fire_test(conn, settings, args.agent, args.wait)
    except psycopg.errors.UndefinedTable as exc:
        log.error("%s", _no_schema(exc))
        return 2


def _no_schema(exc: psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn) -> str:
    """What to do when the database exists but holds no schema, or an older one (a missing
    column: the migrations are still running, or were not run after an upgrade)."""
    what = "an older EcoFlow schema" if isinstance(exc, psycopg.errors.UndefinedColumn) \
        else "no EcoFlow schema yet"
    return (f"the database has {what} ({_first_line(exc)}): run `ecoflow-migrate`"
            " with the same DATABASE_URL / POSTGRES_* settings (in Compose the `migrate`"
            " service does it)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run(db_url: str, settings, retention_days: int = 0) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Served from the start: while the database is away the evaluations stop, and say so.
    metrics = PolicyMetrics(prefix=settings.metrics_prefix)
    metrics.serve(settings.metrics_port)
    topo = _sync_when_database_is_up(db_url, settings, stop)
    if topo is None:
        return 0
    log.info("policy: %d agents on %d stations, SoC threshold %s %%, debounce %s s, "
             "commands %s", len(topo.agents), len(topo.devices), settings.soc_min,
             settings.debounce_sec, "signed" if settings.signing_key else "UNSIGNED")
    link = MqttLink.from_settings(settings)
    link.start()
    try:
        serve(db_url, settings, link, Notifier.from_settings(settings), stop,
              retention_days=retention_days, metrics=metrics)
    finally:
        link.stop()
    return 0


def _sync_when_database_is_up(db_url: str, settings, stop: threading.Event,
                              max_wait: float = 30.0):
    """The topology, written to the database once it accepts connections and holds the schema;
    None if stopped first. Compose or systemd may start the worker before PostgreSQL or before
    `ecoflow-migrate`: wait, saying so once per attempt, like the collector's writer does."""
    wait = 1.0
    while not stop.is_set():
        try:
            with psycopg.connect(db_url, autocommit=True, connect_timeout=10) as conn:
                return topology.sync(conn, settings)
        except psycopg.OperationalError as exc:
            log.warning("database unavailable at start (%s); retrying in %.0f s",
                        _first_line(exc), wait)
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            # Started before the migrations (a native install, or Compose without `migrate`),
            # or while they run (each revision commits on its own, so the first tables appear
            # before later columns): wait for them rather than die with a traceback.
            log.warning("%s; retrying in %.0f s", _no_schema(exc), wait)
        stop.wait(wait)
        wait = min(wait * 2, max_wait)
    return None


def status(conn, settings) -> int:
    views = agent_views(supply_rows(conn, conn.execute("SELECT now()").fetchone()[0],
                                    settings.rule_params()))
    stations = {s["device_sn"]: s for v in views for s in v.supplies}
    # Device clock minus receipt, the median over recent readings (servicekit.clock_skew).
    skews = {r["device_sn"]: r["skew_sec"] for r in station_skews(conn)}
    _table([{"station": s["device_name"] or sn, "freshness": s["freshness"],
             "grid": {True: "on", False: "OFF", None: "?"}[s["grid_on"]],
             "soc_min": _num(s["soc"]), "runtime_min": _num(s["runtime_left_min"]),
             "age_s": _num(s["age_sec"], 0), "clock_skew_s": _num(skews.get(sn), 0),
             "episode": s["episode_id"] or ""}
            for sn, s in sorted(stations.items())],
           ("station", "freshness", "grid", "soc_min", "runtime_min", "age_s", "clock_skew_s",
            "episode"))
    print()
    online = dict(conn.execute("SELECT agent_id, online FROM agent_status").fetchall())
    _table([{"agent": v.agent_id, "tier": v.tier,
             "supplies": f"{v.healthy}/{len(v.supplies)} healthy, needs {v.needed}",
             "online": {True: "yes", False: "NO", None: "?"}[online.get(v.agent_id)],
             "state": ("SHUTDOWN DUE" if v.shutdown_due
                       else "on battery" if v.in_episode else "ok")} for v in views],
           ("agent", "tier", "supplies", "online", "state"))
    return 0


def explain(conn, settings, agent: str | None, limit: int) -> int:
    rows = rows_as_dicts(
        conn,
        "SELECT ts, kind, trigger, device_sn, agent_id, message FROM policy_events"
        " WHERE %(agent)s::text IS NULL OR agent_id = %(agent)s"
        "    OR device_sn IN (SELECT device_sn FROM agent_supplies WHERE agent_id = %(agent)s)"
        " ORDER BY id DESC LIMIT %(limit)s", {"agent": agent, "limit": limit})
    _table(list(reversed(rows)), ("ts", "kind", "trigger", "agent_id", "device_sn", "message"))
    now = conn.execute("SELECT now()").fetchone()[0]
    for view in agent_views(supply_rows(conn, now, settings.rule_params())):
        if agent and view.agent_id != agent:
            continue
        print(f"\n{view.agent_id}: {view.healthy} of {len(view.supplies)} supplies healthy, "
              f"needs {view.needed}; {'shutdown due' if view.shutdown_due else 'no shutdown due'}")
        for s in view.supplies:
            print(f"  {s['device_name'] or s['device_sn']}: {s['freshness']}, "
                  f"{'on battery' if s['on_battery'] else 'on grid'}, soc_min {_num(s['soc'])} "
                  f"(threshold {s['soc_thr']:g}, low since {s['soc_low_since'] or '-'}, "
                  f"fires at {s['soc_fires_at'] or '-'}), trigger {s['trigger'] or '-'}")
    return 0


def fire_test(conn, settings, agent: str, wait: float) -> int:
    link = MqttLink.from_settings(settings, client_id=f"{settings.mqtt_client_id}-test")
    link.start()
    try:
        worker = Worker(conn, settings, link)
        cmd_id = worker.fire_test(agent)
        print(f"test command {cmd_id} sent to {agent}; waiting {wait:.0f} s for its ack")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            worker.handle_incoming(worker.db_now())
            ack = conn.execute("SELECT ack_status, ack_host, ack_detail FROM commands"
                               " WHERE id = %s", (cmd_id,)).fetchone()
            if ack[0]:
                print(f"ack: {ack[0]} from {ack[1] or '?'} {ack[2] or ''}".rstrip())
                return 0 if ack[0] in ("received", "dry_run", "scheduled") else 1
            time.sleep(0.2)
        print("no ack: is the agent running, subscribed and allowed by the broker ACL?")
        return 1
    finally:
        link.stop()


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.astimezone()


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[dict], columns: tuple[str, ...]) -> None:
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    if not rows:
        print("(none)")
