"""Old and new peers: manifest keys added within v1, and what each side does with another
schema version (docs/protocol.md, "Versions").

A key added after the first v1 release is written only when set, so a v1 device from before
it (its decoder rejects unknown keys) still reads the manifest of a coordinator that does
not use it; ``resend_after`` is such a key, and the model codec is set apart from the
update codec.
"""

from __future__ import annotations

from dataclasses import replace

import cbor2
import numpy as np
import pytest

from fedsync import messages
from fedsync.actions import Publish
from fedsync.config import ConfigError, load_config
from fedsync.coordinator.config import CoordinatorConfig
from fedsync.coordinator.core import RoundPolicy
from fedsync.device_agent.agent import Note
from fedsync.errors import ProtocolError
from fedsync.messages import ModelShard, RoundManifest, ShardAck, decode, encode
from tests.sim import Sim, offset_trainer

# The manifest's keys in the first v1 release (docs/vectors of commit 6ecfabe).
FIRST_V1_MANIFEST_KEYS = {"v", "t", "federation", "round_id", "incarnation", "state", "mode", "model_version",
                          "model_digest", "model_codec", "model_shards", "param_spec", "num_params", "shard_values",
                          "update_codec", "update_qos", "deadline", "issued_at", "quorum", "target", "selected",
                          "hyper", "delta_from"}


def make_sim(**policy) -> Sim:
    sim = Sim(["dev-0", "dev-1"], RoundPolicy(**{"rounds": 1, "target": 2, "quorum": 2, "min_devices": 2,
                                                 "shard_values": 5, **policy}))
    sim.trainers = {"dev-0": offset_trainer(1.0, 10), "dev-1": offset_trainer(3.0, 30)}
    return sim


def manifests(sim: Sim) -> list[bytes]:
    seen: list[bytes] = []
    inner = sim.on_publish

    def hook(sender: str, p: Publish) -> list[Publish]:
        if p.topic == sim.topics.manifest:
            seen.append(p.payload)
        return inner(sender, p) if inner else [p]

    sim.on_publish = hook
    return seen


# -- resend_after ------------------------------------------------------------------------------

def test_a_coordinator_without_resend_after_writes_only_the_first_v1_keys():
    sim = make_sim()
    seen = manifests(sim)
    sim.start()
    sim.settle()
    assert [decode(p, RoundManifest).state for p in seen] == ["waiting", "open", "finished"]
    assert all(set(cbor2.loads(p)) == FIRST_V1_MANIFEST_KEYS for p in seen)


def test_a_manifest_with_resend_after_decodes_and_re_encodes_to_the_same_bytes():
    sim = make_sim(resend_after=2.5)
    seen = manifests(sim)
    sim.start()
    sim.settle()
    assert all(set(cbor2.loads(p)) == FIRST_V1_MANIFEST_KEYS | {"resend_after"} for p in seen)
    m = decode(seen[1], RoundManifest)
    assert m.resend_after == 2.5 and encode(m) == seen[1]
    assert encode(replace(m, resend_after=None)) != seen[1]


def _lose_dev1_shard(sim: Sim) -> list[str]:
    lost: list[str] = []

    def hook(sender: str, p: Publish) -> list[Publish]:
        if sender == "dev-1" and "/up/" in p.topic and p.topic.endswith("/2") and not lost:
            lost.append(p.topic)
            return []
        return [p]

    sim.on_publish = hook
    return lost


@pytest.mark.parametrize("manifest_says, resent_after", [(2.0, 2.0), (None, 5.0)])
def test_the_agent_re_sends_after_the_manifests_resend_after_else_its_own(manifest_says, resent_after):
    sim = make_sim(resend_after=manifest_says)  # the agents' own resend_after is 5 s (tests/sim.py)
    lost = _lose_dev1_shard(sim)
    sim.start()
    sim.settle()
    agent = sim.agents["dev-1"]
    assert lost and sim.closed() == [] and agent.resend_window == resent_after
    sim.advance(resent_after - 0.5)
    assert agent.stats.shards_resent == 0
    sim.advance(0.5)
    assert agent.stats.shards_resent == 1  # only the shard the coordinator does not hold
    (closed,) = sim.closed()
    assert closed.accepted == ("dev-0", "dev-1")


