"""The shutdown plan: what the rules would do, agent by agent, if the grid were lost now.

Like NUT's `upsdrvctl -t`, it only reads: the thresholds of every enabled agent, each station's
latest reading and capacity, and the discharge of its last stretch on battery. It projects each
trigger of policy/sql/supply_state.sql along a straight discharge line from the current SoC and
prints the timeline: when each trigger would fire, the debounce, the shutdown command, the abort
window and the commit point, and the order of the agents. It sends no command, records no event
and writes nothing; `ecoflow-policy plan` runs it in a read-only transaction.

Where the discharge rate cannot be known (no load in watts with a known capacity, and no
discharge on battery recorded) the plan says so instead of inventing a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import dict_row

from policy.settings import PolicySettings

# One row per (enabled agent, station that supplies it): the thresholds resolved exactly as the
# `pairs` CTE of supply_state.sql resolves them, the station's latest reading at %(now)s, and
# the discharge rate (percent per minute) over the last slope_window_sec of its last stretch on
# battery, the way supply_state.sql measures `discharge_pct_per_min` during an outage.
PLAN_INPUTS = """
SELECT a.agent_id, a.tier, a.min_supplies,
       coalesce(a.shutdown_delay_sec, %(shutdown_delay_sec)s)          AS shutdown_delay_sec,
       coalesce(a.soc_threshold, %(soc_min)s)::float8                  AS soc_thr,
       coalesce(a.runtime_threshold_min, %(runtime_min)s)::float8      AS runtime_thr,
       coalesce(a.max_on_battery_sec, %(max_on_battery_sec)s)::float8  AS battery_limit_sec,
       s.device_sn, d.name AS device_name, d.capacity_wh::float8 AS capacity_wh,
       d.stale_after_sec, d.dead_after_sec,
       latest.ts AS last_ts, latest.soc, latest.watts_out, latest.grid_on,
       extract(epoch FROM %(now)s - latest.received_at)::float8        AS age_sec,
       stretch.pct_per_min                                            AS slope_pct_per_min,
       stretch.until                                                  AS slope_until
  FROM agents a
  JOIN agent_supplies s ON s.agent_id = a.agent_id
  JOIN devices d ON d.device_sn = s.device_sn
  LEFT JOIN LATERAL (
        SELECT m.ts, coalesce(m.received_at, m.ts) AS received_at,
               coalesce(m.soc_min_percent, m.soc_percent)::float8 AS soc,
               m.watts_out_sum AS watts_out, m.grid_connected AS grid_on
          FROM ecoflow_measurements m
         WHERE m.device_sn = s.device_sn AND coalesce(m.received_at, m.ts) <= %(now)s
         ORDER BY m.ts DESC LIMIT 1) latest ON true
  LEFT JOIN LATERAL (
        SELECT last_off.ts AS until,
               CASE WHEN regr_count(coalesce(m.soc_min_percent, m.soc_percent),
                                    extract(epoch FROM m.ts)) >= 3
                    THEN -60 * regr_slope(coalesce(m.soc_min_percent, m.soc_percent),
                                          extract(epoch FROM m.ts)) END AS pct_per_min
          FROM (SELECT max(o.ts) AS ts FROM ecoflow_measurements o
                 WHERE o.device_sn = s.device_sn AND NOT o.grid_connected
                   AND o.ts <= %(now)s) last_off
          JOIN ecoflow_measurements m
            ON m.device_sn = s.device_sn AND NOT m.grid_connected
           AND m.ts <= last_off.ts
           AND m.ts > last_off.ts - make_interval(secs => %(slope_window_sec)s)
           -- only the last stretch: a return of the grid in between recharged the battery
           AND m.ts > coalesce((SELECT max(g.ts) FROM ecoflow_measurements g
                                 WHERE g.device_sn = s.device_sn AND g.grid_connected
                                   AND g.ts < last_off.ts), '-infinity')
         GROUP BY last_off.ts) stretch ON true
 WHERE a.enabled
 ORDER BY a.tier, a.agent_id, s.device_sn
