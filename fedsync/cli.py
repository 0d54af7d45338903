"""The ``fedsync`` command line (argparse: the device install stays small).

Sub-commands: broker, coordinator, agent, status, demo. Each service reads
one TOML file (``--config``); flags override it. Passwords come from files,
never from the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
import traceback
from typing import ClassVar

from fedsync.config import (BROKER_FIELDS, BROKER_FILES, BrokerSection, Checks, ConfigError, credentials_from,
                            load_config)
from fedsync.errors import OperatorError
from fedsync.log import LOG_LEVELS, configure, log_event

log = logging.getLogger("fedsync.cli")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedsync")
    except PackageNotFoundError:  # a checkout on sys.path that was never installed
        return "unknown (not installed)"


# The names of fedsync.chaos.PROFILES, written out so that --help need not import the proxy;
# tests/test_operator_errors.py checks that the two lists agree.
CHAOS_PROFILES = ("clean", "wifi-flaky", "cellular-3g", "blackout")


def _broker_flags(p: argparse.ArgumentParser, user: str, log_level: str = "from config, info") -> None:
    p.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS "
                   "(default: from config, mqtt://127.0.0.1:1883)")
    p.add_argument("--username", help=f"broker user name (default: {user})")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the broker password (default: from config, none)")
    p.add_argument("--ca-file", metavar="FILE", help="CA bundle that verifies the broker's TLS certificate "
                   "(default: from config, none: the system's CAs)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: none, every key at its default)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help=f"debug also shows tracebacks (default: {log_level})")


def _broker_overrides(a: argparse.Namespace) -> dict:
    return {"broker.url": a.broker, "broker.username": a.username,
            "broker.password_file": a.password_file, "broker.ca_file": a.ca_file}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsync", description="Federated-learning parameter sync over MQTT.")
    parser.add_argument("--version", action="version", version=f"fedsync {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded amqtt broker (demos and labs; mosquitto in the field)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=1883, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--users", metavar="FILE",
                   help="file of 'name:password' lines (default: none, anyone who reaches the port may log in)")
    p.add_argument("--acl-federation", metavar="NAME", help="with --users: enforce the fedsync topic ACL for this "
                   "federation; every user but 'coordinator' and 'monitor' is a device, whose client id must equal "
                   "its user name (default: none, no ACL)")

    p = sub.add_parser("broker-config", help="render a ready mosquitto setup (TLS, passwords, ACL)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("coordinator", help="run the coordinator")
    _broker_flags(p, user="from config, else the client id 'coordinator'")
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
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on "
                   "http://127.0.0.1:PORT/metrics (TCP port; default: none, no metrics)")
    p.add_argument("--takeover", action="store_true",
                   help="start even if another coordinator of this federation is online; the old one stands down")

    p = sub.add_parser("agent", help="run one device agent (built-in synthetic data)")
    _broker_flags(p, user="from config, else the device id")
    p.add_argument("--device-id", metavar="ID",
                   help="this device's id, also its MQTT client id (default: from config; required)")
    p.add_argument("--federation", metavar="NAME",
                   help="federation name, the topic root fedsync/NAME/ (default: from config, demo)")
    p.add_argument("--state-dir", metavar="DIR", help="persistent outbox: uploads resume after a restart "
                   "(default: from config, none: in memory only)")
    p.add_argument("--data-index", type=int, metavar="N", help="which synthetic data slice to train on, "
                   "0 <= N < data.num_devices (default: from config, else taken from the device id)")
    p.add_argument("--once", action="store_true",
                   help="exit after the campaign finishes instead of waiting for the next one")

    p = sub.add_parser("status", help="print the retained manifest and device presence")
    _broker_flags(p, user="from config, none", log_level="warning")
    p.add_argument("--federation", default="demo", metavar="NAME", help="federation to look at (default: %(default)s)")
    p.add_argument("--wait", type=float, default=1.5, metavar="SECONDS",
                   help="time to collect retained messages (seconds; default: %(default)s)")

    p = sub.add_parser("chaos", help="fault-injecting TCP proxy between agents and broker", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("fieldtest", help="the federation through a chaos proxy, with crashes; writes a report")
    p.add_argument("--devices", type=int, default=20, metavar="N", help="device agents (count; default: %(default)s)")
    p.add_argument("--rounds", type=int, default=15, metavar="N",
                   help="committed rounds to run (count; default: %(default)s)")
    p.add_argument("--profile", default="wifi-flaky", choices=CHAOS_PROFILES,
                   help="chaos link profile, described in docs/chaos.md (default: %(default)s)")
    p.add_argument("--kill-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of devices killed mid-upload and restarted (0 to 1; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the selection and the link faults "
                   "(default: %(default)s)")
    p.add_argument("--out", default="fieldtest-report", metavar="DIR",
                   help="directory for report.json and the plots (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line of stdout")

    p = sub.add_parser("demo", help="run a whole federation on loopback")
    p.add_argument("--devices", type=int, default=10, metavar="N", help="device agents (count; default: %(default)s)")
    p.add_argument("--rounds", type=int, default=20, metavar="N",
                   help="committed rounds to run (count; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the selection (default: %(default)s)")
    p.add_argument("--broker-kind", choices=["amqtt", "mosquitto"], default="amqtt",
                   help="broker to start on loopback (default: %(default)s)")
    p.add_argument("--mode", choices=["sync", "async", "semisync"], default="sync",
                   help="async: run sync and FedBuff with 30%% of devices 5x slower and compare wall times "
                   "(default: %(default)s)")
    p.add_argument("--slow", type=int, metavar="N", help="devices that are --slow-factor times slower "
                   "(count; default: 30%% of --devices with --mode async, else 0)")
    p.add_argument("--slow-factor", type=float, default=5.0, metavar="X",
                   help="how many times slower a slow device trains (factor; default: %(default)s)")
    p.add_argument("--codec", default="zstd", help="update codec, e.g. zstd, raw, fp16, int8, topk; "
                   "all names in docs/protocol.md (default: %(default)s)")
    p.add_argument("--kill", type=int, default=0, metavar="N",
                   help="devices to kill after the first round (count; default: %(default)s)")
    p.add_argument("--plot", metavar="FILE", help="write accuracy per round as a PNG here (default: none, no plot)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line of stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 1 trouble at run time, 2 a config or usage error, 130 Ctrl-C.

    A mistake of the operator's is one line per problem on stderr, ``fedsync <command>: ...``;
    the traceback only with ``--log-level debug``.
    """
    try:
        code = _run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a reader that went away (| head) shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The Python docs' recipe (signal module, "Note on SIGPIPE"): what is still buffered goes to
        # devnull, so the flush at exit cannot fail a second time with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: list[str]) -> int:
    if argv[:1] in (["broker-config"], ["chaos"]):  # their own parsers, including -h
        return cmd_broker_config_argv(argv[1:]) if argv[0] == "broker-config" else cmd_chaos_argv(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed --help, --version or the usage error
        return exc.code if isinstance(exc.code, int) else 0
    command = args.command
    debug = getattr(args, "log_level", None) == "debug"
    try:
        return _COMMANDS[command](args)
    except ConfigError as exc:
        if debug:
            traceback.print_exc()
        for problem in exc.problems:
            print(f"fedsync {command}: config error: {problem}", file=sys.stderr)
        return 2
    except OperatorError as exc:
        if debug:
            traceback.print_exc()
        print(f"fedsync {command}: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


def _wait_for_signal(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def cmd_broker(a: argparse.Namespace) -> int:
    import tempfile

    from broker_config.embedded import run_embedded, write_password_file

    configure("info")
    if a.users is None:
        log_event(log, "anonymous_broker", logging.WARNING, note="no --users: anyone who reaches the port may connect")
        run_embedded(a.host, a.port, None)
        return 0
    try:
        lines = open(a.users).read().splitlines()
    except OSError as exc:
        raise ConfigError(f"users: cannot read {a.users}: {exc.strerror} (command line)") from None
    users = {}
    for n, line in enumerate(lines, 1):
        if line.strip() and not line.startswith("#"):
            name, sep, pw = line.partition(":")
            if not sep:
                raise ConfigError(f"{a.users}:{n}: expected 'name:password'")
            users[name.strip()] = pw.strip()
    with tempfile.TemporaryDirectory() as d:
        write_password_file(f"{d}/passwd", users)
        if a.acl_federation:
            import asyncio

            from broker_config.acl import amqtt_acl
            from broker_config.amqtt_auth import _serve, secured_config
            from broker_config.embedded import _configure_logging

            _configure_logging()
            devices = sorted(u for u in users if u not in ("coordinator", "monitor"))
            config = secured_config(a.host, a.port, f"{d}/passwd", amqtt_acl(a.acl_federation, devices))
            asyncio.run(_serve(config, a.host, a.port))
        else:
            run_embedded(a.host, a.port, f"{d}/passwd")
    return 0


def cmd_broker_config_argv(rest: list[str]) -> int:
    from broker_config.render import main as render_main

    return render_main(rest)


def cmd_chaos_argv(rest: list[str]) -> int:
    from fedsync.chaos import main as chaos_main

    return chaos_main(rest)


def cmd_broker_config(a: argparse.Namespace) -> int:
    from broker_config.render import main as render_main

    return render_main(a.rest)


def cmd_coordinator(a: argparse.Namespace) -> int:
    from fedsync.memtune import keep_freed_memory

    keep_freed_memory()  # before numpy and the MQTT thread start: see fedsync/memtune.py
    import random
    import time

    import numpy as np

    from coordinator.config import CoordinatorConfig, strategy_factory_from, verifier_from
    from coordinator.core import CoordinatorCore
    from coordinator.hardening import UpdateScreen
    from coordinator.service import CoordinatorService
    from device_agent.models import build_model
    from fedsync.topics import Topics

    cfg = load_config(CoordinatorConfig, a.config, {
        **_broker_overrides(a), "federation.name": a.federation, "round.rounds": a.rounds,
        "round.target": a.target, "round.quorum": a.quorum, "round.min_devices": a.min_devices,
        "round.round_timeout": a.round_timeout, "coordinator.log_level": a.log_level,
        "coordinator.state_dir": a.state_dir, "round.mode": a.mode, "strategy.name": a.strategy})
    configure(cfg.coordinator.log_level)
    m = cfg.model
    model = build_model(m.kind, m.dim, m.classes, m.hidden)
    params = model.init_params(np.random.default_rng(m.seed))
    incarnation = time.time_ns() & ((1 << 62) - 1)
    n = sum(v.size for v in params.values())
    screen = UpdateScreen(cfg.hardening.max_update_norm, cfg.hardening.max_num_samples)
    core = CoordinatorCore(Topics(cfg.federation.name), params, cfg.round, hyper=cfg.train,
                           incarnation=incarnation, seed=cfg.coordinator.seed,
                           strategy_factory=strategy_factory_from(cfg, n), screen=screen.check,
                           verifier=verifier_from(cfg))
    service = CoordinatorService(core, cfg.broker.url, credentials=credentials_from(cfg.broker, cfg.coordinator.client_id),
                                 client_id=cfg.coordinator.client_id, keepalive=cfg.broker.keepalive,
                                 tick_interval=cfg.coordinator.tick_interval, state_dir=cfg.coordinator.state_dir,
                                 takeover=getattr(a, "takeover", False))
    stop = threading.Event()
    service.on_event = lambda e: stop.set() if core.finished else None
    threading.Thread(target=lambda: (service.done.wait(), stop.set()), daemon=True).start()
    log_event(log, "coordinator_start", broker=cfg.broker.url, federation=cfg.federation.name,
              params=core.vector.size, rounds=cfg.round.rounds)
    service.start()
    metrics = None
    if a.metrics_port is not None:
        from coordinator.metrics import serve_metrics

        try:
            metrics = serve_metrics(service, a.metrics_port)
        except OperatorError:  # the port is taken: leave the broker cleanly before main prints the line
            service.stop()
            raise
        log_event(log, "metrics_serving", url=f"http://127.0.0.1:{metrics.port}/metrics")
    _wait_for_signal(stop)
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


def cmd_agent(a: argparse.Namespace) -> int:
    from device_agent.config import AgentConfig
    from device_agent.data import synthetic_federation
    from device_agent.models import build_model
    from device_agent.service import AgentHost, DeviceSpec
    from device_agent.trainer import NumpyTrainer
    from fedsync.topics import Topics

    cfg = load_config(AgentConfig, a.config, {**_broker_overrides(a), "agent.device_id": a.device_id,
                                              "federation.name": a.federation, "agent.log_level": a.log_level,
                                              "agent.state_dir": a.state_dir, "data.index": a.data_index})
    configure(cfg.agent.log_level)
    device_id = cfg.agent.device_id
    if not device_id:
        raise ConfigError("agent.device_id: required (--device-id or [agent] device_id)")
    d = cfg.data
    index = d.index if d.index is not None else default_data_index(device_id, d.num_devices)
    if not 0 <= index < d.num_devices:
        raise ConfigError(f"data.index: {index} not in [0, {d.num_devices})")
    data = synthetic_federation(d.alpha, d.beta, num_devices=d.num_devices, seed=d.seed)[index]
    trainer = NumpyTrainer(build_model(d.model, data.x_train.shape[1], 10, d.hidden), data)
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
                     state_dir=cfg.agent.state_dir, indices={device_id: index})
    log_event(log, "agent_start", device=device_id, broker=cfg.broker.url, data_index=index, samples=data.num_train,
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
    _wait_for_signal(stop)
    if host.failed is not None:
        return 1  # logged with its traceback by the host; the broker has fired the last will
    host.stop()
    log_event(log, "agent_stop", device=device_id, **host.stats())
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


def cmd_status(a: argparse.Namespace) -> int:
    import secrets
    import time

    from fedsync.errors import ProtocolError
    from fedsync.messages import PeerStatus, RoundManifest, decode
    from fedsync.mqtt import MqttLink
    from fedsync.topics import Topics

    cfg = load_config(_StatusConfig, a.config, _broker_overrides(a))
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


def cmd_chaos(a: argparse.Namespace) -> int:
    from fedsync.chaos import main as chaos_main

    return chaos_main(a.rest)


def cmd_fieldtest(a: argparse.Namespace) -> int:
    from coordinator.fieldtest import FieldtestOptions, run_fieldtest

    configure("warning")
    report = run_fieldtest(FieldtestOptions(devices=a.devices, rounds=a.rounds, profile=a.profile,
                                            kill_fraction=a.kill_fraction, seed=a.seed, out=a.out, json=a.json))
    return 0 if report["summary"]["finished"] else 1


def cmd_demo(a: argparse.Namespace) -> int:
    from coordinator.demo import DemoOptions, run_demo

    configure("warning")
    summary = run_demo(DemoOptions(devices=a.devices, rounds=a.rounds, seed=a.seed, broker_kind=a.broker_kind,
                                   update_codec=a.codec, json=a.json, plot=a.plot, kill=a.kill, mode=a.mode,
                                   slow=a.slow, slow_factor=a.slow_factor))
    return 0 if summary["finished"] else 1


from dataclasses import dataclass  # noqa: E402


@dataclass(frozen=True, slots=True)
class _StatusConfig:
    broker: BrokerSection = BrokerSection()

    checks: ClassVar[Checks] = Checks(BROKER_FIELDS, BROKER_FILES)


_COMMANDS = {"broker": cmd_broker, "broker-config": cmd_broker_config, "coordinator": cmd_coordinator, "agent": cmd_agent,
             "status": cmd_status, "chaos": cmd_chaos, "fieldtest": cmd_fieldtest, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
