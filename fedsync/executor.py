"""Where a core's parallel work runs: an executor it is handed, inline unless told otherwise.

Theory of operation
-------------------
The sans-IO cores (the round core, the shard assembler, the aggregators, the agent core)
have work that may run on a second core: hashing, zstd and numpy copies release the GIL.
They never start a thread themselves. They take an :class:`Executor` and call

* ``submit(fn)``: start ``fn()`` and return a :class:`Pending` whose ``result()`` gives
  its value or raises its error (an error is kept until ``result()``, never lost);
* ``both(first, second)``: ``(first(), second())``, the two possibly at the same time;
* ``split_map(fn, items)``: ``[fn(x) for x in items]``, in order, errors re-raised.

:data:`INLINE` runs everything here and now, in the caller's thread: the default, so a
core built in a test is single-threaded and exact. The coordinator service hands its core
the helper thread of :mod:`fedsync.transport.parallel` (``HELPER_THREAD``), which has the
same interface. Jobs given to one executor call must touch disjoint memory (each half
of a vector, each shard's slice), so the outcome is the same bit for bit whichever runs them.
"""

from __future__ import annotations

from typing import Callable, Generic, Protocol, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Pending(Protocol[R_co]):
    """A submitted job: ``result()`` waits for it, then returns its value or raises its error."""

    def result(self) -> R_co: ...


class Executor(Protocol):
    """What a core needs of the place its parallel work runs (see the module docstring)."""

    def submit(self, fn: Callable[[], R]) -> Pending[R]: ...

    def both(self, first: Callable[[], T], second: Callable[[], R]) -> tuple[T, R]: ...

    def split_map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]: ...


class Done(Generic[R]):
    """A job already run here: its value, or the ``Exception`` it raised, for :meth:`result`.

    >>> Done(lambda: 3).result()
    3
    >>> Done(lambda: 1 // 0).result()
    Traceback (most recent call last):
    ZeroDivisionError: integer division or modulo by zero
    """

    __slots__ = ("_ok", "_value")

    def __init__(self, fn: Callable[[], R]) -> None:
        try:
            self._ok, self._value = True, fn()
        except Exception as exc:  # noqa: BLE001 - handed back through result(), as a thread would
            self._ok, self._value = False, exc

    def result(self) -> R:
        if not self._ok:
            raise self._value  # type: ignore[misc]
        return self._value  # type: ignore[return-value]


class InlineExecutor:
    """Runs every job at once in the caller's thread: the cores' default.

    >>> INLINE.split_map(lambda x: x * x, [1, 2, 3]), INLINE.both(lambda: 1, lambda: 2)
    ([1, 4, 9], (1, 2))
    """

    def submit(self, fn: Callable[[], R]) -> Done[R]:
        return Done(fn)

    def both(self, first: Callable[[], T], second: Callable[[], R]) -> tuple[T, R]:
        return first(), second()

    def split_map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return [fn(x) for x in items]

    def __repr__(self) -> str:
        return "INLINE"


INLINE = InlineExecutor()
