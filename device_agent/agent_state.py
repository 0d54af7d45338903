"""The device agent's state machine, as data.

Theory of operation
-------------------
An agent is in one :class:`AgentState`, and it changes only by an :class:`AgentEvent`
looked up in :data:`AGENT_TRANSITIONS` (``AgentCore._fire``); a pair without a row
raises :class:`fedsync.errors.IllegalTransition` instead of being ignored (restoring an
outbox into an agent that is already training, say). Each event's value is its wording
in docs/protocol.md, "Round state machine (device agent)", and
tests/test_state_tables.py checks that table against this one.

The agent core evaluates the guards (is this the round of the work in hand, is the
model cached, are retries left) and fires the event they name. Some events take two
steps on one call: a manifest for a new round drops the old work (``any -> idle``) and
starts the new job (``idle -> fetching`` or ``idle -> training``). ``finished`` keeps a
pending upload, so its late receipt still clears the outbox.
"""

from __future__ import annotations

from enum import Enum, StrEnum

from fedsync.transitions import ANY, TransitionTable


class AgentState(StrEnum):
    IDLE = "idle"  # no work in hand
    RESTORED = "restored"  # an update from the outbox of an earlier run, waiting for the manifest
    FETCHING = "fetching"  # subscribed to the round's model shards
    TRAINING = "training"  # the adapter is running the trainer
    UPLOADING = "uploading"  # shards published, waiting for the coordinator's receipt
    DONE = "done"  # this round's update is settled (accepted, duplicate, closed, refused, given up)
    FINISHED = "finished"  # the federation finished; a standing agent waits for the next campaign


class AgentEvent(Enum):
    """What moves the agent state machine; the value is the docs table's "event" cell."""

    RESTORE = "restart with an update in the outbox"
    RESUME = "manifest open for the restored update's round"
    SELECTED_CACHED = "manifest open, selected, model cached"
    SELECTED = "manifest open, selected"
    MODEL_OK = "last model shard, whole-model digest ok"
    MODEL_BAD = "last model shard, whole-model digest mismatch"
    DELTA_BAD = "last model-delta shard, digest mismatch"
    MODEL_SILENT = "`resend_after` without a new model shard"
    TRAINED = "training done, same round still open"
    FIT_FAILED = "training failed (the trainer raised, or its result or delta is not finite)"
    ACK_FINAL = "ack accepted / duplicate / closed / refused"
    ACK_REJECTED = "ack rejected, retryable reason, retries left"
    ACK_GIVEN_UP = "ack rejected, final reason or no retries left (restored, finished: any)"
    ACK_SILENT = "`resend_after` without ack progress"
    ACK_PARTIAL = "ack partial"
    OTHER_ROUND = "manifest for another round, or waiting"
    MANIFEST_FINISHED = "manifest finished"
    NEW_CAMPAIGN = "manifest open or waiting (a new campaign)"
    STARTED_OVER = "a new incarnation whose round id or model version is below the last one seen"


I, R, FE, T, U, D, FI = (AgentState.IDLE, AgentState.RESTORED, AgentState.FETCHING, AgentState.TRAINING,
                         AgentState.UPLOADING, AgentState.DONE, AgentState.FINISHED)
A = AgentEvent
AGENT_TRANSITIONS: TransitionTable[AgentState, AgentEvent] = TransitionTable("agent", AgentState, [
    (I, A.RESTORE, R),
    (R, A.RESUME, U),
    (I, A.SELECTED_CACHED, T),
    (I, A.SELECTED, FE),
    (FE, A.MODEL_OK, T),
    (FE, A.MODEL_BAD, I),
    (FE, A.DELTA_BAD, FE),
    (FE, A.MODEL_SILENT, FE),
    (T, A.TRAINED, U),
    (T, A.FIT_FAILED, D),
    ((U, R), A.ACK_FINAL, D),
    (FI, A.ACK_FINAL, FI),
    (U, A.ACK_REJECTED, U),
    ((U, R), A.ACK_GIVEN_UP, D),
    (FI, A.ACK_GIVEN_UP, FI),
    (U, A.ACK_SILENT, U),
    (U, A.ACK_PARTIAL, U),
    (R, A.ACK_PARTIAL, R),
    (FI, A.ACK_PARTIAL, FI),
    (ANY, A.OTHER_ROUND, I),
    (ANY, A.MANIFEST_FINISHED, FI),
    (FI, A.NEW_CAMPAIGN, I),
    (ANY, A.STARTED_OVER, I),
])
