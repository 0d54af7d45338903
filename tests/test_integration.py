"""A federation over a real broker (amqtt and mosquitto on 127.0.0.1), end to end.

Each test starts its own broker (fixture ``broker``), a coordinator and
simulated devices in this process (each device with its own MQTT connection,
client id, password and last will), and asserts exact counts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.coordinator.core import RoundPolicy
from fedsync.lab.federation import LocalFederation
from fedsync.messages import UpdateShard, decode, encode
from fedsync.topics import Topics
from tests.util import run_federation, wait_until

pytestmark = pytest.mark.broker


class Spy:
    """A plain paho client (user dev-31) that records update shards and can inject messages."""

    def __init__(self, broker, users) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-31")
        c.username_pw_set("dev-31", users["dev-31"])
        c.on_connect = lambda cl, u, f, rc, p: (cl.subscribe("fedsync/demo/up/#", 1), self.ready.set())
        c.on_message = self._on_message
        c.connect(broker.host, broker.port, 15)
        c.loop_start()
        assert self.ready.wait(10)
        time.sleep(0.3)  # let the SUBACK land before the federation starts
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.seen.append((msg.topic, bytes(msg.payload)))

    def inject(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def federation(broker, users, n=4, **kw) -> LocalFederation:
    policy = kw.pop("policy", RoundPolicy(rounds=2, target=n, quorum=n - 1, min_devices=n, round_timeout=60.0))
    return LocalFederation(broker.url, users, n_devices=n, seed=3, policy=policy, **kw)


def test_full_rounds_commit_and_the_model_improves(broker, broker_users):
    fed = federation(broker, broker_users, n=4, policy=RoundPolicy(rounds=3, target=4, quorum=4, min_devices=4))
    fed.start()
    try:
        assert fed.wait(60), "rounds did not commit"
        # every device got its receipt for every round (acks may trail the commit)
        wait_until(lambda: fed.agent_stats()["rounds_accepted"] == 12, 10, "all receipts")
        s = fed.summary()
    finally:
        fed.stop()
    assert s["rounds_completed"] == 3 and s["rounds_abandoned"] == 0
    assert (s["updates_accepted"], s["duplicates_dropped"], s["shards_rejected"]) == (12, 0, 0)
    assert s["devices_offline_detected"] == 0
    assert all(r.accepted == 4 and r.reason == "target" for r in fed.records)
    initial = fed.accuracy(np.zeros_like(fed.final_vector))
    assert s["final_accuracy"] > initial + 0.1


def test_device_killed_mid_round_goes_offline_by_last_will_and_round_commits_on_quorum(broker, broker_users):
    # dev-3 is slow (3 s per fit); it is killed while training round 2.
    fed = federation(broker, broker_users, n=4, train_delays={"dev-3": 3.0})
    fed.start()
    try:
        wait_until(lambda: len(fed.records) >= 1, 30, "round 1")
        killed_at = time.monotonic()
        fed.kill_device("dev-3")  # socket closed, no DISCONNECT: the broker must publish the will
        assert fed.wait(30), "round 2 did not commit"
        closed_after = time.monotonic() - killed_at
        s = fed.summary()
    finally:
        fed.stop()
    r2 = fed.records[1]
    assert (r2.outcome, r2.accepted, r2.selected, r2.reason) == ("committed", 3, 4, "quorum_no_live_pending")
    assert s["devices_offline_detected"] == 1
    assert s["updates_accepted"] == 4 + 3
    assert closed_after < 10.0  # the round timeout is 60 s: only the will can have closed it


def test_redelivered_shards_count_as_duplicates_exactly(broker, broker_users):
    spy = Spy(broker, broker_users)
    fed = federation(broker, broker_users, n=3, policy=RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3))
    fed.start()
    try:
        assert fed.wait(30)
        wait_until(lambda: len(spy.seen) >= 3, 10, "spy to see the update shards")
        before = fed.summary()
        with spy.lock:
            shards = list(spy.seen)
        for topic, payload in shards:  # a broker (or device) redelivers every shard once more
            spy.inject(topic, payload)
        core = fed.coordinator.core
        wait_until(lambda: core.stats.duplicates_dropped == before["duplicates_dropped"] + len(shards), 15,
                   "the coordinator to drop every redelivery")
        # Sentinel instead of a sleep: a malformed shard injected after the redeliveries on the same
        # connection is handled after them (per-connection order), so once it is counted, nothing the
        # redeliveries could still cause is in flight.
        spy.inject(shards[0][0], b"\xff")
        wait_until(lambda: core.stats.shards_rejected == before["shards_rejected"] + 1, 15, "the sentinel")
        after = fed.summary()
    finally:
        fed.stop()
        spy.close()
    assert len(shards) == 3  # 610 params in one shard per device
    assert after["updates_accepted"] == before["updates_accepted"] == 3
    assert after["duplicates_dropped"] == before["duplicates_dropped"] + 3
    assert before["shards_rejected"] == 0 and after["shards_rejected"] == 1  # the sentinel alone


def test_corrupted_shard_is_rejected_by_digest_and_the_round_still_commits(broker, broker_users):
    spy = Spy(broker, broker_users)
    fed = federation(broker, broker_users, n=3, train_delays={"dev-2": 1.5},
                     policy=RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3, round_timeout=60.0))
    fed.start()
    try:
        # dev-0's genuine shard, bit-flipped in flight, published for dev-2 who is still training
        wait_until(lambda: any("/up/dev-0/" in t for t, _ in spy.seen), 20, "dev-0's upload")
        topic, payload = next((t, p) for t, p in spy.seen if "/up/dev-0/" in t)
        s = decode(payload, UpdateShard)
        bad = replace(s, device="dev-2", update_id="uforged", data=s.data[:-1] + bytes([s.data[-1] ^ 0x40]))
        spy.inject(Topics("demo").up("dev-2", s.round_id, "uforged", 0), encode(bad))
        core = fed.coordinator.core
        wait_until(lambda: core.stats.rejected_by_reason["digest"] == 1, 10, "the digest rejection")
        assert fed.wait(30)
        summary = fed.summary()
    finally:
        fed.stop()
        spy.close()
    assert summary["shards_rejected"] == 1 and summary["rejected_by_reason"] == {"digest": 1}
    assert summary["updates_accepted"] == 3 and fed.records[0].accepted == 3


def test_signed_federation_over_the_broker(broker, broker_users):
    keys = {f"dev-{i}": bytes([i + 7]) * 32 for i in range(3)}
    fed = federation(broker, broker_users, n=3, signing_keys=keys,
                     policy=RoundPolicy(rounds=2, target=3, quorum=3, min_devices=3))
    s = run_federation(fed, 30)
    assert (s["updates_accepted"], s["shards_rejected"], s["rounds_completed"]) == (6, 0, 2)
