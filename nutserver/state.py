"""The UPS snapshot from the database, and what the NUT server reports back to the policy.

Every `poll_sec` the poller reads each station's latest reading and the commands of `nut`
agents, builds a new snapshot for the sessions, and writes to `nut_reports` what happened
since: logins and logouts on a watched UPS (the agent's liveness) and acks of its commands.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from nutserver import VERSION
from nutserver.protocol import Registry, Ups
from nutserver.settings import UPS_NAME

log = logging.getLogger("ecoflow.nut")

# Age by when a reading was received, as the policy judges it (SAFETY S1); the grid from the
# latest reading that says anything about it, as the policy reads it.
STATIONS = """
SELECT d.device_sn, d.name, d.model, d.stale_after_sec, d.dead_after_sec,
       l.ts IS NOT NULL AS seen, l.soc_percent, l.remain_time_min, l.watts_in_sum,
       l.watts_out_sum, l.battery_temp_c, l.raw_data->>'input.voltage' AS input_voltage,
       extract(epoch FROM now() - coalesce(l.received_at, l.ts))::float8 AS age_sec,
       g.grid_connected
  FROM devices d
  LEFT JOIN LATERAL (SELECT * FROM ecoflow_measurements m WHERE m.device_sn = d.device_sn
                      ORDER BY m.ts DESC LIMIT 1) l ON true
  LEFT JOIN LATERAL (SELECT m.grid_connected FROM ecoflow_measurements m
                      WHERE m.device_sn = d.device_sn AND m.grid_connected IS NOT NULL
                        AND m.ts >= l.ts - interval '1 day'
                      ORDER BY m.ts DESC LIMIT 1) g ON true
 ORDER BY d.device_sn
"""

NUT_AGENTS = """
SELECT a.agent_id, a.nut_ups, a.soc_threshold,
       array_remove(array_agg(s.device_sn ORDER BY s.device_sn), NULL) AS supplies
  FROM agents a LEFT JOIN agent_supplies s ON s.agent_id = a.agent_id
 WHERE a.kind = 'nut' AND a.enabled
 GROUP BY a.agent_id
"""

# Shutdowns and aborts of `nut` agents. A shutdown puts FSD up from its commit point (the
# decision plus its abort window) for as long as its episode is open (the worker keeps an
# `episode` condition per station while it is), unless an abort came before the commit point,
# or it has gone through (`done`): a logged-in client read FSD (`executing`), every client
# logged out after that (the host halted: `agent_offline`), and the grid is back, confirmed
# (the worker's `power_returned_after_commit`). A host switched on again after that (Wake-on-
# LAN, the button) sees the grid as it is; one booted while the battery is still critical
# sees FSD again, as upsmon's own FSD latch would show it.
NUT_COMMANDS = """
SELECT c.id::text, c.agent_id, c.action, c.cancels_id::text, c.episode_id, c.ack_status,
       c.status, c.expires_at > now() AS live,
       c.issued_at + make_interval(secs => c.delay_sec) <= now() AS committed,
       extract(epoch FROM c.issued_at + make_interval(secs => c.delay_sec))::bigint AS commit_at,
       EXISTS (SELECT 1 FROM commands x WHERE x.action = 'abort' AND x.cancels_id = c.id)
           AS aborted,
       EXISTS (SELECT 1 FROM policy_conditions pc WHERE pc.condition = 'episode'
                  AND pc.details->>'identity' = c.episode_id) AS episode_open,
       EXISTS (SELECT 1 FROM policy_events p WHERE p.kind = 'power_returned_after_commit'
                  AND p.command_id = c.id)
       AND EXISTS (SELECT 1 FROM command_acks k
                    WHERE k.command_id = c.id AND k.status = 'executing'
                      AND EXISTS (SELECT 1 FROM policy_events o
                                   WHERE o.kind = 'agent_offline' AND o.agent_id = c.agent_id
                                     AND o.ts >= k.received_at)) AS done
  FROM commands c
  JOIN agents a ON a.agent_id = c.agent_id AND a.kind = 'nut'
 WHERE c.action IN ('shutdown', 'abort') AND c.issued_at > now() - interval '30 days'
 ORDER BY c.issued_at
