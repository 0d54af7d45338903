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
import time
from dataclasses import dataclass, field

import numpy as np

from fedsync.coordinator.core import DEFAULT_SCREEN, CoordinatorCore, RoundClosed, RoundPolicy
from fedsync.coordinator.service import CoordinatorService
from fedsync.synthetic import DeviceData, synthetic_federation, union
from fedsync.models import build_model
from fedsync.device_agent.service import AgentHost, DeviceSpec
from fedsync.trainer_api import DEFAULT_HYPER
from fedsync.device_agent.trainer import NumpyTrainer
from fedsync.address import Credentials
from fedsync.params import unflatten
from fedsync.topics import Topics


class ByzantineTrainer:
    """A malicious device for robustness tests: trains honestly, then sends
    ``global + scale * (local - global)`` (scale -10: a sign-flipped, scaled update)."""

    def __init__(self, honest, scale: float = -10.0) -> None:
        self.honest, self.scale = honest, scale

    def fit(self, params, hyper, rng):
        from fedsync.trainer_api import FitResult

        r = self.honest.fit(params, hyper, rng)
        evil = {k: (params[k] + self.scale * (r.params[k] - params[k])).astype(np.float32) for k in params}
        return FitResult(evil, r.num_samples, dict(r.metrics))

    def evaluate(self, params):
        return self.honest.evaluate(params)


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
    state_dir: str | None = None  # journal (coordinator) and outboxes (devices) live here
    coordinator_url: str | None = None  # default: broker_url (e.g. devices via a chaos proxy, coordinator direct)
    solo: tuple[str, ...] = ()  # devices hosted alone, so a test can crash and restart them
    publish_hook: object = None  # callable(device, topic) before each device publish; False drops it
    strategy_factory: object = None  # per-round aggregation strategy (default FedAvg)
    strategy: str | None = None  # or a registered strategy by name (coordinator/strategies.py), with options
    strategy_options: dict = field(default_factory=dict)
    ledger_dir: str | None = None  # every device keeps its own ledger here (device_agent/ledger.py)
    byzantine: dict[str, float] = field(default_factory=dict)  # device -> scale of its malicious update
    screen: object = DEFAULT_SCREEN  # the coordinator's update bounds (coordinator/hardening.py); None: off
    stop_at_accuracy: float | None = None  # also done once a committed model reaches this test accuracy
    signing_keys: dict[str, bytes] | None = None  # HMAC-SHA256 key per device: devices sign, coordinator verifies
    # Your own model (fedsync.plugins, fedsync.adapters): all three replace the built-in numpy model.
    initial_params: dict[str, np.ndarray] | None = None  # the global model's start (default: model_kind's init)
    make_trainer: object = None  # callable(device_id, index) -> Trainer (default: NumpyTrainer on Synthetic)
    score: object = None  # callable(params) -> accuracy of a global model (default: numpy model, union test split)

    data: list[DeviceData] = field(init=False)
    records: list[RoundRecord] = field(init=False, default_factory=list)
    coordinator: CoordinatorService = field(init=False)
    hosts: dict[str, AgentHost] = field(init=False, default_factory=dict)
    final_vector: np.ndarray | None = field(init=False, default=None)
    _done: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.data = synthetic_federation(self.alpha, self.beta, num_devices=self.n_devices, seed=self.seed)
        self.model = build_model(self.model_kind, 60, 10)
        _, _, self.x_test, self.y_test = union(self.data)
        self.topics = Topics(self.federation)
        # Not seeded: each coordinator (a run, a restart) is a new incarnation, as the CLI's are;
        # two runs on one broker with one seed must not look like one coordinator going backwards.
        self._incarnations = random.Random()
        self.coordinator = self._make_coordinator()
        self.spec = self.coordinator.core.spec
        def trainer(d: str, i: int):
            honest = self.make_trainer(d, i) if self.make_trainer else NumpyTrainer(self.model, self.data[i])
            return ByzantineTrainer(honest, self.byzantine[d]) if d in self.byzantine else honest

        def signer(d: str):
            from fedsync.signing import HmacSigner

            keys = self.signing_keys or {}
            return HmacSigner(keys[d]) if d in keys else None

        self._specs = {d: DeviceSpec(d, trainer(d, i),
                                     Credentials(d, self.users[d], self.ca_file), self.train_delays.get(d, 0.0),
                                     signer(d))
                       for i, d in enumerate(device_ids(self.n_devices))}
        self._index = {d: i for i, d in enumerate(device_ids(self.n_devices))}
        shared = [d for d in self._specs if d not in self.solo]
        groups = ([shared] if shared else []) + [[d] for d in self.solo]
        self._retired_stats: list[dict[str, int]] = []
        for group in groups:
            host = self._make_host(group)
            for d in group:
                self.hosts[d] = host

    def _make_coordinator(self) -> CoordinatorService:
        params = (self.initial_params if self.initial_params is not None
                  else self.model.init_params(np.random.default_rng(self.seed)))
        factory = self.strategy_factory
        if factory is None and self.strategy is not None:
            from fedsync.coordinator.strategies import make_strategy_factory

            factory = make_strategy_factory(self.strategy, sum(v.size for v in params.values()),
                                            self.strategy_options)
        core = CoordinatorCore(self.topics, params, self.policy, hyper=self.hyper,
                               incarnation=self._incarnations.getrandbits(62) + 1, seed=self.seed,
                               strategy_factory=factory, screen=self.screen,
                               verifier=self._verifier())
        service = CoordinatorService(
            core, self.coordinator_url or self.broker_url,
            credentials=Credentials("coordinator", self.users["coordinator"], self.ca_file),
            keepalive=self.keepalive, on_event=self._on_event, state_dir=self.coordinator_state_dir)
        if service.journal is not None and self.strategy_factory is None:
            # What an audit replays (fedsync.lab.audit); a custom factory has no name to record.
            service.journal.note_strategy(self.strategy or "fedavg", self.strategy_options)
        return service

    @property
    def coordinator_state_dir(self) -> str | None:
        return f"{self.state_dir}/coordinator" if self.state_dir else None

    def _verifier(self):
        from fedsync.signing import HmacVerifier

        return HmacVerifier(self.signing_keys) if self.signing_keys is not None else None

    def _make_host(self, group: list[str]) -> AgentHost:
        host = AgentHost(self.broker_url, self.topics, [self._specs[d] for d in group], seed=self.seed,
                         keepalive=self.keepalive, resend_after=self.resend_after,
                         state_dir=f"{self.state_dir}/agents" if self.state_dir else None,
                         indices={d: self._index[d] for d in group}, ledger_dir=self.ledger_dir)
        host.publish_hook = self.publish_hook
        return host

    @property
    def host_list(self) -> list[AgentHost]:
        return list({id(h): h for h in self.hosts.values()}.values())

    def accuracy(self, vector: np.ndarray) -> float:
        params = unflatten(vector, self.spec)
        if self.score is not None:
            return float(self.score(params))
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
        if self.stop_at_accuracy is not None and acc is not None and acc >= self.stop_at_accuracy:
            self.reached_at = time.perf_counter() - self._started
            self._done.set()

    def start(self) -> "LocalFederation":
        self._started = time.perf_counter()
        self.reached_at: float | None = None
        self.coordinator.start()
        for host in self.host_list:
            host.start()
        return self

    def wait(self, timeout: float) -> bool:
        """Wait until the configured number of rounds has committed."""
        return self._done.wait(timeout)

    def stop(self) -> None:
        for host in self.host_list:
            host.stop()
        self.coordinator.stop()

    # -- fault injection -------------------------------------------------------------

    def crash_coordinator(self) -> None:
        """Stop the coordinator as a crash would: no offline status, no DISCONNECT (the will fires)."""
        self.coordinator.stop(graceful=False)

    def restart_coordinator(self) -> None:
        """A new incarnation from the same journal (needs ``state_dir``)."""
        self.coordinator = self._make_coordinator()
        self.coordinator.start()

    def crash_device(self, device: str) -> None:
        """Kill a solo device's host as a crash would: its in-memory state is gone."""
        host = self.hosts[device]
        if list(host.devices) != [device]:
            raise ValueError(f"{device} is not hosted alone; pass it in solo=")
        host.kill(device)
        host.stop()
        self._retired_stats.append(host.stats())

    def restart_device(self, device: str) -> None:
        """Start the device again from its outbox (needs ``state_dir``)."""
        host = self._make_host([device])
        self.hosts[device] = host
        host.start()

    def kill_device(self, device: str) -> None:
        """Drop a device's connection with no DISCONNECT (its last will fires); it stays dead."""
        self.hosts[device].kill(device)

    def agent_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for stats in [h.stats() for h in self.host_list] + self._retired_stats:
            for k, v in stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def summary(self) -> dict:
        s = self.coordinator.core.stats
        agents = self.agent_stats()
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
