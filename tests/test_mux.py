"""fedsync.transport.mux: many MqttLinks on one selector thread, against a real mosquitto.

Each scenario names one thing the multiplexed link must do as MqttLink does (deliver what
another thread publishes, keep the persistent session across a dropped connection, send no
will on a clean stop but one on a crash, log and retry a refused login) or what the mux adds
(the connect gate), and asserts the exact outcome.
"""

from __future__ import annotations

import logging
import random
import threading

import pytest

from fedsync.address import Credentials
from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.transport.mqtt import Backoff, MqttLink
from fedsync.transport.mux import LinkMux
from tests.util import wait_until

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")]

USERS = {"monitor": "monitor-pw", **{f"m-{i}": f"m-{i}-pw" for i in range(12)}}


@pytest.fixture(scope="module")
def broker():
    with BrokerProcess("mosquitto", users=USERS) as b:
        yield b


@pytest.fixture
def mux():
    m = LinkMux(max_connecting=4).start()
    try:
        yield m
    finally:
        m.stop(5)


class Inbox:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes, _token) -> None:
        with self.lock:
            self.got.append((topic, payload))

    def payloads(self) -> list[bytes]:
        """What arrived, without the probes of :func:`subscribed` (a late one may still come in)."""
        with self.lock:
            return [p for _t, p in self.got if p != b"probe"]

    def count(self) -> int:
        return len(self.payloads())


def link(mux: LinkMux, broker: BrokerProcess, name: str, inbox=None, **kw):
    return mux.link(name, broker.url, on_message=inbox or Inbox(), credentials=Credentials(name, USERS[name]),
                    backoff=kw.pop("backoff", Backoff(0.05, 0.2, random.Random(name))), **kw)


def subscribed(a, b, inbox: Inbox, topic: str) -> None:
    """Wait until ``b``'s subscription to ``topic`` is in force: a probe from ``a`` arrives."""
    def probe() -> bool:
        a.publish(topic, b"probe", qos=1)
        with inbox.lock:
            return len(inbox.got) > 0
    wait_until(probe, 10, f"the subscription to {topic}")


def test_a_publish_from_another_thread_is_delivered_in_order(broker, mux):
    inbox = Inbox()
    a, b = link(mux, broker, "m-0"), link(mux, broker, "m-1", inbox)
    b.subscribe("mux/t/b", 1)
    a.start(), b.start()
    assert a.wait_connected(10) and b.wait_connected(10)
    subscribed(a, b, inbox, "mux/t/b")
    for i in range(20):  # the test thread, not the mux thread: the write still happens on the mux thread
        a.publish("mux/t/b", b"%d" % i, qos=1)
    assert a.flush(10)
    wait_until(lambda: inbox.count() == 20, 10, "20 messages")
    assert inbox.payloads() == [b"%d" % i for i in range(20)]
    assert a.published == a.published_ok and (a.connects, b.connects) == (1, 1)


def test_a_clean_stop_sends_no_will_and_a_crash_does(broker, mux):
    watch = Inbox()
    monitor = MqttLink("monitor", broker.url, on_message=watch, credentials=Credentials("monitor", USERS["monitor"]),
                       clean_session=True)
    monitor.subscribe("mux/will/#", 1)
    monitor.start()
    try:
        assert monitor.wait_connected(10)
        a = link(mux, broker, "m-2", will=("mux/will/m-2", b"gone", 1, False)).start()
        b = link(mux, broker, "m-3", will=("mux/will/m-3", b"gone", 1, False)).start()
        assert a.wait_connected(10) and b.wait_connected(10)
        a.stop()  # DISCONNECT: the broker discards the will
        assert a.sock is None and not a.connected.is_set()
        b.stop(disconnect=False)  # a crash as the broker sees it: the will fires
        wait_until(lambda: watch.count() >= 1, 10, "m-3's will")
        # positive control first, then the absence: m-2 stopped before m-3 crashed
        assert watch.got == [("mux/will/m-3", b"gone")]
    finally:
        monitor.stop()


def test_a_dropped_link_reconnects_and_its_session_kept_what_was_published_meanwhile(broker, mux):
    inbox = Inbox()
    a, b = link(mux, broker, "m-4"), link(mux, broker, "m-5", inbox)
    b.subscribe("mux/q", 1)
    a.start(), b.start()
    assert a.wait_connected(10) and b.wait_connected(10)
    subscribed(a, b, inbox, "mux/q")
    b.hold_reconnect.set()
    b.drop_connection()  # no DISCONNECT; the broker keeps m-5's persistent session
    wait_until(lambda: not b.connected.is_set() and b.state == "down", 5, "m-5 down")
    for i in range(5):
        a.publish("mux/q", b"q%d" % i, qos=1)
    assert a.flush(10)
    assert inbox.count() == 0 and b.connects == 1
    b.hold_reconnect.clear()
    wait_until(lambda: inbox.count() == 5, 10, "the queued messages after the reconnect")
    assert inbox.payloads() == [b"q%d" % i for i in range(5)]
    assert b.connects == 2


def test_a_refused_login_is_logged_once_as_auth_and_retried_with_backoff(broker, mux, caplog):
    caplog.set_level(logging.DEBUG, logger="fedsync.mqtt")
    bad = mux.link("m-6", broker.url, on_message=Inbox(), credentials=Credentials("m-6", "wrong"),
                   backoff=Backoff(0.01, 0.05, random.Random(6))).start()
    good = link(mux, broker, "m-7").start()
    assert good.wait_connected(10)  # positive control: the right password gets in
    wait_until(lambda: bad._trouble.failures >= 4, 10, "four refused attempts")
    assert not bad.connected.is_set() and bad.connects == 0
    assert bad.last_refusal is not None and "authori" in bad.last_refusal.lower()
    refused = [r for r in caplog.records if "connect_failed client=m-6 kind=auth" in r.getMessage()]
    # WARNING on the 1st, 2nd, 4th ... failure, DEBUG in between (MqttLink's rule)
    assert [r.levelno for r in refused[:4]] == [logging.WARNING, logging.WARNING, logging.DEBUG, logging.WARNING]


def test_no_more_than_max_connecting_links_wait_for_a_connack_at_once(broker):
    seen: list[int] = []

    class Counting(LinkMux):
        def _start_connects(self, now: float) -> None:
            super()._start_connects(now)
            seen.append(self._connecting)

    mux = Counting(max_connecting=2).start()
    try:
        links = [link(mux, broker, f"m-{i}", clean_session=True) for i in range(8, 12)]
        # All four become pending in one batch on the I/O thread, so the gate is offered four at
        # once. Started one by one from here, a fast CONNACK could empty the gate before the next
        # link was queued, and the gate would never fill (seen in CI: max(seen) == 1).
        assert mux.run_on_thread(lambda: [x.start() for x in links], 5)
        wait_until(lambda: all(x.connected.is_set() for x in links), 15, "all four links")
    finally:
        mux.stop(5)
    assert max(seen) == 2  # the gate filled, and never overflowed
    assert [x.connects for x in links] == [1, 1, 1, 1]
