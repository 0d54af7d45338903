"""Both state machines are tables in code, docs/protocol.md shows the same tables, and a
transition the table does not have raises instead of being ignored.

The documents' tables are parsed (state, event, next; the actions column is prose) and
compared with ``ROUND_TRANSITIONS`` and ``AGENT_TRANSITIONS`` exactly, with a positive
control that a changed document is caught. Then each core is driven into a transition
its table lacks, and the error and the untouched state are asserted.
"""

from __future__ import annotations

import pathlib
import random
from dataclasses import replace

import numpy as np
import pytest

from fedsync.coordinator.core import CoordinatorCore, RoundOpened, RoundPolicy
from fedsync.coordinator.round_state import ROUND_TRANSITIONS, RoundEvent, RoundPhase
from fedsync.device_agent.agent import AgentCore, OutboxRecord
from fedsync.device_agent.agent_state import AGENT_TRANSITIONS, AgentEvent, AgentState
from fedsync.errors import IllegalTransition, ProtocolError
from fedsync.messages import PeerStatus, UpdateShard, encode
from fedsync.params import digest, shards_digest
from fedsync.topics import Topics
from fedsync.transitions import ANY, TransitionTable
from tests.sim import Sim, offset_trainer

PROTOCOL = pathlib.Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def doc_table(text: str, heading: str) -> list[tuple[str, str, str]]:
    """(state, event, next) of each row of the first table under ``heading``."""
    lines = text.split(heading, 1)[1].splitlines()
    rows: list[tuple[str, str, str]] = []
    for line in lines[1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.append((cells[0], cells[1], cells[2]))
        elif rows:
            break  # the table ended
    assert rows[0] == ("state", rows[0][1], "next") and set(rows[1][0]) <= {"-"}, rows[:2]
    return rows[2:]


def expand(rows: list[tuple[str, str, str]], states: list[str]) -> dict[tuple[str, str], str]:
    """The document's rows as {(state, event): next}: ``any`` is every state, ``a, b`` is each."""
    table: dict[tuple[str, str], str] = {}
    for origin, event, target in rows:
        for state in (states if origin == ANY else [s.strip() for s in origin.split(",")]):
            assert (state, event) not in table, f"two rows for ({state}, {event})"
            table[(state, event)] = target
    return table


def code_table(machine: TransitionTable) -> dict[tuple[str, str], str]:
    return {(s.value, e.value): n.value for (s, e), n in machine.table.items()}


MACHINES = [("## Round state machine (coordinator)", ROUND_TRANSITIONS, RoundPhase, RoundEvent),
            ("## Round state machine (device agent)", AGENT_TRANSITIONS, AgentState, AgentEvent)]


@pytest.mark.parametrize("heading,machine,states,events", MACHINES, ids=["coordinator", "agent"])
def test_the_documented_table_is_the_code_table(heading, machine, states, events):
    rows = doc_table(PROTOCOL.read_text(), heading)
    assert expand(rows, [s.value for s in states]) == code_table(machine)
    assert len(rows) == len(machine.rows)  # row for row, not only the same expansion
    # Every state and event is in the table: none is dead, none is missing from the document.
    assert {e for _s, e in machine.table} == set(events)
    assert {s for s, _e in machine.table} | set(machine.table.values()) == set(states)


def test_a_document_that_differs_from_the_code_is_caught():
    # positive control: one next state changed in the document's text
    text = PROTOCOL.read_text().replace("| fetching | last model shard, whole-model digest ok | training |",
                                        "| fetching | last model shard, whole-model digest ok | uploading |")
    assert text != PROTOCOL.read_text()
    doc = expand(doc_table(text, MACHINES[1][0]), [s.value for s in AgentState])
    diff = {k for k in doc.keys() | code_table(AGENT_TRANSITIONS).keys()
            if doc.get(k) != code_table(AGENT_TRANSITIONS).get(k)}
    assert diff == {("fetching", "last model shard, whole-model digest ok")}


def test_a_table_refuses_two_rows_for_one_pair_and_an_illegal_transition_is_not_bad_input():
    with pytest.raises(ValueError, match=r"two rows for \('idle', SELECTED\)"):
        TransitionTable("agent", AgentState, [(AgentState.IDLE, AgentEvent.SELECTED, AgentState.FETCHING),
                                              (ANY, AgentEvent.SELECTED, AgentState.IDLE)])
    # The cores catch ProtocolError (bad input, counted and dropped): an internal error must not be one.
    assert not issubclass(IllegalTransition, (ProtocolError, ValueError))
    with pytest.raises(IllegalTransition, match="round state machine: no transition from 'finished' on 'open'"):
        ROUND_TRANSITIONS.next(RoundPhase.FINISHED, RoundEvent.OPEN)


# -- driving each core into a transition its table lacks ---------------------------------------

def _core_with_open_round() -> tuple[CoordinatorCore, Topics]:
    topics = Topics("t")
    core = CoordinatorCore(topics, {"w": np.zeros(6, np.float32)}, RoundPolicy(rounds=2, target=1, quorum=1),
                           hyper={}, incarnation=1, seed=0)
    core.start(0.0)
    core.on_message(topics.status("dev-1"), encode(PeerStatus("dev-1", "online")), 1.0)
    assert core.phase is RoundPhase.OPEN and core.round is not None
    return core, topics


def test_resuming_a_round_while_one_is_open_raises_and_keeps_the_open_round():
    core, _ = _core_with_open_round()
    open_round = core.round
    with pytest.raises(IllegalTransition, match="no transition from 'open' on 'resume'"):
        core.resume_round(open_round.manifest, 2.0)
    assert core.round is open_round and core.phase is RoundPhase.OPEN


def test_resuming_a_round_after_the_campaign_finished_raises():
    sim = Sim(["dev-1", "dev-2"], RoundPolicy(rounds=1, target=2, quorum=2, shard_values=5))
    sim.trainers = {d: offset_trainer(1.0, 10) for d in sim.devices}
    sim.start()
    sim.settle()
    assert [c.outcome for c in sim.closed()] == ["committed"] and sim.coord.phase is RoundPhase.FINISHED
    (opened,) = [e for e in sim.events if isinstance(e, RoundOpened)]
    # A journal for a round on the current model: it passes the model check, only the phase is wrong.
    late = replace(opened.manifest, round_id=sim.coord.next_round_id, model_version=sim.coord.version)
    with pytest.raises(IllegalTransition, match="no transition from 'finished' on 'resume'"):
        sim.coord.resume_round(late, sim.now)
    assert sim.coord.round is None and sim.coord.finished


def _outbox_record(topics: Topics) -> OutboxRecord:
    data = b"\x00" * 8
    shard = UpdateShard("dev-1", 1, "u1", 0, 0, 1, 0, 2, 2, "raw", 5, digest(data), shards_digest([digest(data)]),
                        data, {}, b"")
    return OutboxRecord(1, "u1", 1, (topics.up("dev-1", 1, "u1", 0),), (encode(shard),))


def test_restoring_an_outbox_into_an_agent_that_is_already_fetching_raises_and_keeps_its_work():
    sim = Sim(["dev-1"], RoundPolicy(rounds=1, target=1, quorum=1, shard_values=5))
    sim.stalled.add("dev-1")
    sim.start()
    agent = sim.agents["dev-1"]
    while agent.state is not AgentState.FETCHING:
        assert sim.step()
    job = agent.job
    with pytest.raises(IllegalTransition, match="agent state machine: no transition from 'fetching' on 'restore'"):
        agent.restore(_outbox_record(sim.topics))
    assert agent.state is AgentState.FETCHING and agent.job is job and agent._upload is None


def test_an_agent_restores_only_when_idle():
    agent = AgentCore("dev-1", Topics("t"), random.Random(0))
    agent.restore(_outbox_record(Topics("t")))
    assert agent.state is AgentState.RESTORED
    with pytest.raises(IllegalTransition, match="no transition from 'restored' on 'restore'"):
        agent.restore(_outbox_record(Topics("t")))
