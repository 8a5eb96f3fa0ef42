"""The policy worker: evaluates the rules, sends and re-sends commands, stores acks and status,
and writes every change to policy_events."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from datetime import datetime, timedelta
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from policy.commands import Command, clean_reason
from policy.mqttlink import Incoming, MqttLink
from policy.nutagents import NOT_NUT, take_reports
from policy.rules import AgentView, agent_views, supply_rows, trigger_reason
from policy.settings import PolicySettings
from policy.wol import WakeOnLan

log = logging.getLogger("ecoflow.policy")

READINGS_CHANNEL = "ecoflow_readings"
SUMMARY_REFRESH_SEC = 60.0
# Raw readings past RETENTION_DAYS are removed this often where no TimescaleDB policy does it.
RETENTION_EVERY_SEC = 6 * 3600.0
ACK_STATUSES = ("received", "scheduled", "executing", "aborted", "rejected", "expired", "dry_run")
# A command's state is its most advanced genuine ack, whatever order the acks arrive in and
# however often each is repeated: every status has its own rank and a later ack never moves a
# command back. What an agent did with a command (received ... aborted) outranks a refusal: a
# redelivery of a command the agent already acted on can come back "expired" (it arrived
# late) and must not undo "scheduled". Our own "expired" (no ack before the TTL) is the lowest
# of all, so any genuine ack that comes late still counts.
_ACK_RANK = {"pending": 0, "sent": 0, "expired": 1, "rejected": 2, "received": 3,
             "scheduled": 4, "dry_run": 5, "executing": 6, "aborted": 7}
# A shutdown the agent took and acted on (the host is, or was, going down).
_ACTED_ON = ("received", "scheduled", "executing")

INSERT_EVENT = """
INSERT INTO policy_events (ts, kind, device_sn, agent_id, episode_id, command_id, trigger,
                           message, details)
VALUES (%(ts)s, %(kind)s, %(device_sn)s, %(agent_id)s, %(episode_id)s, %(command_id)s,
        %(trigger)s, %(message)s, %(details)s)
"""

INSERT_COMMAND = """
INSERT INTO commands (id, agent_id, action, episode_id, cancels_id, reason, delay_sec, ttl_sec,
                      issued_at, expires_at, payload, attempt)
VALUES (%(id)s, %(agent)s, %(action)s, nullif(%(episode_id)s, ''), %(cancels_id)s, %(reason)s,
        %(delay_sec)s, %(ttl_sec)s, %(now)s, %(now)s + make_interval(secs => %(ttl_sec)s),
        %(payload)s, %(attempt)s)
ON CONFLICT DO NOTHING
RETURNING id
"""

SHUTDOWN_IN_EPISODES = """
SELECT id, episode_id, status, delay_sec, coalesce(first_sent_at, issued_at) AS sent_at,
       EXISTS (SELECT 1 FROM commands a WHERE a.action = 'abort' AND a.cancels_id = c.id)
           AS aborted,
       attempt, send_count, acked_at
  FROM commands c
 WHERE agent_id = %(agent)s AND action = 'shutdown' AND episode_id = ANY(%(episodes)s)
 ORDER BY issued_at DESC, attempt DESC
"""

# Whether the agent went offline and came back online after `since` (a host that halted and
# was booted again), and is online now.
BACK_ONLINE_SINCE = """
SELECT s.online AND EXISTS (
           SELECT 1 FROM policy_events off
            WHERE off.agent_id = s.agent_id AND off.kind = 'agent_offline'
              AND off.ts >= %(since)s
              AND EXISTS (SELECT 1 FROM policy_events back
                           WHERE back.agent_id = s.agent_id AND back.kind = 'agent_online'
                             AND back.ts >= off.ts))
  FROM agent_status s
 WHERE s.agent_id = %(agent)s
"""

DUE_FOR_SENDING = """
SELECT id, agent_id, action, episode_id, payload, expires_at, send_count
  FROM commands
 WHERE status IN ('pending', 'sent') AND ack_status IS NULL
   AND expires_at > %(now)s
   AND """ + NOT_NUT + """
   AND (last_sent_at IS NULL OR last_sent_at <= %(now)s - make_interval(secs => %(resend_sec)s))
 ORDER BY issued_at
"""

MARK_SENT = """
UPDATE commands
   SET status = 'sent', send_count = send_count + 1,
       first_sent_at = coalesce(first_sent_at, %(now)s), last_sent_at = %(now)s
 WHERE id = %(id)s AND status IN ('pending', 'sent')
"""

EXPIRE_UNACKED = """
UPDATE commands SET status = 'expired'
 WHERE status IN ('pending', 'sent') AND ack_status IS NULL AND expires_at <= %(now)s