"""

INSERT_REPORT = "INSERT INTO nut_reports (agent_id, kind, payload) VALUES (%s, %s, %s)"


@dataclass
class Station:
    sn: str
    name: str | None
    model: str | None
    stale_after: int
    dead_after: int
    seen: bool
    soc: float | None
    remain_min: int | None
    watts_in: int | None
    watts_out: int | None
    temp_c: float | None
    input_voltage: str | None
    age: float | None
    grid: bool | None


def _num(value: float) -> str:
    """NUT's number format: decimal point, no exponent, no needless decimals."""
    value = round(float(value), 1)
    return str(int(value)) if value == int(value) else f"{value:.1f}"


def ups_status(st: Station, fsd: bool) -> str:
    if fsd:
        # Together, since some appliances ignore FSD while the UPS says OL.
        return "OB LB FSD"
    flags = []
    if st.grid is True:
        flags.append("OL")
        if st.soc is not None and st.soc < 99.5 and (st.watts_in or 0) > (st.watts_out or 0):
            flags.append("CHRG")
    elif st.grid is False:
        flags += ["OB", "DISCHRG"]
    # Never LB by itself: LB is the policy's decision (threshold and debounce), shown with FSD.
    return " ".join(flags)


def is_stale(st: Station) -> bool:
    """DATA-STALE as upsd answers past MAXAGE, but never before the policy itself would act:
    a station last seen on battery stays served until it is dead (SAFETY S2), since upsmon
    treats a UPS last seen on battery that goes stale as critical after its DEADTIME."""
    if not st.seen or st.age is None:
        return True
    if st.age > st.dead_after:
        return True
    return st.age > st.stale_after and st.grid is not False


def stale_in(st: Station) -> float:
    """Seconds until `is_stale` turns true if no newer reading is seen (0: stale already)."""
    if is_stale(st):
        return 0.0
    return (st.dead_after if st.grid is False else st.stale_after) - st.age


def variables(st: Station, fsd: bool, charge_low: float) -> dict[str, str]:
    model = st.model or "EcoFlow power station"
    v: dict[str, str] = {}
    if st.soc is not None:
        v["battery.charge"] = _num(st.soc)
    v["battery.charge.low"] = _num(charge_low)
    if st.remain_min is not None and st.remain_min >= 0:
        v["battery.runtime"] = str(int(st.remain_min) * 60)
    if st.temp_c is not None:
        v["battery.temperature"] = _num(st.temp_c)
    v.update({"device.mfr": "EcoFlow", "device.model": model, "device.serial": st.sn,
              "device.type": "ups", "driver.name": "ecoflow-nut", "driver.version": VERSION})
    if st.watts_in is not None:
        v["input.realpower"] = str(int(st.watts_in))
    try:
        if st.input_voltage is not None:
            v["input.voltage"] = _num(float(st.input_voltage))
    except ValueError:
        pass
    v["ups.id"] = st.name or st.sn
    v["ups.mfr"] = "EcoFlow"
    v["ups.model"] = model
    if st.watts_out is not None:
        v["ups.realpower"] = str(int(st.watts_out))
    v["ups.serial"] = st.sn
    v["ups.status"] = ups_status(st, fsd)
    return dict(sorted(v.items()))


