"""State machines as data: a transition table built from rows, shared by both cores.

Theory of operation
-------------------
A state machine here is an enum of states, an enum of events and a
:class:`TransitionTable`: rows ``(from, event, next)`` as the protocol document writes
them, where ``from`` is one state, a tuple of states, or :data:`ANY` (every state). The
table expands them into ``{(state, event): next}``, refusing two rows for the same pair.
A core never assigns its state: it fires an event, and :meth:`TransitionTable.next`
returns the next state or raises :class:`fedsync.errors.IllegalTransition` when the table
has no row (never a silently ignored transition). An event's value is its wording in
docs/protocol.md, so a test compares the document's table with the code's, cell for cell.
"""

from __future__ import annotations

from enum import Enum
from typing import Generic, Iterable, TypeVar, Union

from fedsync.errors import IllegalTransition

S = TypeVar("S", bound=Enum)
E = TypeVar("E", bound=Enum)

ANY = "any"  # a row that applies in every state

Row = tuple[Union[S, tuple[S, ...], str], E, S]


class TransitionTable(Generic[S, E]):
    """``{(state, event): next}`` from rows; ``next`` raises on a pair without a row.

    >>> from enum import Enum
    >>> class Door(Enum):
    ...     SHUT = "shut"; AJAR = "ajar"
    >>> class Push(Enum):
    ...     OPEN = "open it"; SLAM = "slam it"
    >>> doors = TransitionTable("door", Door, [(Door.SHUT, Push.OPEN, Door.AJAR), (ANY, Push.SLAM, Door.SHUT)])
    >>> doors.next(Door.SHUT, Push.OPEN), doors.next(Door.AJAR, Push.SLAM)
    (<Door.AJAR: 'ajar'>, <Door.SHUT: 'shut'>)
    >>> doors.next(Door.AJAR, Push.OPEN)
    Traceback (most recent call last):
    fedsync.errors.IllegalTransition: door state machine: no transition from 'ajar' on 'open'
    """

    def __init__(self, machine: str, states: type[S], rows: Iterable[Row]) -> None:
        self.machine = machine
        self.states = states
        self.rows: tuple[Row, ...] = tuple(rows)
        self.table: dict[tuple[S, E], S] = {}
        for origin, event, target in self.rows:
            for state in self.origins(origin):
                if (state, event) in self.table:
                    raise ValueError(f"{machine}: two rows for ({state.value!r}, {event.name})")
                self.table[(state, event)] = target

    def origins(self, origin) -> tuple[S, ...]:
        """The states a row's first cell stands for."""
        if isinstance(origin, str) and origin == ANY:
            return tuple(self.states)
        return origin if isinstance(origin, tuple) else (origin,)

    def next(self, state: S, event: E) -> S:
        try:
            return self.table[(state, event)]
        except KeyError:
            raise IllegalTransition(self.machine, str(state.value), event.name.lower()) from None
