"""The attackers of ``fedsync fieldtest --profile hostile``: a poisoning trainer and a flooding account.

Theory of operation
-------------------
:class:`PoisonTrainer` is a ``Trainer`` like any other, hosted by an ordinary agent: every
round it returns the update of issue 12 (every value 3.0e38, finite, so it passes every
codec and digest, and ``num_samples`` 10,000,000). The coordinator's default bounds must
refuse it, each time, with a final receipt naming the bound.

:class:`Flooder` is a registered account that never trains. It holds its own MQTT
connection (its own login, so the broker ACL lets it write only ``up/{itself}/#``), reads
the retained manifest to aim at the open round, and publishes, paced at ``per_second`` and
never more than ``window`` unacknowledged: random bytes (not CBOR; 3 in 4), well-formed
update shards of the open round (a correct digest, so only the round's checks drop them;
1 in 5 of the rest is oversized, 1 MiB of data), drawn from a seeded RNG. It never
announces itself online, so it is never selected: everything it sends must be counted and
dropped by the coordinator while the honest devices' rounds go on.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np

from fedsync.address import Credentials
from fedsync.errors import ProtocolError
from fedsync.messages import RoundManifest, UpdateShard, decode, encode
from fedsync.params import digest
from fedsync.topics import Topics
from fedsync.trainer_api import EvalResult, FitResult
from fedsync.transport.mqtt import MqttLink

POISON_VALUE = 3.0e38
POISON_SAMPLES = 10_000_000
OVERSIZED = 1 << 20  # bytes of data in an oversized shard


class PoisonTrainer:
    """Every parameter ``POISON_VALUE``, with ``POISON_SAMPLES`` claimed samples.

    >>> r = PoisonTrainer().fit({"w": np.zeros(2, np.float32)}, {}, None)
    >>> r.params["w"].tolist(), r.num_samples
    ([3.0000000054977558e+38, 3.0000000054977558e+38], 10000000)
    """

    def fit(self, params, hyper, rng) -> FitResult:
        return FitResult({k: np.full_like(v, POISON_VALUE, dtype=np.float32) for k, v in params.items()},
                         num_samples=POISON_SAMPLES, metrics={})

    def evaluate(self, params) -> EvalResult:
        return EvalResult(loss=0.0, accuracy=0.0, num_samples=1)


class Flooder:
    """Floods ``up/{device}/...`` with junk until :meth:`stop` (see the module docstring)."""

    def __init__(self, broker: str, topics: Topics, device: str, password: str, *, seed: int = 0,
                 per_second: float = 100.0, window: int = 32) -> None:
        self.topics, self.device = topics, device
        self.per_second, self.window = per_second, window
        self._rng = random.Random(f"flood:{seed}:{device}")
        self._manifest: RoundManifest | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = {"junk": 0, "shard": 0, "oversized": 0}
        self.bytes = 0
        self.link = MqttLink(device, broker, on_message=self._on_message, credentials=Credentials(device, password),
                             clean_session=True, keepalive=5)
        self.link.subscribe(topics.manifest, 1)

    def start(self) -> "Flooder":
        self.link.start()
        self._thread = threading.Thread(target=self._run, name=f"flood-{self.device}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.link.stop(disconnect=True)

    def stats(self) -> dict[str, int]:
        return {**{f"flood_{k}": v for k, v in self.sent.items()}, "flood_bytes": self.bytes,
                "flood_acknowledged": self.link.published_ok}

    # -- internals -----------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, _token) -> None:
        if topic == self.topics.manifest and payload:
            try:
                self._manifest = decode(payload, RoundManifest)
            except ProtocolError:
                pass

    def _run(self) -> None:
        period = 1.0 / self.per_second
        next_at = time.monotonic()
        while not self._stop.is_set():
            m = self._manifest
            if m is None or not self.link.connected.is_set() \
                    or self.link.published - self.link.published_ok >= self.window:
                self._stop.wait(0.01)
                continue
            kind = "junk" if m.state != "open" or self._rng.random() < 0.75 else (
                "oversized" if self._rng.random() < 0.2 else "shard")
            uid = f"f{self._rng.getrandbits(40):010x}"
            topic = self.topics.up(self.device, m.round_id, uid, 0)
            payload = self._payload(kind, m, uid)
            self.link.publish(topic, payload, 1, False)
            self.sent[kind] += 1
            self.bytes += len(payload)
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _payload(self, kind: str, m: RoundManifest, uid: str) -> bytes:
        if kind == "junk":
            return self._rng.randbytes(self._rng.randrange(16, 4096))
        data = self._rng.randbytes(OVERSIZED if kind == "oversized" else 64)
        shard = UpdateShard(self.device, m.round_id, uid, m.model_version, 0, m.model_shards, 0,
                            min(m.shard_values, m.num_params), m.num_params, m.update_codec, 1, digest(data),
                            digest(digest(data)), data, {}, b"")
        try:
            return encode(shard)
        except Exception:  # noqa: BLE001 - a layout our own encoder refuses: send junk instead
            return self._rng.randbytes(64)
