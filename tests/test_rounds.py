"""Round scenarios on the sans-IO cores over an in-memory broker (exact counts, exact values)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from fedsync.coordinator.core import (OFFLINE_SETTLE, RECONNECT_SETTLE, CoordinatorCore, RejectedInput, RoundPolicy,
                                      WaitingForDevices)
from fedsync.actions import Publish
from fedsync.messages import PeerStatus, RoundManifest, ShardAck, UpdateShard, decode, encode
from fedsync.params import flatten
from fedsync.topics import Topics
from tests.sim import Sim, offset_trainer

DEVICES = ["dev-0", "dev-1", "dev-2"]
OFFSETS = {"dev-0": 1.0, "dev-1": 2.0, "dev-2": 4.0}
SAMPLES = {"dev-0": 10, "dev-1": 30, "dev-2": 60}
# FedAvg of the offsets weighted by samples: (10*1 + 30*2 + 60*4) / 100
EXPECTED_STEP = (10 * 1 + 30 * 2 + 60 * 4) / 100


def make_sim(policy: RoundPolicy, devices=DEVICES, shard_values: int = 5) -> Sim:
    sim = Sim(devices, replace(policy, shard_values=shard_values))
    sim.trainers = {d: offset_trainer(OFFSETS.get(d, 1.0), SAMPLES.get(d, 10)) for d in devices}
    return sim


def test_full_round_commits_with_the_exact_weighted_average():
    sim = make_sim(RoundPolicy(rounds=2, target=3, quorum=2, min_devices=3))
    sim.start()
    sim.settle()
    closed = sim.closed()
    assert [c.outcome for c in closed] == ["committed", "committed"]
    assert [c.accepted for c in closed] == [tuple(DEVICES)] * 2
    s = sim.coord.stats
    assert (s.updates_accepted, s.duplicates_dropped, s.shards_rejected) == (6, 0, 0)
    # 16 params in shards of 5 -> 4 shards per update, 3 devices, 2 rounds
    assert s.shards_accepted == 24
    assert np.allclose(sim.coord.vector, 2 * EXPECTED_STEP, atol=1e-6)
    assert sim.coord.version == 2
    assert sim.finished == set(DEVICES)
    assert decode(sim.retained[sim.topics.manifest], RoundManifest).state == "finished"
    # old model versions were cleared from the retained store, the current one is there
    assert sorted(t for t in sim.retained if "/model/" in t) == [f"fedsync/sim/model/2/{i}" for i in range(4)]


def test_duplicated_and_reordered_deliveries_count_once():
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3))
    rng = random.Random(7)
    dup_count = 0

    def hook(sender, p: Publish):
        nonlocal dup_count
        if "/up/" in p.topic:
            copies = rng.choice([1, 2, 3])
            dup_count += copies - 1
            return [p] * copies
        return [p]

    sim.on_publish = hook
    sim.start()
    # shuffle the queue each step: reordering
    while sim.queue or sim.pending_train:
        items = list(sim.queue)
        rng.shuffle(items)
        sim.queue.clear()
        sim.queue.extend(items)
        sim.step()
    s = sim.coord.stats
    assert s.updates_accepted == 3
    assert s.duplicates_dropped == dup_count > 0
    assert np.allclose(sim.coord.vector, EXPECTED_STEP, atol=1e-6)


def test_device_gone_mid_round_closes_on_quorum_without_waiting():
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=2, min_devices=3, round_timeout=60))
    sim.start()
    # dev-2 trains but dies before uploading: drop its training, fire its will
    while sim.step():
        if sim.pending_train and sim.pending_train[0][0] == "dev-2":
            sim.pending_train.pop(0)
            sim.disconnect("dev-2")
    assert sim.closed() == []  # a will settles for OFFLINE_SETTLE (a broker shutting down fires them all)
    sim.advance(OFFLINE_SETTLE)
    (closed,) = sim.closed()
    assert (closed.outcome, closed.reason, closed.accepted) == ("committed", "quorum_no_live_pending", ("dev-0", "dev-1"))
    assert sim.coord.stats.devices_offline_detected == 1
    assert sim.now == 1000.0 + OFFLINE_SETTLE  # no deadline was needed
    assert np.allclose(sim.coord.vector, (10 * 1 + 30 * 2) / 40, atol=1e-6)


def test_a_broker_restart_firing_every_will_does_not_cut_the_round_short():
    """mosquitto publishes every client's will as it shuts down, an instant before the
    coordinator's own connection drops. The round must wait for the devices to come back."""
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=2, min_devices=3, round_timeout=60))
    sim.stalled = {"dev-2"}  # still training when the broker goes down
    sim.start()
    sim.settle()
    assert sim.coord.round is not None and len(sim.coord.round.assembler.accepted_devices) == 2
    for d in DEVICES:  # the broker shuts down: every will, then our own connection
        sim.disconnect(d)
    sim.settle()
    sim.coord.link_lost(sim.now)
    sim.advance(5.0)
    assert sim.closed() == []  # presence is unknown while we are cut off
    sim.coord.link_restored(sim.now)  # the broker is back
    sim.advance(RECONNECT_SETTLE / 2)
    assert sim.closed() == []  # devices get time to reconnect
    for d in DEVICES:
        sim.connect(d)
    sim.stalled.clear()
    sim.settle()
    (closed,) = sim.closed()
    assert (closed.outcome, closed.reason, closed.accepted) == ("committed", "target", tuple(DEVICES))
    assert sim.coord.stats.devices_offline_detected == 3


