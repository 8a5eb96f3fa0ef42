"""`ecoflow-policy plan` checked against the rules themselves.

Each test builds a station's state in a real TimescaleDB (on grid at some SoC and load), asks
for the plan, then lets the grid fail exactly as the plan assumed (on battery from the plan's
"now", SoC falling linearly at the plan's rate) and steps the real Worker on a controlled clock,
as tests/test_policy_scenarios.py does: the trigger, its time (within one evaluation step) and
the commit point must be the ones the plan printed. The plan itself must touch nothing."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import pytest

from policy import cli, plan, topology
from policy.settings import PolicySettings
from policy.worker import Worker
from tests.services import READONLY_PASSWORD, READONLY_USER
from tests.test_policy_scenarios import SN, SN2, STEP, agent_name, at

LOST = 60  # the plan's "now": the last grid reading is at 50 s, the first on battery at 60 s
ONE_STEP = timedelta(seconds=STEP)


def configure(db, tmp_path, mapping: dict, devices: dict | None = None,
              agents: dict | None = None, **overrides) -> PolicySettings:
    """Settings as the worker would run with them, and the topology synced into the database."""
    config = tmp_path / "policy.json"
    config.write_text(json.dumps({"devices": devices or {}, "agents": agents or {}}))
    values = dict(soc_min=15, debounce_sec=60, confirm_sec=30, shutdown_delay_sec=120,
                  interval_sec=STEP, config_file=config,
                  device_to_agents_json=json.dumps(mapping))
    values.update(overrides)
    settings = PolicySettings(**values)
    topology.sync(db, settings)
    return settings


def readings(db, sn: str, rows) -> None:
    """rows: (second, soc_min, grid_connected, watts_out, remain_time_min)."""
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO ecoflow_measurements (ts, device_sn, soc_percent, soc_min_percent,"
            " watts_out_sum, remain_time_min, grid_connected, source, raw_data)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, 'simulator', '{}')",
            [(at(t), sn, soc, soc, watts, remain, grid) for t, soc, grid, watts, remain in rows])


def on_grid(db, sn: str, soc: float, watts: int | None) -> None:
    readings(db, sn, [(t, soc, True, watts, None) for t in range(0, LOST, 10)])


def grid_lost_as_planned(db, supply: plan.SupplyPlan, until: int, every: int = STEP,
                         device_estimate: bool = False) -> None:
    """What "grid lost now" at the plan's rate produces: readings on battery from LOST, SoC
    falling linearly. The device's remain_time_min is whole minutes, rounded up, so it reaches
    the threshold when the true runtime does."""
    rate = supply.rate_pct_per_min
    rows = []
    for t in range(LOST, until + 1, every):
        soc = supply.soc - rate * (t - LOST) / 60
        remain = math.ceil(soc / rate) if device_estimate else None
        rows.append((t, soc, False, supply.watts_out, remain))
    readings(db, supply.device_sn, rows)


def run_worker(db, settings: PolicySettings, until: int) -> dict[str, dict]:
    """Step the real worker every STEP seconds from the loss; each agent's shutdown as sent."""
    worker = Worker(db, settings, link=None)
    for t in range(LOST, until + 1, STEP):
        worker.step(at(t))
    rows = db.execute(
        "SELECT c.agent_id, c.issued_at, c.delay_sec, e.trigger,"
        "       coalesce(c.first_sent_at, c.issued_at) + make_interval(secs => c.delay_sec)"
        "  FROM commands c JOIN policy_events e"
        "    ON e.command_id = c.id AND e.kind = 'trigger_fired'"
        " WHERE c.action = 'shutdown'").fetchall()
    return {agent: {"issued_at": issued, "delay_sec": delay, "trigger": trigger,
                    "commit_at": commit}
            for agent, issued, delay, trigger, commit in rows}


def by_agent(the_plan: plan.Plan, agent: str) -> plan.AgentPlan:
    (found,) = [a for a in the_plan.agents if a.agent_id == agent]
    return found


def trigger(supply: plan.SupplyPlan, name: str) -> plan.Trigger:
    (found,) = [t for t in supply.triggers if t.name == name]
    return found


def assert_worker_followed(planned: plan.AgentPlan, sent: dict) -> None:
    assert sent["trigger"] == planned.trigger
    assert abs(sent["issued_at"] - planned.shutdown_at) <= ONE_STEP, (
        f"worker sent at {sent['issued_at']}, plan said {planned.shutdown_at}")
    assert sent["delay_sec"] == planned.delay_sec
    assert abs(sent["commit_at"] - planned.commit_at) <= ONE_STEP


