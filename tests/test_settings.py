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


# A password with a special character pasted into DATABASE_URL as it is: psycopg's own error
# quoted the broken token, password and all, in a traceback.
MALFORMED_URLS = [
    "postgresql://u:p%zzsecret-4711@127.0.0.1:1/db",  # '%' not followed by two hex digits
    "postgresql://u:secret-4711%@127.0.0.1:1/db",  # '%' at the end
    "postgresql://u:p@ss@secret-4711@127.0.0.1:1/db",  # unencoded '@'
    "postgresql://u:p#secret-4711@127.0.0.1:1/db",  # unencoded '#'
    "postgresql://u:pa/secret-4711@127.0.0.1:1/db",  # unencoded '/'
    "postgresql://u:p?secret-4711@127.0.0.1:1/db",  # unencoded '?'
    "postgresql://u:4711/secret-4711@127.0.0.1:1/db",  # '/' after a number that looks like a port
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_database_url_is_refused_without_echoing_the_password(monkeypatch, url):
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(SettingsError) as err:
        database_settings()
    message = str(err.value)
    assert "DATABASE_URL" in message and "percent-encode" in message
    assert "secret-4711" not in message


@pytest.mark.parametrize("url", [
    "postgresql://u:p%25ss%40w%2Frd%23x%3F@db:5432/x",
    "postgresql://db/x?sslmode=require&application_name=ecoflow",
    "postgresql://u@h1:5432,h2:5433/x",
    "postgresql://u:p@[::1]:5432/x",
    "postgresql:///x?host=/var/run/postgresql",
    "postgresql://db.example/x?user=admin@server",
])
def test_well_formed_database_urls_are_accepted(monkeypatch, url):
    monkeypatch.setenv("DATABASE_URL", url)
    assert database_settings().libpq_url().endswith(url.split("://", 1)[1])


@pytest.mark.parametrize("entry", [["-m", "policy"], ["-m", "policy", "status"],
                                   ["-m", "collector"]])
@pytest.mark.parametrize("url", MALFORMED_URLS[:4])
def test_services_refuse_a_malformed_database_url_without_printing_it(entry, url):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES", "DATABASE"))}
    env.update(DATABASE_URL=url, MQTT_HOST="127.0.0.1", MQTT_PORT="1", EXPORTER_PORT="0")
    proc = subprocess.run([sys.executable, *entry], env=env, capture_output=True, text=True,
                          timeout=20)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "DATABASE_URL" in output and "percent-encode" in output, output
    assert "secret-4711" not in output and "Traceback" not in output, output


def test_an_empty_variable_is_unset_and_the_default_applies(monkeypatch):
    """`EXPORTER_PORT=` in an env file (systemd's EnvironmentFile, a copied example) or an
    exported empty variable stopped every service with "unable to parse string as an integer":
    empty means "not set" here, as with Compose's ${VAR:-default}."""
    from collector.settings import collector_settings
    from nutserver.settings import load_settings as nut_settings
    from policy.settings import load_settings as policy_settings

    for name in ("EXPORTER_PORT", "POLICY_SOC_MIN", "POSTGRES_PORT", "NUT_POLL_SEC",
                 "DEVICE_TO_AGENTS_JSON"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("COLLECTOR_SOURCES", "simulator")
    assert collector_settings().exporter_port == 9090
    assert policy_settings().soc_min == 10
    assert database_settings().postgres_port == 5432
    assert nut_settings().poll_sec == 2.0
