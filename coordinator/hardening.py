"""Policy checks on a complete, verified update, before it reaches the aggregate.

Theory of operation
-------------------
By the time an update gets here the assembler has proven it is *well formed*: every
shard decoded, every digest matched, the layout is the round's. It can still be
*hostile*: a device (or a stolen device key) may send a delta a thousand times larger
than any honest one, or claim ten million training samples so that FedAvg weights its
delta above everyone else's combined. :class:`UpdateScreen` is the coordinator's
last, cheap gate against that: pure numpy, no I/O, one pass over the vector.

=====================  =============================================================
reason                 refused when
=====================  =============================================================
``not_finite``         any value is NaN or infinite (the codecs already refuse these;
                       checked again because a strategy must never see one)
``overflow``           the model plus this delta would not be finite in float32
``num_samples_bound``  ``num_samples`` < 1 or > ``max_num_samples``
``norm_bound``         the L2 norm of the delta exceeds the norm bound (below)
=====================  =============================================================

The norm bound is on by default and adapts to the federation (docs/protocol.md,
"Update bounds"). A fixed ``max_norm`` replaces it. Otherwise the screen remembers the
norms of the last ``window`` updates it passed; once it holds ``warmup`` of them the bound
is ``multiple`` times their median, and before that (a new campaign: nothing is known
about honest norms yet) ``warmup_norm`` times ``max(1, ||model||)``; either way at least
``floor``. The median is what makes the bound hard to ratchet up: a minority of devices
sending updates at the bound moves it not at all. ``multiple = 0`` (and no ``max_norm``)
turns the norm bound off.

The memory of norms is the screen's only state. It changes only when an update passes,
in the order the core sees updates, so a coordinator restarted from its checkpoint
(``state``/``load_state``, kept in ``Checkpoint.screen_state``) and the replay of its
round journal takes exactly the decisions the crashed one took.

A refusal is final for the update (the core acks it ``refused`` with the reason, so the
device stops re-sending the same delta). What this does *not* stop: poisoning that
stays within the bounds - that is the job of robust aggregation
(``coordinator/strategies.py``: median, trimmed mean, Krum) - and leaks of private
data through honest updates (central DP, also in strategies). See docs/security.md.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping

import numpy as np

NORM_BOUND = "norm_bound"
NUM_SAMPLES_BOUND = "num_samples_bound"
NOT_FINITE = "not_finite"
OVERFLOW = "overflow"
NON_FINITE_MODEL = "non_finite_model"  # not an update's: a round whose aggregate is not finite is abandoned
REASONS = (NOT_FINITE, OVERFLOW, NUM_SAMPLES_BOUND, NORM_BOUND)

MAX_NUM_SAMPLES = 1_000_000
NORM_MULTIPLE = 100.0
NORM_WINDOW = 50
NORM_WARMUP = 5
WARMUP_NORM = 100.0
NORM_FLOOR = 0.001
_F32_MAX = float(np.finfo(np.float32).max)


def _positive(name: str, value: object, *, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        need = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a finite number {need}, got {value!r}")
    return float(value)


def _count(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


class UpdateScreen:
    """Refuses updates outside the coordinator's policy bounds.

    >>> screen = UpdateScreen(max_norm=10.0, max_num_samples=1000)
    >>> screen.check(np.full(4, 1.0, np.float32), 100) is None
    True
    >>> screen.check(np.full(4, 6.0, np.float32), 100)  # norm 12
    'norm_bound'
    >>> screen.check(np.zeros(4, np.float32), 5000)
    'num_samples_bound'
    >>> screen.check(np.array([0.0, np.nan], np.float32), 1)
    'not_finite'

    The default bound adapts: 100 x max(1, ||model||) until 5 updates passed, then 100 x
    the median of their norms.

    >>> s = UpdateScreen()
    >>> s.bound(np.zeros(3, np.float32))
    100.0
    >>> [s.check(np.full(1, x, np.float32), 1) for x in (1.0, 2.0, 3.0, 4.0, 5.0)]
    [None, None, None, None, None]
    >>> s.bound(), s.check(np.full(1, 301.0, np.float32), 1)
    (300.0, 'norm_bound')
    """

    def __init__(self, max_norm: float | None = None, max_num_samples: int = MAX_NUM_SAMPLES, *,
                 multiple: float = NORM_MULTIPLE, window: int = NORM_WINDOW, warmup: int = NORM_WARMUP,
                 warmup_norm: float = WARMUP_NORM, floor: float = NORM_FLOOR) -> None:
        self.max_norm = None if max_norm is None else _positive("max_norm", max_norm)
        self.max_num_samples = _count("max_num_samples", max_num_samples, 1)
        self.multiple = _positive("norm_multiple", multiple, zero=True)
        self.window = _count("norm_window", window, 1)
        self.warmup = _count("norm_warmup", warmup, 1)
        if self.warmup > self.window:
            raise ValueError(f"norm_warmup ({warmup}) must be <= norm_window ({window})")
        self.warmup_norm = _positive("warmup_norm", warmup_norm)
        self.floor = _positive("norm_floor", floor, zero=True)
        self._norms: deque[float] = deque(maxlen=self.window)  # of the last updates passed, oldest first

    @property
    def adaptive(self) -> bool:
        """Whether the norm bound follows the accepted norms (no fixed ``max_norm``, multiple > 0)."""
        return self.max_norm is None and self.multiple > 0

    def bound(self, model: np.ndarray | None = None) -> float | None:
        """The norm bound an update completing now must meet, or None (no norm bound).

        ``model``: the global model the update is a delta from (its norm scales the warm-up
        bound; None counts as norm 0)."""
        if self.max_norm is not None:
            return self.max_norm
        if self.multiple == 0:
            return None
        if len(self._norms) < self.warmup:
            size = self.norm(model) if model is not None else 0.0
            return max(self.floor, self.warmup_norm * max(1.0, size))
        return max(self.floor, self.multiple * float(np.median(np.fromiter(self._norms, np.float64))))

    def check(self, vector: np.ndarray, num_samples: int, model: np.ndarray | None = None) -> str | None:
        """The refusal reason for this update, or None to accept it (its norm is then remembered).

        Checked in the order of the table above, so a NaN update reports ``not_finite``
        whatever its weight. ``model``: the global model the delta applies to (for
        ``overflow`` and the warm-up bound); without it neither uses the model.
        """
        v = np.asarray(vector)
        if v.dtype.kind not in "fiu" or not np.isfinite(v).all():
            return NOT_FINITE
        if model is not None and v.size and _peak(model) + _peak(v) > _F32_MAX:
            return OVERFLOW  # |w + d| <= |w| + |d|: below float32's largest value, nothing overflows
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
                or not 1 <= num_samples <= self.max_num_samples:
            return NUM_SAMPLES_BOUND
        norm = self.norm(v)
        limit = self.bound(model)
        if limit is not None and norm > limit:
            return NORM_BOUND
        self._norms.append(norm)
        return None

    __call__ = check  # so the screen itself is the core's ``screen(vector, num_samples, model)`` hook

    # -- state across restarts (the coordinator's checkpoint) ---------------------------------------

    def state(self) -> dict[str, object]:
        """The remembered norms, as a checkpoint keeps them (a copy)."""
        return {"norms": np.fromiter(self._norms, np.float64)}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Put back :meth:`state`; ``{}`` (a new core, or a checkpoint from before the screen
        kept state) forgets every norm. Raises ``ValueError`` for anything else."""
        norms = np.asarray(state.get("norms", ()), dtype=np.float64).ravel()
        if set(state) - {"norms"} or not np.isfinite(norms).all() or (norms < 0).any():
            raise ValueError(f"update screen state: expected {{'norms': finite norms >= 0}}, got keys {sorted(state)}")
        self._norms = deque((float(x) for x in norms), maxlen=self.window)

    @staticmethod
    def norm(vector: np.ndarray) -> float:
        """L2 norm, accumulated in float64 (no overflow for any finite float32 vector).

        A float32 sum of squares overflows to inf once values reach ~1e19, which would
        turn a merely large update into a NaN-like one; float64 holds any float32 square.
        """
        v = np.asarray(vector, dtype=np.float64).ravel()
        return float(math.sqrt(float(np.dot(v, v))))


def _peak(vector: np.ndarray) -> float:
    v = np.asarray(vector)
    return float(np.max(np.abs(v))) if v.size else 0.0  # |x| of a finite float is exact


def model_is_finite(model: np.ndarray) -> bool:
    """Whether a new global model is fit to publish: every value finite. The core checks the
    aggregate with this before it commits: a strategy's arithmetic can overflow where no
    single update did.

    >>> model_is_finite(np.ones(2, np.float32)), model_is_finite(np.array([1, np.inf], np.float32))
    (True, False)
    """
    return bool(np.isfinite(model).all())
