"""scikit-learn estimators as fedsync trainers: ``SGDClassifier``, ``SGDRegressor``, ``MLPClassifier``.

Theory of operation
-------------------
fedsync federates named float32 arrays; scikit-learn keeps a fitted model in
attributes. :func:`get_params` and :func:`set_params` map one to the other:

=================  ===================================================================
estimator          parameters (float32 on the wire; the estimator keeps its own dtype)
=================  ===================================================================
SGDClassifier      ``coef`` (classes, features) [(1, features) for two classes], ``intercept``
SGDRegressor       ``coef`` (features,), ``intercept`` (1,)
MLPClassifier      ``coefs.0 .. coefs.{L-1}`` (fan_in, fan_out), ``intercepts.0 ..``
=================  ===================================================================

:func:`initial_params` gives the global model's starting point without data: zeros for
the linear models (their loss is convex), and for the MLP scikit-learn's own Glorot-uniform
rule (weights and biases uniform in +-sqrt(6 / (fan_in + fan_out)), 2 instead of 6 for
a logistic activation), drawn from a seeded generator.

:class:`SklearnTrainer` holds one estimator per device. scikit-learn has no public way
to make an estimator "fitted" without data, so an estimator is built with one
``partial_fit`` on two rows, and its parameters are then overwritten with the global
model. A fit is ``epochs`` passes over the device's training split, each pass one
``partial_fit`` on the split in an order drawn from the round's ``rng``:

- SGD models: per-sample SGD with ``hyper["lr"]`` as ``eta0`` (read on every call; use
  ``learning_rate="constant"``, since ``"optimal"`` ignores ``eta0``). The estimator is kept
  across rounds; it holds no optimiser state but its step counter.
- MLPClassifier: minibatches of the estimator's ``batch_size``. Its optimiser (SGD
  momentum or Adam moments) and learning rate are made at its first ``partial_fit`` and
  then kept, so every fit builds a fresh clone with ``learning_rate_init = hyper["lr"]``:
  a round starts from clean optimiser state, except what the two-row building step left
  in it (nothing with ``momentum=0``).

FedProx (``hyper["mu"] > 0``): scikit-learn runs each pass itself, so the proximal term
mu/2 ||w - w_global||^2 is applied after every pass, as the decay its gradient steps would
have caused over that pass's ``T`` steps (samples for SGD models, minibatches for the MLP).
Each step multiplies the distance from w_global by q = 1 - lr * mu, so the distance the
pass started with is kept by q ** T, and the displacement the pass itself made, spread
evenly over its steps, by the mean of q ** j over j < T, (1 - q ** T) / (T * lr * mu):
w <- w_global + (w_start - w_global) * q ** T + (w_end - w_start) * (1 - q ** T) / (T lr mu).
This is exactly what interleaving the term with every step gives when every step moves
the weights alike; decaying the whole pass by q ** T instead (as if every step came
first) left the model at its start for large mu (mu 1.0 at lr 0.05 over 140 samples:
0.001 of the pass kept, against 0.14 now; docs/benchmarks.md).

``evaluate`` reports mean log-loss and accuracy for classifiers (hinge-loss SGD, which
has no probabilities, reports loss 0), and for regressors the mean squared error as
``loss`` and max(0, R^2) as ``accuracy``.

Example (a two-device round on scikit-learn's digits)::

    from sklearn.linear_model import SGDClassifier
    from fedsync.adapters.sklearn import SklearnTrainer, initial_params
    from fedsync.datasets import digits_federation

    devices = digits_federation(num_devices=2, seed=0)
    make = lambda: SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.05)
    trainers = [SklearnTrainer(make(), d, classes=range(10)) for d in devices]
    start = initial_params(make(), n_features=64, classes=range(10))
    result = trainers[0].fit(start, {"lr": 0.05, "epochs": 1}, np.random.default_rng(0))
    trainers[0].evaluate(result.params).accuracy   # ~0.9
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.metrics import log_loss, r2_score
from sklearn.neural_network import MLPClassifier

from fedsync.trainer_api import EvalResult, FitResult

__all__ = ["SUPPORTED", "SklearnTrainer", "fedprox_pass", "get_params", "initial_params", "set_params"]

SUPPORTED = (SGDClassifier, SGDRegressor, MLPClassifier)


def _kind(estimator) -> str:
    if isinstance(estimator, MLPClassifier):
        return "mlp"
    if isinstance(estimator, (SGDClassifier, SGDRegressor)):
        return "linear"
    raise TypeError(f"fedsync.adapters.sklearn supports SGDClassifier, SGDRegressor and MLPClassifier, "
                    f"not {type(estimator).__name__}")


def get_params(estimator) -> dict[str, np.ndarray]:
    """A fitted estimator's parameters as named float32 arrays.

    >>> from sklearn.linear_model import SGDRegressor
    >>> est = SGDRegressor().partial_fit(np.eye(3), [1.0, 2.0, 3.0])
    >>> {k: v.shape for k, v in get_params(est).items()}
    {'coef': (3,), 'intercept': (1,)}
    """
    if _kind(estimator) == "mlp":
        out = {f"coefs.{i}": w for i, w in enumerate(estimator.coefs_)}
        out.update({f"intercepts.{i}": b for i, b in enumerate(estimator.intercepts_)})
    else:
        out = {"coef": estimator.coef_, "intercept": estimator.intercept_}
    return {k: np.array(v, dtype=np.float32) for k, v in out.items()}


def set_params(estimator, params: Mapping[str, np.ndarray]) -> None:
    """Load named arrays into a fitted estimator (copies, in the estimator's dtype). A name or shape that
    the estimator does not have raises ``ValueError`` naming the parameter.

    >>> from sklearn.linear_model import SGDRegressor
    >>> est = SGDRegressor().partial_fit(np.eye(2), [1.0, 2.0])
    >>> set_params(est, {"coef": np.ones(2, np.float32), "intercept": np.zeros(1, np.float32)})
    >>> est.predict(np.eye(2)).tolist()
    [1.0, 1.0]
    """
    current = get_params(estimator)
    for name in sorted(set(current) | set(params)):
        if name not in params:
            raise ValueError(f"parameter {name!r} is missing for {type(estimator).__name__}")
        if name not in current:
            raise ValueError(f"parameter {name!r} is not a parameter of {type(estimator).__name__}")
        if tuple(np.shape(params[name])) != current[name].shape:
            raise ValueError(f"parameter {name!r} has shape {tuple(np.shape(params[name]))}, "
                             f"{type(estimator).__name__} has {current[name].shape}")
    mlp = _kind(estimator) == "mlp"
    # The estimator's own dtype: scikit-learn keeps float32 inputs float32 and its Cython SGD
    # refuses a float64 coef_ beside float32 data.
    dtype = (estimator.coefs_[0] if mlp else estimator.coef_).dtype
    native = {k: np.array(v, dtype=dtype) for k, v in params.items()}
    if mlp:
        n = len(estimator.coefs_)
        estimator.coefs_ = [native[f"coefs.{i}"] for i in range(n)]
        estimator.intercepts_ = [native[f"intercepts.{i}"] for i in range(n)]
    else:
        estimator.coef_, estimator.intercept_ = native["coef"], native["intercept"]


def initial_params(estimator, n_features: int, classes: Iterable | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The global model's starting parameters for ``estimator`` (unfitted is fine), without data.

    ``classes`` is required for classifiers. Two classes give scikit-learn's binary
    shapes (one output).

    >>> from sklearn.neural_network import MLPClassifier
    >>> p = initial_params(MLPClassifier(hidden_layer_sizes=(16,)), n_features=64, classes=range(10))
    >>> {k: v.shape for k, v in p.items()}
    {'coefs.0': (64, 16), 'coefs.1': (16, 10), 'intercepts.0': (16,), 'intercepts.1': (10,)}
    """
    kind = _kind(estimator)
    if isinstance(estimator, SGDRegressor):
        outputs = 1
    else:
        if classes is None:
            raise ValueError(f"{type(estimator).__name__} needs classes= to size its output")
        n_classes = len(list(classes))
        if n_classes < 2:
            raise ValueError(f"need at least 2 classes, got {n_classes}")
        outputs = 1 if n_classes == 2 else n_classes
    if kind == "linear":
        if isinstance(estimator, SGDRegressor):
            return {"coef": np.zeros(n_features, np.float32), "intercept": np.zeros(1, np.float32)}
        return {"coef": np.zeros((outputs, n_features), np.float32), "intercept": np.zeros(outputs, np.float32)}
    hidden = estimator.hidden_layer_sizes
    units = [n_features, *([hidden] if isinstance(hidden, int) else hidden), outputs]
    factor = 2.0 if estimator.activation == "logistic" else 6.0
    rng = np.random.default_rng(seed)
    out = {}
    for i, (fan_in, fan_out) in enumerate(zip(units, units[1:])):
        bound = np.sqrt(factor / (fan_in + fan_out))
        out[f"coefs.{i}"] = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        out[f"intercepts.{i}"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return dict(sorted(out.items()))


def fedprox_pass(anchor: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], end: Mapping[str, np.ndarray],
                 rate: float, steps: int) -> dict[str, np.ndarray]:
    """The weights after one pass of ``steps`` steps with FedProx's pull at ``rate`` = lr * mu
    towards ``anchor`` (see the module docstring), from the pass's ``start`` and ``end``.

    >>> a, s, e = {"w": np.zeros(1)}, {"w": np.ones(1)}, {"w": np.full(1, 3.0)}
    >>> out = fedprox_pass(a, s, e, 0.5, 2)  # q = 0.5: start kept by 0.25, the pass by 0.75/1.0
    >>> float(out["w"][0])
    1.75
    """
    q = 1.0 - rate
    if not 0.0 < q < 1.0:
        raise ValueError(f"lr * mu must be in (0, 1) for the proximal pull, got {rate}")
    kept, spread = q ** steps, (1.0 - q ** steps) / (steps * rate)
    return {k: anchor[k] + (start[k] - anchor[k]) * kept + (end[k] - start[k]) * spread for k in end}


class SklearnTrainer:
    """A :class:`~fedsync.trainer_api.Trainer` around one scikit-learn estimator and one
    device's data (any object with ``x_train, y_train, x_test, y_test``, such as
    :class:`fedsync.synthetic.DeviceData`). ``classes`` is every class of the federation:
    a device may hold only some of them. Reports ``train_loss`` and ``passes``.

    >>> from sklearn.linear_model import SGDClassifier
    >>> from fedsync.datasets import digits_federation
    >>> device = digits_federation(num_devices=1, seed=0)[0]
    >>> est = SGDClassifier(loss="log_loss", learning_rate="constant", eta0=0.05)
    >>> trainer = SklearnTrainer(est, device, classes=range(10))
    >>> start = initial_params(est, 64, range(10))
    >>> result = trainer.fit(start, {"lr": 0.05, "epochs": 2}, np.random.default_rng(0))
    >>> result.num_samples == len(device.y_train), trainer.evaluate(result.params).accuracy > 0.9
    (True, True)
    """

    def __init__(self, estimator, data, classes: Iterable | None = None) -> None:
        self.kind = _kind(estimator)
        self.template = clone(estimator)  # unfitted: the MLP is rebuilt from it every fit
        self.estimator = estimator
        self.data = data
        self.classes = None if classes is None else np.asarray(list(classes))
        self.regressor = isinstance(estimator, SGDRegressor)
        if not self.regressor and self.classes is None:
            raise ValueError(f"{type(estimator).__name__} needs classes= (every class of the federation)")
        self._built = False

    @property
    def num_train(self) -> int:
        return int(len(self.data.y_train))

    def _partial_fit(self, est, x: np.ndarray, y: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # one pass is a pass, not a failure
            # The two-row building step is smaller than the MLP's batch_size: expected, not news.
            warnings.filterwarnings("ignore", "Got `batch_size` less than 1 or larger than sample size", UserWarning)
            if self.regressor:
                est.partial_fit(x, y)
            else:
                est.partial_fit(x, y, classes=self.classes)

    def _build(self, est, params: Mapping[str, np.ndarray]) -> None:
        """Make ``est`` fitted (one partial_fit on two rows), then load ``params``."""
        if est is not self.estimator or not self._built:
            self._partial_fit(est, np.asarray(self.data.x_train[:2]), np.asarray(self.data.y_train[:2]))
            self._built = self._built or est is self.estimator
        set_params(est, params)

    def fit(self, params, hyper, rng) -> FitResult:
        lr, epochs, mu = float(hyper.get("lr", 0.01)), int(hyper.get("epochs", 1)), float(hyper.get("mu", 0.0))
        if not (np.isfinite(lr) and lr > 0) or epochs < 1 or not (np.isfinite(mu) and 0 <= mu * lr < 1):
            raise ValueError(f"hyper-parameters need lr > 0, epochs >= 1, 0 <= lr * mu < 1; "
                             f"got lr={lr}, epochs={epochs}, mu={mu}")
        x, y = np.asarray(self.data.x_train), np.asarray(self.data.y_train)
        seed = int(rng.integers(2**31 - 1))
        if self.kind == "mlp":
            # A fresh estimator: its optimiser (momentum, Adam moments) and learning rate are
            # made by its first partial_fit and kept after, so reuse would carry them across rounds.
            est = clone(self.template).set_params(learning_rate_init=lr, random_state=seed)
            batch = max(1, min(200 if est.batch_size == "auto" else int(est.batch_size), len(y)))  # sklearn's rule
            steps = -(-len(y) // batch)
        else:
            est = self.estimator.set_params(eta0=lr, random_state=seed)
            steps = len(y)
        self._build(est, params)
        anchor = {k: np.asarray(v, np.float64) for k, v in params.items()}
        for _ in range(epochs):
            order = rng.permutation(len(y))
            before = get_params(est) if mu else None
            self._partial_fit(est, x[order], y[order])
            if mu:
                set_params(est, fedprox_pass(anchor, before, get_params(est), lr * mu, steps))
        self.estimator = est
        self._built = True
        return FitResult(get_params(est), num_samples=len(y),
                         metrics={"train_loss": self._loss(x, y), "passes": float(epochs)})

    def _loss(self, x: np.ndarray, y: np.ndarray) -> float:
        est = self.estimator
        if self.regressor:
            return float(np.mean((est.predict(x) - y) ** 2))
        if not hasattr(est, "predict_proba"):  # hinge loss: no probabilities
            return 0.0
        return float(log_loss(y, est.predict_proba(x), labels=est.classes_))

    def evaluate(self, params) -> EvalResult:
        self._build(self.estimator, params)
        x, y = np.asarray(self.data.x_test), np.asarray(self.data.y_test)
        if self.regressor:
            score = max(0.0, float(r2_score(y, self.estimator.predict(x)))) if len(y) > 1 else 0.0
            return EvalResult(loss=self._loss(x, y), accuracy=score, num_samples=len(y))
        accuracy = float(np.mean(self.estimator.predict(x) == y))
        return EvalResult(loss=self._loss(x, y), accuracy=accuracy, num_samples=len(y))
