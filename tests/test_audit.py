"""The device ledger and the outside audit (issue 15): every committed model rebuilt from what devices sent.

Scenarios run a real federation (coordinator service, agent host, a real broker) with a state dir
and a ledger dir, then audit them. Faults are injected into the coordinator (one update folded in
twice, a counted update left out of its record) and the audit must name the round and the device.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import cbor2
import numpy as np
import pytest

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.device_agent.ledger import DeviceLedger, read_device_ledger, read_ledger_dir
from fedsync.lab.audit import AuditError, Finding, audit
from fedsync.lab.federation import LocalFederation, make_users
from fedsync.messages import ShardAck, encode
from tests.util import wait_until
from tests.cli_procs import fleet  # noqa: F401 (pytest fixtures)

N = 4
ROUNDS = 3
POLICY = RoundPolicy(rounds=ROUNDS, target=N, quorum=N, min_devices=N, round_timeout=30.0)


@pytest.fixture(scope="module")
def users() -> dict[str, str]:
    return make_users(N)


@pytest.fixture(scope="module")
def broker(users) -> Iterator[BrokerProcess]:
    with BrokerProcess("mosquitto" if mosquitto_available() else "amqtt", users=users) as b:
        yield b


def run(broker, users, tmp_path: Path, federation: str, **kw) -> LocalFederation:
    fed = LocalFederation(broker.url, users, n_devices=N, seed=5, policy=kw.pop("policy", POLICY),
                          federation=federation, state_dir=str(tmp_path / "state"),
                          ledger_dir=str(tmp_path / "ledger"), **kw)
    fed.start()
    try:
        assert fed.wait(60), fed.records
        # The last round's receipts are published as it commits: let them reach the ledgers.
        wait_until(lambda: accepted_receipts(tmp_path / "ledger") == N * ROUNDS, 10, "every receipt in a ledger")
    finally:
        fed.stop()
    return fed


def accepted_receipts(ledger_dir: Path) -> int:
    return sum(any(r.status == "accepted" for r in rs) for led in read_ledger_dir(ledger_dir).values()
               for rs in led.receipts.values())


# -- the ledger on its own -----------------------------------------------------------------------------


def test_a_torn_tail_is_cut_when_the_ledger_is_opened_again_and_readers_skip_it(tmp_path):
    ledger = DeviceLedger(tmp_path, "dev-1")
    ledger.campaign()
    ledger.close()
    with open(ledger.path, "ab") as fh:  # a crash in the middle of the next record
        fh.write(struct.pack("<I", 100) + b"\xa1")
    assert read_device_ledger(ledger.path).torn_tail
    again = DeviceLedger(tmp_path, "dev-1")
    again.campaign()
    again.close()
    back = read_device_ledger(ledger.path)
    assert (back.torn_tail, [r.kind for r in back.records]) == (False, ["campaign", "campaign"])


def test_each_receipt_is_recorded_once_per_change_and_foreign_or_bad_ones_not_at_all(tmp_path):
    ledger = DeviceLedger(tmp_path, "dev-1")
    partial = encode(ShardAck("dev-1", 3, "u1", 2, b"\x01", "partial", ""))
    accepted = encode(ShardAck("dev-1", 3, "u1", 2, b"\x03", "accepted", ""))
    foreign = encode(ShardAck("dev-2", 3, "u9", 2, b"\x03", "accepted", ""))
    for payload in (partial, partial, accepted, accepted, foreign, b"\xff not cbor"):
        ledger.receipt(payload)
    ledger.close()
    got = read_device_ledger(ledger.path).receipts
    assert list(got) == [(3, "u1")]
    assert [(r.status, r.held, r.count) for r in got[(3, "u1")]] == [("partial", 1, 2), ("accepted", 2, 2)]


def test_the_commit_log_resolves_recommits_abandons_and_the_initial_model(tmp_path):
    from fedsync.coordinator.commit_log import read_commit_log
    from fedsync.coordinator.core import Checkpoint
    from fedsync.coordinator.journal import Journal

    def ck(version, closed, value, recent):
        return Checkpoint(version, np.full(3, value, np.float32), closed + 1, closed, False, {closed: recent}, {})

    j = Journal(tmp_path)
    j.write_checkpoint(ck(0, 1, 0.0, {"a": "u1"}))  # round 1 abandoned on the initial model
    j.write_checkpoint(ck(1, 2, 1.0, {"a": "u2", "b": "u3"}))  # round 2 commits v1
    Journal(tmp_path).write_checkpoint(ck(1, 2, 1.5, {"a": "u2", "b": "u3"}))  # a restart commits round 2 again
    j.write_checkpoint(ck(1, 3, 1.5, {}))  # round 3 abandoned
    j.write_checkpoint(ck(2, 4, 2.0, {"b": "u4"}))
    with open(tmp_path / "commits.log", "ab") as fh:
        fh.write(b"\x09\x00")  # a torn tail
    log = read_commit_log(tmp_path)
    assert [(c.round_id, c.version, c.updates, float(c.vector[0])) for c in log.commits] == [
        (2, 1, {"a": "u2", "b": "u3"}, 1.5), (4, 2, {"b": "u4"}, 2.0)]
    assert (log.abandoned, log.initial.tolist(), log.torn_tail) == ([1, 3], [0.0, 0.0, 0.0], True)


# -- clean runs ---------------------------------------------------------------------------------------


@pytest.mark.broker
def test_a_clean_run_is_rebuilt_from_the_ledgers_round_by_round(broker, users, tmp_path):
    fed = run(broker, users, tmp_path, "clean")
    report = audit(tmp_path / "ledger", fed.coordinator_state_dir)
    d = report.to_dict()
    assert (d["rounds_committed"], d["rounds_verified"], d["missing"], d["double_counted"]) == (ROUNDS, ROUNDS, 0, 0)
    assert (d["updates"], d["accepted_receipts"], d["devices"], d["unledgered"], d["pending"]) == (12, 12, N, 0, 0)
    assert report.clean and report.first_mismatch is None and d["strategy"] == "fedavg"
    assert report.max_abs_diff <= 1e-6
    # The state dir's last commit is the model the coordinator published last (its last RoundClosed).
    from fedsync.coordinator.commit_log import read_commit_log

    assert np.array_equal(read_commit_log(fed.coordinator_state_dir).commits[-1].vector, fed.final_vector)
    ledgers = {p.stem: read_device_ledger(p) for p in (tmp_path / "ledger").glob("*.ledger")}
    assert sum(len(r.updates) for r in ledgers.values()) == 12
    assert all(len(r.models) == 1 for r in ledgers.values())  # each kept the initial model, once


@pytest.mark.broker
def test_a_lossy_codec_audits_clean_because_the_ledger_keeps_the_decoded_delta(broker, users, tmp_path):
    fed = run(broker, users, tmp_path, "int8", policy=RoundPolicy(**{**_fields(POLICY), "update_codec": "int8"}))
    report = audit(tmp_path / "ledger", fed.coordinator_state_dir)
    assert (report.rounds_verified, len(report.missing), len(report.double_counted)) == (ROUNDS, 0, 0)
    assert report.clean


@pytest.mark.broker
def test_a_server_optimiser_is_replayed_with_its_state_and_the_wrong_strategy_fails_from_round_2(
        broker, users, tmp_path):
    fed = run(broker, users, tmp_path, "fedavgm", strategy="fedavgm", strategy_options={"momentum": 0.9})
    report = audit(tmp_path / "ledger", fed.coordinator_state_dir)
    assert (report.strategy, report.rounds_verified, report.clean) == ("fedavgm", ROUNDS, True)
    # Positive control: replayed as plain FedAvg, round 1 agrees (no velocity yet) and round 2 does not.
    wrong = audit(tmp_path / "ledger", fed.coordinator_state_dir, strategy="fedavg")
    assert (wrong.rounds_verified, wrong.first_mismatch[0], wrong.clean) == (1, 2, False)


@pytest.mark.broker
def test_a_device_restarted_without_memory_reuses_an_update_id_and_the_audit_tells_the_rounds_apart(
        broker, users, tmp_path):
    policy = RoundPolicy(**{**_fields(POLICY), "quorum": N - 1, "offline_grace": 10.0})
    fed = LocalFederation(broker.url, users, n_devices=N, seed=5, policy=policy, federation="restart",
                          state_dir=str(tmp_path / "state"), ledger_dir=str(tmp_path / "ledger"), solo=("dev-0",))
    fed.start()
    try:
        wait_until(lambda: any(r.outcome == "committed" for r in fed.records), 30, "round 1 to commit")
        fed.crash_device("dev-0")
        fed.restart_device("dev-0")
        assert fed.wait(60), fed.records
    finally:
        fed.stop()
    ids = [(e.round_id, e.update_id) for e in read_device_ledger(tmp_path / "ledger" / "dev-0.ledger").updates]
    reused = {uid for _, uid in ids if sum(u == uid for _, u in ids) > 1}
    assert len(reused) == 1, ids  # the restarted process drew its first id again, in another round
    report = audit(tmp_path / "ledger", fed.coordinator_state_dir)
    assert (report.rounds_verified, report.missing, report.double_counted, report.clean) == (ROUNDS, [], [], True)


# -- injected faults ----------------------------------------------------------------------------------


@pytest.mark.broker
def test_an_update_folded_in_twice_is_caught_with_its_round_and_device(broker, users, tmp_path, monkeypatch):
    fold = CoordinatorCore._fold

    def fold_dev2_twice_in_round_2(self, r, u):
        fold(self, r, u)
        if u.device == "dev-2" and r.manifest.round_id == 2:
            fold(self, r, u)

    monkeypatch.setattr(CoordinatorCore, "_fold", fold_dev2_twice_in_round_2)
    fed = run(broker, users, tmp_path, "double")
    report = audit(tmp_path / "ledger", fed.coordinator_state_dir)
    uid = _counted(fed, 2)["dev-2"]
    assert report.first_mismatch == (2, "dev-2")
    assert report.double_counted == [Finding(2, "dev-2", uid, "folded into the model twice")]
    # Rounds 1 and 3 still rebuild (round 3 from the model round 2 committed); nothing is missing.
    assert (report.rounds_verified, report.missing, report.clean) == (ROUNDS - 1, [], False)
    assert [(m["round"], m["device"], m["explained"]) for m in report.mismatches] == [(2, "dev-2", True)]


@pytest.mark.broker
def test_an_accepted_update_the_coordinator_does_not_record_is_missing_and_named(broker, users, tmp_path):
    fed = run(broker, users, tmp_path, "unrecorded")
    state = Path(fed.coordinator_state_dir)
    uid = _counted(fed, 2)["dev-1"]
    _rewrite_close(state, 2, lambda body: body["updates"].pop("dev-1"))  # the model has it, the record not
    report = audit(tmp_path / "ledger", state)
    assert report.first_mismatch == (2, "dev-1")
    assert report.missing == [Finding(2, "dev-1", uid, "accepted, but in no committed model")]
    assert [(m["round"], m["device"], m["why"]) for m in report.mismatches] == [
        (2, "dev-1", "the model holds an update the coordinator does not name")]
    assert (report.rounds_verified, report.double_counted) == (ROUNDS - 1, [])


def test_unusable_input_names_the_directory(tmp_path):
    with pytest.raises(AuditError, match=f"state dir {tmp_path / 'nope'}: not a directory"):
        audit(tmp_path, tmp_path / "nope")
    with pytest.raises(AuditError, match="no commits.log"):
        audit(tmp_path, tmp_path)


# -- helpers ------------------------------------------------------------------------------------------


def _fields(policy: RoundPolicy) -> dict:
    return {f: getattr(policy, f) for f in policy.__dataclass_fields__}


def _counted(fed: LocalFederation, round_id: int) -> dict[str, str]:
    from fedsync.coordinator.commit_log import read_commit_log

    (c,) = [c for c in read_commit_log(fed.coordinator_state_dir).commits if c.round_id == round_id]
    return c.updates


def _rewrite_close(state: Path, round_id: int, change) -> None:
    data = (state / "commits.log").read_bytes()
    out, pos = b"", 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        body = cbor2.loads(data[pos + 4:pos + 4 + n])
        pos += 4 + n
        if body["k"] == "close" and body["round"] == round_id:
            change(body)
        raw = cbor2.dumps(body)
        out += struct.pack("<I", len(raw)) + raw
    (state / "commits.log").write_bytes(out)


# -- through the CLI: separate processes, agents started with --ledger ---------------------------------



@pytest.mark.broker
def test_fedsync_audit_checks_a_cli_federation_that_survived_a_coordinator_kill_9(fleet, broker, users, tmp_path):
    import json
    import signal

    from tests.cli_procs import FEDSYNC

    for name in ["coordinator", *(f"dev-{i}" for i in range(N))]:
        (tmp_path / f"{name}.pw").write_text(users[name] + "\n")
    # dev-3 trains slowly, so round 3 stays open with the other three updates held: the kill lands mid-round.
    (tmp_path / "slow.toml").write_text("[agent]\ntrain_delay = 2.5\n")
    rounds, kill_round = 4, 3
    coordinator = fleet.start("coordinator", [
        FEDSYNC, "coordinator", "--broker", broker.url, "--password-file", str(tmp_path / "coordinator.pw"),
        "--federation", "cli", "--rounds", str(rounds), "--target", str(N), "--quorum", str(N),
        "--min-devices", str(N), "--round-timeout", "30", "--state-dir", str(tmp_path / "S")])
    agents = [fleet.start(f"agent-{i}", [
        FEDSYNC, "agent", "--broker", broker.url, "--device-id", f"dev-{i}", "--password-file",
        str(tmp_path / f"dev-{i}.pw"), "--federation", "cli", "--data-index", str(i), "--once",
        "--state-dir", str(tmp_path / "A"), "--ledger", str(tmp_path / "L"),
        *(["--config", str(tmp_path / "slow.toml")] if i == N - 1 else [])]) for i in range(N)]
    fleet.wait_for(f"the fast devices' receipts for round {kill_round}",
                   lambda: all(a.events("round_done", round=kill_round, status="accepted") for a in agents[:-1]),
                   60, needs=[coordinator, *agents])
    coordinator.signal(signal.SIGKILL)
    assert coordinator.wait(10) == -signal.SIGKILL
    assert not coordinator.events("round_committed", round=kill_round)
    coordinator = fleet.restart(coordinator)
    assert coordinator.wait(120) == 0, coordinator.tail()
    assert [a.wait(30) for a in agents] == [0] * N
    committed = sorted(line.int("round") for p in fleet.of("coordinator") for line in p.events("round_committed"))
    assert committed == list(range(1, rounds + 1))

    audit_argv = [FEDSYNC, "audit", "--ledger", str(tmp_path / "L"), "--state-dir", str(tmp_path / "S")]
    code, out, err = fleet.run("audit", [*audit_argv, "--json"])
    assert code == 0, (out, err)
    got = json.loads(out)
    assert (got["clean"], got["rounds_committed"], got["rounds_verified"], got["missing"], got["double_counted"],
            got["unledgered"], got["devices"], got["updates"]) == (True, rounds, rounds, 0, 0, 0, N, N * rounds)
    assert got["strategy"] == "fedavg" and got["notes"] == []  # the CLI coordinator records its strategy

    # The same state dir with round 3's record missing dev-1: exit 1, the round and the device named.
    _rewrite_close(tmp_path / "S", kill_round, lambda body: body["updates"].pop("dev-1"))
    code, out, err = fleet.run("audit", audit_argv)
    assert code == 1, (out, err)
    assert f"round {kill_round}, device dev-1" in out and f"missing: round {kill_round} device dev-1 " in out, out

    code, out, err = fleet.run("audit", [FEDSYNC, "audit", "--ledger", str(tmp_path / "L"),
                                         "--state-dir", str(tmp_path / "nope")])
    assert (code, out, err.strip()) == (2, "", f"fedsync audit: state dir {tmp_path / 'nope'}: not a directory")
