"""Issue 10, "Must show": a federation run through nothing but the ``fedsync`` CLI and mosquitto.

Every service is a separate process, started the way README.md ("Running coordinator and
agents on separate machines") tells a field engineer: ``fedsync broker-config mosquitto``
renders TLS, passwords and the ACL for four free-form device ids, ``mosquitto -c`` runs
it, then one ``fedsync coordinator`` and four ``fedsync agent`` processes. Everything
asserted is read from the processes' stderr logs, exit codes, ``fedsync status`` (the
read-only ``monitor`` account) and the agents' state dirs.

The scenario, one phase per promise:

setup  the rendered setup runs; every agent starts on its ``--data-index`` slice.
a      campaign 1 commits exactly 8 rounds, versions 1..8, none abandoned; devices fetch
       model deltas instead of whole models where the coordinator publishes them.
e      ``fedsync status`` as ``monitor`` prints the manifest and the 4 devices.
b      the coordinator is killed (-9) in round 4 once three updates are held; started
       again with the same command it resumes round 4 from its journal (12 shards).
c      while it is down, pi-attic's upload has started (its outbox exists) and cannot
       finish (no receipts): SIGTERM, restart, the outbox is restored and counts.
d      mosquitto is restarted (SIGTERM, same config, persistence on) in round 6 with
       three updates held: the sessions survive (no ``broker_lost_session``) and every
       later round commits.
f      the agents stay for the next campaign; a new coordinator (new state dir, 3 rounds)
       runs it with the same, never-restarted agent processes.
g      a second coordinator on the live federation exits 1 naming the live one's
       incarnation; the live one commits its remaining rounds.
h      SIGTERM everything: agents and mosquitto exit 0.

pi-attic trains with ``[agent] train_delay``: each round stays open ~2.5 s with the other
three updates already held, the "mid-round" window phases b, c and d aim at.

Expected counts, from what is injected. ``--min-devices 4``: a round opens only with all
four online, so all four are selected (target 4) and a round commits on its target with
accepted=4 unless a selected device goes offline first. pi-attic is back before the
coordinator restarts, so round 4 commits with all four. So does round 6: mosquitto
publishes every connected client's last will when it shuts down, an instant before it drops
the coordinator too, but a will only counts after OFFLINE_SETTLE, presence is unknown while
the coordinator is cut off, and the devices get RECONNECT_SETTLE after it reconnects
(docs/protocol.md), so the round waits for pi-attic. Hence 8 x 4 + 3 x 4 = 44 accepted
updates, which the coordinators' ``accepted=`` fields and the agents' ``round_done
status=accepted`` receipts must both add up to, round by round.

Deltas: the coordinator publishes ``modeldelta`` only when it is smaller than the whole
model. The initial softmax model is all zeros, so v1 - v0 is v1 itself and round 2's
devices fetch v1 whole; from round 3 on a device holding the previous version fetches
the delta.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from fedsync.broker_config.process import free_port, mosquitto_available
from tests.cli_procs import FEDSYNC, MOSQUITTO, CliProcess, Fleet, LogLine, parse_line
from tests.cli_procs import broker_dir, fleet  # noqa: F401 (pytest fixtures)

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")]

DEVICES = ["pi-kitchen", "pi-garage", "pi-shed", "pi-attic"]  # README-style ids, no trailing digits
SLOW = "pi-attic"
FAST = [d for d in DEVICES if d != SLOW]
FEDERATION = "demo"
ROUNDS_1, ROUNDS_2 = 8, 3
KILL_ROUND, BROKER_RESTART_ROUND = 4, 6
SHARDS = 4  # 610 params (softmax 60 x 10 + 10) in shards of 160 values
TRAIN_DELAY = 2.5
ROUND_TIMEOUT = 20

COORDINATOR_TOML = """\
[broker]
keepalive = 5

[round]
shard_values = 160  # 610 params -> 4 shards per update: an upload has a middle
"""
AGENT_TOML = """\
[broker]
keepalive = 5

