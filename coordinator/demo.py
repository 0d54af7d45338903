"""``fedsync demo``: a whole federation on loopback, with a progress bar and a summary.

Starts a broker (the embedded amqtt by default, or a managed mosquitto), a
coordinator and N device agents in this process (each device with its own
MQTT connection, client id, password and last will), runs R rounds of FedAvg
on FedProx's Synthetic(alpha, beta) data and compares the final global model
with softmax regression trained centrally on the union of the devices'
training data.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from broker_config.process import BrokerProcess
from coordinator.core import RoundPolicy
from coordinator.federation import LocalFederation, RoundRecord, make_users
from device_agent.data import union
from device_agent.trainer import DEFAULT_HYPER, centralised_baseline


@dataclass(frozen=True, slots=True)
class DemoOptions:
    devices: int = 10
    rounds: int = 20
    seed: int = 0
    broker_kind: str = "amqtt"
    broker_url: str | None = None  # use a running broker instead (users must exist on it)
    update_codec: str = "zstd"
    json: bool = False
    plot: str | None = None
    kill: int = 0  # devices to kill (socket dropped, no DISCONNECT) after the first round
    timeout: float = 300.0


def run_demo(opts: DemoOptions) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    users = make_users(opts.devices)
    policy = RoundPolicy(rounds=opts.rounds, target=opts.devices, quorum=max(1, (opts.devices + 1) // 2),
                         min_devices=opts.devices, round_timeout=30.0, update_codec=opts.update_codec)
    broker = None if opts.broker_url else BrokerProcess(opts.broker_kind, users=users)
    started = time.perf_counter()
    try:
        if broker is not None:
            with console.status(f"starting {opts.broker_kind} broker on 127.0.0.1"):
                broker.start()
        url = opts.broker_url or broker.url  # type: ignore[union-attr]
        progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console)
        task = progress.add_task("rounds", total=opts.rounds, last="")

        def on_round(rec: RoundRecord) -> None:
            acc = f"acc={rec.accuracy:.3f}" if rec.accuracy is not None else rec.outcome
            progress.update(task, advance=1 if rec.outcome == "committed" else 0,
                            last=f"round {rec.round_id}: {rec.accepted}/{rec.selected} devices, {acc}")

        fed = LocalFederation(url, users, n_devices=opts.devices, seed=opts.seed, policy=policy, on_round=on_round)
        killed: list[str] = []
        with progress:
            fed.start()
            if opts.kill:
                while not fed.records and time.perf_counter() - started < opts.timeout:
                    time.sleep(0.05)
                for device in list(fed.hosts)[-opts.kill:]:
                    fed.kill_device(device)
                    killed.append(device)
            finished = fed.wait(opts.timeout)
            summary = fed.summary()  # before stop(): a clean shutdown is not a drop-out
        fed.stop()
    finally:
        if broker is not None:
            broker.stop()
    wall = time.perf_counter() - started
    x_train, y_train, _, _ = union(fed.data)
    with console.status("training the centralised baseline"):
        central = centralised_baseline(fed.model, x_train, y_train, DEFAULT_HYPER, seed=opts.seed)
    from fedsync.params import flatten

    summary.update(
        finished=finished,
        centralised_accuracy=fed.accuracy(flatten(central, fed.spec)),
        devices=opts.devices,
        devices_killed=killed,
        broker=opts.broker_url or opts.broker_kind,
        wall_seconds=round(wall, 3),
    )
    if opts.plot:
        _plot(summary, opts.plot)
    _print_summary(console, summary)
    if opts.json:
        print(json.dumps(summary))
    return summary


def _print_summary(console, s: dict) -> None:
    from rich.table import Table

    t = Table(title="fedsync demo", show_header=False)
    fa, ca = s["final_accuracy"], s["centralised_accuracy"]
    rows = [
        ("rounds committed / abandoned", f"{s['rounds_completed']} / {s['rounds_abandoned']}"),
        ("final accuracy (federated)", f"{fa:.4f}" if fa is not None else "-"),
        ("centralised accuracy (same model, pooled data)", f"{ca:.4f}"),
        ("gap (percentage points)", f"{100 * (ca - fa):+.2f}" if fa is not None else "-"),
        ("updates accepted", str(s["updates_accepted"])),
        ("duplicate shards dropped", str(s["duplicates_dropped"])),
        ("shards rejected", str(s["shards_rejected"])),
        ("bytes up / down", f"{s['bytes_up']:,} / {s['bytes_down']:,}"),
        ("devices offline detected (last will)", str(s["devices_offline_detected"])),
        ("wall time", f"{s['wall_seconds']:.1f} s"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    accs = summary["accuracy_per_round"]
    ax.plot(range(1, len(accs) + 1), accs, marker="o", label="federated (over MQTT)")
    ax.axhline(summary["centralised_accuracy"], color="grey", linestyle="--", label="centralised")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
