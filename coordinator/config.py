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

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from fedsync.coordinator.core import RoundPolicy
from fedsync.coordinator.strategies import STRATEGY_NAMES
from fedsync.trainer_api import DEFAULT_HYPER
from fedsync.codecs import codec_names
from fedsync.config import (BROKER_FIELDS, BROKER_FILES, BrokerSection, Checks, FederationSection, above, at_least,
                            one_of)
from fedsync.log import LOG_LEVELS
from fedsync.signing import SCHEMES


@dataclass(frozen=True, slots=True)
class ModelSection:
    """The initial global model (the devices' trainers must build the same one)."""

    # Your own model: "pkg.module:initial_params" (a function returning dict[str, float32 array]),
    # or a .npz / .safetensors file of named float32 arrays (fedsync/plugins.py); the module is
    # looked up in the config file's folder, then the current one. None: the built-in model below.
    init: str | None = None
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
class StrategySection:
    """How a round's updates become the next model (coordinator/strategies.py).

    Options go in ``[strategy_options]``, e.g. ``trim_fraction = 0.2`` for
    ``trimmed_mean`` or ``num_byzantine = 2`` for ``krum``."""

    name: str = "fedavg"  # fedavg, mean, fedavgm, fedadam, median, trimmed_mean, krum, multi_krum, dp_fedavg


@dataclass(frozen=True, slots=True)
class HardeningSection:
    """Policy checks on every complete, verified update (coordinator/hardening.py; the rule is in
    docs/protocol.md, "Update bounds"). On by default: the norm bound adapts to the accepted norms."""

    max_update_norm: float | None = None  # fixed L2 bound on an update's delta; None = the adaptive bound below
    norm_multiple: float = 100.0  # adaptive bound: this times the median norm of the last accepted updates; 0 = off
    norm_window: int = 50  # accepted updates whose norms the median is taken over
    norm_warmup: int = 5  # until this many were accepted, the bound is warmup_norm x max(1, model norm)
    warmup_norm: float = 100.0
    norm_floor: float = 0.001  # the adaptive bound is never below this
    max_num_samples: int = 1_000_000  # a larger claimed sample count is refused (it would dominate FedAvg)


@dataclass(frozen=True, slots=True)
class SigningSection:
    """Per-device update signatures (fedsync/signing.py), for brokers the operator does not control.
    With a keys file every update must carry a valid signature; ``fedsync broker-config --signing``
    writes the files."""

    scheme: str = "hmac-sha256"  # or "ed25519"
    keys_file: str | None = None  # e.g. signing/coordinator.keys; None = updates need not be signed


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    broker: BrokerSection = BrokerSection()
    federation: FederationSection = FederationSection()
    round: RoundPolicy = RoundPolicy()
    model: ModelSection = ModelSection()
    train: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_HYPER))
    strategy: StrategySection = StrategySection()
    strategy_options: dict[str, float] = field(default_factory=dict)
    hardening: HardeningSection = HardeningSection()
    signing: SigningSection = SigningSection()
    coordinator: ServiceSection = ServiceSection()

    checks: ClassVar[Checks]


def _across(cfg: CoordinatorConfig) -> Iterator[tuple[str, str]]:
    r, h = cfg.round, cfg.hardening
    if r.target >= 1 and r.quorum > r.target:  # a bad target is reported on its own
        yield "round.quorum", f"must be <= round.target ({r.target}), got {r.quorum}"
    if h.norm_window >= 1 and h.norm_warmup > h.norm_window:
        yield "hardening.norm_warmup", f"must be <= hardening.norm_window ({h.norm_window}), got {h.norm_warmup}"


CoordinatorConfig.checks = Checks(fields={
    **BROKER_FIELDS,
    "round.mode": one_of(("sync", "async", "semisync")),
    "round.rounds": at_least(0),
    "round.target": at_least(1),
    "round.quorum": at_least(1),
    "round.over_select": at_least(0),
    "round.min_devices": at_least(1),
    "round.round_timeout": above(0),
    "round.shard_values": at_least(1),
    "round.model_codec": one_of(codec_names),  # a function: codecs registered later count too
    "round.update_codec": one_of(codec_names),
    "round.update_qos": one_of((1, 2)),  # QoS 0 would lose shards silently on a reconnect
    "round.resend_after": lambda v: None if v is None or 0.1 <= v <= 3600 else f"must be in [0.1, 3600], got {v!r}",
    "round.offline_grace": at_least(0),
    "round.staleness_exponent": at_least(0),
    "round.max_staleness": at_least(0),
    "model.kind": one_of(("softmax", "mlp")),
    "strategy.name": one_of(STRATEGY_NAMES),
    "hardening.max_update_norm": above(0),
    "hardening.norm_multiple": at_least(0),
    "hardening.norm_window": at_least(1),
    "hardening.norm_warmup": at_least(1),
    "hardening.warmup_norm": above(0),
    "hardening.norm_floor": at_least(0),
    "hardening.max_num_samples": at_least(1),
    "signing.scheme": one_of(SCHEMES),
    "coordinator.log_level": one_of(LOG_LEVELS),
    "coordinator.tick_interval": above(0),
}, files=(*BROKER_FILES, "signing.keys_file"), across=_across)


def strategy_factory_from(cfg: CoordinatorConfig, num_params: int):
    """The per-round strategy factory the config names (checked now, not at the first round)."""
    import numpy as np

    from fedsync.coordinator.spool import disk_spool
    from fedsync.coordinator.strategies import make_strategy_factory

    options = {k: int(v) if float(v).is_integer() and k in _INT_OPTIONS else v
               for k, v in cfg.strategy_options.items()}
    if cfg.strategy.name in SPOOLED:  # their K updates go to a file in the temp dir, not RAM
        try:
            options["spool"] = disk_spool(None, options.pop("chunk_rows", 16))
        except ValueError as exc:
            raise ValueError(f"strategy {cfg.strategy.name!r}: {exc}") from None
    return make_strategy_factory(cfg.strategy.name, num_params, options,
                                 np.random.default_rng(cfg.coordinator.seed))


_INT_OPTIONS = {"num_byzantine", "multi", "chunk_rows", "block_values"}
SPOOLED = {"median", "trimmed_mean", "krum", "multi_krum"}


def screen_from(cfg: CoordinatorConfig):
    """The update screen ``[hardening]`` describes (coordinator/hardening.py)."""
    from fedsync.coordinator.hardening import UpdateScreen

    h = cfg.hardening
    return UpdateScreen(h.max_update_norm, h.max_num_samples, multiple=h.norm_multiple, window=h.norm_window,
                        warmup=h.norm_warmup, warmup_norm=h.warmup_norm, floor=h.norm_floor)


def verifier_from(cfg: CoordinatorConfig):
    """The signature verifier the config names, or None."""
    if cfg.signing.keys_file is None:
        return None
    from fedsync.signing import Ed25519Verifier, HmacVerifier, load_device_keys

    if cfg.signing.scheme == "ed25519":
        return Ed25519Verifier(load_device_keys(cfg.signing.keys_file, secret=False))
    if cfg.signing.scheme == "hmac-sha256":
        return HmacVerifier(load_device_keys(cfg.signing.keys_file))
    from fedsync.config import ConfigError

    raise ConfigError(f"signing.scheme: {cfg.signing.scheme!r} is not hmac-sha256 or ed25519")
