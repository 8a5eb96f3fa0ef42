"""`ecoflow-nut` / `python -m nutserver`: serve the stations as NUT UPSes (docs/nut-server.md)."""

from __future__ import annotations

import asyncio
import signal
import sys

from nutserver.server import NutServer
from nutserver.settings import load_settings
from servicekit import logging as logsetup
from servicekit.settings import database_settings


def main(argv: list[str] | None = None) -> int:
    logsetup.setup()
    settings = load_settings()
    db_url = database_settings().libpq_url()
    server = NutServer(settings, db_url)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
