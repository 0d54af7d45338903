"""The coordinator's round state machine, as data.

Theory of operation
-------------------
The coordinator runs one round at a time. Its phase is a :class:`RoundPhase`, and the
only way it changes is an event (:class:`RoundEvent`) looked up in
:data:`ROUND_TRANSITIONS`; a pair without a row raises
:class:`fedsync.errors.IllegalTransition` (re-opening a round while one is open, say).
Each event's value is its wording in the table of docs/protocol.md, "Round state machine
(coordinator)", and tests/test_state_tables.py checks that table against this one.

The guards (who is online, how many updates are in, the deadline, the mode's rules in
:mod:`fedsync.coordinator.policy`) are evaluated by the core, which then fires the event
they name; ``waiting`` is left again on the same call when enough devices are online, so
back-to-back rounds cost no extra tick. :class:`OpenRound` is what the core keeps while
the phase is ``open``: the manifest, the round's assembler and strategy, who was selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum

from fedsync.coordinator.aggregate import Strategy
from fedsync.coordinator.assembler import ShardAssembler
from fedsync.messages import RoundManifest
from fedsync.transitions import TransitionTable


class RoundPhase(StrEnum):
    """The coordinator's phase; the values are the manifest's ``state`` field."""

    WAITING = "waiting"  # no round open
    OPEN = "open"
    FINISHED = "finished"  # every round ran: agents may exit


class RoundEvent(Enum):
    """What moves the round state machine; the value is the docs table's "event / guard" cell."""

    OPEN = "tick, device online or model adopted, online >= max(`min_devices`, `quorum`)"
    RESUME = "restart with the journal of the round a crashed incarnation had open"
    TARGET = "update complete, accepted >= target (sync)"
    BUFFER_FULL = "update complete, the buffer holds target updates (async)"
    NO_LIVE_PENDING = ("update complete, device offline or tick: accepted >= quorum and no selected device "
                       "still alive and pending (sync, semisync)")
    DEADLINE_COMMIT = "tick, now >= deadline, accepted >= quorum (async: at least one update)"
    DEADLINE_ABANDON = "tick, now >= deadline, accepted < quorum (async: no update)"
    FINISH = "rounds committed == `rounds` (> 0)"


W, O, F = RoundPhase.WAITING, RoundPhase.OPEN, RoundPhase.FINISHED
ROUND_TRANSITIONS: TransitionTable[RoundPhase, RoundEvent] = TransitionTable("round", RoundPhase, [
    (W, RoundEvent.OPEN, O),
    (W, RoundEvent.RESUME, O),
    (O, RoundEvent.TARGET, W),
    (O, RoundEvent.BUFFER_FULL, W),
    (O, RoundEvent.NO_LIVE_PENDING, W),
    (O, RoundEvent.DEADLINE_COMMIT, W),
    (O, RoundEvent.DEADLINE_ABANDON, W),
    (W, RoundEvent.FINISH, F),
])

# The ``reason`` of the RoundClosed event (and of the round_committed/round_abandoned log line).
CLOSE_REASON = {RoundEvent.TARGET: "target", RoundEvent.BUFFER_FULL: "buffer_full",
                RoundEvent.NO_LIVE_PENDING: "quorum_no_live_pending", RoundEvent.DEADLINE_COMMIT: "deadline",
                RoundEvent.DEADLINE_ABANDON: "deadline"}


@dataclass(slots=True)
class OpenRound:
    """The round in hand while the phase is ``open`` (and, in async mode, a few closed ones
    whose late updates are still welcome)."""

    manifest: RoundManifest
    assembler: ShardAssembler
    strategy: Strategy
    selected: frozenset[str]
    metrics: list[dict[str, float]] = field(default_factory=list)
    buffered: int = 0  # async: updates folded into this round's buffer (from any recent round)
    contributors: list[str] = field(default_factory=list)  # devices whose updates were folded in
