"""Issue 12, "agents survive any model they are sent": the fit check and the agent core.

``device_agent/fit_check.py`` decides what of a trainer's result can be sent (every reason a
fit fails, every metric that is left out); ``AgentCore.on_fit_failed`` ends the round for
the device (training -> done) so the next round is trained as usual, in sync and async mode;
and a new coordinator's round with the same id but another model is not mistaken for the
round the device already finished. The processes-level scenario is in tests/test_hostile_cli.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.device_agent.agent import Note
from fedsync.device_agent.agent_state import AgentState
from fedsync.device_agent.fit_check import MAX_METRICS, check_fit
from fedsync.device_agent.trainer import NumpyTrainer
from fedsync.messages import RoundManifest, decode
from fedsync.models import build_model
from fedsync.synthetic import synthetic_federation
from fedsync.trainer_api import DEFAULT_HYPER, FitResult
from tests.sim import Sim, offset_trainer

MODEL = {"b": np.zeros(4, np.float32), "w": np.zeros((3, 4), np.float32)}


def fit(params=None, num_samples=10, metrics=None) -> FitResult:
    return FitResult({k: v + 1 for k, v in MODEL.items()} if params is None else params, num_samples,
                     {"train_loss": 0.5} if metrics is None else metrics)


@pytest.mark.parametrize("result, reason", [
    ("params", "result: fit returned str, not a FitResult"),
    (fit(num_samples=0), "num_samples: 0 is not an integer in 1..2**40"),
    (fit(num_samples=2**40 + 1), "num_samples: 1099511627777 is not an integer in 1..2**40"),
    (fit(num_samples=5.0), "num_samples: 5.0 is not an integer in 1..2**40"),
    (fit(num_samples=True), "num_samples: True is not an integer in 1..2**40"),
    (fit(params={"b": np.zeros(4, np.float32)}), "params: parameter 'w' is missing (2 in the model, 1 given)"),
    (fit(params={"b": np.zeros(4, np.float32), "w": np.zeros((4, 3), np.float32)}),
     "params: parameter 'w' has shape (4, 3), the model's is (3, 4)"),
    (fit(params={"b": np.zeros(4), "w": np.zeros((3, 4), np.float32)}),
     "params: parameter 'b' is float64, the model's is float32"),
    (fit(params={"b": [0.0] * 4, "w": np.zeros((3, 4), np.float32)}), "params: not a dict of numpy arrays"),
    (fit(params={"b": np.full(4, np.nan, np.float32), "w": np.zeros((3, 4), np.float32)}),
     "non_finite_params: 'b'"),
    (fit(params={"b": np.zeros(4, np.float32), "w": np.full((3, 4), np.inf, np.float32)}),
     "non_finite_params: 'w'"),
])
def test_a_fit_that_cannot_be_sent_fails_with_its_reason(result, reason):
    verdict = check_fit(MODEL, result)
    assert (verdict.reason, verdict.metrics, verdict.dropped) == (reason, {}, ())


def test_a_delta_that_overflows_float32_fails_though_both_models_are_finite():
    model = {"w": np.full(3, -3e38, np.float32)}
    verdict = check_fit(model, FitResult({"w": np.full(3, 3e38, np.float32)}, 1, {}))
    assert verdict.reason == "non_finite_delta: 'w'"
    assert check_fit(model, FitResult({"w": np.full(3, 0.0, np.float32)}, 1, {})).reason is None


def test_metrics_an_update_cannot_carry_are_left_out_and_named():
    metrics = {"train_loss": math.nan, "steps": 3, "inf": math.inf, "ok": np.float32(0.25), "flag": True,
               "x" * 33: 1.0, "text": "1", "huge": 10**400, "n": np.int64(7)}
    verdict = check_fit(MODEL, fit(metrics=metrics))
    assert verdict.reason is None
    assert verdict.metrics == {"steps": 3.0, "ok": 0.25, "n": 7.0}
    assert all(type(v) is float for v in verdict.metrics.values())  # as the encoder writes them
    assert verdict.dropped == ("train_loss", "inf", "flag", "x" * 32, "text", "huge")
    many = check_fit(MODEL, fit(metrics={f"m{i}": float(i) for i in range(MAX_METRICS + 3)}))
    assert (len(many.metrics), many.dropped) == (MAX_METRICS, ("m32", "m33", "m34"))
    assert check_fit(MODEL, fit(metrics=[1.0])).dropped == ("<metrics>",)


def test_the_builtin_trainer_on_a_huge_model_fails_its_fit_and_on_a_sane_one_passes():
    data = synthetic_federation(num_devices=2, seed=0)[0]
    model = build_model("softmax", 60, 10)
    trainer = NumpyTrainer(model, data)
    huge = {k: np.full_like(v, 3e38) for k, v in model.init_params(np.random.default_rng(0)).items()}
    with np.errstate(all="ignore"):
        result = trainer.fit(huge, DEFAULT_HYPER, np.random.default_rng(0))
    assert math.isnan(result.metrics["train_loss"])
    assert check_fit(huge, result).reason == "non_finite_params: 'b'"
    sane = model.init_params(np.random.default_rng(0))
    assert check_fit(sane, trainer.fit(sane, DEFAULT_HYPER, np.random.default_rng(0))).reason is None


# -- the agent core -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_fit_ends_the_round_for_the_device_and_the_next_round_is_trained(mode):
    devices = ["dev-0", "dev-1"]
    sim = Sim(devices, RoundPolicy(rounds=2, target=2, quorum=1, min_devices=2, shard_values=5, mode=mode,
                                   round_timeout=30.0))
    sim.trainers = {d: offset_trainer(1.0, 10) for d in devices}
    sim.stalled.add("dev-0")  # its first fit never returns: the adapter reports it failed instead
    sim.start()
    sim.settle()
    agent = sim.agents["dev-0"]
    assert agent.state is AgentState.TRAINING and sim.closed() == []
    out = agent.on_fit_failed(1, "non_finite_params: 'w'", sim.now)
    assert out == [Note("round_done", {"round": 1, "status": "fit_failed", "reason": "non_finite_params: 'w'"})]
    assert agent.state is AgentState.DONE
    assert agent.on_fit_failed(1, "again", sim.now) == []  # a second report for the round changes nothing
    sim.pending_train = [(c, t) for c, t in sim.pending_train if c != "dev-0"]
    sim.stalled.clear()
    sim.advance(31.0)  # round 1's deadline: it commits on dev-1 alone (quorum 1)
    sim.settle()
    first, second = sim.closed()
    assert (first.round_id, first.outcome, first.accepted) == (1, "committed", ("dev-1",))
    assert (second.round_id, second.outcome, second.accepted) == (2, "committed", ("dev-0", "dev-1"))
    assert agent.state in (AgentState.DONE, AgentState.FINISHED) and agent.stats.rounds_accepted == 1


def test_a_new_coordinators_round_with_the_same_id_but_another_model_is_trained():
    devices = ["dev-0", "dev-1"]
    policy = RoundPolicy(rounds=1, target=2, quorum=1, min_devices=2, shard_values=5)
    sim = Sim(devices, policy)
    sim.trainers = {d: offset_trainer(1.0, 10) for d in devices}
    sim.stalled.add("dev-0")
    sim.start()
    sim.settle()
    sim.agents["dev-0"].on_fit_failed(1, "non_finite_params: 'w'", sim.now)  # on campaign A's model
    assert [a.state for a in sim.agents.values()] == [AgentState.DONE, AgentState.DONE]
    # Campaign A's coordinator is replaced by a fresh one (new state dir): round 1 again, version 0,
    # but another initial model, so another digest. Both devices must train on it.
    other = {k: np.full_like(v, 0.5) for k, v in sim.params.items()}
    sim.coord = CoordinatorCore(sim.topics, other, policy, hyper={"lr": 0.1}, incarnation=2, seed=0)

    def only_the_open_manifest(sender, p):
        # As a device that reconnects sees it: the broker retains only the newest manifest, so its
        # "waiting" one (which would reset the device on its own) is never seen.
        if p.topic == sim.topics.manifest and decode(p.payload, RoundManifest).state == "waiting":
            return []
        return [p]

    sim.on_publish = only_the_open_manifest
    sim.stalled.clear()
    sim.pending_train.clear()
    sim.start()
    sim.settle()
    (closed,) = sim.closed()
    assert (closed.round_id, closed.outcome, closed.accepted) == (1, "committed", ("dev-0", "dev-1"))
    assert closed.vector == pytest.approx(np.full(16, 1.5, np.float32))
