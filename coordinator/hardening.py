"""Policy checks on a complete, verified update, before it reaches the aggregate.

Theory of operation
-------------------
By the time an update gets here the assembler has proven it is *well formed*: every
shard decoded, every digest matched, the layout is the round's. It can still be
*hostile*: a device (or a stolen device key) may send a delta a thousand times larger
than any honest one, or claim ten billion training samples so that FedAvg weights its
delta above everyone else's combined. :class:`UpdateScreen` is the coordinator's
last, cheap gate against that: pure numpy, no I/O, one pass over the vector.

=====================  =============================================================
reason                 rejected when
=====================  =============================================================
``not_finite``         any value is NaN or infinite (the codecs already refuse these;
                       checked again because a strategy must never see one)
``num_samples_bound``  ``num_samples`` < 1 or > ``max_num_samples``
``norm_bound``         the L2 norm of the delta exceeds ``max_norm`` (if set)
=====================  =============================================================

A rejection is final for the update (the core acks it with a final status so the
device stops re-sending the same delta). What this does *not* stop: poisoning that
stays within the bounds - that is the job of robust aggregation
(``coordinator/strategies.py``: median, trimmed mean, Krum) - and leaks of private
data through honest updates (central DP, also in strategies). See docs/security.md.

Choosing ``max_norm``: a few times the norm of a typical honest delta (``lr x epochs x
gradient norm``); the coordinator's logs carry each accepted update's norm. Clipping
to the bound instead of rejecting is what DP-FedAvg does; that belongs to the
strategy, which knows the noise it adds.
"""

from __future__ import annotations

import math

import numpy as np

NORM_BOUND = "norm_bound"
NUM_SAMPLES_BOUND = "num_samples_bound"
NOT_FINITE = "not_finite"


class UpdateScreen:
    """Rejects updates outside the coordinator's policy bounds.

    >>> screen = UpdateScreen(max_norm=10.0, max_num_samples=1000)
    >>> screen.check(np.full(4, 1.0, np.float32), 100) is None
    True
    >>> screen.check(np.full(4, 6.0, np.float32), 100)  # norm 12
    'norm_bound'
    >>> screen.check(np.zeros(4, np.float32), 5000)
    'num_samples_bound'
    >>> screen.check(np.array([0.0, np.nan], np.float32), 1)
    'not_finite'
    """

    def __init__(self, max_norm: float | None = None, max_num_samples: int = 10_000_000) -> None:
        if max_norm is not None and (isinstance(max_norm, bool) or not math.isfinite(max_norm) or max_norm <= 0):
            raise ValueError(f"max_norm must be a positive finite number or None, got {max_norm!r}")
        if isinstance(max_num_samples, bool) or not isinstance(max_num_samples, int) or max_num_samples < 1:
            raise ValueError(f"max_num_samples must be an integer >= 1, got {max_num_samples!r}")
        self.max_norm = None if max_norm is None else float(max_norm)
        self.max_num_samples = max_num_samples

    def check(self, vector: np.ndarray, num_samples: int) -> str | None:
        """The rejection reason for this update, or None to accept it.

        Checked in the order of the table above, so a NaN update reports
        ``not_finite`` whatever its weight.
        """
        v = np.asarray(vector)
        if v.dtype.kind not in "fiu" or not np.isfinite(v).all():
            return NOT_FINITE
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
                or not 1 <= num_samples <= self.max_num_samples:
            return NUM_SAMPLES_BOUND
        if self.max_norm is not None and self.norm(v) > self.max_norm:
            return NORM_BOUND
        return None

    __call__ = check  # so the screen itself is the core's ``screen(vector, num_samples)`` hook

    @staticmethod
    def norm(vector: np.ndarray) -> float:
        """L2 norm, accumulated in float64 (no overflow for any finite float32 vector).

        A float32 sum of squares overflows to inf once values reach ~1e19, which would
        turn a merely large update into a NaN-like one; float64 holds any float32 square.
        """
        v = np.asarray(vector, dtype=np.float64).ravel()
        return float(math.sqrt(float(np.dot(v, v))))
