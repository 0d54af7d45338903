"""``fedsync agent``: one device agent, with your own trainer (``--trainer``) or on the built-in Synthetic data."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import threading

from fedsync.cli.common import broker_flags, broker_overrides, log, wait_for_signal
from fedsync.config import ConfigError, credentials_from, load_config
from fedsync.errors import OperatorError
from fedsync.log import configure, log_event


def add_agent(sub) -> None:
    p = sub.add_parser("agent", help="run one device agent (your own trainer, or built-in synthetic data)")
    broker_flags(p, user="from config, else the device id")
    p.add_argument("--device-id", metavar="ID",
                   help="this device's id, also its MQTT client id (default: from config; required)")
    p.add_argument("--federation", metavar="NAME",
                   help="federation name, the topic root fedsync/NAME/ (default: from config, demo)")
    p.add_argument("--state-dir", metavar="DIR", help="persistent outbox: uploads resume after a restart "
                   "(default: from config, none: in memory only)")
    p.add_argument("--ledger", metavar="DIR", help="keep this device's own ledger of every update sent and "
                   "receipt received in DIR, for `fedsync audit` (default: from config, none)")
    p.add_argument("--trainer", metavar="MODULE:FUNCTION", help="your own model and data: FUNCTION(device_id, "
                   "[trainer] table) returns a Trainer; MODULE is looked up in the config file's folder, then the "
                   "current one (default: from config [trainer] factory, none: the built-in trainer on Synthetic data)")
    p.add_argument("--data-index", type=int, metavar="N", help="which synthetic data slice to train on, "
                   "0 <= N < data.num_devices (default: from config, else taken from the device id)")
    p.add_argument("--once", action="store_true",
                   help="exit after the campaign finishes instead of waiting for the next one")


def cmd_agent(a: argparse.Namespace) -> int:
    from fedsync.device_agent.config import AgentConfig
    from fedsync.device_agent.service import AgentHost, DeviceSpec
    from fedsync.device_agent.trainer import NumpyTrainer
    from fedsync.models import build_model
    from fedsync.synthetic import synthetic_federation
    from fedsync.topics import Topics

    cfg = load_config(AgentConfig, a.config, {**broker_overrides(a), "agent.device_id": a.device_id,
                                              "federation.name": a.federation, "agent.log_level": a.log_level,
                                              "agent.state_dir": a.state_dir, "data.index": a.data_index,
                                              "agent.ledger_dir": a.ledger, "trainer.factory": a.trainer})
    configure(cfg.agent.log_level)
    device_id = cfg.agent.device_id
    if not device_id:
        raise ConfigError("agent.device_id: required (--device-id or [agent] device_id)")
    d = cfg.data
    index = d.index if d.index is not None else default_data_index(device_id, d.num_devices)
    if not 0 <= index < d.num_devices:
        raise ConfigError(f"data.index: {index} not in [0, {d.num_devices})")
    if cfg.trainer and "factory" not in cfg.trainer:
        # Keys for a factory, but no factory: a typo ("factroy") would run the built-in trainer.
        close = difflib.get_close_matches("factory", list(cfg.trainer), n=1)
        hint = f"; did you mean factory instead of {close[0]}?" if close else ""
        raise ConfigError(f"trainer.factory: required when [trainer] has keys ({', '.join(sorted(cfg.trainer))})"
                          f"{hint} ({a.config or 'command line'})")
    if "factory" in cfg.trainer:
        trainer = plugin_trainer(cfg.trainer, device_id, a.config)
        samples = getattr(trainer.inner, "num_train", None)
    else:
        data = synthetic_federation(d.alpha, d.beta, num_devices=d.num_devices, seed=d.seed)[index]
        trainer = NumpyTrainer(build_model(d.model, data.x_train.shape[1], 10, d.hidden), data)
        samples = data.num_train
    signer = None
    if cfg.agent.signing_key_file:
        from fedsync.signing import Ed25519Signer, HmacSigner, load_device_keys

        keys = load_device_keys(cfg.agent.signing_key_file)
        if device_id not in keys:
            raise ConfigError(f"agent.signing_key_file: {cfg.agent.signing_key_file} holds no key for "
                              f"device {device_id!r} (it has {sorted(keys)})")
        key = keys[device_id]
        signer = Ed25519Signer(key) if cfg.agent.signing_scheme == "ed25519" else HmacSigner(key)
    host = AgentHost(cfg.broker.url, Topics(cfg.federation.name),
                     [DeviceSpec(device_id, trainer, credentials_from(cfg.broker, device_id), cfg.agent.train_delay,
                                 signer)],
                     seed=cfg.agent.seed, keepalive=cfg.broker.keepalive, resend_after=cfg.agent.resend_after,
                     state_dir=cfg.agent.state_dir, indices={device_id: index}, ledger_dir=cfg.agent.ledger_dir)
    log_event(log, "agent_start", device=device_id, broker=cfg.broker.url, trainer=cfg.trainer.get("factory", "builtin"),
              data_index=index, samples=samples, incarnation=host.incarnation,
              once=getattr(a, "once", False))
    host.start()
    stop = threading.Event()
    once = getattr(a, "once", False)

    def watch() -> None:  # a standing agent ends only on a signal or a failure; --once also at the campaign's end
        while not host.done.wait(0.2):
            if once and host.all_finished.is_set():
                break
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    wait_for_signal(stop)
    if host.failed is not None:
        return 1  # logged with its traceback by the host; the broker has fired the last will
    host.stop()
    log_event(log, "agent_stop", device=device_id, **host.stats())
    if host.duplicates:  # an operator mistake, not a crash: one line, exit 2, no restart loop
        print(f"fedsync agent: {host.duplicates[0]}", file=sys.stderr)
        return 2
    return 0


def default_data_index(device_id: str, num_devices: int) -> int:
    """Which Synthetic slice a device trains on when ``data.index`` is not set: the id's
    trailing number if it has one (``dev-3`` -> 3, the demo's names), else a stable hash
    of the id (``pi-kitchen``), so any device id works and always picks the same slice.

    >>> default_data_index("dev-3", 30), default_data_index("pi-kitchen", 30) == default_data_index("pi-kitchen", 30)
    (3, True)
    """
    import zlib

    match = re.search(r"(\d+)$", device_id)
    if match is not None and int(match.group(1)) < num_devices:
        return int(match.group(1))
    return zlib.crc32(device_id.encode()) % num_devices


def plugin_trainer(section: dict, device_id: str, config_path: str | None):
    """The ``[trainer] factory``'s Trainer for this device, wrapped so that a fit returning
    other names, shapes or dtypes than the global model is refused on the device
    (:class:`fedsync.plugins.SpecCheckedTrainer`). Every mistake is one line, exit 2."""
    from fedsync.plugins import PluginError, SpecCheckedTrainer, load_object

    spec = section["factory"]
    if not isinstance(spec, str):
        raise ConfigError(f"trainer.factory: expected str, got {type(spec).__name__} {spec!r}")
    search = ([os.path.dirname(os.path.abspath(config_path))] if config_path else []) + ["."]
    try:
        factory = load_object(spec, "trainer", search)
    except PluginError as err:
        raise OperatorError(str(err), code=2) from None
    try:
        trainer = factory(device_id, dict(section))
    except Exception as exc:  # noqa: BLE001 - the user's factory: one line naming it, not a traceback
        raise OperatorError(f"trainer {spec!r}: the factory raised {type(exc).__name__}: {exc}", code=2) from None
    if not (callable(getattr(trainer, "fit", None)) and callable(getattr(trainer, "evaluate", None))):
        raise OperatorError(f"trainer {spec!r}: the factory returned a {type(trainer).__name__}, "
                            "not a Trainer (with fit and evaluate)", code=2)
    return SpecCheckedTrainer(trainer)
