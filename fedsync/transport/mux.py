"""Many MQTT links driven by one selector thread: the multiplexed form of :class:`MqttLink`.

Theory of operation
-------------------
:class:`~fedsync.transport.mqtt.MqttLink` gives each connection a thread that runs
paho's ``loop()``; right for a device or a coordinator, wrong for a thousand simulated
devices in one process. A :class:`MuxLink` *is* an ``MqttLink`` (a subclass): the same
paho client built by the same constructor (fixed client id, persistent session
``clean_session=0``, last will, credentials and TLS, the in-flight window), the same
subscription table re-issued on every CONNACK, the same refusal and trouble logging
(``connect_failed`` at WARNING on the 1st, 2nd, 4th ... failure, naming the cause),
the same delivery count through ``on_publish`` (``flush``), the same guarded callbacks
and the same write rule: paho never writes from ``publish()``; every byte goes out from
the I/O thread. Only who drives the socket differs. One :class:`LinkMux` thread:

* keeps every link's socket in one :mod:`selectors` selector (paho's
  ``on_socket_open`` / ``on_socket_close``); ``on_socket_register_write`` queues the
  link, and the thread turns write interest on while paho has bytes queued
  (``want_write()``); readable sockets get ``loop_read()``, writable ones
  ``loop_write()``, and every ``misc_interval`` every link gets ``loop_misc()``
  (keepalive PINGREQs, dead-peer detection) and a write-interest sweep;
* opens connections through a gate: at most ``max_connecting`` links are between TCP
  connect and CONNACK, so a thousand links starting together (or coming back after a
  broker restart) do not hit the broker's accept queue at once; a CONNACK that does not
  come within ``connect_timeout`` closes the socket and retries;
* after a lost connection, retries after the link's own :class:`Backoff` (exponential,
  full jitter), through the same gate; ``hold_reconnect`` holds a link down;
* runs its users' work on the same thread (``call_soon`` from any thread,
  ``call_later`` for timers), so a host can keep all its state on that one thread;
  an exception there is logged and the thread goes on. One that escapes the loop
  itself ends it: every socket is dropped without DISCONNECT (the broker fires the
  wills) and ``failed`` holds the error, as AgentHost's supervision does.

A link's ``state`` (I/O thread only): ``down`` -> ``connecting`` (CONNECT queued) ->
``up`` (CONNACK accepted) or ``refused`` (the broker closes next) -> ``down``; a link
that was stopped never leaves ``down``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from typing import Callable

from fedsync.address import Credentials
from fedsync.log import log_event
from fedsync.transport.mqtt import Backoff, MessageHandler, MqttLink, closed_before_connack_hint, describe_connect_error

log = logging.getLogger("fedsync.mqtt")

_HOLD_POLL = 0.05  # seconds between looks at a link held down by hold_reconnect (as MqttLink polls)


class MuxLink(MqttLink):
    """An :class:`MqttLink` whose socket is driven by a :class:`LinkMux` thread, not its own.

    Built by :meth:`LinkMux.link`; the API is MqttLink's (``publish``, ``subscribe``,
    ``flush``, ``ack``, ``wait_connected``, ``stop``, ``drop_connection``), and callbacks
    run on the mux's thread.
    """

    def __init__(self, mux: LinkMux, client_id: str, broker: str, **kwargs) -> None:
        super().__init__(client_id, broker, **kwargs)
        self.mux = mux
        self.state = "down"
        self.stopped = False  # stop() was called: never reconnect
        self.sock: socket.socket | None = None  # the socket the selector holds for this link
        self.connecting_since = 0.0
        self.lost_reason = ""
        c = self.client
        c.user_data_set(self)
        c.on_socket_open = mux._socket_open
        c.on_socket_close = mux._socket_close
        c.on_socket_register_write = mux._register_write
        c.on_socket_unregister_write = mux._unregister_write
        c.connect_async(self.address.host, self.address.port, self.keepalive)  # no I/O: sets the address

    def start(self) -> MuxLink:
        self.mux.call_soon(lambda: self.mux._schedule(self, time.monotonic()))
        return self

    def stop(self, disconnect: bool = True, timeout: float = 5.0) -> None:
        """As :meth:`MqttLink.stop`: a clean stop delivers what was queued, then DISCONNECTs;
        ``disconnect=False`` drops the socket without DISCONNECT (the broker fires the will).
        Called on the mux thread, it does not wait for the broker."""
        clean = disconnect and self.connected.is_set()
        waits = not self.mux.on_thread()
        if clean and waits:
            self.flush(timeout)

        def do() -> None:
            self.stopped = True
            if clean and self.sock is not None:
                self.client.disconnect()  # queued: loop_write sends it, then paho closes the socket
            else:
                self.mux._drop(self)
        self.mux.run_on_thread(do, timeout)
        if clean and waits:
            deadline = time.monotonic() + 2.0
            while self.sock is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            self.mux.run_on_thread(lambda: self.mux._drop(self), timeout)
        self.connected.clear()

    def drop_connection(self) -> None:
        """Close the socket abruptly (no DISCONNECT); the link reconnects after its backoff."""
        self.mux.run_on_thread(lambda: self.mux._drop(self), 5.0)

    # paho callbacks, on the mux thread: MqttLink's handling plus the gate's bookkeeping

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.mux._connacked(self, not reason_code.is_failure)
        super()._handle_connect(client, userdata, flags, reason_code, properties)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.lost_reason = str(reason_code)
        super()._handle_disconnect(client, userdata, flags, reason_code, properties)


class LinkMux:
    """One I/O thread for many :class:`MuxLink` connections.

    >>> # mux = LinkMux(max_connecting=32).start()
    >>> # link = mux.link("dev-0", "mqtt://127.0.0.1:1883", on_message=handle, will=(...)).start()
    >>> # ...; mux.stop()
    """

    def __init__(self, *, misc_interval: float = 0.5, max_connecting: int = 32,
                 connect_timeout: float = 10.0, name: str = "mqtt-mux") -> None:
        self.misc_interval = misc_interval
        self.max_connecting = max_connecting
        self.connect_timeout = connect_timeout
        self.name = name
        self.links: list[MuxLink] = []
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: collections.deque = collections.deque()  # any thread appends, the I/O thread runs
        self._writers: collections.deque = collections.deque()  # links whose paho client queued bytes
        self._closed: list[MuxLink] = []  # links whose socket paho closed (I/O thread only)
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # heap, I/O thread only
        self._pending: list[tuple[float, int, MuxLink]] = []  # connect attempts due, heap, I/O thread only
        self._seq = itertools.count()
        self._connecting = 0
        self._closing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self.failed: BaseException | None = None  # what ended the I/O thread, if it did not stop cleanly

    def link(self, client_id: str, broker: str, *, on_message: MessageHandler,
             on_connect: Callable[[bool], None] | None = None,
             will: tuple[str, bytes, int, bool] | None = None, credentials: Credentials = Credentials(),
             keepalive: int = 15, clean_session: bool = False, max_inflight: int = 32,
             backoff: Backoff | None = None, manual_ack: bool = False,
             on_disconnect: Callable[[], None] | None = None) -> MuxLink:
        """A new link on this mux (MqttLink's arguments); ``start()`` it to connect."""
        link = MuxLink(self, client_id, broker, on_message=on_message, on_connect=on_connect, will=will,
                       credentials=credentials, keepalive=keepalive, clean_session=clean_session,
                       max_inflight=max_inflight, backoff=backoff, manual_ack=manual_ack, on_disconnect=on_disconnect)
        self.links.append(link)
        return link

    # -- running work on the I/O thread ---------------------------------------------------------

    def on_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread, soon (from any thread)."""
        self._calls.append(fn)
        if not self.on_thread():
            self._wake()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread after ``delay`` seconds (from any thread)."""
        due = time.monotonic() + delay
        if self.on_thread():
            heapq.heappush(self._timers, (due, next(self._seq), fn))
        else:
            self.call_soon(lambda: heapq.heappush(self._timers, (due, next(self._seq), fn)))

    def run_on_thread(self, fn: Callable[[], None], timeout: float) -> bool:
        """Run ``fn`` on the I/O thread and wait for it (inline if on it, or if the thread is not running)."""
        if self.on_thread() or not self.running():
            fn()
            return True
        done = threading.Event()
        self.call_soon(lambda: (fn(), done.set()))
        return done.wait(timeout)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LinkMux:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every link cleanly (deliver what is queued, DISCONNECT), then the thread."""
        if self.running():
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not all(
                    l.published_ok >= l.published for l in self.links if l.connected.is_set() and not l.stopped):
                time.sleep(0.01)
            self.run_on_thread(self._disconnect_all, timeout)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(l.sock is not None for l in self.links):
                time.sleep(0.01)
            self._stop.set()
            self._wake()
            self._thread.join(timeout)
        for link in self.links:
            if link.sock is not None:
                self._close_quietly(link.sock)
                link.sock = None
            link.connected.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _disconnect_all(self) -> None:
        self._closing = True
        for link in self.links:
            if link.stopped:
                continue
            link.stopped = True
            if link.state == "up" and link.sock is not None:
                link.client.disconnect()
            else:
                self._drop(link)

    # -- the loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - supervision: log, let the wills fire, end loudly
            self.failed = exc
            log.exception("mux_failed error=%s", type(exc).__name__)
            self._closing = True
            for link in self.links:
                link.stopped = True
                self._drop(link)

    def _loop(self) -> None:
        next_misc = time.monotonic() + self.misc_interval
        while not self._stop.is_set():
            self._run_calls()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guard("timer", heapq.heappop(self._timers)[2])
            if now >= next_misc:
                self._misc(now)
                next_misc = now + self.misc_interval
            self._handle_closed()
            self._start_connects(now)
            self._handle_writers()
            timeout = next_misc - now
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - now)
            if self._pending and self._connecting < self.max_connecting:
                timeout = min(timeout, self._pending[0][0] - now)
            if self._calls or self._closed or self._writers:
                timeout = 0.0
            for key, mask in self._sel.select(max(0.0, timeout)):
                link = key.data
                if link is None:
                    self._drain_wake()
                    continue
                try:
                    if mask & selectors.EVENT_READ and link.sock is not None:
                        link.client.loop_read()
                    if mask & selectors.EVENT_WRITE and link.sock is not None:
                        link.client.loop_write()
                except Exception:  # noqa: BLE001 - one link's trouble must not stop the other 999
                    log.exception("mux_io_failed client=%s", link.client_id)
                    self._drop(link)

    def _run_calls(self) -> None:
        for _ in range(len(self._calls)):
            self._guard("call", self._calls.popleft())

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - the I/O thread must survive its users' bugs
            log.exception("mux_%s_failed", what)

    def _misc(self, now: float) -> None:
        for link in self.links:
            if link.sock is None:
                continue
            if link.state == "connecting" and now - link.connecting_since > self.connect_timeout:
                self._drop(link, "timeout")
                continue
            try:
                link.client.loop_misc()  # keepalive; a dead peer closes the socket (-> _socket_close)
            except Exception:  # noqa: BLE001 - as in _run: drop this link, keep the others
                log.exception("mux_io_failed client=%s", link.client_id)
                self._drop(link)
                continue
            if link.sock is not None and link.client.want_write():
                self._writers.append(link)  # see _register_write: a publish from another thread may race

    # -- connecting, and links going down (I/O thread) ----------------------------------------------

    def _schedule(self, link: MuxLink, at: float) -> None:
        heapq.heappush(self._pending, (at, next(self._seq), link))

    def _start_connects(self, now: float) -> None:
        while self._pending and self._connecting < self.max_connecting and self._pending[0][0] <= now:
            _, _, link = heapq.heappop(self._pending)
            if link.stopped or self._closing or link.state != "down":
                continue
            if link.hold_reconnect.is_set():
                self._schedule(link, now + _HOLD_POLL)
                continue
            try:
                link.client.reconnect()  # blocking TCP connect (and TLS handshake), then CONNECT queued
            except (OSError, ssl.SSLError) as exc:
                if link.sock is not None:  # a socket paho opened before failing: not ours to keep
                    self._forget(link.sock)
                    self._close_quietly(link.sock)
                    link.sock = None
                delay = link._backoff.next()
                link._trouble.failed(*describe_connect_error(exc, link.address, link._ca_file), delay)
                self._schedule(link, now + delay)
                continue
            link.state = "connecting"
            link.connecting_since = now
            self._connecting += 1

    def _connacked(self, link: MuxLink, ok: bool) -> None:
        if link.state == "connecting":
            self._connecting -= 1
        link.state = "up" if ok else "refused"  # refused: the broker closes next; _down logs it with its retry delay

    def _drop(self, link: MuxLink, why: str = "dropped") -> None:
        """Close the link's socket abruptly (no DISCONNECT) and treat the link as down."""
        sock, link.sock = link.sock, None
        if sock is not None:
            self._forget(sock)
            self._close_quietly(sock)
        self._down(link, why)

    def _handle_closed(self) -> None:
        while self._closed:
            batch, self._closed = self._closed, []
            for link in batch:
                self._down(link, "lost")

    def _down(self, link: MuxLink, why: str) -> None:
        was = link.state
        if was == "down":
            return
        if was == "connecting":
            self._connecting -= 1
        link.state = "down"
        link.connected.clear()
        if why == "dropped" and was == "up" and link._on_disconnect is not None:
            link._guard(link._on_disconnect)  # paho saw no disconnect: we closed the socket ourselves
        if link.stopped or self._closing:
            return
        delay = link._backoff.next()
        where = f"{link.address.host}:{link.address.port}"
        if link._refusal is not None:  # the broker refused the CONNECT (MqttLink._handle_connect)
            link._trouble.failed(*link._refusal, delay)
            link._refusal = None
        elif why == "timeout":
            link._trouble.failed("timeout", f"{where}: no CONNACK within {self.connect_timeout:g} s", delay)
        elif was == "up":
            log_event(log, "connection_lost", logging.WARNING, client=link.client_id,
                      error=link.lost_reason or why, retry_in=delay)
        elif was == "connecting":
            link._trouble.failed("closed_before_connack", f"{where}: connection closed before CONNACK "
                                 f"({closed_before_connack_hint(link.address)})", delay)
        link.lost_reason = ""
        self._schedule(link, time.monotonic() + delay)

    # -- paho's socket callbacks (on the I/O thread, except register_write) ---------------------------

    def _socket_open(self, client, link: MuxLink, sock) -> None:
        link.sock = sock
        try:
            self._sel.register(sock, selectors.EVENT_READ, link)
        except (KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ, link)

    def _socket_close(self, client, link: MuxLink, sock) -> None:
        self._forget(sock)
        if sock is link.sock:  # not a socket we already dropped (reconnect() closes the old one again)
            link.sock = None
            self._closed.append(link)

    def _register_write(self, client, link: MuxLink, sock) -> None:
        # From publish() on any thread: only queue the link; the I/O thread changes the selector.
        self._writers.append(link)
        if not self.on_thread():
            self._wake()

    def _unregister_write(self, client, link: MuxLink, sock) -> None:
        if sock is link.sock:
            try:
                self._sel.modify(sock, selectors.EVENT_READ, link)
            except (KeyError, ValueError, OSError):
                pass

    def _handle_writers(self) -> None:
        while self._writers:
            link = self._writers.popleft()
            if link.sock is not None and link.client.want_write():
                try:
                    self._sel.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
                except (KeyError, ValueError, OSError):
                    pass

    def _forget(self, sock) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass

    @staticmethod
    def _close_quietly(sock) -> None:
        try:
            sock.close()
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closing

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
