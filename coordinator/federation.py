"""A whole federation on one machine: coordinator + simulated devices against a broker.

Used by ``fedsync demo``, the integration tests and the benchmarks, so all of
them exercise the same real path: real MQTT connections (one per device, each
with its own client id, session and last will), the real coordinator service,
the real agent host. Only the data is synthetic.
"""

from __future__ import annotations

import random
import secrets
import threading
from dataclasses import dataclass, field

import numpy as np

from coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
from coordinator.service import CoordinatorService
from device_agent.data import DeviceData, synthetic_federation, union
from device_agent.models import build_model
from device_agent.service import AgentHost, DeviceSpec
from device_agent.trainer import DEFAULT_HYPER, NumpyTrainer
from fedsync.mqtt import Credentials
from fedsync.params import unflatten
from fedsync.topics import Topics


def device_ids(n: int) -> list[str]:
    return [f"dev-{i}" for i in range(n)]


def make_users(n_devices: int) -> dict[str, str]:
    """Fresh random passwords for the coordinator and ``dev-0 .. dev-{n-1}``."""
    return {name: secrets.token_urlsafe(12) for name in ["coordinator", *device_ids(n_devices)]}


@dataclass(slots=True)
class RoundRecord:
    round_id: int
    outcome: str
    model_version: int
    selected: int
    accepted: int
    seconds: float
    accuracy: float | None
    reason: str


@dataclass
class LocalFederation:
    """Coordinator and ``n_devices`` agents in this process, against ``broker_url``."""

    broker_url: str
    users: dict[str, str]
    n_devices: int = 10
    seed: int = 0
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    hyper: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_HYPER))
    federation: str = "demo"
    model_kind: str = "softmax"
    alpha: float = 1.0
    beta: float = 1.0
    keepalive: int = 15
    resend_after: float = 10.0
    train_delays: dict[str, float] = field(default_factory=dict)
    ca_file: str | None = None  # TLS: CA that signed the broker's certificate (use an mqtts:// URL)
    on_round: object = None  # callable(RoundRecord)

    data: list[DeviceData] = field(init=False)
    records: list[RoundRecord] = field(init=False, default_factory=list)
    coordinator: CoordinatorService = field(init=False)
    host: AgentHost = field(init=False)
    final_vector: np.ndarray | None = field(init=False, default=None)
    _done: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.data = synthetic_federation(self.alpha, self.beta, num_devices=self.n_devices, seed=self.seed)
        self.model = build_model(self.model_kind, 60, 10)
        _, _, self.x_test, self.y_test = union(self.data)
        params = self.model.init_params(np.random.default_rng(self.seed))
        topics = Topics(self.federation)
        core = CoordinatorCore(topics, params, self.policy, hyper=self.hyper,
                               incarnation=random.Random(self.seed).getrandbits(62) + 1,
                               seed=self.seed)
        self.spec = core.spec
        self.coordinator = CoordinatorService(
            core, self.broker_url, credentials=Credentials("coordinator", self.users["coordinator"], self.ca_file),
            keepalive=self.keepalive, on_event=self._on_event)
        specs = [DeviceSpec(d, NumpyTrainer(self.model, self.data[i]), Credentials(d, self.users[d], self.ca_file),
                            self.train_delays.get(d, 0.0))
                 for i, d in enumerate(device_ids(self.n_devices))]
        self.host = AgentHost(self.broker_url, topics, specs, seed=self.seed, keepalive=self.keepalive,
                              resend_after=self.resend_after)

    def accuracy(self, vector: np.ndarray) -> float:
        params = unflatten(vector, self.spec)
        return float((self.model.predict(params, self.x_test) == self.y_test).mean())

    def _on_event(self, event: object) -> None:
        if not isinstance(event, RoundClosed):
            return
        acc = None
        if event.vector is not None:
            self.final_vector = event.vector
            acc = self.accuracy(event.vector)
        rec = RoundRecord(event.round_id, event.outcome, event.model_version, len(event.selected),
                          len(event.accepted), event.closed_at - event.started_at, acc, event.reason)
        self.records.append(rec)
        if self.on_round is not None:
            self.on_round(rec)
        if self.policy.rounds and self.coordinator.core.stats.rounds_committed >= self.policy.rounds:
            self._done.set()

    def start(self) -> "LocalFederation":
        self.coordinator.start()
        self.host.start()
        return self

    def wait(self, timeout: float) -> bool:
        """Wait until the configured number of rounds has committed."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        self.host.stop()
        self.coordinator.stop()

    def summary(self) -> dict:
        s = self.coordinator.core.stats
        agents = self.host.stats()
        committed = [r for r in self.records if r.outcome == "committed"]
        return {
            "rounds_completed": s.rounds_committed,
            "rounds_abandoned": s.rounds_abandoned,
            "final_accuracy": committed[-1].accuracy if committed else None,
            "updates_accepted": s.updates_accepted,
            "duplicates_dropped": s.duplicates_dropped,
            "shards_rejected": s.shards_rejected,
            "rejected_by_reason": dict(s.rejected_by_reason),
            "bytes_up": agents["bytes_up"],
            "bytes_down": agents["bytes_down"],
            "shards_resent": agents["shards_resent"],
            "devices_offline_detected": s.devices_offline_detected,
            "accuracy_per_round": [r.accuracy for r in committed],
            "round_seconds": [round(r.seconds, 4) for r in self.records],
        }