def test_after_a_reconnect_a_device_that_never_returns_stops_blocking_the_round():
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=2, min_devices=3, round_timeout=60))
    sim.stalled = {"dev-2"}
    sim.start()
    sim.settle()
    for d in DEVICES:
        sim.disconnect(d)
    sim.settle()
    sim.coord.link_lost(sim.now)
    sim.coord.link_restored(sim.now + 1.0)
    for d in ("dev-0", "dev-1"):  # dev-2 is really gone
        sim.connect(d)
    sim.settle()
    sim.advance(1.0)
    assert sim.closed() == []
    sim.advance(RECONNECT_SETTLE)
    (closed,) = sim.closed()
    assert (closed.outcome, closed.reason, closed.accepted) == ("committed", "quorum_no_live_pending", ("dev-0", "dev-1"))


def test_deadline_commits_with_quorum_and_abandons_without():
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=2, min_devices=3, round_timeout=30))
    sim.stalled = {"dev-1", "dev-2"}  # their training never finishes
    sim.start()
    sim.settle()
    sim.advance(29.9)
    assert sim.closed() == []
    sim.advance(0.2)
    (abandoned,) = sim.closed()
    assert (abandoned.outcome, abandoned.round_id, abandoned.accepted) == ("abandoned", 1, ("dev-0",))
    assert sim.coord.version == 0 and sim.coord.stats.rounds_abandoned == 1
    m = decode(sim.retained[sim.topics.manifest], RoundManifest)
    assert (m.round_id, m.state, m.model_version) == (2, "open", 0)  # retried under a new round id
    sim.pending_train = [(c, tr) for c, tr in sim.pending_train if tr.round_id == 2]  # round 1 work is moot
    sim.stalled.discard("dev-1")
    sim.settle()
    sim.advance(30.0)
    committed = sim.closed()[1]
    assert (committed.outcome, committed.round_id, committed.reason) == ("committed", 2, "deadline")
    assert committed.accepted == ("dev-0", "dev-1")


def test_stale_round_updates_are_rejected_and_told_closed():
    sim = make_sim(RoundPolicy(rounds=2, target=3, quorum=3, min_devices=3))
    captured: list[Publish] = []
    sim.on_publish = lambda s, p: (captured.append(p) if "/up/" in p.topic else None) or [p]
    sim.start()
    sim.settle()
    round1 = [p for p in captured if "/up/dev-0/1/" in p.topic]
    before = sim.coord.stats.updates_accepted
    for p in round1:  # a late redelivery of round 1's accepted update: duplicates
        sim.run("coordinator", sim.coord.on_message(p.topic, p.payload, sim.now))
    assert sim.coord.stats.duplicates_dropped == len(round1) == 4
    for p in round1:  # a different update for round 1, sent after it closed: stale
        s = replace(decode(p.payload, UpdateShard), update_id="ulate")
        topic = sim.topics.up(s.device, s.round_id, s.update_id, s.index)
        sim.run("coordinator", sim.coord.on_message(topic, encode(s), sim.now))
    s = sim.coord.stats
    assert s.updates_accepted == before
    assert s.rejected_by_reason["stale_round"] == len(round1)
    ack = decode(sim.retained[sim.topics.ack("dev-0")], ShardAck)
    assert (ack.round_id, ack.update_id, ack.status) == (1, "ulate", "closed")


