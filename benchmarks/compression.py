"""Update codecs: bytes on the wire, codec speed, and accuracy over a real broker, against raw fp32.

What is measured
----------------
1. **Bytes per update.** Two genuine training deltas (``local - global``):

   * *softmax*: the demo's model (SoftmaxRegression 60 -> 10, 610 values) on
     Synthetic(1, 1) with 10 devices and ``DEFAULT_HYPER``: 3 rounds of
     in-memory FedAvg over all devices, then one local fit of the device with
     the most training data from that global model.
   * *mlp-1M*: an MLP 60 -> 14,085 -> 10 (1,000,045 values) on the same data,
     lr 0.001, batch 32, 1 epoch per round (the demo's lr 0.3 makes this MLP
     diverge), the same 3 rounds + one local fit.

   Each delta goes through the device agent's own path (``AgentCore._encode``,
   and ``AgentCore._feedback_compensate`` first when error feedback is on), so
   the bytes counted are the encoded ``UpdateShard`` CBOR payloads in
   65,536-value shards, as published, and are what ``bytes_up`` counts. The ratios
   are against the ``raw`` codec's payloads for the same delta. "codec data" is the
   ``data`` field alone, without the CBOR envelope (ids, offsets, two digests,
   metrics). With error feedback, the device's residual from its previous round
   (its round-3 delta through the same codec) is added first, as a device does
   from its second round on.
2. **Codec speed** on the 1M delta: ``codec.encode`` over every shard, then
   ``codec.decode`` of those bytes, the median of several runs of CPU time
   (``time.thread_time``, so that other load on the machine skews it less).
   MB/s is 10**6 bytes of float32 input per second. "agent encode" is the whole
   device-side path: error feedback for top-k (encode, decode to update the
   residual; the encoded shards are reused, not encoded again), SHA-256/128
   digests and CBOR.
3. **Accuracy over a real broker** (``benchmarks/compression_federations.py``).
   :class:`LocalFederation` with a managed mosquitto on 127.0.0.1: 10 devices,
   Synthetic(1, 1), the demo's RoundPolicy, once per update codec and
   seed (0, 1, 2), raw fp32 first in the same run. Three setups (``--setups``):

   * ``fedavg``: the demo's model (softmax, 610 values) with FedAvg and
     ``DEFAULT_HYPER``, the federation's defaults, 20 rounds;
   * ``demo``: what ``fedsync demo`` runs: the same model, FedAdam(``DEMO_SERVER_LR``)
     on the coordinator, ``DEMO_HYPER``, ``DEMO_ROUNDS`` rounds (all read from
     fedsync/lab/demo.py);
   * ``mlp``: ``model_kind="mlp"`` (60 -> 64 -> 10, 4,554 values), FedAvg,
     ``DEFAULT_HYPER``, 20 rounds.

   The demo's 610-value update fits one shard whose CBOR envelope (~260 B: ids,
   offsets, two digests, metrics) is ~1/10 of the raw update, so no codec can
   reach 10x there; the MLP shows the codecs where the data dominates.
   Reported: final test accuracy, its difference from raw (same seed) in
   percentage points, the same for the mean of the last 5 rounds (the final round
   alone can move a point or two from round to round), and total ``bytes_up``
   (every update shard payload published, re-sends included) as a ratio to raw.
   The goal checked: upload bytes <= 1/10 of raw fp32 at <= 0.5 points of final
   accuracy lost, in every seed.

   Extra codecs, registered in this process before any federation starts (the
   coordinator and the agents live in this process, so both sides see them):
   ``topk0.05`` (top-5%, with error feedback like every top-k codec) and
   ``noef-topk`` / ``noef-topk1`` / ``noef-topk0.05``: the same top-k codecs with
   ``Codec.error_feedback`` False, which is the flag the agent applies error
   feedback by (device_agent/agent.py, ``on_trained``), so they run without it.
   Each federation checks, before tear-down, that every device holds a residual
   with the flag on and none with it off.

Usage::

    python benchmarks/compression.py           # everything: 60 federations
    python benchmarks/compression.py --quick   # ~50 s: 3 timing runs; fedavg setup, seed 0, 5 codecs
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, median, print_table  # noqa: E402
from benchmarks.compression_federations import (DEVICES, GOAL_POINTS, GOAL_RATIO, NOEF,  # noqa: E402
                                                QUICK_FED_ARMS, SETUPS, codec_label, measure_federations,
                                                report_federations, uses_feedback)

MLP_HIDDEN = 14_085  # 60 * h + h + 10 * h + 10 = 1,000,045 values
MLP_HYPER = {"lr": 0.001, "epochs": 1.0, "batch_size": 32.0, "mu": 0.0}
PRETRAIN_ROUNDS = 3
FEDERATION = "bench-compression"
DEVICE = "dev-0"  # the id the measured updates are encoded under (ids are in the payload)

STATIC_CODECS = ["raw", "zstd", "fp16", "int8", "topk", "topk1"]


def register_benchmark_codecs() -> None:
    """topk0.05 (with error feedback, as every top-k codec), and ``noef-topk``, ``noef-topk1``,
    ``noef-topk0.05``: the same encoders and decoders with ``Codec.error_feedback`` False, the flag
    the agent decides by (device_agent/agent.py, on_trained). Registered in this process only."""
    from fedsync.codecs import get_codec, register
    from fedsync.codecs.lossy import topk_codec

    register(topk_codec(0.05))
    for base in ("topk", "topk1", "topk0.05"):
        register(replace(get_codec(base), name=NOEF + base, error_feedback=False))
    for base in ("topk", "topk1", "topk0.05"):  # the switch is the flag, whatever the name
        if not get_codec(base).error_feedback or get_codec(NOEF + base).error_feedback:
            raise RuntimeError(f"error feedback flags wrong for {base} / {NOEF + base}")


# -- 1. genuine training deltas ----------------------------------------------------------------------

@dataclass
class TrainedUpdate:
    label: str
    params: dict  # the global model the delta is taken from
    prev_delta: np.ndarray  # the same device's delta one round earlier (for the error-feedback residual)
    delta: np.ndarray
    num_samples: int
    metrics: dict
    hyper: dict


def trained_update(label: str, model, data, hyper: dict, seed: int) -> TrainedUpdate:
    """PRETRAIN_ROUNDS of in-memory FedAvg over all devices, then one more local fit of the biggest device."""
    import numpy as np

    from fedsync.coordinator.aggregate import FedAvg
    from fedsync.device_agent.trainer import NumpyTrainer
    from fedsync.params import flatten, spec_of, unflatten

    spec = spec_of(model.init_params(np.random.default_rng(seed)))
    g = flatten(model.init_params(np.random.default_rng(seed)), spec)
    device = max(range(len(data)), key=lambda i: data[i].num_train)
    trainers = [NumpyTrainer(model, d) for d in data]
    prev = None
    for rnd in range(PRETRAIN_ROUNDS):
        agg = FedAvg(g.size)
        for i, t in enumerate(trainers):
            r = t.fit(unflatten(g, spec), hyper, np.random.default_rng([seed, i, rnd]))  # as AgentHost seeds it
            d = flatten(r.params, spec) - g
            agg.add(d, r.num_samples)
            if i == device:
                prev = d
        g = agg.finish(g)
    r = trainers[device].fit(unflatten(g, spec), hyper, np.random.default_rng([seed, device, PRETRAIN_ROUNDS]))
    return TrainedUpdate(label, unflatten(g, spec), prev, flatten(r.params, spec) - g, r.num_samples,
                         dict(r.metrics), dict(hyper))


def open_manifest(params: dict, codec: str):
    """The manifest a real coordinator opens for this model (65,536-value shards by default)."""
    from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
    from fedsync.messages import PeerStatus, encode
    from fedsync.topics import Topics

    topics = Topics(FEDERATION)
    core = CoordinatorCore(topics, params, RoundPolicy(rounds=1, target=1, min_devices=1, update_codec=codec),
                           hyper={}, incarnation=1, seed=0)
    core.start(0.0)
    core.on_message(topics.status(DEVICE), encode(PeerStatus(DEVICE, "online")), 1.0)
    return core.round.manifest


@dataclass
class WireResult:
    update: str
    codec: str
    feedback: bool
    wire_bytes: int
    data_bytes: int
    rel_error: float  # ||decoded - input|| / ||input||, input = delta (+ residual with feedback)
    shards: int


def agent_payloads(manifest, u: TrainedUpdate, feedback: bool):
    """The update's payloads exactly as the agent builds them, and the vector it handed the codec."""
    import numpy as np

    from fedsync.device_agent.agent import AgentCore
    from fedsync.codecs import get_codec
    from fedsync.topics import Topics

    core = AgentCore(DEVICE, Topics(FEDERATION), random.Random(0))
    codec = get_codec(manifest.update_codec)
    vector, datas = u.delta, None
    target = u.delta
    if feedback:
        core._feedback_compensate(u.prev_delta, codec, manifest)  # the previous round leaves its residual
        target = u.delta + np.array(core.feedback.residual)
        vector, datas = core._feedback_compensate(u.delta, codec, manifest)
    return core.encode_update(manifest, vector, u.num_samples, u.metrics, datas).payloads, target


