"""Issue 12, "Retained state heals itself": a broker crash with a stale persistence file.

CLI level: ``fedsync broker-config`` renders the TLS + ACL setup, ``mosquitto -c`` runs it,
one ``fedsync coordinator --state-dir`` and three ``fedsync agent`` processes federate.
mosquitto is killed (-9) three times, each time restarted on the same port from a
persistence file older than the crash (written on SIGUSR1 earlier in the run and copied
back, as an ``autosave_interval`` that last fired a while before the crash would leave it):

phase 1  stale file from round 2 (its uploads under way), killed with round 3's manifest out;
phase 2  stale file from round 4 (uploads under way), killed in round 5 with two updates held;
phase 3  stale file from round 7 (uploads under way), killed right after round 7 commits
         (once the broker holds the commit's model, delta and manifest); the slow device's
         agent is restarted while the broker is down, so it knows nothing of round 8.

The restarted broker says ``session_present=True`` but holds an old manifest and model
and lacks the current ones. Every later round must commit, with no coordinator restart:
rounds 1..9, accepted=3 each, none abandoned, every device's receipts 1..9. After each
crash the coordinator's audit finds exactly what the stale file changed, e.g. phase 1:
the broker has manifest 2 and model v1 (4 shards), the coordinator publishes manifest 3,
model v2 and the delta v1 -> v2 (4 + 4 shards): observed=5 republished=9 cleared=4.

Without the audit (checked by hand by disabling it) phases 1 and 2 pass on the devices'
own refusal of the older manifest, but in phase 3 the restarted device only ever sees
manifest 7: it trains the closed round 7 again and round 8 commits at its deadline with 2
updates (and before issue 12 the devices dropped their work on the stale manifest and then
waited for a model version the broker no longer held: the stall the issue reports).

The second test is the coordinator's own crash between its checkpoint and the delta's
publish (in process, with a real mosquitto): the resumed round names no delta, devices
fetch the full model, the round commits, and the stale retained model is cleared.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.actions import Publish
from fedsync.broker_config.process import BrokerProcess, free_port, mosquitto_available
from fedsync.coordinator.core import Checkpoint, JournalShard, RoundOpened
from fedsync.device_agent.agent import AgentCore, Note
from fedsync.messages import RoundManifest
from fedsync.params import vector_digest
from fedsync.topics import Topics
from tests.cli_procs import FEDSYNC, MOSQUITTO, CliProcess, Fleet
from tests.util import wait_until
from tests.cli_procs import broker_dir, fleet  # noqa: F401 (pytest fixtures)

DEVICES = ["pi-kitchen", "pi-garage", "pi-attic"]
SLOW = "pi-attic"
FAST = [d for d in DEVICES if d != SLOW]
ROUNDS = 9
SHARDS = 4  # 610 params (softmax 60 x 10 + 10) in shards of 160 values
ROUND_TIMEOUT = 30

COORDINATOR_TOML = """\
[broker]
keepalive = 5

[round]
shard_values = 160

[hardening]
norm_multiple = 0.0  # no adaptive norm bound: this test is about the broker (the bound refused honest updates)
"""
AGENT_TOML = """\
[broker]
keepalive = 5

