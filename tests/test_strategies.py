"""Aggregation strategies: hand-computed rounds, Byzantine scenarios, spool files, state, DP noise."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsync.coordinator.aggregate import FedAvg
from fedsync.coordinator.spool import UpdateSpool, disk_spool
from fedsync.coordinator.strategies import (
    STRATEGY_NAMES, CentralDP, FedAdam, FedAvgM, Krum, Median, MemorySpool, TrimmedMean, clip_by_norm,
    coordinate_median, gaussian_noise, krum_scores, make_strategy_factory, multi_krum, trimmed_mean,
)

F32 = np.float32


def run_round(strategy, deltas, global_vector, num_samples=None):
    """Feed one round's deltas (rows) and return ``finish``."""
    for i, d in enumerate(deltas):
        strategy.add(np.asarray(d, F32), 1 if num_samples is None else num_samples[i])
    return strategy.finish(np.asarray(global_vector, F32))


# Five points whose squared distances are small integers (worked by hand below).
KRUM_POINTS = np.array([[0, 0], [2, 0], [0, 1], [1, 1], [8, 6]], F32)
# distances: ab=4 ac=1 ad=2 ae=100 | bc=5 bd=2 be=72 | cd=1 ce=89 | de=74
# f=1, K-f-2=2 nearest: a 1+2=3, b 2+4=6, c 1+1=2, d 1+2=3, e 72+74=146


# -- pure functions ------------------------------------------------------------------


def test_coordinate_median_odd_and_even_counts():
    odd = np.array([[1, 2, 3], [4, -1, 0], [2, 5, -3]], F32)
    assert coordinate_median(odd).tolist() == [2.0, 2.0, 0.0]
    even = np.vstack([odd, [[0, 0, 10]]])  # middle pairs (1,2) (0,2) (0,3)
    assert coordinate_median(even).tolist() == [1.5, 1.0, 1.5]


def test_trimmed_mean_drops_floor_of_fraction_per_side():
    u = np.array([[1, 0, -2, 3], [2, 10, -1, 3], [3, -10, 0, 3], [100, 1, 1, 3], [-50, 2, 2, 3]], F32)
    assert trimmed_mean(u, 0.2).tolist() == [2.0, 1.0, 0.0, 3.0]  # K=5: one off each end
    assert trimmed_mean(u[:4], 0.2).tolist() == [26.5, 0.25, -0.5, 3.0]  # K=4: floor(0.8)=0, plain mean
    # 0.29 * 100 is 28.999999999999996 in floating point: still 29 off each end, not 28.
    outliers = np.array([-1.0] * 29 + [0.0] * 42 + [3.0] * 29, F32)[:, None]
    assert trimmed_mean(outliers, 0.29).tolist() == [0.0]
    for bad in (-0.1, 0.5):
        with pytest.raises(ValueError, match="trim_fraction"):
            trimmed_mean(u, bad)


def test_krum_scores_and_multi_krum_by_hand():
    assert krum_scores(KRUM_POINTS, 1).tolist() == [3.0, 6.0, 2.0, 3.0, 146.0]
    # Reading one column at a time gives the same scores.
    assert krum_scores(KRUM_POINTS, 1, block_values=1).tolist() == [3.0, 6.0, 2.0, 3.0, 146.0]
    assert multi_krum(KRUM_POINTS, 1, 1).tolist() == [0.0, 1.0]  # c
    assert multi_krum(KRUM_POINTS, 1, 2).tolist() == [0.0, 0.5]  # c, then a before d (tie at 3)
    np.testing.assert_allclose(multi_krum(KRUM_POINTS, 1, 3), [1 / 3, 2 / 3], rtol=1e-15)  # c, a, d


def test_krum_refuses_too_few_updates():
    with pytest.raises(ValueError, match=r"needs at least 5 updates \(2f \+ 2 < K\), got 4"):
        krum_scores(KRUM_POINTS[:4], 1)
    with pytest.raises(ValueError, match=r"m must be in \[1, 5\]"):
        multi_krum(KRUM_POINTS, 1, 6)


def test_clip_by_norm_scales_long_deltas_only():
    long = np.array([6, 8, 0], F32)
    clipped = clip_by_norm(long, 5.0)
    assert clipped.dtype == F32 and clipped.tolist() == [3.0, 4.0, 0.0]
    short = np.array([0.3, 0.4], F32)
    assert clip_by_norm(short, 5.0) is short
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_norm(short, 0.0)


def test_gaussian_noise_uses_only_the_given_rng():
    a = gaussian_noise(5, 2.0, np.random.default_rng(3))
    b = gaussian_noise(5, 2.0, np.random.default_rng(3))
    assert a.tolist() == b.tolist() and a.dtype == np.float64
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(5, -1.0, np.random.default_rng(3))


# -- strategies: hand-computed rounds --------------------------------------------------