"""

# The triggers that decide while telemetry flows, in supply_state.sql's tie-break order (by
# time, then by name); dead_on_battery is the contingency when it stops.
TIMELINE = ("battery_time", "runtime", "soc")


@dataclass
class Trigger:
    """One trigger of one supply. state: fires (at fires_at), off (not configured), never (not
    at this load), unknown (the plan cannot know), contingent (only if telemetry stops)."""

    name: str
    state: str
    fires_at: datetime | None = None
    met_at: datetime | None = None  # when the condition starts to hold, before the debounce
    how: str = ""


@dataclass
class SupplyPlan:
    device_sn: str
    device_name: str | None
    soc: float | None
    watts_out: int | None
    capacity_wh: float | None
    rate_pct_per_min: float | None
    rate_source: str
    last_ts: datetime | None
    triggers: list[Trigger]
    notes: list[str] = field(default_factory=list)

    @property
    def station(self) -> str:
        return self.device_name or self.device_sn

    @property
    def first(self) -> Trigger | None:
        """The trigger that would win (S4: first one wins), telemetry flowing."""
        firing = [t for t in self.triggers if t.name in TIMELINE and t.state == "fires"]
        return min(firing, key=lambda t: (t.fires_at, t.name), default=None)

    @property
    def certain(self) -> bool:
        """False when a trigger's time is unknown: it could fire before `first`."""
        return not any(t.state == "unknown" for t in self.triggers if t.name in TIMELINE)


@dataclass
class AgentPlan:
    agent_id: str
    tier: int
    needed: int
    delay_sec: int
    supplies: list[SupplyPlan]
    shutdown_at: datetime | None = None
    exact: bool = True  # False: shutdown_at is only the latest it can be
    # What the worker's shutdown reason names: the supply whose trigger fired first.
    trigger: str | None = None
    station: str | None = None
    # With several supplies, the one whose trigger leaves fewer healthy than needed.
    decided_by: str | None = None
    commit_at: datetime | None = None
    # The grid must be back before this moment, and hold confirm_sec, for the abort to be sent
    # before the commit point.
    abort_by: datetime | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    lost_at: datetime
    debounce_sec: int
    confirm_sec: int
    interval_sec: float
    agents: list[AgentPlan]  # in the order they would shut down
    notes: list[str] = field(default_factory=list)


# -- the arithmetic: one function per trigger -------------------------------------------------
def discharge_rate(watts_out: float | None, capacity_wh: float | None,
                   slope_pct_per_min: float | None, slope_until: datetime | None
                   ) -> tuple[float | None, str]:
    """Percent of SoC per minute once on battery, and where the number comes from: the current
    output load over the station's capacity (devices.capacity_wh), else the slope measured over
    its last stretch on battery (as supply_state.sql's `discharge_pct_per_min`), else unknown.
    The load figure ignores inverter losses, so a real discharge is somewhat faster."""
    if watts_out is not None and capacity_wh:
        return (watts_out * 100.0 / (capacity_wh * 60.0),
                f"{watts_out} W out of {capacity_wh:g} Wh")
    if slope_pct_per_min is not None and slope_pct_per_min > 0:
        return slope_pct_per_min, f"measured on battery until {slope_until:%Y-%m-%d %H:%M}"
    missing = "no output load reading" if watts_out is None else "no capacity_wh for the station"
    return None, f"unknown: {missing} and no discharge on battery recorded"


def soc_trigger(lost_at: datetime, soc: float | None, rate: float | None, soc_thr: float,
                debounce_sec: float) -> Trigger:
    """supply_state.sql `soc_low_since` / `soc_fires_at`: the condition starts at the first
    on-battery reading with soc_min <= soc_thr and fires debounce_sec later. On the line
    soc - rate * t that reading comes (soc - soc_thr) / rate minutes after the loss, or with
    the first reading when the SoC is at the threshold already."""
    if soc is None:
        return Trigger("soc", "unknown", how="no SoC reading")
    if soc <= soc_thr:
        met, how = lost_at, f"soc_min {soc:.1f} % already <= {soc_thr:g} %"
    elif rate is None:
        return Trigger("soc", "unknown", how="discharge rate unknown")
    elif rate <= 0:
        return Trigger("soc", "never", how=f"no discharge at this load ({soc:.1f} % stays)")
    else:
        met = lost_at + timedelta(minutes=(soc - soc_thr) / rate)
        how = f"soc_min {soc:.1f} % -> {soc_thr:g} % at {rate:.2f} %/min"
    return Trigger("soc", "fires", met + timedelta(seconds=debounce_sec), met,
                   f"{how}, then debounce {debounce_sec:g} s")


