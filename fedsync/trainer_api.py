"""The ``Trainer`` plug-in contract: what a device agent calls, and what it gets back.

Both sides and the lab use these names: the device agent hosts a ``Trainer``, an edge
coordinator is one, the lab's fake trainers implement it, and the coordinator's config
takes ``DEFAULT_HYPER`` as the round's default hyper-parameters. No state, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["DEFAULT_HYPER", "EvalResult", "FitResult", "Trainer"]

# Tuned for SoftmaxRegression on synthetic_federation(1, 1, num_devices=10), 20 rounds
# of FedAvg over all devices. A batch of 10000 is, for every device there, the whole
# training split, so a round is one full-batch step per device (FedSGD): on this
# strongly label-skewed data every extra local step added client drift and lowered
# the round-20 accuracy (sweep over lr 0.003-1, epochs 1-30, batch 1-full). Even so
# this falls 2.4-3.7 points short of a converged centralised model; see
# centralised_baseline and tests/test_trainers.py for the measured numbers.
# A round costs ~10 gradient evaluations on a few thousand rows: milliseconds.
# mu = 0 is plain FedAvg; FedProx sets mu > 0.

DEFAULT_HYPER: dict[str, float] = {
    "lr": 0.3,
    "epochs": 1.0,
    "batch_size": 10000.0,
    "mu": 0.0,
}


@dataclass(frozen=True, slots=True)
class FitResult:
    """What one device's local training produced.

    ``params`` are the trained parameters (float32, same names and shapes as the
    global ones); ``num_samples`` is the number of training examples, used as the
    FedAvg weight; ``metrics`` are free-form numbers reported to the coordinator.
    """

    params: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class EvalResult:
    """A model scored on a device's held-out data: mean loss and accuracy in [0, 1]."""

    loss: float
    accuracy: float
    num_samples: int


class Trainer(Protocol):
    """What a device agent calls to train and score a model on local data.

    Implement these two methods on your own data and pass the object to the agent.
    Neither may modify the ``params`` it is given. All randomness must come from
    ``rng`` so a round can be replayed exactly.

    Example (a trainer that "learns" by nudging every parameter towards zero)::

        class ShrinkTrainer:
            def __init__(self, n):
                self.n = n

            def fit(self, params, hyper, rng):
                new = {k: (v * (1 - hyper["lr"])).astype(np.float32) for k, v in params.items()}
                return FitResult(new, num_samples=self.n, metrics={})

            def evaluate(self, params):
                return EvalResult(loss=0.0, accuracy=1.0, num_samples=self.n)
    """

    def fit(
        self,
        params: dict[str, np.ndarray],
        hyper: Mapping[str, float],
        rng: np.random.Generator,
    ) -> FitResult:
        """Train from the global ``params`` with the round's ``hyper``-parameters.

        Example (with the built-in :class:`NumpyTrainer`):
            >>> from fedsync.synthetic import synthetic_federation
            >>> from fedsync.models import SoftmaxRegression
            >>> from fedsync.device_agent.trainer import NumpyTrainer
            >>> device = synthetic_federation(num_devices=1)[0]
            >>> trainer = NumpyTrainer(SoftmaxRegression(60, 10), device)
            >>> start = trainer.model.init_params(np.random.default_rng(0))
            >>> hyper = {"lr": 0.01, "epochs": 1, "batch_size": 10}
            >>> result = trainer.fit(start, hyper, np.random.default_rng(1))
            >>> result.num_samples == trainer.data.num_train, sorted(result.params)
            (True, ['b', 'w'])
        """
        ...

    def evaluate(self, params: dict[str, np.ndarray]) -> EvalResult:
        """Score ``params`` on this device's held-out data.

        Example (with the built-in :class:`NumpyTrainer`):
            >>> from fedsync.synthetic import synthetic_federation
            >>> from fedsync.models import SoftmaxRegression
            >>> from fedsync.device_agent.trainer import NumpyTrainer
            >>> device = synthetic_federation(num_devices=1)[0]
            >>> trainer = NumpyTrainer(SoftmaxRegression(60, 10), device)
            >>> result = trainer.evaluate(trainer.model.init_params(np.random.default_rng(0)))
            >>> result.num_samples == len(trainer.data.y_test), 0.0 <= result.accuracy <= 1.0
            (True, True)
        """
        ...