# -- the plan against the worker --------------------------------------------------------------
def test_soc_trigger_fires_when_the_plan_says(db, tmp_path):
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent]}, devices={SN: {"capacity_wh": 1000}},
                         soc_min=30)
    on_grid(db, SN, soc=40, watts=1200)  # 1200 W from 1000 Wh: 2 %/min

    planned = by_agent(plan.build(db, settings, at(LOST)), agent)
    (supply,) = planned.supplies
    assert supply.rate_pct_per_min == pytest.approx(2.0)
    assert "1200 W out of 1000 Wh" in supply.rate_source
    assert trigger(supply, "soc").met_at == at(LOST + 300)  # 40 % -> 30 % at 2 %/min
    assert planned.trigger == "soc" and planned.exact
    assert planned.shutdown_at == at(LOST + 300 + 60)  # plus the debounce
    assert planned.commit_at == at(LOST + 360 + 120)
    assert planned.abort_by == at(LOST + 480 - 30)
    assert trigger(supply, "runtime").state == trigger(supply, "battery_time").state == "off"

    grid_lost_as_planned(db, supply, until=LOST + 400)
    sent = run_worker(db, settings, until=LOST + 400)
    assert_worker_followed(planned, sent[agent])


@pytest.mark.parametrize("back", [-STEP, 0], ids=["before_the_deadline", "at_the_deadline"])
def test_abort_deadline_in_the_plan_is_the_workers(db, tmp_path, back):
    """Grid back one evaluation before the plan's abort deadline: the shutdown is cancelled;
    back at the deadline: it has held the confirmation period only at the commit point, too
    late, and the worker records power back after the commit."""
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent]}, devices={SN: {"capacity_wh": 1000}},
                         soc_min=30)
    on_grid(db, SN, soc=40, watts=1200)
    planned = by_agent(plan.build(db, settings, at(LOST)), agent)
    (supply,) = planned.supplies
    assert planned.abort_by == planned.commit_at - timedelta(seconds=30)

    grid_back = int((planned.abort_by - at(0)).total_seconds()) + back
    commit = int((planned.commit_at - at(0)).total_seconds())
    grid_lost_as_planned(db, supply, until=grid_back - STEP)
    readings(db, SN, [(t, 30, True, 1200, None) for t in range(grid_back, commit + 60, STEP)])
    run_worker(db, settings, until=commit + 30)

    aborts = db.execute("SELECT count(*) FROM commands WHERE action = 'abort'").fetchone()[0]
    late = db.execute("SELECT count(*) FROM policy_events"
                      " WHERE kind = 'power_returned_after_commit'").fetchone()[0]
    assert (aborts, late) == ((1, 0) if back < 0 else (0, 1))


@pytest.mark.parametrize("device_estimate", [True, False],
                         ids=["device_remain_time", "slope_projection"])
def test_runtime_trigger_fires_when_the_plan_says(db, tmp_path, device_estimate):
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent]}, devices={SN: {"capacity_wh": 1000}},
                         soc_min=5, runtime_min=10)
    on_grid(db, SN, soc=40, watts=1200)  # 20 min of runtime at 2 %/min

    planned = by_agent(plan.build(db, settings, at(LOST)), agent)
    (supply,) = planned.supplies
    assert trigger(supply, "runtime").met_at == at(LOST + 600)  # 20 min left -> 10 min
    assert trigger(supply, "soc").fires_at > trigger(supply, "runtime").fires_at
    assert planned.trigger == "runtime"
    assert planned.shutdown_at == at(LOST + 660)

    grid_lost_as_planned(db, supply, until=LOST + 700, device_estimate=device_estimate)
    sent = run_worker(db, settings, until=LOST + 700)
    assert_worker_followed(planned, sent[agent])


def test_time_on_battery_limit_fires_when_the_plan_says(db, tmp_path):
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent]}, devices={SN: {"capacity_wh": 2000}},
                         agents={agent: {"max_on_battery_sec": 300}})
    on_grid(db, SN, soc=90, watts=600)  # 0.5 %/min: SoC would take 150 min

    planned = by_agent(plan.build(db, settings, at(LOST)), agent)
    (supply,) = planned.supplies
    assert planned.trigger == "battery_time"
    assert planned.shutdown_at == at(LOST + 300)  # no debounce on a time limit
    assert trigger(supply, "soc").fires_at == at(LOST + 150 * 60 + 60)

    grid_lost_as_planned(db, supply, until=LOST + 340)
    sent = run_worker(db, settings, until=LOST + 340)
    assert_worker_followed(planned, sent[agent])