RETURNING id, agent_id, action, episode_id, send_count
"""

RECORD_ACK = """
INSERT INTO command_acks (command_id, agent_id, status, host, agent_ts, received_at, detail,
                          payload)
VALUES (%(id)s, %(agent)s, %(status)s, %(host)s, to_timestamp(%(ts)s), %(now)s, %(detail)s,
        %(payload)s)
"""

# Whether this very ack is stored already (a redelivery of one stored but not acknowledged).
ACK_STORED = """
SELECT EXISTS (SELECT 1 FROM command_acks
                WHERE command_id = %(id)s AND agent_id = %(agent)s AND payload = %(payload)s)
"""

# The first ack of any kind stops the re-sends (acked_at, ack_status); the state and the
# ack_* columns move only forward, to the most advanced genuine ack (_ACK_RANK).
APPLY_ACK = """
UPDATE commands
   SET status = CASE WHEN %(advance)s THEN %(status)s ELSE status END,
       acked_at = coalesce(acked_at, %(now)s),
       ack_status = CASE WHEN %(advance)s OR ack_status IS NULL THEN %(status)s
                         ELSE ack_status END,
       ack_host = CASE WHEN %(advance)s OR ack_status IS NULL THEN %(host)s ELSE ack_host END,
       ack_detail = CASE WHEN %(advance)s OR ack_status IS NULL THEN %(detail)s
                         ELSE ack_detail END
 WHERE id = %(id)s
"""

UPSERT_STATUS = """
INSERT INTO agent_status AS s (agent_id, online, last_seen, changed_at, version, platform, host,
                               payload)
VALUES (%(agent)s, %(online)s, %(now)s, %(now)s, %(version)s, %(platform)s, %(host)s,
        %(payload)s)
ON CONFLICT (agent_id) DO UPDATE SET
    online = EXCLUDED.online, last_seen = EXCLUDED.last_seen,
    changed_at = CASE WHEN s.online IS DISTINCT FROM EXCLUDED.online
                      THEN EXCLUDED.changed_at ELSE s.changed_at END,
    version = coalesce(EXCLUDED.version, s.version),
    platform = coalesce(EXCLUDED.platform, s.platform),
    host = coalesce(EXCLUDED.host, s.host), payload = EXCLUDED.payload