def runtime_trigger(lost_at: datetime, soc: float | None, rate: float | None,
                    runtime_thr: float | None, debounce_sec: float) -> Trigger:
    """supply_state.sql `runtime_low_since` / `runtime_fires_at`: the condition starts at the
    first on-battery reading whose runtime left (the device's remain_time_min, else SoC over
    the discharge rate) is <= runtime_thr minutes, and fires debounce_sec later. On the line
    the runtime left is soc / rate - t, so it reaches the threshold soc / rate - runtime_thr
    minutes after the loss. This assumes the device's own estimate agrees with that line; the
    slope projection needs three readings on battery before it exists."""
    if runtime_thr is None:
        return Trigger("runtime", "off", how="no runtime threshold")
    if soc is None:
        return Trigger("runtime", "unknown", how="no SoC reading")
    if rate is None:
        return Trigger("runtime", "unknown", how="discharge rate unknown")
    if rate <= 0:
        return Trigger("runtime", "never", how="no discharge at this load")
    left = soc / rate
    met = lost_at + timedelta(minutes=max(0.0, left - runtime_thr))
    return Trigger("runtime", "fires", met + timedelta(seconds=debounce_sec), met,
                   f"runtime {left:.1f} min -> {runtime_thr:g} min, then debounce "
                   f"{debounce_sec:g} s")


def battery_time_trigger(lost_at: datetime, limit_sec: float | None) -> Trigger:
    """supply_state.sql `battery_time_fires_at` = on_battery_since + battery_limit_sec, where
    on_battery_since is the first on-battery reading: the moment of the loss. No debounce."""
    if limit_sec is None:
        return Trigger("battery_time", "off", how="no time-on-battery limit")
    return Trigger("battery_time", "fires", lost_at + timedelta(seconds=limit_sec), lost_at,
                   f"limit {limit_sec:g} s on battery")


def dead_on_battery_trigger(lost_at: datetime, dead_after_sec: float) -> Trigger:
    """supply_state.sql `dead_fires_at` = last_ts + dead_after_sec, counted only when the last
    reading said "on battery" (S2). If telemetry stops right after the first on-battery reading
    that is the loss + dead_after_sec; if it stops before one arrives, nothing fires."""
    return Trigger("dead_on_battery", "contingent",
                   lost_at + timedelta(seconds=dead_after_sec), lost_at,
                   f"only if telemetry stops after the first on-battery reading (dead after "
                   f"{dead_after_sec:g} s); stopping before one arrives is only an alert")


# -- putting it together ---------------------------------------------------------------------
def build(conn: psycopg.Connection, settings: PolicySettings,
          now: datetime | None = None) -> Plan:
    """The plan for a grid loss at `now` (the database clock when not given), from readings up
    to that moment. Only SELECTs: run it in a read-only transaction to be sure."""
    if now is None:
        now = conn.execute("SELECT now()").fetchone()[0]
    params = dict(settings.rule_params(), now=now,
                  shutdown_delay_sec=settings.shutdown_delay_sec)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(PLAN_INPUTS, params)
        rows = cur.fetchall()

    agents: dict[str, AgentPlan] = {}
    for row in rows:
        agent = agents.get(row["agent_id"])
        if agent is None:
            agent = agents[row["agent_id"]] = AgentPlan(
                row["agent_id"], row["tier"], row["min_supplies"] or 0,
                row["shutdown_delay_sec"], [])
        agent.supplies.append(_supply_plan(row, now, settings.debounce_sec))
    for agent in agents.values():
        _decide(agent, settings.confirm_sec)

    never = datetime.max.replace(tzinfo=now.tzinfo)
    ordered = sorted(agents.values(),
                     key=lambda a: (a.shutdown_at or never, a.tier, a.agent_id))
    plan = Plan(now, settings.debounce_sec, settings.confirm_sec, settings.interval_sec,
                ordered)
    plan.notes.extend(_tier_order_notes(ordered))
    if not ordered:
        plan.notes.append("no enabled agent: the worker syncs the topology when it starts")
    return plan


