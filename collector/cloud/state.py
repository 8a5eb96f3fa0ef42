"""Stable per-installation values, kept in the database (`collector_state`)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)

_GET_OR_CREATE = """
INSERT INTO collector_state (key, value) VALUES (%s, %s)
ON CONFLICT (key) DO UPDATE SET key = EXCLUDED.key
RETURNING value
"""
# (The no-op update makes RETURNING give the stored value whether or not the row was new.)


def account_key(kind: str, account: str) -> str:
    """A state key for one EcoFlow account that does not store the account's name or key."""
    digest = hashlib.sha256(account.encode()).hexdigest()[:16]
    return f"ecoflow.{kind}.client_id.{digest}"


def get_or_create(db_url: str, key: str, make: Callable[[], str]) -> str:
    """The value stored under `key`, storing `make()` first when there is none."""
    with psycopg.connect(db_url, connect_timeout=10, autocommit=True) as conn:
        row = conn.execute(_GET_OR_CREATE, (key, make())).fetchone()
        return row[0]


def open_client_id() -> str:
    return f"ecoflow-ups-{uuid.uuid4().hex[:20]}"


def app_client_id(user_id: str) -> str:
    # The shape EcoFlow's own app uses; the broker is reported to check the user id part.
    return f"ANDROID_{str(uuid.uuid4()).upper()}_{user_id}"
