"""The status API: stations and agents as read-only JSON over HTTP, and changes as
server-sent events (docs/status-api.md).

Every request reads the database through the read-only role on a connection of its own. One
watcher thread keeps the current state: it re-reads it when the collector's inserts NOTIFY
ecoflow_readings and at least every `poll_sec` (liveness changes with no new reading), and
hands each station or agent whose state changed to every open event stream.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import socket
import threading
import time
from datetime import date, datetime, timezone
from decimal import Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.rows import dict_row

from servicekit import reader
from servicekit.agents import rows as agent_rows

log = logging.getLogger("ecoflow.statusapi")

READINGS_CHANNEL = "ecoflow_readings"  # the insert trigger's channel (migration 0002)
QUEUE_LIMIT = 1000  # events waiting for one slow client before it is dropped

# One row per station: the devices table and every station with readings. Liveness as the
# policy sees it: fresh within stale_after_sec, stale up to dead_after_sec, then dead;
# unknown before the first reading.
STATIONS = """
SELECT coalesce(l.device_sn, d.device_sn)                   AS sn,
       coalesce(d.name, l.device_sn, d.device_sn)           AS name,
       d.model, d.site,
       CASE WHEN l.ts IS NULL THEN 'unknown'
            WHEN l.age_sec <= coalesce(d.stale_after_sec, 120) THEN 'fresh'
            WHEN l.age_sec <= coalesce(d.dead_after_sec, 600) THEN 'stale'
            ELSE 'dead' END                                 AS liveness,
       l.ts                                                 AS last_seen,
       l.age_sec,
       coalesce(d.stale_after_sec, 120)                     AS stale_after_sec,
       coalesce(d.dead_after_sec, 600)                      AS dead_after_sec,
       l.soc_percent, l.soc_min_percent,
       l.remain_time_min                                    AS runtime_min,
       l.grid_connected,
       l.watts_in_sum                                       AS watts_in,
       l.watts_out_sum                                      AS watts_out,
       l.ac_in_watts, l.ac_out_watts, l.pv_in_watts, l.dc_out_watts, l.typec_out_watts,
       l.usb_out_watts, l.battery_temp_c, l.source
  FROM ecoflow_latest l
  FULL JOIN devices d ON d.device_sn = l.device_sn
 {where}
 ORDER BY 1
