"""Round wall time and bytes on the wire: fedsync over mosquitto vs Flower 1.42's deployment engine.

    python benchmarks/round_time.py --quick          # 10 clients x 100k params, 2 rounds
    python benchmarks/round_time.py                  # 10 x 1M and 100 x 100k, 3 rounds each

What runs (all on 127.0.0.1, every process started here is stopped here):

* fedsync: mosquitto (BrokerProcess, a password per device), the coordinator
  (CoordinatorService) in its own process, N devices in one Swarm (one selector
  thread, one MQTT connection each). Codec ``zstd`` and ``raw`` (model and update).
* Flower 1.42: ``flower-superlink`` (one HTTP port for Fleet, Control and
  ServerAppIo; it starts ``flower-superexec`` and the ServerApp), ``min(N, 10)``
  ``flower-supernode`` processes, and the hand-written app in
  ``benchmarks/flower_app`` submitted with ``flwr run``. With N > 10 each
  SuperNode serves N/10 logical clients: the ServerApp sends client i's
  message to node i % 10 (100 separate client processes and their ClientApps do not fit in memory here), and
  every message starts one ClientApp process on its node.

Both sides run the same fake local training (params + 1e-3 * N(0, 1), float32,
seeded per (seed, client, round); weight 100) and FedAvg over every client.

Bytes are counted one way for both: every device-side connection (MQTT device
<-> mosquitto; SuperNode <-> SuperLink) goes through a counting TCP proxy
(``benchmarks.common.CountingProxy``: ChaosProxy's clean profile in a separate
process) and we report TCP payload bytes in each direction.
The coordinator / ServerApp side (beside the broker / SuperLink) is not counted.

Round time: fedsync, from the manifest's issue to the commit (coordinator
clock); Flower, from the ServerApp pushing the round's messages to the last
reply aggregated. Round 1 is a warm-up on both sides (Flower installs the app,
fedsync devices connect); the table shows the mean of rounds 2..R, and bytes
are counted from the end of round 1 to the end of round R.

Where Flower's time goes ("where the time goes" column, :func:`flower_breakdown`): the
ClientApp appends, per message, its process's start, ``train``'s start and end and the CPU
its start-up took; the ServerApp its push and done times. A round is followed along the
SuperNode whose reply came last: its ClientApp start-ups + training + the waits around them
(Flower 1.42's polling and hand-offs: the SuperNode pulls every 3 s when idle, SuperExec
polls for tasks every 1 s, the SuperNode polls for the ClientApp's reply every 0.5 s, the
ServerApp pulls replies every 3 s).

Flower needs ``flwr==1.42.0`` in its own venv (never the project's)::

    python -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr==1.42.0 numpy

``--flwr-venv`` points elsewhere; ``--install-flwr`` runs that command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import CountingProxy, ProcessTree, environment, raise_nofile  # noqa: E402
from fedsync.broker_config.process import free_port  # noqa: E402

FLOWER_APP = ROOT / "benchmarks" / "flower_app"
DEFAULT_VENV = Path("/tmp/flwr-venv")
NOISE, SAMPLES, FEDERATION = 1e-3, 100, "bench"
FEDSYNC_WHERE = "no process starts, no polling: long-lived MQTT sessions; the broker pushes each message"


# -- the coordinator in its own process ------------------------------------------------------

def coordinator_main(url: str, password: str, policy: dict, num_params: int, events, stop, seed: int = 0) -> None:
    """Run a CoordinatorService until ``stop`` is set; report each RoundClosed and final stats on ``events``."""
    import logging

    from fedsync.transport.memtune import keep_freed_memory

    keep_freed_memory()  # as `fedsync coordinator` does

    import numpy as np

    from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
    from fedsync.coordinator.service import CoordinatorService
    from fedsync.address import Credentials
    from fedsync.topics import Topics

    logging.basicConfig(level=logging.WARNING)

    def on_event(e) -> None:
        if isinstance(e, RoundClosed):
            events.put(("round", {"round_id": e.round_id, "outcome": e.outcome, "accepted": len(e.accepted),
                                  "selected": len(e.selected), "seconds": e.closed_at - e.started_at,
                                  "closed_at": e.closed_at, "cpu": time.process_time(),
                                  "bytes_in": core.stats.bytes_in, "bytes_out": core.stats.bytes_out,
                                  "max_abs": float(np.abs(e.vector).max()) if e.vector is not None else None}))

    core = CoordinatorCore(Topics(FEDERATION), {"w": np.zeros(num_params, np.float32)}, RoundPolicy(**policy),
                           hyper={"lr": 1.0}, incarnation=1, seed=seed)
    service = CoordinatorService(core, url, credentials=Credentials("coordinator", password), on_event=on_event)
    service.start()
    events.put(("started", os.getpid()))
    stop.wait()
    s = core.stats
    events.put(("stats", {"updates_accepted": s.updates_accepted, "duplicates_dropped": s.duplicates_dropped,
                          "shards_accepted": s.shards_accepted, "shards_rejected": s.shards_rejected,
                          "rounds_committed": s.rounds_committed, "rounds_abandoned": s.rounds_abandoned,
                          "bytes_in": s.bytes_in, "bytes_out": s.bytes_out}))
    service.stop()


def stop_coordinator(coord, stop, events, timeout: float) -> dict | None:
    """Ask the coordinator process (``coordinator_main``) to stop, collect the stats it reports
    on the way out, and reap it (killing it if it does not exit)."""
    stop.set()
    stats = None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            kind, body = events.get(timeout=1.0)
        except Exception:  # noqa: BLE001 - queue.Empty from a multiprocessing queue
            continue
        if kind == "stats":
            stats = body
            break
    coord.join(10)
    if coord.is_alive():
        coord.kill()
    return stats


@dataclass
class Result:
    system: str
    clients: int
    params: int
    codec: str
    hosting: str
    round_seconds: list[float] = field(default_factory=list)
    bytes_up: float = 0.0  # per measured round, device -> server
    bytes_down: float = 0.0
    note: str = ""
    where: dict = field(default_factory=dict)  # Flower: where a round's time goes (flower_breakdown)

    @property
    def mean_round(self) -> float:
        return sum(self.round_seconds) / len(self.round_seconds) if self.round_seconds else float("nan")


# -- fedsync ---------------------------------------------------------------------------------

def run_fedsync(clients: int, params: int, codec: str, rounds: int, seed: int = 0) -> Result:
    import secrets

    from fedsync.broker_config.process import BrokerProcess
    from fedsync.device_agent.service import DeviceSpec
    from fedsync.lab.swarm import NoiseTrainer, Swarm
    from fedsync.address import Credentials
    from fedsync.topics import Topics

    raise_nofile(4 * clients + 256)
    users = {"coordinator": secrets.token_urlsafe(12), **{f"dev-{i}": secrets.token_urlsafe(12) for i in range(clients)}}
    policy = dict(rounds=rounds, target=clients, quorum=clients, min_devices=clients, round_timeout=600.0,
                  model_codec=codec, update_codec=codec)
    ctx = mp.get_context("spawn")
    events, stop = ctx.Queue(), ctx.Event()
    res = Result("fedsync", clients, params, codec, f"{clients} MQTT connections in 1 swarm process; "
                 "coordinator in its own process")
    with BrokerProcess("mosquitto", users=users) as broker, CountingProxy(broker.port) as proxy:
        coord = ctx.Process(target=coordinator_main, args=(broker.url, users["coordinator"], policy, params,
                                                            events, stop, seed), daemon=True)
        coord.start()
        specs = [DeviceSpec(f"dev-{i}", NoiseTrainer(SAMPLES, NOISE), Credentials(f"dev-{i}", users[f"dev-{i}"]))
                 for i in range(clients)]
        swarm = Swarm(f"mqtt://127.0.0.1:{proxy.port}", Topics(FEDERATION), specs, seed=seed,
                      train_workers=2, max_connecting=32)
        swarm.start()
        marks: list[tuple[int, int]] = []
        try:
            deadline = time.monotonic() + 300 + 120 * rounds
            while len(res.round_seconds) < rounds and time.monotonic() < deadline:
                try:
                    kind, body = events.get(timeout=1.0)
                except Exception:  # noqa: BLE001 - queue.Empty from another module
                    continue
                if kind == "round":
                    if body["outcome"] != "committed":
                        raise RuntimeError(f"fedsync round {body['round_id']} {body['outcome']}")
                    up, down, _ = proxy.counts()
                    marks.append((up, down))
                    res.round_seconds.append(body["seconds"])
            if len(res.round_seconds) < rounds:
                raise RuntimeError(f"fedsync: only {len(res.round_seconds)} of {rounds} rounds committed")
        finally:
            failures = swarm.failures
            swarm.stop()
            stats = stop_coordinator(coord, stop, events, 15)
    measured = rounds - 1
    res.round_seconds = res.round_seconds[1:]
    res.bytes_up = (marks[-1][0] - marks[0][0]) / measured
    res.bytes_down = (marks[-1][1] - marks[0][1]) / measured
    if stats:
        res.note = (f"accepted {stats['updates_accepted']}, duplicates {stats['duplicates_dropped']}, "
                    f"rejected {stats['shards_rejected']}" + (f", swarm step failures {failures}" if failures else ""))
    return res


# -- Flower ------------------------------------------------------------------------------------

def flwr_env(venv: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    return env


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}); log tail:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s; log tail:\n{_tail(log)}")


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_flower(clients: int, params: int, rounds: int, venv: Path, seed: int = 0) -> Result:
    nodes = min(clients, 10)
    per = clients // nodes
    hosting = (f"{nodes} SuperNodes x {per} logical client{'s' if per > 1 else ''} each "
               f"(1 ClientApp process per message)")
    res = Result("Flower 1.42 deployment", clients, params, "protobuf (raw fp32)", hosting)
    work = Path(tempfile.mkdtemp(prefix="fedsync-flwr-"))
    home = work / "home"
    home.mkdir()
    env = flwr_env(venv, home)
    tree = ProcessTree()
    results, timings = work / "rounds.jsonl", work / "timings.jsonl"
    rows: list[dict] = []
    try:
        link_port = free_port()
        tree.spawn([str(venv / "bin" / "flower-superlink"), "--insecure", "--port", str(link_port),
                    "--disable-runtime-dependency-installation"], env, work / "superlink.log", work)
        _wait_port(link_port, 60, tree.procs[0], work / "superlink.log")
        with CountingProxy(link_port) as proxy:
            for i in range(nodes):
                tree.spawn([str(venv / "bin" / "flower-supernode"), "--insecure",
                            "--superlink", f"127.0.0.1:{proxy.port}", "--port", str(free_port())],
                           env, work / f"supernode-{i}.log", work)
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\n'
                f"insecure = true\n", encoding="utf-8")
            run_config = (f"num-params={params} num-clients={clients} num-rounds={rounds} seed={seed} "
                          f"noise-scale={NOISE} num-samples={SAMPLES} min-nodes={nodes} "
                          f"results-file='{results}' timings-file='{timings}'")
            out = subprocess.run([str(venv / "bin" / "flwr"), "run", str(FLOWER_APP), "bench",
                                  "--run-config", run_config], env=env, cwd=work, capture_output=True,
                                 text=True, timeout=180)
            if out.returncode != 0:
                raise RuntimeError(f"flwr run failed ({out.returncode}): {out.stdout}\n{out.stderr}")
            marks: list[tuple[int, int]] = []
            seen = 0
            deadline = time.monotonic() + 120 + 300 * rounds
            while seen < rounds and time.monotonic() < deadline:
                time.sleep(0.05)
                tree.note_descendants()
                lines = results.read_text().splitlines() if results.exists() else []
                while seen < len(lines):
                    row = json.loads(lines[seen])
                    rows.append(row)
                    up, down, _ = proxy.counts()
                    marks.append((up, down))
                    res.round_seconds.append(row["seconds"])
                    if row["replies"] != clients:
                        res.note = f"round {row['round']}: {row['replies']} of {clients} replies"
                    seen += 1
            if seen < rounds:
                raise RuntimeError(f"Flower: {seen} of {rounds} rounds in time; superlink log:\n"
                                   f"{_tail(work / 'superlink.log')}")
        per_message = [json.loads(x) for x in timings.read_text().splitlines()] if timings.exists() else []
        res.where = flower_breakdown(rows[1:], per_message)
    finally:
        tree.stop()
        shutil.rmtree(work, ignore_errors=True)
    measured = rounds - 1
    res.round_seconds = res.round_seconds[1:]
    res.bytes_up = (marks[-1][0] - marks[0][0]) / measured
    res.bytes_down = (marks[-1][1] - marks[0][1]) / measured
    return res


def flower_breakdown(rounds: list[dict], messages: list[dict]) -> dict:
    """Where Flower's measured rounds spend their time, averaged over ``rounds`` (ServerApp rows).

    Every message is one ClientApp process: its start-up (process start to ``train`` entry:
    interpreter, flwr and numpy imports, fetching app and message) and its training are timed
    by the ClientApp itself. A round ends with the last reply, so its time is followed along the
    node that finished last, whose messages run one after another (a SuperNode hands out one
    message at a time): that node's start-ups + training + the waits around them, which are
    Flower's polling and hand-offs: first launch (SuperNode pull, every 3 s when idle; SuperExec
    task poll, 1 s), between messages (reply poll 0.5 s, push, next pull and launch), and after
    the last reply (push to the SuperLink; the ServerApp pulls replies every 3 s).
    """
    out: list[dict] = []
    for r in rounds:
        mine = [m for m in messages if m["round"] == r["round"]]
        if not mine or "pushed" not in r:
            continue
        last = max(mine, key=lambda m: m["train_end"])
        path = sorted((m for m in mine if m["node"] == last["node"]), key=lambda m: m["process_start"])
        startups = sum(m["train_start"] - m["process_start"] for m in path)
        training = sum(m["train_end"] - m["train_start"] for m in path)
        between = sum(b["process_start"] - a["train_end"] for a, b in zip(path, path[1:]))
        out.append({"seconds": r["done"] - r["pushed"], "process_starts": len({m["pid"] for m in mine}),
                    "startup_mean": sum(m["train_start"] - m["process_start"] for m in mine) / len(mine),
                    "startup_cpu_mean": sum(m["startup_cpu"] for m in mine) / len(mine),
                    "path_messages": len(path), "path_startups": startups, "path_training": training,
                    "first_launch_wait": path[0]["process_start"] - r["pushed"], "between_waits": between,
                    "last_reply_wait": r["done"] - last["train_end"]})
    if not out:
        return {}
    return {k: sum(x[k] for x in out) / len(out) for k in out[0]} | {"rounds": len(out)}


def where_text(w: dict) -> str:
    """The table's one-cell summary of :func:`flower_breakdown`."""
    if not w:
        return ""
    waits = w["first_launch_wait"] + w["between_waits"] + w["last_reply_wait"]
    return (f"{w['process_starts']:.0f} ClientApp starts/round ({w['startup_mean']:.2f} s, "
            f"{w['startup_cpu_mean']:.2f} CPU-s each). Last node, {w['path_messages']:.0f} msg: "
            f"start-ups {w['path_startups']:.1f} s + training {w['path_training']:.2f} s + polling/hand-offs "
            f"{waits:.1f} s (first launch {w['first_launch_wait']:.1f}, between {w['between_waits']:.1f}, "
            f"last reply to ServerApp {w['last_reply_wait']:.1f})")