def test_corrupted_shard_is_rejected_then_resent_and_accepted():
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3))
    corrupted = []

    def hook(sender, p: Publish):
        if "/up/dev-1/1/" in p.topic and p.topic.endswith("/2") and not corrupted:
            s = decode(p.payload, UpdateShard)
            corrupted.append(p.topic)
            bad = replace(s, data=bytes([s.data[0] ^ 0xFF]) + s.data[1:])
            return [Publish(p.topic, encode(bad), p.qos, p.retain)]
        return [p]

    sim.on_publish = hook
    sim.start()
    sim.settle()
    assert corrupted and sim.coord.stats.rejected_by_reason["digest"] == 1
    assert sim.closed() == []  # dev-1's update is incomplete
    sim.advance(5.0)  # dev-1's resend timer: it re-sends only the shard the coordinator lacks
    assert sim.agents["dev-1"].stats.shards_resent == 1
    (closed,) = sim.closed()
    assert closed.outcome == "committed" and sim.coord.stats.updates_accepted == 3
    assert np.allclose(sim.coord.vector, EXPECTED_STEP, atol=1e-6)


def test_forged_update_digest_gets_rejected_and_the_agent_sends_a_fresh_update():
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3))
    forged_ids = set()

    def hook(sender, p: Publish):
        if sender == "dev-2" and "/up/" in p.topic and not forged_ids - {p.topic.split("/")[5]}:
            s = decode(p.payload, UpdateShard)
            if not forged_ids or s.update_id in forged_ids:
                forged_ids.add(s.update_id)
                return [Publish(p.topic, encode(replace(s, update_digest=b"\x01" * 16)), p.qos, False)]
        return [p]

    sim.on_publish = hook
    sim.start()
    sim.settle()
    assert sim.coord.stats.rejected_by_reason["update_digest"] == 1
    assert sim.agents["dev-2"].stats.updates_rejected == 1
    (closed,) = sim.closed()
    assert closed.accepted == tuple(DEVICES) and sim.coord.stats.updates_accepted == 3


@pytest.mark.parametrize("mutate, reason, receipt", [
    (lambda t, p: ("fedsync/sim/up/dev-1/1/uX/0", p), "topic_mismatch", "topic:topic_mismatch"),
    (lambda t, p: (t, b"\xff\x00garbage"), "cbor", "payload:cbor"),
    (lambda t, p: (t, p + b"\x00"), "trailing_bytes", "payload:trailing_bytes"),
    (lambda t, p: (t.replace("/up/dev-0/", "/up/dev-9/"), p), "topic_mismatch", "topic:topic_mismatch"),
])
def test_hostile_inputs_are_counted_not_raised_and_the_device_their_topic_names_is_told(mutate, reason, receipt):
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3))
    captured = []
    sim.on_publish = lambda s, p: (captured.append(p) if "/up/dev-0/" in p.topic else None) or [p]
    sim.start()
    sim.settle()
    topic, payload = mutate(captured[0].topic, captured[0].payload)
    out = sim.coord.on_message(topic, payload, sim.now)
    assert [type(a) for a in out] == [RejectedInput, Publish] and out[0].reason == reason
    assert sim.coord.stats.rejected_by_reason[reason] == 1
    where = sim.topics.parse_up(topic)  # the topic's device, round and update: 16 params in 4 shards
    assert out[1].topic == sim.topics.ack(where.device) and out[1].retain
    assert decode(out[1].payload, ShardAck) == ShardAck(where.device, 1, where.update_id, 4, b"\x00", "rejected",
                                                        receipt)