[agent]
resend_after = 3.0
"""
SLOW_AGENT_TOML = AGENT_TOML + f"train_delay = {TRAIN_DELAY}  # keeps every round open with 3 updates held\n"

REFUSAL = re.compile(r"fedsync coordinator: another coordinator is running on federation 'demo' "
                     r"\(incarnation (\d+), started [0-9T:-]+Z\); stop it first, or pass --takeover")




class Federation:
    """The commands of the README recipe for this test's broker, devices and dirs."""

    def __init__(self, fleet: Fleet, broker_dir: Path, work: Path, port: int) -> None:
        self.fleet, self.dir, self.work = fleet, broker_dir, work
        self.url = f"mqtts://127.0.0.1:{port}"
        (work / "coordinator.toml").write_text(COORDINATOR_TOML)
        (work / "agent.toml").write_text(AGENT_TOML)
        (work / "agent-slow.toml").write_text(SLOW_AGENT_TOML)

    def _tls(self, account: str) -> list[str]:
        return ["--broker", self.url, "--ca-file", str(self.dir / "ca.pem"),
                "--password-file", str(self.dir / "secrets" / f"{account}.pw")]

    def start_broker(self) -> CliProcess:
        p = self.fleet.start("mosquitto", [MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")])
        self.fleet.wait_for("mosquitto to log 'running'", lambda: " running" in p.text(), 15, needs=[p])
        return p

    def start_coordinator(self, role: str, state_dir: str, rounds: int) -> CliProcess:
        return self.fleet.start(role, [
            FEDSYNC, "coordinator", *self._tls("coordinator"), "--rounds", str(rounds), "--target", "4",
            "--quorum", "2", "--min-devices", "4", "--round-timeout", str(ROUND_TIMEOUT),
            "--state-dir", str(self.work / state_dir), "--federation", FEDERATION,
            "--config", str(self.work / "coordinator.toml")])

    def start_agent(self, device: str) -> CliProcess:
        toml = "agent-slow.toml" if device == SLOW else "agent.toml"
        return self.fleet.start(f"agent-{device}", [
            FEDSYNC, "agent", *self._tls(device), "--device-id", device,
            "--state-dir", str(self.work / "A" / device), "--data-index", str(DEVICES.index(device)),
            "--federation", FEDERATION, "--config", str(self.work / toml)])

    def outbox(self, device: str) -> Path:
        # AgentHost keeps each hosted device's outbox in {state_dir}/{device id}/.
        return self.work / "A" / device / device / "outbox.cbor"

    def status(self) -> list[str]:
        code, out, err = self.fleet.run("status", [
            FEDSYNC, "status", "--broker", self.url, "--ca-file", str(self.dir / "ca.pem"), "--username", "monitor",
            "--password-file", str(self.dir / "secrets" / "monitor.pw"), "--federation", FEDERATION])
        assert code == 0, f"fedsync status exited {code}: {err[-1500:]}"
        return out.splitlines()


def _committed(procs: list[CliProcess]) -> list[LogLine]:
    return [line for p in procs for line in p.events("round_committed")]


def _rounds(lines: list[LogLine]) -> list[int]:
    return [line.int("round") for line in lines]


def _receipts(p: CliProcess, round_id: int | None = None) -> list[LogLine]:
    match = {} if round_id is None else {"round": round_id}
    return p.events("round_done", status="accepted", **match)


def _receipts_by_campaign(procs: list[CliProcess]) -> tuple[list[LogLine], list[LogLine]]:
    """One device's accepted receipts over its processes: those before its ``campaign_started``
    line (campaign 1) and those after it (campaign 2)."""
    before: list[LogLine] = []
    after: list[LogLine] = []
    for p in procs:
        parsed = [e for e in map(parse_line, p.lines()) if e is not None]
        starts = [i for i, e in enumerate(parsed) if e.event == "campaign_started"]
        assert len(starts) <= 1, f"{p.name}: {len(starts)} campaign_started lines"
        cut = starts[0] if starts else len(parsed)
        for part, into in ((parsed[:cut], before), (parsed[cut:], after)):
            into += [e for e in part if e.event == "round_done" and e.fields.get("status") == "accepted"]
    return before, after


def _device_lines(status: list[str]) -> dict[str, str]:
    """``device pi-kitchen: online`` lines of ``fedsync status``, as {device: state}."""
    return dict(m.groups() for m in map(re.compile(r"device (\S+): (\S+)").fullmatch, status) if m)


def test_a_federation_driven_only_through_the_cli_survives_crashes_and_runs_a_second_campaign(
        fleet: Fleet, broker_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    fed = Federation(fleet, broker_dir, tmp_path, port)

    with fleet.phase("setup: fedsync broker-config renders a TLS setup that mosquitto runs", "broker-config",
                     "mosquitto"):
        (tmp_path / "devices.txt").write_text("".join(f"{d}\n" for d in DEVICES))
        code, out, err = fleet.run("broker-config", [
            FEDSYNC, "broker-config", "mosquitto", "--devices", str(tmp_path / "devices.txt"), "--out",
            str(broker_dir), "--host", "127.0.0.1", "--bind", "127.0.0.1", "--port", str(port)])
        assert code == 0, f"broker-config exited {code}: {err}"
        assert f"for federation '{FEDERATION}'" in out, out
        for name in ["ca.pem", "mosquitto.conf", *(f"secrets/{u}.pw" for u in ["coordinator", "monitor", *DEVICES])]:
            assert (broker_dir / name).is_file(), f"{name} not rendered"
        broker = fed.start_broker()

    with fleet.phase("setup: a coordinator and 4 agents start and connect over TLS"):
        coordinator = fed.start_coordinator("coordinator", "S", ROUNDS_1)
        agents = {d: fed.start_agent(d) for d in DEVICES}
        for i, d in enumerate(DEVICES):
            a = agents[d]
            fleet.wait_for(f"{d} to connect", lambda a=a: a.events("connected"), 30, needs=[a, broker])
            assert [e.int("data_index") for e in a.events("agent_start")] == [i], f"{d}: --data-index {i} not used"
        # `recovered` is logged once the ownership gate has opened: the coordinator is online.
        fleet.wait_for("the coordinator to own the federation", lambda: coordinator.events("recovered"), 30,
                       needs=[coordinator, broker])

    with fleet.phase("a: the first rounds commit with every device", "coordinator", "agent"):
        fleet.wait_for("round 2 to commit", lambda: coordinator.events("round_committed", round=2),
                       2 * ROUND_TIMEOUT, needs=[coordinator, broker, *agents.values()])

    with fleet.phase("e: fedsync status (monitor account) prints the manifest and the 4 devices", "status"):
        status = fed.status()
        manifests = [line for line in status if line.startswith("manifest: ")]
        assert len(manifests) == 1 and re.match(r"manifest: round \d+ \w+, model v\d+ \(610 params, 4 shards",
                                                manifests[0]), status
        assert _device_lines(status) == {d: "online" for d in DEVICES}, status
        assert [line for line in status if line.startswith("coordinator: online (incarnation ")], status

    with fleet.phase(f"b: kill -9 the coordinator in round {KILL_ROUND} with 3 updates held", "coordinator",
                     "agent"):
        fleet.wait_for(f"the fast devices' receipts for round {KILL_ROUND}",
                       lambda: all(_receipts(agents[d], KILL_ROUND) for d in FAST), 2 * ROUND_TIMEOUT,
                       needs=[coordinator, broker, *agents.values()])
        assert not fed.outbox(SLOW).exists(), f"{SLOW} began uploading before the kill: raise TRAIN_DELAY"
        coordinator.signal(signal.SIGKILL)
        assert coordinator.wait(10) == -signal.SIGKILL
        assert _rounds(_committed([coordinator])) == list(range(1, KILL_ROUND)), (
            f"round {KILL_ROUND} closed before the kill landed: raise TRAIN_DELAY")

    with fleet.phase(f"c: SIGTERM {SLOW} mid-upload; restarted, it resumes from its outbox", f"agent-{SLOW}"):
        slow = agents[SLOW]
        # The outbox is written before the first shard is published; with the coordinator
        # down no receipt can come, so the upload stays unfinished.
        fleet.wait_for(f"{SLOW}'s upload to start (outbox written)", fed.outbox(SLOW).exists, 3 * TRAIN_DELAY,
                       needs=[slow])
        assert not _receipts(slow, KILL_ROUND)
        slow.signal(signal.SIGTERM)
        assert slow.wait(20) == 0
        assert slow.events("agent_stop"), "no agent_stop line"
        assert fed.outbox(SLOW).exists(), "the outbox did not survive the SIGTERM"
        agents[SLOW] = slow = fleet.restart(slow)
        fleet.wait_for(f"{SLOW} to restore its outbox",
                       lambda: slow.events("outbox_restored", round=KILL_ROUND, shards=SHARDS), 20, needs=[slow])
        fleet.wait_for(f"{SLOW} to reconnect", lambda: slow.events("connected"), 20, needs=[slow])

    with fleet.phase(f"b: the restarted coordinator resumes round {KILL_ROUND} from its journal", "coordinator",
                     "agent"):
        coordinator = fleet.restart(coordinator)
        fleet.wait_for("the journal replay", lambda: coordinator.events("recovered"), 30, needs=[coordinator])
        (rec,) = coordinator.events("recovered")
        assert (rec.fields["open_round"], rec.int("version"), rec.int("shards")) == (
            str(KILL_ROUND), KILL_ROUND - 1, len(FAST) * SHARDS), rec
        fleet.wait_for(f"round {KILL_ROUND} to commit",
                       lambda: coordinator.events("round_committed", round=KILL_ROUND), ROUND_TIMEOUT,
                       needs=[coordinator])
        fleet.wait_for(f"{SLOW}'s receipt for round {KILL_ROUND}", lambda: _receipts(slow, KILL_ROUND), 10,
                       needs=[slow])
        (receipt,) = _receipts(slow, KILL_ROUND)
        assert receipt.int("fetched_bytes") == 0, f"{SLOW} fetched and trained round {KILL_ROUND} again: {receipt}"

    with fleet.phase(f"d: restart mosquitto in round {BROKER_RESTART_ROUND}; every later round commits",
                     "mosquitto", "coordinator", "agent"):
        fleet.wait_for(f"the fast devices' receipts for round {BROKER_RESTART_ROUND}",
                       lambda: all(_receipts(agents[d], BROKER_RESTART_ROUND) for d in FAST), 2 * ROUND_TIMEOUT,
                       needs=[coordinator, broker, *agents.values()])
        assert not coordinator.events("round_committed", round=BROKER_RESTART_ROUND)
        broker.signal(signal.SIGTERM)
        assert broker.wait(15) == 0
        broker = fleet.restart(broker)
        fleet.wait_for("mosquitto to run again", lambda: " running" in broker.text(), 15, needs=[broker])
        assert coordinator.wait(ROUNDS_1 * (TRAIN_DELAY + ROUND_TIMEOUT)) == 0, "campaign 1's coordinator"

    with fleet.phase(f"a: campaign 1 ends with exactly {ROUNDS_1} committed rounds", "coordinator", "agent"):
        campaign_1 = fleet.of("coordinator")
        commits = _committed(campaign_1)
        assert _rounds(commits) == list(range(1, ROUNDS_1 + 1))
        assert [c.int("version") for c in commits] == list(range(1, ROUNDS_1 + 1))
        expected = {r: (4, 4, "target") for r in range(1, ROUNDS_1 + 1)}
        assert {c.int("round"): (c.int("accepted"), c.int("selected"), c.fields["reason"]) for c in commits} == (
            expected)
        assert [p.events("round_abandoned") for p in campaign_1] == [[], []]
        # The broker's shutdown published all four wills, and round 6 still waited for pi-attic.
        assert sorted(e.fields["device"] for e in coordinator.events("device_offline")) == sorted(DEVICES)
        (stop,) = coordinator.events("coordinator_stop")
        assert (stop.int("rounds_committed"), stop.int("rounds_abandoned")) == (ROUNDS_1, 0), stop
        # Persistence on: the restarted broker kept the coordinator's session.
        assert not coordinator.events("broker_lost_session")
        assert agents[SLOW].events("update_dropped") == []
        for d in DEVICES:
            receipts = [e for p in fleet.of(f"agent-{d}") for e in _receipts(p)]
            assert _rounds(receipts) == list(range(1, ROUNDS_1 + 1)), d
            fleet.wait_for(f"{d} to see the campaign finish", lambda d=d: agents[d].events("campaign_finished"), 10)

    with fleet.phase("e: fedsync status after campaign 1", "status"):
        status = fed.status()
        assert any(re.match(rf"manifest: round \d+ finished, model v{ROUNDS_1} ", line) for line in status), status
        assert _device_lines(status) == {d: "online" for d in DEVICES}, status

    with fleet.phase("f: the agents stay and join campaign 2 under a new coordinator", "coordinator-2", "agent"):
        standing = {d: a.pid for d, a in agents.items()}
        assert all(a.alive() for a in agents.values()), "an agent exited after campaign 1"
        second = fed.start_coordinator("coordinator-2", "S2", ROUNDS_2)
        fleet.wait_for("campaign 2's coordinator to own the federation", lambda: second.events("recovered"), 30,
                       needs=[second])

    with fleet.phase("g: a rival coordinator is refused; the live one goes on", "coordinator-rival",
                     "coordinator-2", "status"):
        rival = fed.start_coordinator("coordinator-rival", "S-rival", ROUNDS_2)
        assert rival.wait(30) == 1
        commits_at_refusal = len(_committed([second]))
        assert second.alive() and commits_at_refusal < ROUNDS_2, "campaign 2 ended before the rival was refused"
        refusal = [m for m in map(REFUSAL.fullmatch, rival.lines()) if m]
        assert len(refusal) == 1, rival.text()
        assert "Traceback" not in rival.text() and not rival.events("round_committed")
        status = fed.status()
        live = [re.fullmatch(r"coordinator: (online|offline) \(incarnation (\d+)\)", line) for line in status]
        (incarnation,) = [m.group(2) for m in live if m]
        assert refusal[0].group(1) == incarnation, (refusal[0].group(0), status)
        assert second.wait(ROUNDS_2 * (TRAIN_DELAY + ROUND_TIMEOUT)) == 0
        commits = _committed([second])
        assert [(c.int("round"), c.int("version"), c.int("accepted")) for c in commits] == (
            [(r, r, 4) for r in range(1, ROUNDS_2 + 1)])
        assert not second.events("round_abandoned")

    with fleet.phase("f: campaign 2 ran on the same, never-restarted agent processes", "agent"):
        assert {d: a.pid for d, a in agents.items()} == standing
        assert all(a.alive() for a in agents.values())
        for d, a in agents.items():
            assert [e.fields["reason"] for e in a.events("campaign_started")] == ["previous campaign finished"], d
            assert _rounds(_receipts_by_campaign([a])[1]) == list(range(1, ROUNDS_2 + 1)), d

    with fleet.phase("h: SIGTERM everything; each process exits cleanly", "agent", "mosquitto"):
        for a in agents.values():
            a.signal(signal.SIGTERM)
        assert {d: a.wait(20) for d, a in agents.items()} == {d: 0 for d in DEVICES}
        broker.signal(signal.SIGTERM)
        assert broker.wait(15) == 0

    with fleet.phase("a: deltas fetched from round 3 on; receipts and commits agree across processes", "agent"):
        # (model_fetches, delta_fetches) per agent process. A never-restarted device fetches
        # every round's model: campaign 1 8 (deltas for rounds 3..8: 6), campaign 2 3 (round
        # 3: 1). pi-attic's first process fetched rounds 1..4 (deltas 3, 4); its second restored
        # round 4 from the outbox, fetched round 5 whole (a fresh process holds no model) and
        # deltas for 6..8, then campaign 2 as the others.
        expected = {d: [(8 + 3, 6 + 1)] for d in FAST}
        expected[SLOW] = [(4, 2), (4 + 3, 3 + 1)]
        for d in DEVICES:
            got = [(e.int("model_fetches"), e.int("delta_fetches"))
                   for p in fleet.of(f"agent-{d}") for e in p.events("agent_stop")]
            assert got == expected[d], f"{d}: (model_fetches, delta_fetches) per process"
        # Round by round, the coordinator's accepted= equals the number of agents holding an
        # accepted receipt for that round (campaign 1 before each agent's campaign_started).
        by_device = {d: _receipts_by_campaign(fleet.of(f"agent-{d}")) for d in DEVICES}
        for campaign, coordinators in ((1, fleet.of("coordinator")), (2, fleet.of("coordinator-2"))):
            holders = Counter(e.int("round") for d in DEVICES for e in by_device[d][campaign - 1])
            assert {c.int("round"): c.int("accepted") for c in _committed(coordinators)} == dict(holders), campaign
        coordinators = [*fleet.of("coordinator"), *fleet.of("coordinator-2")]
        accepted_by_coordinators = sum(c.int("accepted") for c in _committed(coordinators))
        receipts = sum(len(_receipts(p)) for d in DEVICES for p in fleet.of(f"agent-{d}"))
        assert accepted_by_coordinators == receipts == 4 * (ROUNDS_1 + ROUNDS_2)
        for p in fleet.procs:
            assert "Traceback" not in p.text() and not [line for line in p.lines() if " ERROR " in line], p.name
