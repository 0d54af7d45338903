"""The coordinator's update screen (``fedsync.coordinator.hardening.UpdateScreen``): every
bound and its reason name, float64 norms of huge finite values, meaningless bounds refused;
the default adaptive norm bound (warm-up, median, floor), its state across a restart, and on
the round core: one poisoner among honest devices moves the model by at most its bounded
share, and a non-finite aggregate is never committed.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedsync.coordinator.events import Checkpoint
from fedsync.coordinator.hardening import UpdateScreen


def test_update_screen_accepts_in_bounds_and_names_each_violation():
    screen = UpdateScreen(max_norm=5.0, max_num_samples=100)
    three_four = np.array([3.0, 4.0], np.float32)  # norm exactly 5: the bound is inclusive
    assert screen.check(three_four, 100) is None
    assert screen.check(three_four * 1.001, 1) == "norm_bound"
    assert screen.check(three_four, 101) == "num_samples_bound"
    assert screen.check(three_four, 0) == "num_samples_bound"
    assert screen.check(three_four, True) == "num_samples_bound"
    assert screen.check(three_four, np.int64(7)) is None
    assert screen.check(np.array([np.inf, 0], np.float32), 1) == "not_finite"
    assert screen.check(np.array([np.nan, 0], np.float32), 10**9) == "not_finite"  # first reason wins
    assert screen.check(np.array(["a"]), 1) == "not_finite"
    assert screen(three_four, 100) is None  # callable: the core's screen hook


def test_update_screen_without_a_norm_bound_and_huge_finite_values():
    # float32 squares of 1e20 overflow; the norm is accumulated in float64.
    big = np.full(1000, 1e20, np.float32)
    assert UpdateScreen(multiple=0).check(big, 1) is None  # no norm bound at all
    assert UpdateScreen().check(big, 1) == "norm_bound"  # the default: bounded
    assert UpdateScreen(max_norm=1e21).check(big, 1) == "norm_bound"  # norm ~3.2e21
    assert UpdateScreen(max_norm=1e22).check(big, 1) is None
    assert UpdateScreen(max_norm=1e22).norm(big) == pytest.approx(np.sqrt(1000) * 1e20, rel=1e-6)
    assert UpdateScreen().check(np.zeros(3, np.float32), 1_000_000) is None
    assert UpdateScreen().check(np.zeros(3, np.float32), 1_000_001) == "num_samples_bound"
    assert UpdateScreen(max_num_samples=10_000_000).check(np.zeros(3, np.float32), 10_000_000) is None


def test_the_issue_12_poison_is_refused_by_the_defaults():
    """Every value 3.0e38 and 10,000,000 samples: finite, and accepted before safe defaults."""
    poison, model = np.full(610, 3.0e38, np.float32), np.zeros(610, np.float32)
    assert UpdateScreen(max_num_samples=10_000_000, multiple=0).check(poison, 10_000_000, model) is None  # old
    assert UpdateScreen().check(poison, 10_000_000, model) == "num_samples_bound"
    assert UpdateScreen().check(poison, 100, model) == "norm_bound"
    # A model near float32's limit plus a delta of the same sign would overflow: refused before anything else.
    assert UpdateScreen(multiple=0).check(poison, 100, np.full(610, 1e38, np.float32)) == "overflow"
    assert UpdateScreen(multiple=0).check(-poison, 100, np.full(610, 1e38, np.float32)) == "overflow"  # |w|+|d|
    assert UpdateScreen(multiple=0).check(poison, 100, np.full(610, 4e37, np.float32)) is None  # 3.4e38 fits


def test_the_default_norm_bound_warms_up_on_the_model_then_follows_the_median():
    default = UpdateScreen()
    for _ in range(5):
        assert default.check(np.full(1, 2.0, np.float32), 1) is None
    assert (default.multiple, default.bound()) == (100.0, 200.0)
    s = UpdateScreen(multiple=10)
    assert (s.bound(), s.bound(np.zeros(4, np.float32)), s.bound(np.full(4, 10.0, np.float32))) == (100.0, 100.0,
                                                                                                     2000.0)
    assert s.check(np.full(1, 150.0, np.float32), 1, np.zeros(1, np.float32)) == "norm_bound"  # > 100 x max(1, 0)
    assert s.check(np.full(1, 150.0, np.float32), 1, np.full(1, 2.0, np.float32)) is None  # <= 100 x 2
    for norm in (1.0, 2.0, 3.0, 1000.0):  # refused updates are not remembered; these four pass the warm-up
        assert s.check(np.full(1, norm, np.float32), 1, np.full(1, 20.0, np.float32)) is None
    assert s.state()["norms"].tolist() == [150.0, 1.0, 2.0, 3.0, 1000.0]
    assert s.bound(np.full(1, 20.0, np.float32)) == 10 * 3.0  # the median, whatever the model now
    assert s.check(np.full(1, 30.5, np.float32), 1) == "norm_bound"
    assert s.check(np.full(1, 30.0, np.float32), 1) is None  # inclusive
    assert s.bound() == 10 * (3.0 + 30.0) / 2  # six norms: the median of the middle two


def test_a_minority_at_the_bound_does_not_ratchet_it_up():
    s = UpdateScreen(window=10, warmup=5, multiple=10)
    honest = np.full(1, 1.0, np.float32)
    for _ in range(5):
        assert s.check(honest, 1) is None
    for _ in range(20):  # per round: 3 honest updates, 2 poisoners each sending exactly the bound
        for _ in range(3):
            assert s.check(honest, 1) is None
        for _ in range(2):
            assert s.check(np.full(1, s.bound(), np.float32), 1) is None
    assert s.bound() == 10.0  # still 10 x the honest norm


def test_the_window_floor_and_fixed_bound():
    s = UpdateScreen(window=3, warmup=2, floor=0.5)
    for norm in (0.0, 0.0, 0.0, 0.0):
        assert s.check(np.full(1, norm, np.float32), 1) is None
    assert s.bound() == 0.5  # a median of 0 would refuse every non-zero update
    assert [s.check(np.full(1, x, np.float32), 1) for x in (0.5, 0.6)] == [None, "norm_bound"]
    for _ in range(3):
        assert s.check(np.full(1, 0.25, np.float32), 1) is None
    assert s.state()["norms"].tolist() == [0.25, 0.25, 0.25]  # the window keeps the last 3
    fixed = UpdateScreen(max_norm=7.0)
    assert (fixed.adaptive, fixed.bound(np.full(9, 1e6, np.float32))) == (False, 7.0)
    assert (UpdateScreen().adaptive, UpdateScreen(multiple=0).adaptive, UpdateScreen(multiple=0).bound()) == (
        True, False, None)


def test_the_screen_state_survives_a_checkpoint_and_is_refused_when_foreign(tmp_path):
    from fedsync.coordinator.journal import Journal

    s = UpdateScreen()
    for norm in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        s.check(np.full(1, norm, np.float32), 1)
    ck = Checkpoint(1, np.zeros(2, np.float32), 2, 1, False, {}, {}, {}, s.state())
    Journal(tmp_path).write_checkpoint(ck)
    back = Journal(tmp_path).load().checkpoint
    t = UpdateScreen()
    t.load_state(back.screen_state)
    assert (t.bound(), t.state()["norms"].tolist()) == (350.0, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    t.load_state({})
    assert t.bound() == 100.0
    for bad in ({"norms": [1.0, float("nan")]}, {"norms": [-1.0]}, {"velocity": [1.0]}):
        with pytest.raises(ValueError):
            t.load_state(bad)


@pytest.mark.parametrize("kwargs", [dict(max_norm=0.0), dict(max_norm=-1.0), dict(max_norm=float("nan")),
                                    dict(max_norm=float("inf")), dict(max_num_samples=0),
                                    dict(max_num_samples=1.5), dict(multiple=-1.0), dict(multiple=float("inf")),
                                    dict(window=0), dict(warmup=0), dict(window=3, warmup=4), dict(warmup_norm=0.0),
                                    dict(floor=-0.1), dict(floor=True)])
def test_update_screen_refuses_meaningless_bounds(kwargs):
    with pytest.raises(ValueError):
        UpdateScreen(**kwargs)


# -- on the round core (tests/sim.py: the sans-IO cores over an in-memory broker) ---------------------------

HONEST = {"dev-0": (1.0, 10), "dev-1": (1.0, 20), "dev-2": (2.0, 30), "dev-3": (2.0, 40), "dev-4": (3.0, 50)}
POISONER = "dev-5"
N_PARAMS = 16  # tests/sim.py's model: w (3, 4) and b (4,)


def _poisoned_sim(offset: float, rounds: int):
    from fedsync.coordinator.core import RoundPolicy
    from tests.sim import Sim, offset_trainer

    devices = [POISONER, *HONEST]  # it trains first, so round 1 checks it against the warm-up bound
    sim = Sim(devices, RoundPolicy(rounds=rounds, target=6, quorum=5, min_devices=6, shard_values=5))
    sim.trainers = {d: offset_trainer(o, n) for d, (o, n) in HONEST.items()}
    sim.trainers[POISONER] = offset_trainer(offset, 1_000_000)  # every value moved by `offset`, at the sample cap
    sim.coord.screen = UpdateScreen(multiple=10)  # the default is 100: 10 makes round 2's bound bite
    return sim


def test_one_device_moves_the_model_by_at_most_its_bounded_share_and_the_bound_then_tightens():
    from fedsync.messages import ShardAck, decode

    # Round 1 is the warm-up: B = 100 x max(1, ||0||) = 100. The poisoner's delta has norm 4 x 24.9 = 99.6.
    sim = _poisoned_sim(24.9, rounds=2)
    sim.start()
    sim.settle()
    first, second = sim.closed()
    assert (first.outcome, len(first.accepted), second.outcome, second.accepted) == (
        "committed", 6, "committed", tuple(HONEST))
    total = 1_000_000 + sum(n for _, n in HONEST.values())
    share = 1_000_000 / total
    honest_sum = sum(o * n for o, n in HONEST.values())
    step1 = (honest_sum + np.float32(24.9) * 1_000_000) / total
    # The poisoner's part of the step: share x its delta, of norm share x 99.6 <= B.
    assert first.vector == pytest.approx(np.full(N_PARAMS, step1, np.float32), rel=1e-6)
    assert np.linalg.norm(first.vector) - np.linalg.norm(np.full(N_PARAMS, honest_sum / total)) <= share * 100.0
    # Round 2: six norms remembered (4, 4, 8, 8, 12, 99.6): B = 10 x median = 80 < 99.6, so it is refused.
    ack = decode(sim.retained[sim.topics.ack(POISONER)], ShardAck)
    assert (ack.round_id, ack.status, ack.reason) == (2, "refused", "norm_bound")
    s = sim.coord.stats
    assert (s.updates_accepted, s.updates_refused, s.rejected_by_reason["norm_bound"]) == (11, 1, 1)
    step2 = honest_sum / sum(n for _, n in HONEST.values())
    assert second.vector == pytest.approx(np.full(N_PARAMS, step1 + step2, np.float32), rel=1e-6)


def test_a_poisoner_beyond_the_bound_leaves_the_model_exactly_as_without_it():
    sim = _poisoned_sim(25.1, rounds=1)  # norm 100.4 > 100
    sim.start()
    sim.settle()
    (closed,) = sim.closed()
    assert closed.accepted == tuple(HONEST) and sim.coord.stats.rejected_by_reason["norm_bound"] == 1
    expected = sum(o * n for o, n in HONEST.values()) / sum(n for _, n in HONEST.values())
    assert closed.vector == pytest.approx(np.full(N_PARAMS, expected, np.float32), rel=1e-7)


class _OverflowsOnce:
    """A strategy whose first aggregate is infinite (a strategy's arithmetic gone wrong)."""

    finished = 0

    def __init__(self, n: int) -> None:
        from fedsync.coordinator.aggregate import FedAvg

        self.inner = FedAvg(n)

    def add(self, delta, num_samples) -> None:
        self.inner.add(delta, num_samples)

    def finish(self, global_vector):
        type(self).finished += 1
        new = self.inner.finish(global_vector)
        return np.full_like(new, np.inf) if type(self).finished == 1 else new


def test_a_non_finite_aggregate_abandons_the_round_and_is_never_published():
    from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
    from tests.sim import Sim, offset_trainer

    devices = ["dev-0", "dev-1"]
    sim = Sim(devices, RoundPolicy(rounds=1, target=2, quorum=2, min_devices=2, shard_values=5))
    sim.coord = CoordinatorCore(sim.topics, sim.params, sim.policy, hyper={"lr": 0.1}, incarnation=1, seed=0,
                                strategy_factory=_OverflowsOnce)
    sim.trainers = {d: offset_trainer(1.0, 10) for d in devices}
    sim.start()
    sim.settle()
    first, second = sim.closed()
    assert (first.round_id, first.outcome, first.reason, first.vector) == (1, "abandoned", "non_finite_model", None)
    assert (second.round_id, second.outcome, second.model_version) == (2, "committed", 1)
    assert second.vector == pytest.approx(np.ones(N_PARAMS, np.float32))
    s = sim.coord.stats
    assert (s.rounds_abandoned, s.rounds_committed, s.rejected_by_reason["non_finite_model"]) == (1, 1, 1)
    assert not any("/model/2/" in t for t in sim.retained)  # only v0 then v1 were ever models


def test_a_restored_core_remembers_the_same_norms_and_a_new_one_forgets():
    from fedsync.coordinator.core import CoordinatorCore

    sim = _poisoned_sim(24.9, rounds=1)
    sim.start()
    sim.settle()
    ck = sim.coord.checkpoint()
    assert sorted(ck.screen_state["norms"].tolist()) == pytest.approx([4.0, 4.0, 8.0, 8.0, 12.0, 99.6])
    shared = sim.coord.screen  # one screen object handed to the next incarnation (fedsync.lab does this)
    restarted = CoordinatorCore(sim.topics, sim.params, sim.policy, hyper={}, incarnation=2, seed=0, screen=shared)
    assert shared.bound() == 100.0  # a new core starts with an empty memory ...
    restarted.restore(ck)
    assert shared.state()["norms"].tolist() == ck.screen_state["norms"].tolist()  # ... and loads the checkpoint's
    assert shared.bound() == 80.0
