"""The coordinator's watch over the broker (coordinator/broker_watch.py), without a broker.

Scenarios: a stale broker is audited and repaired (exact publishes, in order); retained
uploads are deleted once each and the echo of the deletion is dropped; shard gaps are
counted and filled; a flooding device is named at the round's close.
"""

from __future__ import annotations

import logging

import numpy as np

from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.coordinator.broker_watch import SWEEP_INTERVAL, BrokerWatch, WatchNote
from fedsync.coordinator.events import check_shard
from fedsync.coordinator.retained_audit import AUDIT_WAIT
from fedsync.messages import UpdateShard, encode
from fedsync.params import digest
from fedsync.topics import Topics

T = Topics("farm")
AUDIT_FILTERS = ["fedsync/farm/manifest", "fedsync/farm/model/#", "fedsync/farm/modeldelta/#"]


def retained(topic: str, payload: bytes) -> Publish:
    return Publish(topic, payload, 1, True)


def connected_watch(published: list[Publish]) -> BrokerWatch:
    """A watch whose service published ``published`` and whose audit has begun."""
    w = BrokerWatch(T, incarnation=9)
    for p in published:
        w.published(p)
    w.connected(published=len(published), now=100.0)
    assert w.poll(published_ok=len(published) - 1, now=100.1) == []  # not everything acknowledged yet
    begin = w.poll(published_ok=len(published), now=100.2)
    assert begin == [*(Subscribe(f, 1) for f in AUDIT_FILTERS), Publish(T.coordinator_probe, b"audit:9:1", 1, False)]
    return w


def test_a_stale_broker_gets_the_current_model_and_manifest_back_and_loses_what_is_old():
    # The coordinator published model v2 (3 shards), the delta 1 -> 2 and manifest M2, and
    # retired v1. The broker came back from an old persistence file: manifest M1, model v1,
    # only shard 0 of v2, and a delta 0 -> 1 nobody names any more.
    current = [retained(T.model(2, i), b"v2-%d" % i) for i in range(3)]
    current += [retained(T.model_delta(1, 2, i), b"d12-%d" % i) for i in range(3)]
    current += [retained(T.model(1, i), b"") for i in range(3)]  # v1 retired (deleted)
    current += [retained(T.manifest, b"M2"), Publish(T.ack("pi"), b"ack", 1, True), Publish(T.up("pi", 1, "u", 0), b"x")]
    w = connected_watch(current)
    for topic, payload in [(T.manifest, b"M1"), (T.model(1, 0), b"v1-0"), (T.model(1, 1), b"v1-1"),
                           (T.model(1, 2), b"v1-2"), (T.model(2, 0), b"v2-0"), (T.model_delta(0, 1, 0), b"d01-0")]:
        assert w.retained(topic, payload) == []
    assert w.probe_back(b"audit:9:0") is None  # an old audit's probe
    out = w.probe_back(b"audit:9:1")
    assert out[:3] == [Unsubscribe(f) for f in AUDIT_FILTERS]
    assert out[3] == WatchNote("retained_audit", logging.INFO, {"observed": 6, "republished": 6, "cleared": 4})
    assert out[4:] == [
        *(retained(T.model(2, i), b"v2-%d" % i) for i in (1, 2)),  # shard 0 was right
        *(retained(T.model_delta(1, 2, i), b"d12-%d" % i) for i in range(3)),
        retained(T.manifest, b"M2"),  # after the shards it names
        retained(T.model(1, 0), b""), retained(T.model(1, 1), b""), retained(T.model(1, 2), b""),
        retained(T.model_delta(0, 1, 0), b""),
    ]
    s = w.stats
    assert (s.retained_audits, s.retained_republished, s.retained_cleared) == (1, 6, 4)
    assert w.probe_back(b"audit:9:1") is None and not w.auditing  # finished once


def test_a_broker_that_holds_exactly_what_was_published_gets_nothing_but_the_unsubscribes():
    current = [retained(T.model(0, 0), b"m0"), retained(T.manifest, b"M0")]
    w = connected_watch(current)
    w.retained(T.model(0, 0), b"m0")
    w.retained(T.manifest, b"M0")
    out = w.probe_back(b"audit:9:1")
    assert out == [*(Unsubscribe(f) for f in AUDIT_FILTERS),
                   WatchNote("retained_audit", logging.DEBUG, {"observed": 2, "republished": 0, "cleared": 0})]


def test_a_broker_that_lost_everything_gets_it_all_and_a_lost_probe_ends_the_audit_on_time():
    current = [retained(T.model(0, 0), b"m0"), retained(T.manifest, b"M0")]
    w = connected_watch(current)
    sweep = [Subscribe(T.up_filter, 2)]  # the look for retained uploads every SWEEP_INTERVAL
    assert w.poll(published_ok=2, now=100.2 + AUDIT_WAIT - 0.01) == sweep
    out = w.poll(published_ok=2, now=100.2 + AUDIT_WAIT)
    assert out[4:] == current
    # A manifest the broker holds but the ledger has none of is replaced later, never deleted.
    w2 = BrokerWatch(T, incarnation=9)
    w2.connected(0, 0.0)
    w2.poll(0, 0.0)
    w2.retained(T.manifest, b"someone's")
    assert w2.probe_back(b"audit:9:1")[4:] == []