def wire_result(manifest, u: TrainedUpdate, feedback: bool) -> WireResult:
    import numpy as np

    from fedsync.codecs import get_codec
    from fedsync.messages import UpdateShard, decode

    payloads, target = agent_payloads(manifest, u, feedback)
    shards = [decode(p, UpdateShard) for p in payloads]
    codec = get_codec(manifest.update_codec)
    decoded = np.concatenate([codec.decode(s.data, s.length) for s in shards])  # as the coordinator does
    err = float(np.linalg.norm(decoded.astype(np.float64) - target) / max(np.linalg.norm(target), 1e-30))
    return WireResult(u.label, manifest.update_codec, feedback, sum(len(p) for p in payloads),
                      sum(len(s.data) for s in shards), err, len(shards))


def measure_bytes(u: TrainedUpdate) -> list[WireResult]:
    out = []
    for name in STATIC_CODECS + ["topk0.05"]:
        m = open_manifest(u.params, name)
        if uses_feedback(name):
            out.append(wire_result(m, u, feedback=False))
        out.append(wire_result(m, u, feedback=uses_feedback(name)))
    return out


# -- 2. codec speed ----------------------------------------------------------------------------------

@dataclass
class SpeedResult:
    codec: str
    encode_mbs: float
    decode_mbs: float
    agent_mbs: float


