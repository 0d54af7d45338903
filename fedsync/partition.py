"""Splitting one labelled data set over devices, for experiments and field rehearsals.

Every function is pure: the same arguments and ``seed`` give the same split, from a
``numpy.random.Generator`` of its own (never the global RNG). Each returns one sorted
``int64`` array of sample indices per device; together they cover every sample once.

- :func:`iid`: a uniform random split into near-equal parts (the control).
- :func:`dirichlet`: label skew. For every class, the shares of the devices are drawn
  from Dirichlet(alpha, ..., alpha) and that class's samples are dealt out in those
  shares (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification"). alpha -> infinity is IID;
  alpha = 0.1 leaves most devices with one or two classes.
- :func:`by_group` / :func:`natural`: whole groups (a writer, a phone, a farm) stay on one
  device, as they do in the field.

:func:`partition_report` counts samples and labels per device, as a text table and as a
stacked bar chart (matplotlib, imported only by :meth:`PartitionReport.plot`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PartitionReport", "by_group", "dirichlet", "iid", "natural", "partition_report"]


def _check_n(n: int, available: int, what: str) -> None:
    if n < 1:
        raise ValueError(f"number of devices must be >= 1, got {n}")
    if n > available:
        raise ValueError(f"cannot split {available} {what} over {n} devices")


def iid(labels: Sequence | np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Shuffle the indices and cut them into ``n`` parts whose sizes differ by at most one
    (the first ``len % n`` parts get the extra sample).

    >>> [len(p) for p in iid(np.zeros(10), 3, seed=0)]
    [4, 3, 3]
    """
    count = len(labels)
    _check_n(n, count, "samples")
    order = np.random.default_rng(seed).permutation(count)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, n)]


def dirichlet(labels: Sequence | np.ndarray, n: int, alpha: float, seed: int, min_size: int = 2,
              max_tries: int = 1000) -> list[np.ndarray]:
    """Label-skewed split: class c's samples go to the devices in shares p_c ~ Dir(alpha).

    Draws are repeated (from the same generator) until every device holds at least
    ``min_size`` samples (2 by default: one to train on, one to test on); after
    ``max_tries`` draws it gives up with a ``ValueError`` saying so.

    >>> labels = np.repeat(np.arange(3), 20)
    >>> parts = dirichlet(labels, 4, alpha=0.5, seed=0)
    >>> sum(len(p) for p in parts), min(len(p) for p in parts) >= 2
    (60, True)
    """
    y = np.asarray(labels)
    _check_n(n, len(y), "samples")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if n * min_size > len(y):
        raise ValueError(f"cannot give {n} devices {min_size} samples each from {len(y)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = np.rint(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)  # truncating would give the last device one of every class
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"no Dirichlet({alpha}) split in {max_tries} draws gave every one of {n} devices "
                     f"{min_size} samples: raise alpha or lower the number of devices")


def by_group(groups: Sequence | np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Whole groups per device: the distinct groups are shuffled and dealt out in turn, so
    device i gets groups i, i + n, i + 2n, ... of the shuffled order.

    >>> by_group(["a", "a", "b", "c", "c", "c"], 2, seed=0)
    [array([2, 3, 4, 5]), array([0, 1])]
    """
    g = np.asarray(groups)
    distinct = np.unique(g)
    _check_n(n, len(distinct), "groups")
    order = distinct[np.random.default_rng(seed).permutation(len(distinct))]
    return [np.sort(np.flatnonzero(np.isin(g, order[i::n]))).astype(np.int64) for i in range(n)]


def natural(groups: Sequence | np.ndarray) -> list[np.ndarray]:
    """One device per group, in sorted group order (the federation as the data was collected).

    >>> natural([2, 1, 2, 1, 1])
    [array([1, 3, 4]), array([0, 2])]
    """
    g = np.asarray(groups)
    if len(g) == 0:
        raise ValueError("natural() needs at least one sample")
    return [np.flatnonzero(g == v).astype(np.int64) for v in np.unique(g)]


@dataclass(frozen=True, slots=True)
class PartitionReport:
    """Samples and label histogram per device; ``histogram[i, j]`` counts class ``classes[j]``
    on device ``i``."""

    classes: tuple
    histogram: np.ndarray

    @property
    def samples(self) -> list[int]:
        return [int(s) for s in self.histogram.sum(axis=1)]

    def table(self) -> str:
        """A fixed-width text table, one row per device and a total row.

        >>> print(partition_report([0, 1, 1, 2], [np.array([0, 1]), np.array([2, 3])]).table())
        device  samples  0  1  2
             0        2  1  1  0
             1        2  0  1  1
         total        4  1  2  1
        """
        header = ["device", "samples", *map(str, self.classes)]
        rows = [[str(i), str(s), *map(str, h)] for i, (s, h) in enumerate(zip(self.samples, self.histogram))]
        rows.append(["total", str(sum(self.samples)), *map(str, self.histogram.sum(axis=0))])
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [header, *rows])

    def plot(self, path: str, title: str = "samples per device and label") -> None:
        """A stacked bar chart (one bar per device, one colour per label) written to ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        devices = np.arange(len(self.histogram))
        fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(devices) + 2), 3.8))
        bottom = np.zeros(len(devices))
        colours = plt.get_cmap("tab10" if len(self.classes) <= 10 else "tab20")
        for j, label in enumerate(self.classes):
            ax.bar(devices, self.histogram[:, j], bottom=bottom, color=colours(j % colours.N), label=str(label))
            bottom += self.histogram[:, j]
        ax.set_title(title)
        ax.set_xlabel("device")
        ax.set_ylabel("samples")
        ax.set_xticks(devices)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(title="label", fontsize="small", ncol=2 if len(self.classes) > 5 else 1,
                  bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def partition_report(labels: Sequence | np.ndarray, parts: Sequence[np.ndarray]) -> PartitionReport:
    """Count each device's samples per label (classes: every label in ``labels``, sorted)."""
    y = np.asarray(labels)
    classes = np.unique(y)
    histogram = np.zeros((len(parts), len(classes)), np.int64)
    for i, part in enumerate(parts):
        values, counts = np.unique(y[np.asarray(part, np.int64)], return_counts=True)
        histogram[i, np.searchsorted(classes, values)] = counts
    return PartitionReport(tuple(c.item() for c in classes), histogram)
