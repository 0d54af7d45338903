"""One device id, one process: the agent's check on its own retained status.

Theory of operation
-------------------
Two processes started with the same device id take the broker session from each other
on every reconnect (MQTT 3.1.1 §3.1.4: the broker disconnects the older client), and
neither says why. Each agent publishes ``online`` on ``status/{device}`` with its
incarnation (the adapter's start time in microseconds) and subscribes to that topic.
Once its own ``online`` has come back, an ``online`` with another incarnation can only
come from another live process: before that echo, a retained status may still be an
earlier run's of this very agent. :class:`OwnStatus` then answers one
:class:`DuplicateDevice` per rival, saying whether this process started later (and so is
the one to stop). An incarnation 0 comes from an agent that does not check; it is
reported, never asked to stop.
"""

from __future__ import annotations

from fedsync.device_agent.agent_actions import DuplicateDevice
from fedsync.messages import PeerStatus


class OwnStatus:
    """What this agent has seen on its own status topic.

    >>> own = OwnStatus("dev-1", incarnation=20)
    >>> own.seen(PeerStatus("dev-1", "online", 10)), own.seen(PeerStatus("dev-1", "online", 20))
    (None, None)
    >>> own.seen(PeerStatus("dev-1", "online", 10))
    DuplicateDevice(other_incarnation=10, ours_newer=True)
    """

    def __init__(self, device_id: str, incarnation: int) -> None:
        self.device_id = device_id
        self.incarnation = incarnation  # 0: do not check
        self._echoed = False  # our own online status came back at least once
        self._rival = 0  # the other process's incarnation, once told

    def seen(self, s: PeerStatus) -> DuplicateDevice | None:
        if s.state != "online" or not self.incarnation or s.peer != self.device_id:
            return None
        if s.incarnation == self.incarnation:
            self._echoed = True
            return None
        if not self._echoed or s.incarnation == self._rival:
            return None
        self._rival = s.incarnation
        return DuplicateDevice(s.incarnation, ours_newer=0 < s.incarnation < self.incarnation)
