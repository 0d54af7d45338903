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
are thread-safe and return once the loop has done what they ask.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import ipaddress
import itertools
import logging
import math
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType, TracebackType
from typing import Literal

from fedsync.log import configure, format_event, log_event

log = logging.getLogger("fedsync.chaos")

READ_SIZE = 16 * 1024  # bytes read from a socket at once
QUEUE_CHUNKS = 32  # chunks held per direction (<= 512 KiB): the link's buffer; then TCP backpressure
UPSTREAM_CONNECT_TIMEOUT = 10.0
COUNTERS = ("connections", "resets", "stalls", "blackouts", "blackout_drops", "upstream_failures",
            "bytes_up", "bytes_down")


# -- profiles ------------------------------------------------------------------------------------

def _span(name: str, value: tuple[float, float]) -> None:
    lo, hi = value
    if not (0.0 <= lo <= hi and math.isfinite(hi)):
        raise ValueError(f"LinkProfile.{name}: need 0 <= min <= max (finite), got {value!r}")


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """How one simulated link misbehaves. Every field defaults to "no fault".

    Probabilities are per second per connection: ``reset_prob_per_s = 1/30``
    means a given second contains a reset with probability 1/30 (a Poisson
    process with rate ``-ln(1 - p)``, so a mean gap of ~29.5 s).

    >>> LinkProfile(latency_ms=50, jitter_ms=30, bandwidth_bytes_per_s=2_000_000).latency_ms
    50
    """

    name: str = "custom"
    latency_ms: float = 0.0  # mean one-way delay added per direction
    jitter_ms: float = 0.0  # delay drawn uniformly from latency +- jitter (never below 0)
    bandwidth_bytes_per_s: int | None = None  # cap per direction; None = unlimited
    burst_bytes: int = 16 * 1024  # token bucket depth
    reset_prob_per_s: float = 0.0
    stall_prob_per_s: float = 0.0
    stall_s: tuple[float, float] = (0.0, 0.0)  # stall duration, uniform in [min, max]
    blackout_every_s: float = 0.0  # mean up-time between periodic blackouts (x U(0.8, 1.2)); 0 = none
    blackout_first_s: float | None = None  # start of the first periodic blackout; None = after one up-time
    blackout_s: tuple[float, float] = (0.0, 0.0)  # periodic blackout duration, uniform in [min, max]
    blackout_windows: tuple[tuple[float, float], ...] = ()  # extra fixed (start_s, duration_s) from start()
    blackout_new: Literal["blackhole", "refuse"] = "blackhole"  # what a connect during a blackout gets

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "blackout_every_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LinkProfile.{name}: need a finite number >= 0, got {v!r}")
        if self.bandwidth_bytes_per_s is not None and not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"LinkProfile.bandwidth_bytes_per_s: need > 0 or None, got {self.bandwidth_bytes_per_s!r}")
        if not (isinstance(self.burst_bytes, int) and self.burst_bytes >= 512):
            raise ValueError(f"LinkProfile.burst_bytes: need an int >= 512, got {self.burst_bytes!r}")
        for name in ("reset_prob_per_s", "stall_prob_per_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"LinkProfile.{name}: need a probability in [0, 1), got {v!r}")
        _span("stall_s", self.stall_s)
        _span("blackout_s", self.blackout_s)
        if self.blackout_first_s is not None and not (0 <= self.blackout_first_s < math.inf):
            raise ValueError(f"LinkProfile.blackout_first_s: need a finite number >= 0, got {self.blackout_first_s!r}")
        if self.blackout_every_s and self.blackout_s[1] <= 0:
            raise ValueError("LinkProfile.blackout_s: periodic blackouts need a duration > 0")
        for start, seconds in self.blackout_windows:
            if not (0.0 <= start and 0.0 < seconds and math.isfinite(start + seconds)):
                raise ValueError(f"LinkProfile.blackout_windows: need (start >= 0, duration > 0), "
                                 f"got {(start, seconds)!r}")
        if self.blackout_new not in ("blackhole", "refuse"):
            raise ValueError(f"LinkProfile.blackout_new: 'blackhole' or 'refuse', got {self.blackout_new!r}")


PROFILES: Mapping[str, LinkProfile] = MappingProxyType({
    "clean": LinkProfile("clean"),
    "wifi-flaky": LinkProfile("wifi-flaky", latency_ms=50, jitter_ms=30, bandwidth_bytes_per_s=2_000_000,
                              reset_prob_per_s=1 / 30, stall_prob_per_s=1 / 90, stall_s=(2.0, 5.0)),
    "cellular-3g": LinkProfile("cellular-3g", latency_ms=275, jitter_ms=125, bandwidth_bytes_per_s=100_000,
                               reset_prob_per_s=1 / 300, stall_prob_per_s=1 / 45, stall_s=(2.0, 8.0)),
    # the first blackout comes early (3 s), so even a short demo meets one
    "blackout": LinkProfile("blackout", latency_ms=20, jitter_ms=10, blackout_every_s=30.0, blackout_first_s=3.0,
                            blackout_s=(5.0, 10.0)),
})


def get_profile(name: str) -> LinkProfile:
    """The named profile (``clean``, ``wifi-flaky``, ``cellular-3g``, ``blackout``).

    >>> get_profile("wifi-flaky").bandwidth_bytes_per_s
    2000000
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; known: {', '.join(PROFILES)}") from None


# -- the deterministic part (no I/O, no clock) -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault, ``at`` seconds after the connection was accepted."""

    at: float
    kind: Literal["reset", "stall"]
    duration: float = 0.0


def _poisson_rate(p: float) -> float:
    return -math.log1p(-p) if p > 0 else 0.0


def connection_streams(seed: int, index: int) -> tuple[random.Random, random.Random, random.Random]:
    """The k-th connection's own RNGs: (faults, latency up, latency down).

    Separate streams, so how much traffic a connection carries (which draws
    latency samples) never shifts its fault schedule.

    >>> a, b = connection_streams(1, 0)[0], connection_streams(1, 0)[0]; a.random() == b.random()
    True
    """
    root = random.Random(f"fedsync.chaos/{seed}/{index}")
    return random.Random(root.getrandbits(64)), random.Random(root.getrandbits(64)), random.Random(root.getrandbits(64))


def fault_schedule(profile: LinkProfile, rng: random.Random) -> Iterator[Fault]:
    """Resets and stalls of one connection, in time order (infinite, or empty for no faults).

    >>> p = get_profile("wifi-flaky"); rng = connection_streams(1, 0)[0]
    >>> [(round(f.at, 1), f.kind) for f in itertools.islice(fault_schedule(p, rng), 3)]
    [(7.7, 'reset'), (8.7, 'reset'), (12.3, 'stall')]
    """
    r_reset, r_stall = _poisson_rate(profile.reset_prob_per_s), _poisson_rate(profile.stall_prob_per_s)
    total = r_reset + r_stall
    t = 0.0
    while total > 0:
        t += rng.expovariate(total)
        if rng.random() * total < r_reset:
            yield Fault(t, "reset")
        else:
            yield Fault(t, "stall", rng.uniform(*profile.stall_s))


def blackout_schedule(profile: LinkProfile, rng: random.Random) -> Iterator[tuple[float, float]]:
    """(start_s, duration_s) of every blackout after ``start()``, in start order.

    >>> list(blackout_schedule(LinkProfile(blackout_windows=((5.0, 2.0),)), random.Random(0)))
    [(5.0, 2.0)]
    """
    def periodic() -> Iterator[tuple[float, float]]:
        t, first = 0.0, profile.blackout_first_s
        while profile.blackout_every_s > 0:
            t += profile.blackout_every_s * rng.uniform(0.8, 1.2) if first is None else first
            first = None
            d = rng.uniform(*profile.blackout_s)
            yield (t, d)
            t += d

    return heapq.merge(sorted(profile.blackout_windows), periodic())


class TokenBucket:
    """Bandwidth cap: ``take(n, now)`` returns how long to wait before sending n bytes.

    Debt is allowed, so the long-run rate is exact whatever the slice sizes.

    >>> b = TokenBucket(1000, 500, now=0.0); b.take(500, 0.0), b.take(500, 0.0), b.take(500, 1.0)
    (0.0, 0.5, 0.0)
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = float(rate), burst, float(burst), now

    def take(self, n: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate) - n
        self.last = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# -- the I/O part ---------------------------------------------------------------------------------------

_EOF, _RESET = object(), object()


def _reset_socket(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: SO_LINGER on with a zero timeout (RFC 793 "abort")."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Connection:
    """One proxied client connection: two directions, a fault schedule, and how it ends."""

    def __init__(self, proxy: ChaosProxy, index: int, client: asyncio.StreamWriter) -> None:
        self.proxy, self.index, self.client = proxy, index, client
        self.upstream: asyncio.StreamWriter | None = None
        self.fault_rng, lat_up, lat_down = connection_streams(proxy.seed, index)
        self.latency_rng = {"up": lat_up, "down": lat_down}
        self.stalled_until = 0.0
        self.ended = asyncio.Event()
        self.abortive = False
        self.open_directions = 2
        self.fault_task: asyncio.Task | None = None

    async def run(self, client_reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            up_reader, self.upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.proxy.upstream), UPSTREAM_CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            self.proxy._count("upstream_failures")
            log_event(log, "chaos_upstream_failed", logging.WARNING, conn=self.index, error=exc)
            _reset_socket(self.client)
            return
        tasks = [loop.create_task(c) for c in (
            self._pipe("up", client_reader, self.upstream), self._pipe("down", up_reader, self.client))]
        self.restart_faults()
        try:
            await self.ended.wait()
        finally:
            for t in [*tasks, self.fault_task]:
                t.cancel()
            for w in (self.client, self.upstream):
                if self.abortive:
                    _reset_socket(w)
                else:
                    w.close()

    def end(self, abortive: bool) -> None:
        self.abortive = self.abortive or abortive
        self.ended.set()

    def stall(self, seconds: float) -> None:
        now = asyncio.get_running_loop().time()
        self.stalled_until = max(self.stalled_until, now + seconds)
        self.proxy._count("stalls")

    def restart_faults(self) -> None:
        if self.fault_task is not None:
            self.fault_task.cancel()
        self.fault_task = asyncio.get_running_loop().create_task(self._faults(self.proxy.profile))

    async def _faults(self, profile: LinkProfile) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for f in fault_schedule(profile, self.fault_rng):
            await asyncio.sleep(t0 + f.at - loop.time())
            log_event(log, f"chaos_{f.kind}", logging.INFO, conn=self.index, at=f.at, duration=f.duration)
            if f.kind == "reset":
                self.proxy._count("resets")
                self.end(abortive=True)
                return
            self.stall(f.duration)

    async def _unstalled(self) -> None:
        loop = asyncio.get_running_loop()
        while (wait := self.stalled_until - loop.time()) > 0:
            await asyncio.sleep(wait)

    async def _pipe(self, direction: str, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        reader = asyncio.get_running_loop().create_task(self._read(src, queue))
        try:
            await self._write(direction, queue, dst)
        except (ConnectionError, OSError):
            self.end(abortive=True)  # the destination reset: tell the source the same way
        finally:
            reader.cancel()

    @staticmethod
    async def _read(src: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await src.read(READ_SIZE):
                await queue.put((loop.time(), data))
            await queue.put(_EOF)
        except (ConnectionError, OSError):
            await queue.put(_RESET)

    async def _write(self, direction: str, queue: asyncio.Queue, dst: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        rng, last_due, bucket = self.latency_rng[direction], 0.0, None
        while True:
            item = await queue.get()
            if item is _EOF or item is _RESET:
                await self._unstalled()  # a stalled link delivers no FIN or RST either
                if item is _RESET:
                    self.end(abortive=True)
                elif dst.can_write_eof():
                    dst.write_eof()  # half-close, as TCP would
                self.open_directions -= 1
                if self.open_directions == 0:
                    self.end(abortive=False)
                return
            arrival, data = item
            p = self.proxy.profile
            delay = max(0.0, rng.uniform(p.latency_ms - p.jitter_ms, p.latency_ms + p.jitter_ms)) / 1000 \
                if p.latency_ms or p.jitter_ms else 0.0
            last_due = max(last_due, arrival + delay)  # in order: TCP never reorders
            if (wait := last_due - loop.time()) > 0:
                await asyncio.sleep(wait)
            step = len(data) if p.bandwidth_bytes_per_s is None else max(512, min(p.burst_bytes, 4096))
            for off in range(0, len(data), step):
                await self._unstalled()
                piece = data[off:off + step]
                rate = self.proxy.profile.bandwidth_bytes_per_s
                if rate is None:
                    bucket = None
                else:
                    if bucket is None or bucket.rate != rate:
                        bucket = TokenBucket(rate, self.proxy.profile.burst_bytes, loop.time())
                    if (wait := bucket.take(len(piece), loop.time())) > 0:
                        await asyncio.sleep(wait)
                    await self._unstalled()
                dst.write(piece)
                await dst.drain()
                self.proxy._count(f"bytes_{direction}", len(piece))


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
        self._conns: set[_Connection] = set()
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

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[name] += n  # only ever called on the loop thread

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
        self._count("connections")
        loop = asyncio.get_running_loop()
        try:
            if loop.time() < self._blackout_until:
                self._count("blackout_drops")
                if self.profile.blackout_new == "blackhole":
                    while (wait := self._blackout_until - loop.time()) > 0:
                        await asyncio.sleep(wait)  # silence, then the reset a returning link would see
                _reset_socket(writer)
                return
            conn = _Connection(self, index, writer)
            self._conns.add(conn)
            try:
                await conn.run(reader)
            finally:
                self._conns.discard(conn)
        except asyncio.CancelledError:
            _reset_socket(writer)
        finally:
            self._handlers.discard(task)

    def _reset_all(self) -> int:
        conns = list(self._conns)
        for c in conns:
            c.end(abortive=True)
        self._count("resets", len(conns))
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
        self._count("blackouts")
        conns = list(self._conns)
        for c in conns:
            c.end(abortive=True)
        self._count("blackout_drops", len(conns))
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
    """``python -m fedsync.chaos``; prints a ``chaos_stats`` line of counters on exit."""
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