def test_unselected_device_is_rejected():
    sim = make_sim(RoundPolicy(rounds=1, target=2, quorum=2, min_devices=3), devices=DEVICES)
    sim.start()
    sim.settle()
    m_selected = sim.closed()[0].selected
    assert len(m_selected) == 2
    outsider = next(d for d in DEVICES if d not in m_selected)
    assert sim.agents[outsider].stats.shards_sent == 0


def test_over_selection_picks_more_devices_than_the_target():
    devices = [f"dev-{i}" for i in range(10)]
    sim = make_sim(RoundPolicy(rounds=1, target=4, quorum=2, over_select=0.5, min_devices=10), devices=devices)
    sim.start()
    sim.settle()
    (closed,) = sim.closed()
    assert len(closed.selected) == 6 and len(closed.accepted) == 4 and closed.reason == "target"


def test_core_start_publishes_retained_state():
    core = CoordinatorCore(Topics("t"), {"w": np.arange(7, dtype=np.float32)}, RoundPolicy(shard_values=3),
                           hyper={}, incarnation=9, seed=0)
    out = core.start(now=5.0)
    assert out[-1] == WaitingForDevices(online=0, needed=1)  # why nothing opens yet
    out = out[:-1]
    assert [(a.topic, a.retain) for a in out] == [
        ("fedsync/t/coordinator/status", True), ("fedsync/t/model/0/0", True), ("fedsync/t/model/0/1", True),
        ("fedsync/t/model/0/2", True), ("fedsync/t/manifest", True)]
    m = decode(out[-1].payload, RoundManifest)
    assert (m.state, m.model_shards, m.num_params, m.incarnation) == ("waiting", 3, 7, 9)
    assert np.array_equal(core.vector, flatten({"w": np.arange(7, dtype=np.float32)}))


def test_async_buffer_takes_a_late_update_with_its_staleness_weight():
    sim = make_sim(RoundPolicy(mode="async", rounds=2, target=3, quorum=1, min_devices=3, round_timeout=30))
    sim.stalled = {"dev-2"}  # a slow phone: still training on version 0
    sim.start()
    sim.settle()
    assert sim.closed() == []  # buffer of 3 holds only dev-0 and dev-1
    sim.advance(30.0)  # the deadline flushes what is buffered
    (r1,) = sim.closed()
    assert (r1.outcome, r1.reason, r1.accepted) == ("committed", "deadline", ("dev-0", "dev-1"))
    v1 = (10 * 1 + 30 * 2) / 40
    assert np.allclose(sim.coord.vector, v1, atol=1e-6)
    sim.stalled.clear()  # dev-2 finishes its version-0 update while round 2 (version 1) is open
    sim.settle()
    r2 = sim.closed()[1]
    assert (r2.outcome, r2.reason, sorted(r2.accepted)) == ("committed", "buffer_full", ["dev-0", "dev-1", "dev-2"])
    w2 = 60 * (1 + 1) ** -0.5  # staleness 1, exponent 0.5
    step = (10 * 1 + 30 * 2 + w2 * 4) / (10 + 30 + w2)
    assert np.allclose(sim.coord.vector, v1 + step, atol=1e-5)
    assert sim.coord.stats.updates_accepted == 5
    assert decode(sim.retained[sim.topics.manifest], RoundManifest).state == "finished"


def test_async_update_older_than_max_staleness_is_dropped_as_stale():
    sim = make_sim(RoundPolicy(mode="async", rounds=0, target=2, quorum=1, min_devices=3, round_timeout=30,
                               max_staleness=2))
    sim.stalled = {"dev-2"}
    sim.start()
    while sim.coord.version < 3:  # dev-0 and dev-1 alone fill buffers of 2 while dev-2 trains on version 0
        assert sim.step()
    sim.stalled = {"dev-0", "dev-1", "dev-2"}
    sim.settle()
    accepted = sim.coord.stats.updates_accepted
    sim.stalled = {"dev-0", "dev-1"}  # release only dev-2
    sim.settle()
    # its version-0 update is 3 versions old, beyond max_staleness: every shard is dropped as stale,
    # the receipt says "closed", and dev-2 starts over on the newest model, which counts
    assert sim.coord.stats.rejected_by_reason["stale_round"] == 4
    assert sim.coord.stats.updates_accepted == accepted + 1
    assert sim.agents["dev-2"].stats.rounds_accepted == 1
    assert sim.agents["dev-2"].job.model_version == 3


