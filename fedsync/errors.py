"""The one error type that crosses the wire boundary, and the few that end a process.

Every decoder in fedsync raises :class:`ProtocolError` for bad input and nothing
else, so a service can catch exactly one type, log it, count it by reason and go
on serving. The message always names the field and the reason.
:class:`EncodeError` and :class:`IllegalTransition` are our own bugs; :class:`OperatorError` is the
operator's to fix.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A payload or topic that does not follow the wire contract.

    ``field`` names the offending field (``"payload"`` for the whole message,
    ``"topic"`` for the topic), ``reason`` is a short machine-friendly tag used
    as a metric label (``"type"``, ``"range"``, ``"digest"``, ...), and the
    string form is a sentence an operator can read.
    """

    def __init__(self, field: str, reason: str, detail: str = "") -> None:
        self.field = field
        self.reason = reason
        self.detail = detail
        text = f"{field}: {reason}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)


class EncodeError(RuntimeError):
    """A message this process built does not follow the wire contract.

    Not bad input: our own state or configuration is wrong, so it is an internal error
    that ends the service loudly (supervision restarts it, the broker fires its last
    will) instead of being counted as a rejected message. Wraps the validator's
    :class:`ProtocolError`, which names the field."""

    def __init__(self, kind: str, err: ProtocolError) -> None:
        self.kind = kind
        self.error = err
        super().__init__(f"cannot encode our own {kind}: {err}")


class OperatorError(RuntimeError):
    """Trouble at run time that the operator fixes, not a bug: a port in use, say.

    The command line prints ``fedsync <command>: <message>`` as one line, without a
    traceback, and exits with ``code``.

    >>> str(OperatorError("metrics port 9464: address already in use"))
    'metrics port 9464: address already in use'
    """

    def __init__(self, message: str, code: int = 1) -> None:
        self.message = message
        self.code = code
        super().__init__(message)


class IllegalTransition(RuntimeError):
    """A state machine was handed an event its transition table has no row for in its state.

    Not bad input: bad input is a :class:`ProtocolError`, counted and dropped before it can
    drive a state machine. The core's own logic asked for a transition the protocol does not
    have (a bug, or an adapter calling the core out of order, such as re-opening a round while
    one is open), so it is an internal error that ends the service loudly, like
    :class:`EncodeError`, instead of being ignored. The tables are in
    ``coordinator/round_state.py`` and ``device_agent/agent_state.py`` (docs/protocol.md).

    >>> str(IllegalTransition("round", "open", "resume"))
    "round state machine: no transition from 'open' on 'resume'"
    """

    def __init__(self, machine: str, state: str, event: str) -> None:
        self.machine = machine
        self.state = state
        self.event = event
        super().__init__(f"{machine} state machine: no transition from {state!r} on {event!r}")
