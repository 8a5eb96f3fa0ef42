"""Helpers for the NUT server's tests: a server on a free port over the test's database, a
raw protocol client, readings stamped with the database clock."""

from __future__ import annotations

import socket

from nutserver.server import NutServer
from nutserver.settings import NutSettings

SN = "R331ZEB4ZEA0012345"
USERS = '{"monuser": "secret", "admin": {"password": "adminpw", "primary": true}}'


def start_server(db_url: str, **overrides) -> NutServer:
    values = dict(listen="127.0.0.1", port=0, ups_json='{"ups": "Study"}', users_json=USERS,
                  poll_sec=0.3)
    values.update(overrides)
    server = NutServer(NutSettings(**values), db_url)
    server.run_in_thread()
    return server


def add_station(db, sn: str = SN, name: str = "Study", model: str = "DELTA 3 Plus",
                stale_after: int = 120, dead_after: int = 600) -> None:
    db.execute("INSERT INTO devices (device_sn, name, model, stale_after_sec, dead_after_sec)"
               " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (device_sn) DO NOTHING",
               (sn, name, model, stale_after, dead_after))


def reading(db, soc: float, grid: bool | None, sn: str = SN, age: float = 0.0,
            remain_min: int | None = 95, watts_in: int = 0, watts_out: int = 120,
            raw: str = "{}") -> None:
    """One reading received `age` seconds ago by the database clock."""
    db.execute(
        "INSERT INTO ecoflow_measurements (ts, received_at, device_sn, soc_percent,"
        " soc_min_percent, remain_time_min, watts_in_sum, watts_out_sum, grid_connected,"
        " battery_temp_c, source, raw_data)"
        " VALUES (now() - make_interval(secs => %(age)s), now() - make_interval(secs => %(age)s),"
        " %(sn)s, %(soc)s, %(soc)s, %(remain)s, %(win)s, %(wout)s, %(grid)s, 24.5, 'simulator',"
        " %(raw)s)",
        {"age": age, "sn": sn, "soc": soc, "remain": remain_min, "win": watts_in,
         "wout": watts_out, "grid": grid, "raw": raw})


class Client:
    """A raw NUT protocol connection: `ask` sends a line and reads the answer."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        return self.file.readline().decode().rstrip("\n")

    def ask(self, line: str) -> str:
        self.send(line.encode() + b"\n")
        return self.line()

    def ask_list(self, line: str) -> list[str]:
        first = self.ask(line)
        if not first.startswith("BEGIN LIST"):
            return [first]
        lines = [first]
        while not lines[-1].startswith("END LIST"):
            lines.append(self.line())
        return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()