def _supply_plan(row: dict, lost_at: datetime, debounce_sec: float) -> SupplyPlan:
    soc = row["soc"]
    rate, source = discharge_rate(row["watts_out"], row["capacity_wh"],
                                  row["slope_pct_per_min"], row["slope_until"])
    supply = SupplyPlan(
        row["device_sn"], row["device_name"], soc, row["watts_out"], row["capacity_wh"], rate,
        source, row["last_ts"],
        [soc_trigger(lost_at, soc, rate, row["soc_thr"], debounce_sec),
         runtime_trigger(lost_at, soc, rate, row["runtime_thr"], debounce_sec),
         battery_time_trigger(lost_at, row["battery_limit_sec"]),
         dead_on_battery_trigger(lost_at, row["dead_after_sec"])])
    if row["last_ts"] is None:
        supply.notes.append("no reading yet: the station has never reported")
    elif row["age_sec"] > row["stale_after_sec"]:
        supply.notes.append(f"last reading {row['age_sec']:.0f} s old: the plan starts from "
                            "stale data")
    if row["grid_on"] is False:
        supply.notes.append("already on battery: this plan counts from now; `ecoflow-policy "
                            "status` shows the live episode")
    return supply


def _decide(agent: AgentPlan, confirm_sec: float) -> None:
    """S9: the agent shuts down when fewer supplies than it needs are healthy, i.e. at the
    moment the (supplies - needed + 1)-th of them fires; then the abort window and commit point
    of the worker's `decide` follow from shutdown_delay_sec."""
    count = len(agent.supplies)
    agent.needed = min(agent.needed or count, count)
    must_fail = count - agent.needed + 1
    fired = sorted(((s.first.fires_at, s.first.name, s) for s in agent.supplies if s.first),
                   key=lambda f: (f[0], f[2].device_sn))  # the worker's AgentView.fired order
    agent.exact = all(s.certain for s in agent.supplies)
    unknown = [s.station for s in agent.supplies if not s.certain]
    if len(fired) < must_fail:
        if unknown:
            agent.notes.append(f"cannot say when: the discharge of {', '.join(unknown)} is "
                               "unknown (set capacity_wh for the station, or record an outage)")
        else:
            agent.notes.append("no trigger fires at this load: nothing shuts this host down")
        return
    agent.shutdown_at, name, decisive = fired[must_fail - 1]
    _, agent.trigger, first = fired[0]
    agent.station = first.station
    if must_fail > 1:
        agent.decided_by = (f"{name} on {decisive.station} leaves {count - must_fail} of "
                            f"{count} supplies healthy, {agent.needed} needed")
    agent.commit_at = agent.shutdown_at + timedelta(seconds=agent.delay_sec)
    agent.abort_by = agent.commit_at - timedelta(seconds=confirm_sec)
    if not agent.exact:
        agent.notes.append(f"at the latest: the discharge of {', '.join(unknown)} is unknown, "
                           "so its SoC or runtime trigger could fire earlier")
    if agent.abort_by <= agent.shutdown_at:
        agent.notes.append(f"no abort possible: shutdown_delay_sec ({agent.delay_sec} s) is "
                           f"shorter than the grid confirmation period ({confirm_sec:g} s)")


