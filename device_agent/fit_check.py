"""What the agent checks in a trainer's result before it becomes an update.

Theory of operation
-------------------
A device trains on whatever global model it is sent. A degenerate one (values near
float32's limit, NaN, a learning rate that makes training explode) gives a NaN loss or
NaN parameters, and a trainer plug-in may return anything at all. None of that may reach
the update encoder, which refuses non-finite numbers by raising (an internal error that
would end the agent): :func:`check_fit` looks first, with no I/O and no state, and says
what can be sent.

* The fit **fails** (``FitVerdict.reason``; nothing is uploaded this round, the agent
  goes on with the next one) when the result is not a ``FitResult``, its ``num_samples``
  is not an integer in ``1 .. 2**40``, its parameters are not the global model's (names,
  shapes, float32), a parameter is not finite (``non_finite_params``), or the delta
  ``local - global`` is not finite in float32 (``non_finite_delta``: both finite, but
  3e38 - (-3e38) is not).
* A **metric** that cannot be sent (not a finite number, a name of more than 32 UTF-8
  bytes, beyond the 32nd) is left out of the update and named in ``dropped``: the update
  itself is still good, and the coordinator's bounds judge it.

>>> import numpy as np
>>> from fedsync.trainer_api import FitResult
>>> model = {"w": np.zeros(2, np.float32)}
>>> check_fit(model, FitResult({"w": np.ones(2, np.float32)}, 5, {"train_loss": float("nan"), "steps": 1.0}))
FitVerdict(reason=None, metrics={'steps': 1.0}, dropped=('train_loss',))
>>> check_fit(model, FitResult({"w": np.array([1.0, np.nan], np.float32)}, 5, {})).reason
"non_finite_params: 'w'"
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedsync.plugins import SpecMismatch, check_spec
from fedsync.trainer_api import FitResult

MAX_METRICS = 32  # the UpdateShard's metrics map (docs/protocol.cddl number-map)
MAX_METRIC_NAME = 32  # bytes of UTF-8
MAX_NUM_SAMPLES = 2**40
MAX_REASON = 200  # a log line, not an essay


@dataclass(frozen=True, slots=True)
class FitVerdict:
    """``reason``: why the fit failed (None: send it); ``metrics``: what can be sent; ``dropped``:
    the metric names left out."""

    reason: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()


def check_fit(model: Mapping[str, np.ndarray], result: object) -> FitVerdict:
    """The verdict on ``result``, a trainer's fit from the global ``model`` (see the module docstring)."""
    if not isinstance(result, FitResult):
        return FitVerdict(f"result: fit returned {type(result).__name__}, not a FitResult")
    n = result.num_samples
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_NUM_SAMPLES:
        return FitVerdict(f"num_samples: {n!r} is not an integer in 1..2**40"[:MAX_REASON])
    params = result.params
    if not isinstance(params, Mapping) or not all(isinstance(v, np.ndarray) for v in params.values()):
        return FitVerdict("params: not a dict of numpy arrays")
    try:
        check_spec([(k, v.shape) for k, v in model.items()], params, "parameter")
    except SpecMismatch as err:
        return FitVerdict(f"params: {err}"[:MAX_REASON])
    with np.errstate(over="ignore", invalid="ignore"):
        for name in sorted(model):
            if not np.isfinite(params[name]).all():
                return FitVerdict(f"non_finite_params: {name!r}"[:MAX_REASON])
            if not np.isfinite(params[name] - np.asarray(model[name], np.float32)).all():
                return FitVerdict(f"non_finite_delta: {name!r}"[:MAX_REASON])
    metrics, dropped = _sendable(result.metrics)
    return FitVerdict(None, metrics, dropped)


def _sendable(metrics: object) -> tuple[dict[str, float], tuple[str, ...]]:
    """The metrics an UpdateShard can carry (as float64, the way the encoder writes them) and
    the names of the others."""
    if not isinstance(metrics, Mapping):
        return {}, ("<metrics>",)
    kept: dict[str, float] = {}
    dropped: list[str] = []
    for name, value in metrics.items():
        number = _finite(value)
        if (isinstance(name, str) and len(name.encode("utf-8", "surrogatepass")) <= MAX_METRIC_NAME
                and number is not None and len(kept) < MAX_METRICS):
            kept[name] = number
        else:
            dropped.append(str(name)[:MAX_METRIC_NAME])
    return kept, tuple(dropped)


def _finite(value: object) -> float | None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64
        return None
    return number if math.isfinite(number) else None
