"""``fedsync coordinator`` (the round service) and ``fedsync status`` (what the broker retains)."""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from typing import ClassVar

from fedsync.cli.common import broker_flags, broker_overrides, log, wait_for_signal
from fedsync.config import BROKER_FIELDS, BROKER_FILES, BrokerSection, Checks, credentials_from, load_config
from fedsync.errors import OperatorError
from fedsync.log import configure, log_event


def add_coordinator(sub) -> None:
    p = sub.add_parser("coordinator", help="run the coordinator")
    broker_flags(p, user="from config, else the client id 'coordinator'")
    p.add_argument("--federation", metavar="NAME",
                   help="federation name, the topic root fedsync/NAME/ (default: from config, demo)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="committed rounds to run, 0 = run forever (count; default: from config, 20)")
    p.add_argument("--target", type=int, metavar="N",
                   help="accepted updates that commit a round at once (count; default: from config, 10)")
    p.add_argument("--quorum", type=int, metavar="N",
                   help="accepted updates that commit a round at its deadline (count; default: from config, 1)")
    p.add_argument("--min-devices", type=int, metavar="N",
                   help="devices online before a round opens (count; default: from config, 1)")
    p.add_argument("--round-timeout", type=float, metavar="SECONDS",
                   help="from a round's manifest to its deadline (seconds; default: from config, 60.0)")
    p.add_argument("--state-dir", metavar="DIR", help="journal and checkpoints, for crash recovery "
                   "(default: from config, none: in memory only)")
    p.add_argument("--mode", choices=["sync", "async", "semisync"], help="round rule (default: from config, sync)")
    p.add_argument("--strategy", metavar="NAME", help="aggregation strategy, e.g. fedavg, median, krum; "
                   "all names in docs/protocol.md (default: from config, fedavg)")
    p.add_argument("--model", metavar="SPEC", help="your own initial model: MODULE:FUNCTION returning a dict of "
                   "named float32 arrays (MODULE looked up in the config file's folder, then the current one), or a "
                   ".npz / .safetensors file (default: from config [model] init, none: the built-in [model] kind)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on "
                   "http://127.0.0.1:PORT/metrics (TCP port; default: none, no metrics)")
    p.add_argument("--takeover", action="store_true",
                   help="start even if another coordinator of this federation is online; the old one stands down")


def add_status(sub) -> None:
    p = sub.add_parser("status", help="print the retained manifest and device presence")
    broker_flags(p, user="from config, none", log_level="warning")
    p.add_argument("--federation", default="demo", metavar="NAME", help="federation to look at (default: %(default)s)")
    p.add_argument("--wait", type=float, default=1.5, metavar="SECONDS",
                   help="time to collect retained messages (seconds; default: %(default)s)")


def cmd_coordinator(a: argparse.Namespace) -> int:
    from fedsync.transport.memtune import keep_freed_memory

    keep_freed_memory()  # before numpy and the MQTT thread start: see fedsync/transport/memtune.py
    import time

    import numpy as np

    from fedsync.coordinator.config import CoordinatorConfig, screen_from, strategy_factory_from, verifier_from
    from fedsync.coordinator.core import CoordinatorCore
    from fedsync.coordinator.service import CoordinatorService
    from fedsync.models import build_model
    from fedsync.topics import Topics

    cfg = load_config(CoordinatorConfig, a.config, {
        **broker_overrides(a), "federation.name": a.federation, "round.rounds": a.rounds,
        "round.target": a.target, "round.quorum": a.quorum, "round.min_devices": a.min_devices,
        "round.round_timeout": a.round_timeout, "coordinator.log_level": a.log_level,
        "coordinator.state_dir": a.state_dir, "round.mode": a.mode, "strategy.name": a.strategy,
        "model.init": a.model})
    configure(cfg.coordinator.log_level)
    m = cfg.model
    if m.init is not None:
        params = initial_model(m.init, a.config)
    else:
        params = build_model(m.kind, m.dim, m.classes, m.hidden).init_params(np.random.default_rng(m.seed))
    incarnation = time.time_ns() & ((1 << 62) - 1)
    n = sum(v.size for v in params.values())
    core = CoordinatorCore(Topics(cfg.federation.name), params, cfg.round, hyper=cfg.train,
                           incarnation=incarnation, seed=cfg.coordinator.seed,
                           strategy_factory=strategy_factory_from(cfg, n), screen=screen_from(cfg),
                           verifier=verifier_from(cfg))
    service = CoordinatorService(core, cfg.broker.url, credentials=credentials_from(cfg.broker, cfg.coordinator.client_id),
                                 client_id=cfg.coordinator.client_id, keepalive=cfg.broker.keepalive,
                                 tick_interval=cfg.coordinator.tick_interval, state_dir=cfg.coordinator.state_dir,
                                 takeover=getattr(a, "takeover", False))
    if service.journal is not None:  # what `fedsync audit` replays (fedsync/lab/audit.py)
        service.journal.note_strategy(cfg.strategy.name, dict(cfg.strategy_options))
    stop = threading.Event()
    service.on_event = lambda e: stop.set() if core.finished else None
    threading.Thread(target=lambda: (service.done.wait(), stop.set()), daemon=True).start()
    log_event(log, "coordinator_start", broker=cfg.broker.url, federation=cfg.federation.name,
              model=m.init or m.kind, tensors=len(params), params=core.vector.size, rounds=cfg.round.rounds)
    service.start()
    metrics = None
    if a.metrics_port is not None:
        from fedsync.coordinator.metrics import serve_metrics

        try:
            metrics = serve_metrics(service, a.metrics_port)
        except OperatorError:  # the port is taken: leave the broker cleanly before main prints the line
            service.stop()
            raise
        log_event(log, "metrics_serving", url=f"http://127.0.0.1:{metrics.port}/metrics")
    wait_for_signal(stop)
    service.stop()
    if metrics is not None:
        metrics.stop()
    if service.conflict is not None:
        print(f"fedsync coordinator: {service.conflict}", file=sys.stderr)
        return 1
    if service.failed is not None:
        return 1  # logged with its traceback by the service; the broker has fired our last will
    s = core.stats
    log_event(log, "coordinator_stop", rounds_committed=s.rounds_committed, rounds_abandoned=s.rounds_abandoned,
              updates_accepted=s.updates_accepted, duplicates_dropped=s.duplicates_dropped,
              shards_rejected=s.shards_rejected)
    return 0


def initial_model(spec: str, config_path: str | None) -> dict:
    """``[model] init``: named float32 arrays from ``module:function``, a .npz or a .safetensors
    file (fedsync/plugins.py); a mistake is one line, exit 2. The round manifest carries
    their names and shapes (``param_spec``); an agent checks its trainer's result against them
    before it uploads (fedsync.plugins.SpecCheckedTrainer)."""
    import os

    from fedsync.plugins import PluginError, load_initial_model

    search = ([os.path.dirname(os.path.abspath(config_path))] if config_path else []) + ["."]
    try:
        return load_initial_model(spec, search)
    except PluginError as err:
        raise OperatorError(str(err), code=2) from None


@dataclass(frozen=True, slots=True)
class _StatusConfig:
    """``fedsync status`` reads only the ``[broker]`` section of a config file."""

    broker: BrokerSection = BrokerSection()

    checks: ClassVar[Checks] = Checks(BROKER_FIELDS, BROKER_FILES)


def cmd_status(a: argparse.Namespace) -> int:
    import secrets
    import time

    from fedsync.errors import ProtocolError
    from fedsync.messages import PeerStatus, RoundManifest, decode
    from fedsync.topics import Topics
    from fedsync.transport.mqtt import MqttLink

    cfg = load_config(_StatusConfig, a.config, broker_overrides(a))
    configure(a.log_level or "warning")
    topics = Topics(a.federation)
    seen: dict[str, bytes] = {}
    client_id = f"fedsync-status-{secrets.token_hex(3)}"
    link = MqttLink(client_id, cfg.broker.url, on_message=lambda t, p, _tok: seen.__setitem__(t, p),
                    credentials=credentials_from(cfg.broker, None), clean_session=True,
                    keepalive=cfg.broker.keepalive)
    link.subscribe(topics.manifest, 1)
    link.subscribe(topics.status_filter, 1)
    link.subscribe(topics.coordinator_status, 1)
    link.start()
    if not link.wait_connected(10):
        print(f"fedsync status: cannot connect to {cfg.broker.url} ({link.last_refusal or 'no answer'})", file=sys.stderr)
        link.stop(disconnect=False)
        return 1
    time.sleep(a.wait)
    link.stop()
    out = []
    for topic, payload in sorted(seen.items()):
        if not payload:
            continue
        try:
            if topic == topics.manifest:
                m: RoundManifest = decode(payload, RoundManifest)
                out.append(f"manifest: round {m.round_id} {m.state}, model v{m.model_version} "
                           f"({m.num_params} params, {m.model_shards} shards, codec {m.update_codec}), "
                           f"selected {len(m.selected)}, target {m.target}, quorum {m.quorum}")
            elif topic == topics.coordinator_status:
                s = decode(payload, PeerStatus)
                out.append(f"coordinator: {s.state} (incarnation {s.incarnation})")
            elif topic.startswith(topics.root + "/status/"):
                s = decode(payload, PeerStatus)
                out.append(f"device {s.peer}: {s.state}")
        except ProtocolError as err:
            out.append(f"{topic}: undecodable ({err})")
    if not out:
        out.append(f"no retained fedsync state for federation {a.federation!r}")
    print("\n".join(out))
    return 0
