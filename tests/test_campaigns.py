"""Standing fleets: agents that saw a campaign finish take part in the next one.

Scenarios on the sans-IO cores over the in-memory broker of tests/sim.py. A second
campaign is a new coordinator core (new incarnation, fresh state) on the same topic
tree, with the same agent cores that never restarted.
"""

from __future__ import annotations

import numpy as np

from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.device_agent.agent import CampaignStarted, Finished, Note
from fedsync.device_agent.agent_state import AgentState
from fedsync.messages import RoundManifest, decode
from tests.sim import Sim, offset_trainer

DEVICES = ["pi-kitchen", "pi-garage", "pi-shed"]
SAMPLES = {"pi-kitchen": 10, "pi-garage": 30, "pi-shed": 60}


def _sim(rounds: int) -> Sim:
    sim = Sim(DEVICES, RoundPolicy(rounds=rounds, target=3, quorum=3, shard_values=5))
    sim.trainers = {d: offset_trainer(1.0, SAMPLES[d]) for d in DEVICES}
    return sim


def _new_campaign(sim: Sim, rounds: int, incarnation: int) -> None:
    """Replace the coordinator by a fresh one (its own initial model, round ids from 1)."""
    sim.coord = CoordinatorCore(sim.topics, sim.params, RoundPolicy(rounds=rounds, target=3, quorum=3, shard_values=5),
                                hyper={"lr": 0.1}, incarnation=incarnation, seed=0)
    for d in DEVICES:  # the new coordinator learns presence from the retained statuses
        sim.queue.append(("coordinator", sim.topics.status(d), sim.retained[sim.topics.status(d)]))
    sim.run("coordinator", sim.coord.start(sim.now))
    sim.settle()


def _actions_of(sim: Sim, kind) -> list:
    return [e for e in sim.events if isinstance(e, kind)]


def test_agents_that_saw_a_campaign_finish_join_the_next_one_without_a_restart():
    sim = _sim(rounds=3)
    sim.start()
    sim.settle()
    assert [c.outcome for c in sim.closed()] == ["committed"] * 3
    assert sim.finished == set(DEVICES)
    assert {d: a.state for d, a in sim.agents.items()} == dict.fromkeys(DEVICES, "finished")

    sim.events.clear()
    _new_campaign(sim, rounds=2, incarnation=2)
    closed = sim.closed()
    assert [(c.round_id, c.outcome, c.accepted) for c in closed] == [(1, "committed", tuple(sorted(DEVICES))),
                                                                     (2, "committed", tuple(sorted(DEVICES)))]
    # Every agent started the new campaign exactly once (the sim keeps adapter actions as events).
    notes = [e for e in sim.events if isinstance(e, Note) and e.event == "campaign_started"]
    assert [n.fields["reason"] for n in notes] == ["previous campaign finished"] * 3
    assert len(_actions_of(sim, CampaignStarted)) == 3
    assert sum(a.stats.rounds_accepted for a in sim.agents.values()) == 3 * 3 + 2 * 3
    assert np.allclose(sim.coord.vector, 2.0, atol=1e-6)  # two FedAvg steps of +1 from zeros
    assert decode(sim.retained[sim.topics.manifest], RoundManifest).incarnation == 2


def test_an_agent_that_missed_the_end_notices_the_coordinator_started_over():
    """The agent was away when campaign 1 finished; it sees campaign 2 at a round id it
    already worked on. Round ids and versions went back under a new incarnation: a new
    campaign, so its old job must not make it skip round 1."""
    sim = _sim(rounds=3)
    sim.start()
    sim.settle()
    agent = sim.agents["pi-kitchen"]
    job_before = agent.job
    assert job_before is not None and job_before.round_id == 3
    # Pretend it never saw the finished manifest: rewind it to its last open-round view.
    agent.manifest, agent.state = job_before, AgentState.DONE
    out = agent.on_message(sim.topics.manifest, sim.retained[sim.topics.manifest], sim.now)
    assert any(isinstance(a, Finished) for a in out) and not any(isinstance(a, CampaignStarted) for a in out)

    agent.manifest, agent.state = job_before, AgentState.DONE  # again away; now campaign 2 starts
    sim.events.clear()
    _new_campaign(sim, rounds=1, incarnation=7)
    assert [(c.round_id, c.outcome, len(c.accepted)) for c in sim.closed()] == [(1, "committed", 3)]
    assert agent.stats.rounds_accepted == 4
    reasons = sorted(n.fields["reason"] for n in _actions_of(sim, Note) if n.event == "campaign_started")
    assert reasons == ["previous campaign finished"] * 2 + ["the coordinator started over"]


def test_a_restarted_coordinator_of_the_same_campaign_is_not_a_new_campaign():
    """Same round id and model under a new incarnation (a crash and recovery): keep the job."""
    sim = _sim(rounds=2)
    sim.start()
    sim.settle()
    agent = sim.agents["pi-garage"]
    m = decode(sim.retained[sim.topics.manifest], RoundManifest)
    from dataclasses import replace

    from fedsync.messages import encode

    same_campaign = replace(m, incarnation=m.incarnation + 1)
    out = agent.on_message(sim.topics.manifest, encode(same_campaign), sim.now)
    assert not any(isinstance(a, CampaignStarted) for a in out)
    assert agent.state == "finished"
