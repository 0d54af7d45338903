"""Coordinator ingest throughput versus the broker's raw throughput, same payloads, same run.

What is measured
----------------
N publisher identities (``dev-0 .. dev-{N-1}``, plain paho clients in one
separate process) each publish one update of ``--update-mib`` MiB, cut into
shards of 256 KiB or 1 MiB, with QoS 1 to a mosquitto on 127.0.0.1. The
payloads are built with the device agent's own encoder
(``AgentCore._encode``, from the coordinator's retained manifest), so they are
byte-for-byte what real agents send; building them happens before the clock
starts.

* **broker** (baseline): the same payload bytes, published the same way to
  ``rawbench/...`` topics, received by one plain paho subscriber (QoS 1) in
  the benchmark process. Time: "go" to the last message received.
* **coordinator**: a real :class:`CoordinatorService` (MQTT link, batching,
  manual PUBACK, receipts on ``ack/{device}``) with a round that selects the N
  identities, in the benchmark process in place of the subscriber. Ingest
  time: "go" to the N-th update folded into FedAvg — every shard decoded,
  digest-checked, reassembled, the whole-update digest verified, decoded and
  aggregated (a FedAvg subclass timestamps ``add``). "to commit" adds the
  commit: the new model encoded and queued as retained shards, the manifest,
  and (with the journal) the checkpoint written and fsync'd.
* **coordinator + journal**: the same with ``state_dir`` (every shard appended
  to the round log and fsync'd before its PUBACK).

Trials are interleaved (broker, coordinator, coordinator + journal, repeat)
so that load from other users of the machine hits all three alike; the
table shows medians and the ratio is median(coordinator) / median(broker).
Each layout starts with ``--warmup`` unmeasured coordinator rounds (default
1): a long-running coordinator's heap is warm, and the first round in a
process pays ~64 page faults per 256 KiB shard that later rounds do not.

The benchmark process calls :func:`fedsync.memtune.keep_freed_memory`, as
``fedsync coordinator`` does; the baseline subscriber shares the process and
so the setting. ``FEDSYNC_MALLOC=default`` measures glibc's defaults instead.

Deltas are N(0, 1e-3) noise, which compresses worse than real training
deltas (DESIGN.md): for ``zstd`` this is the pessimistic case for bytes on the
wire and the realistic one for coordinator CPU per byte.

Usage::

    python benchmarks/ingest.py            # 8 x 32 MiB per trial, 3 repeats, codecs raw and zstd
    python benchmarks/ingest.py --quick    # 8 x 8 MiB, 1 repeat, raw only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import MIB, environment, make_users, median, print_table  # noqa: E402

FEDERATION = "bench"
RAW_PREFIX = "rawbench"  # baseline topics: not under fedsync/, so no coordinator session queues them
GOAL = 0.5


# -- the publisher process ------------------------------------------------------------------------

def publisher_main(conn, url: str, users: dict[str, str], devices: list[str], num_params: int, seed: int) -> None:
    """Child process: N paho clients that announce themselves online and publish on command.

    Commands on ``conn``: ("encode", round_id) -> ("ready", bytes, messages);
    ("go", prefix or None) -> ("published", first_send, last_puback); ("quit",).
    """
    import numpy as np
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from device_agent.agent import AgentCore
    from fedsync.messages import PeerStatus, RoundManifest, decode, encode
    from fedsync.mqtt import BrokerAddress
    from fedsync.topics import Topics

    topics = Topics(FEDERATION)
    addr = BrokerAddress.parse(url)
    manifests: list[RoundManifest] = []
    got_manifest = threading.Condition()
    rng = np.random.default_rng(seed)
    deltas = {d: (rng.standard_normal(num_params, dtype=np.float32) * np.float32(1e-3)) for d in devices}

    clients, acked = {}, {d: 0 for d in devices}
    lock = threading.Lock()

    def on_publish(client, userdata, mid, rc, props):
        with lock:
            acked[userdata] += 1

    def on_message(client, userdata, msg):
        if msg.topic == topics.manifest and msg.payload:
            with got_manifest:
                manifests.append(decode(bytes(msg.payload), RoundManifest))
                got_manifest.notify_all()

    for d in devices:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=d, clean_session=True, userdata=d,
                        protocol=paho.MQTTv311)
        c.username_pw_set(d, users[d])
        c.max_inflight_messages_set(32)  # the same window MqttLink uses
        c.on_publish = on_publish
        if d == devices[0]:  # one of them watches the retained manifest (re-subscribing on reconnect)
            c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topics.manifest, 1)
        c.on_message = on_message
        c.connect(addr.host, addr.port, 30)
        c.loop_start()
        clients[d] = c
    for d in devices:
        clients[d].publish(topics.status(d), encode(PeerStatus(d, "online")), 1, True)

    batches: dict[str, list[tuple[str, bytes]]] = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "encode":
            round_id = cmd[1]
            with got_manifest:
                got_manifest.wait_for(lambda: any(m.round_id == round_id and m.state == "open" for m in manifests), 60)
                m = next(m for m in reversed(manifests) if m.round_id == round_id and m.state == "open")
                manifests.clear()
            total = 0
            for d in devices:
                # Exactly the agent's encoder; update ids from the agent's own seeded RNG.
                up = AgentCore(d, topics, random.Random(f"{seed}:{d}:{round_id}"))._encode(
                    m, deltas[d], 100, {"train_loss": 1.0})
                batches[d] = list(zip(up.topics, up.payloads))
                total += sum(len(p) for p in up.payloads)
            conn.send(("ready", total, sum(len(b) for b in batches.values())))
        elif cmd[0] == "go":
            prefix = cmd[1]
            with lock:
                for d in devices:
                    acked[d] = 0
            first = time.perf_counter()

            def send(d: str) -> None:
                c = clients[d]
                for topic, payload in batches[d]:
                    if prefix:
                        topic = prefix + topic[len("fedsync"):]
                    c.publish(topic, payload, 1, False)

            threads = [threading.Thread(target=send, args=(d,)) for d in devices]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            want = {d: len(batches[d]) for d in devices}
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with lock:
                    if all(acked[d] >= want[d] for d in devices):
                        break
                time.sleep(0.001)
            conn.send(("published", first, time.perf_counter()))
    for d in devices:
        clients[d].publish(topics.status(d), encode(PeerStatus(d, "offline")), 1, True).wait_for_publish(5)
        clients[d].loop_stop()
        clients[d].disconnect()


# -- the two receivers ------------------------------------------------------------------------------

class RawSubscriber:
    """The baseline receiver: a plain paho client on ``rawbench/#``, QoS 1."""

    def __init__(self, url: str, password: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from fedsync.mqtt import BrokerAddress

        addr = BrokerAddress.parse(url)
        self.lock = threading.Lock()
        self.count, self.bytes, self.expect, self.last = 0, 0, 0, 0.0
        self.done = threading.Event()
        ready = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sub", clean_session=True,
                        protocol=paho.MQTTv311)
        c.username_pw_set("bench-sub", password)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{RAW_PREFIX}/#", 1)
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_message
        c.connect(addr.host, addr.port, 30)
        c.loop_start()
        if not ready.wait(15):
            raise RuntimeError("baseline subscriber: no SUBACK")
        self.client = c

    def arm(self, expect: int) -> None:
        with self.lock:
            self.count, self.bytes, self.expect = 0, 0, expect
            self.done.clear()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.count += 1
            self.bytes += len(msg.payload)
            if self.count >= self.expect:
                self.last = time.perf_counter()
                self.done.set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Trial:
    kind: str  # broker | coordinator | coordinator+journal
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

    from coordinator.aggregate import FedAvg
    from coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
    from coordinator.service import CoordinatorService
    from fedsync.mqtt import Credentials
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


