"""One coordinator per federation, through the CLI as separate processes on mosquitto.

A live coordinator holds the federation: a second one is refused, naming the live one's
incarnation and start time. A frozen one (socket open, no pings, its last will not yet
fired) is no owner: after LIVENESS_WAIT a newcomer takes over, and when the frozen one
wakes up it stands down instead of fighting for the session. ``--takeover`` hands over
from a live one at once. Every outcome is read from the processes' exit codes, stderr
and the broker's retained coordinator status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.messages import PeerStatus, decode
from fedsync.topics import Topics
from tests.util import stop_process, wait_until

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")]

FEDSYNC = os.path.join(os.path.dirname(sys.executable), "fedsync")
USERS = {"coordinator": "c-pw", "monitor": "m-pw"}
TOPICS = Topics("own")


class Coordinator:
    """One `fedsync coordinator` process with its stderr in a file."""

    def __init__(self, broker: BrokerProcess, tmp: Path, name: str, *extra: str) -> None:
        self.log = tmp / f"{name}.log"
        cmd = [FEDSYNC, "coordinator", "--broker", broker.url, "--password-file", str(tmp / "c.pw"),
               "--config", str(tmp / "c.toml"), "--federation", "own", "--rounds", "1", "--target", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))

    def text(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_process(self.proc, sig=signal.SIGKILL)


def _retained_status(broker: BrokerProcess) -> PeerStatus:
    got: list[bytes] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="ownership-probe", clean_session=True)
    c.username_pw_set("monitor", USERS["monitor"])
    c.on_message = lambda _c, _u, msg: got.append(bytes(msg.payload))
    c.on_connect = lambda cl, *_: cl.subscribe(TOPICS.coordinator_status, 1)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        wait_until(lambda: got, 10, "the retained coordinator status")
    finally:
        c.loop_stop()
        c.disconnect()
    return decode(got[-1], PeerStatus)


def _online_as(broker: BrokerProcess, coordinator: Coordinator) -> int:
    """Wait until this process has published its 'online' status; its incarnation."""
    wait_until(lambda: "coordinator_start" in coordinator.text() and _retained_status(broker).state == "online",
               20, "the coordinator to be online")
    assert coordinator.proc.poll() is None
    return _retained_status(broker).incarnation


@pytest.fixture
def broker(tmp_path: Path):
    (tmp_path / "c.pw").write_text(USERS["coordinator"] + "\n")
    # keepalive 60 s: a frozen coordinator's will does not fire while the test runs.
    (tmp_path / "c.toml").write_text("[broker]\nkeepalive = 60\n")
    acl = tmp_path / "acl"
    from fedsync.broker_config.acl import mosquitto_acl

    acl.write_text(mosquitto_acl("own", []))
    with BrokerProcess("mosquitto", users=USERS, acl_file=str(acl)) as b:
        yield b


def test_live_rival_refused_frozen_one_replaced_and_it_stands_down_when_it_wakes(broker, tmp_path):
    a = Coordinator(broker, tmp_path, "a")
    procs = [a]
    try:
        inc_a = _online_as(broker, a)

        b = Coordinator(broker, tmp_path, "b")
        procs.append(b)
        assert b.wait() == 1
        err = b.text().strip().splitlines()
        assert err[-1] == (f"fedsync coordinator: another coordinator is running on federation 'own' "
                           f"(incarnation {inc_a}, started {_started(inc_a)}); stop it first, or pass --takeover")
        assert "Traceback" not in b.text()
        assert a.proc.poll() is None and _retained_status(broker).incarnation == inc_a  # A kept its federation

        a.proc.send_signal(signal.SIGSTOP)  # frozen: socket open, no pings, will not fired
        c = Coordinator(broker, tmp_path, "c")
        procs.append(c)
        wait_until(lambda: "stale_coordinator_status" in c.text(), 20, "C to find A's status stale")
        wait_until(lambda: _retained_status(broker).incarnation != inc_a, 10, "C to publish its status")
        inc_c = _retained_status(broker).incarnation
        assert f"other=\"incarnation {inc_a}," in c.text()

        a.proc.send_signal(signal.SIGCONT)  # A wakes up, reconnects, finds C in charge
        assert a.wait() == 1
        assert a.text().strip().splitlines()[-1] == (
            f"fedsync coordinator: replaced by another coordinator of federation 'own' "
            f"(incarnation {inc_c}, started {_started(inc_c)}) that took over; standing down")
        wait_until(lambda: _retained_status(broker).incarnation == inc_c, 10, "C's status to stand")
        assert _retained_status(broker).state == "online" and c.proc.poll() is None

        c.proc.send_signal(signal.SIGTERM)
        assert c.wait() == 0
        assert _retained_status(broker) == PeerStatus("coordinator", "offline", inc_c)
    finally:
        for p in procs:
            p.stop()


def test_takeover_hands_over_from_a_live_coordinator_at_once(broker, tmp_path):
    a = Coordinator(broker, tmp_path, "a")
    procs = [a]
    try:
        inc_a = _online_as(broker, a)
        b = Coordinator(broker, tmp_path, "b", "--takeover")
        procs.append(b)
        assert a.wait() == 1
        assert "replaced by another coordinator of federation 'own'" in a.text().strip().splitlines()[-1]
        wait_until(lambda: _retained_status(broker).incarnation != inc_a, 10, "B's status")
        assert _retained_status(broker).state == "online"
        assert "taking_over" in b.text() and "stale_coordinator_status" not in b.text()
        b.proc.send_signal(signal.SIGTERM)
        assert b.wait() == 0
    finally:
        for p in procs:
            p.stop()


def _started(incarnation: int) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(incarnation / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
