"""The coordinator's watch over the broker itself: its retained store and its queue.

Theory of operation
-------------------
The round core trusts the broker to keep what it retains and to deliver what it
acknowledged. Neither always holds, so the service feeds a :class:`BrokerWatch` the
broker events the core never sees, and carries out what it returns (``Publish``,
``Subscribe``, ``Unsubscribe`` and :class:`WatchNote` log lines), with no I/O here:

* **Retained state heals itself** (coordinator/retained_audit.py). Every retained publish
  the service carries out is ``published`` into the ledger. After each connection (once
  its ownership gate opened) the service says ``connected`` with its publish count;
  ``poll`` begins the audit once those publishes are acknowledged (the broker then holds
  them, and the audit does not read an older copy back): subscribe to the manifest,
  ``model/#`` and ``modeldelta/#``, then a probe to itself. Retained deliveries on those
  filters are ``retained``; ``probe_back`` (or ``AUDIT_WAIT`` without it) finishes the
  audit: unsubscribe, republish what the broker lacks or holds with other bytes, clear
  what the coordinator no longer publishes. This runs whatever ``session_present`` said.
* **Devices cannot park data on the broker.** An update delivered from the retained store
  was published retained by a device: it is not the core's (its live copy reached the
  coordinator when it was published), so ``retained`` deletes it (an empty retained
  payload) and counts it, and ``live`` drops the broker's forward of that empty payload.
  ``round_closed`` (and ``poll``, every ``SWEEP_INTERVAL`` = 2 s) subscribes to ``up/#`` again, which makes the broker re-send every retained update (MQTT 3.1.1
  §3.8.4), so one parked since is found.
* **Broker-side drops are counted** (coordinator/upload_gaps.py): ``upload`` sees each
  decoded update shard in arrival order; ``round_closed`` logs the round's gaps and the
  devices that sent far more messages than an update has shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.coordinator.events import CheckedShard
from fedsync.coordinator.retained_audit import AUDIT_WAIT, ClearedUploads, RetainedAudit, RetainedLedger
from fedsync.coordinator.upload_gaps import UploadGaps, UploadTally
from fedsync.topics import Topics

# Seconds between looks for retained uploads. Short: a device can park what it sends in this
# long before it is deleted, and a broker whose memory_limit is full of parked uploads cannot
# even deliver them to the coordinator to be deleted (docs/security.md).
SWEEP_INTERVAL = 2.0


@dataclass(slots=True)
class BrokerStats:
    """What the coordinator saw of the broker itself (metrics in docs/operations.md)."""

    retained_audits: int = 0  # audits of the broker's retained manifest and model finished
    retained_republished: int = 0  # retained messages the broker lacked or held with other bytes
    retained_cleared: int = 0  # retained model or delta shards deleted (an old version, a stale delta)
    retained_uploads_cleared: int = 0  # update messages delivered from the retained store, ignored and deleted
    flooding_reports: int = 0  # (device, round) pairs with far more messages than an update has shards


@dataclass(frozen=True, slots=True)
class WatchNote:
    """A log line for the adapter: one event name and its fields."""

    event: str
    level: int
    fields: dict = field(default_factory=dict)


class BrokerWatch:
    """See the module docstring.

    >>> w = BrokerWatch(Topics("t"), incarnation=7)
    >>> w.connected(published=0, now=0.0)
    >>> [type(a).__name__ for a in w.poll(published_ok=0, now=0.0)]
    ['Subscribe', 'Subscribe', 'Subscribe', 'Publish']
    """

    def __init__(self, topics: Topics, incarnation: int) -> None:
        self.topics = topics
        self.incarnation = incarnation
        self.stats = BrokerStats()
        self.ledger = RetainedLedger(topics)
        self.cleared = ClearedUploads()
        self.gaps = UploadGaps()
        self.tally = UploadTally()
        self._up_prefix = topics.root + "/up/"
        self._audit: RetainedAudit | None = None
        self._audit_after: tuple[int, float] | None = None  # (publishes to see acknowledged, or until)
        self._audits_begun = 0
        self._gaps_logged = (0, 0)
        self._swept_at: float | None = None  # when up/# was last subscribed (None: not connected)

    # -- retained state -------------------------------------------------------------------

    def published(self, p: Publish) -> None:
        self.ledger.record(p)

    def connected(self, published: int, now: float) -> None:
        """A connection's gate opened; ``published`` publishes so far (the link's count)."""
        self._audit, self._audit_after = None, (published, now + AUDIT_WAIT)
        self._swept_at = now  # the connection's own subscriptions delivered up/#'s retained messages

    def disconnected(self) -> None:
        self._audit = self._audit_after = None  # the next connection audits afresh
        self._swept_at = None
        self.cleared.forget()

    @property
    def auditing(self) -> bool:
        return self._audit is not None

    def poll(self, published_ok: int, now: float) -> list:
        """Sweep ``up/#`` when due; begin an audit that is due, or finish one whose probe is overdue."""
        out: list = []
        if self._swept_at is not None and now - self._swept_at >= SWEEP_INTERVAL:
            self._swept_at = now
            out.append(Subscribe(self.topics.up_filter, 2))
        if self._audit_after is not None:
            published, until = self._audit_after
            if published_ok < published and now < until:
                return out
            self._audit_after = None
            self._audits_begun += 1
            self._audit = RetainedAudit(f"audit:{self.incarnation}:{self._audits_begun}".encode(), now + AUDIT_WAIT)
            return out + [*(Subscribe(f, 1) for f in self.ledger.filters()),
                          Publish(self.topics.coordinator_probe, self._audit.token, 1, False)]
        if self._audit is not None and now >= self._audit.deadline:
            out += self._finish()  # the probe did not come back: decide on what did
        return out

    def probe_back(self, payload: bytes) -> list | None:
        """The audit's actions if ``payload`` is its probe, else None."""
        if self._audit is None or payload != self._audit.token:
            return None
        return self._finish()

    def _finish(self) -> list:
        audit, self._audit = self._audit, None
        assert audit is not None
        result = audit.finish(self.ledger)
        s = self.stats
        s.retained_audits += 1
        s.retained_republished += result.republished
        s.retained_cleared += result.cleared
        note = WatchNote("retained_audit", logging.INFO if result.publishes else logging.DEBUG,
                         {"observed": result.observed, "republished": result.republished, "cleared": result.cleared})
        # Unsubscribe first: the republished copies need not come back to us.
        return [*(Unsubscribe(f) for f in self.ledger.filters()), note, *result.publishes]

    # -- retained and live deliveries -------------------------------------------------------------

    def retained(self, topic: str, payload: bytes) -> list | None:
        """A delivery with the RETAIN flag: its actions if it is not the core's, else None."""
        if topic.startswith(self._up_prefix):
            if not self.cleared.add(topic):
                return []  # re-sent before our deletion reached the broker: deleted already
            self.stats.retained_uploads_cleared += 1
            return [WatchNote("retained_upload_cleared", logging.WARNING, {"topic": topic, "bytes": len(payload)}),
                    Publish(topic, b"", 1, True)]
        if self.ledger.tracks(topic):
            if self._audit is not None:
                self._audit.observe(topic, payload)
            return []  # outside an audit: an amqtt leak, or our own store read too late
        return None

    def live(self, topic: str, payload: bytes) -> bool:
        """True if a live delivery is the broker forwarding our own deletion of a retained upload."""
        return not payload and topic.startswith(self._up_prefix) and self.cleared.echo(topic)

    def upload(self, topic: str, checked: CheckedShard) -> None:
        """An update shard as it arrived (before the core judges it)."""
        s = checked.shard
        if s is None or checked.error is not None or not topic.startswith(f"{self._up_prefix}{s.device}/"):
            return  # the core rejects it
        self.gaps.saw((s.device, s.round_id, s.update_id), s.index)
        self.tally.saw(s.device, s.count)

    def round_closed(self, round_id: int, now: float) -> list:
        # Subscribing again makes the broker re-send the retained messages under up/# without
        # interrupting the flow (MQTT 3.1.1 §3.8.4): uploads parked since are found and deleted.
        out: list = []
        if self._swept_at is not None:
            self._swept_at = now
            out.append(Subscribe(self.topics.up_filter, 2))
        gaps, filled = self.gaps.gaps, self.gaps.filled
        if (gaps, filled) != self._gaps_logged:
            out.append(WatchNote("upload_gaps", logging.INFO, {
                "round": round_id, "missing": gaps - self._gaps_logged[0], "filled": filled - self._gaps_logged[1],
                "missing_total": gaps, "filled_total": filled}))
            self._gaps_logged = (gaps, filled)
        for device, messages, shards in self.tally.close_round():
            self.stats.flooding_reports += 1
            out.append(WatchNote("device_flooding", logging.WARNING,
                                 {"device": device, "round": round_id, "messages": messages, "shards": shards}))
        return out
