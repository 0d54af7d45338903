"""What the broker retains for the coordinator, checked against what it should retain.

Theory of operation
-------------------
Devices learn the round and the model only from retained messages: the manifest,
``model/{v}/{shard}`` and ``modeldelta/{b}/{v}/{shard}``. The broker's copy can differ
from the coordinator's state with no session flag saying so: mosquitto restarted from a
persistence file saved up to ``autosave_interval`` seconds before a ``kill -9`` brings
back an old manifest and an old model, has lost the newer ones, and still answers
``session_present=True``; a coordinator killed between its checkpoint and its publishes
leaves an old model, or a delta no manifest will name, retained.

:class:`RetainedLedger` remembers the last retained payload the coordinator published on
each of those topics (an empty payload, which deletes a retained message, deletes the
entry). :class:`RetainedAudit` is one check of the broker against it, run by the service
after every (re)connect:

1. the service subscribes to :meth:`RetainedLedger.filters`, then publishes a probe to
   itself (``coordinator/probe``, payload :attr:`RetainedAudit.token`);
2. every delivery with the RETAIN flag on those filters is passed to :meth:`observe`
   (MQTT 3.1.1 §3.3.1.3: the flag is set only on a delivery from the retained store,
   i.e. because of a new subscription, never on a live forward);
3. the probe comes back after the retained messages of the subscriptions made before it
   (the broker handles one client's packets in order), and :meth:`finish` returns the
   publishes that make the broker match the ledger: each entry the broker lacks or holds
   with other bytes, model shards first and the manifest last (a device must not read a
   manifest whose model is missing), then an empty retained payload for every model or
   delta topic the ledger does not hold. A manifest is replaced, never deleted.

Races with the round going on are harmless either way: a message published after the
subscription is republished once more, one cleared after it is cleared once more.

:class:`ClearedUploads` remembers the update topics on which the coordinator published an
empty retained payload to delete a device's retained upload, so that the broker's live
forward of that empty payload back to the coordinator (it is subscribed to ``up/#``) is
dropped instead of being counted as a malformed shard.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from fedsync.actions import Publish
from fedsync.topics import Topics

AUDIT_WAIT = 5.0  # seconds to wait for the audit's probe before deciding on what came


class RetainedLedger:
    """The coordinator's retained manifest, model and delta shards, as last published.

    >>> ledger = RetainedLedger(Topics("t"))
    >>> ledger.record(Publish("fedsync/t/model/0/0", b"m", 1, True)), ledger.record(Publish("fedsync/t/ack/d", b"a", 1, True))
    (True, False)
    >>> sorted(ledger.entries)
    ['fedsync/t/model/0/0']
    """

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.entries: dict[str, Publish] = {}
        root = topics.root
        self._prefixes = (root + "/model/", root + "/modeldelta/")

    def filters(self) -> list[str]:
        """The subscriptions an audit makes."""
        root = self.topics.root
        return [self.topics.manifest, root + "/model/#", root + "/modeldelta/#"]

    def tracks(self, topic: str) -> bool:
        return topic == self.topics.manifest or topic.startswith(self._prefixes)

    def record(self, p: Publish) -> bool:
        """Note a publish the service carried out; True if it is one the ledger tracks."""
        if not (p.retain and self.tracks(p.topic)):
            return False
        if p.payload:
            self.entries[p.topic] = p
        else:
            self.entries.pop(p.topic, None)
        return True


@dataclass(slots=True)
class AuditResult:
    """What one audit found and the publishes that repair it."""

    publishes: list[Publish]
    republished: int  # ledger entries the broker lacked or held with other bytes
    cleared: int  # retained model or delta topics the ledger does not hold
    observed: int  # retained messages the broker delivered


@dataclass(slots=True)
class RetainedAudit:
    """One audit (see the module docstring): created when it starts, finished when its probe is back."""

    token: bytes
    deadline: float
    seen: dict[str, bytes] = field(default_factory=dict)

    def observe(self, topic: str, payload: bytes) -> None:
        if payload:
            self.seen[topic] = payload
        else:
            self.seen.pop(topic, None)

    def finish(self, ledger: RetainedLedger) -> AuditResult:
        repair = [p for t, p in ledger.entries.items() if self.seen.get(t) != p.payload]
        # Model and delta shards before the manifest that names them.
        repair.sort(key=lambda p: p.topic == ledger.topics.manifest)
        stale = [Publish(t, b"", 1, True) for t in sorted(self.seen)
                 if t not in ledger.entries and t != ledger.topics.manifest]
        return AuditResult(repair + stale, len(repair), len(stale), len(self.seen))


class ClearedUploads:
    """Update topics whose retained message the coordinator deleted, until the echo is back.

    >>> c = ClearedUploads(limit=2)
    >>> c.add("a"), c.add("a"), c.echo("a"), c.echo("a")
    (True, False, True, False)
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._pending: OrderedDict[str, None] = OrderedDict()

    def add(self, topic: str) -> bool:
        """Note a deletion about to be published; False if one for ``topic`` is already on its way
        (the broker re-sent the retained message before our deletion reached it)."""
        if topic in self._pending:
            return False
        self._pending[topic] = None
        while len(self._pending) > self.limit:
            self._pending.popitem(last=False)  # an echo lost with a connection: forget it
        return True

    def forget(self) -> None:
        """The connection dropped: a deletion in flight may be lost, so the next sighting deletes again."""
        self._pending.clear()

    def echo(self, topic: str) -> bool:
        """True (once) if an empty payload on ``topic`` is the echo of our own deletion."""
        return self._pending.pop(topic, False) is None
