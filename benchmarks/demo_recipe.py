"""How close each training recipe gets the demo to the centralised reference, seeds 0-9.

``fedsync demo`` federates softmax regression on FedProx's Synthetic(1,1) over 10 devices. This
replays the demo's rounds in memory, exactly as its devices train (the same
``default_rng([seed, device index, round])`` per fit, every device in every round, the same
server strategies), for several recipes and seeds, and prints per seed the final accuracy and
its gap to the centralised reference in percentage points.

The baseline, measured in the same run: the centralised reference of each seed, softmax
regression on the pooled training data with L2 1e-4, solved by L-BFGS to a largest gradient entry
below 1e-6 (:mod:`fedsync.reference`, what the demo's summary reports as centralised_accuracy).
Accuracies are on the pooled test splits. Nothing here goes over MQTT: the MQTT demo commits the
same models (tests/test_demo_recipe.py checks the recipe in memory; the demo's own summary is the
over-the-wire number).

    python benchmarks/demo_recipe.py            # every recipe, seeds 0-9
    python benchmarks/demo_recipe.py --recipes demo --seeds 0 3 5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import numpy as np

import common  # noqa: F401  (puts the checkout on sys.path)
from common import environment, print_table

from fedsync.coordinator.aggregate import FedAvg
from fedsync.coordinator.strategies import FedAdam
from fedsync.device_agent.trainer import NumpyTrainer
from fedsync.models import SoftmaxRegression
from fedsync.params import flatten, spec_of, unflatten
from fedsync.reference import fit_softmax_regression
from fedsync.synthetic import synthetic_federation, union


@dataclass(frozen=True)
class Recipe:
    name: str
    hyper: dict
    server: str  # "fedavg" or "fedadam"
    server_lr: float
    rounds: int


FULL = 10000.0  # batch_size above every device's train split but one: full-batch local steps
RECIPES = {r.name: r for r in [
    Recipe("previous demo (3 ep, FedAdam 0.1, 20 r)", {"lr": 0.1, "epochs": 3.0, "batch_size": FULL, "mu": 0.0},
           "fedadam", 0.1, 20),
    Recipe("FedAvg (1 ep lr 0.3, 80 r)", {"lr": 0.3, "epochs": 1.0, "batch_size": FULL, "mu": 0.0}, "fedavg", 1.0, 80),
    Recipe("FedProx 0.01, 10 ep, FedAdam 0.1, 80 r", {"lr": 0.1, "epochs": 10.0, "batch_size": FULL, "mu": 0.01},
           "fedadam", 0.1, 80),
    Recipe("demo", {"lr": 0.1, "epochs": 10.0, "batch_size": FULL, "mu": 0.01}, "fedadam", 0.2, 80),
    Recipe("FedProx 0.01, 10 ep, FedAdam 0.3, 80 r", {"lr": 0.1, "epochs": 10.0, "batch_size": FULL, "mu": 0.01},
           "fedadam", 0.3, 80),
]}


def federate(recipe: Recipe, seed: int, devices: int = 10) -> float:
    """Final pooled-test accuracy of the recipe's federation on Synthetic(1,1), seed ``seed``."""
    model = SoftmaxRegression(60, 10)
    data = synthetic_federation(1.0, 1.0, num_devices=devices, seed=seed)
    _, _, x_test, y_test = union(data)
    params = model.init_params(np.random.default_rng(seed))
    spec = spec_of(params)
    g = flatten(params, spec)
    adam = FedAdam(g.size, server_lr=recipe.server_lr).factory() if recipe.server == "fedadam" else None
    trainers = [NumpyTrainer(model, d) for d in data]
    for r in range(1, recipe.rounds + 1):
        strategy = adam(g.size) if adam else FedAvg(g.size, server_lr=recipe.server_lr)
        for i, t in enumerate(trainers):
            result = t.fit(unflatten(g, spec), recipe.hyper, np.random.default_rng([seed, i, r]))
            strategy.add(flatten(result.params, spec) - g, result.num_samples)
        g = strategy.finish(g)
    return float(np.mean(model.predict(unflatten(g, spec), x_test) == y_test))


def reference(seed: int, devices: int = 10) -> float:
    x, y, x_test, y_test = union(synthetic_federation(1.0, 1.0, num_devices=devices, seed=seed))
    p = fit_softmax_regression(x, y, 10)
    return float(np.mean(np.argmax(x_test @ p["w"] + p["b"], axis=1) == y_test))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"names or 'demo' (known: {list(RECIPES)})")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    print(environment())
    started = time.perf_counter()
    refs = {s: reference(s) for s in a.seeds}
    print(f"centralised reference solved for {len(refs)} seeds in {time.perf_counter() - started:.1f} s")
    rows, out = [], {"reference": refs, "recipes": {}}
    for name in a.recipes:
        recipe = RECIPES[name]
        t0 = time.perf_counter()
        finals = {s: federate(recipe, s) for s in a.seeds}
        gaps = {s: 100 * (refs[s] - finals[s]) for s in a.seeds}
        out["recipes"][name] = {"final": finals, "gap_points": gaps}
        rows.append([name, *(f"{finals[s]:.4f} ({gaps[s]:+.2f})" for s in a.seeds), f"{max(gaps.values()):+.2f}",
                     f"{time.perf_counter() - t0:.0f} s"])
    print_table("final accuracy (gap to the centralised reference, points) per seed",
                ["recipe", *(f"seed {s}" for s in a.seeds), "worst gap", "time"],
                [["centralised reference", *(f"{refs[s]:.4f}" for s in a.seeds), "", ""], *rows])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
