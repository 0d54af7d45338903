"""Prometheus metrics (coordinator/metrics.py), scraped over HTTP as Prometheus would.

Two scenarios: the sans-IO core fed by hand (exact gauges, rejections by reason,
the event hook chain) and a real federation — 3 devices, 2 rounds over amqtt —
whose scrape must report exactly what happened.
"""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from fedsync.broker_config.process import BrokerProcess
from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
from fedsync.lab.federation import LocalFederation
from fedsync.coordinator.metrics import serve_metrics
from fedsync.messages import PeerStatus, encode
from fedsync.topics import Topics
from tests.util import wait_until


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and index every sample by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def fake_service(core: CoordinatorCore, handler=None) -> SimpleNamespace:
    """What serve_metrics reads from a CoordinatorService: core, on_event, link.connected."""
    connected = threading.Event()
    connected.set()
    return SimpleNamespace(core=core, on_event=handler, link=SimpleNamespace(connected=connected))


def status(topics: Topics, device: str, state: str) -> tuple[str, bytes]:
    return topics.status(device), encode(PeerStatus(device, state))


def test_scrape_reads_the_cores_counters_and_presence_at_scrape_time():
    topics = Topics("lab")
    core = CoordinatorCore(topics, {"w": np.zeros(4, np.float32)}, RoundPolicy(rounds=1, target=2, min_devices=3),
                           hyper={}, incarnation=42, seed=0)
    core.start(now=0.0)
    server = serve_metrics(fake_service(core), port=0)
    try:
        for device in ("d1", "d2"):
            core.on_message(*status(topics, device, "online"), now=1.0)
        core.on_message(*status(topics, "d2", "offline"), now=2.0)  # d2's last will
        core.on_message(topics.up("d1", 1, "u1", 0), b"\xff", now=3.0)  # not CBOR
        core.on_message(topics.up("d1", 1, "u2", 0), b"\xff", now=3.0)
        core.on_message(topics.up("d1", 1, "u3", 0), b"\xa0", now=3.0)  # CBOR, but no schema version
        m = scrape(server.url)
    finally:
        server.stop()
    assert m[("fedsync_devices_online", ())] == 1
    assert m[("fedsync_devices_offline_detected_total", ())] == 1
    assert m[("fedsync_shards_rejected_total", (("reason", "cbor"),))] == 2
    assert m[("fedsync_shards_rejected_total", (("reason", "schema_version"),))] == 1
    assert m[("fedsync_bytes_total", (("direction", "in"),))] == 3
    assert m[("fedsync_bytes_total", (("direction", "out"),))] == core.stats.bytes_out > 0
    assert m[("fedsync_rounds_total", (("outcome", "committed"),))] == 0
    assert m[("fedsync_round_open", ())] == 0  # min_devices=3 never reached
    assert m[("fedsync_broker_connected", ())] == 1
    assert m[("fedsync_coordinator_info", (("federation", "lab"), ("incarnation", "42")))] == 1


def test_round_durations_are_observed_and_the_existing_handler_still_runs():
    core = CoordinatorCore(Topics("lab"), {"w": np.zeros(2, np.float32)}, RoundPolicy(), hyper={},
                           incarnation=1, seed=0)
    heard: list[object] = []
    service = fake_service(core, heard.append)
    server = serve_metrics(service, port=0)
    try:
        service.on_event(RoundClosed(1, "committed", 1, ("a",), ("a",), 100.0, 103.0, "target"))
        service.on_event(RoundClosed(2, "abandoned", 1, ("a",), (), 103.0, 163.0, "deadline"))
        m = scrape(server.url)
        # A handler installed after serve_metrics (the wrong order) is chained onto at the next scrape.
        later: list[object] = []
        service.on_event = later.append
        scrape(server.url)
        service.on_event(RoundClosed(3, "committed", 2, ("a",), ("a",), 163.0, 164.0, "target"))
        m2 = scrape(server.url)
    finally:
        server.stop()
    assert [e.round_id for e in heard] == [1, 2] and [e.round_id for e in later] == [3]
    assert service.on_event == later.append  # stop() handed the service back its own handler
    committed, abandoned = (("outcome", "committed"),), (("outcome", "abandoned"),)
    assert m[("fedsync_round_duration_seconds_count", committed)] == 1
    assert m[("fedsync_round_duration_seconds_sum", committed)] == 3.0
    assert m[("fedsync_round_duration_seconds_bucket", (("le", "2.5"), ("outcome", "committed")))] == 0
    assert m[("fedsync_round_duration_seconds_bucket", (("le", "5.0"), ("outcome", "committed")))] == 1
    assert m[("fedsync_round_duration_seconds_count", abandoned)] == 1
    assert m[("fedsync_round_duration_seconds_sum", abandoned)] == 60.0
    assert m[("fedsync_last_round_closed_timestamp_seconds", ())] == 163.0
    assert m2[("fedsync_round_duration_seconds_count", committed)] == 2
    assert m2[("fedsync_last_round_closed_timestamp_seconds", ())] == 164.0


