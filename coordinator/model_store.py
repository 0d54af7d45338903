"""Publishing the global model: full retained shards, and deltas for devices one version behind.

A device that already holds version ``v`` needs only ``v+1 - v``. After a
commit the coordinator encodes that difference with the model codec and, when
it is smaller than the full model, publishes it retained under
``modeldelta/{v}/{v+1}/{shard}`` and names ``delta_from = v`` in the manifest.

Exactness: the new global vector is *defined* as ``old + d`` with
``d = float32(new - old)``, computed here in float32, so a device adding the
(losslessly coded) ``d`` to its copy of ``old`` gets the new model bit for bit
and the whole-model digest in the manifest checks out.
"""

from __future__ import annotations

import numpy as np

from fedsync.actions import Publish
from fedsync.codecs import get_codec
from fedsync.messages import ModelShard, encode
from fedsync.params import digest, shard_slices
from fedsync.topics import Topics


def model_shards(topics: Topics, version: int, vector: np.ndarray, shard_values: int, codec_name: str,
                 base: int = -1) -> list[Publish]:
    """Retained shards of ``vector`` (the model, or with ``base >= 0`` a delta from ``base``)."""
    codec = get_codec(codec_name)
    slices = shard_slices(vector.size, shard_values)
    out = []
    for i, (off, n) in enumerate(slices):
        data = codec.encode(vector[off:off + n])
        shard = ModelShard(version, i, len(slices), off, n, vector.size, codec.name, digest(data), data, base)
        topic = topics.model(version, i) if base < 0 else topics.model_delta(base, version, i)
        out.append(Publish(topic, encode(shard), 1, True))
    return out


def exact_step(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(delta, new')`` with ``new' = old + delta`` exactly in float32 (see module docstring)."""
    delta = (new.astype(np.float32) - old.astype(np.float32)).astype(np.float32)
    return delta, (old.astype(np.float32) + delta).astype(np.float32)


def clear(topics: Topics, version: int, count: int, base: int = -1) -> list[Publish]:
    """MQTT 3.1.1 §3.3.1.3: an empty retained payload removes the retained message."""
    if base < 0:
        return [Publish(topics.model(version, i), b"", 1, True) for i in range(count)]
    return [Publish(topics.model_delta(base, version, i), b"", 1, True) for i in range(count)]


def payload_bytes(publishes: list[Publish]) -> int:
    return sum(len(p.payload) for p in publishes)
