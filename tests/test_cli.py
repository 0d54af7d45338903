"""The command line, as a user runs it: separate processes over a real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker_config.process import BrokerProcess, mosquitto_available

pytestmark = pytest.mark.broker
FEDSYNC = [sys.executable, "-m", "fedsync.cli"]


def test_demo_prints_a_json_summary_as_its_last_line():
    out = subprocess.run([*FEDSYNC, "demo", "--devices", "3", "--rounds", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["rounds_completed"] == 2 and summary["rounds_abandoned"] == 0
    assert (summary["updates_accepted"], summary["duplicates_dropped"], summary["shards_rejected"]) == (6, 0, 0)
    assert summary["devices_offline_detected"] == 0
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and 0.0 <= summary["centralised_accuracy"] <= 1.0


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
                if p.poll() is None:
                    p.kill()
                p.wait(10)
    assert "device_offline device=dev-2" in log
    line = next(ln for ln in log.splitlines() if "round_committed round=2 " in ln)
    assert "accepted=2 selected=3 reason=quorum_no_live_pending" in line
    assert "coordinator_stop rounds_committed=2 rounds_abandoned=0 updates_accepted=5 duplicates_dropped=0 shards_rejected=0" in log
    assert status.returncode == 0, status.stderr
    assert "manifest: round 2 finished, model v2" in status.stdout
    assert "device dev-2: offline" in status.stdout
    assert "device dev-0: offline" in status.stdout  # a clean exit publishes offline too
    assert "coordinator: offline" in status.stdout
