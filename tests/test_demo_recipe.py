"""The demo's training recipe (FedAdam server, 3 full-batch local epochs) against the converged
centralised model, in memory and exactly as the demo runs it over MQTT (same seeds per round)."""

from __future__ import annotations

import numpy as np

from coordinator.demo import DEMO_HYPER, DEMO_SERVER_LR
from coordinator.strategies import FedAdam
from device_agent.data import synthetic_federation, union
from device_agent.models import SoftmaxRegression
from device_agent.trainer import DEFAULT_HYPER, NumpyTrainer, centralised_baseline
from fedsync.params import flatten, spec_of, unflatten


def test_demo_recipe_ends_within_2_points_of_the_converged_centralised_model_on_seed_0():
    model = SoftmaxRegression(60, 10)
    devices = synthetic_federation(1.0, 1.0, num_devices=10, seed=0)
    x, y, xt, yt = union(devices)
    params = model.init_params(np.random.default_rng(0))
    spec = spec_of(params)
    g = flatten(params, spec)
    factory = FedAdam(g.size, server_lr=DEMO_SERVER_LR).factory()
    trainers = [NumpyTrainer(model, d) for d in devices]
    for r in range(20):
        s = factory(g.size)
        for i, t in enumerate(trainers):
            res = t.fit(unflatten(g, spec), DEMO_HYPER, np.random.default_rng([0, i, r + 1]))
            s.add(flatten(res.params, spec) - g, res.num_samples)
        g = s.finish(g)
    fed = float((model.predict(unflatten(g, spec), xt) == yt).mean())
    central = centralised_baseline(model, x, y, DEFAULT_HYPER, seed=0, epochs=4000)  # flat from 4,000 on
    cen = float((model.predict(central, xt) == yt).mean())
    assert round(cen, 3) == 0.932
    assert cen - fed < 0.02, (fed, cen)
