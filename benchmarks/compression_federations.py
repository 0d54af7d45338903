"""Part 3 of benchmarks/compression.py: accuracy and upload bytes of each update codec over mosquitto.

Theory of operation
-------------------
Every (setup, seed, codec) is one :class:`fedsync.lab.federation.LocalFederation` of
``DEVICES`` devices and the setup's rounds (``ROUNDS``; the demo setup ``DEMO_ROUNDS``)
on one managed mosquitto (started once by
:func:`measure_federations` for all of them, stopped at the end, pass or fail), under the
demo's sync policy with only the update codec changed; raw fp32 runs first for each seed,
so every ratio compares runs of the same seed in the same process. A federation that is
measured is torn down by dropping its connections (see :func:`run_federation`), not by a
clean stop. :func:`report_federations` prints one table per setup and returns, per setup
and codec, whether the goal (upload bytes <= 1/``GOAL_RATIO`` of raw at <= ``GOAL_POINTS``
points of final accuracy lost) held in every seed.

The codecs are those the benchmark process has registered (``compression.py`` registers
its extra ones before the first federation): coordinator and agents live in this process,
so both sides see them.

Error feedback is chosen by the codec object, never by its name: the agent applies it when
the manifest's codec has ``Codec.error_feedback`` set (device_agent/agent.py, ``on_trained``),
and ``noef-*`` are top-k codecs registered with that flag False. After each federation,
before tear-down, :func:`run_federation` counts the devices that hold an error-feedback
residual (``AgentCore.feedback``) and refuses a run where that count is not all devices with
the flag on and none with it off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from benchmarks.common import print_table

GOAL_RATIO = 10.0  # upload bytes at most 1/10 of raw fp32 ...
GOAL_POINTS = 0.5  # ... at most 0.5 percentage points of accuracy lost
DEVICES, ROUNDS = 10, 20  # the demo's devices; 20 rounds for the FedAvg setups (the demo's own: DEMO_ROUNDS)
FED_ARMS = ["raw", "zstd", "fp16", "int8", "topk", "topk1", "topk0.05", "noef-topk", "noef-topk1"]
MLP_FED_ARMS = ["raw", "int8", "topk", "topk1", "topk0.05", "noef-topk1"]  # fewer, to keep a full run short
QUICK_FED_ARMS = ["raw", "int8", "topk", "topk1", "noef-topk1"]


NOEF = "noef-"  # prefix of the benchmark's variants with error feedback off (a name only; the flag decides)


def uses_feedback(codec_name: str) -> bool:
    """The agent's rule (device_agent/agent.py, on_trained): the registered codec's own flag."""
    from fedsync.codecs import get_codec

    return get_codec(codec_name).error_feedback


def codec_label(codec: str, feedback: bool) -> str:
    """A row's name: the codec and, for a biased codec (top-k), whether error feedback was on."""
    from fedsync.codecs import get_codec

    base = codec.removeprefix(NOEF)
    if not get_codec(base).error_feedback:
        return codec  # unbiased codecs: no error feedback either way
    if feedback:
        return f"{base} + error feedback"
    return f"{base}, error feedback OFF" + (f" (codec {codec})" if codec != base else "")


LAST = 5  # rounds averaged for the steadier accuracy figure


@dataclass(frozen=True)
class Setup:
    """One federation recipe; every (setup, seed, codec) is one federation."""

    key: str
    label: str
    model_kind: str  # LocalFederation.model_kind
    server_adam: bool  # FedAdam on the coordinator (fedsync demo's recipe) instead of FedAvg
    codecs: tuple[str, ...]

    def rounds(self) -> int:
        from fedsync.lab.demo import DEMO_ROUNDS

        return DEMO_ROUNDS if self.server_adam else ROUNDS

    def hyper(self) -> dict:
        from fedsync.lab.demo import DEMO_HYPER
        from fedsync.trainer_api import DEFAULT_HYPER

        return dict(DEMO_HYPER if self.server_adam else DEFAULT_HYPER)

    def strategy_factory(self, num_params: int):
        if not self.server_adam:
            return None  # LocalFederation's default: FedAvg
        from fedsync.lab.demo import DEMO_SERVER_LR
        from fedsync.coordinator.strategies import FedAdam

        return FedAdam(num_params, server_lr=DEMO_SERVER_LR).factory()  # one per federation: moments persist


