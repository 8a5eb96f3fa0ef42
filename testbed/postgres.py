"""A private PostgreSQL cluster: initdb into a temporary directory, start on a free port.

With TimescaleDB, the server runs under the license TEST_TIMESCALEDB_LICENSE names (its
`timescaledb.license` setting): `apache` (the default: only the Apache-2 features, as a machine
with the Apache build has) or `timescale` (the community edition: continuous aggregates,
compression and retention policies), which needs TimescaleDB's TSL module installed beside the
extension. See docs/database.md.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbed.ports import free_port

LICENSE_ENV = "TEST_TIMESCALEDB_LICENSE"
LICENSES = ("apache", "timescale")


class PostgresNotFound(RuntimeError):
    pass


class TimescaleLicenseUnavailable(RuntimeError):
    """The requested TimescaleDB license cannot be had on this machine."""


def requested_license(value: str | None = None) -> str:
    """The TimescaleDB license the test servers run under: `value`, else TEST_TIMESCALEDB_LICENSE,
    else `apache`."""
    lic = (value if value is not None else os.environ.get(LICENSE_ENV, "")).strip().lower()
    lic = lic or "apache"
    if lic not in LICENSES:
        raise TimescaleLicenseUnavailable(
            f"{LICENSE_ENV}={lic!r}: expected one of {', '.join(LICENSES)} (default apache)")
    return lic


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then the newest Debian install."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if not candidates:
        raise PostgresNotFound(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
            "/usr/lib/postgresql/*/bin: install the PostgreSQL server (Debian: apt-get install postgresql)"
        )
    return Path(candidates[-1]).parent


def _pg_dir(bindir: Path, what: str, debian_default: str) -> Path:
    pg_config = bindir / "pg_config"
    if pg_config.exists():
        return Path(subprocess.run(
            [str(pg_config), f"--{what}"], capture_output=True, text=True, check=True
        ).stdout.strip())
    # Debian keeps pg_config in /usr/bin; fall back to the server's usual directories
    return Path(debian_default.format(major=bindir.parent.name))


def timescaledb_installed(bindir: Path) -> bool:
    sharedir = _pg_dir(bindir, "sharedir", "/usr/share/postgresql/{major}")
    return Path(sharedir, "extension", "timescaledb.control").exists()


def timescaledb_version(bindir: Path) -> str | None:
    """The version CREATE EXTENSION timescaledb installs (its control file's default_version)."""
    control = _pg_dir(bindir, "sharedir", "/usr/share/postgresql/{major}") / "extension" / \
        "timescaledb.control"
    if not control.exists():
        return None
    for line in control.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "default_version":
            return value.strip().strip("'\"")
    return None


def tsl_module(bindir: Path) -> Path:
    """Where TimescaleDB's TSL module (the community edition's features) must be for the
    installed version; the Apache build has none."""
    libdir = _pg_dir(bindir, "pkglibdir", "/usr/lib/postgresql/{major}/lib")
    return libdir / f"timescaledb-tsl-{timescaledb_version(bindir)}.so"


class PostgresServer:
    """One throwaway cluster. Use as a context manager, or call start() and stop()."""

    def __init__(self, timescaledb: bool = True, bindir: Path | None = None, base: str | None = None,
                 durable: bool = False, license: str | None = None):
        self.bindir = bindir or find_bindir()
        self.timescaledb = timescaledb and timescaledb_installed(self.bindir)
        # Set explicitly either way: a full (TSL) build defaults to `timescale`, the Apache
        # build to `apache`; the tests must not depend on which build the machine has.
        self.license = requested_license(license) if self.timescaledb else None
        if self.license == "timescale" and not tsl_module(self.bindir).exists():
            raise TimescaleLicenseUnavailable(
                f"{LICENSE_ENV}=timescale asks for TimescaleDB's community edition, but its TSL"
                f" module {tsl_module(self.bindir)} is not installed (this machine has the"
                " Apache-only build). Install the community build of the same version"
                " (docs/database.md), point TEST_DATABASE_URL at a community server, or unset"
                f" {LICENSE_ENV}.")
        # Tests trade durability for speed; benchmarks keep PostgreSQL's defaults so that
        # per-commit costs are what a real installation pays.
        self.durable = durable
        self.base = Path(tempfile.mkdtemp(prefix="ecoflow-pg-", dir=base))
        self.datadir = self.base / "data"
        self.logfile = self.base / "server.log"
        self.port = free_port()
        self.user = "postgres"
        self._run_as = None
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root: run them as the postgres system user.
            try:
                self._run_as = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotFound(
                    "running as root and there is no 'postgres' system user to run the server as"
                ) from None
            os.chown(self.base, self._run_as.pw_uid, self._run_as.pw_gid)
        self.started = False

    # -- process control -------------------------------------------------------------------
    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        kw = {}
        if self._run_as is not None:
            kw = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        return subprocess.run(
            list(args), capture_output=True, text=True, check=check, cwd=self.base, **kw
        )

    def start(self) -> PostgresServer:
        """Create the cluster on first start, then run the server (again after halt())."""
        if not self.datadir.exists():
            self._init()
        try:
            self._cmd(
                str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                "-w", "-t", "60", "start",
            )
        except subprocess.CalledProcessError as exc:
            log_tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.strip()}\n{log_tail}") from None
        self.started = True
        return self

    def halt(self) -> None:
        """Stop the server but keep its data, e.g. to simulate a database outage."""
        self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        self.started = False

    def _init(self) -> None:
        try:
            self._cmd(
                str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", self.user,
                "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync",
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.strip()}") from None
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.base}'",
            "max_connections = 200",
            "timezone = 'UTC'",
            "log_min_messages = warning",
        ]
        if not self.durable:
            conf += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        if self.timescaledb:
            conf += [
                "shared_preload_libraries = 'timescaledb'",
                "timescaledb.telemetry_level = off",
                f"timescaledb.license = '{self.license}'",
                "timescaledb.max_background_workers = 8",
                "max_worker_processes = 16",
            ]
        with open(self.datadir / "postgresql.conf", "a") as fh:
            fh.write("\n# ecoflow testbed\n" + "\n".join(conf) + "\n")

    def stop(self) -> None:
        if self.started:
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
                      "-w", "stop", check=False)
            self.started = False
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- addresses --------------------------------------------------------------------------
    def url(self, dbname: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.user}@127.0.0.1:{self.port}/{dbname}"