def _tier_order_notes(ordered: list[AgentPlan]) -> list[str]:
    """S10: lower tiers should go first; name every pair the plan would take the other way."""
    timed = [a for a in ordered if a.shutdown_at is not None]
    return [f"tier order broken: {late.agent_id} (tier {late.tier}) goes before "
            f"{early.agent_id} (tier {early.tier})"
            for i, late in enumerate(timed) for early in timed[i + 1:]
            if late.tier > early.tier and late.shutdown_at < early.shutdown_at]


# -- output ----------------------------------------------------------------------------------
def as_json(plan: Plan) -> str:
    return json.dumps(asdict(plan), default=_iso, indent=2)


def render(plan: Plan) -> str:
    """The plan as text: one block per agent, in the order they would shut down."""
    lost = plan.lost_at
    lines = [f"Plan if the grid is lost at {lost:%Y-%m-%d %H:%M:%S%z} (times from then): "
             f"debounce {plan.debounce_sec} s, grid confirmation {plan.confirm_sec} s, "
             f"evaluation every {plan.interval_sec:g} s or on each new reading."]
    for agent in plan.agents:
        lines += ["", f"{agent.agent_id} (tier {agent.tier}, needs {agent.needed} of "
                      f"{len(agent.supplies)} supplies)"]
        if agent.shutdown_at is not None:
            bound = "at the latest " if not agent.exact else ""
            abort = (f"cancelled if the grid is back before {_when(agent.abort_by, lost)} "
                     f"and holds {plan.confirm_sec} s" if agent.abort_by > agent.shutdown_at
                     else "too short to be cancelled")
            lines += [
                f"  shutdown command  {bound}{_when(agent.shutdown_at, lost)}: {agent.trigger} "
                f"on {agent.station}" + (f"; {agent.decided_by}" if agent.decided_by else ""),
                f"  abort window      {agent.delay_sec} s: {abort}",
                f"  commit point      {_when(agent.commit_at, lost)}: after it the shutdown "
                "goes through",
            ]
        lines += [f"  ! {note}" for note in agent.notes]
        rows = [("station", "trigger", "condition met", "fires", "how")]
        for supply in agent.supplies:
            for t in supply.triggers:
                met = _when(t.met_at, lost) if t.met_at and t.state == "fires" else "-"
                fires = _when(t.fires_at, lost) if t.fires_at else t.state
                if t.state == "contingent":
                    fires = f"({_when(t.fires_at, lost)})"
                rows.append((supply.station, t.name, met, fires, t.how))
        lines += ["  " + line for line in _columns(rows)]
        for supply in agent.supplies:
            soc = "-" if supply.soc is None else f"{supply.soc:.1f} %"
            rate = ("unknown" if supply.rate_pct_per_min is None
                    else f"{supply.rate_pct_per_min:.2f} %/min")
            lines.append(f"  {supply.station}: soc_min {soc}, discharge {rate} "
                         f"({supply.rate_source})")
            lines += [f"  ! {supply.station}: {note}" for note in supply.notes]
    lines += ["", "Order: " + (", ".join(
        f"{a.agent_id} (tier {a.tier}) {_rel(a.shutdown_at, lost) if a.shutdown_at else '?'}"
        for a in plan.agents) or "(no agents)")]
    lines += [f"! {note}" for note in plan.notes]
    return "\n".join(lines)


def print_plan(db_url: str, settings: PolicySettings, at: datetime | None = None,
               json_output: bool = False) -> int:
    """`ecoflow-policy plan`: one read-only transaction, rolled back; prints the plan."""
    with psycopg.connect(db_url) as conn:
        conn.read_only = True
        try:
            plan = build(conn, settings, at)
        finally:
            conn.rollback()
    print(as_json(plan) if json_output else render(plan))
    return 0


def _rel(ts: datetime, origin: datetime) -> str:
    sec = round((ts - origin).total_seconds())
    hours, rest = divmod(sec, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"+{hours}h{minutes:02d}m{seconds:02d}s"
    return f"+{minutes}m{seconds:02d}s" if minutes else f"+{seconds}s"


def _when(ts: datetime, origin: datetime) -> str:
    return f"{_rel(ts, origin)} ({ts:%H:%M:%S})"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def _iso(value):
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