RETURNING (SELECT online FROM agent_status WHERE agent_id = %(agent)s) AS was_online
"""


class Worker:
    """One evaluation at a time over an autocommit connection; `step(now)` is the whole cycle,
    so tests and replay drive it with their own clock."""

    def __init__(self, conn: psycopg.Connection, settings: PolicySettings,
                 link: MqttLink | None = None, notifier=None, metrics=None):
        self.conn = conn
        self.metrics = metrics  # policy.metrics.PolicyMetrics, or None
        self.settings = settings
        self.link = link
        self.notifier = notifier
        self._key = settings.signing_key.get_secret_value() if settings.signing_key else None
        self.params = settings.rule_params()
        # S11: reads and checks the MACs of the policy file. Without a link (replay) it
        # only records what it would send.
        self.wol = WakeOnLan(settings, send=link is not None)
        self._supply_sent: dict[str, bool] = {}
        self._supply_connection = -1

    # -- the cycle ------------------------------------------------------------------------
    def db_now(self) -> datetime:
        return self.conn.execute("SELECT now()").fetchone()[0]

    def step(self, now: datetime | None = None) -> list[AgentView]:
        started = time.monotonic()
        now = now or self.db_now()
        self.handle_incoming(now)
        self.handle_nut_reports(now)
        views = agent_views(supply_rows(self.conn, now, self.params))
        self.track_conditions(views, now)
        for view in views:
            self.decide(view, now)
        self.deliver(now)
        self.publish_supply(views, now)
        self.wol.step(self, views, now)  # last: its packets are a second apart
        if self.metrics is not None:
            self.metrics.evaluated(self.conn, started)
        return views

    def publish_supply(self, views: list[AgentView], now: datetime) -> None:
        """D9: tell each agent, retained, whether the stations it needs are on battery; sent
        on every change and again after each reconnect. Agents with FAILSAFE_AFTER_SEC halt
        themselves when told "on battery" and then cut off from the broker for that long."""
        link = self.link
        if link is None or not link.connected.is_set():
            return
        if link.connections != self._supply_connection:
            self._supply_sent.clear()
            self._supply_connection = link.connections
        for view in views:
            on_grid = sum(1 for s in view.supplies if not s["on_battery"])
            on_battery = on_grid < view.needed
            if self._supply_sent.get(view.agent_id) == on_battery:
                continue
            body = {"agent": view.agent_id, "on_battery": on_battery,
                    "ts": int(now.timestamp())}
            if link.publish_supply(view.agent_id, body):
                self._supply_sent[view.agent_id] = on_battery

    def decide(self, view: AgentView, now: datetime) -> None:
        episodes = sorted(view.episode_ids)
        shutdowns = self.conn.execute(
            SHUTDOWN_IN_EPISODES, {"agent": view.agent_id, "episodes": episodes}
        ).fetchall() if episodes else []
        if view.shutdown_due:
            if not shutdowns:
                self.send_shutdown(view, now)
                return
            again = self._reissue_reason(view.agent_id, shutdowns[0], now)
            if again:
                self.send_shutdown(view, now, again_after=shutdowns[0], because=again)
                return
        if not (view.power_back and shutdowns):
            return
        # Abort every shutdown of these episodes that may still be waiting on the host: also
        # one whose acks were lost or came back as a redelivery's "duplicate", or that expired
        # unacknowledged (the host may have taken it and lost the ack). An agent that never
        # had it answers the abort "no pending shutdown", which costs nothing.
        cancel, committed = [], []
        for cmd_id, episode_id, status, delay_sec, sent_at, aborted, *_ in shutdowns:
            if aborted:
                continue
            commit_point = sent_at + timedelta(seconds=delay_sec)
            # An agent that says it is executing has passed its own commit point, whatever
            # our clock says; it would refuse the abort.
            if now < commit_point and status != "executing":
                cancel.append((cmd_id, episode_id))
            elif status != "rejected":  # taken, or maybe taken with its ack lost
                committed.append((cmd_id, episode_id, commit_point))
        if cancel:
            self.send_abort(view, cancel, now)
        for cmd_id, episode_id, commit_point in committed:
            if self._event_exists("power_returned_after_commit", cmd_id):
                continue
            # S11: too late to cancel; record it so the operator knows the host went down
            # although the grid came back.
            self.event(now, "power_returned_after_commit", agent_id=view.agent_id,
                       episode_id=episode_id, command_id=cmd_id,
                       message=f"power back after the commit point ({commit_point:%H:%M:%S})")
            self.alert(now, f"power-after-commit:{cmd_id}", "power",
                       f"{view.agent_id}: power returned after its shutdown was committed")

    def _reissue_reason(self, agent_id: str, latest, now: datetime) -> str | None:
        """Why the episode's latest shutdown no longer protects the host while a shutdown is
        still due, or None. Two cases get a new command (new id, same episode, next attempt):
        every send expired unacknowledged (the host was offline, or unreachable, for longer
        than the TTL: it gets the new one when it comes back), and a host that halted and
        booted again inside the episode while the battery is still critical (as upsmon would,
        it is shut down again, with a fresh abort window). A genuine refusal (bad signature,
        wrong agent) is never repeated: it alerts, and a repeat would be refused the same."""
        cmd_id, _episode, status, delay_sec, sent_at, aborted, _attempt, sends, acked_at = latest
        if aborted:
            return None
        if status == "expired" and acked_at is None:
            return f"shutdown {cmd_id} expired unacknowledged after {sends} sends"
        if status in _ACTED_ON:
            commit_point = (acked_at or sent_at) + timedelta(seconds=delay_sec)
            back = self.conn.execute(BACK_ONLINE_SINCE,
                                     {"agent": agent_id, "since": commit_point}).fetchone()
            if back and back[0]:
                return (f"host back online after shutdown {cmd_id} (commit point "
                        f"{commit_point:%H:%M:%S}) with the battery still critical")
        return None

    # -- commands -------------------------------------------------------------------------
    def send_shutdown(self, view: AgentView, now: datetime, again_after=None,
                      because: str = "") -> str | None:
        first = view.fired[0]
        if again_after is not None:
            episode, attempt = again_after[1], again_after[6] + 1
        else:
            episode, attempt = first["episode_id"] or (
                f"{first['device_sn']}-{int(first['on_battery_since'].timestamp())}"), 1
        delay = (view.shutdown_delay_sec if view.shutdown_delay_sec is not None
                 else self.settings.shutdown_delay_sec)
        reason = trigger_reason(first)
        if view.needed > 1 or len(view.supplies) > 1:
            reason += f"; healthy supplies {view.healthy} < {view.needed}"
        cmd = Command(view.agent_id, "shutdown", delay, self.settings.command_ttl_sec,
                      int(now.timestamp()), episode, "", reason)
        with self.conn.transaction():
            if not self.create_command(cmd, now, attempt=attempt):
                return None  # another worker (or an earlier run) already has this attempt
            details = _trigger_values(first, view)
            if again_after is not None:
                details.update(attempt=attempt, replaces=str(again_after[0]), why=because)
                self.event(now, "command_reissued", device_sn=first["device_sn"],
                           agent_id=view.agent_id, episode_id=episode, command_id=cmd.id,
                           trigger=first["trigger"], message=f"{because}: {cmd.reason}",
                           details=details)
            else:
                self.event(now, "trigger_fired", device_sn=first["device_sn"],
                           agent_id=view.agent_id, episode_id=episode, command_id=cmd.id,
                           trigger=first["trigger"], message=cmd.reason, details=details)
        if again_after is not None:
            log.warning("shutdown %s again (attempt %d): %s", view.agent_id, attempt, because)
            return cmd.id
        log.warning("shutdown %s: %s", view.agent_id, cmd.reason)
        self.alert(now, f"shutdown:{cmd.id}", "shutdown",
                   f"Shutting down {view.agent_id} in {delay} s: {cmd.reason}")
        return cmd.id

    def send_abort(self, view: AgentView, cancels: list[tuple[UUID, str]],
                   now: datetime) -> list[str]:
        """One abort per shutdown in `cancels` ((command id, episode id) pairs), and the
        episodes closed, in one transaction."""
        why = f"power back for {self.settings.confirm_sec} s"
        sent = []
        with self.conn.transaction():
            for cancel_id, episode_id in cancels:
                cmd = Command(view.agent_id, "abort", 0, self.settings.command_ttl_sec,
                              int(now.timestamp()), episode_id, str(cancel_id), why)
                self.create_command(cmd, now, cancels_id=cancel_id)
                self.event(now, "command_aborted", agent_id=view.agent_id,
                           episode_id=episode_id, command_id=cmd.id,
                           message=f"abort of {cancel_id}: {cmd.reason}",
                           details={"cancels": str(cancel_id)})
                sent.append(cmd.id)
            # The abort ends the episodes: if the grid fails again the host is protected anew.
            for supply in view.supplies:
                if supply["episode_id"]:
                    self.conn.execute(
                        "INSERT INTO episode_closures (episode_id, device_sn, closed_at, reason)"
                        " VALUES (%s, %s, %s, 'aborted') ON CONFLICT DO NOTHING",
                        (supply["episode_id"], supply["device_sn"], now))
        names = ", ".join(str(c) for c, _ in cancels)
        log.warning("abort %s: shutdown %s cancelled, %s", view.agent_id, names, why)
        self.alert(now, f"abort:{sent[0]}", "abort",
                   f"Shutdown of {view.agent_id} cancelled: {why}")
        return sent

    def fire_test(self, agent_id: str, now: datetime | None = None) -> str:
        """S12: a `test` command through the whole path; the agent acks without acting."""
        now = now or self.db_now()
        cmd = Command(agent_id, "test", 0, self.settings.command_ttl_sec, int(now.timestamp()),
                      f"test-{int(now.timestamp())}", "", "fire-test requested by operator")
        with self.conn.transaction():
            self.create_command(cmd, now)
            self.event(now, "test_fired", agent_id=agent_id, episode_id=cmd.episode_id,
                       command_id=cmd.id, message=cmd.reason)
        self.deliver(now)
        return cmd.id

    def create_command(self, cmd: Command, now: datetime, cancels_id: UUID | None = None,
                       attempt: int = 1) -> bool:
        row = self.conn.execute(INSERT_COMMAND, {
            "id": cmd.id, "agent": cmd.agent, "action": cmd.action, "episode_id": cmd.episode_id,
            "cancels_id": cancels_id, "reason": cmd.reason, "delay_sec": cmd.delay_sec,
            "ttl_sec": cmd.ttl_sec, "now": now, "payload": Jsonb(cmd.payload(self._key)),
            "attempt": attempt,
        }).fetchone()
        return row is not None

    def deliver(self, now: datetime) -> None:
        """Send what is new, re-send what is unacknowledged, expire what is too old (D3, D5)."""
        # While the broker is away nothing is handed to the MQTT client: it would queue a copy
        # per evaluation and deliver them all on reconnect. The database keeps the command; it
        # goes out once, on the first evaluation after the reconnect.
        if self.link is not None and self.link.connected.is_set():
            due = self.conn.execute(
                DUE_FOR_SENDING, {"now": now, "resend_sec": self.settings.resend_sec}
            ).fetchall()
            for cmd_id, agent, action, episode, payload, expires_at, send_count in due:
                remaining = math.ceil((expires_at - now).total_seconds())
                if not self.link.publish_command(agent, payload, remaining):
                    log.warning("command %s to %s not handed to the broker; will retry",
                                cmd_id, agent)
                    continue
                self.conn.execute(MARK_SENT, {"id": cmd_id, "now": now})
                self.event(now, "command_resent" if send_count else "command_sent",
                           agent_id=agent, episode_id=episode, command_id=cmd_id,
                           message=f"{action} to {agent} (send {send_count + 1})",
                           details={"action": action, "expiry_sec": remaining})
        for cmd_id, agent, action, episode, send_count in self.conn.execute(
            EXPIRE_UNACKED, {"now": now}
        ).fetchall():
            self.event(now, "command_expired", agent_id=agent, episode_id=episode,
                       command_id=cmd_id,
                       message=f"{action} to {agent} expired without an ack after "
                               f"{send_count} sends")
            # Once per agent and episode: a shutdown re-issued every TTL while the host stays
            # offline must not page the operator each time (the offline alert repeats).
            self.alert(now, f"expired:{action}:{agent}:{episode or cmd_id}", "agent",
                       f"{action} for {agent} was never acknowledged (expired)")

    # -- acks and status ------------------------------------------------------------------
    def handle_incoming(self, now: datetime) -> None:
        """Store the agents' acks and status messages in the order they came. Each is
        acknowledged to the broker only once committed (`link.done`): while the database is
        away it stays with the broker, or first in line here, and is tried again."""
        if self.link is None:
            return
        while (msg := self.link.take()) is not None:
            try:
                if msg.kind == "ack":
                    self.record_ack(msg, now)
                else:
                    self.record_status(msg, now)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise  # the database is away: not acknowledged, tried again when it is back
            except Exception:
                # A message that can never be stored (e.g. a value PostgreSQL refuses) must
                # not come back forever and hold up every message behind it.
                log.exception("%s from %s dropped: it cannot be stored (%r)", msg.kind,
                              msg.agent, msg.raw[:200])
            self.link.done(msg)

    def handle_nut_reports(self, now: datetime) -> None:
        """Acks and liveness of `nut` agents, seen by the NUT server (policy/nutagents.py)."""
        for msg in take_reports(self.conn):
            if msg.kind == "ack":
                self.record_ack(msg, now)
            else:
                self.record_status(msg, now)

    def record_ack(self, msg: Incoming, now: datetime) -> None:
        ack = msg.payload or {}
        status = ack.get("status")
        try:
            cmd_id = UUID(str(ack.get("id")))
        except ValueError:
            cmd_id = None
        if cmd_id is None or status not in ACK_STATUSES:
            self.event(now, "ack_invalid", agent_id=msg.agent,
                       message=clean_reason(msg.raw.decode("utf-8", "replace")))
            return
        row = self.conn.execute(
            "SELECT status, action, episode_id FROM commands WHERE id = %s AND agent_id = %s",
            (cmd_id, msg.agent)).fetchone()
        agent_ts = ack.get("ts") if isinstance(ack.get("ts"), (int, float)) else None
        detail = str(ack.get("detail") or "")[:500]
        host = str(ack.get("host") or "")[:255] or None
        refusal = status == "rejected" and not detail.lower().startswith("duplicate")
        if msg.redelivered and self.conn.execute(ACK_STORED, {
                "id": cmd_id, "agent": msg.agent, "payload": Jsonb(ack)}).fetchone()[0]:
            # The broker's copy of an ack stored before the worker could acknowledge it (it
            # died, or the database failed, after the commit): stored once. Only the alert,
            # itself sent at most once, is made sure of.
            if refusal and row is not None:
                self.alert(now, f"rejected:{cmd_id}", "agent",
                           f"{msg.agent} rejected {row[1]}: {detail or 'no detail'}")
            return
        with self.conn.transaction():
            self.conn.execute(RECORD_ACK, {
                "id": cmd_id, "agent": msg.agent, "status": status, "host": host,
                "ts": agent_ts, "now": now, "detail": detail, "payload": Jsonb(ack)})
            if row is None:
                self.event(now, "ack_unknown_command", agent_id=msg.agent, command_id=cmd_id,
                           message=f"ack {status} for a command this agent was never sent")
                return
            current, action, episode = row
            # "rejected: duplicate" answers a redelivery of an id the agent already acted on
            # (contract, step 6): it says "delivered", never "refused".
            duplicate = status == "rejected" and detail.lower().startswith("duplicate")
            effective = "received" if duplicate else status
            advance = _ACK_RANK[effective] > _ACK_RANK.get(current, 0)
            self.conn.execute(APPLY_ACK, {
                "id": cmd_id, "status": effective, "advance": advance, "host": host,
                "detail": detail, "now": now})
            # A refusal after the agent took the command is its report that acting failed
            # (e.g. "SHUTDOWN_CMD failed" at the commit point): the state keeps what the agent
            # did, and the operator is told.
            refusal = status == "rejected" and not duplicate
            kind = ("command_acked" if not refusal else
                    "command_rejected" if advance else "command_failed")
            self.event(now, kind, agent_id=msg.agent, episode_id=episode, command_id=cmd_id,
                       message=f"{action} {status}" + (f": {detail}" if detail else ""),
                       details={"status": status, "host": host, "detail": detail,
                                "duplicate": duplicate,
                                "state": effective if advance else current})
        if refusal:
            self.alert(now, f"rejected:{cmd_id}", "agent",
                       f"{msg.agent} rejected {action}: {detail or 'no detail'}")

    def record_status(self, msg: Incoming, now: datetime) -> None:
        status = msg.payload or {}
        state = str(status.get("state", "")).lower()
        if state not in ("online", "offline"):
            return
        with self.conn.transaction():  # the state and its event, or neither (then retried)
            was_online = self.conn.execute(UPSERT_STATUS, {
                "agent": msg.agent, "online": state == "online", "now": now,
                "version": status.get("version"), "platform": status.get("platform"),
                "host": status.get("host"), "payload": Jsonb(status)}).fetchone()[0]
            if was_online is None or was_online != (state == "online"):
                self.event(now, f"agent_{state}", agent_id=msg.agent,
                           message=f"{msg.agent} is {state}", details=status)

    # -- audit ----------------------------------------------------------------------------
    def track_conditions(self, views: list[AgentView], now: datetime) -> None:
        """Record each condition once when it starts and once when it clears (S5, S6)."""
        current: dict[tuple[str, str], dict] = {}

        def hold(subject, condition, since, identity="", device_sn=None, agent_id=None,
                 **details):
            current[(subject, condition)] = {
                "since": since or now, "identity": identity, "device_sn": device_sn,
                "agent_id": agent_id, "details": details}

        offline = {a for (a,) in self.conn.execute(
            "SELECT agent_id FROM agent_status WHERE NOT online").fetchall()}
        for view in views:
            for s in view.supplies:
                sn, dev = s["device_sn"], f"device:{s['device_sn']}"
                if s["on_battery"] and s["on_battery_since"]:
                    hold(dev, "on_battery", s["on_battery_since"],
                         str(s["on_battery_since"]), sn, soc=s["soc"],
                         episode_id=s["episode_id"])
                if s["episode_id"]:
                    hold(dev, "episode", s["episode_start"], s["episode_id"], sn,
                         episode_id=s["episode_id"])
                if s["freshness"] in ("stale", "dead"):
                    hold(dev, s["freshness"], None, "", sn, last_ts=str(s["last_ts"]),
                         on_battery=s["on_battery"])
                pair = f"agent:{view.agent_id}:{sn}"
                for name in ("soc_low", "runtime_low"):
                    if s[f"{name}_since"]:
                        hold(pair, name, s[f"{name}_since"], str(s[f"{name}_since"]), sn,
                             view.agent_id, soc=s["soc"], threshold=s["soc_thr"],
                             runtime_left_min=s["runtime_left_min"])
                if s["trigger"]:
                    hold(pair, "trigger", None, s["trigger"], sn, view.agent_id,
                         trigger=s["trigger"])
                if (self.settings.alert_low_soc_on_grid and s["grid_on"]
                        and s["soc"] is not None and s["soc"] <= s["soc_thr"]):
                    hold(pair, "low_soc_on_grid", None, "", sn, view.agent_id, soc=s["soc"])
            if view.in_episode and view.agent_id in offline:
                hold(f"agent:{view.agent_id}", "offline_in_episode", None, "",
                     agent_id=view.agent_id, episodes=sorted(view.episode_ids))

        stored = {(r[0], r[1]): r[2] for r in self.conn.execute(
            "SELECT subject, condition, details->>'identity' FROM policy_conditions")}
        with self.conn.transaction():
            for key, identity in stored.items():
                if key not in current or current[key]["identity"] != identity:
                    self._clear(key, now)
            for key, cond in current.items():
                if key not in stored or stored[key] != cond["identity"]:
                    self._start(key, cond, now)
        for (subject, condition), cond in current.items():
            self._alert_condition(subject, condition, cond, now)

    def _start(self, key, cond, now) -> None:
        subject, condition = key
        details = dict(cond["details"], identity=cond["identity"])
        self.conn.execute(
            "INSERT INTO policy_conditions (subject, condition, since, device_sn, agent_id,"
            " details, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (subject, condition) DO UPDATE SET since = EXCLUDED.since,"
            " details = EXCLUDED.details, updated_at = EXCLUDED.updated_at",
            (subject, condition, cond["since"], cond["device_sn"], cond["agent_id"],
             Jsonb(_jsonable(details)), now))
        self.event(now, "condition_started", device_sn=cond["device_sn"],
                   agent_id=cond["agent_id"], trigger=condition,
                   episode_id=cond["details"].get("episode_id"),
                   message=f"{condition} on {subject} since {cond['since']:%Y-%m-%d %H:%M:%S%z}",
                   details=dict(details, since=str(cond["since"])))

    def _clear(self, key, now) -> None:
        subject, condition = key
        row = self.conn.execute(
            "DELETE FROM policy_conditions WHERE subject = %s AND condition = %s"
            " RETURNING device_sn, agent_id, since, details", key).fetchone()
        if row is None:
            return
        device_sn, agent_id, since, details = row
        self.event(now, "condition_cleared", device_sn=device_sn, agent_id=agent_id,
                   trigger=condition, episode_id=details.get("episode_id"),
                   message=f"{condition} on {subject} cleared (held since "
                           f"{since:%Y-%m-%d %H:%M:%S%z})",
                   details=dict(details, since=str(since)))

    def _alert_condition(self, subject, condition, cond, now) -> None:
        where = cond["device_sn"] or cond["agent_id"]
        if condition == "on_battery":
            # Once per outage episode: a grid that keeps coming back for a minute and going
            # again (each return confirmed, all inside the cooldown) is one outage to a person.
            episode = cond["details"].get("episode_id") or cond["identity"]
            self.alert(now, f"on_battery:{subject}:{episode}", "power",
                       f"{where} is on battery (grid lost)")
        elif condition in ("stale", "dead"):
            self.alert(now, f"{condition}:{subject}", "station",
                       f"station {where} is {condition}: no data since "
                       f"{cond['details']['last_ts']}", repeat=condition == "dead")
        elif condition == "offline_in_episode":
            self.alert(now, f"offline:{subject}", "agent",
                       f"agent {where} is offline during an outage", repeat=True)
        elif condition == "low_soc_on_grid":
            self.alert(now, f"low_soc_on_grid:{subject}", "station",
                       f"{where}: low battery although the grid is present", repeat=True)

    def alert(self, now: datetime, key: str, category: str, body: str,
              repeat: bool = False) -> None:
        """Hand a notification to the notifier, at most once per key, or once per repeat period
        while `repeat` (S6); the schedule lives in policy_events so restarts keep it."""
        if self.notifier is None or not self.notifier.wants(category):
            return
        last = self.conn.execute(
            "SELECT max(ts) FROM policy_events WHERE kind = 'alert_sent'"
            " AND details->>'key' = %s", (key,)).fetchone()[0]
        if last is not None and not (
            repeat and now - last >= timedelta(seconds=self.settings.notify_repeat_sec)
        ):
            return
        self.notifier.send("EcoFlow power", body)
        self.event(now, "alert_sent", message=body, details={"key": key, "category": category})

    def event(self, ts: datetime, kind: str, *, device_sn=None, agent_id=None, episode_id=None,
              command_id=None, trigger=None, message=None, details=None) -> None:
        if self.metrics is not None:
            self.metrics.event(kind)
        self.conn.execute(INSERT_EVENT, {
            "ts": ts, "kind": kind, "device_sn": device_sn, "agent_id": agent_id,
            "episode_id": episode_id, "command_id": command_id, "trigger": trigger,
            "message": message, "details": Jsonb(_jsonable(details or {}))})

    def _event_exists(self, kind: str, command_id) -> bool:
        return self.conn.execute(
            "SELECT EXISTS (SELECT 1 FROM policy_events WHERE kind = %s AND command_id = %s)",
            (kind, command_id)).fetchone()[0]


def _trigger_values(supply: dict, view: AgentView) -> dict:
    keys = ("soc", "soc_thr", "remain_time_min", "runtime_left_min", "runtime_thr",
            "discharge_pct_per_min", "on_battery_since", "soc_low_since", "runtime_low_since",
            "battery_limit_sec", "freshness", "age_sec", "episode_id")
    values = {k: supply[k] for k in keys}
    values.update(healthy_supplies=view.healthy, needed_supplies=view.needed)
    return _jsonable(values)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def serve(db_url: str, settings: PolicySettings, link: MqttLink, notifier=None,
          stop: threading.Event | None = None, retention_days: int = 0, metrics=None) -> None:
    """Evaluate every POLICY_INTERVAL_SEC and at once when new readings are committed."""
    stop = stop or threading.Event()
    threading.Thread(target=refresh_summaries, args=(db_url, stop), name="summaries",
                     kwargs={"retention_days": retention_days}, daemon=True).start()
    while not stop.is_set():
        try:
            with psycopg.connect(db_url, autocommit=True) as conn, \
                    psycopg.connect(db_url, autocommit=True) as listener:
                listener.execute(f"LISTEN {READINGS_CHANNEL}")
                worker = Worker(conn, settings, link, notifier, metrics)
                senders: dict[int, bool] = {}
                while not stop.is_set():
                    worker.step()
                    _wait_for_readings(listener, settings.interval_sec, stop, senders)
        except psycopg.OperationalError as exc:
            log.error("database unavailable (%s); retrying in %.0f s", exc,
                      settings.interval_sec)
            stop.wait(settings.interval_sec)


def refresh_summaries(db_url: str, stop: threading.Event,
                      every: float = SUMMARY_REFRESH_SEC, retention_days: int = 0,
                      retention_every: float = RETENTION_EVERY_SEC) -> None:
    """Bring the dashboards' summary tables up to date (ecoflow_refresh_summaries, migration
    0003) now and then every `every` seconds until `stop`; with `retention_days`, also remove
    raw readings older than that now and every `retention_every` seconds where no TimescaleDB
    retention policy does it (servicekit.dbsetup.enforce_retention). It runs beside the policy
    loop on its own connection, so a slow refresh (the first one builds the whole history)
    never delays a decision; a failure is logged and the next round tries again."""
    retained_at: float | None = None
    while not stop.is_set():
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("SELECT ecoflow_refresh_summaries()")
        except Exception as exc:  # whatever it is, the policy loop goes on
            log.warning("summary refresh failed (views stay correct, reading more raw rows): %s",
                        exc)
        if retention_days > 0 and (retained_at is None
                                   or time.monotonic() - retained_at >= retention_every):
            retained_at = time.monotonic()
            try:
                log.info("retention: %s", enforce_retention_now(db_url, retention_days))
            except Exception as exc:
                log.warning("retention failed (next try in %.0f h): %s", retention_every / 3600,
                            exc)
        stop.wait(every)


def enforce_retention_now(db_url: str, days: int) -> str:
    """Remove raw readings older than `days` days, unless a TimescaleDB retention policy (the
    community license) already does; returns what was done."""
    from sqlalchemy import create_engine

    from servicekit import dbsetup

    _scheme, rest = db_url.split("://", 1)  # a libpq URL (DatabaseSettings.libpq_url)
    engine = create_engine(f"postgresql+psycopg://{rest}")
    try:
        with engine.begin() as conn:
            if dbsetup.flavour(conn).community:
                return "left to TimescaleDB's retention policy"
            return dbsetup.enforce_retention(conn, days)
    finally:
        engine.dispose()


# Whether the session that sent a notification may write readings.
SENDER_MAY_WRITE = """
SELECT has_table_privilege(a.usesysid, 'ecoflow_measurements', 'INSERT')
  FROM pg_stat_activity a WHERE a.pid = %s
