"""Peak RSS and CPU seconds of ONE device agent process per round, 1M-parameter model.

What is measured
----------------
The agent is the real CLI, ``python -m fedsync.cli agent --config agent.toml``,
in its own process, exactly as ``fedsync-agent@.service`` runs it (persistent
outbox in a state directory, one BLAS thread). It trains the built-in MLP
60 -> 14085 (ReLU) -> 10 on its slice of the Synthetic(1, 1) data: 60*14085 +
14085 + 14085*10 + 10 = 1,000,045 float32 parameters, 4.0 MB raw. A
coordinator (the real ``CoordinatorService``, in this process) and mosquitto
(on 127.0.0.1) run the rounds: target 1, the default ``zstd`` update codec,
65536-value shards (16 per model).

From outside, with psutil: the agent's RSS is sampled every 10 ms, and its
CPU time (user + system) and the kernel's RSS high-water mark (``VmHWM``,
exact, not sampled) are read at every round close. Per round the table shows
the sampled peak RSS in the round, the high-water mark so far, and the CPU
seconds the round cost the agent (model fetch, training, encode, upload). The
"idle" row is the agent connected and waiting, before the first manifest.
Ratios: peak RSS / raw fp32 model size, and peak RSS / the 100 MB goal.

``--tracemalloc`` runs the same agent under tracemalloc (slower) and prints
the source lines holding the most memory at the traced peak: the answer to
"where does the memory go".

Usage::

    python benchmarks/agent_footprint.py             # 5 rounds
    python benchmarks/agent_footprint.py --quick     # 3 rounds
    python benchmarks/agent_footprint.py --tracemalloc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, environment, make_users, median, print_table  # noqa: E402

HIDDEN = 14085  # 60*h + h + 10*h + 10 = 1,000,045 parameters
GOAL_MB = 100.0
MB = 1e6


def vm_hwm(pid: int) -> int:
    """The kernel's peak RSS of ``pid`` in bytes (/proc/PID/status VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


class Sampler:
    """Samples a process's RSS every ``interval`` s; ``take()`` returns and resets the window's peak.

    It also keeps the latest CPU time and VmHWM, so they can be read after the process exits."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.lock = threading.Lock()
        self.peak = 0
        self.last_cpu = 0.0
        self.last_hwm = 0
        self.stop_evt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_evt.is_set():
            try:
                rss = self.proc.memory_info().rss
                t = self.proc.cpu_times()
                hwm = vm_hwm(self.proc.pid)
            except Exception:  # noqa: BLE001 - the process ended
                return
            with self.lock:
                self.peak = max(self.peak, rss)
                self.last_cpu, self.last_hwm = t.user + t.system, hwm
            self.stop_evt.wait(self.interval)

    def take(self) -> int:
        with self.lock:
            peak, self.peak = self.peak, 0
        return peak

    def latest(self) -> tuple[int, int, float]:
        """(peak RSS since the last take, VmHWM, CPU seconds): the window closes now."""
        try:  # fresh values while the process lives; the last sampled ones after it exited
            t = self.proc.cpu_times()
            hwm, cpu = vm_hwm(self.proc.pid), t.user + t.system
        except Exception:  # noqa: BLE001
            hwm, cpu = self.last_hwm, self.last_cpu
        with self.lock:
            peak, self.peak = self.peak, 0
            return peak, max(hwm, self.last_hwm), max(cpu, self.last_cpu)

    def close(self) -> None:
        self.stop_evt.set()
        self.thread.join(2)


def write_agent_config(path: Path, url: str, password_file: Path, device: str, index: int) -> None:
    path.write_text(f"""# agent_footprint.py: the agent under measurement
[broker]
url = "{url}"
password_file = "{password_file}"
keepalive = 15

[federation]
name = "footprint"

[agent]
device_id = "{device}"
log_level = "warning"

[data]
model = "mlp"
hidden = {HIDDEN}
index = {index}
""")


def wait_online(url: str, user: str, password: str, device: str, timeout: float = 30.0) -> bool:
    """True once the agent's retained status is 'online' (it connected and subscribed)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from fedsync.messages import PeerStatus, decode
    from fedsync.address import BrokerAddress
    from fedsync.topics import Topics

    topic = Topics("footprint").status(device)
    online = threading.Event()

    def on_message(client, userdata, msg):
        if msg.payload and decode(bytes(msg.payload), PeerStatus).state == "online":
            online.set()

    addr = BrokerAddress.parse(url)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="footprint-watch", clean_session=True)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, 1)
    c.on_message = on_message
    c.connect(addr.host, addr.port, 15)
    c.loop_start()
    try:
        return online.wait(timeout)
    finally:
        c.loop_stop()
        c.disconnect()