def _cpu_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return median(times)


def measure_speed(u: TrainedUpdate, runs: int) -> list[SpeedResult]:
    from fedsync.device_agent.agent import AgentCore
    from fedsync.codecs import get_codec
    from fedsync.params import shard_slices
    from fedsync.topics import Topics

    mb = 4 * u.delta.size / 1e6
    out = []
    for name in STATIC_CODECS:
        m = open_manifest(u.params, name)
        codec = get_codec(name)
        pieces = [(u.delta[o:o + n], n) for o, n in shard_slices(m.num_params, m.shard_values)]
        encoded = [(codec.encode(v), n) for v, n in pieces]

        def agent_path() -> None:
            core = AgentCore(DEVICE, Topics(FEDERATION), random.Random(0))
            vector, datas = core._feedback_compensate(u.delta, codec, m) if uses_feedback(name) else (u.delta, None)
            core.encode_update(m, vector, u.num_samples, u.metrics, datas)

        enc = _cpu_seconds(lambda: [codec.encode(v) for v, _ in pieces], runs)
        dec = _cpu_seconds(lambda: [codec.decode(d, n) for d, n in encoded], runs)
        agent = _cpu_seconds(agent_path, runs)
        out.append(SpeedResult(name, mb / enc, mb / dec, mb / agent))
    return out


# -- report ------------------------------------------------------------------------------------------

def report_bytes(u: TrainedUpdate, rows: list[WireResult]) -> None:
    raw = next(r for r in rows if r.codec == "raw")
    title = (f"Bytes per update: {u.label}, {u.delta.size:,} values, {raw.shards} shard(s) "
             f"(ratios vs raw fp32 in this run; raw = {raw.wire_bytes:,} B on the wire)")
    print_table(title, ["codec", "wire bytes", "raw / codec", "codec / raw", "codec data B", "data: raw / codec",
                        "rel. L2 error"],
                [[codec_label(r.codec, r.feedback), f"{r.wire_bytes:,}", f"{raw.wire_bytes / r.wire_bytes:.1f}x",
                  f"{r.wire_bytes / raw.wire_bytes:.4f}", f"{r.data_bytes:,}",
                  f"{raw.data_bytes / r.data_bytes:.1f}x", f"{r.rel_error:.2e}"] for r in rows])