def test_lower_tier_goes_first_in_the_plan_and_in_the_worker(db, tmp_path):
    early, late = agent_name("pc"), agent_name("nas")
    settings = configure(db, tmp_path, {SN: [late, early]}, devices={SN: {"capacity_wh": 1000}},
                         agents={early: {"tier": 0, "soc_threshold": 36},
                                 late: {"tier": 1, "soc_threshold": 30,
                                        "shutdown_delay_sec": 300}})
    on_grid(db, SN, soc=40, watts=1200)

    the_plan = plan.build(db, settings, at(LOST))
    assert [a.agent_id for a in the_plan.agents] == [early, late]
    assert the_plan.notes == [], "the tiers are in order"
    first, second = the_plan.agents
    assert first.shutdown_at == at(LOST + 120 + 60)  # 40 % -> 36 % takes 2 min
    assert second.shutdown_at == at(LOST + 300 + 60)  # 40 % -> 30 % takes 5 min
    assert second.commit_at == second.shutdown_at + timedelta(seconds=300)

    grid_lost_as_planned(db, first.supplies[0], until=LOST + 400)
    sent = run_worker(db, settings, until=LOST + 400)
    assert sent[early]["issued_at"] < sent[late]["issued_at"]
    assert_worker_followed(first, sent[early])
    assert_worker_followed(second, sent[late])


def test_dead_on_battery_contingency_matches_the_worker(db, tmp_path):
    """The cloud dies with the grid: one reading on battery, then silence."""
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent]}, devices={SN: {"capacity_wh": 1000}})
    on_grid(db, SN, soc=80, watts=100)

    planned = by_agent(plan.build(db, settings, at(LOST)), agent)
    dead = trigger(planned.supplies[0], "dead_on_battery")
    assert dead.state == "contingent" and dead.fires_at == at(LOST + 600)
    assert planned.trigger == "soc", "while telemetry flows, the timeline ignores the contingency"

    readings(db, SN, [(LOST, 80, False, 100, None)])
    sent = run_worker(db, settings, until=LOST + 620)
    assert sent[agent]["trigger"] == "dead_on_battery"
    assert abs(sent[agent]["issued_at"] - dead.fires_at) <= ONE_STEP


def test_host_needing_one_of_two_supplies_goes_when_the_second_fires(db, tmp_path):
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent], SN2: [agent]},
                         devices={SN: {"capacity_wh": 1000}, SN2: {"capacity_wh": 1000}},
                         agents={agent: {"min_supplies": 1}}, soc_min=30, runtime_min=10)
    on_grid(db, SN2, soc=60, watts=2400)  # 4 %/min: 15 min left, runtime at 10 min after 5 min
    on_grid(db, SN, soc=40, watts=600)  # 1 %/min: 40 % -> 30 % after 10 min

    planned = by_agent(plan.build(db, settings, at(LOST)), agent)
    assert planned.needed == 1
    assert planned.shutdown_at == at(LOST + 600 + 60), "when the second supply fails"
    # The worker's reason names the supply that failed first.
    assert (planned.trigger, planned.station) == ("runtime", SN2)
    assert planned.decided_by == f"soc on {SN} leaves 0 of 2 supplies healthy, 1 needed"

    for supply in planned.supplies:
        grid_lost_as_planned(db, supply, until=LOST + 700)
    sent = run_worker(db, settings, until=LOST + 700)
    assert_worker_followed(planned, sent[agent])


# -- what the plan says when it cannot know -----------------------------------------------------
def test_unknown_discharge_is_said_not_invented(db, tmp_path):
    agent, limited = agent_name(), agent_name("pc")
    settings = configure(db, tmp_path, {SN: [agent, limited]},
                         agents={limited: {"max_on_battery_sec": 900}})
    on_grid(db, SN, soc=40, watts=1200)  # a load, but no capacity_wh and no outage on record

    the_plan = plan.build(db, settings, at(LOST))
    unknown = by_agent(the_plan, agent)
    (supply,) = unknown.supplies
    assert supply.rate_pct_per_min is None and "no capacity_wh" in supply.rate_source
    assert trigger(supply, "soc").state == "unknown" and trigger(supply, "soc").fires_at is None
    assert unknown.shutdown_at is None and unknown.commit_at is None
    assert "cannot say when" in unknown.notes[0]

    bounded = by_agent(the_plan, limited)
    assert bounded.shutdown_at == at(LOST + 900) and not bounded.exact
    assert "at the latest" in bounded.notes[0]
    text = plan.render(the_plan)
    assert "at the latest +15m00s" in text and "cannot say when" in text