def test_a_lost_model_shard_is_fetched_again_after_the_manifests_resend_after():
    sim = make_sim(resend_after=1.5)
    sim.start()
    for _ in range(10_000):  # lose dev-1's first model shard in flight
        hit = [i for i, (c, t, _) in enumerate(sim.queue) if c == "dev-1" and "/model/" in t]
        if hit:
            del sim.queue[hit[0]]
            break
        assert sim.step()
    sim.settle()
    agent = sim.agents["dev-1"]
    assert agent.state == "fetching"
    sim.advance(1.5)  # not the agent's own 5 s
    assert agent.stats.refetches == 1 and sim.closed()[0].accepted == ("dev-0", "dev-1")


@pytest.mark.parametrize("value, problem", [(0.05, "must be in [0.1, 3600], got 0.05"),
                                            (3601.0, "must be in [0.1, 3600], got 3601.0")])
def test_round_resend_after_out_of_range_is_one_line_naming_the_key(tmp_path, value, problem):
    path = tmp_path / "coordinator.toml"
    path.write_text(f"[round]\nresend_after = {value}\n")
    with pytest.raises(ConfigError) as err:
        load_config(CoordinatorConfig, path)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(f"round.resend_after: {problem}")


def test_round_resend_after_and_model_codec_from_the_config_file(tmp_path):
    path = tmp_path / "coordinator.toml"
    path.write_text('[round]\nresend_after = 4.0\nmodel_codec = "raw"\nupdate_codec = "topk"\n')
    r = load_config(CoordinatorConfig, path).round
    assert (r.resend_after, r.model_codec, r.update_codec) == (4.0, "raw", "topk")
    assert load_config(CoordinatorConfig, None).round.resend_after is None


# -- the model codec, apart from the update codec -------------------------------------------------

@pytest.mark.parametrize("update_codec", ["zstd", "raw"])
def test_a_raw_model_is_plain_float32_for_a_device_without_zstd(update_codec):
    params = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.arange(4, dtype=np.float32)}
    sim = Sim(["dev-0"], RoundPolicy(rounds=1, target=1, quorum=1, shard_values=5, model_codec="raw",
                                     update_codec=update_codec), params=params)
    sim.trainers = {"dev-0": offset_trainer(0.5, 10)}
    inner = manifests(sim)
    sim.start()
    sim.settle()
    shards = [decode(p, ModelShard) for t, p in sim.retained.items() if "/model/" in t]
    m = decode(inner[1], RoundManifest)
    assert (m.model_codec, m.update_codec) == ("raw", update_codec)
    flat = np.concatenate([params["b"], params["w"].ravel()]) + np.float32(0.5)  # version 1, sorted by name
    assert sorted(s.index for s in shards) == [0, 1, 2, 3] and {(s.codec, s.version) for s in shards} == {("raw", 1)}
    for s in shards:  # what a device without zstd reads: the float32 values, little-endian
        assert s.data == flat[s.offset:s.offset + s.length].astype("<f4").tobytes()
    assert sim.closed()[0].accepted == ("dev-0",)


# -- versions ---------------------------------------------------------------------------------

def _with_v(payload: bytes, v: int) -> bytes:
    return cbor2.dumps({**cbor2.loads(payload), "v": v})


