"""The disk spool: the K x P updates of a robust rule in a ``numpy.memmap``, not in RAM.

Theory of operation
-------------------
Median, trimmed mean and Krum need all K updates of a round at once. The sans-IO
strategies (:mod:`fedsync.coordinator.strategies`) hold them in whatever spool their
``spool=`` factory makes; the coordinator's config (:func:`fedsync.coordinator.config.
strategy_factory_from`) passes :func:`disk_spool`, so K x P float32 lives in a sparse
file that grows ``chunk_rows`` rows at a time and is read back in column blocks. The file
goes when the round finishes, or with the spool object when a round is dropped.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedsync.coordinator.aggregate import check_delta

__all__ = ["UpdateSpool", "disk_spool"]


def disk_spool(dir: str | Path | None = None, chunk_rows: int = 16) -> Callable[[int], "UpdateSpool"]:
    """A ``spool=`` factory for the robust rules: ``UpdateSpool``s under ``dir``."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return lambda num_params: UpdateSpool(num_params, chunk_rows=chunk_rows, dir=dir)


class UpdateSpool:
    """A growable K x P float32 matrix of updates in a ``numpy.memmap`` on disk.

    The file (``<tempdir>/fedsync-spool-*/updates.f32``) is created on the first
    ``append`` and grows ``chunk_rows`` rows at a time. Growing extends the file and
    maps it again: rows already written stay where they are (row-major layout).
    ``close`` deletes the directory; so does garbage collection of the spool, for a
    round that is dropped without ``close``. ``dir`` picks the parent directory
    (default: the system temp dir); pick a disk with room for K x P x 4 bytes.

    >>> spool = UpdateSpool(3, chunk_rows=2)
    >>> for k in range(3):
    ...     spool.append(np.full(3, k, np.float32))
    >>> path = spool.path
    >>> spool.rows()[:, 0].tolist(), path.stat().st_size  # 2 chunks of 2 rows x 3 x 4 bytes
    ([0.0, 1.0, 2.0], 48)
    >>> spool.close(); path.exists(), spool.count
    (False, 0)
    """

    def __init__(self, num_params: int, *, chunk_rows: int = 16, dir: str | Path | None = None) -> None:
        if num_params < 1 or chunk_rows < 1:
            raise ValueError(f"num_params and chunk_rows must be >= 1, got {num_params}, {chunk_rows}")
        self.num_params = num_params
        self.chunk_rows = chunk_rows
        self.dir = dir
        self.count = 0
        self._capacity = 0
        self._map: np.memmap | None = None
        self._path: Path | None = None
        self._cleanup: weakref.finalize | None = None

    @property
    def path(self) -> Path | None:
        """The spool file, or ``None`` while nothing is spooled."""
        return self._path

    def append(self, delta: np.ndarray) -> None:
        """Store one update as the next row (cast to float32)."""
        check_delta(delta, self.num_params)
        if self._path is None:
            directory = tempfile.mkdtemp(prefix="fedsync-spool-", dir=self.dir)
            self._cleanup = weakref.finalize(self, shutil.rmtree, directory, True)
            self._path = Path(directory) / "updates.f32"
            self._path.touch()
        if self.count == self._capacity:
            self._grow()
        assert self._map is not None
        self._map[self.count] = delta
        self.count += 1

    def _grow(self) -> None:
        assert self._path is not None
        self._map = None  # unmap before remapping at the new size
        self._capacity += self.chunk_rows
        with open(self._path, "r+b") as f:
            f.truncate(self._capacity * self.num_params * 4)  # sparse: no zeros written
        shape = (self._capacity, self.num_params)
        self._map = np.memmap(self._path, dtype=np.float32, mode="r+", shape=shape)

    def rows(self) -> np.ndarray:
        """The (count, P) spooled updates: a view of the memmap, valid until ``close``."""
        if self._map is None:
            return np.empty((0, self.num_params), dtype=np.float32)
        return self._map[:self.count]

    def close(self) -> None:
        """Delete the file; the spool is empty again (a later ``append`` starts a new file)."""
        self._map = None
        if self._cleanup is not None:
            self._cleanup()
        self._cleanup, self._path, self.count, self._capacity = None, None, 0, 0
