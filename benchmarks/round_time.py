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
  message to node i % 10 (100 client processes do not fit, DESIGN.md), and
  every message starts one ClientApp process on its node.

Both sides run the same fake local training (params + 1e-3 * N(0, 1), float32,
seeded per (seed, client, round); weight 100) and FedAvg over every client.

Bytes are counted one way for both: every device-side connection (MQTT device
<-> mosquitto; SuperNode <-> SuperLink) goes through a counting TCP proxy
(a separate process, below) and we report TCP payload bytes in each direction.
The coordinator / ServerApp side (beside the broker / SuperLink) is not counted.

Round time: fedsync, from the manifest's issue to the commit (coordinator
clock); Flower, from the ServerApp pushing the round's messages to the last
reply aggregated. Round 1 is a warm-up on both sides (Flower installs the app,
fedsync devices connect); the table shows the mean of rounds 2..R, and bytes
are counted from the end of round 1 to the end of round R.

Flower needs ``flwr==1.42.0`` in its own venv (never the project's)::

    python -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr==1.42.0 numpy

``--flwr-venv`` points elsewhere; ``--install-flwr`` runs that command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import selectors
import shutil
import signal
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

from broker_config.process import free_port  # noqa: E402

FLOWER_APP = ROOT / "benchmarks" / "flower_app"
DEFAULT_VENV = Path("/tmp/flwr-venv")
NOISE, SAMPLES, FEDERATION = 1e-3, 100, "bench"


# -- counting TCP proxy ----------------------------------------------------------------------

class CountingProxy:
    """A TCP relay on 127.0.0.1 in its own process that counts payload bytes each way.

    ``up`` = client -> server, ``down`` = server -> client; ``connections`` accepted so far.

    >>> # with CountingProxy(target_port=1883) as p: connect to p.port ...; p.counts()
    """

    def __init__(self, target_port: int) -> None:
        ctx = mp.get_context("spawn")
        self.target_port = target_port
        self._counters = ctx.Array("q", 3)  # up, down, connections
        self._ready = ctx.Event()
        self._port = ctx.Value("i", 0)
        self._proc = ctx.Process(target=_proxy_main, args=(target_port, self._counters, self._port, self._ready),
                                 daemon=True, name="counting-proxy")

    def start(self) -> "CountingProxy":
        self._proc.start()
        if not self._ready.wait(20):
            raise RuntimeError("counting proxy did not start")
        return self

    @property
    def port(self) -> int:
        return self._port.value

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def counts(self) -> tuple[int, int, int]:
        with self._counters.get_lock():
            return tuple(self._counters[:])  # type: ignore[return-value]

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(5)

    def __enter__(self) -> "CountingProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _proxy_main(target_port: int, counters, port_value, ready) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    sel = selectors.DefaultSelector()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    port_value.value = lsock.getsockname()[1]
    ready.set()
    pending = [0, 0]  # counted bytes not yet added to the shared counters (batching the lock)
    conns = 0
    last_flush = time.monotonic()
    limit = 4 << 20  # stop reading a side while 4 MiB wait for its peer (backpressure)

    class Side:
        __slots__ = ("sock", "peer", "buf", "direction", "closed")

        def __init__(self, sock, direction):
            self.sock, self.peer, self.buf, self.direction, self.closed = sock, None, bytearray(), direction, False

    def update(side: Side) -> None:
        if side.closed:
            return
        ev = 0
        if side.peer is not None and not side.peer.closed and len(side.peer.buf) < limit:
            ev |= selectors.EVENT_READ
        if side.buf:
            ev |= selectors.EVENT_WRITE
        try:
            if ev:
                sel.modify(side.sock, ev, side)
            else:
                sel.modify(side.sock, selectors.EVENT_READ, side)  # still notice a close
        except (KeyError, ValueError):
            pass

    def close(side: Side) -> None:
        for s in (side, side.peer):
            if s is not None and not s.closed:
                s.closed = True
                try:
                    sel.unregister(s.sock)
                except (KeyError, ValueError):
                    pass
                s.sock.close()

    while True:
        for key, mask in sel.select(0.2):
            if key.data is None:
                while True:
                    try:
                        c, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    try:
                        s = socket.create_connection(("127.0.0.1", target_port), timeout=5)
                    except OSError:
                        c.close()
                        continue
                    for x in (c, s):
                        x.setblocking(False)
                        x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    a, b = Side(c, 0), Side(s, 1)  # bytes read from the client travel up (0)
                    a.peer, b.peer = b, a
                    sel.register(c, selectors.EVENT_READ, a)
                    sel.register(s, selectors.EVENT_READ, b)
                    conns += 1
                continue
            side: Side = key.data
            if side.closed:
                continue
            if mask & selectors.EVENT_READ:
                try:
                    data = side.sock.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    # flush what the peer still owes, then close both
                    if side.peer is not None and side.peer.buf:
                        try:
                            side.peer.sock.setblocking(True)
                            side.peer.sock.sendall(side.peer.buf)
                        except OSError:
                            pass
                    close(side)
                    continue
                if data:
                    pending[side.direction] += len(data)
                    side.peer.buf += data
                    update(side.peer)
                    update(side)
            if mask & selectors.EVENT_WRITE and side.buf and not side.closed:
                try:
                    n = side.sock.send(side.buf)
                    del side.buf[:n]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    close(side)
                    continue
                update(side)
                if side.peer is not None:
                    update(side.peer)
        now = time.monotonic()
        if now - last_flush > 0.02 or pending[0] + pending[1] > (8 << 20):
            with counters.get_lock():
                counters[0] += pending[0]
                counters[1] += pending[1]
                counters[2] = conns
            pending[0] = pending[1] = 0
            last_flush = now


# -- the coordinator in its own process ------------------------------------------------------

def coordinator_main(url: str, password: str, policy: dict, num_params: int, events, stop, seed: int = 0) -> None:
    """Run a CoordinatorService until ``stop`` is set; report each RoundClosed and final stats on ``events``."""
    import logging

    from fedsync.memtune import keep_freed_memory

    keep_freed_memory()  # as `fedsync coordinator` does

    import numpy as np

    from coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
    from coordinator.service import CoordinatorService
    from fedsync.mqtt import Credentials
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

    @property
    def mean_round(self) -> float:
        return sum(self.round_seconds) / len(self.round_seconds) if self.round_seconds else float("nan")


def raise_nofile(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (up to the hard limit); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- fedsync ---------------------------------------------------------------------------------

def run_fedsync(clients: int, params: int, codec: str, rounds: int, seed: int = 0) -> Result:
    import secrets

    from broker_config.process import BrokerProcess
    from device_agent.service import DeviceSpec
    from device_agent.swarm import NoiseTrainer, Swarm
    from fedsync.mqtt import Credentials
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


def _become_subreaper() -> None:
    """Orphans of our children (Flower detaches superexec and app processes) reparent to us, not to
    PID 1 (which in a container may never reap them), so ``ProcessTree.stop`` can reap them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


class ProcessTree:
    """Processes started here, each in its own session; ``stop`` ends each and its descendants by pid."""

    def __init__(self) -> None:
        _become_subreaper()
        self.procs: list[subprocess.Popen] = []
        self.seen: dict[int, object] = {}  # pid -> psutil.Process, descendants noticed while running

    def spawn(self, argv: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
        f = open(log, "ab")
        p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        f.close()
        self.procs.append(p)
        return p

    def note_descendants(self) -> None:
        import psutil

        for p in self.procs:
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    self.seen.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        import psutil

        self.note_descendants()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 8
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid, proc in self.seen.items():  # superexec, serverapp, clientapps (detached by Flower)
            try:
                if proc.is_running():
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
        for pid in self.seen:
            try:
                os.waitpid(pid, 0)  # ours as subreaper: no zombies left behind
            except ChildProcessError:
                pass


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
    results = work / "rounds.jsonl"
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
                          f"results-file='{results}'")
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
                    up, down, _ = proxy.counts()
                    marks.append((up, down))
                    res.round_seconds.append(row["seconds"])
                    if row["replies"] != clients:
                        res.note = f"round {row['round']}: {row['replies']} of {clients} replies"
                    seen += 1
            if seen < rounds:
                raise RuntimeError(f"Flower: {seen} of {rounds} rounds in time; superlink log:\n"
                                   f"{_tail(work / 'superlink.log')}")
    finally:
        tree.stop()
        shutil.rmtree(work, ignore_errors=True)
    measured = rounds - 1
    res.round_seconds = res.round_seconds[1:]
    res.bytes_up = (marks[-1][0] - marks[0][0]) / measured
    res.bytes_down = (marks[-1][1] - marks[0][1]) / measured
    return res


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
                "up/client", "down/client", "vs Flower: time", "vs Flower: bytes"):
        t.add_column(col, justify="right" if col not in ("system", "codec") else "left")
    for r in results:
        flower = next((f for f in results if f.system.startswith("Flower") and (f.clients, f.params) ==
                       (r.clients, r.params)), None)
        ratio_t = ratio_b = ""
        if flower is not None and r is not flower and flower.round_seconds:
            ratio_t = f"{r.mean_round / flower.mean_round:.3f}"
            ratio_b = f"{(r.bytes_up + r.bytes_down) / (flower.bytes_up + flower.bytes_down):.3f}"
        t.add_row(r.system, f"{r.clients} x {r.params:,}", r.codec, f"{r.mean_round:.2f}", mb(r.bytes_up),
                  mb(r.bytes_down), mb(r.bytes_up / r.clients), mb(r.bytes_down / r.clients), ratio_t, ratio_b)
    Console(width=200).print(t)
    for r in results:
        print(f"- {r.system} {r.clients}x{r.params} {r.codec}: rounds {[round(s, 2) for s in r.round_seconds]}; "
              f"hosting: {r.hosting}{'; ' + r.note if r.note else ''}")


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
