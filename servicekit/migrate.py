"""`ecoflow-migrate`: bring the database schema up to date and re-apply settings-driven parts."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, pool

import migrations
from servicekit import dbsetup
from servicekit import logging as logsetup
from servicekit.settings import DatabaseSettings, database_settings

log = logging.getLogger("ecoflow.migrate")


def alembic_config(settings: DatabaseSettings, connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # Alembic's ini interpolation treats % specially; the URL may contain escaped characters.
    cfg.set_main_option("sqlalchemy.url", settings.sqlalchemy_url().replace("%", "%%"))
    cfg.attributes["settings"] = settings
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(settings: DatabaseSettings, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: DatabaseSettings, revision: str = "base") -> None:
    command.downgrade(alembic_config(settings), revision)


def apply_settings(settings: DatabaseSettings) -> list[str]:
    """Re-apply the read-only role (password, grants) and the retention period."""
    engine = create_engine(settings.sqlalchemy_url(), poolclass=pool.NullPool)
    done = []
    try:
        with engine.begin() as conn:
            if dbsetup.ensure_readonly_role(conn, settings.readonly_user, settings.readonly_password):
                done.append(f"read-only role {settings.readonly_user}: SELECT on all tables and views")
            done.append(dbsetup.apply_retention_policy(conn, settings.retention_days))
            done.append(f"database flavour: {dbsetup.flavour(conn).name}")
    finally:
        engine.dispose()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ecoflow-migrate",
        description="Apply the schema migrations to DATABASE_URL (or the POSTGRES_* settings).",
    )
    parser.add_argument("revision", nargs="?", default="head", help="target revision (default head)")
    parser.add_argument(
        "--downgrade", action="store_true", help="downgrade to the given revision (e.g. base)"
    )
    args = parser.parse_args(argv)
    logsetup.setup()
    settings = database_settings()
    if args.downgrade:
        downgrade(settings, args.revision)
        log.info("downgraded to %s", args.revision)
        return 0
    upgrade(settings, args.revision)
    for line in apply_settings(settings):
        log.info("%s", line)
    log.info("schema is at %s", args.revision)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
