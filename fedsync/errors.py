"""The one error type that crosses the wire boundary, and the few that end a process.

Every decoder in fedsync raises :class:`ProtocolError` for bad input and nothing
else, so a service can catch exactly one type, log it, count it by reason and go
on serving. The message always names the field and the reason.
:class:`EncodeError` is our own bug; :class:`OperatorError` is the operator's to fix.
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
