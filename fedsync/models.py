"""Built-in numpy models for the device trainers.

A model object holds only its shape (``dim``, ``num_classes``, ...). Its
parameters live in a plain ``dict[str, np.ndarray]`` that is passed in and out of
every method, so the same dict can be flattened, sharded, sent over MQTT and
averaged without the model knowing. Methods never modify their arguments.

Arithmetic follows the dtype of the parameters and inputs: ``init_params`` returns
float32 (what goes on the wire); passing float64 arrays gives float64 results,
which is what a finite-difference gradient check needs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = [
    "MLP",
    "Model",
    "SoftmaxRegression",
    "build_model",
    "param_spec",
    "softmax_cross_entropy",
]

Params = dict[str, np.ndarray]


class Model(Protocol):
    """What the built-in trainers need from a model: pure functions of ``params``."""

    def init_params(self, rng: np.random.Generator) -> Params: ...

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray: ...

    def loss_and_grad(
        self, params: Params, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, Params]: ...

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray: ...


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of integer labels ``y`` and its gradient w.r.t. ``logits``.

    Stable for any finite logits: the row maximum is subtracted before ``exp``
    (log-sum-exp), so nothing overflows and ``log`` never sees 0.

    Example:
        >>> loss, d = softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
        >>> round(loss, 4), d.shape  # log(4) for a uniform guess
        (1.3863, (2, 4))
    """
    n = logits.shape[0]
    rows = np.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    dlogits = np.exp(shifted)  # <= 1 everywhere, and 1 at each row's maximum
    norm = dlogits.sum(axis=1)  # >= 1, so its log is finite
    loss = float(np.mean(np.log(norm) - shifted[rows, y]))
    dlogits /= norm[:, None]
    dlogits[rows, y] -= 1.0
    dlogits /= n
    return loss, dlogits


class SoftmaxRegression:
    """Multinomial logistic regression: ``logits = x @ w + b``.

    Example:
        >>> model = SoftmaxRegression(dim=3, num_classes=2)
        >>> params = model.init_params(np.random.default_rng(0))
        >>> x, y = np.ones((4, 3), np.float32), np.array([0, 1, 1, 0])
        >>> loss, grads = model.loss_and_grad(params, x, y)
        >>> sorted(grads), grads["w"].shape
        (['b', 'w'], (3, 2))
    """

    __slots__ = ("dim", "num_classes")

    def __init__(self, dim: int, num_classes: int) -> None:
        if dim < 1 or num_classes < 2:
            raise ValueError(f"need dim >= 1 and num_classes >= 2, got {dim}, {num_classes}")
        self.dim = dim
        self.num_classes = num_classes

    def init_params(self, rng: np.random.Generator) -> Params:
        # The loss is convex, so zeros is a fine start; rng is accepted so every
        # model is initialised the same way.
        del rng
        return {
            "w": np.zeros((self.dim, self.num_classes), np.float32),
            "b": np.zeros(self.num_classes, np.float32),
        }

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        return x @ params["w"] + params["b"]

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        loss, dlogits = softmax_cross_entropy(self.logits(params, x), y)
        return loss, {"w": x.T @ dlogits, "b": dlogits.sum(axis=0)}

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(params, x), axis=1)


class MLP:
    """One hidden ReLU layer: ``logits = relu(x @ w1 + b1) @ w2 + b2``.

    ``w1`` gets He-normal init (it feeds a ReLU), ``w2`` Glorot-uniform (it feeds
    the softmax); biases start at zero.

    Example:
        >>> model = MLP(dim=3, hidden=8, num_classes=2)
        >>> params = model.init_params(np.random.default_rng(0))
        >>> model.predict(params, np.ones((5, 3), np.float32)).shape
        (5,)
    """

    __slots__ = ("dim", "hidden", "num_classes")

    def __init__(self, dim: int, hidden: int, num_classes: int) -> None:
        if dim < 1 or hidden < 1 or num_classes < 2:
            raise ValueError(
                f"need dim >= 1, hidden >= 1, num_classes >= 2, got {dim}, {hidden}, {num_classes}"
            )
        self.dim = dim
        self.hidden = hidden
        self.num_classes = num_classes

    def init_params(self, rng: np.random.Generator) -> Params:
        he_std = np.sqrt(2.0 / self.dim)
        glorot = np.sqrt(6.0 / (self.hidden + self.num_classes))
        return {
            "w1": (rng.standard_normal((self.dim, self.hidden)) * he_std).astype(np.float32),
            "b1": np.zeros(self.hidden, np.float32),
            "w2": rng.uniform(-glorot, glorot, (self.hidden, self.num_classes)).astype(np.float32),
            "b2": np.zeros(self.num_classes, np.float32),
        }

    def logits(self, params: Params, x: np.ndarray) -> np.ndarray:
        hidden = np.maximum(x @ params["w1"] + params["b1"], 0.0)
        return hidden @ params["w2"] + params["b2"]

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        pre = x @ params["w1"] + params["b1"]
        hidden = np.maximum(pre, 0.0)
        loss, dlogits = softmax_cross_entropy(hidden @ params["w2"] + params["b2"], y)
        dhidden = dlogits @ params["w2"].T
        dhidden[pre <= 0.0] = 0.0
        return loss, {
            "w1": x.T @ dhidden,
            "b1": dhidden.sum(axis=0),
            "w2": hidden.T @ dlogits,
            "b2": dlogits.sum(axis=0),
        }

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(params, x), axis=1)


def build_model(name: str, dim: int, num_classes: int, hidden: int = 64) -> Model:
    """Build a built-in model by the name a round manifest carries.

    Example:
        >>> build_model("mlp", dim=60, num_classes=10, hidden=32).hidden
        32
        >>> build_model("cnn", 60, 10)
        Traceback (most recent call last):
        ...
        ValueError: unknown model name 'cnn'; expected one of: 'mlp', 'softmax'
    """
    if name == "softmax":
        return SoftmaxRegression(dim, num_classes)
    if name == "mlp":
        return MLP(dim, hidden, num_classes)
    raise ValueError(f"unknown model name {name!r}; expected one of: 'mlp', 'softmax'")


def param_spec(params: Params) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of ``params`` sorted by name: the flattening order.

    Both ends of the wire flatten and unflatten parameters in this order, so it
    must not depend on dict insertion order.

    Example:
        >>> param_spec(SoftmaxRegression(3, 2).init_params(np.random.default_rng(0)))
        [('b', (2,)), ('w', (3, 2))]
    """
    return [(name, tuple(params[name].shape)) for name in sorted(params)]
