"""Aggregation strategies beyond FedAvg: robust rules, central DP, and the registry.

Theory of operation
-------------------
The maths are small pure numpy functions (:func:`coordinate_median`,
:func:`trimmed_mean`, :func:`krum_scores`, :func:`multi_krum`, :func:`clip_by_norm`,
:func:`gaussian_noise`). The classes only decide *what* to feed them, and all speak
the streaming :class:`fedsync.coordinator.aggregate.Strategy` protocol: ``add(delta,
num_samples)`` once per verified update (delta = local minus global, float32) and
``finish(global_vector)`` when the round commits, returning the new float32 global
vector or ``None``: keep the previous model (the core then abandons the round).

Two families, and a registry:

* Streaming means, O(model) memory: :class:`~fedsync.coordinator.aggregate.FedAvg`,
  :class:`CentralDP` (:mod:`fedsync.coordinator.central_dp`), and the server optimisers
  :class:`FedAvgM` and :class:`FedAdam` (:mod:`fedsync.coordinator.server_opt`), whose state
  (momentum, moments) must outlive a round. Both modules are re-exported here.
* Rules that need every update at once (:class:`Median`, :class:`TrimmedMean`,
  :class:`Krum`). Updates go to a K x P float32 spool made by the ``spool=`` factory:
  :class:`MemorySpool` by default; the coordinator's config passes the disk spool of
  :mod:`fedsync.coordinator.spool` (a ``numpy.memmap`` in a temp directory, read back in
  column blocks), so RAM stays at O(block), not O(devices x model) (stacking K updates
  would cost K x model memory). They ignore ``num_samples``: a device reports its own sample count, and
  weighting by it would let one Byzantine device claim a billion samples.
* :func:`make_strategy_factory` turns a configured name and options into the
  ``strategy_factory`` that :class:`fedsync.coordinator.core.CoordinatorCore` takes.

How the core drives them: when a round opens it calls ``strategy_factory(num_params)``.
It calls ``add`` for each accepted update, and ``finish`` only if the round commits.
An abandoned round's strategy is dropped without ``finish``. Its spool file goes with it
(a ``weakref.finalize``), and a server optimiser's state stays as it was: the next
call to the factory throws the half-filled round away.

State across rounds, and crash recovery: every factory :func:`make_strategy_factory`
returns has ``state()`` and ``load_state()`` (:class:`fedsync.coordinator.aggregate.StatefulFactory`),
and the core's checkpoint carries that state. Three strategies have any: FedAvgM
(``velocity``) and FedAdam (``m``, ``v``), each with its step count, and dp_fedavg, whose
one noise generator serves all its rounds (its state, flattened; see
:mod:`fedsync.coordinator.central_dp`). Median, trimmed mean and Krum start from nothing every
round: their state is ``{}``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import numpy as np

from fedsync.coordinator.aggregate import FedAvg, Strategy, StrategyState, check_delta
from fedsync.coordinator.central_dp import CentralDP, clip_by_norm, gaussian_noise, generator_state, load_generator_state
from fedsync.coordinator.server_opt import FedAdam, FedAvgM, OptimizerRounds, ServerOptimizer

__all__ = [
    "STRATEGY_NAMES", "CentralDP", "FedAdam", "FedAvgM", "Krum", "Median", "OptimizerRounds", "PerRoundFactory",
    "ServerOptimizer", "TrimmedMean", "MemorySpool", "clip_by_norm", "coordinate_median", "gaussian_noise",
    "generator_state", "krum_scores", "load_generator_state", "make_strategy_factory", "multi_krum", "trimmed_mean",
]

# Values read back from a spool at once (K rows x this/K columns, 32 MiB as float64):
# the RAM a robust rule needs, whatever the number of devices.
DEFAULT_BLOCK_VALUES = 1 << 22
# num_params -> an empty spool (append, rows, close, count, path): MemorySpool or a disk spool
SpoolFactory = Callable[[int], "MemorySpool"]


# -- pure aggregation functions ---------------------------------------------------


def _check_updates(updates: np.ndarray) -> int:
    if updates.ndim != 2 or updates.shape[0] == 0:
        raise ValueError(f"updates must be a (K, P) array with K >= 1, got shape {updates.shape}")
    return updates.shape[0]


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """Per-coordinate median of K updates (Yin et al. 2018): (K, P) -> (P,) float64.

    With an even K it is the mean of the two middle values. Raises ``ValueError``
    for an input that is not (K, P) with K >= 1.

    >>> coordinate_median(np.array([[1, 5], [2, -9], [30, 6]], np.float32)).tolist()
    [2.0, 5.0]
    """
    _check_updates(updates)
    return np.median(np.asarray(updates, dtype=np.float64), axis=0)


def _trim_count(num_updates: int, trim_fraction: float) -> int:
    # floor, with slack for products like 0.29 * 100 = 28.999999999999996.
    return math.floor(trim_fraction * num_updates + 1e-9)


def trimmed_mean(updates: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per-coordinate mean without the k largest and k smallest values (Yin et al. 2018).

    k = floor(trim_fraction * K) on each side. Floor, not ceil: with few updates it trims
    too little rather than too much (K = 4 at 0.2 trims nothing: the plain mean), the
    convention of ``scipy.stats.trim_mean``. Raises ``ValueError`` unless
    0 <= trim_fraction < 0.5, so at least one value per coordinate always remains.

    >>> trimmed_mean(np.array([[-50.0], [1.0], [2.0], [3.0], [100.0]]), 0.2).tolist()
    [2.0]
    """
    k_updates = _check_updates(updates)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = _trim_count(k_updates, trim_fraction)
    ordered = np.sort(np.asarray(updates, dtype=np.float64), axis=0)
    return ordered[k:k_updates - k].mean(axis=0)


