"""The codec registry: how a float32 slice becomes bytes on the wire.

The registry imports the dense codecs (:mod:`fedsync.codecs.dense`: raw, zstd,
fp16) and the lossy ones (:mod:`fedsync.codecs.lossy`: int8, top-k); both build on
:mod:`fedsync.codecs.base` and neither imports the registry. A new codec is a
``Codec`` passed to :func:`register` (both sides must register it before a
manifest names it).

The manifest names the codec for model downloads and for updates, so both sides
always agree. Every codec is a pure function pair with a stated error bound,
checked by the property tests:

========== ============================================== ======================
name       encoding                                       error bound
========== ============================================== ======================
raw        little-endian float32                          exact
zstd       byte-shuffle (4 planes) + zstd                 exact
fp16       float16, byte-shuffle (2 planes) + zstd        |x| * 2**-11 for
                                                          normal fp16 values,
                                                          2**-25 absolute below
========== ============================================== ======================

Byte-shuffling puts the 4 bytes of every float into separate planes (all
exponents together), which is what makes float data compressible by zstd.
Decoding is bounded: a payload can never expand past the expected length (no
decompression bombs), and a wrong length or non-finite value is a
:class:`ProtocolError`.
"""

from __future__ import annotations

from fedsync.codecs import dense, lossy
from fedsync.codecs.base import Codec
from fedsync.errors import ProtocolError

__all__ = ["Codec", "codec_names", "get_codec", "register"]

_REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    """Add a codec to the registry (plug-in point for new codecs)."""
    _REGISTRY[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    """The codec a manifest names; an unknown name is a :class:`ProtocolError`.

    >>> get_codec("zstd").lossless
    True
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ProtocolError("codec", "unknown", f"{name!r}; known: {sorted(_REGISTRY)}") from None


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


for _codec in (*dense.CODECS, *lossy.CODECS):
    register(_codec)
