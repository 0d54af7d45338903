"""Strategy state across a coordinator crash: FedAvgM's velocity, FedAdam's moments, dp_fedavg's noise.

Scenarios on the sans-IO cores over the in-memory broker of tests/sim.py. The crash is
injected mid-round (after round 2 committed, with part of round 3 journalled); the
restarted coordinator is a new core with a new strategy factory, recovered the way
``CoordinatorService._recover`` does it, through a real :class:`Journal` on disk. The
fault-free run is the same scenario without the crash.
"""

from __future__ import annotations

from dataclasses import replace

import cbor2
import numpy as np
import pytest

from fedsync.coordinator.core import Checkpoint, CoordinatorCore, JournalShard, RoundOpened, RoundPolicy
from fedsync.coordinator.journal import Journal
from fedsync.coordinator.strategies import STRATEGY_NAMES, FedAdam, generator_state, make_strategy_factory
from tests.sim import Sim, offset_trainer

DEVICES = ["dev-0", "dev-1", "dev-2"]
SAMPLES = {"dev-0": 10, "dev-1": 30, "dev-2": 60}
SEED = 3
ROUNDS = 5
CRASH_AFTER_ROUND = 2  # committed rounds before the crash; round 3 is open and partly journalled
SHARDS_BEFORE_CRASH = 6  # of round 3 (4 shards per update): one update complete, one half there
STATEFUL = {
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9},
    "fedadam": {"server_lr": 0.05},
    "dp_fedavg": {"clip_norm": 1.0, "noise_multiplier": 0.5},
}


def pull_trainer(device_index: int, num_samples: int):
    """A trainer that moves the model halfway to its own target: deltas change every round."""
    def fit(params, hyper):
        new = {}
        for name, value in params.items():
            target = np.linspace(-1.0, 2.0, value.size, dtype=np.float32).reshape(value.shape) * (device_index + 1)
            new[name] = value + np.float32(0.5) * (target - value)
        return new, num_samples, {"train_loss": 0.0}
    return fit


def _factory(name: str):
    # A restarted process builds its factory again from the config: a fresh generator, same seed.
    return make_strategy_factory(name, 16, STATEFUL.get(name, {}), np.random.default_rng(SEED))


def _core(sim: Sim, factory, incarnation: int) -> CoordinatorCore:
    return CoordinatorCore(sim.topics, sim.params, sim.policy, hyper={"lr": 0.1}, incarnation=incarnation,
                           seed=0, strategy_factory=factory)


def _sim(name: str, trainer=pull_trainer, rounds: int = ROUNDS) -> Sim:
    sim = Sim(DEVICES, RoundPolicy(rounds=rounds, target=3, quorum=3, min_devices=3, shard_values=5))
    sim.trainers = {d: trainer(i, SAMPLES[d]) for i, d in enumerate(DEVICES)}
    sim.coord = _core(sim, _factory(name), incarnation=1)
    return sim


def _journalled_since_open(sim: Sim) -> list[JournalShard]:
    opened = max(i for i, e in enumerate(sim.events) if isinstance(e, RoundOpened))
    return [e for e in sim.events[opened:] if isinstance(e, JournalShard)]


