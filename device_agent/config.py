"""``agent.toml``: every key with its default. See docs/configuration.md.

Example file::

    [broker]
    url = "mqtts://broker.example:8883"
    password_file = "/etc/fedsync/agent.pw"   # username defaults to the device id
    ca_file = "/etc/fedsync/ca.pem"

    [federation]
    name = "farm"

    [agent]
    device_id = "pi-kitchen"
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsync.config import BrokerSection


@dataclass(frozen=True, slots=True)
class FederationSection:
    name: str = "demo"


@dataclass(frozen=True, slots=True)
class AgentSection:
    device_id: str | None = None  # also the MQTT client id and (by default) username
    resend_after: float = 10.0  # seconds without ack progress before missing shards are re-sent
    seed: int = 0
    train_delay: float = 0.0  # extra seconds per local fit: simulates a slow device in labs
    state_dir: str | None = None  # persistent outbox; None = an update in flight dies with the process
    signing_key_file: str | None = None  # this device's key (signing/devices/{id}.key); None = unsigned
    signing_scheme: str = "hmac-sha256"  # or "ed25519" (needs the cryptography package)
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class DataSection:
    """Built-in data: the FedProx Synthetic(alpha, beta) federation.

    A real deployment plugs its own :class:`device_agent.trainer.Trainer`
    in through the Python API instead.
    """

    source: str = "synthetic"
    alpha: float = 1.0
    beta: float = 1.0
    num_devices: int = 30
    index: int | None = None  # which synthetic device; default: trailing digits of device_id
    seed: int = 0
    model: str = "softmax"
    hidden: int = 64


@dataclass(frozen=True, slots=True)
class AgentConfig:
    broker: BrokerSection = BrokerSection()
    federation: FederationSection = FederationSection()
    agent: AgentSection = AgentSection()
    data: DataSection = DataSection()
