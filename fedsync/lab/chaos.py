"""A seeded, fault-injecting TCP proxy between MQTT clients and a broker.

Theory of operation
-------------------
``ChaosProxy`` listens on a loopback port and relays every accepted
connection to the upstream broker, shaping it the way a phone's Wi-Fi or a
Raspberry Pi's 3G dongle would. Each connection has two independent
directions (client -> broker is "up", broker -> client is "down"); each
direction is a reader that stamps chunks with their arrival time and a writer
that holds each chunk until ``arrival + latency``, then paces it through a
token bucket (bandwidth cap). TCP delivers a byte stream in order, so the
only faults that can honestly be injected at this layer are the ones a real
link produces:

* **latency** - every chunk is delayed by ``latency_ms +- jitter_ms``,
  never reordered (a later chunk is never delivered before an earlier one);
* **bandwidth** - a token bucket per direction, ``burst_bytes`` deep;
* **reset** - both sockets closed with ``SO_LINGER 0``, so each peer gets an
  RST (a NAT rebinding, a Wi-Fi roam);
* **stall** - nothing is forwarded in either direction, sockets stay open,
  closes are held too: a half-open link that only keepalives can detect;
* **blackout** - every open connection is reset and new ones are black-holed
  (accepted, never answered, reset when the blackout ends) or refused.

Duplicates and reordering of MQTT packets are *not* simulated: TCP cannot
produce them, so faking them here would test a network that does not exist.
MQTT-level duplicates arise naturally from QoS 1 redelivery after a reset.

Determinism: the schedule of resets and stalls of the k-th accepted
connection is a pure function of ``(profile, seed, k)`` (:func:`fault_schedule`
over :func:`connection_streams`), and the blackout schedule of
``(profile, seed)``; timings on the wire still vary with the OS scheduler.
Faults are timed from the moment a connection is accepted (blackouts from
``start()``); ``set_profile`` restarts both schedules under the new profile.

The proxy runs its own asyncio event loop in one thread; the public methods
are thread-safe and return once the loop has done what they ask. The proxy's own
state is the set of open connections, the counters and ``blackout_until`` (while
the loop clock is before it, new connections are black-holed or refused).

Modules: the profiles and the schedules (pure functions) are in
:mod:`fedsync.lab.chaos_profiles`, one shaped connection in
:mod:`fedsync.lab.chaos_link`; this module is the listener, the blackouts, the
faults on demand and the ``fedsync chaos`` command. It re-exports the profile API.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import logging
import math
import random
import signal
import sys
import threading
import time
from dataclasses import fields
from types import TracebackType

from fedsync.lab.chaos_link import ChaosConnection, reset_socket
from fedsync.lab.chaos_profiles import (PROFILES, Fault, LinkProfile, TokenBucket, blackout_schedule,
                                        connection_streams, fault_schedule, get_profile)
from fedsync.log import configure, format_event, log_event

__all__ = ["COUNTERS", "PROFILES", "ChaosProxy", "Fault", "LinkProfile", "TokenBucket", "blackout_schedule",
           "build_parser", "connection_streams", "fault_schedule", "get_profile", "main"]

log = logging.getLogger("fedsync.chaos")

COUNTERS = ("connections", "resets", "stalls", "blackouts", "blackout_drops", "upstream_failures",
            "bytes_up", "bytes_down")


class ChaosProxy:
    """A fault-injecting TCP proxy on a loopback port, in its own thread and event loop.

    Devices connect to ``url``; the k-th accepted connection's faults are fixed by
    ``(seed, k)``. A connection accepted during a blackout is black-holed or refused.

    >>> with ChaosProxy(None, (broker.host, broker.port), get_profile("wifi-flaky"), seed=1) as proxy:  # doctest: +SKIP
    ...     fed = LocalFederation(proxy.url, users, coordinator_url=broker.url, n_devices=6)
    """

    def __init__(self, listen_port: int | None, upstream: tuple[str, int], profile: LinkProfile, seed: int,
                 *, listen_host: str = "127.0.0.1") -> None:
        if not _is_loopback(listen_host):
            raise ValueError(f"listen_host must be a loopback address (127.0.0.0/8 or ::1), got {listen_host!r}")
        self.listen_host, self.upstream, self.seed = listen_host, (upstream[0], int(upstream[1])), seed
        self.profile = profile
        self._port = listen_port or 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._conns: set[ChaosConnection] = set()
        self._handlers: set[asyncio.Task] = set()
        self._next_index = itertools.count()
        self._blackout_until = 0.0
        self._blackout_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- addresses and counters ------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"mqtt://{host}:{self._port}"

    def stats(self) -> dict[str, int]:
        """Counters since start: connections (accepted), active, resets (random and ``reset_all``),
        stalls, blackouts (periods begun), blackout_drops (connections reset, refused or
        black-holed by a blackout), upstream_failures, bytes_up (client -> broker), bytes_down."""
        out = dict(self._counts)
        out["active"] = len(self._conns)
        return out

    def planned_faults(self, index: int, n: int) -> list[Fault]:
        """The first ``n`` faults the ``index``-th connection gets under the current profile."""
        return list(itertools.islice(fault_schedule(self.profile, connection_streams(self.seed, index)[0]), n))

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a counter of :data:`COUNTERS`; on the loop thread only (connections call it)."""
        self._counts[name] += n

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> ChaosProxy:
        if self._thread is not None:
            raise RuntimeError("ChaosProxy already started")
        ready: list = []
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready, started), name=f"chaos-{self._port}",
                                        daemon=True)
        self._thread.start()
        started.wait()
        if ready and isinstance(ready[0], BaseException):
            self._thread.join()
            self._thread = None
            raise ready[0]
        log_event(log, "chaos_listening", logging.INFO, url=self.url, upstream=f"{self.upstream[0]}:{self.upstream[1]}",
                  profile=self.profile.name, seed=self.seed)
        return self

    def stop(self) -> None:
        """Reset every connection, close the listener, end the thread."""
        if self._thread is None or self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- faults on demand (thread-safe; return once applied) ------------------------------------------

    def reset_all(self) -> int:
        """Reset (RST) every open connection now; returns how many."""
        return self._call(self._reset_all)

    def stall_all(self, seconds: float) -> int:
        """Stall every open connection for ``seconds`` (new connections are not stalled)."""
        return self._call(self._stall_all, seconds)

    def blackout_now(self, seconds: float) -> int:
        """Begin a blackout of ``seconds`` now; returns how many open connections it dropped."""
        return self._call(self._begin_blackout, seconds)

    def set_profile(self, profile: LinkProfile) -> None:
        """Switch profile: latency and bandwidth at once; fault and blackout schedules restart now."""
        self._call(self._set_profile, profile)

    def _call(self, fn, *args):
        if self._loop is None or self._thread is None:
            raise RuntimeError("ChaosProxy is not running")

        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # -- on the loop thread ------------------------------------------------------------------------------

    def _run(self, ready: list, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # this thread's own loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.listen_host, self._port))
        except OSError as exc:
            ready.append(exc)
            started.set()
            loop.close()
            self._loop = None
            return
        self._port = self._server.sockets[0].getsockname()[1]
        self._restart_blackouts()
        started.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._blackout_task is not None:
            self._blackout_task.cancel()
        for c in list(self._conns):
            c.end(abortive=True)
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        index = next(self._next_index)
        self.count("connections")
        loop = asyncio.get_running_loop()
        try:
            if loop.time() < self._blackout_until:
                self.count("blackout_drops")
                if self.profile.blackout_new == "blackhole":
                    while (wait := self._blackout_until - loop.time()) > 0:
                        await asyncio.sleep(wait)  # silence, then the reset a returning link would see
                reset_socket(writer)
                return
            conn = ChaosConnection(self, index, writer)
            self._conns.add(conn)
            try:
                await conn.run(reader)
            finally:
                self._conns.discard(conn)
        except asyncio.CancelledError:
            reset_socket(writer)
        finally:
            self._handlers.discard(task)

    def _reset_all(self) -> int:
        conns = list(self._conns)
        for c in conns:
            c.end(abortive=True)
        self.count("resets", len(conns))
        log_event(log, "chaos_reset_all", logging.INFO, connections=len(conns))
        return len(conns)

    def _stall_all(self, seconds: float) -> int:
        for c in self._conns:
            c.stall(seconds)
        log_event(log, "chaos_stall_all", logging.INFO, connections=len(self._conns), seconds=seconds)
        return len(self._conns)

    def _begin_blackout(self, seconds: float) -> int:
        loop = asyncio.get_running_loop()
        self._blackout_until = max(self._blackout_until, loop.time() + seconds)
        self.count("blackouts")
        conns = list(self._conns)
        for c in conns:
            c.end(abortive=True)
        self.count("blackout_drops", len(conns))
        log_event(log, "chaos_blackout", logging.INFO, seconds=seconds, dropped=len(conns))
        return len(conns)

    def _restart_blackouts(self) -> None:
        if self._blackout_task is not None:
            self._blackout_task.cancel()
        self._blackout_task = self._loop.create_task(self._blackouts(self.profile))

    async def _blackouts(self, profile: LinkProfile) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for at, seconds in blackout_schedule(profile, random.Random(f"fedsync.chaos/{self.seed}/blackouts")):
            await asyncio.sleep(t0 + at - loop.time())
            self._begin_blackout(seconds)

    def _set_profile(self, profile: LinkProfile) -> None:
        self.profile = profile
        self._restart_blackouts()
        for c in self._conns:
            c.restart_faults()


# -- CLI ----------------------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsync chaos",
        description="A seeded fault-injecting TCP proxy between MQTT clients and a broker (see docs/chaos.md).")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 1884),
                   help="loopback HOST:PORT to accept clients on (default 127.0.0.1:1884; loopback addresses only)")
    p.add_argument("--upstream", type=_host_port, default=("127.0.0.1", 1883),
                   help="the broker's HOST:PORT (default 127.0.0.1:1883)")
    p.add_argument("--profile", default="wifi-flaky", choices=list(PROFILES), help="link profile (default wifi-flaky)")
    p.add_argument("--seed", type=int, default=0, help="fault schedule seed (default 0)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (default 0: until Ctrl-C)")
    p.add_argument("--list-profiles", action="store_true", help="print the profiles and exit")
    p.add_argument("--log-level", default="info", help="debug, info, warning (default info)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``fedsync chaos`` (or ``python -m fedsync.lab.chaos``); prints a ``chaos_stats`` line of counters on exit."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.list_profiles:
        for prof in PROFILES.values():
            print(format_event(prof.name, {f.name: getattr(prof, f.name) for f in fields(prof)
                                           if f.name != "name" and getattr(prof, f.name) != f.default}))
        return 0
    host, port = a.listen
    if not _is_loopback(host):
        parser.error(f"--listen: {host!r} is not a loopback IP address (127.0.0.0/8 or ::1); "
                     "the proxy never listens beyond this machine")
    configure(a.log_level)
    proxy = ChaosProxy(port, a.upstream, get_profile(a.profile), a.seed, listen_host=host)
    try:
        proxy.start()
    except OSError as exc:
        print(f"fedsync chaos: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    print(format_event("chaos_listening", {"url": proxy.url, "upstream": f"{a.upstream[0]}:{a.upstream[1]}",
                                           "profile": a.profile, "seed": a.seed}), flush=True)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    deadline = time.monotonic() + a.duration if a.duration > 0 else math.inf
    try:
        while not stop.wait(min(0.5, max(0.0, deadline - time.monotonic()))) and time.monotonic() < deadline:
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        proxy.stop()
        print(format_event("chaos_stats", proxy.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())