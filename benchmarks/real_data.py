"""Real data: FedAvg, FedProx and the update codecs on scikit-learn's handwritten digits.

What is measured
----------------
The two projects ``fedsync new DIR --framework sklearn|pytorch`` writes, unchanged, are the
models: *sklearn* (``SGDClassifier`` log-loss through :mod:`fedsync.adapters.sklearn`, 650
values) and *cnn* (the pytorch template's ``DigitsCNN`` through :mod:`fedsync.adapters.torch`,
6,154 values). Each is loaded with :func:`fedsync.lab.project.load_project` as
``fedsync demo --project`` loads it: its initial model, its trainer factory, its
``coordinator.toml`` round policy, ``[train]`` hyper-parameters and strategy (FedAvg), its
``global_accuracy`` (on the union of the devices' test splits) and its ``centralised_accuracy``.
Only ``[trainer] alpha`` and ``seed`` (the Dirichlet split, in ``section``), ``[train] mu``
(FedProx) and ``[round] update_codec`` change from run to run.

Every run: 10 devices, Dirichlet(alpha) label skew, 30 rounds, every device in every round,
seeds 0-2 (the seed is the partition's, and that of the devices' fits, ``default_rng([seed,
device index, round])`` as ``AgentHost`` seeds them). Reported per run: final accuracy,
the mean of the last 5 rounds, and ``bytes_up``: every ``UpdateShard`` CBOR payload the
devices' agents published, as :class:`~fedsync.device_agent.agent.AgentCore` counts them.

Baselines, all measured in the same run: for accuracy, the centralised model (the
project's own ``centralised_accuracy(section)``: the same trainer class and optimiser on the
union of the devices' training splits, from the same initial model, for rounds x local
epochs passes: 90 for sklearn, 60 for the CNN); for a codec's accuracy loss, the zstd
(lossless) run of the same model, alpha and seed; for bytes, raw fp32: each published
update shard re-encoded with the ``raw`` codec (the same envelope, ids, digests and
metrics; data 4 bytes a value), counted in the same run.

Theory of operation
-------------------
:func:`replay` runs the federation in memory with the real sans-IO cores: one
:class:`~fedsync.coordinator.core.CoordinatorCore` (the project's policy, strategy and
hyper-parameters, and the update screen of its ``[hardening]``, as ``fedsync demo --project``
runs them) and one :class:`~fedsync.device_agent.agent.AgentCore` per device, exchanging their
actions through :class:`MemoryBroker` (retained messages, ``+``/``#`` filters, in-order
delivery; no sockets; the clock stands still, and jumps to a round's deadline only when
nothing is left to do). So shards, digests, error feedback, reassembly, the screen and the
coordinator's exact float32 step are the production code; only MQTT is missing. Updates are folded in device order. Each fit runs when no message is in
flight, wrapped in :class:`~fedsync.plugins.SpecCheckedTrainer` and checked by
``check_fit``, as the agent host does. Unless ``--no-broker``, the template as written
(alpha 0.5, seed 0, FedAvg) also runs as ``fedsync demo --project DIR --json`` over
mosquitto, with zstd for both models and with topk for the CNN, and its accuracy per round
and ``bytes_up`` are compared with the replay's. Whether rounds x local epochs is enough
for the centralised model is checked at seed 0 by training it for twice as many epochs.

Error feedback is the codec's flag (``Codec.error_feedback``, what the agent keys on): every
top-k codec has it, ``int8`` has not. After each run the devices holding a residual
(``AgentCore.feedback``) are counted; a run where that is not 10 with the flag on and 0 with
it off is refused. ``topk0.2``, ``topk0.05`` and ``topk0.02`` are registered here (in this
process only) for the CNN's frontier.

    python benchmarks/real_data.py                    # everything (~11 min at load 2-5)
    python benchmarks/real_data.py --quick            # seed 0, alpha 0.5, 5 rounds, 3 arms per model
    python benchmarks/real_data.py --no-broker --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import common  # noqa: F401  (puts the checkout on sys.path)
import numpy as np
from common import environment, print_table

MODELS = {"sklearn": "sklearn", "cnn": "pytorch"}  # benchmark name -> fedsync new --framework
DEVICES, ROUNDS, ALPHAS, SEEDS, LAST = 10, 30, (0.5, 0.1), (0, 1, 2), 5
MU = 0.01  # FedProx: fedsync demo's value (benchmarks/demo_recipe.py), not tuned on digits
MU_CHECK = (0.1, 1.0)  # sensitivity, seed 0 and alpha 0.1 only, reported beside the table, never selected from
EXTRA_TOPK = (0.2, 0.05, 0.02)  # top-k fractions registered here for the CNN's frontier
GOAL_RATIO, GOAL_POINTS = 10.0, 0.5  # bytes up <= 1/10 of raw fp32 at <= 0.5 points lost


@dataclass(frozen=True)
class Arm:
    model: str
    alpha: float
    method: str  # "fedavg" | "fedprox"
    codec: str
    mu: float = 0.0
    seeds: tuple = SEEDS


def arms(quick: bool) -> list[Arm]:
    """What runs: per model and alpha FedAvg and FedProx with zstd, FedAvg with int8, topk and
    topk1; the mu check; the CNN's extra top-k fractions at both alphas."""
    if quick:
        return [Arm(m, 0.5, method, codec, MU if method == "fedprox" else 0.0, (0,)) for m in MODELS
                for method, codec in (("fedavg", "zstd"), ("fedprox", "zstd"), ("fedavg", "topk"))]
    out = []
    for model in MODELS:
        for alpha in ALPHAS:
            out += [Arm(model, alpha, "fedavg", "zstd"), Arm(model, alpha, "fedprox", "zstd", MU)]
            out += [Arm(model, alpha, "fedavg", c) for c in ("int8", "topk", "topk1")]
        out += [Arm(model, 0.1, "fedprox", "zstd", mu, (0,)) for mu in MU_CHECK]
    out += [Arm("cnn", alpha, "fedavg", f"topk{f}") for alpha in ALPHAS for f in EXTRA_TOPK]
    return out