SETUPS = {
    "fedavg": Setup("fedavg", "softmax 60->10 (610 values), FedAvg, DEFAULT_HYPER", "softmax", False,
                    tuple(FED_ARMS)),
    "demo": Setup("demo", "softmax 60->10, `fedsync demo`'s recipe: FedAdam(DEMO_SERVER_LR) + DEMO_HYPER, "
                          "DEMO_ROUNDS", "softmax", True,
                  ("raw", "int8", "topk", "topk1", "topk0.05")),
    "mlp": Setup("mlp", "MLP 60->64->10 (4,554 values), FedAvg, DEFAULT_HYPER", "mlp", False, tuple(MLP_FED_ARMS)),
}
MODEL_VALUES = {"softmax": 610, "mlp": 60 * 64 + 64 + 64 * 10 + 10}


@dataclass
class FedResult:
    setup: str
    codec: str
    seed: int
    finished: bool
    rounds: int
    final_accuracy: float | None
    bytes_up: int
    updates_accepted: int
    shards_resent: int
    seconds: float
    feedback_devices: int = 0  # devices holding an error-feedback residual at the end
    accuracy_per_round: list = field(default_factory=list)

    @property
    def last_mean(self) -> float | None:
        tail = [a for a in self.accuracy_per_round[-LAST:] if a is not None]
        return sum(tail) / len(tail) if tail else None