"""


def _wait_for_readings(listener: psycopg.Connection, interval: float,
                       stop: threading.Event, senders: dict[int, bool] | None = None) -> None:
    """Return on the first notification of new readings, after `interval`, or on stop; waits
    in short slices so a stop request is seen within a second.

    PostgreSQL lets any role NOTIFY any channel, so only a session that may write readings
    wakes the worker (`senders` caches the answer per backend): a read-only client sending
    NOTIFY ecoflow_readings in a loop must not drive evaluations as fast as it can send."""
    senders = {} if senders is None else senders
    deadline = time.monotonic() + interval
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        # The rest of a burst of notifications is read on the next wait and ends it at once,
        # which costs one extra evaluation, never a missed one.
        # The generator holds the connection: take the sender out of it before asking.
        pids = [note.pid for note in listener.notifies(timeout=min(left, 1.0), stop_after=1)]
        if any(_from_a_writer(listener, pid, senders) for pid in pids):
            return


def _from_a_writer(listener: psycopg.Connection, pid: int, senders: dict[int, bool]) -> bool:
    if pid not in senders:
        row = listener.execute(SENDER_MAY_WRITE, (pid,)).fetchone()
        if row is None:
            # The session has ended already (a short-lived writer: insert, commit, close): it
            # cannot be asked, and a reading may be waiting, so it counts, uncached.
            return True
        if len(senders) > 1000:  # backends come and go; their pids are reused
            senders.clear()
        senders[pid] = bool(row[0])
    return senders[pid]


def rows_as_dicts(conn: psycopg.Connection, query: str, params=None) -> list[dict]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()
