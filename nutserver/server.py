"""The TCP server: one asyncio task per connection, the database poller in a thread."""

from __future__ import annotations

import asyncio
import logging
import threading

import psycopg

from nutserver.protocol import MAX_LINE, Registry, Session
from nutserver.settings import NutSettings
from nutserver.state import Poller

log = logging.getLogger("ecoflow.nut")


class NutServer:
    def __init__(self, settings: NutSettings, db_url: str):
        self.settings = settings
        self.db_url = db_url
        self.registry = Registry(settings.users())
        self.clients = 0
        self.port: int | None = None
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername") or ("?",)
        address = str(peer[0])
        if self.clients >= self.settings.max_clients:
            log.warning("refusing a connection from %s: %d clients already (NUT_MAX_CLIENTS)",
                        address, self.clients)
            writer.close()
            return
        self.clients += 1
        session = Session(self.registry, address)
        try:
            while True:
                try:
                    raw = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    # A line over the limit: answer once and hang up, as nothing after it on
                    # this connection can be trusted to start a request.
                    writer.write(b"ERR INVALID-ARGUMENT\n")
                    await writer.drain()
                    break
                if not raw:
                    break
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                answer, close = session.handle(line)
                if answer:
                    writer.write("".join(a + "\n" for a in answer).encode("utf-8", "replace"))
                    await writer.drain()
                if close:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            session.close()
            self.clients -= 1
            writer.close()

    def _poll(self, stop: threading.Event) -> None:
        """Refresh the snapshot every NUT_POLL_SEC; reconnect to the database when it goes."""
        poller = None
        conn = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.db_url, autocommit=True)
                    poller = Poller(conn, self.registry, self.settings.ups_map(),
                                    self.settings.serve_serials, self.settings.soc_min)
                poller.refresh()
                self.ready.set()
            except psycopg.Error as exc:
                log.error("database: %s; retrying in %.0f s (the UPSes keep their last state "
                          "until it is older than their stale limit, on battery their dead "
                          "limit; FSD already shown stays)", exc,
                          self.settings.poll_sec)
                if conn is not None:
                    conn.close()
                conn = None
            stop.wait(self.settings.poll_sec)
        if conn is not None:
            conn.close()

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        stop_poll = threading.Event()
        poll = threading.Thread(target=self._poll, args=(stop_poll,), name="nut-poll",
                                daemon=True)
        poll.start()
        server = await asyncio.start_server(self._client, self.settings.listen,
                                            self.settings.port, limit=MAX_LINE)
        self.port = server.sockets[0].getsockname()[1]
        log.info("NUT server on %s:%d, %d user(s) configured", self.settings.listen, self.port,
                 len(self.registry.users))
        try:
            async with server:
                await self._stop.wait()
        finally:
            stop_poll.set()
            poll.join(timeout=10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def run_in_thread(self) -> threading.Thread:
        """For tests: serve in a background thread; returns once the port is bound and the
        first snapshot is in."""
        thread = threading.Thread(target=lambda: asyncio.run(self.serve()), daemon=True,
                                  name="nut-server")
        thread.start()
        if not self.ready.wait(20):
            raise RuntimeError("NUT server: no snapshot from the database")
        while self.port is None:
            threading.Event().wait(0.01)
        return thread