def run(args) -> dict:
    import numpy as np

    from fedsync.broker_config.process import BrokerProcess, mosquitto_available
    from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
    from fedsync.coordinator.service import CoordinatorService
    from fedsync.models import build_model
    from fedsync.address import Credentials
    from fedsync.topics import Topics

    if not mosquitto_available():
        raise SystemExit("agent footprint: mosquitto is not installed (apt-get install mosquitto)")
    device = f"dev-{args.data_index}"
    users = make_users(["coordinator", device])
    params = build_model("mlp", 60, 10, HIDDEN).init_params(np.random.default_rng(0))
    num_params = sum(v.size for v in params.values())
    work = Path(tempfile.mkdtemp(prefix="fedsync-footprint-"))
    (work / "agent.pw").write_text(users[device] + "\n")

    broker = BrokerProcess("mosquitto", users=users)
    broker.start()
    write_agent_config(work / "agent.toml", broker.url, work / "agent.pw", device, args.data_index)
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.blas_threads), OMP_NUM_THREADS=str(args.blas_threads),
               PYTHONPATH=str(ROOT))
    env.update(dict(kv.split("=", 1) for kv in args.env))
    if args.tracemalloc:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--traced-agent", str(work / "agent.toml"),
               str(work / "state"), str(work / "trace.txt")]
    else:
        cmd = [sys.executable, "-m", "fedsync.cli", "agent", "--config", str(work / "agent.toml"),
               "--state-dir", str(work / "state")]
    agent = subprocess.Popen(cmd, env=env, cwd=str(work), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler = Sampler(agent.pid)
    rows: list[dict] = []
    closed: list[tuple[float, object]] = []
    closed_evt = threading.Condition()
    service = None
    try:
        if not wait_online(broker.url, "coordinator", users["coordinator"], device, 180 if args.tracemalloc else 60):
            raise RuntimeError("the agent did not come online")
        time.sleep(1.0)  # idle: connected, subscribed, no manifest yet
        peak, hwm, cpu = sampler.latest()
        idle = {"round": "idle", "peak_rss": peak, "hwm": hwm, "cpu": cpu}
        rows.append(idle)

        def on_event(e):
            if isinstance(e, RoundClosed):
                # Read the agent's counters first, on the service thread, as close to the close as possible.
                snapshot = sampler.latest()
                with closed_evt:
                    closed.append((snapshot, e))
                    closed_evt.notify_all()

        policy = RoundPolicy(rounds=args.rounds, target=1, quorum=1, min_devices=1, round_timeout=600.0)
        core = CoordinatorCore(Topics("footprint"), params, policy, hyper={"lr": 0.01, "epochs": 1.0,
                                                                           "batch_size": 10.0, "mu": 0.0},
                               incarnation=1, seed=0)
        service = CoordinatorService(core, broker.url, credentials=Credentials("coordinator", users["coordinator"]),
                                     on_event=on_event)
        started = time.monotonic()
        service.start()
        with closed_evt:
            if not closed_evt.wait_for(lambda: len(closed) >= args.rounds, timeout=600):
                raise RuntimeError(f"only {len(closed)} of {args.rounds} rounds closed")
        prev_cpu = idle["cpu"]
        for (peak, hwm, cpu), e in closed:
            if e.outcome != "committed":
                raise RuntimeError(f"round {e.round_id} {e.outcome}")
            rows.append({"round": e.round_id, "peak_rss": peak, "hwm": hwm, "cpu": cpu - prev_cpu,
                         "seconds": e.closed_at - e.started_at})
            prev_cpu = cpu
        wall = time.monotonic() - started
        try:
            agent.wait(600 if args.tracemalloc else 60)  # the finished manifest ends it with status 0
        except subprocess.TimeoutExpired:
            pass
        stats = core.stats
        result = {"bytes_in_per_round": stats.bytes_in / args.rounds, "updates": stats.updates_accepted,
                  "bytes_out_per_round": stats.bytes_out / (args.rounds + 1)}  # model v0 .. vR published
    finally:
        sampler.close()
        if agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(5)
        output = agent.stdout.read().decode(errors="replace") if agent.stdout else ""
        if sys.exc_info()[0] is not None:
            print(f"agent output:\n{output[-3000:]}", file=sys.stderr)
        if service is not None:
            service.stop()
        broker.stop()
        trace = (work / "trace.txt").read_text() if (work / "trace.txt").exists() else ""
        shutil.rmtree(work, ignore_errors=True)
    if agent.returncode not in (0, None):
        print(output[-3000:], file=sys.stderr)
    return {"rows": rows, "num_params": num_params, "wall": wall, "agent_exit": agent.returncode,
            "trace": trace, **result}


def report(res: dict, args) -> dict:
    raw = res["num_params"] * 4
    rounds = [r for r in res["rows"] if r["round"] != "idle"]
    table = []
    for r in res["rows"]:
        table.append([str(r["round"]), f"{r['peak_rss'] / MB:.1f}", f"{r['hwm'] / MB:.1f}",
                      "-" if r["round"] == "idle" else f"{r['cpu']:.2f}",
                      "-" if r["round"] == "idle" else f"{r['seconds']:.2f}",
                      f"{r['peak_rss'] / raw:.1f}x"])
    peak = max(r["hwm"] for r in res["rows"])
    cpu = median([r["cpu"] for r in rounds])
    print_table(f"One agent process (fedsync agent CLI), MLP 60-{HIDDEN}-10 = {res['num_params']:,} params "
                f"({raw / MB:.1f} MB fp32), data index {args.data_index}, {args.blas_threads} BLAS thread(s)"
                + (", under tracemalloc" if args.tracemalloc else "") + "".join(f", {kv}" for kv in args.env),
                ["round", "peak RSS MB (sampled)", "RSS high-water MB", "agent CPU s", "round s", "RSS / model"],
                table)
    print(f"peak RSS {peak / MB:.1f} MB = {peak / raw:.1f}x the raw fp32 model; goal <= {GOAL_MB:.0f} MB: "
          f"{'met' if peak / MB <= GOAL_MB else 'NOT met'} ({peak / MB / GOAL_MB:.2f} of the goal); "
          f"median CPU {cpu:.2f} s per round; per round {res['bytes_in_per_round'] / MB:.2f} MB up (update), "
          f"{res['bytes_out_per_round'] / MB:.2f} MB published by the coordinator (model, manifest, receipts); "
          f"agent exit status {res['agent_exit']}")
    if res["trace"]:
        print(res["trace"])
    return {"peak_rss_mb": round(peak / MB, 1), "ratio_vs_model": round(peak / raw, 2),
            "median_cpu_s": round(cpu, 3), "rows": res["rows"], "update_mb_per_round": res["bytes_in_per_round"] / MB,
            "published_mb_per_round": res["bytes_out_per_round"] / MB}


# -- the traced agent (child of --tracemalloc) -----------------------------------------------------------

def traced_agent(config: str, state: str, out: str) -> int:
    """Run the CLI agent under tracemalloc; write the top allocation sites at the traced peak to ``out``."""
    import tracemalloc

    tracemalloc.start(12)
    best = {"peak": 0, "snap": None}
    stop = threading.Event()

    def watch():
        while not stop.wait(0.02):
            current, _ = tracemalloc.get_traced_memory()
            # Snapshots are costly: only near a new peak, and not during start-up (imports).
            if current > 16 * MB and current > best["peak"] * 1.03:
                best["peak"], best["snap"] = current, tracemalloc.take_snapshot()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    from fedsync.cli import main

    rc = main(["agent", "--config", config, "--state-dir", state])
    stop.set()
    t.join(2)
    _, traced_peak = tracemalloc.get_traced_memory()
    lines = [f"tracemalloc: peak traced {traced_peak / MB:.1f} MB; at the largest snapshot "
             f"({best['peak'] / MB:.1f} MB held), the top allocation sites (file:line, MB held, blocks):"]
    if best["snap"] is not None:
        snap = best["snap"].filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        for stat in snap.statistics("lineno")[:15]:
            frame = stat.traceback[0]
            lines.append(f"  {stat.size / MB:7.2f} MB {stat.count:7d}  {frame.filename}:{frame.lineno}")
        lines.append("  grouped by the fedsync line that called into numpy/paho/cbor2 (traceback):")
        by_site: dict[str, int] = {}
        for stat in snap.statistics("traceback"):
            ours = next((f for f in stat.traceback if "/fedsync/" in f.filename or "/device_agent/" in f.filename
                         or "/coordinator/" in f.filename), stat.traceback[0])
            key = f"{ours.filename}:{ours.lineno}"
            by_site[key] = by_site.get(key, 0) + stat.size
        for key, size in sorted(by_site.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"  {size / MB:7.2f} MB  {key}")
    Path(out).write_text("\n".join(lines) + "\n")
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 5; quick 3)")
    p.add_argument("--data-index", type=int, default=7, help="which Synthetic device (7: 330 training samples)")
    p.add_argument("--blas-threads", type=int, default=1, help="OPENBLAS_NUM_THREADS for the agent (unit: 1)")
    p.add_argument("--tracemalloc", action="store_true", help="also show where the memory goes")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the agent, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--traced-agent", nargs=3, metavar=("CONFIG", "STATE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.traced_agent:
        return traced_agent(*args.traced_agent)
    args.rounds = args.rounds or (3 if args.quick else 5)
    print(environment(), file=sys.stderr)
    result = report(run(args), args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
