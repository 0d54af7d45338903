"""What a receipt (:class:`fedsync.messages.ShardAck`) tells a device, in one place.

The coordinator writes receipts by these rules and the device agent reads them by the same
ones (docs/protocol.md, "ShardAck", says the same in prose):

* A ``rejected`` receipt's ``reason`` is ``"{field}:{code}"``: the field that failed and the
  reason code the coordinator counts it under (``fedsync_shards_rejected_total{reason}``), e.g.
  ``"base_version:base_version"``, ``"num_params:shape"``, ``"data:decode_size"``,
  ``"v:schema_version"``. :func:`rejection` builds it, :func:`reason_code` reads the code
  back (an older coordinator wrote the bare code: it is its own code).
* A rejection is *retryable* when a fresh encoding of the same delta under a new update id
  can pass: the bytes sent did not hang together (``update_digest``,
  ``inconsistent_update``), a signature did not verify (``signature``: the key may have been
  re-provisioned), or the data did not decode (``decode_*``). Every other code (the update
  does not fit the round: ``base_version``, ``shape``, ``layout``, ``codec``; the device was
  not selected; the payload is not a valid message: ``schema_version``, ``type``, ...) is
  *final*: sending again cannot help, so the device stops and reports it. An unknown code is
  final too, so a code added later never makes an old device loop.
* A receipt about a device's ``status/{device}`` message (which names no update) carries the
  update id :data:`STATUS_UPDATE_ID`.

>>> rejection("base_version", "base_version")
'base_version:base_version'
>>> reason_code("num_params:shape"), retryable("data:decode_size"), retryable("codec:codec")
('shape', True, False)
"""

from __future__ import annotations

STATUS_UPDATE_ID = "status"  # update id of a receipt about a status message; never a device's update id
RETRYABLE_CODES = frozenset({"update_digest", "inconsistent_update", "signature"})
RETRYABLE_PREFIX = "decode_"  # the update's data did not decode with the round's codec
REASON_BYTES = 200  # ShardAck.reason's size limit (docs/protocol.cddl)


def rejection(field: str, code: str) -> str:
    """The ``reason`` of a ``rejected`` receipt: ``"{field}:{code}"``, cut to the wire's limit."""
    return f"{field}:{code}".encode("utf-8", "replace")[:REASON_BYTES].decode("utf-8", "ignore")


def reason_code(reason: str) -> str:
    """The code of a receipt's reason (the part after the last ``:``; the whole reason if none)."""
    return reason.rsplit(":", 1)[-1]


def retryable(reason: str) -> bool:
    """Whether a ``rejected`` receipt with this reason invites a fresh update (see the module docstring)."""
    code = reason_code(reason)
    return code in RETRYABLE_CODES or code.startswith(RETRYABLE_PREFIX)
