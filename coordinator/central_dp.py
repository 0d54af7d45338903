"""Central differential privacy: clipping, Gaussian noise, and DP-FedAvg (:class:`CentralDP`).

Theory of operation
-------------------
:func:`clip_by_norm` and :func:`gaussian_noise` are the pure parts; :class:`CentralDP`
is a per-round strategy (the :class:`fedsync.coordinator.aggregate.Strategy` protocol) that
clips every delta on ``add`` and adds noise once, in ``finish`` of a round that had
updates. :class:`fedsync.coordinator.strategies.PerRoundFactory` builds one per round, all
drawing from one seeded ``numpy.random.Generator``.

That generator is the only state dp_fedavg carries across rounds, and crash recovery
must carry it too: a coordinator restarted with a fresh generator would publish the noise
of round 1 again, so its models would differ from a fault-free run's, and the same
noise twice is worse privacy than fresh noise (two noisy copies average it down). The
checkpoint holds the generator's state instead (:func:`generator_state`, put back by
:func:`load_generator_state`), taken right after ``finish`` drew the committed round's
noise; an abandoned round draws nothing. So a restarted coordinator draws the next
round's noise exactly where the crashed one would have. Seeding each round's noise from
(seed, round id) instead would need the round id in the factory call, and would change
the noise of every existing seeded run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedsync.coordinator.aggregate import FedAvg, StrategyState, check_delta, mean_delta
from fedsync.executor import INLINE, Executor

__all__ = ["CentralDP", "clip_by_norm", "gaussian_noise", "generator_state", "load_generator_state"]


def clip_by_norm(delta: np.ndarray, max_norm: float) -> np.ndarray:
    """``delta`` scaled down to L2 norm ``max_norm`` if it is longer; same dtype.

    A delta already within the bound is returned as is (the same object, not a copy).
    Raises ``ValueError`` unless max_norm is finite and > 0.

    >>> clip_by_norm(np.array([6.0, 8.0]), 5.0).tolist()
    [3.0, 4.0]
    >>> clip_by_norm(np.array([0.3, 0.4]), 5.0).tolist()
    [0.3, 0.4]
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm}")
    wide = delta.astype(np.float64, copy=False)
    norm = float(np.linalg.norm(wide))
    if norm <= max_norm:
        return delta
    return (wide * (max_norm / norm)).astype(delta.dtype, copy=False)  # one rounding, not two


def gaussian_noise(shape: int | tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """Independent N(0, std^2) values, float64, drawn from the caller's ``rng``.

    Raises ``ValueError`` unless std is finite and >= 0 (std = 0 gives zeros).

    >>> gaussian_noise(3, 0.0, np.random.default_rng(0)).tolist()
    [0.0, 0.0, 0.0]
    >>> gaussian_noise((2, 2), 1.0, np.random.default_rng(0)).shape
    (2, 2)
    """
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    return rng.normal(0.0, std, size=shape)


def generator_state(rng: np.random.Generator) -> StrategyState:
    """The state of ``rng``'s bit generator as flat ``"rng.<key>[.<key>]"`` entries.

    ``bit_generator.state`` is a nested dict (PCG64: its name, a 128-bit state and
    increment, a buffered half-word); flat, it fits a checkpoint's strategy state.
    :func:`load_generator_state` puts it back.

    >>> rng = np.random.default_rng(0); saved = generator_state(rng); first = rng.normal()
    >>> sorted(saved)
    ['rng.bit_generator', 'rng.has_uint32', 'rng.state.inc', 'rng.state.state', 'rng.uinteger']
    >>> load_generator_state(rng, saved); rng.normal() == first
    True
    """
    flat: StrategyState = {}

    def walk(prefix: str, node: Mapping) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value.copy() if isinstance(value, np.ndarray) else value

    walk("rng.", rng.bit_generator.state)
    return flat


def load_generator_state(rng: np.random.Generator, state: Mapping[str, object]) -> None:
    """Set ``rng`` to a state :func:`generator_state` returned.

    Raises ``ValueError`` for entries that are not ``rng.*`` (another strategy's state) or the
    state of another bit generator.
    """
    if not all(key.startswith("rng.") for key in state):
        raise ValueError(f"a noise generator's state is 'rng.*'; the checkpoint holds {sorted(state)} "
                         "(written under another strategy?)")
    nested: dict = {}
    for key, value in state.items():
        *path, leaf = key.split(".")[1:]
        node = nested
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        rng.bit_generator.state = nested
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"noise generator state does not fit {type(rng.bit_generator).__name__}: "
                         f"{err}") from None


class CentralDP:
    """DP-FedAvg with central noise (McMahan et al. 2018, "Learning Differentially
    Private Recurrent Language Models"), unweighted, with a trusted coordinator.

    Each delta is clipped to L2 norm C = ``clip_norm``; then
    global += mean(clipped) + N(0, sigma^2 I) with sigma = noise_multiplier * C / K.
    That is the Gaussian mechanism on the *sum*: one device changes the sum by at most
    C, and the sum gets noise of std z * C (z = noise_multiplier); dividing by K gives
    sigma (user-level DP: a device's whole update is the unit protected). McMahan et al.'s
    fixed-denominator estimator divides by the *expected* K; dividing by the actual K,
    as here, treats K as public (it is in the round's accepted list). The coordinator
    sees raw deltas, so it must be trusted; the DP guarantee covers the published models.
    Privacy accounting (epsilon over rounds, from z and the sampling rate) is not done
    here. z = 0 adds no noise (no privacy: for tests). ``num_samples`` is ignored, since
    weights would change the sensitivity. Noise comes from ``rng`` only, drawn in
    ``finish`` of a round with updates (an abandoned or empty round draws nothing); share
    one ``rng`` across rounds, as :func:`make_strategy_factory` does, whose factory also
    checkpoints it. ``finish`` returns ``None`` when no update was added: keep the
    previous model.

    >>> s = CentralDP(2, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    >>> s.add(np.array([3.0, 4.0], np.float32), 10); s.add(np.array([0.0, 0.5], np.float32), 1)
    >>> s.finish(np.zeros(2, np.float32)).tolist()  # mean of [0.6, 0.8] and [0, 0.5]
    [0.30000001192092896, 0.6499999761581421]
    """

    def __init__(self, num_params: int, clip_norm: float, noise_multiplier: float,
                 rng: np.random.Generator) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError("rng must be a seeded numpy.random.Generator")
        self.num_params = num_params
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.rng = rng
        self.noise_std: float | None = None  # sigma of the last finish, for logs
        self._mean = FedAvg(num_params, weighted=False)
        self.executor: Executor = INLINE  # set by the core (aggregate.use_executor), used by the mean

    def add(self, delta: np.ndarray, num_samples: int) -> None:
        check_delta(delta, self.num_params)
        self._mean.executor = self.executor
        self._mean.add(clip_by_norm(delta.astype(np.float64), self.clip_norm), 1)

    def finish(self, global_vector: np.ndarray) -> np.ndarray | None:
        mean = mean_delta(self._mean, self.num_params)
        if mean is None:
            return None
        self.noise_std = self.noise_multiplier * self.clip_norm / self._mean.count
        noise = gaussian_noise(self.num_params, self.noise_std, self.rng)
        return (global_vector.astype(np.float64) + mean + noise).astype(np.float32)