def test_median_round():
    deltas = [[1, 2, 3], [4, -1, 0], [2, 5, -3], [0, 0, 10]]
    assert run_round(Median(3), deltas, [10, 10, 10]).tolist() == [11.5, 11.0, 11.5]


def test_trimmed_mean_round_ignores_num_samples():
    deltas = [[1, 0, -2, 3], [2, 10, -1, 3], [3, -10, 0, 3], [100, 1, 1, 3], [-50, 2, 2, 3]]
    out = run_round(TrimmedMean(4, trim_fraction=0.2), deltas, [1, 1, 1, 1], num_samples=[1, 1, 1, 10**9, 1])
    assert out.tolist() == [3.0, 2.0, 1.0, 4.0]


def test_krum_and_multi_krum_rounds_report_the_winners():
    krum = Krum(2, num_byzantine=1)
    assert run_round(krum, KRUM_POINTS, [1, 1]).tolist() == [1.0, 2.0]
    assert krum.selected.tolist() == [2] and krum.scores.tolist() == [3.0, 6.0, 2.0, 3.0, 146.0]
    multi = Krum(2, num_byzantine=1, multi=None)  # m = K - f = 4: all but e
    assert run_round(multi, KRUM_POINTS, [0, 0]).tolist() == [0.75, 0.5]
    assert multi.selected.tolist() == [0, 1, 2, 3]


def test_krum_with_fewer_than_2f_plus_3_updates_keeps_the_model_and_its_spool_is_gone():
    krum = Krum(2, num_byzantine=1, spool=disk_spool())
    assert krum.min_updates == 5
    for d in KRUM_POINTS[:4]:
        krum.add(d, 1)
    path = krum.spool.path
    assert path.exists()
    assert krum.finish(np.zeros(2, F32)) is None
    assert not path.parent.exists()


def test_clip_norm_option_clips_on_add():
    s = Median(2, clip_norm=1.0)
    assert run_round(s, [[3, 4], [30, 40], [0, 0.5]], [0, 0]).tolist() == [0.6000000238418579, 0.800000011920929]


@pytest.mark.parametrize("cls", [Median, TrimmedMean, Krum])
def test_no_update_means_keep_the_previous_model(cls):
    assert cls(3).finish(np.ones(3, F32)) is None


