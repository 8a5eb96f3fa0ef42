"""TEST_TIMESCALEDB_LICENSE: the license the test servers run TimescaleDB under."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from testbed import postgres
from testbed.postgres import (
    LICENSE_ENV,
    PostgresServer,
    TimescaleLicenseUnavailable,
    requested_license,
)


def test_the_license_defaults_to_apache(monkeypatch):
    monkeypatch.delenv(LICENSE_ENV, raising=False)
    assert requested_license() == "apache"
    monkeypatch.setenv(LICENSE_ENV, " Timescale ")
    assert requested_license() == "timescale"


def test_an_unknown_license_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv(LICENSE_ENV, "community")
    with pytest.raises(TimescaleLicenseUnavailable, match=f"{LICENSE_ENV}='community'.*apache"):
        requested_license()


def test_the_community_license_without_its_module_fails_with_a_clear_message(monkeypatch,
                                                                             tmp_path):
    bindir = postgres.find_bindir()
    if not postgres.timescaledb_installed(bindir):
        pytest.skip("TimescaleDB is not installed")
    missing = tmp_path / "timescaledb-tsl-0.0.0.so"
    monkeypatch.setattr(postgres, "tsl_module", lambda _bindir: missing)
    monkeypatch.setenv(LICENSE_ENV, "timescale")
    with pytest.raises(TimescaleLicenseUnavailable) as exc:
        PostgresServer(bindir=bindir)
    assert f"{LICENSE_ENV}=timescale" in str(exc.value) and str(missing) in str(exc.value)
    assert "docs/database.md" in str(exc.value)
    # The Apache license needs no module.
    monkeypatch.setenv(LICENSE_ENV, "apache")
    PostgresServer(bindir=bindir).stop()


def test_the_tsl_module_path_names_the_installed_version():
    bindir = postgres.find_bindir()
    version = postgres.timescaledb_version(bindir)
    if version is None:
        pytest.skip("TimescaleDB is not installed")
    assert postgres.tsl_module(bindir).name == f"timescaledb-tsl-{version}.so"
    assert Path(postgres.tsl_module(bindir)).parent.is_dir()


def test_the_session_server_runs_under_the_requested_license(pg_server):
    if pg_server.kind != "native" or not pg_server.timescaledb:
        pytest.skip("only the testbed's own servers take TEST_TIMESCALEDB_LICENSE")
    with psycopg.connect(pg_server.admin_url) as conn:
        setting = conn.execute("SELECT current_setting('timescaledb.license')").fetchone()[0]
    assert setting == requested_license()