[agent]
resend_after = 3.0
train_delay = {delay}
"""




def _receipts(p: CliProcess, round_id: int | None = None) -> list:
    match = {} if round_id is None else {"round": round_id}
    return p.events("round_done", status="accepted", **match)


class StaleBroker:
    """mosquitto from the rendered setup, whose persistence file the test can make stale."""

    def __init__(self, fleet: Fleet, conf: Path, db: Path) -> None:
        self.fleet, self.conf, self.db = fleet, conf, db
        self.proc = self.start()

    def start(self) -> CliProcess:
        p = self.fleet.start("mosquitto", [MOSQUITTO, "-c", str(self.conf)])
        self.fleet.wait_for("mosquitto to run", lambda: " running" in p.text(), 15, needs=[p])
        return p

    def snapshot(self, into: Path) -> None:
        """The persistence file as of now (SIGUSR1: mosquitto writes it), kept aside."""
        before = self.db.stat().st_mtime_ns if self.db.exists() else 0
        self.proc.signal(signal.SIGUSR1)
        self.fleet.wait_for("mosquitto to save its database",
                            lambda: self.db.exists() and self.db.stat().st_mtime_ns != before, 10, needs=[self.proc])
        time.sleep(0.2)  # the write is complete once the rename is done; be sure it is
        shutil.copy2(self.db, into)

    def crash_and_restart_from(self, snapshot: Path, while_down=lambda: None) -> None:
        self.proc.signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL
        shutil.copy2(snapshot, self.db)  # what a stale autosave leaves behind
        while_down()
        self.proc = self.start()


def test_mosquitto_kill_9_with_a_stale_persistence_file_at_three_points_of_a_round_every_round_commits(
        fleet: Fleet, broker_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "devices.txt").write_text("".join(f"{d}\n" for d in DEVICES))
    code, _, err = fleet.run("broker-config", [
        FEDSYNC, "broker-config", "mosquitto", "--devices", str(tmp_path / "devices.txt"), "--out", str(broker_dir),
        "--host", "127.0.0.1", "--bind", "127.0.0.1", "--port", str(port)])
    assert code == 0, err
    broker = StaleBroker(fleet, broker_dir / "mosquitto.conf", broker_dir / "data" / "mosquitto.db")
    url = f"mqtts://127.0.0.1:{port}"

    def tls(account: str) -> list[str]:
        return ["--broker", url, "--ca-file", str(broker_dir / "ca.pem"),
                "--password-file", str(broker_dir / "secrets" / f"{account}.pw")]

    (tmp_path / "coordinator.toml").write_text(COORDINATOR_TOML)
    coordinator = fleet.start("coordinator", [
        FEDSYNC, "coordinator", *tls("coordinator"), "--rounds", str(ROUNDS), "--target", "3", "--quorum", "2",
        "--min-devices", "3", "--round-timeout", str(ROUND_TIMEOUT), "--state-dir", str(tmp_path / "S"),
        "--config", str(tmp_path / "coordinator.toml")])
    agents = {}
    for i, d in enumerate(DEVICES):
        toml = tmp_path / f"agent-{d}.toml"
        toml.write_text(AGENT_TOML.format(delay=3.0 if d == SLOW else 1.0))
        agents[d] = fleet.start(f"agent-{d}", [
            FEDSYNC, "agent", *tls(d), "--device-id", d, "--state-dir", str(tmp_path / "A" / d),
            "--data-index", str(i), "--config", str(toml)])
    everyone = [coordinator, *agents.values()]

    def fast_receipts(round_id: int) -> None:
        fleet.wait_for(f"the fast devices' receipts for round {round_id}",
                       lambda: all(_receipts(agents[d], round_id) for d in FAST), 2 * ROUND_TIMEOUT,
                       needs=[broker.proc, *everyone])
        assert not _receipts(agents[SLOW], round_id), f"{SLOW} finished round {round_id} early: raise its delay"

    def committed(round_id: int) -> None:
        fleet.wait_for(f"round {round_id} to commit", lambda: coordinator.events("round_committed", round=round_id),
                       2 * ROUND_TIMEOUT, needs=[broker.proc, *everyone])

    def audits() -> list[tuple[int, int, int]]:
        return [(e.int("observed"), e.int("republished"), e.int("cleared")) for e in coordinator.events("retained_audit")]

    def crash_from(snapshot: Path, while_down=lambda: None) -> tuple[int, int, int]:
        """Crash the broker, restart it from ``snapshot``; the first audit logged after that.
        An audit logs at INFO only when it repairs something; the start-up audit can, when round
        1's manifest goes out between its subscription and its probe (seen in CI: observed=5
        republished=1), so the count starts at the crash."""
        before = len(audits())
        broker.crash_and_restart_from(snapshot, while_down)
        fleet.wait_for("the coordinator's audit", lambda: len(audits()) > before, 30, needs=[coordinator])
        return audits()[before]

    with fleet.phase("phase 1: stale file from round 2, killed with round 3's manifest out", "mosquitto",
                     "coordinator", "agent"):
        fast_receipts(2)
        broker.snapshot(tmp_path / "round2.db")
        committed(2)
        time.sleep(0.3)  # round 3's manifest is out; the devices train for 1 s and 3 s
        assert not any(_receipts(a, 3) for a in agents.values())
        # Broker: manifest 2, model v1. Coordinator: manifest 3, model v2, delta v1 -> v2.
        assert crash_from(tmp_path / "round2.db") == (1 + SHARDS, 1 + 2 * SHARDS, SHARDS)
        committed(3)

    with fleet.phase("phase 2: stale file from round 4, killed in round 5 with two updates held", "mosquitto",
                     "coordinator", "agent"):
        fast_receipts(4)
        broker.snapshot(tmp_path / "round4.db")
        fast_receipts(5)
        # Broker: manifest 4, model v3 and delta v2 -> v3. Coordinator: manifest 5, v4, delta v3 -> v4.
        assert crash_from(tmp_path / "round4.db") == (1 + 2 * SHARDS, 1 + 2 * SHARDS, 2 * SHARDS)
        committed(5)

    with fleet.phase("phase 3: stale file from round 7, killed right after round 7 commits", "mosquitto",
                     "coordinator", "agent"):
        fast_receipts(7)
        broker.snapshot(tmp_path / "round7.db")
        committed(7)
        # The commit's publishes (model v7, its delta, manifest 8) follow the slow device's receipt
        # on the coordinator's connection; 0.3 s after the receipt the broker has acknowledged them
        # (else the coordinator's client would re-send them itself on reconnecting), and then loses them.
        fleet.wait_for(f"{SLOW}'s receipt for round 7", lambda: _receipts(agents[SLOW], 7), 10,
                       needs=[agents[SLOW]])
        time.sleep(0.3)
        assert not any(_receipts(a, 8) for a in agents.values())

        def restart_slow_agent() -> None:
            first = agents[SLOW]
            first.signal(signal.SIGTERM)
            assert first.wait(20) == 0
            agents[SLOW] = fleet.restart(first)

        audit = crash_from(tmp_path / "round7.db", while_down=restart_slow_agent)
        assert audit == (1 + 2 * SHARDS, 1 + 2 * SHARDS, 2 * SHARDS)

    with fleet.phase(f"every later round commits: rounds 1..{ROUNDS}, 3 updates each, one coordinator",
                     "coordinator", "agent"):
        assert coordinator.wait(ROUNDS * ROUND_TIMEOUT) == 0
        commits = coordinator.events("round_committed")
        assert [(c.int("round"), c.int("version"), c.int("accepted"), c.fields["reason"]) for c in commits] == [
            (r, r, 3, "target") for r in range(1, ROUNDS + 1)]
        assert coordinator.events("round_abandoned") == []
        assert len(coordinator.events("coordinator_start")) == 1  # never restarted
        assert coordinator.events("broker_lost_session") == []  # the stale file had our session
        (stop,) = coordinator.events("coordinator_stop")
        assert (stop.int("rounds_committed"), stop.int("updates_accepted")) == (ROUNDS, 3 * ROUNDS)
        for d, a in agents.items():
            fleet.wait_for(f"{d} to see the campaign finish", lambda a=a: a.events("campaign_finished"), 15)
            procs = fleet.of(f"agent-{d}")
            # Every device's update counted in every round (accepted=3 above); each device heard so
            # by its receipt, or, when the next round's manifest reached it first (a reconnect
            # re-delivers the retained manifest before the queued receipt), it dropped the upload
            # of the round already closed. A restarted agent knows nothing: it may start on the
            # stale file's round 7 again and drop that work when manifest 8 comes back.
            receipts = [e.int("round") for p in procs for e in _receipts(p)]
            dropped = [e.int("round") for p in procs for e in p.events("update_dropped", reason="round closed")]
            assert len(receipts) == len(set(receipts)), (d, receipts)
            assert set(receipts) | set(dropped) == set(range(1, ROUNDS + 1)), (d, receipts, dropped)
            if d in FAST:
                assert not set(receipts) & set(dropped), (d, receipts, dropped)
        assert len(fleet.of(f"agent-{SLOW}")) == 2
        for p in fleet.procs:
            assert "Traceback" not in p.text(), p.name


# -- the device side, without a broker -------------------------------------------------------------

def _manifest(round_id: int, version: int, incarnation: int = 5, delta_from: int = -1) -> RoundManifest:
    vector = np.full(4, version, np.float32)
    return RoundManifest(
        federation="farm", round_id=round_id, incarnation=incarnation, state="open", mode="sync",
        model_version=version, model_digest=vector_digest(vector), model_codec="raw", model_shards=2,
        param_spec=(("w", (4,)),), num_params=4, shard_values=2, update_codec="raw",
        update_qos=1, deadline=100.0, issued_at=0.0, quorum=1, target=1, selected=("pi",), hyper={},
        delta_from=delta_from)


def test_an_agent_keeps_its_work_when_a_stale_broker_sends_an_older_manifest_of_the_same_coordinator():
    from fedsync.messages import encode

    t = Topics("farm")
    agent = AgentCore("pi", t, __import__("random").Random(0))
    agent.on_connect(0.0)
    agent.on_message(t.manifest, encode(_manifest(14, 13)), 1.0)
    assert agent.state.value == "fetching"
    out = agent.on_message(t.manifest, encode(_manifest(13, 12)), 2.0)  # the stale file's
    assert out == [Note("stale_manifest", {"round": 13, "version": 12, "current_round": 14})]
    assert (agent.state.value, agent.job.round_id, agent.manifest.round_id) == ("fetching", 14, 14)
    # Another incarnation's older manifest is the coordinator starting over, not staleness.
    assert [type(a).__name__ for a in agent.on_message(t.manifest, encode(_manifest(2, 1, incarnation=6)), 3.0)][0] \
        == "CampaignStarted"


def test_an_agent_whose_delta_does_not_come_fetches_the_full_model_after_one_quiet_window():
    from fedsync.messages import encode

    t = Topics("farm")
    agent = AgentCore("pi", t, __import__("random").Random(0), resend_after=10.0)
    agent._model = (3, vector_digest(np.full(4, 3, np.float32)), np.full(4, 3, np.float32))  # holds v3
    agent.on_connect(0.0)
    out = agent.on_message(t.manifest, encode(_manifest(5, 4, delta_from=3)), 1.0)
    assert [a.topic_filter for a in out] == [t.model_delta(3, 4, 0), t.model_delta(3, 4, 1)]
    assert agent.tick(10.9) == []
    out = agent.tick(11.0)  # no delta shard for resend_after: the full model instead
    assert [(type(a).__name__, getattr(a, "topic_filter", None)) for a in out[1:]] == [
        ("Unsubscribe", t.model_delta(3, 4, 0)), ("Unsubscribe", t.model_delta(3, 4, 1)),
        ("Subscribe", t.model(4, 0)), ("Subscribe", t.model(4, 1))]
    assert agent.stats.refetches == 1 and agent.state.value == "fetching"


# -- the coordinator killed between its checkpoint and the delta's publish ---------------------------

class _Crash(Exception):
    pass


def _retained(url_port: int, users: dict[str, str], topic_filter: str) -> dict[str, bytes]:
    """The retained messages under ``topic_filter``, read by a fresh clean-session subscriber."""
    got: dict[str, bytes] = {}
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="inspector", clean_session=True)
    c.username_pw_set("coordinator-inspector", users["coordinator-inspector"])
    c.on_message = lambda client, userdata, msg: got.__setitem__(msg.topic, bytes(msg.payload)) if msg.retain else None
    c.connect("127.0.0.1", url_port, 10)
    c.loop_start()
    try:
        c.subscribe(topic_filter, 1)
        time.sleep(1.0)  # retained messages come right after the SUBACK; a second is plenty on loopback
    finally:
        c.loop_stop()
        c.disconnect()
    return got


@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_a_coordinator_killed_after_its_checkpoint_before_the_delta_resumes_without_the_delta(tmp_path):
    from fedsync.coordinator.core import RoundPolicy
    from fedsync.lab.federation import LocalFederation

    users = {"coordinator": "c-pw", "coordinator-inspector": "i-pw", **{f"dev-{i}": f"d{i}" for i in range(3)}}
    policy = RoundPolicy(rounds=4, target=3, quorum=3, min_devices=3, round_timeout=60.0, shard_values=160)
    with BrokerProcess("mosquitto", users=users) as broker:
        fed = LocalFederation(broker.url, users, n_devices=3, seed=3, policy=policy, state_dir=str(tmp_path / "S"),
                              resend_after=2.0)
        service = fed.coordinator
        real_execute = service._execute

        def execute(actions, tokens):
            # Round 2's commit: v2 is checkpointed, round 3's journal opened, then the process dies
            # before any of v2's shards, its delta or round 3's manifest reach the broker.
            if any(isinstance(a, Checkpoint) and a.version == 2 for a in actions):
                assert any(isinstance(a, Publish) and "/modeldelta/1/2/" in a.topic for a in actions)
                real_execute([a for a in actions if isinstance(a, (Checkpoint, RoundOpened, JournalShard))], [])
                raise _Crash("killed after the checkpoint")
            real_execute(actions, tokens)

        service._execute = execute
        fed.start()
        try:
            wait_until(lambda: service.done.is_set(), 60, "the coordinator to crash at round 2's commit")
            assert isinstance(service.failed, _Crash)
            fed.restart_coordinator()
            assert fed.wait(60), "rounds 3 and 4 did not commit after the restart"
            s, agents = fed.summary(), fed.agent_stats()
            wait_until(lambda: fed.coordinator.link.flush(0.1), 10, "round 4's publishes to reach the broker")
            models = _retained(broker.port, users, "fedsync/demo/model/#")
            deltas = _retained(broker.port, users, "fedsync/demo/modeldelta/#")
        finally:
            fed.stop()
    assert (s["rounds_completed"], s["rounds_abandoned"]) == (4, 0)
    # The resumed round 3 named no delta, so every device fetched v2 whole at once (no quiet
    # window, no refetch); only round 4 used a delta (v2 -> v3; v0 -> v1 is not smaller than v1).
    assert (agents["model_fetches"], agents["delta_fetches"], agents["refetches"]) == (4 * 3, 3, 0)
    # The stale v1 (never retired: the crash came first) is gone; what is retained is v4 and its delta.
    assert {t.rsplit("/", 1)[0] for t in models} == {"fedsync/demo/model/4"}
    assert {t.rsplit("/", 1)[0] for t in deltas} == {"fedsync/demo/modeldelta/3/4"}
