"""The demo's training recipe against the centralised reference, in memory, exactly as the demo's
devices train (same seeds per fit, every device in every round, FedAdam on the server).

benchmarks/demo_recipe.py records all seeds 0-9 (docs/benchmarks.md, "Demo recipe"); this pins
seed 0 and the hardest seed of that sweep (5: the largest gap; seed 3, which oscillated 20 points
short with the previous recipe, holds 36,801 samples and is left to the benchmark for time).

Why the federated accuracy has a band and the reference none: the devices train in float32, and
OpenBLAS picks its matrix kernel by CPU (or by ``OPENBLAS_CORETYPE``, which some machines set),
so the sums in each epoch round differently and 80 rounds carry that into a few test images.
Measured on one AMD EPYC host, same numpy 2.4.6: seed 0 ends at 0.9340 with the detected kernel
and 0.9316 with ``OPENBLAS_CORETYPE=Haswell`` (seed 5: 0.8960 with both). The reference is
solved in float64 to a gradient below 1e-6 and is the same on both. A recipe change moves the
result by far more than the band (the previous recipe: seed 0 2.1 points short, seed 5 10.7)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsync.coordinator.strategies import FedAdam
from fedsync.device_agent.trainer import NumpyTrainer
from fedsync.lab.demo import DEMO_HYPER, DEMO_ROUNDS, DEMO_SERVER_LR
from fedsync.models import SoftmaxRegression
from fedsync.params import flatten, spec_of, unflatten
from fedsync.reference import fit_softmax_regression
from fedsync.synthetic import synthetic_federation, union


def federated_and_reference(seed: int) -> tuple[float, float]:
    model = SoftmaxRegression(60, 10)
    devices = synthetic_federation(1.0, 1.0, num_devices=10, seed=seed)
    x, y, xt, yt = union(devices)
    params = model.init_params(np.random.default_rng(seed))
    spec = spec_of(params)
    g = flatten(params, spec)
    factory = FedAdam(g.size, server_lr=DEMO_SERVER_LR).factory()
    trainers = [NumpyTrainer(model, d) for d in devices]
    for r in range(DEMO_ROUNDS):
        s = factory(g.size)
        for i, t in enumerate(trainers):
            res = t.fit(unflatten(g, spec), DEMO_HYPER, np.random.default_rng([seed, i, r + 1]))
            s.add(flatten(res.params, spec) - g, res.num_samples)
        g = s.finish(g)
    fed = float((model.predict(unflatten(g, spec), xt) == yt).mean())
    central = fit_softmax_regression(x, y, 10)
    cen = float((model.predict(central, xt) == yt).mean())
    return fed, cen


KERNEL_BAND = 0.005  # the BLAS kernel's reach (above: 0.0024 on seed 0); half a point


@pytest.mark.parametrize("seed, fed_want, cen_want", [(0, 0.9340, 0.9387), (5, 0.8960, 0.9077)])
def test_demo_recipe_ends_within_2_points_of_the_centralised_reference(seed, fed_want, cen_want):
    fed, cen = federated_and_reference(seed)
    assert round(cen, 4) == cen_want
    assert abs(fed - fed_want) <= KERNEL_BAND, (fed, fed_want)
    assert cen - fed < 0.02, (fed, cen)


def test_the_reference_is_the_regularised_optimum():
    x, y, _, _ = union(synthetic_federation(1.0, 1.0, num_devices=10, seed=0))
    xb = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)

    def largest_gradient(p) -> float:  # of the objective in the original coordinates, float64
        w = np.vstack([p["w"], p["b"]]).astype(np.float64)
        z = xb @ w
        prob = np.exp(z - z.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        grad = xb.T @ (prob - np.eye(10)[y]) / len(y)
        grad[:-1] += 1e-4 * w[:-1]
        return float(np.abs(grad).max())

    p = fit_softmax_regression(x, y, 10)
    assert largest_gradient(p) < 1e-5  # measured 1.4e-6 (float32 params)
    assert largest_gradient({"w": p["w"] * 1.01, "b": p["b"]}) > 1e-3  # positive control: 1 % off is seen
    with pytest.raises(ValueError, match="did not reach a gradient below 1e-12 in 3 iterations"):
        fit_softmax_regression(x, y, 10, tol=1e-12, max_iter=3)
