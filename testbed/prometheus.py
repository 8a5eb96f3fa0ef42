"""A private Prometheus server (Debian's `prometheus` package) on a free port, and promtool.

`adapted_config` turns the shipped compose/prometheus/prometheus.yml into one that scrapes
processes on this machine: the same jobs and rule file, with the Compose service names replaced
by loopback addresses and a short scrape interval.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from testbed.ports import free_port

REPO = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO / "compose" / "prometheus"
INSTALL_HINT = ("install it with scripts/install-system-deps (Debian: apt-get install "
                "prometheus, which carries promtool)")


class PrometheusNotFound(RuntimeError):
    pass


def find(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists()
                                    else None)
    if not path:
        raise PrometheusNotFound(f"{binary} not found: {INSTALL_HINT}")
    return path


def promtool(*args: str, stdin: str | None = None, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
    return subprocess.run([find("promtool"), *args], input=stdin, text=True,
                          capture_output=True, timeout=120, cwd=cwd)


def adapted_config(targets: dict[str, list[str]], scrape_interval: str = "1s",
                   rules: Path | None = None) -> dict:
    """The shipped prometheus.yml with each job's targets replaced (job name -> host:port)."""
    config = yaml.safe_load((SHIPPED_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    config["rule_files"] = [str(rules or SHIPPED_DIR / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(targets) <= set(jobs), f"no such job in the shipped config: {set(targets) - set(jobs)}"
    for name, job in jobs.items():
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": targets.get(name, [])}]
    return config


@dataclass
class PrometheusServer:
    config: dict
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ecoflow-prom-")))

    def __post_init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = self.base / "prometheus.log"
        self.config_file = self.base / "prometheus.yml"
        self._proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self, timeout: float = 60.0) -> PrometheusServer:
        self.config_file.write_text(yaml.safe_dump(self.config))
        started = time.monotonic()
        with open(self.logfile, "wb") as log:
            self._proc = subprocess.Popen(
                [find("prometheus"), f"--config.file={self.config_file}",
                 f"--storage.tsdb.path={self.base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--web.enable-lifecycle"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.base)
        deadline = started + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self._proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.1)
        self.startup_seconds = time.monotonic() - started
        return self

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def api(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict]:
        """The query's result once it is not empty."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.base, ignore_errors=True)
