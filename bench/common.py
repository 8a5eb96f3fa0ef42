"""Shared by the benchmarks: throwaway servers, a migrated database, the results file."""

from __future__ import annotations

import json
import os
import platform
import secrets
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from servicekit.migrate import upgrade
from servicekit.settings import DatabaseSettings
from testbed.postgres import PostgresServer

RESULTS = Path(__file__).resolve().parent / "results.json"


@contextmanager
def migrated_database(name: str = "bench"):
    with PostgresServer(durable=True) as pg:
        url = pg.url()
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        upgrade(DatabaseSettings(DATABASE_URL=pg.url(name),
                                 POSTGRES_READONLY_PASSWORD=secrets.token_urlsafe(12)))
        yield pg, pg.url(name)


def save(section: str, figures: dict) -> None:
    """Merge one benchmark's figures into bench/results.json."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[section] = {
        **figures,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def table(rows: list[tuple], headers: tuple) -> str:
    cells = [tuple(str(c) for c in r) for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
