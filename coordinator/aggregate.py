"""Aggregation: pure numpy functions plus the streaming strategy interface.

A strategy sees each verified update once, as it completes (``add``), and is
asked for the new global model when the round commits (``finish``). Streaming
keeps memory at O(model), not O(devices x model): FedAvg folds each delta into
one float64 running sum with an in-place scaled add.

A ``strategy_factory`` (called once per round opened) may carry state from one
round to the next: a server optimiser's moments, a noise generator. Such a
factory has ``state()`` and ``load_state(state)`` (:class:`StatefulFactory`), and
the coordinator's checkpoint holds that state; :func:`factory_state` and
:func:`load_factory_state` treat any other callable as stateless.

Parallel work: a strategy that can use a second core (FedAvg folds two halves of a large
model at once) has an ``executor`` attribute (:mod:`fedsync.executor`, inline by
default); the round core sets it, with :func:`use_executor`, to the executor it was
given when it opens a round. The halves are disjoint, so the sum is the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from fedsync.executor import INLINE, Executor


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Reference (non-streaming) weighted mean, for tests and small callers.

    >>> weighted_mean([np.array([1.0, 0.0]), np.array([3.0, 2.0])], [1, 3]).tolist()
    [2.5, 1.5]
    """
    w = np.asarray(weights, dtype=np.float64)
    return (np.stack(vectors).astype(np.float64) * w[:, None]).sum(axis=0) / w.sum()


class Strategy(Protocol):
    """How a round's verified updates become the next global model.

    ``add`` is called once per accepted update with its delta (local minus
    global, float32) and its sample count. ``finish`` returns the new global
    vector, or ``None`` when nothing was added: keep the previous model.
    """

    def add(self, delta: np.ndarray, num_samples: int) -> None: ...

    def finish(self, global_vector: np.ndarray) -> np.ndarray | None: ...


# What a factory carries across rounds, by name: arrays (kept as raw bytes with dtype and
# shape in checkpoint.cbor), numbers and short strings (a generator's name).
StrategyState = dict[str, np.ndarray | int | float | str]


class StatefulFactory(Protocol):
    """A ``strategy_factory`` whose strategies share state across rounds.

    ``state()`` returns that state as it is after the last committed round (copies: later
    rounds must not change a checkpoint already taken). ``load_state(state)`` puts back what
    ``state()`` returned, as an earlier incarnation of the coordinator left it; ``{}`` (a
    checkpoint from before strategy state was kept) leaves the state as it is. It raises
    ``ValueError`` for state of another kind (another strategy, another model size).
    """

    def __call__(self, num_params: int) -> Strategy: ...

    def state(self) -> StrategyState: ...

    def load_state(self, state: Mapping[str, object]) -> None: ...


def factory_state(factory: Callable[[int], Strategy]) -> StrategyState:
    """``factory.state()``, or ``{}`` for a factory without state (a plain callable).

    >>> factory_state(lambda n: FedAvg(n))
    {}
    """
    state = getattr(factory, "state", None)
    return {} if state is None else state()


def load_factory_state(factory: Callable[[int], Strategy], state: Mapping[str, object]) -> None:
    """``factory.load_state(state)``; a plain callable takes ``{}`` only.

    >>> load_factory_state(lambda n: FedAvg(n), {"velocity": np.zeros(2)})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: the strategy factory keeps no state between rounds; the checkpoint holds ['velocity'] ...
    """
    load = getattr(factory, "load_state", None)
    if load is not None:
        load(state)
    elif state:
        raise ValueError(f"the strategy factory keeps no state between rounds; the checkpoint holds "
                         f"{sorted(state)} (written under another strategy?)")


def use_executor(strategy: Strategy, executor: Executor) -> None:
    """Give ``strategy`` the executor for its parallel work, if it has any (an ``executor``
    attribute); a strategy without one is left as it is.

    >>> s = FedAvg(2); use_executor(s, INLINE); s.executor
    INLINE
    """
    if hasattr(strategy, "executor"):
        strategy.executor = executor  # type: ignore[attr-defined]


def check_delta(delta: np.ndarray, num_params: int) -> None:
    """Raise ``ValueError`` unless ``delta`` has shape (num_params,).

    Without this a length-1 delta would broadcast silently over the whole model.
    """
    if delta.shape != (num_params,):
        raise ValueError(f"delta has shape {delta.shape}, expected ({num_params},)")


class FedAvg:
    """Streaming FedAvg (McMahan et al. 2017): global += sum(n_k * d_k) / sum(n_k).

    With ``weighted=False`` every update counts equally (simple mean). ``executor``
    (inline by default) folds the two halves of a model of 4 x CHUNK values or more.

    >>> s = FedAvg(2)
    >>> s.add(np.array([1.0, 0.0], np.float32), 1); s.add(np.array([3.0, 2.0], np.float32), 3)
    >>> s.finish(np.zeros(2, np.float32)).tolist()
    [2.5, 1.5]
    """

    CHUNK = 1 << 15  # values per step of add(): the float64 scratch (256 KiB) stays in L2

    def __init__(self, num_params: int, weighted: bool = True, server_lr: float = 1.0, *,
                 executor: Executor = INLINE) -> None:
        self._sum = np.zeros(num_params, dtype=np.float64)
        self._weight = 0.0
        self._scratch = np.empty(min(num_params, self.CHUNK), dtype=np.float64)
        self._scratch2 = np.empty_like(self._scratch)  # the second half's (maybe another thread's)
        self.executor = executor
        self.weighted = weighted
        self.server_lr = server_lr
        self.count = 0

    def add(self, delta: np.ndarray, num_samples: float) -> None:
        w = float(num_samples) if self.weighted else 1.0
        n = self._sum.size
        if n >= 4 * self.CHUNK:  # two halves, one maybe on a second core (numpy releases the GIL)
            mid = (n // 2) // self.CHUNK * self.CHUNK
            self.executor.both(lambda: self._fold(delta, w, 0, mid, self._scratch),
                 lambda: self._fold(delta, w, mid, n, self._scratch2))
        else:
            self._fold(delta, w, 0, n, self._scratch)
        self._weight += w
        self.count += 1

    def _fold(self, delta: np.ndarray, w: float, lo: int, hi: int, scratch: np.ndarray) -> None:
        # In cache-sized steps through a small float64 scratch: no model-sized temporaries, and
        # the sum is streamed once (20 bytes of memory traffic per value instead of 36).
        step, total = self.CHUNK, self._sum
        for i in range(lo, hi, step):
            part = total[i:min(i + step, hi)]
            tmp = scratch[:part.size]
            np.multiply(delta[i:i + part.size], w, out=tmp, dtype=np.float64)  # the product in float64, too
            np.add(part, tmp, out=part)

    def finish(self, global_vector: np.ndarray) -> np.ndarray | None:
        if self.count == 0:
            return None
        step = self._sum / self._weight
        return (global_vector.astype(np.float64) + self.server_lr * step).astype(np.float32)


def mean_delta(acc: FedAvg, num_params: int) -> np.ndarray | None:
    """The (weighted) mean delta a FedAvg accumulated, float64: its step from a zero model.

    ``None`` when nothing was added.

    >>> acc = FedAvg(1); acc.add(np.array([1.0], np.float32), 1); acc.add(np.array([4.0], np.float32), 2)
    >>> mean_delta(acc, 1).tolist(), mean_delta(FedAvg(1), 1)
    ([3.0], None)
    """
    if acc.count == 0:
        return None
    return acc.finish(np.zeros(num_params, np.float32)).astype(np.float64)
