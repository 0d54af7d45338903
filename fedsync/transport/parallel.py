"""Run GIL-free work (hashing, zstd, numpy copies) on a second core.

``hashlib``, ``zstandard`` and numpy's copy loops release the GIL, so a
second thread doing them runs truly in parallel with the caller. The
coordinator's service thread is its bottleneck (one thread owns the core), so
:func:`split_map` hands the second half of a list of such jobs to one
long-lived helper thread and does the first half itself. Results come back in
order; an exception in a job is re-raised in the caller, as ``map`` would.

One helper, not a pool: the machines we target have two to four cores and
the MQTT receive thread needs one of them.

The cores never call this module: they take an executor (:mod:`fedsync.executor`,
inline by default), and the coordinator service hands them :data:`HELPER_THREAD`,
which runs their jobs here.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Sequence, TypeVar

from fedsync.executor import Done

T = TypeVar("T")
R = TypeVar("R")

_HELPER_NAME = "fedsync-helper"
MIN_ITEMS = 4  # below this the hand-off costs more than it saves


class _Helper:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], object]) -> queue.SimpleQueue:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=_HELPER_NAME, daemon=True)
                self._thread.start()
        done: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs.put((fn, done))
        return done

    def _run(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                done.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                done.put((False, exc))


_HELPER = _Helper()


class Pending:
    """A job handed to the helper thread; :meth:`result` returns its value or raises its error."""

    __slots__ = ("_done", "_outcome")

    def __init__(self, done: queue.SimpleQueue) -> None:
        self._done = done
        self._outcome: tuple[bool, object] | None = None

    def result(self) -> object:
        if self._outcome is None:
            self._outcome = self._done.get()
        ok, value = self._outcome
        if not ok:
            raise value  # type: ignore[misc]
        return value


def submit(fn: Callable[[], R]) -> Pending | Done:
    """Start ``fn()`` on the helper thread (inline if this is the helper) and return at once."""
    if threading.current_thread().name == _HELPER_NAME:
        return Done(fn)
    return Pending(_HELPER.submit(fn))


def both(first: Callable[[], T], second: Callable[[], R]) -> tuple[T, R]:
    """``(first(), second())`` with ``second`` on the helper thread.

    >>> both(lambda: 1, lambda: 2)
    (1, 2)
    """
    if threading.current_thread().name == _HELPER_NAME:  # nested: the helper must not wait on itself
        return first(), second()
    done = _HELPER.submit(second)
    try:
        a = first()
    finally:
        ok, b = done.get()  # always wait: the helper may still be touching shared buffers
    if not ok:
        raise b
    return a, b


def split_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, the second half on the helper thread.

    >>> split_map(lambda x: x * x, list(range(10)))
    [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]
    """
    if len(items) < MIN_ITEMS:
        return [fn(x) for x in items]
    half = len(items) // 2
    head, tail = both(lambda: [fn(x) for x in items[:half]], lambda: [fn(x) for x in items[half:]])
    return head + tail


class HelperThreadExecutor:
    """The :class:`fedsync.executor.Executor` that runs jobs on the helper thread.

    >>> HELPER_THREAD.split_map(lambda x: x + 1, [1, 2, 3, 4, 5])
    [2, 3, 4, 5, 6]
    """

    def submit(self, fn: Callable[[], R]) -> Pending | Done:
        return submit(fn)

    def both(self, first: Callable[[], T], second: Callable[[], R]) -> tuple[T, R]:
        return both(first, second)

    def split_map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return split_map(fn, items)

    def __repr__(self) -> str:
        return "HELPER_THREAD"


HELPER_THREAD = HelperThreadExecutor()
