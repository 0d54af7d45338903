"""The round rule's knobs (:class:`RoundPolicy`) and each synchronisation mode's rules.

Theory of operation
-------------------
The three modes (docs/protocol.md, "Synchronisation modes") differ in four decisions,
and each mode's answers are one :class:`ModeRules` value in :data:`MODES`, chosen once
when the core is built (``policy.rules``). The core asks the rules and never compares
mode names:

* who trains: ``ceil(target * (1 + over_select))`` online devices, or every one;
* when a round closes early: at ``target`` updates (sync), when its buffer holds
  ``target`` updates (async, FedBuff), or once nobody selected is alive and still
  pending (sync and semisync); every mode also closes at the deadline;
* whether it commits: ``quorum`` updates, or (async) at least one buffered update;
* which updates count and how much: async folds updates for any of the last
  ``max_staleness`` rounds, weighted ``num_samples * (1 + s) ** -staleness_exponent`` for
  an update ``s`` versions old; the others fold only the open round's, by ``num_samples``.

The rules are pure functions of counts: no state, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from fedsync.coordinator.round_state import RoundEvent


@dataclass(frozen=True, slots=True)
class ModeRules:
    """What one synchronisation mode decides (see the module docstring).

    >>> MODES["sync"].selection_size(online=8, target=4, over_select=0.5), MODES["semisync"].selection_size(8, 4, 0.5)
    (6, 8)
    >>> MODES["async"].commits(accepted=0, buffered=1, quorum=3), MODES["sync"].commits(0, 1, 3)
    (True, False)
    """

    name: str
    everyone_trains: bool  # every online device is selected (else ceil(target * (1 + over_select)))
    closes_at_target: bool  # the round commits the moment `target` updates are in
    fedbuff: bool  # a buffer of `target` updates from the last `max_staleness` rounds, staleness-weighted
    stops_waiting_for_the_dead: bool  # closes at quorum once no selected device is alive and pending

    def selection_size(self, online: int, target: int, over_select: float) -> int:
        """How many of the ``online`` devices a round selects."""
        if self.everyone_trains:
            return online  # the buffer (async) or the period (semisync) decides, not the selection
        return min(online, math.ceil(target * (1.0 + over_select)))

    def weight(self, num_samples: int, staleness: int, exponent: float) -> float:
        """The aggregation weight of an update ``staleness`` model versions old."""
        if not self.fedbuff:
            return num_samples  # the open round's own updates only: staleness is 0
        return num_samples * (1.0 + staleness) ** -exponent

    def commits(self, accepted: int, buffered: int, quorum: int) -> bool:
        """Whether a round closing with these counts commits (else it is abandoned)."""
        return buffered >= 1 if self.fedbuff else accepted >= quorum

    def early_close(self, accepted: int, buffered: int, target: int, quorum: int,
                    live_pending: Callable[[], bool]) -> RoundEvent | None:
        """The event that closes an open round before its deadline, or None: keep it open.

        ``live_pending()``: is a selected device still alive and without a settled update?"""
        if self.fedbuff:
            return RoundEvent.BUFFER_FULL if buffered >= target else None
        if self.closes_at_target and accepted >= target:
            return RoundEvent.TARGET
        if self.stops_waiting_for_the_dead and accepted >= quorum and not live_pending():
            return RoundEvent.NO_LIVE_PENDING
        return None


MODES: dict[str, ModeRules] = {
    "sync": ModeRules("sync", everyone_trains=False, closes_at_target=True, fedbuff=False,
                      stops_waiting_for_the_dead=True),
    "async": ModeRules("async", everyone_trains=True, closes_at_target=False, fedbuff=True,
                       stops_waiting_for_the_dead=False),
    "semisync": ModeRules("semisync", everyone_trains=True, closes_at_target=False, fedbuff=False,
                          stops_waiting_for_the_dead=True),
}


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    """The knobs of the round rule (all documented in docs/protocol.md)."""

    mode: str = "sync"  # "sync" | "async" (FedBuff) | "semisync" (fixed period): see MODES
    rounds: int = 20  # committed rounds (async: aggregations) to run; 0 = run forever
    target: int = 10  # accepted updates that commit a round at once (async: the buffer size K)
    quorum: int = 1  # accepted updates needed to commit at the deadline
    over_select: float = 0.0  # select ceil(target * (1 + over_select)) devices
    min_devices: int = 1  # online devices needed before a round opens
    round_timeout: float = 60.0  # seconds from manifest to deadline
    shard_values: int = 65536  # float32 values per shard (256 KiB raw)
    model_codec: str = "zstd"
    update_codec: str = "zstd"
    update_qos: int = 1
    resend_after: float | None = None  # manifest: seconds before devices re-send; None = absent (their own)
    offline_grace: float = 0.0  # seconds a selected device may be offline before the round stops waiting
    staleness_exponent: float = 0.5  # async: an update s versions old weighs (1 + s) ** -a
    max_staleness: int = 4  # async: updates more than this many versions old are refused

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"round.mode: {self.mode!r} is not one of {', '.join(MODES)}")

    @property
    def rules(self) -> ModeRules:
        """This mode's rules."""
        return MODES[self.mode]
