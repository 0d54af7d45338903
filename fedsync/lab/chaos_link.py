"""One connection through the chaos proxy: two shaped directions, a fault schedule, and how it ends.

Theory of operation
-------------------
A :class:`ChaosConnection` relays one accepted client connection to the upstream
broker. Each direction (client -> broker is "up", broker -> client is "down") is a
reader that stamps chunks with their arrival time into a bounded queue (the link's
buffer; when it is full, TCP backpressure) and a writer that holds each chunk until
``arrival + latency`` (never before an earlier chunk: TCP does not reorder), then
paces it through a :class:`~fedsync.lab.chaos_profiles.TokenBucket`. Its state:

* ``stalled_until`` - nothing is written in either direction before it, and an EOF
  or RST waits too (a stalled link delivers no FIN either);
* ``open_directions`` - a FIN in one direction half-closes the other side; when both
  directions have ended, the connection ends cleanly;
* ``ended`` / ``abortive`` - set once by a scheduled reset, a reset from either peer,
  a blackout or the proxy's shutdown; an abortive end closes both sockets with RST
  (``SO_LINGER 0``), a clean one with FIN.

The fault task walks :func:`~fedsync.lab.chaos_profiles.fault_schedule` from the
moment the connection was accepted; ``restart_faults`` starts it again under the
proxy's current profile. Everything here runs on the proxy's event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import TYPE_CHECKING

from fedsync.lab.chaos_profiles import LinkProfile, TokenBucket, connection_streams, fault_schedule
from fedsync.log import log_event

if TYPE_CHECKING:
    from fedsync.lab.chaos import ChaosProxy

log = logging.getLogger("fedsync.chaos")

READ_SIZE = 16 * 1024  # bytes read from a socket at once
QUEUE_CHUNKS = 32  # chunks held per direction (<= 512 KiB): the link's buffer; then TCP backpressure
UPSTREAM_CONNECT_TIMEOUT = 10.0

_EOF, _RESET = object(), object()


def reset_socket(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: SO_LINGER on with a zero timeout (RFC 793 "abort")."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class ChaosConnection:
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
            self.proxy.count("upstream_failures")
            log_event(log, "chaos_upstream_failed", logging.WARNING, conn=self.index, error=exc)
            reset_socket(self.client)
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
                    reset_socket(w)
                else:
                    w.close()

    def end(self, abortive: bool) -> None:
        self.abortive = self.abortive or abortive
        self.ended.set()

    def stall(self, seconds: float) -> None:
        now = asyncio.get_running_loop().time()
        self.stalled_until = max(self.stalled_until, now + seconds)
        self.proxy.count("stalls")

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
                self.proxy.count("resets")
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
                self.proxy.count(f"bytes_{direction}", len(piece))

