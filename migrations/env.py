"""Alembic environment: connects with the URL from settings (or one handed in by a caller)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from servicekit.settings import database_settings

config = context.config


def settings():
    """Settings for revisions that depend on them (read-only role, retention)."""
    if "settings" not in config.attributes:
        config.attributes["settings"] = database_settings()
    return config.attributes["settings"]


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or settings().sqlalchemy_url(),
        literal_binds=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or settings().sqlalchemy_url()
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection) -> None:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
