"""Update shards lost between a device and the coordinator, and devices that flood.

Theory of operation
-------------------
A PUBACK from the broker is not delivery: mosquitto drops QoS 1/2 messages queued for a
client beyond ``max_queued_messages`` / ``max_queued_bytes`` without telling anyone, and
one flooding device can fill the coordinator's queue with its own messages so that honest
shards are the ones dropped. The receipts (``ack/{device}``) and the device's resend timer
repair that; this module makes it visible.

A device publishes an update's shards in index order, and the broker forwards one
publisher's messages to a subscriber in the order it received them (MQTT 3.1.1 §4.6
promises that per topic; mosquitto and amqtt keep one ordered queue per client, so it
holds across an update's shard topics too), so when shard ``j`` of an update arrives,
every shard ``i < j`` not yet seen was lost on the way. :class:`UploadGaps` keeps, per update (device, round, update id), the next index it
expects and the indices found missing; a missing shard that arrives later (a resend after
a partial receipt) is *filled*. It only sees the order of arrival, so a device that sends
out of order on purpose shows up here too. Memory: a bounded number of updates, least
recently seen dropped first.

:class:`UploadTally` counts each device's update messages between two round closes;
a device that sent more than ``FLOOD_FACTOR`` times the shards of an update (plus
``FLOOD_SLACK`` for resends) is named at the round's close, so the operator knows whom
to rate-limit at the broker (docs/operations.md).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

FLOOD_FACTOR = 4  # messages per shard of an update, per round, before a device counts as flooding
FLOOD_SLACK = 16


@dataclass(slots=True)
class _Update:
    next: int = 0
    missing: set[int] = field(default_factory=set)


class UploadGaps:
    """Shards found missing when a later shard of the same update arrived.

    >>> g = UploadGaps()
    >>> g.saw(("d", 1, "u"), 0), g.saw(("d", 1, "u"), 3), g.saw(("d", 1, "u"), 1)
    ((0, 0), (2, 0), (0, 1))
    >>> g.gaps, g.filled
    (2, 1)
    """

    def __init__(self, max_updates: int = 4096) -> None:
        self.max_updates = max_updates
        self.gaps = 0  # shards found missing
        self.filled = 0  # of those, shards that arrived later
        self._updates: OrderedDict[tuple, _Update] = OrderedDict()

    def saw(self, key: tuple, index: int) -> tuple[int, int]:
        """Shard ``index`` of update ``key`` arrived: ``(shards newly found missing, gaps filled)``."""
        u = self._updates.get(key)
        if u is None:
            u = self._updates[key] = _Update()
            if len(self._updates) > self.max_updates:
                self._updates.popitem(last=False)
        else:
            self._updates.move_to_end(key)
        if index in u.missing:
            u.missing.discard(index)
            self.filled += 1
            return 0, 1
        if index < u.next:
            return 0, 0  # a redelivery or a resend of a shard already seen
        new = index - u.next
        u.missing.update(range(u.next, index))
        u.next = index + 1
        self.gaps += new
        return new, 0


class UploadTally:
    """Update messages per device since the last round close (see the module docstring).

    >>> t = UploadTally()
    >>> for _ in range(40): t.saw("noisy", 2)
    >>> t.saw("calm", 2)
    >>> t.close_round()
    [('noisy', 40, 2)]
    """

    def __init__(self) -> None:
        self._messages: Counter = Counter()
        self._shards: dict[str, int] = {}

    def saw(self, device: str, shards: int) -> None:
        self._messages[device] += 1
        self._shards[device] = max(shards, self._shards.get(device, 0))

    def close_round(self) -> list[tuple[str, int, int]]:
        """``(device, messages, shards per update)`` for each device over the bound; then start afresh."""
        out = [(d, n, self._shards[d]) for d, n in sorted(self._messages.items())
               if n > FLOOD_FACTOR * self._shards[d] + FLOOD_SLACK]
        self._messages.clear()
        self._shards.clear()
        return out
