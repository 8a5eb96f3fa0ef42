"""Prometheus metrics of the policy worker: evaluations and their duration, decisions by kind,
commands by status, agents online. Names: docs/prometheus.md.

The worker counts in memory (`evaluated`, `event`); the figures that live in the database
(commands by status, agents online) are read on the worker's own connection after an
evaluation, at most every DB_REFRESH_SEC, never from the HTTP thread.
"""

from __future__ import annotations

import logging
import time

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("ecoflow.policy")

DEFAULT_PREFIX = "ecoflow"
DB_REFRESH_SEC = 5.0
COMMAND_STATUSES = ("pending", "sent", "received", "scheduled", "executing", "aborted",
                    "rejected", "expired", "dry_run")
# policy_events kinds that are decisions of the worker -> the `kind` label.
DECISIONS = {
    "trigger_fired": "shutdown",
    "command_reissued": "shutdown_reissued",
    "command_aborted": "abort",
    "test_fired": "test",
    "power_returned_after_commit": "power_returned_after_commit",
}
COMMANDS_SQL = "SELECT status, count(*) FROM commands GROUP BY status"
AGENTS_SQL = """
SELECT a.agent_id, coalesce(s.online, false)
  FROM agents a LEFT JOIN agent_status s USING (agent_id)
 WHERE a.enabled
"""


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, prefix: str = DEFAULT_PREFIX):
        self.registry = r = registry or CollectorRegistry()

        def n(suffix: str) -> str:
            return f"{prefix}_policy_{suffix}"

        self.evaluations = Counter(n("evaluations"), "Completed evaluations of the rules",
                                   registry=r)
        self.evaluation_seconds = Histogram(
            n("evaluation_duration_seconds"), "Time one evaluation took (rules, decisions, "
            "deliveries)", registry=r,
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.last_evaluation = Gauge(n("last_evaluation_timestamp_seconds"),
                                     "Unix time the latest evaluation completed", registry=r)
        self.decisions = Counter(n("decisions"), "Decisions taken, by kind", ["kind"],
                                 registry=r)
        self.commands = Gauge(n("commands"), "Commands in the database, by current status",
                              ["status"], registry=r)
        self.agent_online = Gauge(f"{prefix}_agent_online",
                                  "Enabled agent's last status was online (1) or not (0)",
                                  ["agent"], registry=r)
        self.agents_online = Gauge(n("agents_online"), "Enabled agents online", registry=r)
        self.agents = Gauge(n("agents"), "Enabled agents", registry=r)
        for kind in DECISIONS.values():  # every series exists from the start, at 0
            self.decisions.labels(kind)
        for status in COMMAND_STATUSES:
            self.commands.labels(status)
        self._db_read_at = 0.0
        self._agents: set[str] = set()

    def event(self, kind: str) -> None:
        decision = DECISIONS.get(kind)
        if decision:
            self.decisions.labels(decision).inc()

    def evaluated(self, conn, started: float) -> None:
        """One evaluation completed (started: its time.monotonic()); then, when due, read the
        database's figures on the worker's connection."""
        self.evaluation_seconds.observe(time.monotonic() - started)
        self.evaluations.inc()
        self.last_evaluation.set(time.time())
        if time.monotonic() - self._db_read_at >= DB_REFRESH_SEC:
            self._db_read_at = time.monotonic()
            try:
                self.read_database(conn)
            except psycopg.OperationalError:
                raise  # the connection is gone: the worker reconnects
            except psycopg.Error as exc:  # the metrics never stop an evaluation
                log.warning("policy metrics not read from the database: %s", exc)

    def read_database(self, conn) -> None:
        counts = dict(conn.execute(COMMANDS_SQL).fetchall())
        for status in set(COMMAND_STATUSES) | set(counts):
            self.commands.labels(status).set(counts.get(status, 0))
        agents = dict(conn.execute(AGENTS_SQL).fetchall())
        for agent, online in agents.items():
            self.agent_online.labels(agent).set(1 if online else 0)
        for agent in self._agents - set(agents):  # removed from the topology
            self.agent_online.remove(agent)
        self._agents = set(agents)
        self.agents_online.set(sum(1 for online in agents.values() if online))
        self.agents.set(len(agents))

    def serve(self, port: int) -> bool:
        """Serve /metrics on `port` (0: off). A port already taken is logged, not fatal: the
        worker protects hosts with or without its metrics."""
        if not port:
            return False
        try:
            start_http_server(port, registry=self.registry)
        except OSError as exc:
            log.error("policy metrics not served on :%d (%s); the worker runs on without them",
                      port, exc)
            return False
        log.info("policy metrics on :%d/metrics", port)
        return True
