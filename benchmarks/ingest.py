"""Coordinator ingest throughput versus the broker's raw throughput, same payloads, same run.

What is measured
----------------
N publisher identities (``dev-0 .. dev-{N-1}``, plain paho clients in one
separate process: ``benchmarks/ingest_publishers.py``) each publish one update
of ``--update-mib`` MiB, cut into shards of 256 KiB or 1 MiB, with QoS 1 to a
mosquitto on 127.0.0.1. The payloads are built with the device agent's own encoder
(``AgentCore._encode``, from the coordinator's retained manifest), so they are
byte-for-byte what real agents send; building them happens before the clock
starts.

Four receivers of the same payload bytes, each a row of the table, named in it:

* **native** (the broker's limit): ``mosquitto_sub`` (C, libmosquitto) in its own process,
  QoS 1, persistent session, only each payload's length written; topics ``rawnative/...``.
  Time: "go" to its exit after the last message (``benchmarks/ingest_receivers.py``).
* **paho**: one plain paho-mqtt subscriber (QoS 1) in its own process, with paho's own
  ``decode_publish`` (``fedsync.transport.paho_fast`` is installed by the services, and this
  process never runs one; the script checks and prints it); topics ``rawpaho/...``. Time:
  "go" to the last message received.
* **coordinator**: a real :class:`CoordinatorService` (MQTT link, batching, paho_fast,
  manual PUBACK, receipts on ``ack/{device}``) with a round that selects the N
  identities, in the benchmark process. Ingest
  time: "go" to the N-th update folded into FedAvg — every shard decoded,
  digest-checked, reassembled, the whole-update digest verified, decoded and
  aggregated (a FedAvg subclass timestamps ``add``). "to commit" adds the
  commit: the new model encoded and queued as retained shards, the manifest,
  and (with the journal) the checkpoint written and fsync'd.
* **coordinator + journal** (the production configuration: the systemd unit passes
  ``--state-dir``): the same with ``state_dir`` (every shard appended to the round log and
  fsync'd before its PUBACK).

Trials are interleaved (coordinator, native, paho, coordinator + journal, repeat) so that
load from other users of the machine hits all four alike; the table shows medians, each
row's ratio to the native and to the paho median. The headline is coordinator + journal /
native. Each layout starts with ``--warmup`` unmeasured coordinator rounds (default
1): a long-running coordinator's heap is warm, and the first round in a
process pays ~64 page faults per 256 KiB shard that later rounds do not.

The benchmark process calls :func:`fedsync.transport.memtune.keep_freed_memory`, as
``fedsync coordinator`` does; ``FEDSYNC_MALLOC=default`` measures glibc's defaults instead.
CPU per GiB is the receiver's own process (the benchmark process for the coordinator rows).

Deltas are N(0, 1e-3) noise, which compresses worse than real training
deltas (docs/benchmarks.md, compression): for ``zstd`` this is the pessimistic case for bytes on the
wire and the realistic one for coordinator CPU per byte.

Usage::

    python benchmarks/ingest.py            # 8 x 32 MiB per trial, 3 repeats, codecs raw and zstd
    python benchmarks/ingest.py --quick    # 8 x 8 MiB, 1 repeat, raw only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MIB, environment, make_users, median, print_table  # noqa: E402
from benchmarks.ingest_publishers import FEDERATION, publisher_main  # noqa: E402
from benchmarks.ingest_receivers import (NATIVE_PREFIX, PAHO_PREFIX, NativeSubscriber,  # noqa: E402
                                         PahoSubscriber, mosquitto_sub_version)

GOAL = 0.5  # production configuration (coordinator + journal) / the native limit


# -- trials ----------------------------------------------------------------------------------------

KINDS = ("native", "paho", "coordinator", "coordinator+journal")
LABEL = {"native": "native: mosquitto_sub", "paho": "paho, no paho_fast", "coordinator": "coordinator",
         "coordinator+journal": "coordinator + journal (production)"}
RECEIVER = {  # what each row is, word for word under the table
    "native": "mosquitto_sub 2.0 (C, libmosquitto) in its own process, QoS 1, persistent session, writes only "
              "each payload's length: the broker's limit",
    "paho": "one plain paho-mqtt subscriber in its own process, QoS 1, paho's own decode_publish "
            "(fedsync.transport.paho_fast NOT installed)",
    "coordinator": "CoordinatorService in the benchmark process, no journal (paho_fast installed, as the service "
                   "does): decode, verify, reassemble, FedAvg",
    "coordinator+journal": "the same with state_dir (each shard appended to the round log, fsync per batch before "
                           "its PUBACK): production, as deploy/systemd/fedsync-coordinator.service runs it",
}


@dataclass
class Trial:
    kind: str  # one of KINDS
    shard_kib: int
    codec: str
    bytes: int
    seconds: float  # to the last message received / the N-th update aggregated
    commit_seconds: float = float("nan")  # coordinator: to the round's commit event
    cpu_seconds: float = float("nan")  # this process (user+sys) over the trial
    extra: dict = field(default_factory=dict)

    @property
    def mib_s(self) -> float:
        return self.bytes / MIB / self.seconds


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def coordinator_trial(conn, url: str, password: str, devices: list[str], num_params: int, shard_values: int,
                      codec: str, journal: bool) -> Trial:
    import numpy as np

    from fedsync.coordinator.aggregate import FedAvg
    from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
    from fedsync.coordinator.service import CoordinatorService
    from fedsync.address import Credentials
    from fedsync.topics import Topics

    added: list[float] = []

    class TimedFedAvg(FedAvg):
        def add(self, delta, num_samples):
            super().add(delta, num_samples)
            added.append(time.perf_counter())

    n = len(devices)
    policy = RoundPolicy(rounds=1, target=n, quorum=n, min_devices=n, round_timeout=600.0,
                         shard_values=shard_values, update_codec=codec, update_qos=1)
    core = CoordinatorCore(Topics(FEDERATION), {"w": np.zeros(num_params, np.float32)}, policy, hyper={},
                           incarnation=time.time_ns() & ((1 << 62) - 1), seed=0,
                           strategy_factory=lambda size: TimedFedAvg(size))
    closed: list[tuple[float, object]] = []
    closed_evt = threading.Event()

    def on_event(e):
        if isinstance(e, RoundClosed):
            closed.append((time.perf_counter(), e))
            closed_evt.set()

    with tempfile.TemporaryDirectory(prefix="fedsync-ingest-") as state:
        service = CoordinatorService(core, url, credentials=Credentials("coordinator", password),
                                     on_event=on_event, state_dir=state if journal else None)
        service.start()
        try:
            deadline = time.monotonic() + 60
            while core.round is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if core.round is None:
                raise RuntimeError("coordinator: no round opened (are the publishers online?)")
            conn.send(("encode", core.round.manifest.round_id))
            _, nbytes, _ = conn.recv()
            time.sleep(0.2)  # let the coordinator settle (model publish) before the clock starts
            cpu0 = _cpu()
            t0 = time.perf_counter()
            conn.send(("go", None))
            if not closed_evt.wait(600):
                raise RuntimeError(f"coordinator: round did not commit ({core.stats})")
            cpu = _cpu() - cpu0
            conn.recv()  # ("published", ...)
        finally:
            service.stop()
    s = core.stats
    when, event = closed[0]
    if event.outcome != "committed" or len(added) != n or s.shards_rejected:
        raise RuntimeError(f"coordinator: unexpected outcome {event.outcome}, {len(added)} added, {s}")
    return Trial("coordinator+journal" if journal else "coordinator", shard_values * 4 // 1024, codec, nbytes,
                 added[-1] - t0, when - t0, cpu,
                 {"duplicates": s.duplicates_dropped, "journal_records": service.journal.records_written if journal else 0})


def native_trial(conn, sub: NativeSubscriber, shard_kib: int, codec: str, messages: int, nbytes: int) -> Trial:
    sub.start(messages)  # subscribed before the clock starts
    t0 = time.perf_counter()
    conn.send(("go", NATIVE_PREFIX))
    ended, cpu = sub.wait(600)
    conn.recv()
    if (sub.count, sub.bytes) != (messages, nbytes):
        raise RuntimeError(f"mosquitto_sub: {sub.count} messages, {sub.bytes} bytes; {messages}, {nbytes} sent")
    return Trial("native", shard_kib, codec, nbytes, ended - t0, cpu_seconds=cpu)


def paho_trial(conn, sub: PahoSubscriber, shard_kib: int, codec: str, messages: int, nbytes: int) -> Trial:
    sub.arm(messages)
    t0 = time.perf_counter()
    conn.send(("go", PAHO_PREFIX))
    last, count, got, cpu = sub.wait(600)
    conn.recv()
    if (count, got) != (messages, nbytes):
        raise RuntimeError(f"paho subscriber: {count} messages, {got} bytes; {messages}, {nbytes} sent")
    return Trial("paho", shard_kib, codec, nbytes, last - t0, cpu_seconds=cpu)


# -- where the coordinator's CPU goes (no broker) --------------------------------------------------

def cpu_breakdown(devices: int, num_params: int, shard_values: int, codec: str, seed: int) -> list[tuple[str, float]]:
    """Thread CPU seconds per GiB of payload for each stage of the core's ingest path, and the whole.

    Thread CPU time, not wall time, so load from other processes inflates it less. Each stage is the
    best of 3 runs over the same agent-encoded payloads the MQTT trials send.
    """
    import cbor2
    import numpy as np

    from paho.mqtt.enums import MQTTProtocolVersion

    from fedsync.coordinator.aggregate import FedAvg
    from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
    from fedsync.coordinator.journal import _bytes_head
    from fedsync.device_agent.agent import AgentCore
    from fedsync.transport import paho_fast
    from fedsync.codecs import get_codec
    from fedsync.messages import PeerStatus, UpdateShard, decode, encode
    from fedsync.params import digest
    from fedsync.topics import Topics

    topics = Topics(FEDERATION)
    names = [f"dev-{i}" for i in range(devices)]

    def fresh_core() -> CoordinatorCore:
        policy = RoundPolicy(rounds=1, target=devices, quorum=devices, min_devices=devices,
                             shard_values=shard_values, update_codec=codec)
        core = CoordinatorCore(topics, {"w": np.zeros(num_params, np.float32)}, policy, hyper={},
                               incarnation=1, seed=0)
        core.start(0.0)
        for d in names:
            core.on_message(topics.status(d), encode(PeerStatus(d, "online")), 1.0)
        return core

    manifest = fresh_core().round.manifest
    rng = np.random.default_rng(seed)
    per_device = []
    for d in names:
        up = AgentCore(d, topics, random.Random(f"{seed}:{d}")).encode_update(
            manifest, rng.standard_normal(num_params, dtype=np.float32) * np.float32(1e-3), 100, {"train_loss": 1.0})
        per_device.append(list(zip(up.topics, up.payloads)))
    messages = [m for group in zip(*per_device) for m in group]  # interleaved, as the broker delivers them
    gib = sum(len(p) for _, p in messages) / 2**30
    shards = [decode(p, UpdateShard) for _, p in messages]
    c = get_codec(codec)
    zero = np.zeros(num_params, np.float32)

    cores = [fresh_core() for _ in range(3)]  # built outside the clock: start-up publishes the model
    # The PUBLISH packets paho hands its decoder: topic length, topic, packet id, payload.
    packets = [bytearray(struct.pack("!H", len(t)) + t.encode() + struct.pack("!H", 1) + p) for t, p in messages]
    fast, slow, v311 = paho_fast.decode_publish, paho_fast.ORIGINAL, MQTTProtocolVersion.MQTTv311

    def whole() -> None:
        core = cores.pop()
        for topic, payload in messages:
            core.on_message(topic, payload, 2.0)
        assert core.stats.updates_accepted == devices

    def fedavg() -> None:
        agg = FedAvg(num_params)
        for _ in range(devices):
            agg.add(zero, 100)

    stages = [
        ("core.on_message, whole round incl. commit", whole),
        ("  CBOR decode + validate (messages.decode)", lambda: [decode(p, UpdateShard) for _, p in messages]),
        ("  SHA-256/128 shard digest (x1 per shard)", lambda: [digest(x.data) for x in shards]),
        (f"  codec decode ({codec})", lambda: [c.decode(x.data, x.length) for x in shards]),
        ("  FedAvg.add, every update", fedavg),
        ("paho: decode PUBLISH (fedsync.transport.paho_fast)", lambda: [fast(0x32, pk, v311) for pk in packets]),
        ("  paho's own decode_publish, for reference", lambda: [slow(0x32, pk, v311) for pk in packets]),
        ("journal record head (payload not copied)",
         lambda: [b"\x82" + cbor2.dumps(t) + _bytes_head(len(p)) for t, p in messages]),
    ]
    out = []
    for name, fn in stages:
        best = float("inf")
        for _ in range(3):
            t = time.thread_time()
            fn()
            best = min(best, time.thread_time() - t)
        out.append((name, best / gib))
    return out


# -- driver ------------------------------------------------------------------------------------------

def run(args) -> list[Trial]:
    from fedsync.broker_config.process import BrokerProcess, mosquitto_available

    if not mosquitto_available():
        raise SystemExit("ingest benchmark: mosquitto is not installed (apt-get install mosquitto)")
    if shutil.which("mosquitto_sub") is None:
        raise SystemExit("ingest benchmark: mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    devices = [f"dev-{i}" for i in range(args.devices)]
    users = make_users(["coordinator", "bench-native", "bench-paho", *devices])
    num_params = args.update_mib * MIB // 4
    trials: list[Trial] = []
    broker = BrokerProcess("mosquitto", users=users)
    broker.start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    pub = ctx.Process(target=publisher_main, args=(child, broker.url, users, devices, num_params, args.seed),
                      name="ingest-publishers")
    pub.start()
    native, paho_sub = None, None
    try:
        native = NativeSubscriber(broker.host, broker.port, "bench-native", users["bench-native"], broker.log_path)
        paho_sub = PahoSubscriber(broker.host, broker.port, "bench-paho", users["bench-paho"])
        args.paho_subscriber_decoder = paho_sub.decoder
        print(f"paho subscriber (own process) decodes PUBLISH with {paho_sub.decoder}: paho_fast not installed",
              file=sys.stderr, flush=True)
        for codec in args.codecs:
            for shard_kib in args.shard_kib:
                shard_values = shard_kib * 1024 // 4
                for _ in range(args.warmup):  # unmeasured: a long-running coordinator's heap is warm
                    w = coordinator_trial(parent, broker.url, users["coordinator"], devices, num_params,
                                          shard_values, codec, journal=False)
                    print(f"  {codec:5} {shard_kib:5} KiB warm-up: coordinator {w.mib_s:8.1f} MiB/s",
                          file=sys.stderr, flush=True)
                for rep in range(args.repeats):
                    # The coordinator run also has the publishers encode this layout; the baselines reuse those bytes.
                    t = coordinator_trial(parent, broker.url, users["coordinator"], devices, num_params,
                                          shard_values, codec, journal=False)
                    messages = args.devices * -(-num_params // shard_values)
                    n = native_trial(parent, native, shard_kib, codec, messages, t.bytes)
                    b = paho_trial(parent, paho_sub, shard_kib, codec, messages, t.bytes)
                    j = coordinator_trial(parent, broker.url, users["coordinator"], devices, num_params,
                                          shard_values, codec, journal=True)
                    for x in (n, b, t, j):
                        trials.append(x)
                        print(f"  {codec:5} {shard_kib:5} KiB rep {rep + 1}: {x.kind:20} {x.mib_s:8.1f} MiB/s  "
                              f"load1 {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    finally:
        try:
            parent.send(("quit",))
        except OSError:
            pass
        pub.join(30)
        if pub.is_alive():
            pub.kill()
            pub.join(5)
        if native is not None:
            native.kill()
        if paho_sub is not None:
            paho_sub.close()
        broker.stop()
    from paho.mqtt import _packet

    args.coordinator_decoder = f"{_packet.decode_publish.__module__}.{_packet.decode_publish.__qualname__}"
    return trials


def report(trials: list[Trial], args) -> dict:
    rows, ratios = [], {}
    keys = sorted({(t.codec, t.shard_kib) for t in trials}, key=lambda k: (k[0] != "raw", k[0], k[1]))
    for codec, kib in keys:
        group = {kind: [t for t in trials if (t.codec, t.shard_kib, t.kind) == (codec, kib, kind)] for kind in KINDS}
        native = median([t.mib_s for t in group["native"]])
        paho = median([t.mib_s for t in group["paho"]])
        for kind, ts in group.items():
            if not ts:
                continue
            thr = median([t.mib_s for t in ts])
            ratios[f"{codec}/{kib}KiB/{kind}/native"] = round(thr / native, 3)
            ratios[f"{codec}/{kib}KiB/{kind}/paho"] = round(thr / paho, 3)
            commit = median([t.bytes / MIB / t.commit_seconds for t in ts]) if kind.startswith("coord") else None
            cpu = median([t.cpu_seconds / (t.bytes / 2**30) for t in ts])
            rows.append([f"{codec} {kib} KiB", LABEL[kind], f"{ts[0].bytes / MIB:.1f}",
                         f"{thr:.0f}", f"{min(t.mib_s for t in ts):.0f}-{max(t.mib_s for t in ts):.0f}",
                         "-" if commit is None else f"{commit:.0f}", f"{cpu:.2f}",
                         f"{thr / native:.2f}", f"{thr / paho:.2f}"])
    print_table(f"Coordinator ingest vs mosquitto, {args.devices} publishers x {args.update_mib} MiB updates, "
                f"QoS 1, {args.repeats} repeat(s), medians",
                ["payloads", "receiver", "MiB/trial", "MiB/s", "range", "MiB/s to commit",
                 "receiver CPU s/GiB", "/ native", "/ paho"], rows)
    for kind in KINDS:
        print(f"  {LABEL[kind]}: {RECEIVER[kind]}")
    headline = {k.split("/coordinator+journal")[0]: v for k, v in ratios.items()
                if k.endswith("/coordinator+journal/native")}
    worst = min(headline.values())
    print(f"ratios: {json.dumps(ratios)}")
    print(f"headline, production configuration (coordinator + journal) / native limit (mosquitto_sub): "
          f"{json.dumps(headline)}")
    print(f"goal >= {GOAL}: worst {worst:.2f} -> {'met' if worst >= GOAL else 'NOT met'}")
    print(f"decode_publish: paho subscriber {args.paho_subscriber_decoder}; coordinator process "
          f"{args.coordinator_decoder}; {mosquitto_sub_version()}; load1 at end {os.getloadavg()[0]:.2f}")
    return {"ratios": ratios, "headline": headline, "worst": worst, "trials": [t.__dict__ for t in trials]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 MiB updates, 1 repeat, raw codec only")
    p.add_argument("--devices", type=int, default=8, help="publisher identities selected for the round")
    p.add_argument("--update-mib", type=int, default=None, help="MiB of float32 per update (default 32; quick 8)")
    p.add_argument("--shard-kib", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--codecs", nargs="+", default=None, help="update codecs (default raw zstd; quick raw)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured coordinator rounds per layout first")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the per-stage CPU table (in-process, no broker)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    args.update_mib = args.update_mib or (8 if args.quick else 32)
    args.codecs = args.codecs or (["raw"] if args.quick else ["raw", "zstd"])
    args.repeats = args.repeats or (1 if args.quick else 3)
    from fedsync.transport.memtune import keep_freed_memory

    # This process hosts the coordinator (the baselines run in processes of their own): tune its allocator as
    # `fedsync coordinator` does. FEDSYNC_MALLOC=default measures glibc's defaults instead.
    args.malloc_tuned = keep_freed_memory()
    print(environment(), f"malloc tuned: {args.malloc_tuned}", file=sys.stderr)
    trials = run(args)
    result = report(trials, args)
    if args.breakdown:
        rows = []
        for kib in args.shard_kib:
            for codec in args.codecs:
                for name, cpu in cpu_breakdown(args.devices, args.update_mib * MIB // 4 // 4, kib * 256, codec,
                                               args.seed):
                    rows.append([f"{codec} {kib} KiB", name, f"{cpu:.2f}", f"{1024 / cpu:.0f}"])
                    result.setdefault("breakdown", {})[f"{codec}/{kib}KiB/{name.strip()}"] = round(cpu, 3)
        print_table("Where the coordinator's CPU goes (no broker; thread CPU s per GiB of payload, best of 3)",
                    ["payloads", "stage", "CPU s/GiB", "MiB/s per core"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