class Poller:
    """Reads the database into `registry.snapshot` and writes the reports; one connection,
    used from one thread."""

    def __init__(self, conn: psycopg.Connection, registry: Registry, ups_map: dict[str, str],
                 serve_serials: bool, soc_min: float):
        self.conn = conn
        self.registry = registry
        self.ups_map = ups_map
        self.serve_serials = serve_serials
        self.soc_min = soc_min
        self._online: dict[str, bool] = {}  # agent -> what we last reported
        self._acked: set[tuple[str, str]] = set()  # (command id, status) reported
        self._latched: set[str] = set()  # shutdowns whose FSD a session may have seen
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def refresh(self) -> None:
        conn = self.conn
        read_at = time.monotonic()  # the ages below are as of about now
        stations = [Station(*row) for row in conn.execute(STATIONS).fetchall()]
        by_sn = {s.sn: s for s in stations}
        by_name = {s.name: s for s in stations if s.name}
        agents = conn.execute(NUT_AGENTS).fetchall()
        commands = conn.execute(NUT_COMMANDS).fetchall()

        names: dict[str, Station] = {}
        if self.serve_serials:
            names.update({s.sn: s for s in stations if UPS_NAME.match(s.sn)})
        for ups, ref in self.ups_map.items():
            st = by_sn.get(ref) or by_name.get(ref)
            if st is None:
                self._warn_once(f"map:{ups}", "NUT_UPS_JSON: UPS %s: no station %r has been "
                                "seen yet; it is not served until one is", ups, ref)
                continue
            names[ups] = st
        watchers: dict[str, tuple[str, float | None]] = {}
        for agent_id, ups, soc_thr, supplies in agents:
            watchers[ups] = (agent_id, soc_thr)
            if ups not in names:
                if len(supplies) == 1 and supplies[0] in by_sn:
                    names[ups] = by_sn[supplies[0]]
                else:
                    self._warn_once(f"agent:{agent_id}", "agent %s watches UPS %s, which is "
                                    "not served: name its station in NUT_UPS_JSON", agent_id, ups)

        # Which shutdowns hold FSD up, per agent.
        fsd: dict[str, list[str]] = {}
        shutdowns = {c[0]: c for c in commands if c[2] == "shutdown"}
        for (cid, agent, _action, _c, _e, _ack, _s, _live, committed, _at, aborted, open_,
             done) in shutdowns.values():
            if open_ and not done and ((committed and not aborted) or cid in self._latched):
                fsd.setdefault(agent, []).append(cid)
                self._latched.add(cid)
        counts = self.registry.login_counts()

        snapshot = {}
        for ups, st in names.items():
            agent_id, soc_thr = watchers.get(ups, (None, None))
            cmds = tuple(fsd.get(agent_id, ())) if agent_id else ()
            charge_low = soc_thr if soc_thr is not None else self.soc_min
            desc = f"EcoFlow {st.name or st.model or 'station'} ({st.sn})"
            snapshot[ups] = Ups(ups, desc, variables(st, bool(cmds), charge_low),
                                stale=is_stale(st) and not cmds, agent_id=agent_id,
                                fsd_commands=cmds,
                                # FSD, once shown, stays for the episode (SAFETY S7); the
                                # rest ages while the database is unreachable.
                                stale_at=None if cmds else read_at + stale_in(st))
        self.registry.snapshot = snapshot

        reports: list[tuple[str, str, dict]] = []
        # Liveness: a `nut` agent is online while a NUT client is logged in to its UPS.
        for ups, (agent_id, _thr) in watchers.items():
            online = counts.get(ups, 0) > 0
            if self._online.get(agent_id) != online:
                self._online[agent_id] = online
                reports.append((agent_id, "status", {
                    "state": "online" if online else "offline", "platform": "nut",
                    "host": f"{counts.get(ups, 0)} NUT client(s) on {ups}"}))
        ups_of = {agent: ups for ups, (agent, _t) in watchers.items()}
        for (cid, agent, action, cancels, _e, ack, _st, live, _c, commit_at, aborted, open_,
             _done) in commands:
            ups = ups_of.get(agent)
            if ups is None or ack is not None or not live:
                continue
            if action == "shutdown" and open_ and not aborted and counts.get(ups, 0) > 0:
                self._ack(reports, agent, cid, "scheduled",
                          f"FSD on {ups} at the commit point {commit_at}; "
                          f"{counts[ups]} NUT client(s) logged in")
            elif action == "abort" and cancels:
                if cancels in self._latched:
                    self._ack(reports, agent, cid, "rejected", "abort after commit point")
                else:
                    self._ack(reports, agent, cid, "aborted", f"cancelled {cancels}")
        for cid, (ups, who) in self.registry.take_fsd_seen().items():
            cmd = shutdowns.get(cid)
            if cmd is not None and cmd[6] != "executing":
                self._ack(reports, cmd[1], cid, "executing", f"FSD seen on {ups} by {who}")
        if reports:
            with conn.transaction():
                for agent, kind, payload in reports:
                    conn.execute(INSERT_REPORT, (agent, kind, Jsonb(payload)))
            for agent, kind, payload in reports:
                log.info("reported %s for %s: %s", kind, agent, json.dumps(payload))

    def _ack(self, reports, agent: str, cid: str, status: str, detail: str) -> None:
        if (cid, status) in self._acked:
            return
        self._acked.add((cid, status))
        reports.append((agent, "ack", {"id": cid, "status": status, "detail": detail,
                                       "host": "ecoflow-nut"}))