def test_semisync_waits_for_the_period_not_the_target():
    sim = make_sim(RoundPolicy(mode="semisync", rounds=1, target=1, quorum=1, min_devices=3, round_timeout=20))
    sim.stalled = {"dev-2"}
    sim.start()
    sim.settle()
    assert sim.closed() == []  # target 1 was reached long ago; semisync still waits for the period
    sim.advance(20.0)
    (r1,) = sim.closed()
    assert (r1.outcome, r1.reason, r1.accepted) == ("committed", "deadline", ("dev-0", "dev-1"))


def test_devices_one_version_behind_fetch_only_the_delta_and_get_the_exact_model():
    params = {"w": np.random.default_rng(1).normal(size=(60, 10)).astype(np.float32), "b": np.zeros(10, np.float32)}
    sim = Sim(DEVICES, RoundPolicy(rounds=3, target=3, quorum=3, min_devices=3, shard_values=256), params=params)
    sim.trainers = {d: offset_trainer(OFFSETS[d], SAMPLES[d]) for d in DEVICES}
    sim.start()
    sim.settle()
    assert sim.coord.version == 3
    for d in DEVICES:
        a = sim.agents[d]
        assert (a.stats.model_fetches, a.stats.delta_fetches) == (3, 2)  # full once, then deltas
        assert a._model[0] == 2  # trained last on version 2, fetched as version 1 + delta
    expected = flatten(params) + np.float32(3 * EXPECTED_STEP)
    assert np.allclose(sim.coord.vector, expected, atol=1e-5)
    m = decode(sim.retained[sim.topics.manifest], RoundManifest)
    assert m.delta_from == 2
    # one generation of deltas stays retained (2 -> 3), and it is smaller than the full model
    deltas = sorted(t for t in sim.retained if "/modeldelta/" in t)
    assert deltas == [f"fedsync/sim/modeldelta/2/3/{i}" for i in range(3)]
    full = sum(len(p) for t, p in sim.retained.items() if "/model/3/" in t)
    assert sum(len(sim.retained[t]) for t in deltas) < full / 3


def test_signed_updates_count_and_a_forgery_under_the_devices_name_is_rejected_before_acceptance():
    from fedsync.device_agent.agent import AgentCore
    from fedsync.signing import HmacSigner, HmacVerifier

    keys = {d: bytes([i + 1]) * 32 for i, d in enumerate(DEVICES)}
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3))
    sim.coord.verifier = HmacVerifier(keys)
    for d, a in sim.agents.items():
        a.signer = HmacSigner(keys[d])
    sim.stalled = {"dev-1"}
    sim.start()
    sim.settle()
    # An attacker on dev-1's topic sends a complete, digest-valid update signed with the wrong key.
    m = decode(sim.retained[sim.topics.manifest], RoundManifest)
    evil = AgentCore("dev-1", sim.topics, random.Random(9), signer=HmacSigner(b"\x66" * 32))
    up = evil.encode_update(m, np.full(m.num_params, 100.0, np.float32), 10_000, {})
    for topic, payload in zip(up.topics, up.payloads):
        sim.run("coordinator", sim.coord.on_message(topic, payload, sim.now))
    assert sim.coord.stats.rejected_by_reason["signature"] == 1
    assert sim.coord.stats.updates_accepted == 2 and sim.closed() == []
    sim.stalled.clear()  # dev-1's genuine, signed update still counts: the forgery did not block it
    sim.settle()
    (closed,) = sim.closed()
    assert closed.accepted == tuple(DEVICES) and sim.coord.stats.updates_accepted == 3
    assert np.allclose(sim.coord.vector, EXPECTED_STEP, atol=1e-6)


