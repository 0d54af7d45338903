"""Real data that ships inside an installed package, as federations of :class:`DeviceData`.

No downloads, ever: every set here is read from files a PyPI package installs.

- :func:`load_digits`: scikit-learn's copy of the UCI optical handwritten digits (1,797
  8x8 images with 16 grey levels, 10 classes; ``sklearn/datasets/data/digits.csv.gz``,
  installed with the ``sklearn`` extra). scikit-learn's copy carries no writer ids, so
  a natural by-writer split is not available for it; :func:`fedsync.partition.by_group`
  takes any group labels a data set does have.

:func:`split_devices` turns index parts (from :mod:`fedsync.partition`) into per-device
train/test splits, so the union of the devices' test splits is the federation's test
set and the union of their training splits is what a centralised model trains on
(:func:`fedsync.synthetic.union`), as for the Synthetic data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedsync import partition
from fedsync.synthetic import DeviceData

__all__ = ["PARTITIONS", "digits_federation", "load_digits", "split_devices"]

PARTITIONS = ("iid", "dirichlet")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: x float32 of shape (1797, 64) scaled to [0, 1] (grey level / 16), rows are
    8x8 images read row by row; y int64 class ids 0-9. Needs scikit-learn.

    >>> x, y = load_digits()
    >>> x.shape, x.dtype, float(x.max()), np.bincount(y).tolist()[:3]
    ((1797, 64), dtype('float32'), 1.0, [178, 182, 177])
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError("the digits data ships with scikit-learn: pip install 'fedsync[sklearn]'") from None
    bunch = sk_load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def split_devices(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray], test_fraction: float = 0.2,
                  seed: int = 0) -> list[DeviceData]:
    """One :class:`DeviceData` per index part: each device's samples shuffled and split, the
    test split ``round(n * test_fraction)`` samples (at least 1, and at least 1 left to train).

    >>> x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10) % 2
    >>> [(d.num_train, len(d.y_test)) for d in split_devices(x, y, [np.arange(6), np.arange(6, 10)])]
    [(5, 1), (3, 1)]
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    devices = []
    for i, part in enumerate(parts):
        idx = rng.permutation(np.asarray(part, np.int64))
        if len(idx) < 2:
            raise ValueError(f"device {i} has {len(idx)} samples; each needs at least 2 (train and test)")
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test, train = idx[:n_test], idx[n_test:]
        devices.append(DeviceData(x_train=x[train], y_train=y[train].astype(np.int64),
                                  x_test=x[test], y_test=y[test].astype(np.int64)))
    return devices


def digits_federation(num_devices: int = 10, partition_kind: str = "dirichlet", alpha: float = 0.5,
                      seed: int = 0, test_fraction: float = 0.2) -> list[DeviceData]:
    """scikit-learn's digits split over ``num_devices``: ``"dirichlet"`` (label skew, ``alpha``)
    or ``"iid"``, then each device's samples into train and test. Pure in ``seed``.

    >>> devices = digits_federation(10, "dirichlet", alpha=0.5, seed=0)
    >>> len(devices), sum(d.num_train + len(d.y_test) for d in devices)
    (10, 1797)
    """
    x, y = load_digits()
    if partition_kind == "iid":
        parts = partition.iid(y, num_devices, seed)
    elif partition_kind == "dirichlet":
        parts = partition.dirichlet(y, num_devices, alpha, seed)
    else:
        raise ValueError(f"partition {partition_kind!r} is not one of {', '.join(PARTITIONS)}")
    return split_devices(x, y, parts, test_fraction, seed)
