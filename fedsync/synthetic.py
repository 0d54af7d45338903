"""Per-device data sets for the built-in numpy trainers.

Theory of operation
-------------------
A federation is a list of :class:`DeviceData`, one per device, each holding that
device's own train and test split. Nothing here does I/O or touches a global RNG:
the whole federation is a pure function of its arguments and ``seed``.

:func:`synthetic_federation` is the Synthetic(alpha, beta) benchmark of Li et al.,
"Federated Optimization in Heterogeneous Networks" (FedProx, MLSys 2020, §5.1):
every device labels its inputs with its *own* softmax-linear model, so ``alpha``
controls how much the devices' models differ and ``beta`` how much their inputs
differ. Synthetic(0, 0) is mildly heterogeneous; Synthetic(1, 1) is strongly so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DeviceData", "synthetic_federation", "union"]


@dataclass(frozen=True, slots=True)
class DeviceData:
    """One device's labelled examples, already split into train and test.

    ``x_*`` are float32 of shape ``(n, dim)``; ``y_*`` are int64 class ids of
    shape ``(n,)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of training examples: the device's weight in FedAvg."""
        return int(self.y_train.shape[0])


def synthetic_federation(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_devices: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    test_fraction: float = 0.2,
    iid: bool = False,
) -> list[DeviceData]:
    """Generate the FedProx Synthetic(alpha, beta) federation.

    For each device k (FedProx paper, §5.1 and its generator script):

    - u_k ~ N(0, alpha) and B_k ~ N(0, beta);
    - W_k ~ N(u_k, 1) of shape ``(dim, num_classes)``, b_k ~ N(u_k, 1);
    - a mean vector v_k with entries ~ N(B_k, 1);
    - x ~ N(v_k, Sigma), Sigma diagonal with Sigma_jj = (j + 1) ** -1.2;
    - y = argmax(softmax(x W_k + b_k)) (the softmax does not change the argmax);
    - sample count int(lognormal(4, 2)) + 50, so every device has at least 50.

    ``alpha`` and ``beta`` are used as standard deviations, as in the reference
    generator (the two readings agree at the usual values 0 and 1).
    With ``iid=True`` all devices share one (W, b) drawn from N(0, 1) and
    v_k = B_k in every entry, the paper's IID control.

    Each device's samples are shuffled and split; the test split gets
    ``round(n * test_fraction)`` examples, at least one, and the train split
    keeps at least one.

    Example:
        >>> devices = synthetic_federation(1.0, 1.0, num_devices=3, seed=0)
        >>> len(devices), devices[0].x_train.shape[1], devices[0].x_train.dtype
        (3, 60, dtype('float32'))
        >>> all(d.num_train + len(d.y_test) >= 50 for d in devices)
        True
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4.0, 2.0, num_devices).astype(np.int64) + 50
    u = rng.normal(0.0, alpha, num_devices)
    big_b = rng.normal(0.0, beta, num_devices)
    # Sigma is diagonal, so x = v + sqrt(diag) * z needs no multivariate sampler.
    sigma_sqrt = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2) ** 0.5
    if iid:
        shared_w = rng.normal(0.0, 1.0, (dim, num_classes))
        shared_b = rng.normal(0.0, 1.0, num_classes)

    devices = []
    for k in range(num_devices):
        if iid:
            w, b = shared_w, shared_b
            v = np.full(dim, big_b[k])
        else:
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
            v = rng.normal(big_b[k], 1.0, dim)
        n = int(counts[k])
        x = v + sigma_sqrt * rng.standard_normal((n, dim))
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        order = rng.permutation(n)
        x, y = x[order].astype(np.float32), y[order]
        n_test = min(max(1, round(n * test_fraction)), n - 1)
        devices.append(
            DeviceData(
                x_train=x[n_test:],
                y_train=y[n_test:],
                x_test=x[:n_test],
                y_test=y[:n_test],
            )
        )
    return devices


def union(
    devices: Sequence[DeviceData],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate every device's splits: ``(x_train, y_train, x_test, y_test)``.

    This is the data a centralised learner would see; the union test split is
    where global models are scored.

    Example:
        >>> x_tr, y_tr, x_te, y_te = union(synthetic_federation(num_devices=2))
        >>> x_tr.shape[0] == y_tr.shape[0]
        True
    """
    if not devices:
        raise ValueError("union() needs at least one device")
    return (
        np.concatenate([d.x_train for d in devices]),
        np.concatenate([d.y_train for d in devices]),
        np.concatenate([d.x_test for d in devices]),
        np.concatenate([d.y_test for d in devices]),
    )
