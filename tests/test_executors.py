"""The cores run their parallel work where they are told: inline by default, the helper thread
in the coordinator service, with the same committed models either way.

Scenarios: a service is built around a core (never connected) and its core, the round's
assembler and the round's strategy are checked to hold the helper thread; then the same
federation (same devices, seeds and trainers, over the in-memory broker of tests/sim.py) runs
once with an inline core and once with a core on the helper thread, and every committed model
is compared bit for bit. A watched helper counts the jobs that really ran on the helper thread,
so the threaded run cannot silently be inline too.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest

from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.coordinator.service import CoordinatorService
from fedsync.coordinator.strategies import make_strategy_factory
from fedsync.executor import INLINE, Done
from fedsync.messages import PeerStatus, encode
from fedsync.topics import Topics
from fedsync.transport.parallel import HELPER_THREAD
from tests.sim import Sim

NUM_PARAMS = 200_000  # >= 4 x FedAvg.CHUNK: FedAvg folds two halves through its executor
SHARD_VALUES = 16_384  # 13 shards per update
DEVICES = ["pi-a", "pi-b", "pi-c"]


class WatchedHelper:
    """HELPER_THREAD, noting the thread every job it is handed ran on."""

    def __init__(self) -> None:
        self.ran_on: list[str] = []  # list.append is atomic: both threads write here

    def _watched(self, fn):
        def run(*args):
            self.ran_on.append(threading.current_thread().name)
            return fn(*args)
        return run

    def submit(self, fn):
        return HELPER_THREAD.submit(self._watched(fn))

    def both(self, first, second):
        return HELPER_THREAD.both(first, self._watched(second))

    def split_map(self, fn, items):
        return HELPER_THREAD.split_map(self._watched(fn), items)


def test_the_inline_executor_keeps_an_error_until_result_is_asked():
    done = INLINE.submit(lambda: [][1])
    with pytest.raises(IndexError):
        done.result()
    assert isinstance(done, Done) and INLINE.submit(lambda: 7).result() == 7


def test_a_core_alone_is_inline_and_a_service_hands_it_the_helper_thread():
    topics = Topics("exec")
    core = CoordinatorCore(topics, {"w": np.zeros(NUM_PARAMS, np.float32)},
                           RoundPolicy(rounds=1, target=1, quorum=1, shard_values=SHARD_VALUES),
                           hyper={}, incarnation=1, seed=0,
                           strategy_factory=make_strategy_factory("fedadam", NUM_PARAMS, {}))
    assert core.executor is INLINE
    service = CoordinatorService(core, "mqtt://127.0.0.1:1")  # never started: nothing connects
    assert service.executor is HELPER_THREAD and core.executor is HELPER_THREAD
    core.start(0.0)
    core.on_message(topics.status("pi-a"), encode(PeerStatus("pi-a", "online")), 1.0)
    assert core.round is not None  # the round opened after the service was built
    assert core.round.assembler.executor is HELPER_THREAD and core.round.strategy.executor is HELPER_THREAD


def test_a_service_given_another_executor_hands_that_one_on():
    core = CoordinatorCore(Topics("exec"), {"w": np.zeros(8, np.float32)}, RoundPolicy(rounds=1), hyper={},
                           incarnation=1, seed=0)
    CoordinatorService(core, "mqtt://127.0.0.1:1", executor=INLINE)
    assert core.executor is INLINE


def _noisy_trainer(device_seed: int, num_samples: int):
    """A trainer whose deltas are seeded noise, new every round: float sums whose order would show."""
    calls = []

    def fit(params, hyper):
        calls.append(1)
        rng = np.random.default_rng([device_seed, len(calls)])
        return {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}, num_samples, {}
    return fit


def _run(strategy: str, codec: str, executor) -> list[np.ndarray]:
    policy = RoundPolicy(rounds=3, target=3, quorum=3, shard_values=SHARD_VALUES, update_codec=codec)
    sim = Sim(DEVICES, policy, params={"w": np.zeros(NUM_PARAMS, np.float32)})
    options = {"clip_norm": 50.0, "noise_multiplier": 0.1} if strategy == "dp_fedavg" else {}
    sim.coord = CoordinatorCore(sim.topics, sim.params, policy, hyper={"lr": 0.1}, incarnation=1, seed=0,
                                strategy_factory=make_strategy_factory(strategy, NUM_PARAMS, options,
                                                                       rng=np.random.default_rng(5)),
                                executor=executor, screen=None)  # noise of norm ~450 from a zero model:
    # over the default screen's warm-up bound (100), and the screen is not what this test is about
    sim.trainers = {d: _noisy_trainer(i, 10 * (i + 1)) for i, d in enumerate(DEVICES)}
    sim.start()
    sim.settle()
    closed = sim.closed()
    assert [c.outcome for c in closed] == ["committed"] * 3
    return [c.vector for c in closed]


@pytest.mark.parametrize("strategy,codec", [("fedavg", "zstd"), ("fedadam", "zstd"), ("dp_fedavg", "int8")])
def test_an_inline_core_commits_the_same_models_bit_for_bit_as_a_threaded_one(strategy, codec):
    helper = WatchedHelper()
    inline = _run(strategy, codec, INLINE)
    threaded = _run(strategy, codec, helper)
    assert [v.tobytes() for v in inline] == [v.tobytes() for v in threaded]
    assert not np.array_equal(inline[0], inline[1])  # the models moved: a real comparison
    shards = -(-NUM_PARAMS // SHARD_VALUES)
    # Per update: zstd decodes its even-index shards through the executor; int8 decodes all its
    # shards with split_map when the update completes, the first half here and the second half
    # on the helper; FedAvg folds one half of the model on the helper.
    updates = 3 * len(DEVICES)
    on_helper = (shards + 1) // 2 if codec == "zstd" else shards - shards // 2
    here = 0 if codec == "zstd" else shards // 2
    want = Counter({"fedsync-helper": updates * (on_helper + 1), "MainThread": updates * here})
    assert Counter(helper.ran_on) == want
