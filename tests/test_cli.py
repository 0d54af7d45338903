"""The command line, as a user runs it: separate processes over a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from tests.util import stop_process

pytestmark = pytest.mark.broker
FEDSYNC = [sys.executable, "-m", "fedsync.cli"]


def demo_replay(devices: int, rounds: int, seed: int = 0) -> dict:
    """What ``fedsync demo`` must report, computed in memory from the demo's own recipe: each
    device trains as the agent does (seeds [seed, i, round]), FedAdam folds the updates, the
    coordinator's exact float32 step makes the next model; the bytes are the model shards each
    device fetches (the full model, then the delta when it is smaller) and the update shards it
    sends, encoded as the coordinator and the agent encode them."""
    from fedsync.coordinator.model_publication import RetainedModel
    from fedsync.coordinator.model_store import exact_step, payload_bytes
    from fedsync.coordinator.policy import RoundPolicy
    from fedsync.coordinator.strategies import FedAdam
    from fedsync.codecs import get_codec
    from fedsync.device_agent.trainer import NumpyTrainer
    from fedsync.lab.demo import DEMO_HYPER, DEMO_SERVER_LR, centralised_reference
    from fedsync.messages import UpdateShard, encode
    from fedsync.models import SoftmaxRegression
    from fedsync.params import digest, flatten, shard_slices, spec_of, unflatten, update_digest, vector_digest
    from fedsync.synthetic import synthetic_federation, union
    from fedsync.topics import Topics

    policy = RoundPolicy()
    model = SoftmaxRegression(60, 10)
    data = synthetic_federation(1.0, 1.0, num_devices=devices, seed=seed)
    x, y, xt, yt = union(data)
    params = model.init_params(np.random.default_rng(seed))
    spec = spec_of(params)
    g = flatten(params, spec)
    store = RetainedModel(Topics("demo-sync"), policy.shard_values, policy.model_codec)
    fetch = payload_bytes(store.full(0, g))  # round 1: every device fetches model v0 whole
    factory = FedAdam(g.size, server_lr=DEMO_SERVER_LR).factory()
    codec, slices = get_codec(policy.update_codec), shard_slices(g.size, policy.shard_values)
    trainers = [NumpyTrainer(model, d) for d in data]
    accuracy, bytes_up, bytes_down = [], 0, 0
    for r in range(1, rounds + 1):
        bytes_down += devices * fetch
        strategy = factory(g.size)
        for i, trainer in enumerate(trainers):
            fit = trainer.fit(unflatten(g, spec), dict(DEMO_HYPER), np.random.default_rng([seed, i, r]))
            delta = flatten(fit.params, spec) - g
            strategy.add(delta, fit.num_samples)
            datas = [codec.encode(delta[off:off + n]) for off, n in slices]
            whole = update_digest([digest(d) for d in datas], federation="demo", device=f"dev-{i}", round_id=r,
                                  update_id="u000000000000", base_version=r - 1, base_digest=vector_digest(g))
            bytes_up += sum(len(encode(UpdateShard(
                f"dev-{i}", r, "u000000000000", r - 1, k, len(slices), off, n, g.size, codec.name, fit.num_samples,
                digest(d), whole, d, dict(fit.metrics)))) for k, ((off, n), d) in enumerate(zip(slices, datas)))
        _, new = exact_step(g, strategy.finish(g))
        published, _ = store.commit(r - 1, g, new)
        delta_shards = [p for p in published if "/modeldelta/" in p.topic]
        fetch = payload_bytes(delta_shards) if store.delta_from == r - 1 else payload_bytes(store.last_full)
        g = new
        accuracy.append(float((model.predict(unflatten(g, spec), xt) == yt).mean()))
    central, _ = centralised_reference(model, x, y, seed)
    return {"accuracy_per_round": accuracy, "final_accuracy": accuracy[-1], "bytes_up": bytes_up,
            "bytes_down": bytes_down, "centralised_accuracy": float((model.predict(central, xt) == yt).mean())}


def test_demo_json_stdout_is_one_json_document_and_the_table_goes_to_stderr():
    # `fedsync demo --json | jq .` must work: nothing but the JSON document on stdout.
    out = subprocess.run([*FEDSYNC, "demo", "--devices", "3", "--rounds", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)  # the whole of stdout, not its last line
    assert out.stdout.count("\n") == 1  # one line: the document
    assert (summary["finished"], summary["mode"], summary["devices"], summary["broker"]) == (True, "sync", 3, "amqtt")
    assert summary["rounds_completed"] == 2 and summary["rounds_abandoned"] == 0
    assert (summary["updates_accepted"], summary["duplicates_dropped"], summary["shards_rejected"]) == (6, 0, 0)
    assert summary["rejected_by_reason"] == {} and summary["shards_resent"] == 0
    assert summary["devices_offline_detected"] == 0 and summary["devices_killed"] == []
    assert len(summary["round_seconds"]) == 2
    # Every number is what the recipe computes in memory (the recipe's own values are pinned in
    # tests/test_demo_recipe.py): accuracies to the last bit, bytes to the byte. The coordinator folds
    # in arrival order; its float64 sums of (exact) float32 x sample-count products round, if at all,
    # ~29 bits below the float32 the model is stored in, so the order does not reach these numbers.
    want = demo_replay(devices=3, rounds=2)
    assert {k: summary[k] for k in want} == want
    assert "fedsync demo (sync)" in out.stderr and "Rounds committed / abandoned" in out.stderr  # the table


def test_demo_without_json_prints_the_table_on_stdout():
    # positive control for the test above: the table is on stdout when no JSON is asked for
    out = subprocess.run([*FEDSYNC, "demo", "--devices", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fedsync demo (sync)" in out.stdout and "Rounds committed / abandoned" in out.stdout
    assert "Rounds committed" not in out.stderr


def test_fieldtest_json_stdout_is_one_json_document(tmp_path: Path):
    out = subprocess.run([*FEDSYNC, "fieldtest", "--devices", "2", "--rounds", "2", "--kill-fraction", "0",
                          "--profile", "clean", "--out", str(tmp_path / "report"), "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert (summary["finished"], summary["fault_free_finished"], summary["profile"]) == (True, True, "clean")
    assert (summary["rounds_completed"], summary["rounds_abandoned"], summary["updates_accepted"]) == (2, 0, 4)
    assert (summary["duplicates_dropped"], summary["shards_rejected"], summary["devices_killed"]) == (0, 0, [])
    assert summary == json.loads((tmp_path / "report" / "report.json").read_text())["summary"]
    assert "fedsync fieldtest (clean" in out.stderr  # the table, for the person watching


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")
def test_coordinator_and_agent_processes_survive_an_agent_kill_9(tmp_path: Path):
    users = {"coordinator": "c-pw", "dev-0": "d0-pw", "dev-1": "d1-pw", "dev-2": "d2-pw"}
    for name, pw in users.items():
        (tmp_path / f"{name}.pw").write_text(pw + "\n")
    (tmp_path / "slow.toml").write_text('[agent]\ntrain_delay = 4.0\n')
    procs: dict[str, subprocess.Popen] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with BrokerProcess("mosquitto", users=users) as broker:
        try:
            coord_log = tmp_path / "coordinator.log"
            procs["coordinator"] = subprocess.Popen(
                [*FEDSYNC, "coordinator", "--broker", broker.url, "--password-file", str(tmp_path / "coordinator.pw"),
                 "--rounds", "2", "--target", "3", "--quorum", "2", "--min-devices", "3", "--round-timeout", "60"],
                stderr=coord_log.open("w"), env=env)
            for i in range(3):
                extra = ["--config", str(tmp_path / "slow.toml")] if i == 2 else []
                procs[f"dev-{i}"] = subprocess.Popen(
                    [*FEDSYNC, "agent", "--broker", broker.url, "--device-id", f"dev-{i}",
                     "--password-file", str(tmp_path / f"dev-{i}.pw"), "--once", *extra],
                    stderr=(tmp_path / f"dev-{i}.log").open("w"), env=env)
            deadline = time.monotonic() + 60
            while "round_committed round=1 " not in coord_log.read_text():
                assert time.monotonic() < deadline, coord_log.read_text()[-3000:]
                time.sleep(0.05)
            procs["dev-2"].send_signal(signal.SIGKILL)  # mid round 2: dev-2 is in its 4 s fit
            assert procs["coordinator"].wait(30) == 0
            for i in range(2):
                assert procs[f"dev-{i}"].wait(15) == 0
            log = coord_log.read_text()
            status = subprocess.run([*FEDSYNC, "status", "--broker", broker.url, "--username", "coordinator",
                                     "--password-file", str(tmp_path / "coordinator.pw")],
                                    capture_output=True, text=True, timeout=30)
        finally:
            for p in procs.values():
                stop_process(p, sig=signal.SIGKILL)
    assert "device_offline device=dev-2" in log
    line = next(ln for ln in log.splitlines() if "round_committed round=2 " in ln)
    assert "accepted=2 selected=3 reason=quorum_no_live_pending" in line
    assert "coordinator_stop rounds_committed=2 rounds_abandoned=0 updates_accepted=5 duplicates_dropped=0 shards_rejected=0" in log
    assert status.returncode == 0, status.stderr
    assert "manifest: round 2 finished, model v2" in status.stdout
    assert "device dev-2: offline" in status.stdout
    assert "device dev-0: offline" in status.stdout  # a clean exit publishes offline too
    assert "coordinator: offline" in status.stdout