def _crash_and_recover(sim: Sim, state_dir, name: str, keep_strategy_state: bool = True) -> None:
    """Run until round 3 is partly journalled, kill the coordinator, recover a new one from disk.

    What the crashed service had made durable goes through a real Journal: the last
    checkpoint, then the open round's manifest and shards. Messages still queued for the
    coordinator stay queued: the broker redelivers what was never acknowledged."""
    while not (len(sim.closed()) == CRASH_AFTER_ROUND and len(_journalled_since_open(sim)) >= SHARDS_BEFORE_CRASH):
        assert sim.step(), "the federation went idle before the crash point"
    journal = Journal(state_dir)
    journal.write_checkpoint([e for e in sim.events if isinstance(e, Checkpoint)][-1])
    journal.open_round([e for e in sim.events if isinstance(e, RoundOpened)][-1].manifest)
    for shard in _journalled_since_open(sim):
        journal.append(shard.topic, shard.payload)
    journal.sync()
    rec = Journal(state_dir).load()
    assert rec.manifest.round_id == CRASH_AFTER_ROUND + 1 and len(rec.shards) == SHARDS_BEFORE_CRASH

    core = _core(sim, _factory(name), incarnation=2)
    core.restore(rec.checkpoint if keep_strategy_state else replace(rec.checkpoint, strategy_state={}))
    core.resume_round(rec.manifest, sim.now)
    actions = []
    for topic, payload in rec.shards:
        actions += [a for a in core.on_message(topic, payload, sim.now) if not isinstance(a, JournalShard)]
    sim.coord = core
    for d in DEVICES:  # the new coordinator learns presence from the retained statuses
        sim.queue.append(("coordinator", sim.topics.status(d), sim.retained[sim.topics.status(d)]))
    sim.run("coordinator", actions + core.start(sim.now))


def _final_model(name: str, crash_dir=None, keep_strategy_state: bool = True) -> np.ndarray:
    sim = _sim(name)
    sim.start()
    if crash_dir is not None:
        _crash_and_recover(sim, crash_dir, name, keep_strategy_state)
    sim.settle()
    s = sim.coord.stats
    assert (s.rounds_committed, s.rounds_abandoned, sim.coord.finished) == (ROUNDS, 0, True)
    return sim.coord.vector


@pytest.mark.parametrize("name", list(STATEFUL))
def test_coordinator_crash_mid_round_ends_with_the_fault_free_model_bit_for_bit(name, tmp_path):
    clean = _final_model(name)
    recovered = _final_model(name, tmp_path)
    # Bit for bit: the replayed round folds the same updates in the same order as the fault-free
    # one, and the state went through the checkpoint as raw float64 bytes (or exact generator words).
    assert recovered.tobytes() == clean.tobytes()
    assert not np.array_equal(clean, np.zeros_like(clean))


@pytest.mark.parametrize("name", list(STATEFUL))
def test_positive_control_recovering_without_the_strategy_state_gives_another_model(name, tmp_path):
    """The scenario above can fail: the same crash, restored as checkpoints were before
    strategy state was kept (FedAdam from fresh moments, dp_fedavg drawing round 1's noise again)."""
    clean = _final_model(name)
    forgetful = _final_model(name, tmp_path, keep_strategy_state=False)
    assert np.max(np.abs(forgetful - clean)) > 0.01


def test_checkpoints_hold_the_state_after_each_step_and_an_abandoned_round_leaves_it_alone():
    """FedAvgM, offset trainers: round 1's mean delta is (10*1 + 30*2 + 60*4) / 100 = 3.1 (as float32:
    the mean goes through FedAvg's float32 result).
    Round 2 is abandoned at its deadline (dev-2 never finishes training): its two updates reached
    the optimiser's round accumulator, and must not reach the velocity. Round 3 commits."""
    sim = _sim("fedavgm", trainer=lambda i, n: offset_trainer([1.0, 2.0, 4.0][i], n), rounds=2)
    sim.start()
    while len(sim.closed()) < 1:
        assert sim.step()
    sim.stalled.add("dev-2")
    sim.settle()
    sim.advance(61.0)  # round 2's deadline, with 2 of 3 updates (quorum 3)
    sim.stalled.clear()
    sim.settle()
    assert [(c.round_id, c.outcome, len(c.accepted)) for c in sim.closed()] == [
        (1, "committed", 3), (2, "abandoned", 2), (3, "committed", 3)]
    after_1, after_2, after_3 = (e.strategy_state for e in sim.events if isinstance(e, Checkpoint))
    step = float(np.float32(3.1))
    assert (after_1["steps"], after_1["velocity"].tolist()) == (1, [step] * 16)
    assert after_2["steps"] == 1 and after_2["velocity"].tobytes() == after_1["velocity"].tobytes()
    assert after_3["steps"] == 2
    np.testing.assert_allclose(after_3["velocity"], 0.9 * step + 3.1, rtol=1e-6)
    # Each checkpoint is the post-step state at its round's close, and a copy: the in-place
    # step of round 3 left round 1's checkpoint as it was.
    opt = sim.coord._strategy_factory.optimizer
    assert after_3["velocity"].tobytes() == opt.velocity.tobytes() and after_3["velocity"] is not opt.velocity


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_only_fedavgm_fedadam_and_dp_fedavg_carry_state_from_one_round_to_the_next(name):
    options = STATEFUL.get(name, {"num_byzantine": 0} if "krum" in name else {})
    factory = make_strategy_factory(name, 3, options, np.random.default_rng(SEED))
    s = factory(3)
    for d in ([1, 2, 3], [2, 2, 2], [0, 1, 0]):
        s.add(np.array(d, np.float32), 1)
    assert s.finish(np.zeros(3, np.float32)) is not None
    keys = {"fedavgm": ["steps", "velocity"], "fedadam": ["m", "steps", "v"],
            "dp_fedavg": ["rng.bit_generator", "rng.has_uint32", "rng.state.inc", "rng.state.state", "rng.uinteger"]}
    assert sorted(factory.state()) == keys.get(name, [])
    factory.load_state({})  # an old checkpoint: nothing to load, nothing changes
    assert sorted(factory.state()) == keys.get(name, [])