def run_federation(url: str, users: dict, setup: Setup, codec: str, seed: int, timeout: float) -> FedResult:
    from fedsync.coordinator.core import RoundPolicy
    from fedsync.lab.federation import LocalFederation

    # The demo's sync policy (fedsync/lab/demo.py run_demo), codec aside.
    policy = RoundPolicy(rounds=setup.rounds(), target=DEVICES, quorum=max(1, (DEVICES + 1) // 2),
                         min_devices=DEVICES, round_timeout=30.0, update_codec=codec)
    fed = LocalFederation(url, users, n_devices=DEVICES, seed=seed, policy=policy, model_kind=setup.model_kind,
                          hyper=setup.hyper(), strategy_factory=setup.strategy_factory(MODEL_VALUES[setup.model_kind]),
                          federation=f"cmp-{setup.key}-{codec}-s{seed}")
    t0 = time.perf_counter()
    fed.start()
    try:
        finished = fed.wait(timeout)
        seconds = time.perf_counter() - t0
        s = fed.summary()
        cores = [d.core for h in fed.host_list for d in h.devices.values()]
        with_residual = sum(c.feedback is not None for c in cores)
    finally:
        # Measured; nothing more to learn, so drop every connection instead of fed.stop()'s clean
        # one: MqttLink.stop(disconnect=True) waits its full 2 s for about half the links (the
        # link thread reconnects after the DISCONNECT), 16-21 s per federation. And not fed.stop()
        # after crash_coordinator(): the crashed link still reads as connected, so the graceful
        # stop that follows waits for a flush that cannot happen (7 s).
        for device in list(fed.hosts):
            fed.kill_device(device)
        fed.crash_coordinator()
        for host in fed.host_list:
            host.stop()
    want = len(cores) if uses_feedback(codec) else 0
    if finished and with_residual != want:
        raise RuntimeError(f"{codec}: {with_residual} of {len(cores)} devices hold an error-feedback residual, "
                           f"expected {want} (Codec.error_feedback={uses_feedback(codec)})")
    return FedResult(setup.key, codec, seed, finished, s["rounds_completed"], s["final_accuracy"], s["bytes_up"],
                     s["updates_accepted"], s["shards_resent"], seconds, with_residual, s["accuracy_per_round"])


def measure_federations(setups: list[Setup], seeds: list[int], timeout: float) -> list[FedResult]:
    from fedsync.broker_config.process import BrokerProcess, mosquitto_available
    from fedsync.lab.federation import make_users

    if not mosquitto_available():
        raise SystemExit("compression benchmark: mosquitto is not installed (apt-get install mosquitto)")
    users = make_users(DEVICES)
    broker = BrokerProcess("mosquitto", users=users)
    broker.start()
    out = []
    try:
        for setup in setups:
            for seed in seeds:
                for codec in setup.codecs:
                    r = run_federation(broker.url, users, setup, codec, seed, timeout)
                    out.append(r)
                    print(f"federation {setup.key}, seed {seed}, {codec}: {r.rounds} rounds, "
                          f"accuracy {r.final_accuracy}, {r.seconds:.1f} s, error-feedback residual on "
                          f"{r.feedback_devices}/{DEVICES} devices", flush=True)
    finally:
        broker.stop()
    return out


def meets_goal(r: FedResult, raw: FedResult) -> bool:
    if not (r.finished and raw.finished and r.final_accuracy is not None and raw.final_accuracy is not None):
        return False
    loss_points = 100 * (raw.final_accuracy - r.final_accuracy)
    return raw.bytes_up / r.bytes_up >= GOAL_RATIO and loss_points <= GOAL_POINTS


def _points(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100 * (a - b)


def _fmt_points(p: float | None) -> str:
    return "-" if p is None else f"{p:+.2f}"


def report_federations(rows: list[FedResult]) -> dict[str, dict[str, bool]]:
    """One table per setup; returns {setup: {codec: goal met in every seed}}."""
    verdicts: dict[str, dict[str, bool]] = {}
    for key in dict.fromkeys(r.setup for r in rows):
        setup = SETUPS[key]
        mine = [r for r in rows if r.setup == key]
        seeds = list(dict.fromkeys(r.seed for r in mine))
        raw = {r.seed: r for r in mine if r.codec == "raw"}
        table = []
        verdicts[key] = {}
        for codec in dict.fromkeys(r.codec for r in mine):
            runs = {r.seed: r for r in mine if r.codec == codec}
            first = runs[seeds[0]]
            per_seed = [_points(runs[s].final_accuracy, raw[s].final_accuracy) for s in seeds]
            tails = [_points(runs[s].last_mean, raw[s].last_mean) for s in seeds]
            tails = [t for t in tails if t is not None]
            ratios = [raw[s].bytes_up / runs[s].bytes_up for s in seeds]
            goal_all = all(meets_goal(runs[s], raw[s]) for s in seeds)
            verdicts[key][codec] = goal_all
            unfinished = [s for s in seeds if not runs[s].finished]
            table.append([
                codec_label(codec, uses_feedback(codec)) + (f" (timeout, seed {unfinished})" if unfinished else ""),
                f"{first.final_accuracy:.4f}" if first.final_accuracy is not None else "-",
                " / ".join(_fmt_points(p) for p in per_seed),
                _fmt_points(sum(tails) / len(tails) if tails else None),
                f"{first.bytes_up:,}", f"{min(ratios):.2f}x", f"{first.bytes_up / raw[seeds[0]].bytes_up:.4f}",
                str(sum(r.shards_resent for r in runs.values())),
                ("yes" if meets_goal(first, raw[seeds[0]]) else "no") + " / " + ("yes" if goal_all else "no"),
            ])
        seed_text = "/".join(str(s) for s in seeds)
        print_table(f"Accuracy over mosquitto: {setup.label} {setup.hyper()}, {DEVICES} devices, "
                    f"{setup.rounds()} rounds, "
                    f"Synthetic(1,1); seeds {seed_text}; ratios vs raw fp32, same seed, same run",
                    ["update codec", f"final acc (seed {seeds[0]})", f"final pp vs raw (seeds {seed_text})",
                     f"last-{LAST} mean pp vs raw (avg)", f"bytes_up (seed {seeds[0]})", "raw / codec (min)",
                     "codec / raw", "shards resent", f"goal: seed {seeds[0]} / all"], table)
    return verdicts