def report_speed(rows: list[SpeedResult], n: int, runs: int) -> None:
    raw = rows[0]
    print_table(f"Codec speed on the {n:,}-value MLP delta (MB/s of float32 input, CPU time, median of {runs}; "
                f"ratios vs raw in this run)",
                ["codec", "encode MB/s", "decode MB/s", "agent encode MB/s", "encode / raw", "decode / raw",
                 "agent / raw"],
                [[r.codec, f"{r.encode_mbs:,.0f}", f"{r.decode_mbs:,.0f}", f"{r.agent_mbs:,.0f}",
                  f"{r.encode_mbs / raw.encode_mbs:.3f}", f"{r.decode_mbs / raw.decode_mbs:.3f}",
                  f"{r.agent_mbs / raw.agent_mbs:.3f}"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 timing runs; federations: setup fedavg, seed 0, codecs raw, int8, topk, topk1, noef-topk1")
    ap.add_argument("--runs", type=int, default=7, help="timing runs per codec (median)")
    ap.add_argument("--codecs", help="federation arms for every setup, comma-separated (raw is always run, first)")
    ap.add_argument("--seeds", default="0,1,2", help="federation seeds (0 is the demo's)")
    ap.add_argument("--setups", default="fedavg,demo,mlp",
                    help="federation setups: fedavg (demo model, FedAvg, DEFAULT_HYPER), demo (fedsync demo's "
                         "FedAdam recipe), mlp (MLP 60->64->10, FedAvg, DEFAULT_HYPER)")
    ap.add_argument("--no-federation", action="store_true", help="skip part 3 (no broker)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per federation")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    # A SIGTERM (timeout, CI) unwinds like Ctrl-C, so the finally blocks stop the broker and the federation.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = 3 if a.quick else a.runs
    seeds = [0] if a.quick else [int(x) for x in a.seeds.split(",")]
    setups = []
    for key in (["fedavg"] if a.quick else a.setups.split(",")):
        codecs = a.codecs.split(",") if a.codecs else QUICK_FED_ARMS if a.quick else SETUPS[key].codecs
        setups.append(replace(SETUPS[key], codecs=tuple(["raw"] + [c for c in codecs if c != "raw"])))

    register_benchmark_codecs()  # before any manifest names them
    from fedsync.synthetic import synthetic_federation
    from fedsync.models import MLP, SoftmaxRegression
    from fedsync.trainer_api import DEFAULT_HYPER

    print(environment(), flush=True)
    t0 = time.perf_counter()
    data = synthetic_federation(1.0, 1.0, num_devices=DEVICES, seed=0)
    print("training the two deltas ...", flush=True)
    updates = [trained_update("softmax 60->10 (the demo's model)", SoftmaxRegression(60, 10), data,
                              dict(DEFAULT_HYPER), 0),
               trained_update(f"MLP 60->{MLP_HIDDEN:,}->10", MLP(60, MLP_HIDDEN, 10), data, MLP_HYPER, 0)]
    results: dict = {"environment": environment(), "default_hyper": dict(DEFAULT_HYPER), "mlp_hyper": MLP_HYPER,
                     "setups": {s.key: dict(s.__dict__, hyper=s.hyper()) for s in setups}}
    for u in updates:
        rows = measure_bytes(u)
        report_bytes(u, rows)
        results.setdefault("bytes", []).append({"update": u.label, "values": int(u.delta.size),
                                                "num_samples": u.num_samples, "rows": [r.__dict__ for r in rows]})
    speed = measure_speed(updates[1], runs)
    report_speed(speed, updates[1].delta.size, runs)
    results["speed"] = [r.__dict__ for r in speed]
    if not a.no_federation:
        feds = measure_federations(setups, seeds, a.timeout)
        verdicts = report_federations(feds)
        results["federations"] = [dict(r.__dict__, last_mean=r.last_mean) for r in feds]
        results["goal_met_in_every_seed"] = verdicts
        for key, by_codec in verdicts.items():
            met = [c for c, ok in by_codec.items() if ok]
            print(f"Goal on {SETUPS[key].label} (bytes_up <= 1/{GOAL_RATIO:g} of raw fp32 at <= {GOAL_POINTS} "
                  f"pp final-accuracy loss, every seed): " + (f"met by {', '.join(met)}" if met else "not met"))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
