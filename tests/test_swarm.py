"""The swarm host (one selector thread, many devices) against a real coordinator on mosquitto.

Each device has its own paho client, client id, password, persistent session and last
will, exactly like AgentHost's devices; the swarm only changes who drives the sockets.
"""

from __future__ import annotations


import numpy as np
import pytest

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
from fedsync.coordinator.service import CoordinatorService
from fedsync.device_agent.service import DeviceSpec
from fedsync.lab.swarm import NoiseTrainer, Swarm
from fedsync.address import Credentials
from fedsync.coordinator.aggregate import FedAvg
from fedsync.coordinator.model_store import exact_step
from fedsync.params import flatten, spec_of, unflatten
from fedsync.topics import Topics
from tests.util import on_service_thread, wait_until

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


def initial_params() -> dict[str, np.ndarray]:
    return {"w": np.zeros(3000, np.float32), "b": np.zeros(10, np.float32)}


def start_coordinator(broker: BrokerProcess, users, policy: RoundPolicy, closed: list,
                      verifier=None) -> CoordinatorService:
    core = CoordinatorCore(Topics("swarm"), initial_params(),
                           policy, hyper={"lr": 0.1}, incarnation=7, seed=0, verifier=verifier)
    service = CoordinatorService(core, broker.url, credentials=Credentials("coordinator", users["coordinator"]),
                                 on_event=lambda e: closed.append(e) if isinstance(e, RoundClosed) else None)
    return service.start()


def make_swarm(broker: BrokerProcess, users, n: int, delays: dict[str, float] | None = None,
               signers: dict | None = None) -> Swarm:
    specs = [DeviceSpec(f"sw-{i}", NoiseTrainer(num_samples=10 + i), Credentials(f"sw-{i}", users[f"sw-{i}"]),
                        (delays or {}).get(f"sw-{i}", 0.0), (signers or {}).get(f"sw-{i}"))
             for i in range(n)]
    return Swarm(broker.url, Topics("swarm"), specs, seed=1, max_connecting=8)


def fedavg_replay(n: int, rounds: int, seed: int = 1) -> list[np.ndarray]:
    """Each round's global model, computed in memory: device i fits NoiseTrainer(10 + i) with
    the rng the swarm seeds per (device, round), FedAvg folds the deltas, the exact float32 step."""
    spec = spec_of(initial_params())
    g, models = flatten(initial_params(), spec), []
    for r in range(1, rounds + 1):
        fedavg = FedAvg(g.size)
        for i in range(n):
            fit = NoiseTrainer(num_samples=10 + i).fit(unflatten(g, spec), {}, np.random.default_rng([seed, i, r]))
            fedavg.add(flatten(fit.params, spec) - g, fit.num_samples)
        _, g = exact_step(g, fedavg.finish(g))
        models.append(g)
    return models


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
    # Each committed model is FedAvg of exactly these 50 devices' noise. Not bit for bit: the
    # coordinator folds in arrival order, and a float64 sum in another order can round to the
    # neighbouring float32 (1 in ~10^7 values); 1e-6 relative is 10 float32 steps.
    for got, want in zip([c.vector for c in closed], fedavg_replay(N_DEVICES, 2), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


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
        # read on the coordinator's thread, before the other devices' clean stops mark them offline too
        offline = on_service_thread(coordinator, lambda core: core.stats.devices_offline_detected)
    finally:
        swarm.stop()
        coordinator.stop()
    assert (closed[0].outcome, closed[0].reason) == ("committed", "quorum_no_live_pending")  # not the deadline
    assert sorted(closed[0].accepted) == [f"sw-{i}" for i in range(n - 1)]
    assert offline == 1  # sw-5, by its will


KEYS = {f"sw-{i}": bytes([i + 1]) * 32 for i in range(3)}


def test_signed_swarm_updates_are_accepted_under_a_verifier(mosquitto, users):
    # DeviceSpec.signer reaches the device's core: every update carries a signature that verifies.
    from fedsync.signing import HmacSigner, HmacVerifier

    closed: list[RoundClosed] = []
    coordinator = start_coordinator(mosquitto, users, RoundPolicy(
        rounds=1, target=3, quorum=3, min_devices=3, round_timeout=30.0, shard_values=1024), closed,
        verifier=HmacVerifier(KEYS))
    swarm = make_swarm(mosquitto, users, 3, signers={d: HmacSigner(k) for d, k in KEYS.items()}).start()
    try:
        assert swarm.wait_finished(30), "the swarm did not see the finished manifest"
        wait_until(lambda: swarm.stats()["rounds_accepted"] == 3, 10, "every receipt")
        s = coordinator.core.stats
        agents = swarm.stats()
    finally:
        swarm.stop()
        coordinator.stop()
    assert [(c.outcome, c.accepted) for c in closed] == [("committed", ("sw-0", "sw-1", "sw-2"))]
    assert (s.updates_accepted, s.shards_rejected, dict(s.rejected_by_reason)) == (3, 0, {})
    assert (agents["updates_rejected"], agents["shards_sent"]) == (0, 3 * 3)


def test_a_swarm_device_signing_with_the_wrong_key_is_rejected_every_time(mosquitto, users):
    from fedsync.signing import HmacSigner, HmacVerifier

    closed: list[RoundClosed] = []
    coordinator = start_coordinator(mosquitto, users, RoundPolicy(
        rounds=1, target=3, quorum=2, min_devices=3, round_timeout=6.0, shard_values=1024), closed,
        verifier=HmacVerifier(KEYS))
    signers = {"sw-0": HmacSigner(KEYS["sw-0"]), "sw-1": HmacSigner(KEYS["sw-1"]),
               "sw-2": HmacSigner(b"\x66" * 32)}  # not the key the coordinator holds for sw-2
    swarm = make_swarm(mosquitto, users, 3, signers=signers).start()
    try:
        assert swarm.wait_finished(30), "the swarm did not see the finished manifest"
        wait_until(lambda: swarm.stats()["rounds_accepted"] == 2, 10, "the two good receipts")
        s = coordinator.core.stats
        bad = swarm.devices["sw-2"].core.stats
    finally:
        swarm.stop()
        coordinator.stop()
    assert [(c.outcome, c.accepted) for c in closed] == [("committed", ("sw-0", "sw-1"))]
    # the first update and each of its 3 re-sends under a fresh id (AgentCore.max_retries) is refused
    assert (s.updates_accepted, s.shards_rejected, dict(s.rejected_by_reason)) == (2, 4, {"signature": 4})
    assert (bad.updates_rejected, bad.rounds_accepted, bad.shards_sent) == (4, 0, 4 * 3)
