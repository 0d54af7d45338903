"""What an operator is told, through the ``fedsync`` CLI as separate processes on a real broker.

Two mistakes that used to leave no line at all: a coordinator started before enough devices
(it sat silent), and one device id given to two agents (they took the broker session from
each other on every reconnect). Each test then shows the federation going on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsync.messages import PeerStatus, decode
from fedsync.topics import Topics
from tests.cli_procs import FEDSYNC, Fleet, fleet  # noqa: F401 (pytest fixture)
from tests.secured_broker import Client

pytestmark = pytest.mark.broker
FED = "ops"


def _pw(tmp_path: Path, users: dict[str, str], name: str) -> str:
    path = tmp_path / f"{name}.pw"
    path.write_text(users[name] + "\n")
    return str(path)


def _coordinator(fleet: Fleet, broker, users, tmp_path: Path, *, min_devices: int, target: int):
    return fleet.start("coordinator", [
        FEDSYNC, "coordinator", "--broker", broker.url, "--password-file", _pw(tmp_path, users, "coordinator"),
        "--federation", FED, "--rounds", "1", "--target", str(target), "--quorum", str(target),
        "--min-devices", str(min_devices), "--round-timeout", "30", "--state-dir", str(tmp_path / "S")])


def _agent(fleet: Fleet, broker, users, tmp_path: Path, device: str, role: str, *extra: str):
    return fleet.start(role, [
        FEDSYNC, "agent", "--broker", broker.url, "--device-id", device, "--password-file",
        _pw(tmp_path, users, device), "--federation", FED, "--once", *extra])


def test_a_coordinator_short_of_devices_says_how_many_it_waits_for(fleet, broker, broker_users, tmp_path):
    coordinator = _coordinator(fleet, broker, broker_users, tmp_path, min_devices=2, target=2)

    def waits() -> list[tuple[int, int]]:
        return [(e.int("online"), e.int("needed")) for e in coordinator.events("waiting_for_devices")]

    fleet.wait_for("the coordinator to say it waits", lambda: waits() == [(0, 2)], 30, needs=[coordinator])
    first = _agent(fleet, broker, broker_users, tmp_path, "dev-0", "agent-0")
    fleet.wait_for("one device online", lambda: waits() == [(0, 2), (1, 2)], 30, needs=[coordinator, first])
    second = _agent(fleet, broker, broker_users, tmp_path, "dev-1", "agent-1")
    assert coordinator.wait(60) == 0, coordinator.tail()
    assert [first.wait(30), second.wait(30)] == [0, 0]
    assert [e.int("round") for e in coordinator.events("round_committed")] == [1]
    assert waits() == [(0, 2), (1, 2)]  # nothing more once the round could open


def test_a_second_agent_on_one_device_id_is_named_and_the_first_keeps_federating(
        fleet, broker, broker_kind, broker_users, tmp_path):
    topics = Topics(FED)
    first = _agent(fleet, broker, broker_users, tmp_path, "dev-0", "agent-first")
    fleet.wait_for("the first agent to connect", lambda: first.events("connected"), 30, needs=[first])
    second = _agent(fleet, broker, broker_users, tmp_path, "dev-0", "agent-second")
    # The older agent names the other on its first reconnect (the newer one took its session).
    fleet.wait_for("the first agent's duplicate_device line", lambda: first.events("duplicate_device"), 30,
                   needs=[first])
    if broker_kind == "mosquitto":
        # mosquitto hands the session back and forth, so the newer one sees the older's status and stops.
        assert second.wait(60) == 2, second.tail()
        lines = [line for line in second.text().splitlines() if line.startswith("fedsync agent: ")]
        assert len(lines) == 1 and lines[0].startswith(
            "fedsync agent: device id 'dev-0' is in use by another agent (started "), second.text()
        assert lines[0].endswith("before this one); this one stops: give each device its own --device-id")
        assert [e.fields["action"] for e in second.events("duplicate_device")] == ["stop"]
        assert second.events("agent_stop")
        # The first agent keeps its device: the retained status is its own online, and the one
        # that stopped left no offline behind.
        (start,) = first.events("agent_start")
        watcher = Client(broker.port, "dev-9", broker_users["dev-9"], subscribe=(topics.status("dev-0"),))
        try:
            fleet.wait_for("dev-0's status to be the first agent's online",
                           lambda: decode(watcher.settle(topics.status("dev-0")), PeerStatus)
                           == PeerStatus("dev-0", "online", start.int("incarnation")), 30, needs=[first])
        finally:
            watcher.close()
    # amqtt 0.12 instead keeps the newer one's socket open and delivers nothing more to it: it
    # learns nothing and says nothing; the older one's line is the operator's (docs/brokers.md).
    # Either way the first agent federates: a one-round campaign commits with its update.
    coordinator = _coordinator(fleet, broker, broker_users, tmp_path, min_devices=1, target=1)
    assert coordinator.wait(60) == 0, coordinator.tail()
    assert first.wait(30) == 0, first.tail()
    assert [e.fields["status"] for e in first.events("round_done")] == ["accepted"]
    assert [e.fields["action"] for e in first.events("duplicate_device")] == ["keep_running"]
