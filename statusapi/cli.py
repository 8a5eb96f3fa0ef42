"""The `ecoflow-status-api` command: settings, the read-only check, and serving."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import psycopg
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from servicekit import logging as logsetup
from servicekit import reader
from servicekit.settings import DatabaseSettings, SettingsError, load
from statusapi.server import StatusServer

log = logging.getLogger("ecoflow.statusapi")

DEFAULT_BIND = "127.0.0.1:8088"

ENV_NAMES = {
    "bind": "STATUS_API_BIND",
    "heartbeat_sec": "STATUS_API_HEARTBEAT_SEC",
    "poll_sec": "STATUS_API_POLL_SEC",
    "cors_origin": "STATUS_API_CORS_ORIGIN",
}


def parse_bind(value: str) -> tuple[str, int]:
    """host:port, [v6-address]:port; the host may not be left out."""
    host, sep, port = value.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. {DEFAULT_BIND}, or 0.0.0.0:8088 "
                         "to be reached from the network)")
    return host, int(port)


class StatusApiSettings(DatabaseSettings):
    """The database settings (read-only role) plus the API's own."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, env_ignore_empty=True)

    bind: str = Field(default=DEFAULT_BIND, validation_alias="STATUS_API_BIND")
    heartbeat_sec: float = Field(default=15.0, gt=0, le=300,
                                 validation_alias="STATUS_API_HEARTBEAT_SEC")
    poll_sec: float = Field(default=1.0, ge=0.1, le=60, validation_alias="STATUS_API_POLL_SEC")
    cors_origin: str = Field(default="", validation_alias="STATUS_API_CORS_ORIGIN")

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        parse_bind(value)
        return value


def build_server(settings: StatusApiSettings) -> StatusServer:
    """The server, after making sure its role cannot write."""
    url = reader.reader_url(settings)
    try:
        with reader.connect(url, connect_timeout=10) as conn:
            user, may_write = reader.role_may_write(conn)
    except psycopg.OperationalError as exc:
        raise SettingsError(f"cannot reach the database: {logsetup.redact(str(exc))}") from None
    if may_write:
        raise SettingsError(
            f"the status API connects as {user!r}, which may write to the stack's tables: give "
            "it the read-only role (POSTGRES_READONLY_USER and POSTGRES_READONLY_PASSWORD, and "
            "no DATABASE_URL, or a DATABASE_URL naming that role)")
    return StatusServer(parse_bind(settings.bind), url, heartbeat_sec=settings.heartbeat_sec,
                        poll_sec=settings.poll_sec, cors_origin=settings.cors_origin)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ecoflow-status-api",
        description="Read-only JSON and server-sent events for widgets (docs/status-api.md).")
    parser.add_argument("--bind", help=f"host:port (STATUS_API_BIND, default {DEFAULT_BIND})")
    args = parser.parse_args(argv)
    logsetup.setup()
    kw = {"bind": args.bind} if args.bind else {}
    settings = load(StatusApiSettings, ENV_NAMES, **kw)
    logsetup.register_secret(settings.readonly_password)
    logsetup.register_secret(settings.postgres_password)
    server = build_server(settings)
    log.info("serving %s/api/stations (read-only role)", server.url)
    # shutdown() waits for serve_forever to return: not from the thread running it.
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
