"""ShardAssembler: any order, any duplicates, exact reassembly; bad shards rejected."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsync.coordinator.assembler import RoundLayout, ShardAssembler
from fedsync.codecs import get_codec
from fedsync.messages import UpdateShard
from fedsync.params import digest, shard_slices, update_digest


def make_shards(vector: np.ndarray, per: int, codec: str = "zstd", device: str = "dev-1", update_id: str = "u1",
                round_id: int = 5, version: int = 2, num_samples: int = 17) -> list[UpdateShard]:
    c = get_codec(codec)
    slices = shard_slices(vector.size, per)
    datas = [c.encode(vector[o:o + n]) for o, n in slices]
    # The assembler below is built without a federation or a base digest: the binding's are empty.
    whole = update_digest((digest(d) for d in datas), federation="", device=device, round_id=round_id,
                          update_id=update_id, base_version=version, base_digest=b"")
    return [UpdateShard(device, round_id, update_id, version, i, len(slices), o, n, vector.size, codec, num_samples,
                        digest(d), whole, d) for i, ((o, n), d) in enumerate(zip(slices, datas))]


def layout(n: int, per: int, codec: str = "zstd") -> RoundLayout:
    return RoundLayout(round_id=5, model_version=2, num_params=n, shard_values=per, codec=codec)


@given(n=st.integers(1, 400), per=st.integers(1, 64), data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_order_with_duplicates_reassembles_exactly(n, per, data):
    vector = np.random.default_rng(n * 1000 + per).normal(size=n).astype(np.float32)
    shards = make_shards(vector, per)
    extra = data.draw(st.lists(st.sampled_from(range(len(shards))), max_size=10))
    order = data.draw(st.permutations(list(range(len(shards))) + extra))
    asm = ShardAssembler(layout(n, per))
    kinds = [asm.add(shards[i]).kind for i in order]
    completes = [k for k in kinds if k == "complete"]
    assert len(completes) == 1
    # Every delivery after the first of each index is a duplicate; after completion, all are.
    assert kinds.count("duplicate") == len(extra)
    assert kinds.count("accepted") == len(shards) - 1
    done = [o for o in (asm.add(s) for s in shards[:1])]
    assert done[0].kind == "duplicate"
    asm2 = ShardAssembler(layout(n, per))
    results = [asm2.add(shards[i]) for i in order]
    update = next(r.update for r in results if r.kind == "complete")
    assert update.vector.tobytes() == vector.tobytes()
    assert update.num_samples == 17


def test_corrupted_shard_is_rejected_and_the_good_copy_then_completes():
    vector = np.arange(10, dtype=np.float32)
    shards = make_shards(vector, 4)
    bad = replace(shards[1], data=shards[1].data[:-1] + bytes([shards[1].data[-1] ^ 1]))
    asm = ShardAssembler(layout(10, 4))
    assert asm.add(shards[0]).kind == "accepted"
    out = asm.add(bad)
    assert (out.kind, out.reason) == ("rejected", "digest")
    assert asm.add(shards[1]).kind == "accepted"
    final = asm.add(shards[2])
    assert final.kind == "complete" and np.array_equal(final.update.vector, vector)


def test_first_complete_update_per_device_wins():
    a = make_shards(np.ones(6, np.float32), 3, update_id="ua")
    b = make_shards(np.full(6, 2.0, np.float32), 3, update_id="ub")
    asm = ShardAssembler(layout(6, 3))
    assert [asm.add(s).kind for s in (a[0], b[0], b[1], a[1])] == ["accepted", "accepted", "complete", "duplicate"]
    assert asm.accepted_update("dev-1") == "ub"
    assert asm.open_updates() == 0


def test_wrong_round_layout_and_update_digest_are_rejected():
    vector = np.ones(8, np.float32)
    asm = ShardAssembler(layout(8, 4))
    stale = make_shards(vector, 4, round_id=4)[0]
    assert asm.add(stale).reason == "stale_round"
    assert asm.add(make_shards(vector, 4, version=1)[0]).reason == "base_version"
    assert asm.add(make_shards(vector, 2)[0]).reason == "shape"  # 4 shards, layout says 2
    assert asm.add(make_shards(vector, 4, codec="raw")[0]).reason == "codec"
    s0, s1 = make_shards(vector, 4)
    forged = replace(s1, update_digest=b"\7" * 16)
    assert asm.add(s0).kind == "accepted"
    assert asm.add(forged).reason == "inconsistent_update"
    # An update whose shard digests do not hash to its update digest is rejected whole.
    t0, t1 = make_shards(vector, 4, update_id="u2")
    lie = b"\x09" * 16
    t0, t1 = replace(t0, update_digest=lie), replace(t1, update_digest=lie)
    asm2 = ShardAssembler(layout(8, 4))
    assert asm2.add(t0).kind == "accepted"
    out = asm2.add(t1)
    assert (out.kind, out.reason) == ("rejected", "update_digest")
    assert asm2.accepted_devices == set() and asm2.open_updates() == 0
