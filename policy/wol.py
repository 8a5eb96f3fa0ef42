"""Wake-on-LAN after power returns (SAFETY S11, docs/wake-on-lan.md).

A host the policy shut down in an outage episode gets the magic packet once the grid has been
back for the confirmation period and the supplies it needs are charged to its restart level
(PowerChute's "turn on battery capacity"): once per episode, audited in policy_events, and only
recorded, never sent, in dry run (POLICY_WOL_DRY_RUN, or a shutdown a dry-run agent only
pretended to carry out)."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import psycopg

from servicekit.settings import SettingsError

log = logging.getLogger("ecoflow.policy")

# The policy file's per-agent keys this module reads.
WOL_KEYS = ("mac", "wol_broadcast", "wol_port", "restart_soc")
DEFAULT_BROADCAST = "255.255.255.255"
DEFAULT_PORT = 9
# Six octets, written aa:bb:cc:dd:ee:ff, aa-bb-cc-dd-ee-ff, aabb.ccdd.eeff or aabbccddeeff.
_MAC = re.compile(r"^(?:[0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}"
                  r"|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}|[0-9A-Fa-f]{12})$")
# Events that close an episode's wake-up: a packet went out, or would have (dry run), or the
# host was already back.
DONE_KINDS = ("wol_sent", "wol_dry_run", "wol_not_needed")


@dataclass(frozen=True)
class WolTarget:
    agent_id: str
    mac: bytes  # six octets
    broadcast: str = DEFAULT_BROADCAST
    port: int = DEFAULT_PORT
    restart_soc: float | None = None  # None: the global restart level (POLICY_REARM_SOC)

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)


def magic_packet(mac: bytes) -> bytes:
    """Six 0xFF then the MAC sixteen times: 102 bytes."""
    if len(mac) != 6:
        raise ValueError("a MAC address has six octets")
    return b"\xff" * 6 + mac * 16


def parse_mac(value) -> bytes | None:
    """The six octets of a MAC address in any usual notation, or None."""
    if not isinstance(value, str) or not _MAC.match(value.strip()):
        return None
    return bytes.fromhex(re.sub(r"[^0-9A-Fa-f]", "", value))


def check(agent_id: str, attrs: dict) -> WolTarget | None:
    """The agent's Wake-on-LAN target from its policy-file keys, or None without `mac`.
    Raises SettingsError naming the agent, the key and the fix."""
    where = f"POLICY_CONFIG_FILE: agent {agent_id}"
    mac_value = attrs.get("mac")
    if mac_value is None:
        extra = [k for k in WOL_KEYS if k != "mac" and attrs.get(k) is not None]
        if extra:
            raise SettingsError(f"{where}: {', '.join(extra)} without 'mac': give the host's "
                                "MAC address (mac: 00:11:22:33:44:55) or remove them")
        return None
    mac = parse_mac(mac_value)
    if mac is None or mac in (b"\x00" * 6, b"\xff" * 6) or mac[0] & 1:
        raise SettingsError(
            f"{where}: mac = {mac_value!r} is not the MAC address of a network card: expected "
            "six hex pairs such as 00:11:22:33:44:55 (quote it in YAML), as `ip link` or "
            "`getmac` shows it on that host; not all zeros, not broadcast or multicast")
    broadcast = attrs.get("wol_broadcast")
    if broadcast is None:
        broadcast = DEFAULT_BROADCAST
    try:
        broadcast = str(ipaddress.IPv4Address(str(broadcast)))
    except ValueError:
        raise SettingsError(
            f"{where}: wol_broadcast = {broadcast!r} is not an IPv4 address: give the "
            "broadcast address of the host's subnet, e.g. 192.168.1.255, or leave it out for "
            f"{DEFAULT_BROADCAST}") from None
    port = attrs.get("wol_port")
    if port is None:
        port = DEFAULT_PORT
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SettingsError(f"{where}: wol_port = {port!r}: expected a UDP port from 1 to "
                            f"65535 (usually {DEFAULT_PORT}, sometimes 7)")
    restart = attrs.get("restart_soc")
    if restart is not None and (isinstance(restart, bool)
                                or not isinstance(restart, (int, float))
                                or not 0 <= restart <= 100):
        raise SettingsError(f"{where}: restart_soc = {restart!r}: expected the SoC percentage "
                            "(0 to 100) the station must reach before the host is woken")
    return WolTarget(agent_id, mac, broadcast, port,
                     None if restart is None else float(restart))


def targets(settings) -> dict[str, WolTarget]:
    """Every agent of the policy file with a `mac`, checked (SettingsError on a bad one)."""
    if not settings.config_file:
        return {}
    from policy.topology import read_policy_file

    found = {}
    for agent_id, attrs in (read_policy_file(settings.config_file).get("agents") or {}).items():
        target = check(str(agent_id), dict(attrs or {}))
        if target is not None:
            found[target.agent_id] = target
    return found


def send(due: list[WolTarget], packets: int, gap_sec: float) -> dict[str, str | None]:
    """Send each target's magic packet now, and `packets - 1` times more, `gap_sec` apart, from
    a thread of its own: the evaluation (another station may still be on battery) and its
    database lock never wait for the repeats. All targets go in each round, so ten hosts take
    no longer than one. Returns agent id -> error text of the first round, or None."""
    errors = _round(due)
    if packets > 1:
        threading.Thread(target=_repeat, args=(due, packets - 1, gap_sec),
                         name="wake-on-lan", daemon=True).start()
    return errors


def _round(due: list[WolTarget]) -> dict[str, str | None]:
    errors: dict[str, str | None] = {t.agent_id: None for t in due}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for target in due:
            try:
                sock.sendto(magic_packet(target.mac), (target.broadcast, target.port))
            except OSError as exc:
                errors[target.agent_id] = str(exc)
    return errors


def _repeat(due: list[WolTarget], rounds: int, gap_sec: float) -> None:
    for _ in range(rounds):
        time.sleep(gap_sec)
        for agent_id, error in _round(due).items():
            if error is not None:
                log.warning("wake-on-lan %s: a repeated packet failed: %s", agent_id, error)


# The agent's latest shutdown that took the host down (or, from a dry-run agent, would have):
# acked `executing` (the agent reached its commit point; a later refusal means the halt
# failed); or past its commit point, not aborted, and acked `dry_run`, or acked
# received/scheduled by an agent that went offline after the commit point (its `executing`
# ack lost as the host halted).
LAST_EXECUTED_SHUTDOWN = """
SELECT c.id, c.episode_id, c.status, c.commit_point
  FROM (SELECT c.*, coalesce(c.acked_at, c.first_sent_at, c.issued_at)
                    + make_interval(secs => c.delay_sec) AS commit_point
          FROM commands c
         WHERE c.agent_id = %(agent)s AND c.action = 'shutdown'
           AND c.episode_id IS NOT NULL) c
 WHERE NOT EXISTS (SELECT 1 FROM policy_events f
                    WHERE f.kind = 'command_failed' AND f.command_id = c.id)
   AND (c.status = 'executing'
        OR (c.commit_point <= %(now)s
            AND NOT EXISTS (SELECT 1 FROM commands a
                             WHERE a.action = 'abort' AND a.cancels_id = c.id)
            AND (c.status = 'dry_run'
                 OR (c.status IN ('received', 'scheduled')
                     AND EXISTS (SELECT 1 FROM policy_events o
                                  WHERE o.kind = 'agent_offline' AND o.agent_id = c.agent_id
                                    AND o.ts >= c.commit_point)))))
 ORDER BY c.issued_at DESC, c.attempt DESC
 LIMIT 1
