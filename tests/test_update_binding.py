"""Issue 12, "updates are not portable": the update digest binds federation, device, round, update
id and base model (``fedsync.params.update_digest``), so a payload moved anywhere else fails.

On the sans-IO cores (tests/sim.py), with the shards a real agent published: a round-1 update
re-published as round 7 (its base rewritten to round 7's, so only the binding can catch it), the
same update on another device's topic, and an update made on another campaign's model (same
round id and version, another base digest) are each rejected with a final receipt naming
``update_digest``; the unmodified updates are accepted (positive controls). A forger who
recomputes the unkeyed digest for the new place is stopped by the device's signature. The same
scenario through the CLI and mosquitto is in tests/test_hostile_cli.py.
"""

from __future__ import annotations

import random

import cbor2
import numpy as np
import pytest

from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.messages import ShardAck, UpdateShard, decode
from fedsync.params import update_digest
from fedsync.signing import HmacSigner, HmacVerifier
from tests.sim import Sim, offset_trainer

DEVICES = ["dev-0", "dev-1", "dev-2"]


def make_sim(rounds: int, params=None, signing: bool = False) -> Sim:
    sim = Sim(DEVICES, RoundPolicy(rounds=rounds, target=3, quorum=2, min_devices=3, shard_values=5),
              **({"params": params} if params is not None else {}))
    sim.trainers = {d: offset_trainer(1.0 + i, 10 * (i + 1)) for i, d in enumerate(DEVICES)}
    if signing:
        keys = {d: bytes([i + 1]) * 32 for i, d in enumerate(DEVICES)}
        sim.coord.verifier = HmacVerifier(keys)
        for d, agent in sim.agents.items():
            agent.signer = HmacSigner(keys[d])
    sim.sent: dict[tuple[str, int], list[tuple[str, bytes]]] = {}  # (device, round) -> its shards, in order
    inner = sim.publish

    def record(sender, p):
        if "/up/" in p.topic:
            sim.sent.setdefault((sender, int(p.topic.split("/")[4])), []).append((p.topic, p.payload))
        inner(sender, p)

    sim.publish = record
    return sim


def moved(shards: list[tuple[str, bytes]], **fields) -> list[tuple[str, bytes]]:
    """The payloads with ``fields`` rewritten (and the topic to match): what a replayer sends."""
    out = []
    for _, payload in shards:
        body = {**cbor2.loads(payload), **fields}
        topic = f"fedsync/sim/up/{body['device']}/{body['round_id']}/{body['update_id']}/{body['index']}"
        out.append((topic, cbor2.dumps(body)))
    return out


def feed(core: CoordinatorCore, shards, now: float) -> ShardAck:
    """Feed the shards to the coordinator; the receipt it published for the last one."""
    for topic, payload in shards:
        out = core.on_message(topic, payload, now)
    (ack,) = [decode(a.payload, ShardAck) for a in out if getattr(a, "topic", "").startswith("fedsync/sim/ack/")]
    return ack


def run_to_round(sim: Sim, round_id: int, stalled: set[str]) -> None:
    """Settle until round ``round_id`` is open, with ``stalled`` devices not yet done training in it."""
    sim.start()
    for _ in range(100_000):
        r = sim.coord.round
        if r is not None and r.manifest.round_id == round_id:
            sim.stalled |= stalled
        if not sim.step():
            break
    r = sim.coord.round
    assert r is not None and r.manifest.round_id == round_id, "the round did not open"


