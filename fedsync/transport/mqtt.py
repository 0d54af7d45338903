"""The one MQTT client wrapper, used by the coordinator and the device agent.

``MqttLink`` owns a paho-mqtt 2.x client and a thread that drives it with
``Client.loop()``: we run our own loop, not ``loop_start()``, so reconnects
use exponential backoff with full jitter (a thousand phones coming back after
a cell outage must not reconnect in lock step) and every callback is guarded
(paho 2: an exception in a callback stops its loop).

Sessions are persistent (MQTT 3.1.1 ``clean_session=0``, fixed client id), so
the broker keeps subscriptions and queues QoS 1/2 messages while we are away;
paho re-sends its unacknowledged publishes on reconnect. A last will is set
at connect. Subscriptions are re-issued on every CONNACK because a broker
that lost its state (restart without persistence) has forgotten them.

Delivery to the broker is tracked with ``on_publish`` only: paho's
``wait_for_publish`` raises for messages queued while offline (docs/brokers.md).

:class:`fedsync.transport.mux.MuxLink` is this class with its socket driven by a
selector thread shared by many links (the swarm's); it reuses the constructor, the
``_handle_*`` callbacks, ``_backoff``, ``_trouble``, ``_ca_file`` and ``_guard``, so a
change to those is a change to both (tests/test_mux.py).
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.address import BrokerAddress, Credentials
from fedsync.log import log_event

log = logging.getLogger("fedsync.mqtt")

# (topic, payload, token): with manual_ack the token is (mid, qos) to pass to MqttLink.ack once the
# message is safely handled; otherwise None (paho acknowledged it on receipt).
MessageHandler = Callable[[str, bytes, "tuple[int, int] | None"], None]


class Backoff:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**n)).

    >>> b = Backoff(0.5, 8.0, random.Random(1)); [round(b.next(), 3) for _ in range(3)]
    [0.067, 0.847, 1.528]
    """

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base, self.cap, self.rng, self.attempt = base, cap, rng, 0

    def next(self) -> float:
        delay = self.rng.uniform(0.0, min(self.cap, self.base * 2.0 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0


def describe_connect_error(exc: BaseException, address: "BrokerAddress", ca_file: str | None) -> tuple[str, str]:
    """``(kind, detail)`` of a failed connection attempt, in words an operator can act on."""
    where = f"{address.host}:{address.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or exc.strerror or exc
        return "tls_verify", f"{where}: broker certificate not trusted ({why}; CA file {ca_file or 'system default'})"
    if isinstance(exc, ssl.SSLError):
        return "tls", f"{where}: TLS handshake failed ({exc.strerror or exc}); is the port a TLS listener?"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve host {address.host!r} ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", f"{where}: connection refused (nothing listening?)"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout", f"{where}: no answer (timed out)"
    return "network", f"{where}: {exc}"


def closed_before_connack_hint(address: "BrokerAddress") -> str:
    """What usually closes a connection before the broker's CONNACK."""
    if address.tls:
        return "a broker limit, or a client certificate it wants?"
    return "is it a TLS port? then use mqtts://"


class _Trouble:
    """Logs connection trouble at WARNING on the first failure and then with backoff
    (the 2nd, 4th, 8th ... consecutive failure), so a stalled device says why without
    flooding the log; the first success after trouble is logged at INFO."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.failures = 0

    def failed(self, kind: str, detail: str, retry_in: float) -> None:
        self.failures += 1
        level = logging.WARNING if self.failures & (self.failures - 1) == 0 else logging.DEBUG
        log_event(log, "connect_failed", level, client=self.client_id, kind=kind, detail=detail,
                  failures=self.failures, retry_in=retry_in)

    def recovered(self) -> None:
        if self.failures:
            log_event(log, "connected_after_failures", client=self.client_id, failures=self.failures)
        self.failures = 0


class MqttLink:
    """A persistent, self-reconnecting MQTT connection for one client id.

    ``on_message(topic, payload, token)`` and ``on_connect(session_present)``
    run on the link's thread; keep them short (hand work to a queue).
    """

    def __init__(self, client_id: str, broker: str, *, on_message: MessageHandler,
                 on_connect: Callable[[bool], None] | None = None,
                 will: tuple[str, bytes, int, bool] | None = None,
                 credentials: Credentials = Credentials(), keepalive: int = 15,
                 clean_session: bool = False, max_inflight: int = 32,
                 backoff: Backoff | None = None, manual_ack: bool = False,
                 on_disconnect: Callable[[], None] | None = None,
                 on_retained: MessageHandler | None = None) -> None:
        self.client_id = client_id
        self.address = BrokerAddress.parse(broker)
        self.keepalive = keepalive
        self._on_message = on_message
        # Messages with the RETAIN flag set: MQTT 3.1.1 §3.3.1.3 sets it only on a delivery
        # from the broker's retained store (a new subscription), never on a live forward.
        # Without this handler they go to on_message like any other.
        self._on_retained = on_retained
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._ca_file = credentials.ca_file
        self._trouble = _Trouble(client_id)
        # Set: do not reconnect after the connection drops (a coordinator that was just
        # told another one owns the session must not take it back; see coordinator/service.py).
        self.hold_reconnect = threading.Event()
        self._subs: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = backoff or Backoff(0.2, 15.0, random.Random())
        self.connects = 0
        self.published = 0
        self.published_ok = 0
        self.last_refusal: str | None = None
        self._refusal: tuple[str, str] | None = None  # (kind, detail) of a refused CONNACK, until logged

        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                        protocol=paho.MQTTv311, manual_ack=manual_ack)
        if credentials.username is not None:
            c.username_pw_set(credentials.username, credentials.password)
        if self.address.tls or credentials.ca_file:
            c.tls_set(ca_certs=credentials.ca_file, certfile=credentials.cert_file,
                      keyfile=credentials.key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            c.will_set(*will)
        c.max_inflight_messages_set(max_inflight)
        # paho writes to the socket from whichever thread calls publish()/ack() unless a socket
        # write callback is registered; with TLS that races the link thread's reads and corrupts
        # records ("bad record mac"). Registering one makes paho leave all writes to loop().
        c.on_socket_register_write = lambda client, userdata, sock: None
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_publish = self._handle_publish
        self.client = c
        self.manual_ack = manual_ack

    # -- public API --------------------------------------------------------------

    def start(self) -> "MqttLink":
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Queue a publish; paho sends it now or after the next reconnect."""
        with self._lock:
            self.published += 1
        return self.client.publish(topic, payload, qos=qos, retain=retain).mid

    def flush(self, timeout: float) -> bool:
        """Wait until the broker has acknowledged every publish so far (PUBACK/PUBCOMP;
        for QoS 0, until written). False on timeout, e.g. while disconnected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.published_ok >= self.published:
                    return True
            time.sleep(0.005)
        return False

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        with self._lock:
            self._subs[topic_filter] = qos
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self.connected.is_set():
            self.client.unsubscribe(topic_filter)

    def ack(self, token: tuple[int, int] | None) -> None:
        """Manual acknowledgement (``manual_ack=True``): send PUBACK / PUBREC now.

        MQTT 3.1.1 §4.3.2: until the PUBACK, the broker keeps the message and
        redelivers it (DUP set) if the session reconnects, so a crash between
        receipt and ack loses nothing."""
        if token is not None and token[1] > 0:
            self.client.ack(*token)

    def stop(self, disconnect: bool = True, timeout: float = 5.0) -> None:
        """Stop the loop. ``disconnect=False`` drops the socket without DISCONNECT,
        so the broker publishes the last will (a crash, as the broker sees it)."""
        clean = disconnect and self.connected.is_set()
        if clean:
            self.flush(timeout)  # a clean stop delivers what was queued (the final manifest, say)
        # Stop our loop thread before disconnecting: otherwise it sees the closed socket and
        # reconnects, and the broker later fires the will of a client that left cleanly.
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if clean:
            self.client.disconnect()
            deadline = time.monotonic() + 2.0
            while self.connected.is_set() and time.monotonic() < deadline:
                if self.client.loop(timeout=0.05) != paho.MQTT_ERR_SUCCESS:
                    break
        self.drop_connection()
        self.connected.clear()

    def drop_connection(self) -> None:
        """Close the socket abruptly (no DISCONNECT): for fault tests."""
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # -- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            if not self._is_open():
                if self.hold_reconnect.is_set():
                    self._stop.wait(0.05)
                    continue
                try:
                    if first:
                        self.client.connect(self.address.host, self.address.port, self.keepalive)
                        first = False
                    else:
                        self.client.reconnect()
                except (OSError, ssl.SSLError) as exc:
                    delay = self._backoff.next()
                    self._trouble.failed(*describe_connect_error(exc, self.address, self._ca_file), delay)
                    self._stop.wait(delay)
                    continue
            was_connected = self.connected.is_set()
            rc = self.client.loop(timeout=0.1)
            if rc != paho.MQTT_ERR_SUCCESS and not self._stop.is_set():
                self.connected.clear()
                delay = self._backoff.next()
                if was_connected:
                    log_event(log, "connection_lost", logging.WARNING, client=self.client_id,
                              error=paho.error_string(rc), retry_in=delay)
                elif self._refusal is not None:  # the broker answered the CONNECT with a refusal
                    self._trouble.failed(*self._refusal, delay)
                    self._refusal = None
                else:  # closed before the CONNACK: say the likely causes
                    where = f"{self.address.host}:{self.address.port}"
                    hint = closed_before_connack_hint(self.address)
                    why = "" if rc == paho.MQTT_ERR_CONN_LOST else f"{paho.error_string(rc)}; "
                    self._trouble.failed("closed_before_connack", f"{where}: connection closed before CONNACK "
                                         f"({why}{hint})", delay)
                self._stop.wait(delay)

    def _is_open(self) -> bool:
        return self.client.socket() is not None

    # -- paho callbacks (each guarded: an exception would stop the loop) -------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_refusal = str(reason_code)
            kind = "auth" if reason_code.value in (4, 5, 134, 135) else "refused_by_broker"
            # Logged by the loop, which knows when it retries (paho then drops the connection).
            self._refusal = (kind, f"{self.address.host}:{self.address.port} refused the login of "
                                   f"{self.client_id!r}: {reason_code}")
            return
        self.connects += 1
        self._backoff.reset()
        self._trouble.recovered()
        with self._lock:
            subs = list(self._subs.items())
        for topic_filter, qos in subs:
            client.subscribe(topic_filter, qos)
        self.connected.set()
        # INFO every time: a reconnect answers the connection_lost WARNING before it (a device
        # that logged only the loss would look dead).
        log_event(log, "connected", logging.INFO, client=self.client_id,
                  broker=f"{self.address.host}:{self.address.port}", session_present=flags.session_present)
        if self._on_connect is not None:
            self._guard(self._on_connect, bool(flags.session_present))

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if self._on_disconnect is not None:
            self._guard(self._on_disconnect)

    def _handle_message(self, client, userdata, msg) -> None:
        token = (msg.mid, msg.qos) if self.manual_ack else None
        handler = self._on_retained if msg.retain and self._on_retained is not None else self._on_message
        self._guard(handler, msg.topic, bytes(msg.payload), token)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self.published_ok += 1

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - must never escape into paho's loop
            log.exception("callback_failed client=%s", self.client_id)