def test_discharge_of_the_last_outage_is_used_when_capacity_is_unknown(db, tmp_path):
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent]})
    # An outage draining 1 %/min, five minutes of grid, a second outage draining 3 %/min, and
    # the grid again: both outages lie within one slope window, the recharge between them.
    readings(db, SN, [(t - 1000, 70 - t / 60, False, None, None) for t in range(0, 300, 10)]
             + [(t - 700, 80, True, None, None) for t in range(0, 300, 10)]
             + [(t - 400, 90 - 3 * t / 60, False, None, None) for t in range(0, 120, 10)])
    on_grid(db, SN, soc=60, watts=None)

    (supply,) = by_agent(plan.build(db, settings, at(LOST)), agent).supplies
    assert supply.rate_pct_per_min == pytest.approx(3.0, rel=1e-3), "the last stretch only"
    assert supply.rate_source.startswith("measured on battery until")
    met = trigger(supply, "soc").met_at
    assert abs(met - at(LOST + (60 - 15) / 3 * 60)) < timedelta(seconds=1)


def test_broken_tier_order_is_named(db, tmp_path):
    important, spare = agent_name("db"), agent_name("pc")
    settings = configure(db, tmp_path, {SN: [important, spare]},
                         devices={SN: {"capacity_wh": 1000}},
                         agents={important: {"tier": 1, "soc_threshold": 50},
                                 spare: {"tier": 0, "soc_threshold": 20}})
    on_grid(db, SN, soc=60, watts=1200)
    the_plan = plan.build(db, settings, at(LOST))
    assert [a.agent_id for a in the_plan.agents] == [important, spare]
    assert the_plan.notes == [f"tier order broken: {important} (tier 1) goes before "
                              f"{spare} (tier 0)"]


# -- it touches nothing ------------------------------------------------------------------------
def table_counts(db) -> dict[str, int]:
    tables = [r[0] for r in db.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()]
    return {t: db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def reader_url(db_url: str) -> str:
    parts = urlsplit(db_url)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{READONLY_USER}:{READONLY_PASSWORD}@{host}"))


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "table"])
def test_plan_command_runs_on_the_read_only_role_and_changes_nothing(
        db, db_url, tmp_path, monkeypatch, capsys, as_json):
    agent = agent_name()
    settings = configure(db, tmp_path, {SN: [agent]}, devices={SN: {"capacity_wh": 1000}},
                         soc_min=30)
    on_grid(db, SN, soc=40, watts=1200)
    before = table_counts(db)

    # The role Grafana uses: any write, even one the plan tried by mistake, would fail.
    monkeypatch.setenv("DATABASE_URL", reader_url(db_url))
    for name, value in (("POLICY_SOC_MIN", "30"), ("POLICY_DEBOUNCE_SEC", "60"),
                        ("POLICY_GRID_CONFIRM_SEC", "30"), ("POLICY_SHUTDOWN_DELAY_SEC", "120"),
                        ("POLICY_CONFIG_FILE", str(settings.config_file)),
                        ("DEVICE_TO_AGENTS_JSON", json.dumps({SN: [agent]}))):
        monkeypatch.setenv(name, value)
    argv = ["plan", "--at", at(LOST).isoformat()] + (["--json"] if as_json else [])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out

    assert table_counts(db) == before
    if as_json:
        (printed,) = json.loads(out)["agents"]
        assert printed["agent_id"] == agent and printed["trigger"] == "soc"
        assert printed["shutdown_at"] == at(LOST + 360).isoformat()
        assert printed["commit_at"] == at(LOST + 480).isoformat()
    else:
        assert f"{agent} (tier 0, needs 1 of 1 supplies)" in out
        assert "shutdown command  +6m00s" in out and "commit point      +8m00s" in out
        assert "cancelled if the grid is back before +7m30s" in out
        assert "2.00 %/min (1200 W out of 1000 Wh)" in out

