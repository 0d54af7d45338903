"""Hierarchical aggregation over two bridged mosquitto brokers on loopback.

Broker B1 hosts edge-1 (its coordinator and devices dev-0, dev-1); broker B2 hosts
edge-2 (dev-2, dev-3) and the root coordinator. B1 bridges the root federation's
topics to B2, so edge-1's upstream agent reaches the root through the bridge. Each
edge forwards one aggregate per round (weighted mean and total sample count) as
if it were one device. The root's model must equal a flat coordinator's over the
same four devices and seed, to float tolerance.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fedsync.broker_config.process import BrokerProcess, free_port, mosquitto_available
from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
from fedsync.coordinator.edge import EdgeTrainer
from fedsync.lab.federation import LocalFederation
from fedsync.coordinator.service import CoordinatorService
from fedsync.synthetic import synthetic_federation
from fedsync.models import build_model
from fedsync.device_agent.service import AgentHost, DeviceSpec
from fedsync.device_agent.trainer import NumpyTrainer
from fedsync.topics import Topics
from tests.util import wait_until

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")]
SEED, ROUNDS = 6, 3


def _broker(work: Path, name: str, bridge_to: int | None = None) -> BrokerProcess:
    d = work / name
    (d / "data").mkdir(parents=True)
    conf = (f"listener {free_port()} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
            "max_packet_size 8388608\nmax_queued_messages 100000\nlog_dest stderr\n")
    if bridge_to is not None:
        conf += (f"connection root\naddress 127.0.0.1:{bridge_to}\ntry_private true\ncleansession false\n"
                 f"remote_clientid bridge-{name}\nbridge_protocol_version mqttv311\n"
                 "topic fedsync/root/# both 1\n")
    (d / "mosquitto.conf").write_text(conf)
    b = BrokerProcess.from_config_dir(d)
    b.start()
    return b


def _edge(url: str, name: str, devices: list[int], data, model, params) -> tuple[CoordinatorService, AgentHost]:
    topics = Topics(name)
    core = CoordinatorCore(topics, params, RoundPolicy(rounds=0, target=len(devices), quorum=len(devices),
                                                       min_devices=len(devices), round_timeout=60.0),
                           hyper={}, incarnation=1, seed=SEED, driven=True)
    service = CoordinatorService(core, url, client_id=f"{name}-coordinator")
    host = AgentHost(url, topics, [DeviceSpec(f"dev-{i}", NumpyTrainer(model, data[i])) for i in devices],
                     seed=SEED, indices={f"dev-{i}": i for i in devices})
    return service, host


def test_two_edges_and_a_root_equal_one_flat_coordinator():
    work = Path(tempfile.mkdtemp(prefix="fedsync-hier-"))  # mosquitto must be able to traverse it
    users = {"coordinator": "x", **{f"dev-{i}": "x" for i in range(4)}}
    policy = RoundPolicy(rounds=ROUNDS, target=4, quorum=4, min_devices=4, round_timeout=60.0)
    started: list = []
    try:
        flat_broker = _broker(work, "flat")
        started.append(flat_broker)
        flat = LocalFederation(flat_broker.url, users, n_devices=4, seed=SEED, policy=policy, federation="flat")
        flat.start()
        assert flat.wait(60)
        flat.stop()
        flat_vector = flat.final_vector

        b2 = _broker(work, "b2")
        started.append(b2)
        b1 = _broker(work, "b1", bridge_to=b2.port)
        started.append(b1)
        data = synthetic_federation(1.0, 1.0, num_devices=4, seed=SEED)
        model = build_model("softmax", 60, 10)
        params = model.init_params(np.random.default_rng(SEED))
        root_closed: list[RoundClosed] = []
        root_core = CoordinatorCore(Topics("root"), params, replace_policy(policy), hyper=dict(flat.hyper),
                                    incarnation=1, seed=SEED)
        root = CoordinatorService(root_core, b2.url, client_id="root-coordinator", on_event=root_closed.append)
        e1, h1 = _edge(b1.url, "edge1", [0, 1], data, model, params)
        e2, h2 = _edge(b2.url, "edge2", [2, 3], data, model, params)
        up1 = AgentHost(b1.url, Topics("root"), [DeviceSpec("edge-1", EdgeTrainer(e1))], seed=SEED)
        up2 = AgentHost(b2.url, Topics("root"), [DeviceSpec("edge-2", EdgeTrainer(e2))], seed=SEED)
        parts = [root, e1, e2, h1, h2, up1, up2]
        for p in parts:
            p.start()
        started += parts
        wait_until(lambda: root_core.finished, 90, "the root to finish")
        committed = [e for e in root_closed if isinstance(e, RoundClosed) and e.outcome == "committed"]
        e1_updates, e2_updates = e1.core.stats.updates_accepted, e2.core.stats.updates_accepted
    finally:
        for p in reversed(started):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert len(committed) == ROUNDS and all(e.accepted == ("edge-1", "edge-2") for e in committed), [(e.round_id, e.outcome, e.reason, e.accepted) for e in root_closed if isinstance(e, RoundClosed)]
    assert root_core.stats.updates_accepted == 2 * ROUNDS  # one upload per edge per round, not per device
    assert (e1_updates, e2_updates) == (2 * ROUNDS, 2 * ROUNDS)
    total = sum(len(d.y_train) for d in data)
    assert committed[0].total_samples == total  # edges forwarded their devices' total weight
    np.testing.assert_allclose(root_core.vector, flat_vector, rtol=0, atol=1e-5)
    assert not np.allclose(root_core.vector, np.zeros_like(root_core.vector))


def replace_policy(p: RoundPolicy) -> RoundPolicy:
    from dataclasses import replace

    return replace(p, target=2, quorum=2, min_devices=2)