def test_a_v1_coordinator_answers_a_v2_device_with_receipts_naming_v():
    sim = make_sim(rounds=2, quorum=1)
    receipts: list[ShardAck] = []

    def hook(sender: str, p: Publish) -> list[Publish]:
        if sender == "coordinator" and p.topic == sim.topics.ack("dev-1"):
            assert cbor2.loads(p.payload)["v"] == 1  # written in the coordinator's own version
            receipts.append(decode(p.payload, ShardAck))
        if sender == "dev-1" and "/up/" in p.topic and not receipts:
            return [Publish(p.topic, _with_v(p.payload, 2), p.qos, p.retain)]  # its first update, as a v2 device
        return [p]

    sim.on_publish = hook
    sim.start()
    sim.settle()
    uid = receipts[0].update_id
    assert receipts == [ShardAck("dev-1", 1, uid, 4, b"\x00", "rejected", "v:schema_version")]
    s = sim.coord.stats
    assert (s.rejected_by_reason["schema_version"], s.receipts_suppressed) == (4, 3)
    agent = sim.agents["dev-1"]  # (ours stands in for the device: it reads the receipt and stops)
    assert (agent.stats.updates_given_up, agent.stats.shards_sent) == (1, 4)
    sim.advance(61.0)  # round 1 commits at its deadline without dev-1; round 2 (v1 shards) takes it
    assert [(c.outcome, c.accepted) for c in sim.closed()] == [("committed", ("dev-0",)),
                                                                ("committed", ("dev-0", "dev-1"))]


def test_a_v2_status_gets_a_receipt_and_the_device_is_not_counted_online():
    sim = make_sim()

    def hook(sender: str, p: Publish) -> list[Publish]:
        if sender == "dev-1" and p.topic == sim.topics.status("dev-1"):
            return [Publish(p.topic, _with_v(p.payload, 2), 1, True)]
        return [p]

    sim.on_publish = hook
    sim.start()
    sim.settle()
    ack = decode(sim.retained[sim.topics.ack("dev-1")], ShardAck)
    assert ack == ShardAck("dev-1", 0, "status", 1, b"\x00", "rejected", "v:schema_version")
    assert sim.coord.online == {"dev-0"} and sim.closed() == []


def test_a_v1_device_ignores_a_v2_manifest_notes_it_once_and_takes_part_again_on_v1():
    sim = make_sim(rounds=2)
    v2 = {"on": True}

    def hook(sender: str, p: Publish) -> list[Publish]:
        if sender == "coordinator" and p.topic == sim.topics.manifest and v2["on"]:
            return [Publish(p.topic, _with_v(p.payload, 2), 1, True)]
        return [p]

    sim.on_publish = hook
    sim.start()
    sim.settle()
    agent = sim.agents["dev-1"]
    notes = [e for e in sim.events if isinstance(e, Note) and e.event == "manifest_unsupported"]
    # Both agents saw the waiting and the open manifest in v2: one note each, nothing fetched.
    assert [n.fields for n in notes] == [{"error": "v: schema_version (got 2, this build reads 1 to 1)"}] * 2
    assert (agent.state, agent.manifest, agent.stats.model_fetches, agent.stats.bad_messages) == ("idle", None, 0, 2)
    assert sim.coord.round is not None and sim.closed() == []
    v2["on"] = False
    sim.run("coordinator", sim.coord.retained_state(sim.now))  # the coordinator writes v1 again
    sim.settle()
    assert [c.accepted for c in sim.closed()] == [("dev-0", "dev-1"), ("dev-0", "dev-1")]


def test_a_v2_build_reads_v1_writes_v1_and_refuses_v3(monkeypatch):
    # What a later build with SCHEMA = 2 does under rule 2, emulated on this one: the v1
    # updates of today's devices federate unchanged, and what it writes stays v1.
    monkeypatch.setattr(messages, "SCHEMA", 2)
    sim = make_sim()
    inner = manifests(sim)
    sim.start()
    sim.settle()
    written = {cbor2.loads(p)["v"] for p in list(sim.retained.values()) + inner}
    assert written == {1} and sim.closed()[0].accepted == ("dev-0", "dev-1")
    m = decode(inner[0], RoundManifest)
    assert decode(_with_v(inner[0], 2), RoundManifest) == m
    with pytest.raises(ProtocolError, match=r"v: schema_version \(got 3, this build reads 1 to 2\)"):
        decode(_with_v(inner[0], 3), RoundManifest)
    for bad in (0, -1, 1.0, True, "1"):
        with pytest.raises(ProtocolError) as err:
            decode(_with_v(inner[0], bad), RoundManifest)
        assert (err.value.field, err.value.reason) == ("v", "schema_version")