def test_update_beyond_the_norm_bound_is_refused_counted_and_the_round_commits_without_it():
    from fedsync.coordinator.hardening import UpdateScreen

    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=2, min_devices=3))
    sim.trainers["dev-2"] = offset_trainer(1000.0, 60)  # a poisoned, huge update
    sim.coord.screen = UpdateScreen(max_norm=100.0)
    sim.start()
    sim.settle()
    (closed,) = sim.closed()
    assert (closed.outcome, closed.accepted, closed.reason) == ("committed", ("dev-0", "dev-1"),
                                                                "quorum_no_live_pending")
    s = sim.coord.stats
    assert (s.updates_accepted, s.updates_refused, s.rejected_by_reason["norm_bound"], s.shards_rejected) == (2, 1, 1, 0)
    ack = decode(sim.retained[sim.topics.ack("dev-2")], ShardAck)
    assert (ack.status, ack.reason) == ("refused", "norm_bound")
    assert sim.agents["dev-2"].state == "finished" and sim.agents["dev-2"].stats.shards_sent == 4  # no retries
    assert np.allclose(sim.coord.vector, (10 * 1 + 30 * 2) / 40, atol=1e-6)


def test_a_lost_model_shard_is_fetched_again_after_the_resend_window():
    sim = make_sim(RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3))
    sim.start()
    for _ in range(10_000):  # lose dev-1's first model shard in flight
        hit = [i for i, (c, t, _) in enumerate(sim.queue) if c == "dev-1" and "/model/" in t]
        if hit:
            del sim.queue[hit[0]]
            break
        assert sim.step()
    sim.settle()
    assert sim.closed() == [] and sim.agents["dev-1"].state == "fetching"
    sim.advance(5.0)  # resend_after: re-subscribing makes the broker re-send the retained shards
    (closed,) = sim.closed()
    assert closed.accepted == tuple(DEVICES) and sim.agents["dev-1"].stats.refetches == 1


def test_topk_updates_carry_error_feedback_and_the_coordinator_sees_exactly_what_was_kept():
    params = {"w": np.zeros((60, 10), np.float32), "b": np.zeros(10, np.float32)}
    sim = Sim(["dev-0"], RoundPolicy(rounds=1, target=1, quorum=1, min_devices=1, update_codec="topk",
                                     shard_values=256), params=params)
    ramp = np.arange(610, dtype=np.float32) / 610  # distinct magnitudes: top-10% is well defined

    def fit(p, hyper):
        flat = flatten(p) + ramp
        return {"b": flat[:10], "w": flat[10:].reshape(60, 10)}, 5, {}

    sim.trainers = {"dev-0": fit}
    sim.start()
    sim.settle()
    (closed,) = sim.closed()
    assert closed.accepted == ("dev-0",)
    a = sim.agents["dev-0"]
    kept = np.count_nonzero(sim.coord.vector)
    assert kept == sum(math.ceil(0.1 * n) for n in (256, 256, 98))  # top 10% of each shard
    # what was dropped stays on the device for the next round: sent + residual == the true delta
    np.testing.assert_allclose(sim.coord.vector + a.feedback.residual, ramp, atol=1e-3)


def test_a_coordinator_short_of_devices_says_so_once_per_change_each_minute_and_stops_when_a_round_opens():
    topics = Topics("t")
    core = CoordinatorCore(topics, {"w": np.zeros(4, np.float32)}, RoundPolicy(min_devices=3, quorum=2, target=3),
                           hyper={}, incarnation=1, seed=0)

    def waits(out: list) -> list:
        return [(a.online, a.needed) for a in out if isinstance(a, WaitingForDevices)]

    def status(device: str, state: str, now: float) -> list:
        return core.on_message(topics.status(device), encode(PeerStatus(device, state, 1)), now)

    told = waits(core.start(0.0))
    told += waits(core.tick(1.0)) + waits(core.tick(2.0))  # nothing changed: said once
    told += waits(status("dev-0", "online", 3.0)) + waits(core.tick(4.0))
    told += waits(status("dev-1", "online", 5.0))
    told += waits(status("dev-1", "offline", 6.0)) + waits(core.tick(6.1))
    assert told == [(0, 3), (1, 3), (2, 3), (1, 3)]
    # Unchanged: said again once WAITING_REPEAT (60 s) has passed since it was last said (tick 6.1).
    assert [waits(core.tick(t)) for t in (30.0, 66.0, 66.2, 67.0)] == [[], [], [(1, 3)], []]
    status("dev-1", "online", 70.0)
    out = status("dev-2", "online", 71.0)
    assert core.round is not None and waits(out) == []  # opened: nothing to explain
    assert waits(core.tick(200.0)) == []
