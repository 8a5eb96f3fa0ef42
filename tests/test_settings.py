"""Settings are validated at start with messages that name the variable, and secrets stay out
of logs."""

from __future__ import annotations

import logging

import pytest

from servicekit.logging import RedactingFormatter, redact, register_secret
from servicekit.settings import SettingsError, database_settings


def test_database_url_wins_and_gets_the_psycopg_driver(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db:5433/x")
    monkeypatch.setenv("POSTGRES_HOST", "ignored")
    s = database_settings()
    assert s.sqlalchemy_url() == "postgresql+psycopg://u:p@db:5433/x"


def test_postgres_variables_build_the_url_with_escaping(monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("POSTGRES_HOST", "timescaledb")
    monkeypatch.setenv("POSTGRES_USER", "eco")
    monkeypatch.setenv("POSTGRES_PASSWORD", "p@ss:w/rd")
    monkeypatch.setenv("POSTGRES_DB", "ecoflow")
    assert database_settings().libpq_url() == "postgresql://eco:p%40ss%3Aw%2Frd@timescaledb:5432/ecoflow"


@pytest.mark.parametrize(
    "variable, value, hint",
    [
        ("POSTGRES_PORT", "70000", "POSTGRES_PORT"),
        ("RETENTION_DAYS", "-1", "RETENTION_DAYS"),
        ("POSTGRES_READONLY_USER", "Robert'); DROP", "POSTGRES_READONLY_USER"),
        ("DATABASE_URL", "mysql://x", "postgresql://"),
    ],
)
def test_bad_setting_names_the_variable_without_echoing_the_value(monkeypatch, variable, value, hint):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as err:
        database_settings()
    assert variable in str(err.value) and hint in str(err.value)
    assert value not in str(err.value)


def test_redaction_masks_passwords_in_urls_keys_and_registered_secrets():
    register_secret("hunter2-very-secret")
    line = (
        'connecting to postgresql://eco:topsecret@db/x with {"certificatePassword": "abc123"}'
        " secretKey=WIbFEKre0s6 and hunter2-very-secret"
    )
    out = redact(line)
    for secret in ("topsecret", "abc123", "WIbFEKre0s6", "hunter2-very-secret"):
        assert secret not in out
    assert "postgresql://eco:***@db/x" in out


def test_log_records_go_through_redaction():
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "password=%s", ("pw-123456",), None)
    assert "pw-123456" not in RedactingFormatter("%(message)s").format(record)