def test_central_dp_without_noise_is_the_clipped_unweighted_mean():
    s = CentralDP(2, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    out = run_round(s, [[3, 4], [0, 0.5]], [1, 1], num_samples=[1000, 1])  # [0.6, 0.8] and [0, 0.5]
    assert out.tolist() == [1.2999999523162842, 1.649999976158142]  # float32(1.3), float32(1.65)
    assert s.noise_std == 0.0


@pytest.mark.parametrize("k", [1, 4])
def test_central_dp_noise_std_is_multiplier_times_clip_over_k(k):
    """sigma = z * C / K, measured on 200k coordinates (the std estimate's own error is 0.16%)."""
    p, z, c = 200_000, 1.5, 2.0
    rng = np.random.default_rng(42)
    deltas = rng.normal(0.0, 0.01, size=(k, p)).astype(F32)  # norm ~4.5: every delta gets clipped
    expected_mean = np.mean([clip_by_norm(d.astype(np.float64), c) for d in deltas], axis=0)
    s = CentralDP(p, clip_norm=c, noise_multiplier=z, rng=np.random.default_rng(7))
    noise = run_round(s, deltas, np.zeros(p)).astype(np.float64) - expected_mean
    sigma = z * c / k
    assert s.noise_std == sigma
    assert abs(noise.std() / sigma - 1.0) < 0.01
    assert abs(noise.mean()) < 0.01 * sigma


def test_central_dp_same_seed_same_model():
    outs = [run_round(CentralDP(3, 1.0, 1.0, np.random.default_rng(5)), [[1, 2, 3]], [0, 0, 0]) for _ in range(2)]
    assert outs[0].tolist() == outs[1].tolist()


# -- server optimisers: state across rounds ---------------------------------------------


def test_fedavgm_momentum_carries_into_the_second_round():
    new_round = FedAvgM(2, server_lr=0.5, momentum=0.9).factory()
    # Round 1: weighted mean of [2,0]x1 and [0,4]x3 = [0.5, 3]; v = [0.5, 3]; x = [1,1] + 0.5 v.
    x1 = run_round(new_round(2), [[2, 0], [0, 4]], [1, 1], num_samples=[1, 3])
    assert x1.tolist() == [1.25, 2.5]
    # Round 2: mean [1, -1]; v = 0.9 [0.5, 3] + [1, -1] = [1.45, 1.7]; x = x1 + 0.5 v.
    x2 = run_round(new_round(2), [[1, -1]], x1, num_samples=[2])
    np.testing.assert_allclose(x2, [1.975, 3.35], rtol=1e-7)


def test_fedavgm_abandoned_and_empty_rounds_leave_the_state_alone():
    opt = FedAvgM(1, server_lr=1.0, momentum=0.5)
    new_round = opt.factory()
    assert run_round(new_round(1), [[2]], [0]).tolist() == [2.0]  # v = 2
    abandoned = new_round(1)
    abandoned.add(np.array([1000.0], F32), 1)  # the core drops it without finish
    assert new_round(1).finish(np.array([2.0], F32)) is None  # empty round: keep the model
    assert opt.velocity.tolist() == [2.0] and opt.steps == 1
    assert run_round(new_round(1), [[2]], [2]).tolist() == [5.0]  # v = 0.5*2 + 2 = 3


def test_fedadam_moments_carry_into_the_second_round():
    new_round = FedAdam(2, server_lr=0.6, beta1=0.5, beta2=0.5, tau=1.0).factory()
    # Round 1: d = [1, 7]; m = [0.5, 3.5]; v = 0.5*1 + 0.5*[1, 49] = [1, 25]; step 0.6 m / ([1, 5] + 1).
    x1 = run_round(new_round(2), [[0, 7], [2, 7]], [0, 0])
    np.testing.assert_allclose(x1, [0.15, 0.35], rtol=1e-7)
    # Round 2: d = [-1, 5]; m = [-0.25, 4.25]; v = [1, 25]; step = [-0.075, 0.425].
    x2 = run_round(new_round(2), [[-1, 5]], x1)
    np.testing.assert_allclose(x2, [0.075, 0.775], rtol=1e-6)
    # Fresh state would have given m = [-0.5, 2.5], v = [1, 13]: a different model.
    fresh = run_round(FedAdam(2, server_lr=0.6, beta1=0.5, beta2=0.5, tau=1.0), [[-1, 5]], x1)
    assert not np.allclose(fresh, x2)


def test_server_optimizer_refuses_a_model_of_another_size():
    with pytest.raises(ValueError, match="holds state for 2 parameters, the round has 3"):
        FedAvgM(2).factory()(3)


# -- Byzantine scenario -------------------------------------------------------------------


def byzantine_round():
    """10 updates: 8 honest around 1.0 (std 0.1), 2 Byzantine = honest x -100 claiming 1000x samples."""
    rng = np.random.default_rng(2024)
    honest = (1.0 + 0.1 * rng.standard_normal((8, 50))).astype(F32)
    byzantine = -100.0 * honest[:2]
    deltas = np.vstack([byzantine, honest])  # attackers first: tie-breaks do not favour them
    samples = [10_000, 10_000] + [10] * 8
    return deltas, samples, honest.astype(np.float64).mean(axis=0)


@pytest.mark.parametrize("name, options", [
    ("median", {}), ("trimmed_mean", {"trim_fraction": 0.2}),
    ("krum", {"num_byzantine": 2}), ("multi_krum", {"num_byzantine": 2}),
])
def test_robust_rules_stay_near_the_honest_mean_under_20_percent_byzantine(name, options):
    deltas, samples, honest_mean = byzantine_round()
    strategy = make_strategy_factory(name, 50, options)(50)
    out = run_round(strategy, deltas, np.zeros(50), samples).astype(np.float64)
    error = np.linalg.norm(out - honest_mean) / np.linalg.norm(honest_mean)
    assert error < 0.15, error
    if name == "multi_krum":  # m = K - f = 8: exactly the honest updates
        assert strategy.selected.tolist() == list(range(2, 10)) and error < 1e-6


@pytest.mark.parametrize("weighted", [True, False])
def test_fedavg_is_dragged_far_from_the_honest_mean(weighted):
    deltas, samples, honest_mean = byzantine_round()
    out = run_round(FedAvg(50, weighted=weighted), deltas, np.zeros(50), samples).astype(np.float64)
    error = np.linalg.norm(out - honest_mean) / np.linalg.norm(honest_mean)
    assert error > 15, error  # unweighted: ~(8 - 200)/10 - 1 = -20.2 per coordinate


# -- the disk spool ------------------------------------------------------------------------


def test_spool_file_is_created_grown_in_chunks_and_removed_on_finish(tmp_path):
    s = Median(4, spool=disk_spool(str(tmp_path), chunk_rows=2))
    assert s.spool.path is None and list(tmp_path.iterdir()) == []  # nothing until the first update
    deltas = np.arange(20, dtype=F32).reshape(5, 4)
    sizes = []
    for d in deltas:
        s.add(d, 1)
        sizes.append(s.spool.path.stat().st_size)
    path = s.spool.path
    assert path.parent.parent == tmp_path
    assert sizes == [32, 32, 64, 64, 96]  # 2-row chunks of 4 float32
    assert np.array_equal(s.spool.rows(), deltas)  # rows survive remapping
    assert s.finish(np.zeros(4, F32)).tolist() == [8.0, 9.0, 10.0, 11.0]
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_spool_of_an_abandoned_round_is_removed_on_garbage_collection(tmp_path):
    factory = make_strategy_factory("trimmed_mean", 3, {"spool": disk_spool(str(tmp_path))})
    s = factory(3)
    s.add(np.ones(3, F32), 1)
    assert len(list(tmp_path.iterdir())) == 1
    del s  # the core drops an abandoned round's strategy without calling finish
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_the_configured_coordinator_spools_robust_rules_to_disk(tmp_path, monkeypatch):
    import tempfile

    from fedsync.config import load_config
    from fedsync.coordinator.config import CoordinatorConfig, strategy_factory_from

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = load_config(CoordinatorConfig, None, {"strategy.name": "median"})
    cfg = dataclasses.replace(cfg, strategy_options={"chunk_rows": 2.0})
    s = strategy_factory_from(cfg, 4)(4)
    s.add(np.ones(4, F32), 1)
    assert s.spool.path.parent.parent == tmp_path and s.spool.path.stat().st_size == 32
    assert s.finish(np.zeros(4, F32)).tolist() == [1.0] * 4 and list(tmp_path.iterdir()) == []
    # without the config's disk spool the sans-IO rule keeps its rows in RAM: same answer, no file
    m = Median(4)
    m.add(np.ones(4, F32), 1)
    assert m.spool.path is None and m.finish(np.zeros(4, F32)).tolist() == [1.0] * 4


def test_spool_reads_back_in_column_blocks():
    deltas = np.random.default_rng(1).standard_normal((5, 7)).astype(F32)
    for block in (1, 3, 5, 1 << 22):
        out = run_round(Median(7, block_values=block), deltas, np.zeros(7))
        assert out.tolist() == np.median(deltas, axis=0).astype(F32).tolist()


def test_spool_rejects_a_delta_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        UpdateSpool(3).append(np.zeros(2, F32))
    with pytest.raises(ValueError, match=r"shape \(2,\), expected \(3,\)"):
        MemorySpool(3).append(np.zeros(2, F32))


# -- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_registered_name_makes_a_working_strategy(name):
    options = {"clip_norm": 10.0, "noise_multiplier": 0.0} if name == "dp_fedavg" else {}
    options |= {"num_byzantine": 0} if "krum" in name else {}
    factory = make_strategy_factory(name, 3, options, np.random.default_rng(0))
    out = run_round(factory(3), [[1, 2, 3]] * 3, [0, 0, 0])
    # FedAdam's first step is ~server_lr per coordinate (m = 0.1 d, sqrt(v) ~ 0.1 |d|).
    np.testing.assert_allclose(out, [0.01] * 3 if name == "fedadam" else [1, 2, 3], rtol=0.02)
    assert factory(3).finish(np.zeros(3, F32)) is None


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown strategy 'bulyan'; known: fedavg, mean, fedavgm"):
        make_strategy_factory("bulyan", 3, {})
    with pytest.raises(ValueError, match=r"strategy 'median'.*'trim_fraction'.*options: \[.*'clip_norm'"):
        make_strategy_factory("median", 3, {"trim_fraction": 0.1})
    with pytest.raises(ValueError, match="trim_fraction must be in"):
        make_strategy_factory("trimmed_mean", 3, {"trim_fraction": 0.5})
    with pytest.raises(ValueError, match="'dp_fedavg' needs rng"):
        make_strategy_factory("dp_fedavg", 3, {"clip_norm": 1.0, "noise_multiplier": 1.0})
    with pytest.raises(ValueError, match="strategy 'dp_fedavg'.*noise_multiplier"):
        make_strategy_factory("dp_fedavg", 3, {"clip_norm": 1.0}, np.random.default_rng(0))


def test_registry_fedavgm_keeps_state_across_factory_calls():
    factory = make_strategy_factory("fedavgm", 1, {"momentum": 0.5})
    x1 = run_round(factory(1), [[2]], [0])
    assert run_round(factory(1), [[2]], x1).tolist() == [5.0]


# -- properties ------------------------------------------------------------------------------

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), k=st.integers(1, 7), p=st.integers(1, 4),
       trim=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.34, 0.49]))
def test_median_and_trimmed_mean_are_order_free_and_within_the_range(data, k, p, trim):
    u = data.draw(hnp.arrays(F32, (k, p), elements=finite32))
    perm = data.draw(st.permutations(range(k)))
    lo, hi = u.min(axis=0).astype(np.float64), u.max(axis=0).astype(np.float64)
    for rule in (coordinate_median, lambda x: trimmed_mean(x, trim)):
        out = rule(u)
        assert np.array_equal(out, rule(u[list(perm)]))
        assert np.all(lo <= out) and np.all(out <= hi)
