"""Receipts for input the coordinator rejects before it reaches a round, rate-limited per device.

Theory of operation
-------------------
Every ending of an update gets a receipt (docs/protocol.md, "ShardAck"). The round's own
receipts (``partial``, ``accepted``, ... and ``rejected`` for an update that does not fit
the round or does not verify) are built by the core from the assembler's outcome. This
module covers what fails earlier: a payload on ``up/{device}/...`` or ``status/{device}``
that does not decode, sits on a topic it does not match, or comes from a device the round
did not select. The topic names the device (the broker ACL ties the id in a topic to the
MQTT user), so that device is told, on its ack topic, with a ``rejected`` receipt whose
reason names the field (``"{field}:{code}"``, :mod:`fedsync.receipts`):

* about an update topic: the topic's round and update id, the coordinator's shard count
  (the payload's own may not be readable), nothing held;
* about a status: update id :data:`fedsync.receipts.STATUS_UPDATE_ID`, the round the
  manifest names, ``count`` 1, nothing held.

A digest mismatch gets no receipt: the shard was damaged on the way, is not held, and
the device's resend timer sends it again (that cures it; a final receipt would not).

A broken device could make the coordinator answer each of thousands of bad payloads, so
at most one such receipt per device per ``interval`` seconds goes out (:meth:`answer`);
the others are counted in the core's ``stats.receipts_suppressed``.
The limiter keeps the time of each device's last receipt; when it tracks more than
``max_tracked`` devices it forgets those whose interval has passed (and, if that many are
still recent, sends nothing more until some are not), so a flood of names cannot grow it
without bound. No clock is read: ``now`` is an argument.
"""

from __future__ import annotations

from fedsync.coordinator.events import CoordinatorStats
from fedsync.errors import ProtocolError
from fedsync.messages import ShardAck
from fedsync.receipts import STATUS_UPDATE_ID, rejection
from fedsync.topics import Topics

REJECT_RECEIPT_INTERVAL = 1.0  # seconds: at most one receipt about rejected input per device
MAX_ROUND_ID = 2**53  # a round id a receipt can carry (docs/protocol.cddl, round-id)
NO_RECEIPT = ("digest",)  # codes the device's resend timer cures: no receipt


class InputReceipts:
    """Builds and rate-limits the receipts described in the module docstring.

    >>> r = InputReceipts(Topics("t"), shard_count=4)
    >>> ack = r.for_input("fedsync/t/up/dev-1/3/u1/0", ProtocolError("v", "schema_version"), round_id=3)
    >>> (ack.device, ack.round_id, ack.update_id, ack.count, ack.status, ack.reason)
    ('dev-1', 3, 'u1', 4, 'rejected', 'v:schema_version')
    >>> r.allow("dev-1", now=10.0), r.allow("dev-1", now=10.5), r.allow("dev-1", now=11.0)
    (True, False, True)
    """

    def __init__(self, topics: Topics, shard_count: int, stats: CoordinatorStats | None = None, *,
                 interval: float = REJECT_RECEIPT_INTERVAL, max_tracked: int = 4096) -> None:
        self.topics = topics
        self.stats = stats if stats is not None else CoordinatorStats()  # counts receipts_suppressed
        self.shard_count = shard_count
        self.interval = interval
        self.max_tracked = max_tracked
        self._last: dict[str, float] = {}  # device -> when its last receipt about rejected input went out

    def for_input(self, topic: str, err: ProtocolError, round_id: int) -> ShardAck | None:
        """The receipt for input on ``topic`` that failed with ``err``, or None: the topic names
        no device, or the error is one the device's resend cures. ``round_id``: the round the
        manifest names (for a status)."""
        if err.reason in NO_RECEIPT:
            return None
        reason = rejection(err.field, err.reason)
        try:
            if topic.startswith(self.topics.root + "/up/"):
                where = self.topics.parse_up(topic)
                if where.device == "coordinator" or where.round_id > MAX_ROUND_ID:
                    return None
                count = self.shard_count
                return ShardAck(where.device, where.round_id, where.update_id, count, bytes((count + 7) // 8),
                                "rejected", reason)
            device = self.topics.parse_status(topic)
        except ProtocolError:
            return None  # the topic itself is malformed: it names nobody
        if device == "coordinator":
            return None
        return ShardAck(device, round_id, STATUS_UPDATE_ID, 1, b"\x00", "rejected", reason)

    def answer(self, topic: str, err: ProtocolError, round_id: int, now: float) -> ShardAck | None:
        """:meth:`for_input`'s receipt if the device's limit lets it go out now, else None (counted)."""
        ack = self.for_input(topic, err, round_id)
        if ack is None or self.allow(ack.device, now):
            return ack
        self.stats.receipts_suppressed += 1
        return None

    def allow(self, device: str, now: float) -> bool:
        """Whether a receipt to ``device`` may go out now (then it is recorded as sent)."""
        last = self._last.get(device)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) >= self.max_tracked:
            self._last = {d: t for d, t in self._last.items() if now - t < self.interval}
            if len(self._last) >= self.max_tracked:
                return False  # that many devices answered within one interval: a flood of names
        self._last[device] = now
        return True