def locate_venv(path: Path, install: bool) -> Path | None:
    if (path / "bin" / "flower-superlink").exists():
        return path
    cmd = f"python -m venv {path} && {path}/bin/pip install flwr==1.42.0 numpy"
    if not install:
        print(f"Flower 1.42 venv not found at {path}; create it with:\n    {cmd}\n(or pass --install-flwr)")
        return None
    subprocess.run(cmd, shell=True, check=True)
    return path


# -- report ---------------------------------------------------------------------------------------

def mb(x: float) -> str:
    return f"{x / 1e6:,.2f}"


def report(results: list[Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Round time and device-side bytes per round (mean of rounds 2..R, same run)")
    for col in ("system", "clients x params", "codec", "s/round", "MB up/round", "MB down/round",
                "up/client", "down/client", "vs Flower: time", "vs Flower: bytes", "where the time goes"):
        t.add_column(col, justify="right" if col not in ("system", "codec", "where the time goes") else "left")
    for r in results:
        flower = next((f for f in results if f.system.startswith("Flower") and (f.clients, f.params) ==
                       (r.clients, r.params)), None)
        ratio_t = ratio_b = ""
        if flower is not None and r is not flower and flower.round_seconds:
            ratio_t = f"{r.mean_round / flower.mean_round:.3f}"
            ratio_b = f"{(r.bytes_up + r.bytes_down) / (flower.bytes_up + flower.bytes_down):.3f}"
        t.add_row(r.system, f"{r.clients} x {r.params:,}", r.codec, f"{r.mean_round:.2f}", mb(r.bytes_up),
                  mb(r.bytes_down), mb(r.bytes_up / r.clients), mb(r.bytes_down / r.clients), ratio_t, ratio_b,
                  where_text(r.where) if r.where else FEDSYNC_WHERE if r.system == "fedsync" else "")
    Console(width=260).print(t)
    for r in results:
        print(f"- {r.system} {r.clients}x{r.params} {r.codec}: rounds {[round(s, 2) for s in r.round_seconds]}; "
              f"hosting: {r.hosting}{'; ' + r.note if r.note else ''}")
        if r.where:
            print(f"  where the time goes (mean of {r.where['rounds']} measured round(s)): {where_text(r.where)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 clients x 100k params, 2 rounds")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 is the warm-up)")
    ap.add_argument("--configs", default="10x1000000,100x100000", help="CLIENTSxPARAMS,...")
    ap.add_argument("--codecs", default="zstd,raw", help="fedsync codecs to run")
    ap.add_argument("--flwr-venv", type=Path, default=DEFAULT_VENV, help="venv holding flwr==1.42.0")
    ap.add_argument("--install-flwr", action="store_true", help="create --flwr-venv if it is missing")
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args(argv)
    if a.quick:
        a.configs, a.rounds = "10x100000", 2
    if a.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is the warm-up)")
    configs = [tuple(int(x) for x in c.split("x")) for c in a.configs.split(",")]
    print(environment(), flush=True)
    venv = None if a.no_flower else locate_venv(a.flwr_venv, a.install_flwr)
    results: list[Result] = []
    for clients, params in configs:
        for codec in a.codecs.split(","):
            print(f"fedsync {clients} x {params} {codec} ...", flush=True)
            results.append(run_fedsync(clients, params, codec, a.rounds))
        if venv is not None:
            print(f"Flower {clients} x {params} ...", flush=True)
            try:
                results.append(run_flower(clients, params, a.rounds, venv))
            except Exception as exc:  # noqa: BLE001 - report, keep the fedsync numbers
                print(f"Flower run failed: {exc}")
    report(results)
    if a.json:
        a.json.write_text(json.dumps([{**r.__dict__, "mean_round": r.mean_round} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
