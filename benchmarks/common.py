"""Shared helpers for the benchmarks: import path, broker users, tables, the one-line environment
note, a byte-counting proxy in a process of its own, and process-tree cleanup.

Every benchmark is a script (``python benchmarks/NAME.py [--quick]``) that
starts what it needs on 127.0.0.1, stops it all on exit, prints a table and
the ratios against its baseline, and can write the same as JSON (``--json``).

Theory of operation (the two stateful helpers)
----------------------------------------------
:class:`CountingProxy` is :class:`fedsync.lab.chaos.ChaosProxy` with the ``clean`` profile
(no latency, no bandwidth cap, no faults; it counts payload bytes each way and the
connections it accepted), run in a spawned child process so that relaying a benchmark's
traffic takes no CPU time from the process being measured (a swarm of devices, say). The
parent talks to the child over one pipe: the child sends its port once listening, then
answers each ``"counts"`` request with ``(bytes_up, bytes_down, connections)`` read at that
moment, and ``"stop"`` (or the pipe closing) stops the proxy and ends the child.

:class:`ProcessTree` owns the processes a benchmark starts with :meth:`ProcessTree.spawn`
(each in its own session), remembers every descendant it has seen (psutil), and on
:meth:`ProcessTree.stop` ends them all by pid: SIGTERM to its own, SIGKILL after a grace
period, then SIGKILL to descendants still running. It makes this process a child subreaper
(Linux), so grandchildren that their parent detached are reparented here and reaped, not
left as zombies under a PID 1 that may never reap them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout, not an install
    sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024


def make_users(names: list[str]) -> dict[str, str]:
    """A fresh random password for each broker account."""
    return {name: secrets.token_urlsafe(12) for name in names}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment() -> str:
    """One line saying where a number was measured (results depend on it)."""
    import numpy as np

    try:
        import paho.mqtt as paho_mqtt
        paho_version = paho_mqtt.__version__
    except Exception:  # noqa: BLE001 - informational only
        paho_version = "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}, "
            f"numpy {np.__version__}, paho-mqtt {paho_version}, load1 {load:.2f} at start")


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """A rich table when rich is installed (coordinator extra), plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(c) for c in row))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=max(100, sum(len(c) + 5 for c in columns))).print(table)


def raise_nofile(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (up to the hard limit); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- a counting proxy in its own process ----------------------------------------------------------

class CountingProxy:
    """ChaosProxy's clean profile on 127.0.0.1 in a process of its own: counts payload bytes each way.

    ``counts()`` is ``(up, down, connections)``: client -> server bytes, server -> client
    bytes, connections accepted so far.

    >>> with CountingProxy(target_port=1883) as p:  # doctest: +SKIP
    ...     ...  # connect to 127.0.0.1:p.port instead of 1883
    ...     up, down, connections = p.counts()
    """

    def __init__(self, target_port: int) -> None:
        ctx = mp.get_context("spawn")
        self.target_port = target_port
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_proxy_main, args=(target_port, child), daemon=True, name="counting-proxy")
        self._port = 0

    def start(self) -> CountingProxy:
        self._proc.start()
        try:
            if not self._conn.poll(30):
                raise EOFError
            self._port = self._conn.recv()
        except EOFError:
            self.stop()
            raise RuntimeError(f"counting proxy to port {self.target_port} did not start") from None
        return self

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def counts(self) -> tuple[int, int, int]:
        self._conn.send("counts")
        return self._conn.recv()

    def stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send("stop")
                self._conn.poll(15)
            except (BrokenPipeError, EOFError, OSError):
                pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _proxy_main(target_port: int, conn) -> None:
    """The child: one ChaosProxy (clean profile) until told to stop or the parent goes away."""
    from fedsync.lab.chaos import ChaosProxy, get_profile

    raise_nofile(1 << 20)  # as many connections as the hard limit allows (1,000 devices in scale.py)
    proxy = ChaosProxy(None, ("127.0.0.1", target_port), get_profile("clean"), seed=0).start()
    try:
        conn.send(proxy.port)
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            if request == "counts":
                s = proxy.stats()
                conn.send((s["bytes_up"], s["bytes_down"], s["connections"]))
            elif request == "stop":
                return
    finally:
        proxy.stop()
        try:
            conn.send("stopped")
        except (BrokenPipeError, OSError):
            pass


# -- process trees ---------------------------------------------------------------------------------

def become_subreaper() -> None:
    """Orphans of our children reparent to us, not to PID 1 (which in a container may never reap
    them), so :meth:`ProcessTree.stop` can reap them (Linux ``PR_SET_CHILD_SUBREAPER``; elsewhere
    a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


class ProcessTree:
    """Processes started here, each in its own session; ``stop`` ends each and its descendants by pid.

    >>> tree = ProcessTree()  # doctest: +SKIP
    >>> tree.spawn(["flower-superlink", "--insecure"], env, work / "superlink.log", work)  # doctest: +SKIP
    >>> tree.stop()  # doctest: +SKIP
    """

    def __init__(self, grace: float = 8.0) -> None:
        become_subreaper()
        self.grace = grace
        self.procs: list[subprocess.Popen] = []
        self.seen: dict[int, object] = {}  # pid -> psutil.Process, descendants noticed while running

    def spawn(self, argv: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
        """Start ``argv`` in its own session with stdout and stderr appended to ``log``."""
        with open(log, "ab") as f:
            p = subprocess.Popen(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def note_descendants(self) -> None:
        """Remember every descendant running now (a detached one is found no other way)."""
        import psutil

        for p in self.procs:
            try:
                for c in psutil.Process(p.pid).children(recursive=True):
                    self.seen.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass

    def stop(self) -> None:
        """SIGTERM every spawned process, SIGKILL after ``grace``, then kill and reap the descendants."""
        import psutil

        self.note_descendants()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for proc in self.seen.values():
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
