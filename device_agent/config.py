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

    [trainer]                                  # optional: your own model (see AgentConfig.trainer)
    factory = "mytrainer:make_trainer"
    data_dir = "/var/lib/fedsync/data"         # any other key goes to the factory
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from fedsync.config import (BROKER_FIELDS, BROKER_FILES, BrokerSection, Checks, FederationSection, above, at_least,
                            one_of)
from fedsync.log import LOG_LEVELS
from fedsync.signing import SCHEMES


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
    ledger_dir: str | None = None  # the device's own ledger of what it sent (device_agent/ledger.py); None = none


@dataclass(frozen=True, slots=True)
class DataSection:
    """Built-in data: the FedProx Synthetic(alpha, beta) federation (unused with a [trainer] factory)."""

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
    # [trainer]: your own model and data instead of [data]. ``factory = "pkg.module:make_trainer"``
    # (or --trainer) names a function called as factory(device_id, section), where section is this
    # whole table (any TOML values: paths, numbers, flags), returning a Trainer
    # (fedsync/trainer_api.py). The module is looked up in the config file's folder, then the
    # current one. Empty (the default): the built-in numpy trainer on the Synthetic [data].
    trainer: dict[str, object] = field(default_factory=dict)

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
    "data.num_devices": at_least(1),
    "data.index": at_least(0),
    "data.model": one_of(("softmax", "mlp")),
}, files=(*BROKER_FILES, "agent.signing_key_file"), across=_across)