def _pairwise_sq_distances(updates: np.ndarray, block_values: int) -> np.ndarray:
    """(K, K) squared Euclidean distances, reading ``updates`` in column blocks."""
    k_updates, num_params = updates.shape
    step = max(1, block_values // k_updates)
    dist = np.zeros((k_updates, k_updates), dtype=np.float64)
    for start in range(0, num_params, step):
        x = np.array(updates[:, start:start + step], dtype=np.float64)  # a copy: centred in place
        # Distances ignore translation. Centring on a middle entry (not an average, so small
        # integers stay exact) keeps the Gram form from cancelling when all updates share a
        # large common part.
        x -= np.partition(x, k_updates // 2, axis=0)[k_updates // 2]
        gram = x @ x.T
        sq = np.diag(gram)
        dist += sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(updates: np.ndarray, num_byzantine: int, *,
                block_values: int = DEFAULT_BLOCK_VALUES) -> np.ndarray:
    """Krum score per update (Blanchard et al. 2017): (K, P) -> (K,) float64.

    The score of update i is the sum of squared distances to its K - f - 2 nearest
    other updates (f = ``num_byzantine``). Blanchard et al.'s guarantee needs
    2f + 2 < K, so K < 2f + 3 raises ``ValueError``, as does f < 0. Works on a memmap:
    the input is read ``block_values`` values at a time.

    >>> krum_scores(np.array([[0, 0], [2, 0], [0, 1], [1, 1], [8, 6]]), 1).tolist()
    [3.0, 6.0, 2.0, 3.0, 146.0]
    """
    k_updates = _check_updates(updates)
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    if k_updates < 2 * num_byzantine + 3:
        raise ValueError(f"Krum with num_byzantine={num_byzantine} needs at least "
                         f"{2 * num_byzantine + 3} updates (2f + 2 < K), got {k_updates}")
    dist = _pairwise_sq_distances(updates, block_values)
    np.fill_diagonal(dist, np.inf)  # an update is not its own neighbour
    neighbours = k_updates - num_byzantine - 2
    return np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)


def _lowest(scores: np.ndarray, m: int) -> np.ndarray:
    # Stable: among equal scores the earlier update (in add order) wins, deterministically.
    return np.sort(np.argsort(scores, kind="stable")[:m])


def _mean_of_rows(updates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    total = np.zeros(updates.shape[1], dtype=np.float64)
    for i in rows:  # one row at a time: O(P) memory even for a memmap
        total += updates[i]
    return total / len(rows)


def multi_krum(updates: np.ndarray, num_byzantine: int, m: int, *,
               block_values: int = DEFAULT_BLOCK_VALUES) -> np.ndarray:
    """Mean of the ``m`` updates with the lowest Krum scores: (K, P) -> (P,) float64.

    m = 1 is Krum itself. Ties go to the earlier update. Raises ``ValueError``
    unless 1 <= m <= K, and where :func:`krum_scores` does.

    >>> u = np.array([[0, 0], [2, 0], [0, 1], [1, 1], [8, 6]], np.float32)
    >>> multi_krum(u, 1, 1).tolist(), multi_krum(u, 1, 2).tolist()
    ([0.0, 1.0], [0.0, 0.5])
    """
    k_updates = _check_updates(updates)
    if not 1 <= m <= k_updates:
        raise ValueError(f"m must be in [1, {k_updates}], got {m}")
    scores = krum_scores(updates, num_byzantine, block_values=block_values)
    return _mean_of_rows(updates, _lowest(scores, m))


# -- the in-memory update spool -------------------------------------------------------


class MemorySpool:
    """A growable K x P float32 matrix of updates in RAM: the default spool.

    The same interface as the disk spool (:class:`fedsync.coordinator.spool.UpdateSpool`),
    which the coordinator service passes (``spool=`` factory) so that K x P need not fit in
    RAM; the core itself opens no files.

    >>> spool = MemorySpool(3, chunk_rows=2)
    >>> for k in range(3):
    ...     spool.append(np.full(3, k, np.float32))
    >>> spool.rows()[:, 0].tolist(), spool.path
    ([0.0, 1.0, 2.0], None)
    """

    path = None

    def __init__(self, num_params: int, *, chunk_rows: int = 16) -> None:
        if num_params < 1 or chunk_rows < 1:
            raise ValueError(f"num_params and chunk_rows must be >= 1, got {num_params}, {chunk_rows}")
        self.num_params = num_params
        self.chunk_rows = chunk_rows
        self.count = 0
        self._rows = np.empty((0, num_params), dtype=np.float32)

    def append(self, delta: np.ndarray) -> None:
        check_delta(delta, self.num_params)
        if self.count == len(self._rows):
            grown = np.empty((len(self._rows) + self.chunk_rows, self.num_params), dtype=np.float32)
            grown[:self.count] = self._rows[:self.count]
            self._rows = grown
        self._rows[self.count] = delta
        self.count += 1

    def rows(self) -> np.ndarray:
        return self._rows[:self.count]

    def close(self) -> None:
        self._rows, self.count = np.empty((0, self.num_params), dtype=np.float32), 0


def _by_column_blocks(rows: np.ndarray, block_values: int,
                      rule: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a coordinate-wise ``rule`` to (K, P) ``rows`` a column block at a time."""
    k_updates, num_params = rows.shape
    step = max(1, block_values // k_updates)
    out = np.empty(num_params, dtype=np.float64)
    for start in range(0, num_params, step):
        out[start:start + step] = rule(np.asarray(rows[:, start:start + step]))
    return out


class _SpooledRule:
    """Shared by the rules that need all K updates: spool on ``add``, aggregate on ``finish``."""

    def __init__(self, num_params: int, *, clip_norm: float | None = None, spool: SpoolFactory = MemorySpool,
                 block_values: int = DEFAULT_BLOCK_VALUES) -> None:
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0 (or None), got {clip_norm}")
        if block_values < 1:
            raise ValueError(f"block_values must be >= 1, got {block_values}")
        self.num_params = num_params
        self.clip_norm = clip_norm
        self.block_values = block_values
        self.spool = spool(num_params)

    @property
    def count(self) -> int:
        return self.spool.count

    @property
    def min_updates(self) -> int:
        """Fewest updates this rule aggregates; below it ``finish`` returns ``None``."""
        return 1

    def add(self, delta: np.ndarray, num_samples: int) -> None:
        if self.clip_norm is not None:
            delta = clip_by_norm(delta, self.clip_norm)
        self.spool.append(delta)

    def finish(self, global_vector: np.ndarray) -> np.ndarray | None:
        try:
            if self.spool.count == 0 or self.spool.count < self.min_updates:
                return None
            step = self._aggregate(self.spool.rows())
            return (global_vector.astype(np.float64) + step).astype(np.float32)
        finally:
            self.spool.close()

    def _aggregate(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Median(_SpooledRule):
    """Coordinate-wise median of the round's deltas: global += median(d_1..d_K).

    Options (keyword): ``clip_norm`` (None: no clipping; else each delta is clipped
    to this L2 norm on ``add``), ``spool`` (the spool factory: :class:`MemorySpool`, or
    :func:`fedsync.coordinator.spool.disk_spool`), ``block_values`` (values read back at once).
    ``num_samples`` is ignored. ``finish`` returns ``None`` when no update was added:
    keep the previous model. A strategy serves one round; ``finish`` deletes its spool.

    >>> s = Median(2)
    >>> for d in ([1, 5], [2, -9], [30, 6]):
    ...     s.add(np.array(d, np.float32), 1)
    >>> s.finish(np.array([10, 10], np.float32)).tolist()
    [12.0, 15.0]
    """

    def _aggregate(self, rows: np.ndarray) -> np.ndarray:
        return _by_column_blocks(rows, self.block_values, coordinate_median)


class TrimmedMean(_SpooledRule):
    """Coordinate-wise trimmed mean: drops floor(trim_fraction * K) largest and smallest.

    ``trim_fraction`` (0.2) must be in [0, 0.5); other options and the failure rule
    as :class:`Median` (``None`` when no update was added: keep the previous model).

    >>> s = TrimmedMean(1, trim_fraction=0.2)
    >>> for d in (-50, 1, 2, 3, 100):
    ...     s.add(np.array([d], np.float32), 1)
    >>> s.finish(np.zeros(1, np.float32)).tolist()
    [2.0]
    """

    def __init__(self, num_params: int, trim_fraction: float = 0.2, **options) -> None:
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        super().__init__(num_params, **options)
        self.trim_fraction = trim_fraction

    def _aggregate(self, rows: np.ndarray) -> np.ndarray:
        return _by_column_blocks(rows, self.block_values, lambda b: trimmed_mean(b, self.trim_fraction))


class Krum(_SpooledRule):
    """(Multi-)Krum (Blanchard et al. 2017): global += mean of the m lowest-scoring deltas.

    ``num_byzantine`` (f, 1) is the number of attackers to tolerate; ``multi`` (m, 1)
    how many updates to average: 1 is Krum, ``None`` means K - f. Other options as
    :class:`Median`. ``finish`` returns ``None`` (keep the previous model) when no
    update was added or fewer than :attr:`min_updates` = max(2f + 3, m) were: with
    fewer, Krum's guarantee does not hold, so set the round quorum at least that high.
    After ``finish``, ``scores`` and ``selected`` (indices in add order) say what won.

    >>> s = Krum(2, num_byzantine=1)
    >>> for d in ([0, 0], [2, 0], [0, 1], [1, 1], [8, 6]):
    ...     s.add(np.array(d, np.float32), 1)
    >>> s.finish(np.zeros(2, np.float32)).tolist(), s.selected.tolist()
    ([0.0, 1.0], [2])
    """

    def __init__(self, num_params: int, num_byzantine: int = 1, multi: int | None = 1, **options) -> None:
        if num_byzantine < 0:
            raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
        if multi is not None and multi < 1:
            raise ValueError(f"multi must be >= 1 or None, got {multi}")
        super().__init__(num_params, **options)
        self.num_byzantine = num_byzantine
        self.multi = multi
        self.scores: np.ndarray | None = None
        self.selected: np.ndarray | None = None

    @property
    def min_updates(self) -> int:
        return max(2 * self.num_byzantine + 3, self.multi or 1)

    def _aggregate(self, rows: np.ndarray) -> np.ndarray:
        m = self.multi if self.multi is not None else rows.shape[0] - self.num_byzantine
        self.scores = krum_scores(rows, self.num_byzantine, block_values=self.block_values)
        self.selected = _lowest(self.scores, m)
        return _mean_of_rows(rows, self.selected)


# -- registry ---------------------------------------------------------------------

STRATEGY_NAMES = ("fedavg", "mean", "fedavgm", "fedadam", "median", "trimmed_mean", "krum",
                  "multi_krum", "dp_fedavg")


class PerRoundFactory:
    """A ``strategy_factory`` that builds a fresh ``cls(num_params, **options)`` every round.

    With ``rng`` (dp_fedavg) every round's strategy gets that one generator, and
    :meth:`state` / :meth:`load_state` carry its state through the coordinator's
    checkpoint; without it the factory keeps no state (``state()`` is ``{}``).

    >>> f = PerRoundFactory(CentralDP, {"clip_norm": 1.0, "noise_multiplier": 1.0}, np.random.default_rng(0))
    >>> saved = f.state(); s = f(2); s.add(np.ones(2, np.float32), 1); first = s.finish(np.zeros(2, np.float32))
    >>> f.load_state(saved); s = f(2); s.add(np.ones(2, np.float32), 1)
    >>> s.finish(np.zeros(2, np.float32)).tolist() == first.tolist()  # the same noise again
    True
    >>> PerRoundFactory(Median, {}).state()
    {}
    """

    def __init__(self, cls: type, options: dict, rng: np.random.Generator | None = None) -> None:
        self.cls = cls
        self.options = dict(options)
        self.rng = rng

    def __call__(self, num_params: int) -> Strategy:
        if self.rng is None:
            return self.cls(num_params, **self.options)
        return self.cls(num_params, rng=self.rng, **self.options)

    def state(self) -> StrategyState:
        """``{}``, or the noise generator's state (copied) as after the last committed round."""
        return {} if self.rng is None else generator_state(self.rng)

    def load_state(self, state: Mapping[str, object]) -> None:
        """Put back what :meth:`state` returned (``{}``: keep the current state)."""
        if not state:
            return
        if self.rng is None:
            raise ValueError(f"{self.cls.__name__} keeps no state between rounds; the checkpoint holds "
                             f"{sorted(state)} (written under another strategy?)")
        load_generator_state(self.rng, state)


def _per_round(name: str, cls: type, num_params: int, options: dict,
               rng: np.random.Generator | None = None) -> PerRoundFactory:
    # Fail fast on bad options, not at the first round.
    _build(name, cls, num_params, options if rng is None else {**options, "rng": rng})
    return PerRoundFactory(cls, options, rng)


def _build(name: str, cls: type, num_params: int, options: dict):
    try:
        return cls(num_params, **options)
    except TypeError as err:
        known = [p for p in inspect.signature(cls).parameters if p not in ("num_params", "options", "rng")]
        if cls in (TrimmedMean, Krum):
            known += [p for p in inspect.signature(_SpooledRule).parameters if p != "num_params"]
        raise ValueError(f"strategy {name!r}: {err}; options: {sorted(known)}") from None


def make_strategy_factory(name: str, num_params: int, options: dict,
                          rng: np.random.Generator | None = None) -> PerRoundFactory | OptimizerRounds:
    """The ``strategy_factory`` for :class:`fedsync.coordinator.core.CoordinatorCore` by name.

    ======================  =====================  ==========================================
    name                    class                  options (default)
    ======================  =====================  ==========================================
    fedavg                  FedAvg                 weighted (True), server_lr (1.0)
    mean                    FedAvg, unweighted     server_lr (1.0)
    fedavgm                 FedAvgM (long-lived)   server_lr (1.0), momentum (0.9),
                                                   weighted (True)
    fedadam                 FedAdam (long-lived)   server_lr (0.01), beta1 (0.9), beta2 (0.99),
                                                   tau (1e-3), weighted (True)
    median                  Median                 clip_norm (None), spool (MemorySpool),
                                                   block_values
    trimmed_mean            TrimmedMean            trim_fraction (0.2), as median
    krum                    Krum                   num_byzantine (1), multi (1), as median
    multi_krum              Krum                   num_byzantine (1), multi (None: K - f), ...
    dp_fedavg               CentralDP              clip_norm, noise_multiplier (required)
    ======================  =====================  ==========================================

    ``rng`` (a seeded ``numpy.random.Generator``) is required by dp_fedavg only. The
    options are checked now: an unknown name, option or bad value raises ``ValueError``.
    For fedavgm/fedadam the returned factory holds the optimiser state for the life of
    the federation, for dp_fedavg ``rng``. Every returned factory has ``state()`` and
    ``load_state()`` (``{}`` for the stateless ones), for the coordinator's checkpoint.

    >>> f = make_strategy_factory("median", 2, {})
    >>> s = f(2); s.add(np.array([1.0, 2.0], np.float32), 5); s.finish(np.zeros(2, np.float32)).tolist()
    [1.0, 2.0]
    >>> make_strategy_factory("bulyan", 2, {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown strategy 'bulyan'; known: fedavg, mean, fedavgm, fedadam, median, ...
    """
    options = dict(options)
    if name == "fedavg":
        return _per_round(name, FedAvg, num_params, options)
    if name == "mean":
        if "weighted" in options:
            raise ValueError("strategy 'mean' is unweighted by definition; use 'fedavg' to choose")
        return _per_round(name, FedAvg, num_params, {**options, "weighted": False})
    if name in ("fedavgm", "fedadam"):
        return _build(name, FedAvgM if name == "fedavgm" else FedAdam, num_params, options).factory()
    if name in ("median", "trimmed_mean"):
        return _per_round(name, Median if name == "median" else TrimmedMean, num_params, options)
    if name in ("krum", "multi_krum"):
        return _per_round(name, Krum, num_params, {"multi": 1 if name == "krum" else None, **options})
    if name == "dp_fedavg":
        if rng is None:
            raise ValueError("strategy 'dp_fedavg' needs rng: a seeded numpy.random.Generator")
        return _per_round(name, CentralDP, num_params, options, rng)
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGY_NAMES)}")
