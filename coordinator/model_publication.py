"""Which global model the broker retains, and the publishes that move it on.

Theory of operation
-------------------
The broker keeps one model version retained (``model/{v}/{shard}``) and, when it is
smaller, the delta into it from the version before (``modeldelta/{v-1}/{v}/{shard}``,
named by the manifest's ``delta_from``); :mod:`fedsync.coordinator.model_store` encodes
them. :class:`RetainedModel` remembers what is out there (``delta_from``, the full
model's last publishes, whose size decides whether a delta is worth it) and builds the
publishes for the round core, in the order devices need them:

1. on a commit, model v+1 and its delta first (``commit`` returns them);
2. then the core publishes the next manifest, which names the new ``delta_from``;
3. only then the clearing of model v and of the delta into v (``commit``'s second list),
   so a device never reads a manifest whose model is already gone.

An adopted model (an edge coordinator's upstream model) has no delta: devices fetch it whole.
"""

from __future__ import annotations

import numpy as np

from fedsync.actions import Publish
from fedsync.coordinator import model_store
from fedsync.topics import Topics


class RetainedModel:
    """The retained model's publishes (see the module docstring).

    >>> out = RetainedModel(Topics("t"), shard_values=2, codec="raw")
    >>> [p.topic for p in out.full(0, np.zeros(3, np.float32))], out.delta_from
    (['fedsync/t/model/0/0', 'fedsync/t/model/0/1'], -1)
    """

    def __init__(self, topics: Topics, shard_values: int, codec: str) -> None:
        self.topics, self.shard_values, self.codec = topics, shard_values, codec
        self.delta_from = -1  # version whose delta into the current one is retained, or -1
        self.last_full: list[Publish] = []  # the current version's full shards, as last published

    def full(self, version: int, vector: np.ndarray) -> list[Publish]:
        """Model ``version``'s retained shards (remembered: a delta must beat their size)."""
        self.last_full = model_store.model_shards(self.topics, version, vector, self.shard_values, self.codec)
        return self.last_full

    def clear(self, version: int, num_params: int) -> list[Publish]:
        """Empty retained payloads for model ``version`` and the delta into it, if one is out."""
        n = -(-num_params // self.shard_values)
        out = model_store.clear(self.topics, version, n)
        if self.delta_from >= 0:
            out += model_store.clear(self.topics, version, n, base=self.delta_from)
        return out

    def commit(self, old_version: int, old: np.ndarray, new: np.ndarray) -> tuple[list[Publish], list[Publish]]:
        """``(before the manifest, after it)`` for the step ``old_version -> old_version + 1``.

        ``new`` must be ``old + float32(new - old)`` exactly (:func:`model_store.exact_step`)."""
        version = old_version + 1
        publish = self.full(version, new)
        delta = (new - old).astype(np.float32)
        shards = model_store.model_shards(self.topics, version, delta, self.shard_values, self.codec,
                                          base=old_version)
        if model_store.payload_bytes(shards) >= model_store.payload_bytes(publish):
            shards = []  # not worth it: devices one version behind fetch the full model too
        retire = self.clear(old_version, new.size)  # the delta *into* old_version goes with it
        self.delta_from = old_version if shards else -1
        return publish + shards, retire

    def adopted(self, old_version: int, version: int, vector: np.ndarray) -> list[Publish]:
        """An adopted model replaces ``old_version`` whole: no delta is published for it."""
        out = self.full(version, vector) + self.clear(old_version, vector.size)
        self.delta_from = -1
        return out
