"""Server optimisers (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAvgM, FedAdam.

Theory of operation
-------------------
A server optimiser treats a round's FedAvg mean delta as a pseudo-gradient and takes one
step with it when the round commits. Unlike the per-round strategies of
:mod:`fedsync.coordinator.strategies`, one object serves the whole federation, because its state
(FedAvgM's velocity, FedAdam's moments) must outlive every round. Its
:meth:`ServerOptimizer.factory` is the core's ``strategy_factory``.

The state changes in exactly one place, ``finish`` of a round that had updates. So:

* an abandoned round (the core drops its strategy without ``finish``) and an empty one
  (``finish`` returns ``None``: keep the previous model) leave the state as it was;
* the core takes its checkpoint right after ``finish``, so ``state()`` there is the state
  after that round's step, and it returns copies: the next round's in-place step does not
  reach back into a checkpoint already taken.

``state()`` is ``{"steps": int, <array name>: float64 (num_params,) array, ...}``;
``load_state`` puts it back after a crash (``CoordinatorCore.restore``), so a restarted
coordinator continues with the moments of the last committed round, as a fault-free one
would. The arrays are float64 and stored byte for byte, so the continuation is exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsync.coordinator.aggregate import FedAvg, Strategy, StrategyState, check_delta, mean_delta
from fedsync.executor import INLINE, Executor

__all__ = ["FedAdam", "FedAvgM", "OptimizerRounds", "ServerOptimizer"]


class ServerOptimizer:
    """A long-lived server optimiser fed one mean delta (pseudo-gradient) per round.

    The object outlives rounds because its state does; subclasses define ``_step`` and
    ``_initial_state``. Give the core ``strategy_factory=opt.factory()``. Each call (one
    per round opened) starts a fresh round accumulator (a
    :class:`~fedsync.coordinator.aggregate.FedAvg`), throwing away any left by an abandoned round,
    and returns the optimiser itself as that round's strategy: one round at a time, as the
    core runs them. ``finish`` returns ``None`` when no update was added: keep the previous
    model; the state is then unchanged. ``state()`` / ``load_state()`` carry the state
    through the coordinator's checkpoint.

    >>> opt = FedAvgM(3, momentum=0.9)
    >>> new_round = opt.factory()   # CoordinatorCore(..., strategy_factory=new_round)
    >>> new_round(3) is opt, opt.steps, sorted(new_round.state())
    (True, 0, ['steps', 'velocity'])
    """

    state_arrays: tuple[str, ...] = ()  # attributes (float64, one value per parameter) that persist

    def __init__(self, num_params: int, *, weighted: bool) -> None:
        if num_params < 1:
            raise ValueError(f"num_params must be >= 1, got {num_params}")
        self.num_params = num_params
        self.weighted = weighted
        self.steps = 0  # rounds applied so far
        self._round: FedAvg | None = None
        self.executor: Executor = INLINE  # set by the core (aggregate.use_executor), used by the round's FedAvg
        for name, value in self._initial_state().items():
            setattr(self, name, value)

    def factory(self) -> OptimizerRounds:
        """The ``strategy_factory`` for :class:`fedsync.coordinator.core.CoordinatorCore`."""
        return OptimizerRounds(self)

    def state(self) -> StrategyState:
        """``steps`` and copies of the state arrays, as after the last committed round.

        >>> opt = FedAvgM(2); v = opt.state()["velocity"]; opt.velocity += 1; v.tolist()
        [0.0, 0.0]
        """
        return {"steps": self.steps, **{name: getattr(self, name).copy() for name in self.state_arrays}}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Put back what :meth:`state` returned (``{}``: keep the current state).

        Checks everything before changing anything; raises ``ValueError`` naming what does
        not fit (state of another optimiser, another model size, a negative step count).

        >>> a, b = FedAdam(2), FedAdam(2)
        >>> a.m += 0.5; a.steps = 3; b.load_state(a.state()); b.m.tolist(), b.steps
        ([0.5, 0.5], 3)
        >>> b.load_state({"steps": 1, "velocity": [0.0, 0.0]})
        Traceback (most recent call last):
        ValueError: FedAdam state needs ['m', 'steps', 'v'], the checkpoint holds ['steps', 'velocity']
        """
        if not state:
            return
        names = self.state_arrays
        if set(state) != {"steps", *names}:
            raise ValueError(f"{type(self).__name__} state needs {sorted(['steps', *names])}, "
                             f"the checkpoint holds {sorted(state)}")
        arrays = {}
        for name in names:
            value = np.array(state[name], dtype=np.float64)  # a copy: the optimiser steps it in place
            if value.shape != (self.num_params,):
                raise ValueError(f"{type(self).__name__} state {name!r} has shape {value.shape}, "
                                 f"the model has {self.num_params} parameters")
            arrays[name] = value
        steps = state["steps"]
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{type(self).__name__} state 'steps' must be an int >= 0, got {steps!r}")
        for name, value in arrays.items():
            setattr(self, name, value)
        self.steps, self._round = steps, None

    def add(self, delta: np.ndarray, num_samples: int) -> None:
        check_delta(delta, self.num_params)
        if self._round is None:
            self._round = FedAvg(self.num_params, weighted=self.weighted)
        self._round.executor = self.executor
        self._round.add(delta, num_samples)

    def finish(self, global_vector: np.ndarray) -> np.ndarray | None:
        acc, self._round = self._round, None
        mean = None if acc is None else mean_delta(acc, self.num_params)
        if mean is None:
            return None  # no update: keep the previous model, state untouched
        self.steps += 1
        return (global_vector.astype(np.float64) + self._step(mean)).astype(np.float32)

    def _initial_state(self) -> dict[str, np.ndarray]:
        """The :attr:`state_arrays` by name, as before the first round."""
        raise NotImplementedError

    def _step(self, mean_delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OptimizerRounds:
    """The ``strategy_factory`` of one :class:`ServerOptimizer` (see ``factory()``).

    Calling it opens a round (and checks the model size); ``state`` and ``load_state``
    are the optimiser's, for the coordinator's checkpoint.
    """

    def __init__(self, optimizer: ServerOptimizer) -> None:
        self.optimizer = optimizer

    def __call__(self, num_params: int) -> Strategy:
        opt = self.optimizer
        if num_params != opt.num_params:
            raise ValueError(f"{type(opt).__name__} holds state for {opt.num_params} parameters, "
                             f"the round has {num_params}")
        opt._round = FedAvg(num_params, weighted=opt.weighted)
        return opt

    def state(self) -> StrategyState:
        return self.optimizer.state()

    def load_state(self, state: Mapping[str, object]) -> None:
        self.optimizer.load_state(state)


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): v = momentum * v + mean; global += server_lr * v.

    mean is the FedAvg mean delta (``weighted=True``: by num_samples). momentum = 0
    with server_lr = 1 is FedAvg. ``v`` (``velocity``) starts at zero and persists across
    rounds (see :class:`ServerOptimizer` for ``factory()``). ``finish`` returns ``None``
    when no update was added: keep the previous model (and the momentum).

    >>> opt = FedAvgM(1, server_lr=1.0, momentum=0.5)
    >>> new_round = opt.factory()
    >>> s = new_round(1); s.add(np.array([2.0], np.float32), 1); s.finish(np.zeros(1, np.float32)).tolist()
    [2.0]
    >>> s = new_round(1); s.add(np.array([2.0], np.float32), 1); s.finish(np.zeros(1, np.float32)).tolist()
    [3.0]
    """

    state_arrays = ("velocity",)
    velocity: np.ndarray

    def __init__(self, num_params: int, server_lr: float = 1.0, momentum: float = 0.9,
                 weighted: bool = True) -> None:
        if not server_lr > 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"need server_lr > 0 and 0 <= momentum < 1, got {server_lr}, {momentum}")
        self.server_lr = server_lr
        self.momentum = momentum
        super().__init__(num_params, weighted=weighted)

    def _initial_state(self) -> dict[str, np.ndarray]:
        return {"velocity": np.zeros(self.num_params, dtype=np.float64)}

    def _step(self, mean_delta: np.ndarray) -> np.ndarray:
        self.velocity *= self.momentum
        self.velocity += mean_delta
        return self.server_lr * self.velocity


class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2) on the FedAvg mean delta d:

    m = beta1 * m + (1 - beta1) * d;  v = beta2 * v + (1 - beta2) * d^2;
    global += server_lr * m / (sqrt(v) + tau).

    As in the paper: m starts at 0, v at tau^2 (its initialisation v_-1 >= tau^2), no bias
    correction (so ``steps`` does not enter the step; it is kept for logs and checks).
    State persists across rounds (``factory()`` as :class:`FedAvgM`). ``finish`` returns
    ``None`` when no update was added: keep the previous model.

    >>> opt = FedAdam(1, server_lr=0.6, beta1=0.5, beta2=0.5, tau=1.0)
    >>> s = opt.factory()(1); s.add(np.array([7.0], np.float32), 1)
    >>> s.finish(np.zeros(1, np.float32)).tolist()  # m = 3.5, v = 25: 0.6 * 3.5 / (5 + 1)
    [0.3499999940395355]
    """

    state_arrays = ("m", "v")
    m: np.ndarray
    v: np.ndarray

    def __init__(self, num_params: int, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, weighted: bool = True) -> None:
        if not (server_lr > 0 and tau > 0 and 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError("need server_lr > 0, tau > 0 and 0 <= beta1, beta2 < 1, got "
                             f"{server_lr}, {tau}, {beta1}, {beta2}")
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        super().__init__(num_params, weighted=weighted)

    def _initial_state(self) -> dict[str, np.ndarray]:
        return {"m": np.zeros(self.num_params, dtype=np.float64),
                "v": np.full(self.num_params, self.tau * self.tau, dtype=np.float64)}

    def _step(self, mean_delta: np.ndarray) -> np.ndarray:
        self.m *= self.beta1
        self.m += (1.0 - self.beta1) * mean_delta
        self.v *= self.beta2
        self.v += (1.0 - self.beta2) * np.square(mean_delta)
        return self.server_lr * self.m / (np.sqrt(self.v) + self.tau)