@dataclass
class Run:
    model: str
    alpha: float
    method: str
    codec: str
    mu: float
    seed: int
    accuracy_per_round: list
    bytes_up: int
    raw_bytes_up: int
    updates: int
    refused: int  # by the coordinator's update screen ([hardening], as fedsync demo --project runs it)
    feedback_devices: int
    seconds: float

    @property
    def final(self) -> float:
        return self.accuracy_per_round[-1]

    @property
    def last_mean(self) -> float:
        return statistics.fmean(self.accuracy_per_round[-LAST:])


# -- the in-memory federation ----------------------------------------------------------------------

def topic_matches(flt: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7: ``+`` matches one level, ``#`` the rest."""
    f, t = flt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or part not in ("+", t[i]):
            return False
    return len(f) == len(t)


class MemoryBroker:
    """Retained messages, subscriptions and one FIFO of deliveries; counts update payloads."""

    def __init__(self, topics) -> None:
        self.topics = topics
        self.retained: dict[str, bytes] = {}
        self.subs: dict[str, set[str]] = {"coordinator": {topics.up_filter, topics.status_filter}}
        self.queue: deque = deque()
        self.raw_up = 0  # the same update shards with raw fp32 data

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        from fedsync.messages import UpdateShard, decode, encode

        if topic_matches(self.topics.up_filter, topic):
            shard = decode(payload, UpdateShard)
            self.raw_up += len(encode(replace(shard, codec="raw", data=bytes(4 * shard.length))))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for client, filters in self.subs.items():
            if any(topic_matches(f, topic) for f in filters):
                self.queue.append((client, topic, payload))

    def subscribe(self, client: str, flt: str) -> None:
        self.subs.setdefault(client, set()).add(flt)
        for topic, payload in list(self.retained.items()):
            if topic_matches(flt, topic):
                self.queue.append((client, topic, payload))


def replay(project, section: dict, hyper: dict, codec: str, rounds: int, seed: int) -> tuple[list, int, int, int, int, int]:
    """One federation in memory: ``(accuracy per round, bytes_up, raw bytes_up, updates counted, updates
    refused by the screen, devices with a residual)``. Idle with rounds to go (an update refused, so
    the round waits for its deadline), the clock jumps to the deadline."""
    from fedsync.coordinator.config import screen_from, strategy_factory_from
    from fedsync.coordinator.core import CoordinatorCore, RoundClosed
    from fedsync.device_agent.agent import AgentCore, Train
    from fedsync.device_agent.fit_check import check_fit

    from fedsync.actions import Publish, Subscribe, Unsubscribe
    from fedsync.codecs import get_codec
    from fedsync.messages import PeerStatus, encode
    from fedsync.params import unflatten
    from fedsync.plugins import SpecCheckedTrainer
    from fedsync.topics import Topics

    cfg = project.coordinator
    topics = Topics(cfg.federation.name)
    policy = replace(cfg.round, rounds=rounds, target=DEVICES, min_devices=DEVICES,
                     quorum=max(1, (DEVICES + 1) // 2), update_codec=codec)  # as fedsync demo --project
    num_params = sum(v.size for v in project.initial_params.values())
    core = CoordinatorCore(topics, project.initial_params, policy, hyper=hyper, incarnation=1, seed=seed,
                           strategy_factory=strategy_factory_from(cfg, num_params), screen=screen_from(cfg))
    ids = [f"dev-{i}" for i in range(DEVICES)]
    trainers = {d: SpecCheckedTrainer(project.factory(d, dict(section))) for d in ids}
    agents = {d: AgentCore(d, topics, random.Random(d)) for d in ids}
    broker, trains, accuracy, updates = MemoryBroker(topics), deque(), [], 0
    now = 1000.0

    def run(client: str, actions: list) -> None:
        nonlocal updates
        for a in actions:
            if isinstance(a, Publish):
                broker.publish(a.topic, a.payload, a.retain)
            elif isinstance(a, Subscribe):
                broker.subscribe(client, a.topic_filter)
            elif isinstance(a, Unsubscribe):
                broker.subs[client].discard(a.topic_filter)
            elif isinstance(a, Train):
                trains.append((client, a))
            elif isinstance(a, RoundClosed):
                if a.outcome != "committed":
                    raise RuntimeError(f"round {a.round_id} {a.outcome}: {a.reason}")
                updates += len(a.accepted)
                accuracy.append(float(project.global_accuracy(unflatten(a.vector, core.spec), dict(section))))

    run("coordinator", core.start(now))
    for d in ids:
        run(d, agents[d].on_connect(now))
        broker.publish(topics.status(d), encode(PeerStatus(d, "online")), True)
    while True:
        if broker.queue:
            client, topic, payload = broker.queue.popleft()
            run(client, (core if client == "coordinator" else agents[client]).on_message(topic, payload, now))
        elif trains:
            d, t = trains.popleft()
            index = ids.index(d)
            result = trainers[d].fit(t.params, t.hyper, np.random.default_rng([seed, index, t.round_id]))
            verdict = check_fit(t.params, result)
            if verdict.reason is not None:
                raise RuntimeError(f"{d} round {t.round_id}: {verdict.reason}")
            run(d, agents[d].on_trained(t.round_id, result.params, result.num_samples, verdict.metrics, now))
        elif len(accuracy) < rounds and core.round is not None and now < core.round.manifest.deadline:
            now = core.round.manifest.deadline
            run("coordinator", core.tick(now))
            for d in ids:
                run(d, agents[d].tick(now))
        else:
            break
    if len(accuracy) != rounds:
        raise RuntimeError(f"{len(accuracy)} of {rounds} rounds committed")
    with_residual = sum(a.feedback is not None for a in agents.values())
    want = DEVICES if get_codec(codec).error_feedback else 0
    if with_residual != want:
        raise RuntimeError(f"{codec}: {with_residual} devices hold an error-feedback residual, expected {want}")
    up = sum(a.stats.bytes_up for a in agents.values())
    return accuracy, up, broker.raw_up, updates, core.stats.updates_refused, with_residual


# -- the runs ----------------------------------------------------------------------------------------

def load(folder: Path, framework: str):
    from fedsync.lab.project import load_project, write_project

    target = folder / framework
    if not target.exists():
        write_project(target, framework, name=f"real-{framework}")
    return load_project(target)


def section_for(project, alpha: float, seed: int) -> dict:
    return dict(project.section, devices=DEVICES, alpha=alpha, seed=seed)


def run_arm(project, arm: Arm, seed: int, rounds: int) -> Run:
    hyper = dict(project.coordinator.train, mu=arm.mu)
    t0 = time.perf_counter()
    acc, up, raw, updates, refused, fb = replay(project, section_for(project, arm.alpha, seed), hyper, arm.codec,
                                                rounds, seed)
    return Run(arm.model, arm.alpha, arm.method, arm.codec, arm.mu, seed, acc, up, raw, updates, refused, fb,
               time.perf_counter() - t0)


BROKER_RUNS = (("sklearn", "zstd"), ("cnn", "zstd"), ("cnn", "topk"))  # the template as written; the CNN's goal codec


def over_broker(folder: Path, rounds: int, codec: str) -> dict:
    """``fedsync demo --project DIR --json`` over mosquitto: the template as written (alpha 0.5, seed 0)."""
    out = subprocess.run([sys.executable, "-m", "fedsync.cli", "demo", "--project", str(folder), "--rounds",
                          str(rounds), "--broker-kind", "mosquitto", "--codec", codec, "--json"],
                         capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"fedsync demo --project {folder} exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


CENTRAL_HYPER = {"sklearn": {"lr": 0.05, "epochs": 90}, "cnn": {"lr": 0.1, "epochs": 60, "batch_size": 32}}


def centralised(project, model: str, section: dict, factor: int) -> float:
    """The templates' ``centralised_accuracy`` with ``factor`` times its epochs (CENTRAL_HYPER: theirs),
    to see whether rounds x local epochs passes are enough; factor 1 must equal the template's."""
    from fedsync.datasets import digits_federation
    from fedsync.synthetic import DeviceData, union

    names = project.factory.__globals__  # the project's trainer module (both are named "trainer")
    x, y, xt, yt = union(digits_federation(DEVICES, "dirichlet", section["alpha"], seed=section["seed"]))
    hyper = dict(CENTRAL_HYPER[model], epochs=CENTRAL_HYPER[model]["epochs"] * factor)
    if model == "cnn":
        from fedsync.adapters.torch import TorchTrainer

        judge = TorchTrainer(names["DigitsCNN"](), (x, y), (xt, yt), threads=1)
    else:
        from fedsync.adapters.sklearn import SklearnTrainer

        judge = SklearnTrainer(names["model"](), DeviceData(x, y, xt, yt), classes=range(10))
    fit = judge.fit(project.initial_params, hyper, np.random.default_rng(0))
    return float(judge.evaluate(fit.params).accuracy)


# -- report ------------------------------------------------------------------------------------------

def _mean(values) -> float:
    return statistics.fmean(values)


def _acc(values: list[float]) -> str:
    return " / ".join(f"{v:.4f}" for v in values)


def _pp(values: list[float]) -> str:
    return " / ".join(f"{v:+.2f}" for v in values)


def report(runs: list[Run], central: dict, rounds: int) -> dict:
    """Prints the three tables; returns the goal verdicts."""
    by = {(r.model, r.alpha, r.method, r.codec, r.mu, r.seed): r for r in runs}
    rows = []
    for (model, alpha) in dict.fromkeys((r.model, r.alpha) for r in runs):
        seeds = sorted({r.seed for r in runs if (r.model, r.alpha, r.method, r.codec) == (model, alpha, "fedavg", "zstd")})
        cen = [central[(model, alpha, s)] for s in seeds]
        rows.append([model, alpha, "centralised (union)", _acc(cen), f"{_mean(cen):.4f}", ""])
        for method, mu in (("fedavg", 0.0), ("fedprox", MU)):
            got = [by[(model, alpha, method, "zstd", mu, s)].final for s in seeds if (model, alpha, method, "zstd", mu, s) in by]
            if len(got) == len(seeds):
                label = "FedAvg" if method == "fedavg" else f"FedProx mu={mu:g}"
                rows.append([model, alpha, label, _acc(got), f"{_mean(got):.4f}", f"{100 * (_mean(got) - _mean(cen)):+.2f}"])
    print_table(f"Final accuracy after {rounds} rounds, digits, {DEVICES} devices, Dirichlet(alpha), zstd; per seed "
                f"and mean; gap = mean minus centralised mean (points)",
                ["model", "alpha", "training", "per seed", "mean", "gap (pp)"], rows)
    checks = [r for r in runs if r.method == "fedprox" and r.mu != MU]
    if checks:
        print_table("FedProx mu sensitivity (seed 0, alpha 0.1; not used to pick mu)",
                    ["model", "mu", "final", f"last-{LAST} mean"],
                    [[r.model, f"{r.mu:g}", f"{r.final:.4f}", f"{r.last_mean:.4f}"] for r in checks])
    rows, verdicts = [], {}
    for r0 in runs:
        if r0.method != "fedavg" or r0.seed != min(a.seed for a in runs if (a.model, a.alpha, a.codec) == (r0.model, r0.alpha, r0.codec)):
            continue
        group = [r for r in runs if (r.model, r.alpha, r.method, r.codec) == (r0.model, r0.alpha, "fedavg", r0.codec)]
        base = [by[(r.model, r.alpha, "fedavg", "zstd", 0.0, r.seed)] for r in group]
        loss = [100 * (b.final - r.final) for r, b in zip(group, base)]
        tail = [100 * (b.last_mean - r.last_mean) for r, b in zip(group, base)]
        ratio = [r.bytes_up / r.raw_bytes_up for r in group]
        goal = max(ratio) <= 1 / GOAL_RATIO and _mean(loss) <= GOAL_POINTS
        verdicts[f"{r0.model} alpha {r0.alpha} {r0.codec}"] = {"goal_mean": goal, "goal_every_seed":
                                                            max(ratio) <= 1 / GOAL_RATIO and max(loss) <= GOAL_POINTS}
        rows.append([r0.model, r0.alpha, r0.codec + (" + error feedback" if r0.feedback_devices else ""),
                     f"{_mean([r.bytes_up for r in group]) / r0.updates:,.0f}",
                     f"{_mean([r.raw_bytes_up for r in group]) / r0.updates:,.0f}", f"{_mean(ratio):.4f}",
                     f"{1 / _mean(ratio):.1f}x", _acc([r.final for r in group]), _pp(loss), f"{_mean(loss):+.2f}",
                     f"{_mean(tail):+.2f}", "yes" if goal else "no"])
    print_table("Bytes up per update (mean over seeds) vs raw fp32 re-encoded in the same run; accuracy loss = zstd "
                "run of the same seed minus this run (points, + = worse); FedAvg",
                ["model", "alpha", "update codec", "B/update", "raw B/update", "codec/raw", "raw/codec",
                 "final per seed", "loss per seed", "loss mean", f"last-{LAST} loss mean",
                 f"goal <= 1/{GOAL_RATIO:g}, <= {GOAL_POINTS}"], rows)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seed 0, alpha 0.5, 5 rounds, 3 arms per model")
    ap.add_argument("--no-broker", action="store_true", help="skip the two fedsync demo --project runs over mosquitto")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: sklearn, cnn")
    ap.add_argument("--json", metavar="FILE", help="also write every run here")
    a = ap.parse_args(argv)
    # A SIGTERM (timeout, CI) unwinds like Ctrl-C: the finally below removes the projects' folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from fedsync.codecs import register
    from fedsync.codecs.lossy import topk_codec

    for fraction in EXTRA_TOPK:
        register(topk_codec(fraction))  # coordinator and agents both live in this process
    rounds = 5 if a.quick else ROUNDS
    models = a.models.split(",")
    print(environment(), flush=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fedsync-real-data-"))
    try:
        return measure(a, models, rounds, work, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(a: argparse.Namespace, models: list[str], rounds: int, work: Path, started: float) -> int:
    projects = {m: load(work, MODELS[m]) for m in models}
    runs, central = [], {}
    for arm in [x for x in arms(a.quick) if x.model in models]:
        for seed in arm.seeds:
            r = run_arm(projects[arm.model], arm, seed, rounds)
            runs.append(r)
            print(f"{r.model} alpha {r.alpha} {r.method} mu={r.mu:g} {r.codec} seed {seed}: final {r.final:.4f}, "
                  f"{r.bytes_up:,} B up (raw {r.raw_bytes_up:,}), {r.updates} updates, {r.refused} refused, {r.seconds:.1f} s", flush=True)
    for model, alpha, seed in dict.fromkeys((r.model, r.alpha, r.seed) for r in runs):
        t0 = time.perf_counter()
        p = projects[model]
        central[(model, alpha, seed)] = float(p.centralised_accuracy(section_for(p, alpha, seed)))
        print(f"{model} alpha {alpha} seed {seed}: centralised {central[(model, alpha, seed)]:.4f}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    longer = []
    for model, alpha in dict.fromkeys((r.model, r.alpha) for r in runs if r.seed == 0):
        p, t0 = projects[model], time.perf_counter()
        same, twice = (centralised(p, model, section_for(p, alpha, 0), k) for k in (1, 2))
        if same != central[(model, alpha, 0)]:
            raise RuntimeError(f"{model}: centralised() {same} is not the template's {central[(model, alpha, 0)]}")
        longer.append({"model": model, "alpha": alpha, "epochs": CENTRAL_HYPER[model]["epochs"], "accuracy": same,
                       "accuracy_2x_epochs": twice})
        print(f"{model} alpha {alpha} seed 0: centralised {same:.4f}, with twice the epochs {twice:.4f}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    verdicts = report(runs, central, rounds)
    broker = {}
    if not a.no_broker:
        for model, codec in [(m, c) for m, c in BROKER_RUNS if m in models]:
            t0 = time.perf_counter()
            s = over_broker(projects[model].folder, rounds, codec)
            mine = next(r for r in runs if (r.model, r.alpha, r.method, r.codec, r.seed) == (model, 0.5, "fedavg", codec, 0))
            broker[f"{model} {codec}"] = {"final_accuracy": s["final_accuracy"], "replay": mine.final,
                             "accuracy_per_round": s["accuracy_per_round"], "replay_per_round": mine.accuracy_per_round,
                             "bytes_up": s["bytes_up"], "replay_bytes_up": mine.bytes_up,
                             "updates_accepted": s["updates_accepted"], "shards_resent": s["shards_resent"],
                             "centralised_accuracy": s["centralised_accuracy"], "seconds": time.perf_counter() - t0}
        print_table("fedsync demo --project DIR --json over mosquitto (alpha 0.5, seed 0, FedAvg) vs the replay",
                    ["model, codec", "final (broker)", "final (replay)", "rounds equal", "bytes_up (broker)",
                     "bytes_up (replay)", "updates", "resent", "centralised", "wall s"],
                    [[m, f"{b['final_accuracy']:.4f}", f"{b['replay']:.4f}",
                      f"{sum(x == y for x, y in zip(b['accuracy_per_round'], b['replay_per_round']))}/{rounds}",
                      f"{b['bytes_up']:,}", f"{b['replay_bytes_up']:,}", b["updates_accepted"], b["shards_resent"],
                      f"{b['centralised_accuracy']:.4f}", f"{b['seconds']:.0f}"] for m, b in broker.items()])
    total = time.perf_counter() - started
    print(f"total {total:.0f} s, load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": environment(), "rounds": rounds, "mu": MU, "seconds": total,
                       "runs": [dict(r.__dict__, final=r.final, last_mean=r.last_mean) for r in runs],
                       "centralised": [{"model": m, "alpha": al, "seed": s, "accuracy": v}
                                       for (m, al, s), v in central.items()],
                       "centralised_2x_epochs": longer, "goal": verdicts, "broker": broker}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
