"""Issue 12, "Must show": a bad device cannot stop the federation, through nothing but the CLI.

Every service is a separate process: ``mosquitto`` (``BrokerProcess``, passwords on), one
``fedsync coordinator`` and ``fedsync agent`` processes, read back from their logs, exit
codes and the coordinator's ``--state-dir``.

Poison (safe defaults). Two federations, each on its own mosquitto, from the same initial
model: five honest agents (``--data-index 0..4``), and in one of them a sixth,
``fedsync agent --trainer tests.poison:make_trainer`` sending every value 3.0e38 with
``num_samples`` 10,000,000 - the update of the issue. With no ``[hardening]`` configuration
the poison is refused in every round (final receipt ``refused``, reason
``num_samples_bound``: the default cap is 1,000,000), every round commits on the five
honest updates at once (no selected device alive and pending), and the final model equals
the one of the federation without the poisoner to 1e-6 per value.

Why 1e-6: both federations fold the same five honest updates each round (full-batch
training is deterministic, and the models start equal), but in their arrival order. FedAvg
sums ``n_i * d_i`` in float64 and rounds the mean to float32 once per round, so another order
changes at most the last float32 bit of a value (6e-8 for values below 1); over four rounds
that stays below 1e-6 (measured: 0.0, the two models were bit-identical). A poison that got
through would move every value by about 3e38.

Degenerate model (agents survive any model). Coordinator A is started with ``--model
huge.npz``, the built-in softmax model with every value 3.0e38 (finite, so the model loader
takes it): training on it overflows, the loss and the parameters are NaN. Each of the four
standing agents reports the failed fit (``fit_failed round=1 reason="non_finite_params:
'b'"``, a ``round_done status=fit_failed`` line) and uploads nothing; none dies, and none
stays connected as a zombie. A is stopped; coordinator B (a fresh state dir, the default
model) runs three rounds with the same, never-restarted agent processes, and every agent's
update is accepted in every one of them: 3 x 4 accepted, 1 failed fit per agent, exit 0.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.coordinator.journal import Journal
from tests.cli_procs import FEDSYNC, CliProcess, Fleet

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")]

ROOT = Path(__file__).resolve().parents[1]
HONEST = [f"dev-{i}" for i in range(5)]
POISONER = "dev-poison"
ROUNDS = 4
TOLERANCE = 1e-6


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch) -> Iterator[Fleet]:
    # `tests.poison` must be importable by the agent processes, wherever pytest was started.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    (tmp_path / "logs").mkdir()
    f = Fleet(tmp_path / "logs")
    try:
        yield f
    finally:
        f.stop_all()


class Federation:
    """One mosquitto and the fedsync commands of one federation on it."""

    def __init__(self, fleet: Fleet, work: Path, name: str, devices: list[str]) -> None:
        self.fleet, self.work, self.name = fleet, work, name
        self.users = {u: secrets.token_urlsafe(12) for u in ["coordinator", *devices]}
        work.mkdir()
        for user, password in self.users.items():
            (work / f"{user}.pw").write_text(password + "\n")
        self.broker = BrokerProcess("mosquitto", users=self.users)

    def argv(self, account: str) -> list[str]:
        return ["--broker", self.broker.url, "--password-file", str(self.work / f"{account}.pw"),
                "--federation", self.name]

    def coordinator(self, *extra: str, quorum: int = len(HONEST), state: str = "state") -> CliProcess:
        n = len(self.users) - 1
        return self.fleet.start(f"{self.name}-coordinator", [
            FEDSYNC, "coordinator", *self.argv("coordinator"), "--target", str(n), "--quorum", str(quorum),
            "--min-devices", str(n), "--state-dir", str(self.work / state), *extra])

    def agent(self, device: str, *extra: str) -> CliProcess:
        return self.fleet.start(f"{self.name}-{device}", [
            FEDSYNC, "agent", *self.argv(device), "--device-id", device, *extra])

    def final_model(self, state: str = "state") -> tuple[int, np.ndarray]:
        ck = Journal(self.work / state).load().checkpoint
        assert ck is not None, f"{self.name}: no checkpoint in {self.work / state}"
        return ck.version, ck.vector


def test_a_poisoning_agent_is_refused_every_round_and_the_model_is_as_without_it(fleet, tmp_path):
    poisoned = Federation(fleet, tmp_path / "poisoned", "poisoned", [*HONEST, POISONER])
    clean = Federation(fleet, tmp_path / "clean", "clean", HONEST)
    with poisoned.broker, clean.broker:
        coordinators, agents = {}, {}
        for fed in (poisoned, clean):
            coordinators[fed.name] = fed.coordinator("--rounds", str(ROUNDS), "--round-timeout", "60")
            for i, device in enumerate(HONEST):
                agents[fed.name, device] = fed.agent(device, "--data-index", str(i), "--once")
        evil = poisoned.agent(POISONER, "--trainer", "tests.poison:make_trainer", "--once")
        with fleet.phase("both campaigns run to their end"):
            for p in coordinators.values():
                assert p.wait(240) == 0
            for p in [*agents.values(), evil]:
                assert p.wait(60) == 0

    with fleet.phase("the poison is refused in every round, with its reason", "poisoned-"):
        assert evil.events("agent_start")[0].fields["trainer"] == "tests.poison:make_trainer"
        receipts = evil.events("round_done")
        assert [(r.int("round"), r.fields["status"], r.fields.get("reason")) for r in receipts] == [
            (k, "refused", "num_samples_bound") for k in range(1, ROUNDS + 1)]
        refused = coordinators["poisoned"].events("input_rejected", reason="num_samples_bound")
        assert [r.fields["topic"].split("/")[3] for r in refused] == [POISONER] * ROUNDS

    with fleet.phase("every round commits on the honest updates, in both federations"):
        for name, p in coordinators.items():
            committed = p.events("round_committed")
            assert [(c.int("round"), c.int("accepted")) for c in committed] == [
                (k, len(HONEST)) for k in range(1, ROUNDS + 1)], name
            assert p.events("round_abandoned") == [], name
            assert [c.fields["reason"] for c in committed] == (
                ["quorum_no_live_pending"] if name == "poisoned" else ["target"]) * ROUNDS, name
        for (name, device), p in agents.items():
            assert len(p.events("round_done", status="accepted")) == ROUNDS, (name, device)

    with fleet.phase("the final model is the one without the poisoner"):
        (v_poisoned, poisoned_model), (v_clean, clean_model) = poisoned.final_model(), clean.final_model()
        assert (v_poisoned, v_clean) == (ROUNDS, ROUNDS)
        assert np.isfinite(poisoned_model).all() and float(np.abs(clean_model).max()) > 0.01  # it trained
        assert float(np.max(np.abs(poisoned_model - clean_model))) <= TOLERANCE


def test_agents_report_a_degenerate_model_as_a_failed_fit_and_serve_every_later_round(fleet, tmp_path):
    devices = [f"dev-{i}" for i in range(4)]
    fed = Federation(fleet, tmp_path / "degenerate", "degenerate", devices)
    huge = tmp_path / "huge.npz"
    np.savez(huge, w=np.full((60, 10), 3.0e38, np.float32), b=np.full(10, 3.0e38, np.float32))
    with fed.broker:
        bad = fed.coordinator("--model", str(huge), "--rounds", "3", "--round-timeout", "120", quorum=4, state="A")
        agents = [fed.agent(d, "--data-index", str(i)) for i, d in enumerate(devices)]

        with fleet.phase("every agent reports its failed fit on the degenerate model", "degenerate-"):
            fleet.wait_for("a fit_failed line from every agent",
                           lambda: all(a.events("fit_failed") for a in agents), 60, needs=[bad, *agents])
            for a in agents:
                assert [(f.int("round"), f.fields["reason"]) for f in a.events("fit_failed")] == [
                    (1, "non_finite_params: 'b'")]
                assert [r.fields["status"] for r in a.events("round_done")] == ["fit_failed"]
            assert bad.events("round_committed") == [] and bad.events("input_rejected") == []
            bad.signal(signal.SIGTERM)
            assert bad.wait(30) == 0

        good = fed.coordinator("--rounds", "3", "--round-timeout", "60", quorum=4, state="B")
        with fleet.phase("the same agent processes train and upload in every round of the next campaign",
                         "degenerate-"):
            assert good.wait(120) == 0
            fleet.wait_for("three accepted receipts per agent",
                           lambda: all(len(a.events("round_done", status="accepted")) == 3 for a in agents), 30,
                           needs=agents)
            assert [(c.int("round"), c.int("accepted")) for c in good.events("round_committed")] == [
                (k, 4) for k in (1, 2, 3)]
            assert good.events("round_abandoned") == []
            for a in agents:
                assert [r.int("round") for r in a.events("round_done", status="accepted")] == [1, 2, 3]
                assert len(a.events("fit_failed")) == 1 and a.alive()
            version, model = fed.final_model("B")
            assert version == 3 and np.isfinite(model).all()

        with fleet.phase("the agents stop cleanly and count the failed fit", "degenerate-"):
            for a in agents:
                a.signal(signal.SIGTERM)
            assert [a.wait(30) for a in agents] == [0] * 4
            assert [a.events("agent_stop")[0].int("fits_failed") for a in agents] == [1] * 4
            assert not any("agent_failed" in a.text() for a in agents)


def test_the_hostile_fieldtest_commits_every_round_with_a_clean_audit(tmp_path):
    """``fedsync fieldtest --profile hostile``: dev-3 poisons, dev-4 floods, mosquitto is killed once.

    Five devices: dev-0..2 honest, quorum 3, so every round commits with exactly the three honest
    updates (the poison is refused, the flooder is never selected). The reference run is the
    three honest devices alone on the same data: the models then differ at most in the last bit
    of the fold order, so the accuracies are equal.
    """
    import json
    import subprocess

    out = subprocess.run([FEDSYNC, "fieldtest", "--profile", "hostile", "--devices", "5", "--rounds", "4",
                          "--out", str(tmp_path / "report"), "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.loads(out.stdout)
    assert (s["finished"], s["fault_free_finished"], s["rounds_completed"], s["rounds_abandoned"]) == (True, True, 4, 0)
    assert (s["poisoners"], s["flooders"], s["broker_kills"], s["broker"]) == (["dev-3"], ["dev-4"], 1, "mosquitto")
    assert (s["updates_accepted"], s["updates_in_committed_rounds"]) == (12, 12)
    assert (s["updates_refused"], s["refused_by_reason"]) == (4, {"num_samples_bound": 4})
    a = s["audit"]
    assert (a["clean"], a["rounds_verified"], a["missing"], a["double_counted"], a["accepted_receipts"]) == (
        True, 4, 0, 0, 12)
    assert a["updates"] == 16  # 4 rounds x (3 honest + the refused poison) in the ledgers, none of it missing
    assert s["flood_messages"] > 0 and s["shards_rejected"] > 0
    assert s["accuracy_gap_pp"] == 0.0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [e["event"] for e in report["events"]] == ["broker_killed", "broker_restarted"]
    assert [r["participants"] for r in report["rounds"]] == [3] * 4


class Replayer:
    """A client of a broker without the ACL: records dev-0's round-1 update, and the moment round 7
    opens re-publishes it moved (to round 7, to another device's topic); collects every receipt."""

    def __init__(self, fed: Federation, password: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.root = f"fedsync/{fed.name}"
        self.captured: dict[int, bytes] = {}
        self.receipts: list = []
        self.sent: list[str] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="replayer", clean_session=True)
        self.client.username_pw_set("replayer", password)
        self.client.on_connect = lambda c, *_: [c.subscribe(t, 1) for t in (
            f"{self.root}/up/dev-0/1/#", f"{self.root}/manifest", f"{self.root}/ack/+")]
        self.client.on_message = self._on_message
        self.client.connect(fed.broker.host, fed.broker.port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, msg) -> None:
        import cbor2

        from fedsync.messages import RoundManifest, ShardAck, decode

        if "/up/" in msg.topic:
            self.captured[int(msg.topic.rsplit("/", 1)[1])] = bytes(msg.payload)
        elif msg.topic.endswith("/manifest") and msg.payload:
            m = decode(bytes(msg.payload), RoundManifest)
            if m.state == "open" and m.round_id == 7 and not self.sent:
                for device in ("dev-0", "dev-1"):  # dev-0: its own topic, round moved; dev-1: another's topic
                    for i, payload in sorted(self.captured.items()):
                        body = {**cbor2.loads(payload), "device": device, "round_id": 7,
                                "base_version": m.model_version}  # the layout passes: only the binding is wrong
                        topic = f"{self.root}/up/{device}/7/{body['update_id']}/{i}"
                        self.client.publish(topic, cbor2.dumps(body), 1)
                        self.sent.append(topic)
        elif "/ack/" in msg.topic and msg.payload:
            self.receipts.append(decode(bytes(msg.payload), ShardAck))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_replayed_update_moved_to_round_7_or_another_devices_topic_is_rejected_naming_the_reason(fleet, tmp_path):
    devices = ["dev-0", "dev-1", "dev-2"]
    fed = Federation(fleet, tmp_path / "moved", "moved", [*devices, "replayer"])
    (tmp_path / "slow.toml").write_text("[agent]\ntrain_delay = 1.0  # round 7 is open a second before any upload\n")
    with fed.broker:
        replayer = Replayer(fed, fed.users["replayer"])
        try:
            coordinator = fed.fleet.start("moved-coordinator", [
                FEDSYNC, "coordinator", *fed.argv("coordinator"), "--rounds", "8", "--target", "3", "--quorum", "3",
                "--min-devices", "3", "--round-timeout", "60", "--state-dir", str(fed.work / "state")])
            agents = [fed.agent(d, "--data-index", str(i), "--once", "--config", str(tmp_path / "slow.toml"))
                      for i, d in enumerate(devices)]
            with fleet.phase("the campaign runs to its end with the replays in round 7", "moved-"):
                assert coordinator.wait(240) == 0
                assert [a.wait(60) for a in agents] == [0] * 3
        finally:
            replayer.close()

    with fleet.phase("both moved updates are rejected, naming the reason", "moved-"):
        update_id = replayer.sent[0].split("/")[-2]
        assert len(replayer.captured) >= 1 and len(replayer.sent) == 2 * len(replayer.captured)
        moved = [(r.device, r.round_id, r.update_id, r.status, r.reason) for r in replayer.receipts
                 if r.update_id == update_id and r.round_id == 7]
        assert moved == [(d, 7, update_id, "rejected", "update_digest:update_digest") for d in ("dev-0", "dev-1")]
        assert len(coordinator.events("input_rejected", reason="update_digest")) == 2
    with fleet.phase("the unmodified updates are accepted: round 1 and round 7 count all three devices", "moved-"):
        first = [r for r in replayer.receipts if (r.device, r.round_id, r.update_id) == ("dev-0", 1, update_id)]
        assert [r.status for r in first][-1:] == ["accepted"]
        committed = coordinator.events("round_committed")
        assert [(c.int("round"), c.int("accepted")) for c in committed] == [(k, 3) for k in range(1, 9)]
        for a in agents:
            assert [r.int("round") for r in a.events("round_done", status="accepted")] == list(range(1, 9))