@pytest.mark.broker
def test_a_real_federation_is_scraped_with_exact_counts(broker_users):
    """3 devices, 2 rounds over amqtt, then one hostile payload: the scrape says exactly that."""
    broker = BrokerProcess("amqtt", users=broker_users)
    broker.start()
    policy = RoundPolicy(rounds=2, target=3, quorum=3, min_devices=3, round_timeout=60.0)
    fed = LocalFederation(broker.url, broker_users, n_devices=3, seed=5, policy=policy, federation="metrics")
    server = serve_metrics(fed.coordinator, port=0)
    spy = None
    try:
        fed.start()
        assert fed.wait(60), "2 rounds did not commit"
        wait_until(lambda: fed.agent_stats()["rounds_accepted"] == 6, 15, "every device's receipts")
        m = scrape(server.url)
        core = fed.coordinator.core

        # One hostile payload on a device's upload topic: rejected, counted by reason, scraped.
        spy = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-31")
        spy.username_pw_set("dev-31", broker_users["dev-31"])
        spy.connect(broker.host, broker.port, 15)
        spy.loop_start()
        spy.publish(fed.topics.up("dev-0", 9, "u1", 0), b"\xff", qos=1).wait_for_publish(10)
        wait_until(lambda: core.stats.shards_rejected == 1, 15, "the hostile payload to be rejected")
        m2 = scrape(server.url)
    finally:
        if spy is not None:
            spy.loop_stop()
            spy.disconnect()
        server.stop()
        fed.stop()
        broker.stop()

    s = core.stats
    assert m[("fedsync_rounds_total", (("outcome", "committed"),))] == 2
    assert m[("fedsync_rounds_total", (("outcome", "abandoned"),))] == 0
    assert m[("fedsync_updates_accepted_total", ())] == 6
    assert m[("fedsync_shards_accepted_total", ())] == 6  # 610 params: one shard per update
    assert m[("fedsync_duplicate_shards_total", ())] == s.duplicates_dropped
    assert not any(name == "fedsync_shards_rejected_total" for name, _ in m)
    assert m[("fedsync_round_duration_seconds_count", (("outcome", "committed"),))] == 2
    # the exporter's histogram holds exactly the durations of the rounds the federation recorded
    assert m[("fedsync_round_duration_seconds_sum", (("outcome", "committed"),))] == pytest.approx(
        sum(r.seconds for r in fed.records if r.outcome == "committed"), rel=1e-9)
    assert m[("fedsync_devices_online", ())] == 3
    assert m[("fedsync_devices_offline_detected_total", ())] == 0
    assert m[("fedsync_model_version", ())] == 2
    assert m[("fedsync_finished", ())] == 1 and m[("fedsync_round_open", ())] == 0
    assert m[("fedsync_round_id", ())] == 2
    assert m[("fedsync_broker_connected", ())] == 1
    assert m[("fedsync_bytes_total", (("direction", "in"),))] > 0

    assert m2[("fedsync_shards_rejected_total", (("reason", "cbor"),))] == 1
    assert m2[("fedsync_bytes_total", (("direction", "in"),))] == m[("fedsync_bytes_total", (("direction", "in"),))] + 1
    assert m2[("fedsync_updates_accepted_total", ())] == 6


@pytest.mark.broker
def test_the_cli_serves_metrics_with_metrics_port(tmp_path, broker_users):
    """`fedsync coordinator --metrics-port` (the wiring in fedsync/cli/) serves the same endpoint."""
    import os
    import signal
    import subprocess
    import sys

    from fedsync.broker_config.process import free_port

    broker = BrokerProcess("amqtt", users=broker_users)
    broker.start()
    (tmp_path / "coordinator.pw").write_text(broker_users["coordinator"] + "\n")
    port = free_port()
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsync.cli", "coordinator", "--broker", broker.url, "--password-file",
         str(tmp_path / "coordinator.pw"), "--federation", "clitest", "--rounds", "1", "--min-devices", "2",
         "--state-dir", str(tmp_path / "state"), "--metrics-port", str(port)],
        env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        m: dict = {}

        def scraped() -> bool:
            try:
                m.update(scrape(f"http://127.0.0.1:{port}/metrics"))
            except OSError:
                return False
            return m.get(("fedsync_broker_connected", ())) == 1

        wait_until(scraped, 30, "the CLI's metrics endpoint with a broker connection")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        broker.stop()
    assert proc.returncode == 0, err
    assert "metrics_serving" in err and "coordinator_stop" in err
    assert m[("fedsync_round_open", ())] == 0 and m[("fedsync_devices_online", ())] == 0
    assert any(k[0] == "fedsync_coordinator_info" and ("federation", "clitest") in k[1] for k in m)
    assert "metrics_hook_rechained" not in err  # serve_metrics runs after the CLI sets on_event
