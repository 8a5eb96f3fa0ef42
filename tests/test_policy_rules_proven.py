"""Scenarios that prove rules no other test could tell apart from their absence: each one fails
when its rule is removed from the code (the mutations in mutations/rules.toml, docs/mutation.md).
They use the harness of test_policy_scenarios: real TimescaleDB, real Mosquitto, a worker
stepped along a controlled clock."""

from __future__ import annotations

from tests import test_policy_scenarios as scenarios
from tests.test_policy_scenarios import SN, SN2, agent_name, at, insert, series

# The scenarios' fixtures (pytest finds them by these names): the worker under test on its
# clock, and the agents' side of the broker.
make_policy = scenarios.make_policy
agents = scenarios.agents

# These scenarios run past the default command TTL without an agent answering; a long TTL
# keeps the re-issue of an expired shutdown (proven on its own) out of them.
TTL = 3600


def test_soc_hovering_just_above_threshold_does_not_restart_debounce(db, make_policy, agents):
    """S5 hysteresis. A station that reports whole percents, or whose weakest module flips,
    shows a SoC jittering around the threshold: 15, 16, 15, 16 %. A reading one percent above
    the threshold is inside the clear margin: the condition holds, and the shutdown comes one
    debounce window after the first low reading, not never."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 40, True)
           + series(60, 400, 10, lambda t: 15 if t % 20 == 0 else 16, False))
    policy = make_policy({SN: [agent]}, soc_min=15, soc_margin=5, debounce_sec=60,
                         command_ttl_sec=TTL)
    policy.run_until(400)
    assert policy.first_command_time() == at(120)
    assert [e[1] for e in policy.events("trigger_fired")] == ["soc"]


def test_runtime_hovering_just_above_threshold_does_not_restart_debounce(db, make_policy,
                                                                         agents):
    """S5 hysteresis for the runtime trigger: the device's estimate flickering between 20 and
    21 minutes (threshold 20, margin 2) is a low runtime, not a recovery."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 80, True)
           + series(60, 400, 10, 80, False, remain=lambda t: 20 if t % 20 == 0 else 21))
    policy = make_policy({SN: [agent]}, runtime_min=20, runtime_margin=2, debounce_sec=60,
                         command_ttl_sec=TTL)
    policy.run_until(400)
    assert policy.first_command_time() == at(120)
    assert [e[1] for e in policy.events("trigger_fired")] == ["runtime"]


def test_rearm_needs_soc_above_restart_level(db, make_policy, agents):
    """S8 re-arm. After a shutdown the grid comes back for longer than the cooldown, but the
    battery only recharges to 40 %, below the restart level (POLICY_REARM_SOC 50): the outage
    episode is not over, so losing the grid again is the same episode and sends no second
    shutdown."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 14, True) + series(60, 300, 10, 14, False)
           + series(310, 700, 10, 40, True) + series(710, 900, 10, 14, False))
    policy = make_policy({SN: [agent]}, soc_min=15, rearm_soc=50, cooldown_sec=300,
                         command_ttl_sec=TTL)
    policy.run_until(900)
    assert len(policy.commands("shutdown")) == 1
    episodes = [e for e in policy.events("condition_started") if e[1] == "episode"]
    assert len(episodes) == 1, "the second grid loss must not open a new episode"


def test_dead_supply_counts_as_unhealthy_for_a_host_that_needs_one(db, make_policy, agents,
                                                                   tmp_path):
    """S9. A host on two stations that needs only one: the first station goes silent while on
    grid (dead, an alert and no trigger), then the second runs low on battery. The silent one
    is no supply at all: once it is dead, no healthy supply is left and the host goes down."""
    agent = agent_name()
    config = tmp_path / "policy.yaml"
    config.write_text(f"agents:\n  {agent}:\n    min_supplies: 1\n")
    insert(db, SN, series(0, 60, 10, 80, True))  # last reading at 60 s: dead after 660 s
    insert(db, SN2, series(0, 50, 10, 80, True) + series(60, 900, 10, 14, False))
    policy = make_policy({SN: [agent], SN2: [agent]}, config_file=config, command_ttl_sec=TTL)
    policy.run_until(900)
    assert policy.first_command_time() == at(665)
    reason = agents.commands(agent, wait_for=1)[0]["payload"]["reason"]
    assert "healthy supplies 0 < 1" in reason


def test_supply_that_never_reported_counts_as_unhealthy(db, make_policy, agents, tmp_path):
    """S9. A station configured as a supply that has never sent a reading (unknown) is not a
    healthy supply: with the other one low on battery, the host goes down after the debounce."""
    agent = agent_name()
    config = tmp_path / "policy.yaml"
    config.write_text(f"agents:\n  {agent}:\n    min_supplies: 1\n")
    insert(db, SN2, series(0, 50, 10, 80, True) + series(60, 400, 10, 14, False))
    policy = make_policy({SN: [agent], SN2: [agent]}, config_file=config, command_ttl_sec=TTL)
    policy.run_until(400)
    assert policy.first_command_time() == at(120)


def test_worker_started_late_names_the_trigger_that_fired_first(db, make_policy, agents):
    """S4 first one wins. A worker started well into an outage finds two triggers past their
    moment: SoC (since 120 s) and time on battery (since 360 s). The shutdown names the one
    that fired first, not whichever sorts first."""
    agent = agent_name()
    insert(db, SN, series(0, 50, 10, 80, True) + series(60, 500, 10, 14, False))
    policy = make_policy({SN: [agent]}, soc_min=15, max_on_battery_sec=300,
                         command_ttl_sec=TTL)
    policy.t = 400  # the first evaluation
    policy.run_until(400)
    assert [e[1] for e in policy.events("trigger_fired")] == ["soc"]
    assert agents.commands(agent, wait_for=1)[0]["payload"]["reason"].startswith("soc_min 14.0")
