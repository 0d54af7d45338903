"""One download of the global model, or of its delta, from retained shards on exact topics.

Theory of operation
-------------------
The manifest says how many shards the model has (``model_shards``), so a device subscribes
to each shard's own topic, ``model/{version}/{i}`` (a delta: ``modeldelta/{base}/{version}/{i}``),
never to ``model/{version}/+``: some brokers (RabbitMQ's MQTT, docs/brokers.md) deliver
retained messages to exact subscriptions only. :class:`ModelFetch` is sans-IO: it hands the
agent the :class:`~fedsync.actions.Subscribe` / ``Unsubscribe`` actions, checks each shard
against the manifest (layout, codec, digest) and its topic, keeps its decoded values, and
returns the whole vector when the last one is in. On silence the agent asks for
:meth:`refetch`: re-subscribing to the shards still missing makes the broker send their
retained copies again (MQTT 3.1.1 §3.8.4), without re-sending the ones already held.
The whole-vector digest (and, for a delta, the addition to the old model) is the agent's.
"""

from __future__ import annotations

import numpy as np

from fedsync.actions import Subscribe, Unsubscribe
from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.messages import ModelShard, RoundManifest
from fedsync.params import check_shard_layout, digest
from fedsync.topics import Topics


class ModelFetch:
    """The shards of model ``manifest.model_version`` (``base`` -1) or of its delta from ``base``.

    >>> m = type("Manifest", (), {"model_version": 4, "model_shards": 2})()  # the two fields it needs here
    >>> [a.topic_filter for a in ModelFetch(Topics("farm"), m, base=3).start()]
    ['fedsync/farm/modeldelta/3/4/0', 'fedsync/farm/modeldelta/3/4/1']
    """

    def __init__(self, topics: Topics, manifest: RoundManifest, base: int = -1) -> None:
        self.topics = topics
        self.manifest = manifest
        self.base = base
        self.values: dict[int, np.ndarray] = {}  # shard index -> decoded float32 values

    def topic(self, index: int) -> str:
        m = self.manifest
        if self.base >= 0:
            return self.topics.model_delta(self.base, m.model_version, index)
        return self.topics.model(m.model_version, index)

    def start(self) -> list:
        """Subscribe to every shard's topic."""
        return [Subscribe(self.topic(i), 1) for i in range(self.manifest.model_shards)]

    def stop(self) -> list:
        """Unsubscribe from every shard's topic (done, or abandoned)."""
        return [Unsubscribe(self.topic(i)) for i in range(self.manifest.model_shards)]

    def refetch(self) -> list:
        """Subscribe again to the shards still missing: the broker re-sends their retained copies."""
        missing = [self.topic(i) for i in range(self.manifest.model_shards) if i not in self.values]
        return [Unsubscribe(t) for t in missing] + [Subscribe(t, 1) for t in missing]

    def wants(self, version: int, base: int) -> bool:
        """Whether a shard on a topic of ``version`` (and ``base``) belongs to this fetch."""
        return (version, base) == (self.manifest.model_version, self.base)

    def add(self, index: int, s: ModelShard) -> np.ndarray | None:
        """Check and keep shard ``index`` (its topic's); the whole vector once every shard is in."""
        m = self.manifest
        if (s.version, s.index, s.base) != (m.model_version, index, self.base):
            raise ProtocolError("index", "topic_mismatch", f"shard {s.version}/{s.index} on topic "
                                f"{m.model_version}/{index}")
        if s.num_params != m.num_params or s.count != m.model_shards or s.codec != m.model_codec:
            raise ProtocolError("model", "layout", "shard does not match the manifest")
        check_shard_layout(s.offset, s.length, s.index, m.shard_values, m.num_params)
        if digest(s.data) != s.digest:
            raise ProtocolError("digest", "digest", f"model shard {index}")
        self.values[index] = get_codec(s.codec).decode(s.data, s.length)
        if len(self.values) < m.model_shards:
            return None
        return np.concatenate([self.values[i] for i in range(m.model_shards)])
