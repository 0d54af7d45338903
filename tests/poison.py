"""A poisoning device, as a ``fedsync agent --trainer tests.poison:make_trainer`` plug-in.

The update of issue 12: every parameter set to 3.0e38 (finite, so it passes every codec
and digest) and a claimed 10,000,000 training samples, so that plain FedAvg would weight
it above every honest device combined. Run the agent from the repository root (or with it
on ``PYTHONPATH``) so that ``tests`` is importable.
"""

from __future__ import annotations

import numpy as np

from fedsync.trainer_api import EvalResult, FitResult

POISON_VALUE = 3.0e38
POISON_SAMPLES = 10_000_000


class PoisonTrainer:
    """Returns the same shapes as the global model, every value ``POISON_VALUE``."""

    def fit(self, params, hyper, rng) -> FitResult:
        return FitResult({k: np.full_like(v, POISON_VALUE, dtype=np.float32) for k, v in params.items()},
                         num_samples=POISON_SAMPLES, metrics={})

    def evaluate(self, params) -> EvalResult:
        return EvalResult(loss=0.0, accuracy=0.0, num_samples=1)


def make_trainer(device_id: str, section: dict) -> PoisonTrainer:
    """The ``[trainer] factory``: the same poison for every device id."""
    return PoisonTrainer()
