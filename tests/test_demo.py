"""The demo's scenario, shortened, plays out end to end: simulator -> collector -> policy ->
dry-run Linux agent; one outage episode, one acknowledged dry-run shutdown, nothing left
running."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psycopg

from demo.__main__ import AGENT, POWERING_STATION, Demo

REPO = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in blob:
            found.append(int(proc.name))
    return found


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_shortened_demo_shuts_the_host_down_once_in_dry_run_and_cleans_up():
    demo = Demo(accel=40, soc_min=20, debounce=5, timeout=120, start_soc=30, outage_sec=35)
    try:
        demo.start()
        assert demo.watch()
        with psycopg.connect(demo.db_url) as conn:
            episodes = conn.execute(
                "SELECT count(*), bool_and(NOT ongoing) FROM outages WHERE device_sn = %s",
                (POWERING_STATION,)).fetchone()
            shutdowns = conn.execute(
                "SELECT c.agent_id, array_agg(a.status ORDER BY a.received_at)"
                " FROM commands c JOIN command_acks a ON a.command_id = c.id"
                " WHERE c.action = 'shutdown' GROUP BY c.id, c.agent_id").fetchall()
    finally:
        demo.stop()
    assert episodes == (1, True)
    assert len(shutdowns) == 1
    agent, acks = shutdowns[0]
    assert agent == AGENT and "dry_run" in acks
    # Nothing it started is left: no server listening, no process pointing at them.
    for port in (demo.pg.port, demo.broker.port):
        assert not _listening(port)
        assert _processes_mentioning(f"127.0.0.1:{port}") == []
    assert _processes_mentioning(f"MQTT_PORT={demo.broker.port}") == []
    assert all(p.poll() is not None for p in demo.procs)


def test_make_demo_entry_point_prints_its_options():
    out = subprocess.run([sys.executable, "-m", "demo", "--help"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and "FOLLOW=1" in out.stdout