"""

def stations(conn: psycopg.Connection, sn: str | None = None) -> list[dict]:
    where = "WHERE coalesce(l.device_sn, d.device_sn) = %(sn)s" if sn is not None else ""
    return _rows(conn, STATIONS.format(where=where), {"sn": sn})


def agents(conn: psycopg.Connection) -> list[dict]:
    out = []
    for r in agent_rows(conn):
        command = {k.removeprefix("command_"): r.pop(k) for k in list(r)
                   if k.startswith("command_")}
        ack = {k.removeprefix("ack_"): r.pop(k) for k in list(r) if k.startswith("ack_")}
        r["last_command"] = command if command["id"] is not None else None
        r["last_ack"] = ack if ack["status"] is not None else None
        out.append(r)
    return out


def _rows(conn: psycopg.Connection, query: str, params: dict) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def to_json(value) -> bytes:
    return json.dumps(value, default=_default, separators=(",", ":")).encode()


def _default(value):
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return str(value)


def connect(url: str) -> psycopg.Connection:
    conn = reader.connect(url, autocommit=True, connect_timeout=5)
    conn.execute("SET TimeZone = 'UTC'")
    return conn


class Watcher:
    """Keeps the last state of every station and agent and tells subscribers what changed."""

    def __init__(self, url: str, poll_sec: float = 1.0, min_interval_sec: float = 0.2):
        self.url = url
        self.poll_sec = poll_sec
        self.min_interval_sec = min_interval_sec
        self.stop = threading.Event()
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._subscribers: set[queue.Queue] = set()
        self._stations: dict[str, dict] = {}
        self._agents: dict[str, dict] = {}
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="status-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        with self._lock:
            for q in self._subscribers:
                _offer(q, None)
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def subscribe(self) -> tuple[queue.Queue, list[dict], list[dict]]:
        """A queue of (event, data) for changes, and the current stations and agents."""
        self.ready.wait(timeout=10)
        q: queue.Queue = queue.Queue(maxsize=QUEUE_LIMIT)
        with self._lock:
            self._subscribers.add(q)
            return q, list(self._stations.values()), list(self._agents.values())

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            self._subscribers.discard(q)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with connect(self.url) as conn, connect(self.url) as listener:
                    listener.execute(f"LISTEN {READINGS_CHANNEL}")
                    while not self.stop.is_set():
                        started = time.monotonic()
                        self.refresh(conn)
                        self.ready.set()
                        self.stop.wait(max(0.0, self.min_interval_sec
                                           - (time.monotonic() - started)))
                        # Wakes on the first notification or after poll_sec; a burst is
                        # read in the next rounds, each of which ends at once.
                        for _ in listener.notifies(timeout=self.poll_sec, stop_after=1):
                            pass
            except psycopg.Error as exc:
                log.error("database unavailable (%s); retrying in %.0f s",
                          type(exc).__name__, max(self.poll_sec, 1.0))
                self.stop.wait(max(self.poll_sec, 1.0))

    def refresh(self, conn: psycopg.Connection) -> None:
        new_stations = {s["sn"]: s for s in stations(conn)}
        new_agents = {a["agent_id"]: a for a in agents(conn)}
        events = []
        # age_sec grows every second by itself: a change is anything else.
        for sn, station in new_stations.items():
            if _without_age(self._stations.get(sn)) != _without_age(station):
                events.append(("station", station))
        for agent_id, agent in new_agents.items():
            if self._agents.get(agent_id) != agent:
                events.append(("agent", agent))
        with self._lock:
            first = not self.ready.is_set()
            self._stations, self._agents = new_stations, new_agents
            if first:
                return
            for event, data in events:
                self._seq += 1
                message = (self._seq, event, data)
                for q in list(self._subscribers):
                    if not _offer(q, message):
                        log.warning("an event stream fell %d events behind; closing it",
                                    QUEUE_LIMIT)
                        self._subscribers.discard(q)


def _without_age(station: dict | None) -> dict | None:
    return None if station is None else {k: v for k, v in station.items() if k != "age_sec"}


def _offer(q: queue.Queue, item) -> bool:
    try:
        q.put_nowait(item)
        return True
    except queue.Full:
        return False


class StatusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], url: str, *, heartbeat_sec: float = 15.0,
                 poll_sec: float = 1.0, cors_origin: str = ""):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.db_url = url
        self.heartbeat_sec = heartbeat_sec
        self.cors_origin = cors_origin
        self.watcher = Watcher(url, poll_sec=poll_sec)
        super().__init__(address, Handler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.watcher.start()
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        self.watcher.close()
        super().server_close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


STATION_PATH = re.compile(r"^/api/stations/([^/]+)$")


class Handler(BaseHTTPRequestHandler):
    server: StatusServer
    server_version = "ecoflow-status-api"
    sys_version = ""

    def log_message(self, fmt, *args):  # access log at debug level, not on stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):  # noqa: N802
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path == "/api/health":
                return self._health()
            if path == "/api/events":
                return self._events()
            if path == "/api/stations":
                with connect(self.server.db_url) as conn:
                    return self._json(HTTPStatus.OK, stations(conn))
            if m := STATION_PATH.match(path):
                sn = unquote(m.group(1))
                with connect(self.server.db_url) as conn:
                    found = stations(conn, sn)
                if not found:
                    return self._json(HTTPStatus.NOT_FOUND, {"error": f"no station {sn}"})
                return self._json(HTTPStatus.OK, found[0])
            if path == "/api/agents":
                with connect(self.server.db_url) as conn:
                    return self._json(HTTPStatus.OK, agents(conn))
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found", "endpoints": [
                "/api/stations", "/api/stations/{sn}", "/api/agents", "/api/health",
                "/api/events"]})
        except psycopg.Error as exc:
            log.error("%s: database error %s", path, type(exc).__name__)
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "database unavailable"})

    def _refuse(self):
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "read-only: GET only"},
                   extra={"Allow": "GET"})

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse  # noqa: N815

    def _health(self):
        try:
            with connect(self.server.db_url) as conn:
                now = conn.execute("SELECT now()").fetchone()[0]
        except psycopg.Error:
            return self._json(HTTPStatus.SERVICE_UNAVAILABLE,
                              {"status": "error", "database": "unavailable"})
        return self._json(HTTPStatus.OK, {"status": "ok", "database": "ok", "time": now,
                                          "events": self.server.watcher.ready.is_set()})

    def _headers(self, status: HTTPStatus, content_type: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        if self.server.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.server.cors_origin)
        for k, v in (extra or {}).items():
            self.send_header(k, v)

    def _json(self, status: HTTPStatus, body, extra: dict | None = None):
        data = to_json(body)
        self._headers(status, "application/json", extra)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _events(self):
        watcher = self.server.watcher
        q, current_stations, current_agents = watcher.subscribe()
        try:
            self._headers(HTTPStatus.OK, "text/event-stream")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            self._send(b"retry: 3000\n\n")
            self._send(_event(None, "stations", current_stations))
            self._send(_event(None, "agents", current_agents))
            while not watcher.stop.is_set():
                try:
                    item = q.get(timeout=self.server.heartbeat_sec)
                except queue.Empty:
                    self._send(b": heartbeat\n\n")
                    continue
                if item is None:
                    return
                self._send(_event(*item))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away
        finally:
            watcher.unsubscribe(q)
            self.close_connection = True

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


def _event(seq: int | None, event: str, data) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: ".encode() + to_json(data) + b"\n\n"
