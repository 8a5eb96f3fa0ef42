"""The NUT network protocol (NUT's docs/net-protocol.txt, protocol 1.3), read-only.

`Session.handle(line)` answers one request line of one connection; the server keeps one
Session per connection. Everything a session reads comes from `Registry.snapshot`, which the
database poller replaces as a whole, so an answer never mixes two refreshes.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass

from nutserver import VERSION

NETVER = "1.3"
# upsd's answers keep within NUT's LARGEBUF; a request longer than this ends the connection.
MAX_LINE = 1024
MAX_TOKENS = 16
HELP = "Commands: HELP VER GET LIST SET INSTCMD LOGIN LOGOUT USERNAME PASSWORD STARTTLS"

DESCRIPTIONS = {
    "battery.charge": "Battery charge (percent of full)",
    "battery.charge.low": "Remaining battery level when UPS switches to LB (percent)",
    "battery.runtime": "Battery runtime (seconds)",
    "battery.temperature": "Battery temperature (degrees C)",
    "device.mfr": "Device manufacturer",
    "device.model": "Device model",
    "device.serial": "Device serial number",
    "device.type": "Device type (ups, pdu, scd, psu, ats)",
    "driver.name": "Driver name",
    "driver.version": "Driver version - NUT release",
    "input.realpower": "Current sum value of all (active) phases real power (W)",
    "input.voltage": "Input voltage (V)",
    "ups.id": "UPS system identifier",
    "ups.mfr": "UPS manufacturer",
    "ups.model": "UPS model",
    "ups.realpower": "Current value of real power (W)",
    "ups.serial": "UPS serial number",
    "ups.status": "UPS status",
}


@dataclass(frozen=True)
class Ups:
    name: str
    desc: str
    variables: dict[str, str]
    stale: bool = False  # answered DATA-STALE, as upsd does for a driver past MAXAGE
    agent_id: str | None = None  # the `nut` agent watching this UPS, if any
    fsd_commands: tuple[str, ...] = ()  # shutdown commands that put FSD up
    # time.monotonic() from which it is stale if no refresh replaces it (the database is
    # unreachable): upsd ages a lost driver's data the same way. None: never.
    stale_at: float | None = None

    def is_stale(self) -> bool:
        return self.stale or (self.stale_at is not None and time.monotonic() >= self.stale_at)


@dataclass(frozen=True)
class User:
    password: str
    primary: bool = False  # "upsmon primary" in upsd.users; otherwise "upsmon secondary"


class Registry:
    """What every session shares: the UPS snapshot, the users, who is logged in where, and
    the events the poller reports to the policy worker."""

    def __init__(self, users: dict[str, User]):
        self.users = users
        self.snapshot: dict[str, Ups] = {}
        self.logins: dict[str, set[Session]] = {}
        self._lock = threading.Lock()
        self._fsd_seen: dict[str, tuple[str, str]] = {}  # command id -> (ups, who)

    def login_counts(self) -> dict[str, int]:
        with self._lock:
            return {ups: len(s) for ups, s in self.logins.items() if s}

    def attach(self, ups: str, session: Session) -> None:
        with self._lock:
            self.logins.setdefault(ups, set()).add(session)

    def detach(self, ups: str, session: Session) -> None:
        with self._lock:
            self.logins.get(ups, set()).discard(session)

    def fsd_seen(self, ups: Ups, who: str) -> None:
        with self._lock:
            for cmd in ups.fsd_commands:
                self._fsd_seen.setdefault(cmd, (ups.name, who))

    def take_fsd_seen(self) -> dict[str, tuple[str, str]]:
        with self._lock:
            seen, self._fsd_seen = self._fsd_seen, {}
            return seen


def tokenize(line: str) -> list[str] | None:
    """Split like NUT's parseconf: blanks separate, "quotes" group, backslash escapes.
    None for an unterminated quote or a dangling backslash."""
    tokens: list[str] = []
    cur: list[str] = []
    in_token = quoted = escaped = False
    for ch in line:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = in_token = True
        elif ch == '"':
            if quoted:
                quoted = False
            else:
                quoted = in_token = True
        elif ch in " \t" and not quoted:
            if in_token:
                tokens.append("".join(cur))
                cur, in_token = [], False
        else:
            cur.append(ch)
            in_token = True
    if quoted or escaped:
        return None
    if in_token:
        tokens.append("".join(cur))
    return tokens


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Session:
    """One client connection. `handle` returns the answer lines and whether to close."""

    def __init__(self, registry: Registry, address: str):
        self.registry = registry
        self.address = address
        self.username: str | None = None
        self.password: str | None = None
        self.login_ups: str | None = None

    def close(self) -> None:
        if self.login_ups is not None:
            self.registry.detach(self.login_ups, self)
            self.login_ups = None

    def handle(self, line: str) -> tuple[list[str], bool]:
        tokens = tokenize(line)
        if tokens is None or len(tokens) > MAX_TOKENS:
            return ["ERR INVALID-ARGUMENT"], False
        if not tokens:
            return [], False
        cmd, args = tokens[0].upper(), tokens[1:]
        if cmd == "LOGOUT":
            return ["OK Goodbye"], True
        handler = getattr(self, "_cmd_" + cmd.lower(), None) if cmd.isalpha() else None
        if handler is None:
            return ["ERR UNKNOWN-COMMAND"], False
        return handler(args), False

    # -- helpers ---------------------------------------------------------------------------
    def _ups(self, name: str) -> Ups | None:
        return self.registry.snapshot.get(name)

    def _auth_error(self) -> str | None:
        if self.username is None:
            return "ERR USERNAME-REQUIRED"
        if self.password is None:
            return "ERR PASSWORD-REQUIRED"
        return None

    def _user(self) -> User | None:
        """The configured user, if this connection's credentials match it."""
        user = self.registry.users.get(self.username or "")
        given = (self.password or "").encode()
        # Compare even for an unknown user, so the time taken does not tell which users exist.
        expected = user.password.encode() if user else b"\0" * max(len(given), 1)
        ok = hmac.compare_digest(given, expected)
        return user if user is not None and ok else None

    def _variables(self, ups: Ups) -> dict[str, str]:
        variables = ups.variables
        status = variables.get("ups.status", "")
        if self.login_ups == ups.name and "FSD" in status.split():
            # A logged-in client has been shown FSD: the policy's command has reached it.
            self.registry.fsd_seen(ups, f"{self.username}@{self.address}")
        return variables

    # -- commands --------------------------------------------------------------------------
    def _cmd_ver(self, args):
        return [f"Network UPS Tools upsd 2.8.0 compatible - ecoflow-nut {VERSION} (read-only)"]

    def _cmd_netver(self, args):
        return [NETVER]

    def _cmd_help(self, args):
        return [HELP]

    def _cmd_starttls(self, args):
        return ["ERR FEATURE-NOT-CONFIGURED"]

    def _cmd_username(self, args):
        if len(args) != 1 or not args[0] or len(args[0]) > 64:
            return ["ERR INVALID-USERNAME" if len(args) == 1 else "ERR INVALID-ARGUMENT"]
        if self.username is not None:
            return ["ERR ALREADY-SET-USERNAME"]
        self.username = args[0]
        return ["OK"]

    def _cmd_password(self, args):
        if len(args) != 1 or not args[0] or len(args[0]) > 256:
            return ["ERR INVALID-PASSWORD" if len(args) == 1 else "ERR INVALID-ARGUMENT"]
        if self.password is not None:
            return ["ERR ALREADY-SET-PASSWORD"]
        self.password = args[0]
        return ["OK"]

    def _cmd_login(self, args):
        if len(args) != 1:
            return ["ERR INVALID-ARGUMENT"]
        if self.login_ups is not None:
            return ["ERR ALREADY-LOGGED-IN"]
        err = self._auth_error()
        if err:
            return [err]
        if self._ups(args[0]) is None:
            return ["ERR UNKNOWN-UPS"]
        if self._user() is None:
            return ["ERR ACCESS-DENIED"]
        self.login_ups = args[0]
        self.registry.attach(args[0], self)
        return ["OK"]

    def _primary(self, args, granted):
        if len(args) != 1:
            return ["ERR INVALID-ARGUMENT"]
        err = self._auth_error()
        if err:
            return [err]
        if self._ups(args[0]) is None:
            return ["ERR UNKNOWN-UPS"]
        user = self._user()
        if user is None or not user.primary:
            return ["ERR ACCESS-DENIED"]
        return [f"OK {granted}"]

    def _cmd_primary(self, args):
        return self._primary(args, "PRIMARY-GRANTED")

    def _cmd_master(self, args):
        return self._primary(args, "MASTER-GRANTED")

    def _refuse_write(self, args, needs_ups=True):
        """FSD, SET and INSTCMD: this server is read-only; only the policy sets FSD."""
        if not args:
            return ["ERR INVALID-ARGUMENT"]
        err = self._auth_error()
        if err:
            return [err]
        if needs_ups and self._ups(args[0]) is None:
            return ["ERR UNKNOWN-UPS"]
        return ["ERR ACCESS-DENIED"]

    def _cmd_fsd(self, args):
        return self._refuse_write(args) if len(args) == 1 else ["ERR INVALID-ARGUMENT"]

    def _cmd_instcmd(self, args):
        return self._refuse_write(args) if len(args) in (2, 3) else ["ERR INVALID-ARGUMENT"]

    def _cmd_set(self, args):
        if len(args) >= 1 and args[0].upper() == "TRACKING":
            return self._refuse_write(args[1:], needs_ups=False) if len(args) == 2 else [
                "ERR INVALID-ARGUMENT"]
        if len(args) != 4 or args[0].upper() != "VAR":
            return ["ERR INVALID-ARGUMENT"]
        return self._refuse_write(args[1:])

    def _cmd_get(self, args):
        if not args:
            return ["ERR INVALID-ARGUMENT"]
        sub, rest = args[0].upper(), args[1:]
        if sub == "TRACKING":
            return ["OFF"] if not rest else ["ERR INVALID-ARGUMENT"]
        want = {"NUMLOGINS": 1, "UPSDESC": 1, "VAR": 2, "TYPE": 2, "DESC": 2, "CMDDESC": 2}
        if sub not in want or len(rest) != want[sub]:
            return ["ERR INVALID-ARGUMENT"]
        ups = self._ups(rest[0])
        if ups is None:
            return ["ERR UNKNOWN-UPS"]
        if sub == "NUMLOGINS":
            return [f"NUMLOGINS {ups.name} {self.registry.login_counts().get(ups.name, 0)}"]
        if sub == "UPSDESC":
            return [f"UPSDESC {ups.name} {quote(ups.desc)}"]
        if sub == "CMDDESC":
            return ["ERR CMD-NOT-SUPPORTED"]
        var = rest[1]
        if sub == "DESC":
            return [f"DESC {ups.name} {var} {quote(DESCRIPTIONS.get(var, 'Description unavailable'))}"]
        if ups.is_stale():
            return ["ERR DATA-STALE"]
        variables = self._variables(ups) if var == "ups.status" else ups.variables
        if var not in variables:
            return ["ERR VAR-NOT-SUPPORTED"]
        if sub == "TYPE":
            return [f"TYPE {ups.name} {var} {_type(variables[var])}"]
        return [f"VAR {ups.name} {var} {quote(variables[var])}"]

    def _cmd_list(self, args):
        if not args:
            return ["ERR INVALID-ARGUMENT"]
        sub, rest = args[0].upper(), args[1:]
        if sub == "UPS":
            if rest:
                return ["ERR INVALID-ARGUMENT"]
            snap = self.registry.snapshot
            return (["BEGIN LIST UPS"]
                    + [f"UPS {name} {quote(snap[name].desc)}" for name in sorted(snap)]
                    + ["END LIST UPS"])
        want = {"VAR": 1, "RW": 1, "CMD": 1, "CLIENT": 1, "ENUM": 2, "RANGE": 2}
        if sub not in want or len(rest) != want[sub]:
            return ["ERR INVALID-ARGUMENT"]
        ups = self._ups(rest[0])
        if ups is None:
            return ["ERR UNKNOWN-UPS"]
        query = " ".join([sub, *rest])
        body: list[str] = []
        if sub == "VAR":
            if ups.is_stale():
                return ["ERR DATA-STALE"]
            variables = self._variables(ups)
            body = [f"VAR {ups.name} {k} {quote(v)}" for k, v in variables.items()]
        elif sub in ("ENUM", "RANGE"):
            if ups.is_stale():
                return ["ERR DATA-STALE"]
            if rest[1] not in ups.variables:
                return ["ERR VAR-NOT-SUPPORTED"]
        elif sub == "CLIENT":
            with self.registry._lock:
                sessions = list(self.registry.logins.get(ups.name, ()))
            body = [f"CLIENT {ups.name} {s.address}" for s in sessions]
        return [f"BEGIN LIST {query}", *body, f"END LIST {query}"]


def _type(value: str) -> str:
    try:
        float(value)
    except ValueError:
        return f"STRING:{max(len(value), 1)}"
    return "NUMBER"
