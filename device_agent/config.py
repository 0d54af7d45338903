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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from fedsync.config import BROKER_FIELDS, BROKER_FILES, BrokerSection, Checks, above, at_least, one_of
from fedsync.log import LOG_LEVELS
from fedsync.signing import SCHEMES


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

    checks: ClassVar[Checks]


def _across(cfg: AgentConfig) -> Iterator[tuple[str, str]]:
    d = cfg.data
    if d.index is not None and d.num_devices >= 1 and d.index >= d.num_devices:
        yield "data.index", f"must be < data.num_devices ({d.num_devices}), got {d.index}"


AgentConfig.checks = Checks(fields={
    **BROKER_FIELDS,
    "agent.resend_after": above(0),
    "agent.train_delay": at_least(0),
    "agent.signing_scheme": one_of(SCHEMES),
    "agent.log_level": one_of(LOG_LEVELS),
    "data.source": one_of(("synthetic",)),
    "data.num_devices": at_least(1),
    "data.index": at_least(0),
    "data.model": one_of(("softmax", "mlp")),
}, files=(*BROKER_FILES, "agent.signing_key_file"), across=_across)
