"""The dense codecs: every value is sent.

========== ============================================== ======================
name       encoding                                       error bound
========== ============================================== ======================
raw        little-endian float32                          exact
zstd       byte-shuffle (4 planes) + zstd                 exact
fp16       float16, byte-shuffle (2 planes) + zstd        |x| * 2**-11 for
                                                          normal fp16 values,
                                                          2**-25 absolute below
========== ============================================== ======================

A wrong length or a non-finite value decodes to a :class:`ProtocolError`.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from fedsync.codecs.base import Codec, check_finite, shuffle, unshuffle, zstd_compress, zstd_decompress
from fedsync.errors import ProtocolError

_FP16_MAX = 65504.0
_LITTLE = sys.byteorder == "little"  # zstd's in-place decoder writes wire byte planes into float32 memory


def _raw_encode(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def _into_new(decode_into: Callable[[bytes, np.ndarray], None]) -> Callable[[bytes, int], np.ndarray]:
    def decode(data: bytes, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.float32)
        decode_into(data, out)
        return out
    return decode


def _raw_decode_into(data: bytes, out: np.ndarray) -> None:
    if len(data) != 4 * out.size:
        raise ProtocolError("data", "size", f"{len(data)} bytes for {out.size} float32 values")
    np.copyto(out, np.frombuffer(data, dtype="<f4"))
    check_finite(out)


def _zstd_decode_into(data: bytes, out: np.ndarray) -> None:
    src = np.frombuffer(zstd_decompress(data, 4 * out.size), dtype=np.uint8).reshape(4, -1)
    planes = out.view(np.uint8).reshape(-1, 4)  # plane k holds byte k of each little-endian float
    for k in range(4):
        planes[:, k if _LITTLE else 3 - k] = src[k]
    check_finite(out)


def _zstd_encode(values: np.ndarray) -> bytes:
    return zstd_compress(shuffle(_raw_encode(values), 4))


def _fp16_encode(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.float32)
    if np.abs(v).max(initial=0.0) > _FP16_MAX:
        raise ValueError("fp16 codec: value beyond the float16 range; use zstd")
    return zstd_compress(shuffle(v.astype("<f2").tobytes(), 2))


def _fp16_decode(data: bytes, length: int) -> np.ndarray:
    raw = unshuffle(zstd_decompress(data, 2 * length), 2)
    return check_finite(np.frombuffer(raw, dtype="<f2").astype(np.float32))


CODECS = (
    Codec("raw", _raw_encode, _into_new(_raw_decode_into), lossless=True, decode_into=_raw_decode_into),
    Codec("zstd", _zstd_encode, _into_new(_zstd_decode_into), lossless=True, decode_into=_zstd_decode_into),
    Codec("fp16", _fp16_encode, _fp16_decode, lossless=False,
          bound=lambda v: np.maximum(np.abs(v) * 2.0**-11, 2.0**-25)),
)