def broker_trial(conn, sub: RawSubscriber, shard_kib: int, codec: str, messages: int, nbytes: int) -> Trial:
    sub.arm(messages)
    cpu0 = _cpu()
    t0 = time.perf_counter()
    conn.send(("go", RAW_PREFIX))
    if not sub.done.wait(600):
        raise RuntimeError(f"baseline: {sub.count}/{messages} messages arrived")
    cpu = _cpu() - cpu0
    conn.recv()
    if sub.bytes != nbytes:
        raise RuntimeError(f"baseline: {sub.bytes} bytes arrived, {nbytes} sent")
    return Trial("broker", shard_kib, codec, nbytes, sub.last - t0, cpu_seconds=cpu)


# -- where the coordinator's CPU goes (no broker) --------------------------------------------------

def cpu_breakdown(devices: int, num_params: int, shard_values: int, codec: str, seed: int) -> list[tuple[str, float]]:
    """Thread CPU seconds per GiB of payload for each stage of the core's ingest path, and the whole.

    Thread CPU time, not wall time, so load from other processes inflates it less. Each stage is the
    best of 3 runs over the same agent-encoded payloads the MQTT trials send.
    """
    import cbor2
    import numpy as np

    from paho.mqtt.enums import MQTTProtocolVersion

    from coordinator.aggregate import FedAvg
    from coordinator.core import CoordinatorCore, RoundPolicy
    from coordinator.journal import _bytes_head
    from device_agent.agent import AgentCore
    from fedsync import paho_fast
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
        up = AgentCore(d, topics, random.Random(f"{seed}:{d}"))._encode(
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
        ("paho: decode PUBLISH (fedsync.paho_fast)", lambda: [fast(0x32, pk, v311) for pk in packets]),
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
    from broker_config.process import BrokerProcess, mosquitto_available

    if not mosquitto_available():
        raise SystemExit("ingest benchmark: mosquitto is not installed (apt-get install mosquitto)")
    devices = [f"dev-{i}" for i in range(args.devices)]
    users = make_users(["coordinator", "bench-sub", *devices])
    num_params = args.update_mib * MIB // 4
    trials: list[Trial] = []
    broker = BrokerProcess("mosquitto", users=users)
    broker.start()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    pub = ctx.Process(target=publisher_main, args=(child, broker.url, users, devices, num_params, args.seed),
                      name="ingest-publishers")
    pub.start()
    sub = None
    try:
        sub = RawSubscriber(broker.url, users["bench-sub"])
        for codec in args.codecs:
            for shard_kib in args.shard_kib:
                shard_values = shard_kib * 1024 // 4
                for _ in range(args.warmup):  # unmeasured: a long-running coordinator's heap is warm
                    w = coordinator_trial(parent, broker.url, users["coordinator"], devices, num_params,
                                          shard_values, codec, journal=False)
                    print(f"  {codec:5} {shard_kib:5} KiB warm-up: coordinator {w.mib_s:8.1f} MiB/s",
                          file=sys.stderr, flush=True)
                for rep in range(args.repeats):
                    # The coordinator run also has the publishers encode this layout; the baseline reuses those bytes.
                    t = coordinator_trial(parent, broker.url, users["coordinator"], devices, num_params,
                                          shard_values, codec, journal=False)
                    messages = args.devices * -(-num_params // shard_values)
                    b = broker_trial(parent, sub, shard_kib, codec, messages, t.bytes)
                    j = coordinator_trial(parent, broker.url, users["coordinator"], devices, num_params,
                                          shard_values, codec, journal=True)
                    for x in (b, t, j):
                        trials.append(x)
                        print(f"  {codec:5} {shard_kib:5} KiB rep {rep + 1}: {x.kind:20} {x.mib_s:8.1f} MiB/s",
                              file=sys.stderr, flush=True)
    finally:
        try:
            parent.send(("quit",))
        except OSError:
            pass
        pub.join(30)
        if pub.is_alive():
            pub.kill()
            pub.join(5)
        if sub is not None:
            sub.close()
        broker.stop()
    return trials


def report(trials: list[Trial], args) -> dict:
    rows, ratios = [], {}
    keys = sorted({(t.codec, t.shard_kib) for t in trials}, key=lambda k: (k[0] != "raw", k[0], k[1]))
    for codec, kib in keys:
        group = {kind: [t for t in trials if (t.codec, t.shard_kib, t.kind) == (codec, kib, kind)]
                 for kind in ("broker", "coordinator", "coordinator+journal")}
        base = median([t.mib_s for t in group["broker"]])
        for kind, ts in group.items():
            if not ts:
                continue
            thr = median([t.mib_s for t in ts])
            ratio = thr / base
            commit = median([t.bytes / MIB / t.commit_seconds for t in ts]) if kind != "broker" else None
            cpu = median([t.cpu_seconds / (t.bytes / 2**30) for t in ts])
            ratios[f"{codec}/{kib}KiB/{kind}"] = round(ratio, 3)
            rows.append([f"{codec} {kib} KiB", kind, f"{ts[0].bytes / MIB:.1f}",
                         f"{thr:.0f}", f"{min(t.mib_s for t in ts):.0f}-{max(t.mib_s for t in ts):.0f}",
                         "-" if commit is None else f"{commit:.0f}", f"{cpu:.2f}",
                         "1.00 (baseline)" if kind == "broker" else f"{ratio:.2f}"])
    print_table(f"Coordinator ingest vs mosquitto, {args.devices} publishers x {args.update_mib} MiB updates, "
                f"QoS 1, {args.repeats} repeat(s), medians",
                ["payloads", "receiver", "MiB/trial", "MiB/s", "range", "MiB/s to commit", "CPU s/GiB", "ratio"],
                rows)
    worst = min(v for k, v in ratios.items() if not k.endswith("/broker"))
    print(f"ratios (coordinator / broker): {json.dumps(ratios)}")
    print(f"goal >= {GOAL}: worst {worst:.2f} -> {'met' if worst >= GOAL else 'NOT met'}")
    return {"ratios": ratios, "worst": worst, "trials": [t.__dict__ for t in trials]}


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
    from fedsync.memtune import keep_freed_memory

    # This process hosts the coordinator (and the baseline subscriber): tune its allocator as
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
