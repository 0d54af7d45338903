"""``fedsync demo``: a whole federation on loopback, with a progress bar (stderr) and a summary (stdout).

Starts a broker (the embedded amqtt by default, or a managed mosquitto), a
coordinator and N device agents in this process (each device with its own
MQTT connection, client id, password and last will), runs R rounds on
FedProx's Synthetic(alpha, beta) data and compares the final global model with
softmax regression trained centrally on the union of the devices' training data.

``--mode async`` answers the question async exists for: with heterogeneous
devices (some 5x slower), does FedBuff reach the synchronous run's accuracy in
less wall time? It runs the synchronous federation first, then the
asynchronous one until it reaches the same accuracy, and prints both times.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

from fedsync.broker_config.process import BrokerProcess
from fedsync.coordinator.hardening import UpdateScreen
from fedsync.coordinator.core import RoundPolicy
from fedsync.lab.federation import LocalFederation, RoundRecord, device_ids, make_users
from fedsync.coordinator.strategies import FedAdam
from fedsync.lab.summary import number, print_summary
from fedsync.synthetic import union
from fedsync.trainer_api import DEFAULT_HYPER
from fedsync.device_agent.trainer import centralised_baseline
from fedsync.models import SoftmaxRegression
from fedsync.params import flatten
from fedsync.reference import DEFAULT_L2, DEFAULT_TOL, fit_softmax_regression


@dataclass(frozen=True, slots=True)
class DemoOptions:
    devices: int = 10
    rounds: int | None = None  # None: DEMO_ROUNDS, or ASYNC_SYNC_ROUNDS with mode async
    seed: int = 0
    mode: str = "sync"
    broker_kind: str = "amqtt"
    broker_url: str | None = None  # use a running broker instead (users must exist on it)
    update_codec: str = "zstd"
    json: bool = False
    plot: str | None = None
    kill: int = 0  # devices to kill (socket dropped, no DISCONNECT) after the first round
    slow: int | None = None  # devices that are slow_factor x slower (default: 30% in async mode, else 0)
    slow_factor: float = 5.0
    fit_seconds: float = 0.1  # simulated local training time of a fast device when any device is slow
    timeout: float = 300.0


# The demo's training recipe, chosen by benchmarks/demo_recipe.py over seeds 0-9 (docs/benchmarks.md,
# "Demo recipe"): Synthetic(1,1) is strongly label-skewed and one device may hold most of the data, so
# plain FedAvg drifts and oscillates (seed 3 ended 20 points short). FedProx's proximal term (Li et
# al. 2020, mu = 0.01) on 10 full-batch local epochs, FedAdam on the server (Reddi et al. 2021,
# server_lr 0.2) and 80 rounds end within 1.2 points of the centralised reference on every seed 0-9;
# server_lr 0.15-0.3 all stay within 2 points, 0.1 does not (seed 5).
DEMO_HYPER = {"lr": 0.1, "epochs": 10.0, "batch_size": 10000.0, "mu": 0.01}
DEMO_SERVER_LR = 0.2
DEMO_ROUNDS = 80
ASYNC_SYNC_ROUNDS = 20  # --mode async compares plain-FedAvg sync rounds with FedBuff, not this recipe


def run_demo(opts: DemoOptions) -> dict:
    from rich.console import Console

    if opts.rounds is None:
        opts = replace(opts, rounds=ASYNC_SYNC_ROUNDS if opts.mode == "async" else DEMO_ROUNDS)

    console = Console(stderr=True)
    users = make_users(opts.devices)
    broker = None if opts.broker_url else BrokerProcess(opts.broker_kind, users=users)
    started = time.perf_counter()
    try:
        if broker is not None:
            with console.status(f"starting {opts.broker_kind} broker on 127.0.0.1"):
                broker.start()
        url = opts.broker_url or broker.url  # type: ignore[union-attr]
        slow = opts.slow if opts.slow is not None else (round(0.3 * opts.devices) if opts.mode == "async" else 0)
        delays = {}
        if slow:
            delays = {d: opts.fit_seconds for d in device_ids(opts.devices)}
            delays.update({d: opts.fit_seconds * opts.slow_factor for d in device_ids(opts.devices)[-slow:]})
        quorum = max(1, (opts.devices + 1) // 2)
        sync_policy = RoundPolicy(rounds=opts.rounds, target=opts.devices, quorum=quorum, min_devices=opts.devices,
                                  round_timeout=30.0, update_codec=opts.update_codec)
        if opts.mode == "async":
            sync, fed = _run(console, url, users, opts, sync_policy, delays, "sync rounds")
            # FedBuff: aggregate every K = devices/2 updates, (1+s)^-0.5 staleness weights.
            async_policy = replace(sync_policy, mode="async", rounds=10 * opts.rounds, target=max(1, opts.devices // 2),
                                   quorum=1)
            asy, fed = _run(console, url, users, opts, async_policy, delays, "async aggregations",
                            stop_at=sync["final_accuracy"])
            summary = dict(asy, mode="async", sync_final_accuracy=sync["final_accuracy"],
                           sync_wall_seconds=sync["federation_seconds"], sync_rounds=sync["rounds_completed"],
                           async_seconds_to_sync_accuracy=asy["reached_seconds"],
                           async_aggregations=asy["rounds_completed"])
        else:
            summary, fed = _run(console, url, users, opts, replace(sync_policy, mode=opts.mode), delays, "rounds")
            summary["mode"] = opts.mode
    finally:
        if broker is not None:
            broker.stop()
    x_train, y_train, _, _ = union(fed.data)
    with console.status("solving the centralised reference"):
        central, reference = centralised_reference(fed.model, x_train, y_train, opts.seed)
    summary.update(
        centralised_accuracy=fed.accuracy(flatten(central, fed.spec)),
        centralised_reference=reference,
        devices=opts.devices,
        slow_devices=sorted(d for d, s in delays.items() if s > opts.fit_seconds),
        broker=opts.broker_url or opts.broker_kind,
        wall_seconds=round(time.perf_counter() - started, 3),
    )
    if opts.plot:
        _plot(summary, opts.plot)
    _print_summary(summary, stderr=opts.json)  # with --json, stdout is the JSON document alone
    if opts.json:
        print(json.dumps(summary))
    return summary


def centralised_reference(model, x_train, y_train, seed: int) -> tuple[dict, str]:
    """The pooled-data model the summary compares with, and what it is.

    Softmax regression (convex) is solved directly: L2 1e-4, L-BFGS to a largest gradient entry
    below 1e-6 (:mod:`fedsync.reference`). Another model gets the SGD baseline of the devices'
    own trainer (DEFAULT_HYPER, 25,000 epochs from the same initialisation).
    """
    if isinstance(model, SoftmaxRegression):
        params = fit_softmax_regression(x_train, y_train, model.num_classes, l2=DEFAULT_L2, tol=DEFAULT_TOL)
        return params, f"softmax regression, L2 {DEFAULT_L2:g}, L-BFGS to gradient < {DEFAULT_TOL:g}"
    return centralised_baseline(model, x_train, y_train, DEFAULT_HYPER, seed=seed), "SGD, 25,000 epochs"


def _run(console, url: str, users: dict, opts: DemoOptions, policy: RoundPolicy, delays: dict, label: str,
         stop_at: float | None = None) -> tuple[dict, LocalFederation]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console)
    task = progress.add_task(label, total=policy.rounds, last="")

    def on_round(rec: RoundRecord) -> None:
        acc = f"acc={rec.accuracy:.3f}" if rec.accuracy is not None else rec.outcome
        progress.update(task, advance=1 if rec.outcome == "committed" else 0,
                        last=f"round {rec.round_id}: {rec.accepted} updates, {acc}")

    if opts.mode == "async":
        # The sync-vs-FedBuff comparison runs both sides on plain FedAvg (one full-batch step per update):
        # FedAdam's fixed-size normalised steps suit one aggregate per round, not many small stale buffers.
        hyper, factory = dict(DEFAULT_HYPER), None
    else:
        hyper = dict(DEMO_HYPER)
        factory = FedAdam(610, server_lr=DEMO_SERVER_LR).factory()  # long-lived: moments persist across rounds
    # screen: the update bounds the CLI coordinator applies with no configuration (coordinator/hardening.py)
    fed = LocalFederation(url, users, n_devices=opts.devices, seed=opts.seed, policy=policy, on_round=on_round,
                          screen=UpdateScreen(), train_delays=delays, stop_at_accuracy=stop_at, federation=f"demo-{policy.mode}",
                          hyper=hyper, strategy_factory=factory)
    killed: list[str] = []
    t0 = time.perf_counter()
    with progress:
        fed.start()
        if opts.kill:
            while not fed.records and time.perf_counter() - t0 < opts.timeout:
                time.sleep(0.05)
            for device in list(fed.hosts)[-opts.kill:]:
                fed.kill_device(device)
                killed.append(device)
        finished = fed.wait(opts.timeout)
        elapsed = time.perf_counter() - t0
        summary = fed.summary()  # before stop(): a clean shutdown is not a drop-out
    fed.stop()
    summary.update(finished=finished, devices_killed=killed, federation_seconds=round(elapsed, 3),
                   reached_seconds=round(fed.reached_at, 3) if fed.reached_at is not None else None)
    return summary, fed


def _print_summary(s: dict, stderr: bool = False) -> None:
    fa, ca = s["final_accuracy"], s["centralised_accuracy"]
    rows = [
        ("Rounds committed / abandoned", f"{s['rounds_completed']} / {s['rounds_abandoned']}"),
        ("Final accuracy (federated)", number(fa)),
        ("Centralised accuracy (same model, pooled data)", number(ca)),
        ("Gap (percentage points)", f"{100 * (ca - fa):+.2f}" if fa is not None else "-"),
    ]
    if s["mode"] == "async":
        reached = s["async_seconds_to_sync_accuracy"]
        rows += [
            ("Slow devices (5x)", ", ".join(s["slow_devices"]) or "-"),
            ("Sync: rounds, final accuracy, wall time",
             f"{s['sync_rounds']}, {s['sync_final_accuracy']:.4f}, {s['sync_wall_seconds']:.1f} s"),
            ("Async: time to the sync accuracy",
             f"{reached:.1f} s ({s['sync_wall_seconds'] / reached:.1f}x faster)" if reached else "not reached"),
        ]
    rows += [
        ("Updates accepted", number(s["updates_accepted"])),
        ("Duplicate shards dropped", number(s["duplicates_dropped"])),
        ("Shards rejected", number(s["shards_rejected"])),
        ("Bytes up / down", f"{number(s['bytes_up'])} / {number(s['bytes_down'])}"),
        ("Devices offline detected (last will)", number(s["devices_offline_detected"])),
        ("Wall time", f"{s['wall_seconds']:.1f} s"),
    ]
    print_summary(f"fedsync demo ({s['mode']})", rows, stderr=stderr)


def _plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    accs = summary["accuracy_per_round"]
    ax.plot(range(1, len(accs) + 1), accs, marker="o", label=f"federated over MQTT ({summary['mode']})")
    ax.axhline(summary["centralised_accuracy"], color="grey", linestyle="--", label="centralised")
    ax.set_xlabel("round" if summary["mode"] != "async" else "aggregation")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
