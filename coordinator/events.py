"""What the round core hands its adapter besides publishes, and what it is handed back.

Theory of operation
-------------------
:class:`fedsync.coordinator.core.CoordinatorCore` answers every input with a list of
actions. Most are :class:`fedsync.actions.Publish`; the others are here, frozen records
the adapter (coordinator/service.py) acts on in a fixed order:

* durability first: :class:`Checkpoint` (the committed state, written atomically),
  :class:`RoundOpened` (start a round journal headed by its manifest) and
  :class:`JournalShard` (append a newly held shard), all durable before any broker
  acknowledgement;
* then reports: :class:`RoundClosed`, :class:`RejectedInput` and :class:`DeviceOffline`
  are logged and passed to observers (metrics, the lab, an edge coordinator).

:class:`CoordinatorStats` are the core's counters (metric names in docs/protocol.md),
kept in the checkpoint. :func:`check_shard` is the part of ingest that needs no core
state (decode and digest), so the service runs it for a whole batch, half of it on a
second core, and hands the results back with each message. These records hold no
behaviour; the core's state lives in the core.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fedsync.errors import ProtocolError
from fedsync.messages import RoundManifest, UpdateShard, decode
from fedsync.params import digest
from fedsync.topics import is_name


@dataclass(frozen=True, slots=True)
class RoundClosed:
    """Emitted when a round ends; ``vector`` is the new global model on commit."""

    round_id: int
    outcome: str  # "committed" | "abandoned"
    model_version: int
    selected: tuple[str, ...]
    accepted: tuple[str, ...]
    started_at: float
    closed_at: float
    reason: str
    vector: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    total_samples: int = 0  # sum of the counted updates' num_samples (an edge's upstream weight)


@dataclass(slots=True)
class CoordinatorStats:
    """Counters the service exports as metrics (names in docs/protocol.md)."""

    updates_accepted: int = 0
    updates_refused: int = 0  # complete and verified, but refused by policy (norm bound, staleness, ...)
    duplicates_dropped: int = 0
    shards_accepted: int = 0
    shards_rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    rounds_committed: int = 0
    rounds_abandoned: int = 0
    devices_offline_detected: int = 0
    receipts_suppressed: int = 0  # receipts about rejected input not sent: the device's 1 s limit (receipts.py)
    bytes_in: int = 0
    bytes_out: int = 0

    def snapshot(self) -> dict[str, object]:
        """The counters as plain values, for a checkpoint."""
        out: dict[str, object] = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "rejected_by_reason"}
        out["rejected_by_reason"] = dict(self.rejected_by_reason)
        return out

    def load(self, snapshot: dict[str, object]) -> None:
        """Put back a :meth:`snapshot` (names this version does not know are skipped)."""
        for name, value in snapshot.items():
            if name == "rejected_by_reason":
                self.rejected_by_reason = Counter(value)
            elif name in self.__dataclass_fields__:
                setattr(self, name, value)


@dataclass(frozen=True, slots=True)
class CheckedShard:
    """An ``up/...`` payload decoded and its shard digest checked: the part of ingest
    that needs no coordinator state, and whose hashing runs without the GIL."""

    shard: UpdateShard | None  # None: the payload did not decode
    error: ProtocolError | None  # why it did not decode, or the digest mismatch of a decoded shard


def check_shard(payload: bytes) -> CheckedShard:
    """Decode an update payload and verify its shard digest; never raises."""
    try:
        shard = decode(payload, UpdateShard)
    except ProtocolError as err:
        return CheckedShard(None, err)
    if digest(shard.data) != shard.digest:
        return CheckedShard(shard, ProtocolError("digest", "digest",
                                                 f"{shard.device} round {shard.round_id} shard {shard.index}"))
    return CheckedShard(shard, None)


@dataclass(frozen=True, slots=True)
class JournalShard:
    """Adapter: make this shard durable before acknowledging it to the broker."""

    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class RoundOpened:
    """Adapter: start a new round journal headed by this manifest."""

    manifest: RoundManifest


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The committed state of a coordinator: everything but the open round."""

    version: int
    vector: np.ndarray
    next_round_id: int
    closed_through: int  # rounds up to this id are settled
    finished: bool
    recent: dict[int, dict[str, str]]
    stats: dict[str, object]
    # The strategy factory's state across rounds (fedsync.coordinator.aggregate.StatefulFactory): FedAvgM's
    # velocity, FedAdam's moments, dp_fedavg's noise generator; {} for the others and old checkpoints.
    strategy_state: dict[str, object] = field(default_factory=dict)
    # The update screen's memory (coordinator/hardening.py: the norms of the last accepted updates); {} for
    # a screen without state and old checkpoints.
    screen_state: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RejectedInput:
    """Event: a message was dropped (logged and counted by the service)."""

    topic: str
    field: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    """Event: a device that was online went offline (its last will, or a clean exit)."""

    device: str
    at: float


@dataclass(frozen=True, slots=True)
class WaitingForDevices:
    """Event: no round opens until ``needed`` devices are online; ``online`` are (reported once
    per change and every WAITING_REPEAT seconds while unchanged, so an operator sees why
    nothing happens; see :class:`WaitingNotice`)."""

    online: int
    needed: int


WAITING_REPEAT = 60.0  # seconds after which an unchanged waiting_for_devices is said again


class WaitingNotice:
    """Decides when a WaitingForDevices is news.

    The core finds the reason while it tries to open a round (:meth:`found`) and appends the
    event to its output once that output is complete (:meth:`news`), so that "no round
    opened" stays an empty list for its callers.

    >>> n = WaitingNotice()
    >>> n.found(WaitingForDevices(1, 3), 0.0); n.news(round_open=False)
    [WaitingForDevices(online=1, needed=3)]
    >>> n.found(WaitingForDevices(1, 3), 59.0); n.news(round_open=False)
    []
    >>> n.found(WaitingForDevices(1, 3), 60.0); n.news(round_open=False)
    [WaitingForDevices(online=1, needed=3)]
    """

    def __init__(self) -> None:
        self._found: tuple[WaitingForDevices, float] | None = None
        self._told: tuple[WaitingForDevices, float] | None = None

    def found(self, event: WaitingForDevices, now: float) -> None:
        self._found = (event, now)

    def round_opened(self) -> None:
        self._told = None  # the next wait is news whatever it says

    def news(self, *, round_open: bool) -> list:
        found, self._found = self._found, None
        if found is None or round_open:
            return []
        told = self._told
        if told is None or found[0] != told[0] or found[1] - told[1] >= WAITING_REPEAT:
            self._told = found
            return [found[0]]
        return []


def metric_fields(metrics: dict[str, float]) -> dict[str, float]:
    """A committed round's mean device metrics as log fields, each named ``mean_<key>``.

    Metric names come from devices (any text of up to 32 characters, docs/protocol.cddl); only
    those that are also valid names (``is_name``: letters, digits, ``_``, ``.``, ``-``) are
    logged, so a device cannot forge fields.

    >>> metric_fields({"train_loss": 0.25, "steps": 10.0, "a b=c": 1.0})
    {'mean_train_loss': 0.25, 'mean_steps': 10.0}
    """
    return {f"mean_{k}": v for k, v in metrics.items() if is_name(k)}


def mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    """Sample-weighted mean of the devices' reported metrics."""
    total = sum(m.get("num_samples", 1.0) for m in items)
    keys = {k for m in items for k in m if k != "num_samples"}
    return {k: sum(m.get(k, 0.0) * m.get("num_samples", 1.0) for m in items) / total for k in sorted(keys)} if total else {}
