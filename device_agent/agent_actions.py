"""What the device agent core asks its adapter to do besides publish and subscribe.

The records :class:`fedsync.device_agent.agent.AgentCore` returns among its actions
(``device_agent/service.py`` and the lab's swarm carry them out): train, persist or clear
the outbox, report the end of a campaign or the start of a new one, log a note. They hold
no behaviour. ``fedsync.device_agent.agent`` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, slots=True)
class Train:
    """Adapter: run the trainer on ``params`` and call ``on_trained``."""

    round_id: int
    params: dict[str, np.ndarray]
    hyper: dict[str, float]


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """A finished update as persisted on the device before upload (see outbox.py)."""

    round_id: int
    update_id: str
    qos: int
    topics: tuple[str, ...]
    payloads: tuple[bytes, ...]
    retries: int = 0


@dataclass(frozen=True, slots=True)
class SaveOutbox:
    """Adapter: persist this record durably before carrying out the actions after it."""

    record: OutboxRecord


@dataclass(frozen=True, slots=True)
class ClearOutbox:
    """Adapter: the update of this round needs no more sending; delete it."""

    round_id: int


@dataclass(frozen=True, slots=True)
class Finished:
    """The federation has finished; the adapter may stop."""


@dataclass(frozen=True, slots=True)
class CampaignStarted:
    """A new campaign began after one this agent saw finish (or lost track of)."""


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth a log line (event name plus fields)."""

    event: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DuplicateDevice:
    """Adapter: another live process publishes this device's status (the same device id
    twice). ``ours_newer``: this process started after the other one, so it is the one to
    stop (without touching the status or the last will, which are the other's now)."""

    other_incarnation: int
    ours_newer: bool
