"""``coordinator.toml``: every key with its default. See docs/configuration.md.

Example file::

    [broker]
    url = "mqtts://broker.example:8883"
    username = "coordinator"
    password_file = "/etc/fedsync/coordinator.pw"
    ca_file = "/etc/fedsync/ca.pem"

    [federation]
    name = "farm"

    [round]
    rounds = 50
    target = 20
    quorum = 10
    over_select = 0.3
    round_timeout = 120.0

    [train]
    lr = 0.01
    epochs = 1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.core import RoundPolicy
from device_agent.trainer import DEFAULT_HYPER
from fedsync.config import BrokerSection


@dataclass(frozen=True, slots=True)
class FederationSection:
    name: str = "demo"  # topic root is fedsync/{name}/


@dataclass(frozen=True, slots=True)
class ModelSection:
    """The initial global model (the devices' trainers must build the same one)."""

    kind: str = "softmax"  # "softmax" or "mlp"
    dim: int = 60
    classes: int = 10
    hidden: int = 64  # mlp only
    seed: int = 0  # initial weights


@dataclass(frozen=True, slots=True)
class ServiceSection:
    client_id: str = "coordinator"
    seed: int = 0  # device selection RNG
    tick_interval: float = 0.1  # seconds between deadline checks
    state_dir: str | None = None  # journal + checkpoints for crash recovery; None = in memory only
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    broker: BrokerSection = BrokerSection()
    federation: FederationSection = FederationSection()
    round: RoundPolicy = RoundPolicy()
    model: ModelSection = ModelSection()
    train: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_HYPER))
    coordinator: ServiceSection = ServiceSection()
