"""The swarm host (one selector thread, many devices) against a real coordinator on mosquitto.

Each device has its own paho client, client id, password, persistent session and last
will, exactly like AgentHost's devices; the swarm only changes who drives the sockets.
"""

from __future__ import annotations


import numpy as np
import pytest

from broker_config.process import BrokerProcess, mosquitto_available
from coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
from coordinator.service import CoordinatorService
from device_agent.service import DeviceSpec
from device_agent.swarm import NoiseTrainer, Swarm
from fedsync.mqtt import Credentials
from fedsync.topics import Topics
from tests.util import wait_until

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")]

N_DEVICES = 50


@pytest.fixture(scope="module")
def users() -> dict[str, str]:
    return {"coordinator": "coordinator-secret", **{f"sw-{i}": f"sw-{i}-secret" for i in range(N_DEVICES)}}


@pytest.fixture
def mosquitto(users):
    broker = BrokerProcess("mosquitto", users=users)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def start_coordinator(broker: BrokerProcess, users, policy: RoundPolicy, closed: list) -> CoordinatorService:
    core = CoordinatorCore(Topics("swarm"), {"w": np.zeros(3000, np.float32), "b": np.zeros(10, np.float32)},
                           policy, hyper={"lr": 0.1}, incarnation=7, seed=0)
    service = CoordinatorService(core, broker.url, credentials=Credentials("coordinator", users["coordinator"]),
                                 on_event=lambda e: closed.append(e) if isinstance(e, RoundClosed) else None)
    return service.start()


def make_swarm(broker: BrokerProcess, users, n: int, delays: dict[str, float] | None = None) -> Swarm:
    specs = [DeviceSpec(f"sw-{i}", NoiseTrainer(num_samples=10 + i), Credentials(f"sw-{i}", users[f"sw-{i}"]),
                        (delays or {}).get(f"sw-{i}", 0.0))
             for i in range(n)]
    return Swarm(broker.url, Topics("swarm"), specs, seed=1, max_connecting=8)


def test_fifty_swarm_devices_complete_two_rounds_with_exact_counts(mosquitto, users):
    closed: list[RoundClosed] = []
    coordinator = start_coordinator(mosquitto, users, RoundPolicy(
        rounds=2, target=N_DEVICES, quorum=N_DEVICES, min_devices=N_DEVICES, round_timeout=50.0,
        shard_values=1024), closed)
    swarm = make_swarm(mosquitto, users, N_DEVICES).start()
    try:
        assert swarm.wait_connected(N_DEVICES, 20), f"only {swarm.connected_count()} connected"
        assert swarm.wait_finished(45), "the swarm did not see the finished manifest"
        # receipts may trail the final manifest (no ordering across topics)
        wait_until(lambda: swarm.stats()["rounds_accepted"] == 2 * N_DEVICES, 10, "every receipt")
        s = coordinator.core.stats
        agents = swarm.stats()
    finally:
        swarm.stop()
        coordinator.stop()
    assert [c.outcome for c in closed] == ["committed", "committed"]
    assert all(len(c.accepted) == N_DEVICES for c in closed)
    assert s.updates_accepted == 2 * N_DEVICES
    assert s.duplicates_dropped == 0
    assert s.shards_rejected == 0 and not s.rejected_by_reason
    assert agents["connects"] == N_DEVICES  # one connection each: no drops, no reconnect storms
    assert agents["shards_sent"] == 2 * N_DEVICES * 3  # 3010 values in shards of 1024
    assert agents["shards_resent"] == 0
    # FedAvg of params + noise: the model moved, by about the noise scale, not more
    assert 0 < np.abs(closed[-1].vector).max() < 0.01


def test_a_killed_swarm_device_fires_its_last_will_and_the_round_closes_on_quorum(mosquitto, users):
    closed: list[RoundClosed] = []
    n = 6
    coordinator = start_coordinator(mosquitto, users, RoundPolicy(
        rounds=1, target=n, quorum=n - 1, min_devices=n, round_timeout=40.0, shard_values=1024), closed)
    swarm = make_swarm(mosquitto, users, n, delays={"sw-5": 30.0}).start()
    try:
        assert swarm.wait_connected(n, 20)
        wait_until(lambda: coordinator.core.stats.updates_accepted == n - 1, 20, "the healthy updates")
        swarm.kill("sw-5")  # still 'training': its last will must close the round, not the deadline
        wait_until(lambda: len(closed) == 1, 10, "the round to close")
    finally:
        swarm.stop()
        coordinator.stop()
    assert closed[0].outcome == "committed"
    assert sorted(closed[0].accepted) == [f"sw-{i}" for i in range(n - 1)]
    assert closed[0].closed_at - closed[0].started_at < 25
    assert coordinator.core.stats.devices_offline_detected >= 1
