"""Security scenarios on the embedded amqtt broker with the fedsync ACL: what it enforces
(a full round runs; foreign client ids, topics and subscriptions are refused) and the
documented limits of amqtt 0.12.1 (docs/security.md), pinned so that an upgrade that fixes
one fails here and the docs get updated.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedsync.broker_config.process import BrokerProcess
from fedsync.coordinator.core import RoundPolicy
from fedsync.lab.federation import LocalFederation
from tests.secured_broker import DEVICES, TOPICS, Client, raw_connack
from tests.util import run_federation, wait_until


# -- amqtt: what its ACL can do, and its documented limits ---------------------------------

AMQTT_USERS = {"coordinator": "c-secret", "monitor": "m-secret",
               **{d: f"{d}-secret" for d in DEVICES}}


@pytest.fixture
def amqtt_acl() -> Iterator[BrokerProcess]:
    broker = BrokerProcess("amqtt", users=AMQTT_USERS, federation_acl="demo")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.broker
def test_amqtt_with_the_acl_runs_a_full_round(amqtt_acl):
    # Proves the ACL grants everything the real coordinator and agents use (amqtt refuses a
    # denied SUBSCRIBE with 0x80, so a missing grant would stall the round).
    users = {u: AMQTT_USERS[u] for u in ["coordinator", *DEVICES[:3]]}
    fed = LocalFederation(amqtt_acl.url, users, n_devices=3, seed=3,
                          policy=RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3, round_timeout=60.0))
    s = run_federation(fed, 30)
    assert (s["rounds_completed"], s["updates_accepted"], s["duplicates_dropped"], s["shards_rejected"]) == (1, 3, 0, 0)


@pytest.mark.broker
def test_amqtt_acl_refuses_foreign_client_ids_topics_and_subscriptions(amqtt_acl):
    port = amqtt_acl.port
    assert raw_connack(port, None, "dev-0", "dev-1", AMQTT_USERS["dev-1"]) == 5  # client id != user
    assert raw_connack(port, None, "dev-1", "dev-1", AMQTT_USERS["dev-1"]) == 0
    # fedsync status logs in as monitor with a fresh client id each time: allowed (found by a new user)
    assert raw_connack(port, None, "fedsync-status-1a2b3c", "monitor", AMQTT_USERS["monitor"]) == 0
    assert raw_connack(port, None, "fedsync-status-1a2b3c", "coordinator", AMQTT_USERS["coordinator"]) == 5
    coordinator = Client(port, "coordinator", AMQTT_USERS["coordinator"], subscribe=(TOPICS.up_filter,))
    assert coordinator.suback == [1]
    dev1 = Client(port, "dev-1", AMQTT_USERS["dev-1"],
                  subscribe=(TOPICS.up_filter, TOPICS.ack("dev-0"), TOPICS.manifest))
    assert dev1.suback == [0x80, 0x80, 1]  # others' updates and receipts: refused; the manifest: granted
    coordinator.publish(TOPICS.coordinator_status, b"online", retain=True)  # the late client's sentinel
    dev1.publish(TOPICS.up("dev-0", 1, "uforged", 0), b"forged")
    dev1.publish(TOPICS.manifest, b"fake", retain=True)
    dev1.publish(TOPICS.up("dev-1", 1, "uctl", 0), b"control")
    # amqtt 0.12 hands one client's PUBLISHes to a single broadcast queue in order, and writes to
    # each subscriber through one FIFO lock in that order (broker.py _run_broadcast): so once the
    # control is at the coordinator, the forgery sent before it would be too.
    wait_until(lambda: coordinator.seen(TOPICS.root + "/up/dev-1/"), 10, "the control")
    assert coordinator.seen(TOPICS.root + "/up/") == [(TOPICS.up("dev-1", 1, "uctl", 0), b"control")]
    # dev-1's own manifest subscription: a genuine manifest after the fake one is delivered, alone.
    coordinator.publish(TOPICS.manifest, b"genuine")
    wait_until(lambda: dev1.seen(TOPICS.manifest), 10, "the coordinator's manifest at dev-1")
    assert dev1.seen(TOPICS.manifest) == [(TOPICS.manifest, b"genuine")]  # the fake was not delivered
    dev1.close()
    # Nor retained: a client subscribing now gets no retained manifest (its sentinel, the retained
    # coordinator status, comes after every retained message under the manifest filter) ...
    late = Client(port, "dev-2", AMQTT_USERS["dev-2"], subscribe=(TOPICS.manifest,))
    assert late.settle(TOPICS.coordinator_status) == b"online"
    assert late.seen(TOPICS.manifest) == []
    # ... though its manifest subscription works: the coordinator's next manifest arrives.
    coordinator.publish(TOPICS.manifest, b"genuine again")
    wait_until(lambda: late.seen(TOPICS.manifest), 10, "the coordinator's manifest at dev-2")
    assert late.seen(TOPICS.manifest) == [(TOPICS.manifest, b"genuine again")]
    late.close()
    coordinator.close()


@pytest.mark.broker
def test_amqtt_limit_retained_receipts_reach_devices_that_never_subscribed(amqtt_acl):
    """Documented limit (docs/security.md): pins amqtt 0.12.1's behaviour, so an upgrade
    that fixes it fails here and the docs get updated."""
    port = amqtt_acl.port
    dev0 = Client(port, "dev-0", AMQTT_USERS["dev-0"], subscribe=(TOPICS.ack("dev-0"),))
    coordinator = Client(port, "coordinator", AMQTT_USERS["coordinator"])
    coordinator.publish(TOPICS.ack("dev-0"), b"receipt for dev-0", retain=True)
    wait_until(lambda: dev0.seen(), 10, "dev-0's receipt")
    dev1 = Client(port, "dev-1", AMQTT_USERS["dev-1"])  # subscribes to nothing at all
    wait_until(lambda: dev1.seen(), 5, "the leak")
    assert dev1.seen() == [(TOPICS.ack("dev-0"), b"receipt for dev-0")]
    for c in (dev0, coordinator, dev1):
        c.close()


@pytest.mark.broker
def test_amqtt_limit_a_wrong_password_connect_cuts_the_device_off_every_delivery(amqtt_acl):
    """Documented limit: amqtt acts on clean_session before authenticating, so anyone who
    can reach the broker and knows a device id silently cuts that device off its receipts
    and manifests: its connection stays up and still answers (SUBACK, PUBACK), but nothing
    is delivered to it any more, not even the retained message a re-subscribe brings."""
    port = amqtt_acl.port
    dev0 = Client(port, "dev-0", AMQTT_USERS["dev-0"], subscribe=(TOPICS.manifest,))
    coordinator = Client(port, "coordinator", AMQTT_USERS["coordinator"])
    coordinator.publish(TOPICS.manifest, b"first", retain=True)
    wait_until(lambda: dev0.seen(), 10, "the first manifest")
    assert dev0.settle(TOPICS.manifest) == b"first"  # the control: a re-subscribe re-sends the retained one
    watcher = Client(port, "monitor", AMQTT_USERS["monitor"], subscribe=(TOPICS.manifest,))
    assert watcher.settle(TOPICS.manifest) == b"first"
    mark = len(watcher.seen())

    assert raw_connack(port, None, "dev-0", "dev-0", "wrong password") == 5
    coordinator.publish(TOPICS.manifest, b"second", retain=True)
    # "second" was broadcast: the watcher has it, and amqtt creates every subscriber's delivery of
    # one message in the same pass (broker.py _run_broadcast), before dev-0's next SUBSCRIBE is read.
    wait_until(lambda: watcher.seen()[mark:], 10, "the second manifest at the watcher")
    assert watcher.seen()[mark:] == [(TOPICS.manifest, b"second")]
    assert dev0.client.is_connected()
    assert dev0.subscribe(TOPICS.manifest) == [1]  # granted, and its retained "second" is due ...
    # ... before the next SUBACK: amqtt sends (and waits out) one SUBSCRIBE's retained messages
    # before it reads the next SUBSCRIBE of that client. So after this SUBACK nothing is in flight.
    assert dev0.subscribe(TOPICS.coordinator_status) == [1]
    assert dev0.seen() == [(TOPICS.manifest, b"first")] * 2  # neither the live nor the retained "second"
    dev0.publish(TOPICS.status("dev-0"), b"online", retain=True)  # and PUBACKed (asserted inside)
    for c in (dev0, coordinator, watcher):
        c.close()