"""

WOL_DONE = """
SELECT EXISTS (SELECT 1 FROM policy_events
                WHERE kind = ANY(%(kinds)s) AND agent_id = %(agent)s
                  AND episode_id = %(episode)s)
"""

# Whether the host is up: its agent is online. Changed after the commit point: it came back
# by itself (BIOS "restore on AC power", someone pressed the button). Online since before the
# commit point: it has not gone down yet (a NAS can take minutes to halt), and a packet now
# would reach a running host that then halts and is never woken.
AGENT_ONLINE = """
SELECT online, changed_at > %(since)s FROM agent_status WHERE agent_id = %(agent)s
"""


class WakeOnLan:
    """Decides and sends the wake-ups of one evaluation; the worker calls `step`."""

    def __init__(self, settings, send: bool = True,
                 found: dict[str, WolTarget] | None = None):
        self.settings = settings
        self.targets = targets(settings) if found is None else found
        self.packets = settings.wol_packets
        self.gap_sec = settings.wol_gap_sec
        # `send` False: a worker that sends nothing (replay) records what it would send.
        self.dry_run = settings.wol_dry_run or not send

    def restart_soc(self, target: WolTarget) -> float:
        if target.restart_soc is not None:
            return target.restart_soc
        return self.settings.effective_rearm_soc

    def ready(self, view, target: WolTarget) -> tuple[bool, list[float]]:
        """Power back (confirmed, S7) and charged to the restart level on as many supplies as
        the agent needs; also the SoC of those supplies."""
        level = self.restart_soc(target)
        good = [s["soc"] for s in view.supplies
                if s["power_back"] and s["soc"] is not None and s["soc"] >= level]
        return len(good) >= view.needed, good

    def step(self, worker, views, now: datetime) -> None:
        if not self.targets:
            return
        conn: psycopg.Connection = worker.conn
        by_agent = {v.agent_id: v for v in views}
        with conn.transaction():
            # One worker at a time decides and sends, so a packet goes out once per episode
            # even with two workers on one database.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('ecoflow-policy-wol'))")
            due, dry = [], []
            for agent_id, target in sorted(self.targets.items()):
                view = by_agent.get(agent_id)
                if view is None:
                    continue
                ready, socs = self.ready(view, target)
                if not ready:
                    continue
                row = conn.execute(LAST_EXECUTED_SHUTDOWN,
                                   {"agent": agent_id, "now": now}).fetchone()
                if row is None:
                    continue  # never shut down by the policy: not ours to wake
                cmd_id, episode, status, commit_point = row
                if conn.execute(WOL_DONE, {"kinds": list(DONE_KINDS), "agent": agent_id,
                                           "episode": episode}).fetchone()[0]:
                    continue
                details = {"mac": target.mac_text, "broadcast": target.broadcast,
                           "port": target.port, "packets": self.packets,
                           "restart_soc": self.restart_soc(target), "soc": socs,
                           "shutdown_status": status}
                up = conn.execute(AGENT_ONLINE, {"agent": agent_id,
                                                 "since": commit_point}).fetchone()
                if up and up[0] and up[1]:
                    worker.event(now, "wol_not_needed", agent_id=agent_id, episode_id=episode,
                                 command_id=cmd_id, details=details,
                                 message=f"{agent_id} is back online already; no wake-up")
                    continue
                if up and up[0] and status != "dry_run":
                    continue  # still halting: wait until its agent goes offline
                item = (target, cmd_id, episode, details)
                if self.dry_run or status == "dry_run":
                    dry.append(item)
                else:
                    due.append(item)
            for target, cmd_id, episode, details in dry:
                why = ("dry run (POLICY_WOL_DRY_RUN or replay)" if self.dry_run
                       else "the shutdown was a dry run")
                worker.event(now, "wol_dry_run", agent_id=target.agent_id, episode_id=episode,
                             command_id=cmd_id, details=dict(details, dry_run=True),
                             message=f"would wake {target.agent_id} ({target.mac_text} via "
                                     f"{target.broadcast}:{target.port}): {why}")
                log.info("wake-on-lan %s: dry run (%s), nothing sent", target.agent_id, why)
            if not due:
                return
            errors = send([t for t, *_ in due], self.packets, self.gap_sec)
            for target, cmd_id, episode, details in due:
                error = errors[target.agent_id]
                if error is None:
                    worker.event(now, "wol_sent", agent_id=target.agent_id, episode_id=episode,
                                 command_id=cmd_id, details=details,
                                 message=f"magic packet x{self.packets} to {target.mac_text} "
                                         f"via {target.broadcast}:{target.port}")
                    log.warning("wake-on-lan %s: power back, magic packet sent to %s",
                                target.agent_id, target.mac_text)
                    continue
                # Tried again at the next evaluation (the router may still be booting);
                # recorded once.
                log.warning("wake-on-lan %s: sending failed: %s", target.agent_id, error)
                if not conn.execute(WOL_DONE, {"kinds": ["wol_failed"],
                                               "agent": target.agent_id,
                                               "episode": episode}).fetchone()[0]:
                    worker.event(now, "wol_failed", agent_id=target.agent_id,
                                 episode_id=episode, command_id=cmd_id,
                                 details=dict(details, error=error),
                                 message=f"magic packet to {target.mac_text} not sent: {error}")
        for target, _cmd_id, episode, _details in due:
            if errors[target.agent_id] is None:
                worker.alert(now, f"wol:{target.agent_id}:{episode}", "power",
                             f"{target.agent_id}: power is back, Wake-on-LAN sent")
