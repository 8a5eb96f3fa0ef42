"""A private PostgreSQL cluster: initdb into a temporary directory, start on a free port."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbed.ports import free_port


class PostgresNotFound(RuntimeError):
    pass


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


def timescaledb_installed(bindir: Path) -> bool:
    pg_config = bindir / "pg_config"
    if pg_config.exists():
        sharedir = subprocess.run(
            [str(pg_config), "--sharedir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    else:  # Debian keeps pg_config in /usr/bin; fall back to the server's usual share dir
        sharedir = f"/usr/share/postgresql/{bindir.parent.name}"
    return Path(sharedir, "extension", "timescaledb.control").exists()


class PostgresServer:
    """One throwaway cluster. Use as a context manager, or call start() and stop()."""

    def __init__(self, timescaledb: bool = True, bindir: Path | None = None, base: str | None = None,
                 durable: bool = False):
        self.bindir = bindir or find_bindir()
        self.timescaledb = timescaledb and timescaledb_installed(self.bindir)
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