def test_retained_uploads_are_deleted_once_each_and_the_echo_of_the_deletion_is_dropped():
    w = BrokerWatch(T, incarnation=9)
    w.connected(0, 0.0)
    topics = [T.up("pi-shed", 3, f"u{i}", 0) for i in range(3)]
    for t in topics:
        out = w.retained(t, b"parked" * 100)
        assert out == [WatchNote("retained_upload_cleared", logging.WARNING, {"topic": t, "bytes": 600}),
                       Publish(t, b"", 1, True)]
    assert w.retained(topics[0], b"parked") == []  # re-sent before the deletion landed: not again
    assert w.stats.retained_uploads_cleared == 3
    assert [w.live(t, b"") for t in topics] == [True, True, True]  # the broker forwarding our deletions
    assert w.live(topics[0], b"") is False  # a second empty payload is someone else's: the core counts it
    assert w.live(T.up("pi-shed", 3, "u9", 0), b"") is False
    # A status or a coordinator status delivered from the store is the core's.
    assert w.retained(T.status("pi-shed"), b"s") is None
    # After a dropped connection a deletion may be lost: the next sighting deletes again.
    w.retained(topics[0], b"parked")
    w.disconnected()
    assert w.retained(topics[0], b"parked")[-1] == Publish(topics[0], b"", 1, True)
    assert w.stats.retained_uploads_cleared == 5


def test_up_is_swept_at_every_round_close_and_every_sweep_interval_while_connected():
    w = BrokerWatch(T, incarnation=9)
    assert w.round_closed(1, now=5.0) == []  # not connected: the next connection subscribes anyway
    w.connected(0, 10.0)
    w.poll(0, 10.0)  # the audit begins
    assert w.round_closed(2, now=20.0) == [Subscribe(T.up_filter, 2)]
    assert Subscribe(T.up_filter, 2) not in w.poll(0, 20.0 + SWEEP_INTERVAL - 0.01)  # (the audit times out here)
    assert w.poll(0, 20.0 + SWEEP_INTERVAL) == [Subscribe(T.up_filter, 2)]


def _shard_payload(device: str, update: str, index: int, count: int = 6) -> bytes:
    data = np.full(2, index, np.float32).tobytes()
    # The update digest is the assembler's business, not the watch's: any 16 bytes do here.
    return encode(UpdateShard(device, 4, update, 3, index, count, 2 * index, 2, 2 * count, "raw", 10, digest(data),
                              bytes(16), data, {}, b""))


def test_shards_lost_on_the_way_are_counted_as_gaps_and_a_resend_fills_them():
    w = BrokerWatch(T, incarnation=9)
    w.connected(0, 0.0)
    arrivals = [("pi", "u1", i) for i in (0, 1, 4, 5)] + [("pi", "u1", 1)]  # 2 and 3 dropped; 1 redelivered
    arrivals += [("pi-2", "u7", i) for i in range(6)]  # a complete update, in order
    arrivals += [("pi", "u1", 3), ("pi", "u1", 2)]  # the resend after the partial receipt
    for device, update, index in arrivals:
        w.upload(T.up(device, 4, update, index), check_shard(_shard_payload(device, update, index)))
    # A shard naming another device than its topic's is the core's to reject, and not counted.
    w.upload(T.up("pi", 4, "u2", 5), check_shard(_shard_payload("pi-2", "u2", 5)))
    assert (w.gaps.gaps, w.gaps.filled) == (2, 2)
    out = w.round_closed(4, now=1.0)
    assert out == [Subscribe(T.up_filter, 2),
                   WatchNote("upload_gaps", logging.INFO, {"round": 4, "missing": 2, "filled": 2,
                                                           "missing_total": 2, "filled_total": 2})]
    assert w.round_closed(5, now=2.0) == [Subscribe(T.up_filter, 2)]  # nothing new: no line


def test_a_device_sending_far_more_than_its_shards_is_named_at_the_rounds_close():
    w = BrokerWatch(T, incarnation=9)
    w.connected(0, 0.0)
    for i in range(6):
        w.upload(T.up("calm", 4, "u1", i), check_shard(_shard_payload("calm", "u1", i)))
    for n in range(4 * 6 + 16 + 1):  # one over the bound
        w.upload(T.up("noisy", 4, f"u{n}", 0), check_shard(_shard_payload("noisy", f"u{n}", 0)))
    out = w.round_closed(4, now=1.0)
    assert out[-1] == WatchNote("device_flooding", logging.WARNING,
                                {"device": "noisy", "round": 4, "messages": 41, "shards": 6})
    assert [a for a in out if isinstance(a, WatchNote) and a.event == "device_flooding"] == [out[-1]]
    assert w.stats.flooding_reports == 1
    assert not [a for a in w.round_closed(5, now=2.0) if isinstance(a, WatchNote)]  # counted afresh per round