def test_a_round_1_update_moved_to_round_7_or_to_another_device_is_rejected_naming_the_reason():
    sim = make_sim(rounds=8)
    run_to_round(sim, 7, stalled={"dev-0", "dev-1"})
    r = sim.coord.round
    assert (r.manifest.model_version, r.assembler.accepted_devices) == (6, {"dev-2"})
    first = sim.sent["dev-0", 1]  # dev-0's round-1 update, accepted in round 1 (a positive control)
    assert "dev-0" in next(c for c in sim.closed() if c.round_id == 1).accepted
    # To round 7, on dev-0's own topic: the layout passes (base rewritten to 6), the binding does not.
    ack = feed(sim.coord, moved(first, round_id=7, base_version=6), sim.now)
    assert (ack.device, ack.round_id, ack.status, ack.reason) == ("dev-0", 7, "rejected", "update_digest:update_digest")
    # dev-2's round-7 update exactly as it was sent (and accepted: the other control), on dev-1's topic:
    # a broker without the ACL lets that through.
    ack = feed(sim.coord, moved(sim.sent["dev-2", 7], device="dev-1"), sim.now)
    assert (ack.device, ack.round_id, ack.status, ack.reason) == ("dev-1", 7, "rejected", "update_digest:update_digest")
    s = sim.coord.stats
    assert (s.rejected_by_reason["update_digest"], s.updates_accepted, r.assembler.accepted_devices) == (
        2, 19, {"dev-2"})
    # The victims' own updates still count: the replays took nobody's place.
    sim.stalled.clear()
    sim.settle()
    seventh = next(c for c in sim.closed() if c.round_id == 7)
    assert seventh.accepted == tuple(DEVICES) and sim.coord.stats.updates_accepted == 24


def test_an_update_made_on_another_campaigns_model_is_rejected_and_on_the_same_model_accepted():
    a = make_sim(rounds=1)
    a.start()
    a.settle()
    update = a.sent["dev-0", 1]  # round 1, base version 0 of campaign A's initial model
    other = {k: np.full_like(v, 0.25) for k, v in a.params.items()}
    results = {}
    for label, params in (("another model", other), ("the same model", a.params)):
        b = make_sim(rounds=1, params=params)  # a fresh coordinator: round 1 again, version 0
        b.start()
        b.stalled |= set(DEVICES)
        b.settle()
        results[label] = (lambda ack: (ack.status, ack.reason))(feed(b.coord, update, b.now))
    assert results == {"another model": ("rejected", "update_digest:update_digest"),
                       "the same model": ("accepted", "")}


def test_a_forger_who_recomputes_the_digest_for_the_new_place_fails_the_signature():
    sim = make_sim(rounds=8, signing=True)
    run_to_round(sim, 7, stalled={"dev-0", "dev-1"})
    first = sim.sent["dev-0", 1]
    shard0 = decode(first[0][1], UpdateShard)
    rebound = update_digest([decode(p, UpdateShard).digest for _, p in first], federation="sim", device="dev-0",
                            round_id=7, update_id=shard0.update_id, base_version=6,
                            base_digest=sim.coord.round.manifest.model_digest)
    forged = moved(first, round_id=7, base_version=6, update_digest=rebound)  # binding right, signature for round 1
    ack = feed(sim.coord, forged, sim.now)
    assert (ack.device, ack.status, ack.reason) == ("dev-0", "rejected", "signature:signature")
    assert feed(sim.coord, moved(forged, signature=b""), sim.now).reason == "signature:signature"
    sim.stalled.clear()
    sim.settle()
    assert next(c for c in sim.closed() if c.round_id == 7).accepted == tuple(DEVICES)


@pytest.mark.parametrize("field, value", [("federation", "other"), ("device", "dev-9"), ("round_id", 8),
                                          ("update_id", "u2"), ("base_version", 4), ("base_digest", b"\x01" * 16)])
def test_every_bound_field_changes_the_digest(field, value):
    kw = dict(federation="sim", device="dev-0", round_id=7, update_id="u1", base_version=6, base_digest=bytes(16))
    shards = [random.Random(0).randbytes(16) for _ in range(3)]
    assert update_digest(shards, **kw) != update_digest(shards, **{**kw, field: value})
    assert update_digest(shards, **kw) == update_digest(list(shards), **dict(kw))  # and nothing else does