def test_journal_round_trip_keeps_strategy_state_exactly(tmp_path):
    opt = FedAdam(3)
    opt.m += np.array([0.1, -2.5, 1e-300])
    state = {**opt.state(), **generator_state(np.random.default_rng(12345))}
    mt = generator_state(np.random.Generator(np.random.MT19937(7)))  # a uint32 array and an int
    ck = Checkpoint(4, np.arange(3, dtype=np.float32), 6, 5, False, {5: {"dev-0": "u1"}}, {"rounds_committed": 4},
                    {**state, **{"mt." + k: v for k, v in mt.items()}})
    Journal(tmp_path).write_checkpoint(ck)
    back = Journal(tmp_path).load().checkpoint.strategy_state
    assert sorted(back) == sorted(ck.strategy_state)
    for key, value in ck.strategy_state.items():
        if isinstance(value, np.ndarray):
            assert (back[key].dtype, back[key].shape) == (value.dtype, value.shape)
            assert back[key].tobytes() == value.tobytes() and back[key].flags.writeable
        else:
            assert back[key] == value and type(back[key]) is type(value)
    assert back["rng.state.state"] >= 1 << 64 or back["rng.state.inc"] >= 1 << 64  # a 128-bit PCG64 word


def test_a_checkpoint_written_before_strategy_state_existed_loads_with_none(tmp_path):
    old = {"version": 2, "vector": np.ones(16, "<f4").tobytes(), "next_round_id": 3, "closed_through": 2,
           "finished": False, "recent": {2: {"dev-0": "u7"}}, "stats": {"rounds_committed": 2}}
    (tmp_path / "checkpoint.cbor").write_bytes(cbor2.dumps(old))
    ck = Journal(tmp_path).load().checkpoint
    assert ck.strategy_state == {} and ck.version == 2
    sim = _sim("fedadam")
    sim.coord.restore(ck)  # the optimiser keeps its initial moments, as every restart did before
    opt = sim.coord._strategy_factory.optimizer
    assert (opt.steps, opt.m.tolist(), sim.coord.version) == (0, [0.0] * 16, 2)


def test_state_of_another_strategy_is_refused_before_anything_is_restored():
    sim = _sim("fedadam")
    sim.start()
    sim.settle()
    ck = [e for e in sim.events if isinstance(e, Checkpoint)][-1]
    for other in ("fedavgm", "fedavg", "dp_fedavg"):
        core = _core(sim, _factory(other), incarnation=2)
        with pytest.raises(ValueError, match="checkpoint holds|does not fit|unexpected entry"):
            core.restore(ck)
        assert (core.version, core.stats.rounds_committed) == (0, 0)
