"""Run the demo: simulator -> Mosquitto -> collector -> TimescaleDB -> policy -> dry-run agent.

Starts private PostgreSQL (with TimescaleDB when installed) and Mosquitto (with users and the
project's ACL) on free ports, applies the migrations, and plays a time-accelerated outage:
grid lost, SoC falls, the policy decides, the agent acknowledges a dry-run shutdown, the grid
returns. Prints progress and a summary, then stops everything it started (FOLLOW=1 keeps it
all running until Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from collector.service import Collector
from collector.settings import CollectorSettings
from collector.sources.simulator import SCENARIOS, Phase, Simulator, default_stations
from servicekit.migrate import upgrade
from servicekit.settings import DatabaseSettings
from testbed.mosquitto import MosquittoServer, random_users
from testbed.postgres import PostgresServer

REPO = Path(__file__).resolve().parent.parent
AGENT = "demo-host"
# The River 3 (245 Wh) powers the demo host: the smallest battery runs down first.
POWERING_STATION = "R631ZEB4WH123456"


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


class Demo:
    def __init__(self, accel: float, soc_min: float, debounce: int, timeout: float,
                 start_soc: float, outage_sec: float):
        self.accel, self.soc_min, self.debounce, self.timeout = accel, soc_min, debounce, timeout
        self.start_soc, self.outage_sec = start_soc, outage_sec
        self.procs: list[subprocess.Popen] = []
        self.pg: PostgresServer | None = None
        self.broker: MosquittoServer | None = None
        self.collector: Collector | None = None
        self.simulator: Simulator | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="ecoflow-demo-"))

    # -- set-up -------------------------------------------------------------------------------
    def start(self) -> None:
        self.pg = PostgresServer().start()
        flavour = "with TimescaleDB" if self.pg.timescaledb else "without TimescaleDB"
        say(f"PostgreSQL {flavour} on port {self.pg.port}")
        with psycopg.connect(self.pg.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE ecoflow")
        self.db_url = self.pg.url("ecoflow")
        upgrade(DatabaseSettings(DATABASE_URL=self.db_url,
                                 POSTGRES_READONLY_PASSWORD=secrets.token_urlsafe(12)))
        say("schema migrated")

        self.users = random_users("policy", "collector", "bridge", AGENT)
        self.broker = MosquittoServer(users=self.users).start()
        say(f"Mosquitto with users and ACL on port {self.broker.port}")
        self.signing_key = secrets.token_hex(16)

        stations = default_stations("outage")
        for st in stations:
            st.scenario = self.scenario()
            if st.sn == POWERING_STATION:
                # Half-charged and not charging before the outage, so the demo is short.
                st.soc, st.charge_w = self.start_soc, 0.0
        self.simulator = Simulator(stations, self.broker.host, self.broker.port, interval=0.5,
                                   accel=self.accel, user="bridge",
                                   password=self.users["bridge"], client_id="demo-simulator")
        self.collector = Collector(
            CollectorSettings(MQTT_HOST=self.broker.host, MQTT_PORT=self.broker.port,
                              MQTT_USER="collector", MQTT_PASS=self.users["collector"],
                              EXPORTER_PORT=0, FLUSH_INTERVAL_SEC=0.3,
                              COLLECTOR_CLIENT_ID="demo-collector"),
            DatabaseSettings(DATABASE_URL=self.db_url))
        self.collector.start()
        self.start_agent()
        self.start_policy()
        self.simulator.start()
        say(f"simulator: 3 stations (Delta Max JSON, Delta 2 Max JSON, River 3 protobuf),"
            f" physics {self.accel:g}x real time; {POWERING_STATION} powers host '{AGENT}'")

    def scenario(self) -> list[Phase]:
        """20 s on grid, then the grid is gone for `outage_sec` and comes back (real seconds)."""
        load = SCENARIOS["outage"][0].load_w
        return [Phase(grid=True, load_w=load, seconds=20 * self.accel),
                Phase(grid=False, load_w=load, seconds=self.outage_sec * self.accel),
                Phase(grid=True, load_w=load)]

    def env(self, **extra) -> dict:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("POSTGRES_", "MQTT_", "POLICY_", "AGENT_"))}
        base.update(MQTT_HOST=self.broker.host, MQTT_PORT=str(self.broker.port),
                    COMMAND_SIGNING_KEY=self.signing_key, LOG_LEVEL="WARNING")
        base.update(extra)
        return base

    def start_policy(self) -> None:
        env = self.env(
            DATABASE_URL=self.db_url, MQTT_USER="policy", MQTT_PASS=self.users["policy"],
            POLICY_SOC_MIN=str(self.soc_min), POLICY_DEBOUNCE_SEC=str(self.debounce),
            POLICY_SHUTDOWN_DELAY_SEC="5", POLICY_GRID_CONFIRM_SEC="5",
            POLICY_INTERVAL_SEC="1", POLICY_RESEND_SEC="3",
            DEVICE_TO_AGENTS_JSON=json.dumps({POWERING_STATION: [AGENT]}),
            EXPORTER_PORT="0")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "policy", "run"], env=env,
                                           cwd=REPO))
        say("policy worker started")

    def start_agent(self) -> None:
        env = self.env(AGENT_ID=AGENT, MQTT_USER=AGENT, MQTT_PASS=self.users[AGENT],
                       DRY_RUN="true", STATE_DIR=str(self.workdir / "agent"),
                       DRY_RUN_LOG=str(self.workdir / "agent-dry-run.jsonl"))
        self.procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "agents" / "linux" / "ecoflow-agent.py")], env=env,
            cwd=REPO))
        say(f"Linux agent '{AGENT}' started in dry run")

    # -- the run ------------------------------------------------------------------------------
    def watch(self) -> bool:
        """Print progress until the agent acknowledged and the grid is back; True on success."""
        deadline = time.monotonic() + self.timeout
        seen_events = 0
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                time.sleep(2)
                for proc in self.procs:
                    if proc.poll() is not None:
                        say(f"a process exited early: {proc.args} -> {proc.returncode}")
                        return False
                latest = conn.execute(
                    "SELECT coalesce(model, device_sn), soc_min_percent, grid_connected"
                    " FROM ecoflow_latest ORDER BY device_sn").fetchall()
                say("  ".join(f"{name}: {soc:.0f}% {'grid' if grid else 'BATTERY'}"
                              for name, soc, grid in latest if soc is not None))
                events = conn.execute(
                    "SELECT kind, coalesce(trigger, ''), coalesce(message, '') FROM policy_events"
                    " ORDER BY id OFFSET %s", (seen_events,)).fetchall()
                for kind, trigger, message in events:
                    say(f"  policy: {kind} {trigger} {message}".rstrip())
                seen_events += len(events)
                acked = conn.execute(
                    "SELECT count(*) FROM commands c JOIN command_acks a ON a.command_id = c.id"
                    " WHERE c.agent_id = %s AND c.action = 'shutdown' AND a.status = 'dry_run'",
                    (AGENT,)).fetchone()[0]
                ongoing = conn.execute(
                    "SELECT count(*) FILTER (WHERE ongoing), count(*) FROM outages").fetchone()
                if acked and ongoing[1] and not ongoing[0]:
                    time.sleep(1)
                    return True
        say("timed out waiting for the outage to play out")
        return False

    def summary(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            print("\n== Summary ==")
            print("Readings stored per station:")
            for sn, model, n in conn.execute(
                    "SELECT m.device_sn, d.model, count(*) FROM ecoflow_measurements m"
                    " LEFT JOIN devices d USING (device_sn) GROUP BY 1, 2 ORDER BY 1"):
                print(f"  {sn}  {model or '':<12} {n:>6}")
            print("Outage episodes:")
            for sn, start, end, dur, s0, s1, wh in conn.execute(
                    "SELECT device_sn, started_at, ended_at, round(duration_sec),"
                    " soc_start_percent, soc_end_percent, energy_out_wh FROM outages"
                    " ORDER BY device_sn, started_at"):
                print(f"  {sn}  {start:%H:%M:%S} -> {end:%H:%M:%S}  {dur:.0f} s  SoC {s0:.0f}% ->"
                      f" {s1:.0f}%  {wh:.1f} Wh drawn" if end else
                      f"  {sn}  {start:%H:%M:%S} -> (ongoing)  SoC {s0:.0f}%")
            print("Commands and acknowledgements:")
            for cid, agent, action, status, sent, acked, reason in conn.execute(
                    "SELECT id, agent_id, action, status, send_count, acked_at, reason"
                    " FROM commands ORDER BY issued_at"):
                print(f"  {action} -> {agent}: {status} (sent {sent}x, acked "
                      f"{acked:%H:%M:%S})  {reason or ''}" if acked else
                      f"  {action} -> {agent}: {status} (sent {sent}x)  {reason or ''}")
                for st, host, detail in conn.execute(
                        "SELECT status, host, detail FROM command_acks WHERE command_id = %s"
                        " ORDER BY received_at", (cid,)):
                    print(f"      ack {st} from {host}: {detail or ''}")
        print(f"\nLook at the data (while it runs; `make demo FOLLOW=1` keeps it running):\n"
              f"  psql '{self.db_url}'\n")

    def stop(self) -> None:
        if self.simulator:
            self.simulator.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.collector:
            self.collector.stop()
        if self.broker:
            self.broker.stop()
        if self.pg:
            self.pg.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    parser.add_argument("--accel", type=float, default=20.0,
                        help="how much faster than real time the stations' physics run")
    parser.add_argument("--start-soc", type=float, default=40.0,
                        help="SoC of the River 3 that powers the demo host at the start")
    parser.add_argument("--outage-sec", type=float, default=65.0,
                        help="how long (real seconds) the grid is gone")
    parser.add_argument("--soc-min", type=float, default=20.0, help="POLICY_SOC_MIN for the demo")
    parser.add_argument("--debounce", type=int, default=10, help="POLICY_DEBOUNCE_SEC")
    parser.add_argument("--timeout", type=float, default=170.0)
    parser.add_argument("--follow", action="store_true",
                        default=os.environ.get("FOLLOW", "") not in ("", "0"),
                        help="keep everything running until Ctrl-C (FOLLOW=1)")
    args = parser.parse_args(argv)
    demo = Demo(args.accel, args.soc_min, args.debounce, args.timeout, args.start_soc,
                args.outage_sec)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ok = False
    try:
        demo.start()
        ok = demo.watch()
        demo.summary()
        if args.follow:
            say("FOLLOW=1: everything keeps running; Ctrl-C stops it")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        say("interrupted")
        ok = ok or args.follow
    finally:
        demo.stop()
        say("stopped every process the demo started")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
