"""The broker ACL grants every topic the cores really use (it once forgot modeldelta/#).

A federation runs in the in-memory broker of tests/sim.py with the rendered access
rules enforced the way mosquitto enforces them: a publish or subscription the ACL does
not grant is dropped silently. The run must commit every round with deltas in use, and
no action may be denied. The same check against the table without its modeldelta row is
the positive control: that federation stalls from the first delta on, as the field report described.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fedsync.broker_config import acl
from fedsync.coordinator.core import RoundPolicy
from fedsync.actions import Publish, Subscribe
from fedsync.topics import TOPIC_TABLE, Topics
from tests.sim import Sim, offset_trainer

DEVICES = ["pi-kitchen", "pi-garage", "pi-shed"]


class AclSim(Sim):
    """Sim whose broker drops what the ACL does not grant, and records it."""

    grants = None  # role -> tuple[Grant, ...] (with {fed}/{user} placeholders)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.denied: list[tuple[str, str, str]] = []
        self.used: list[tuple[str, str, str]] = []  # (client, access, topic or filter)
        for flt in self.subs["coordinator"]:
            self._check("coordinator", "read", flt)

    def _allowed(self, client: str, access: str, wanted: str) -> bool:
        role = "coordinator" if client == "coordinator" else "device"
        fed = self.topics.federation
        return any(g.access == access and acl.covers(g.topic.format(fed=fed, user=client), wanted)
                   for g in self.grants[role])

    def _check(self, client: str, access: str, wanted: str) -> bool:
        self.used.append((client, access, wanted))
        if self._allowed(client, access, wanted):
            return True
        self.denied.append((client, access, wanted))
        return False

    def run(self, client: str, actions: list) -> None:
        kept = [a for a in actions
                if not (isinstance(a, Publish) and not self._check(client, "write", a.topic))
                and not (isinstance(a, Subscribe) and not self._check(client, "read", a.topic_filter))]
        super().run(client, kept)

    def connect(self, device: str) -> None:
        self._check(device, "write", self.topics.status(device))  # its online status and its last will
        super().connect(device)


def _federation(grants) -> AclSim:
    AclSim.grants = grants
    rng = np.random.default_rng(0)  # an incompressible model, so the small round deltas are published
    params = {"w": rng.standard_normal(4000).astype(np.float32), "b": np.zeros(10, np.float32)}
    sim = AclSim(DEVICES, RoundPolicy(rounds=5, target=3, quorum=3, round_timeout=60.0, shard_values=1024),
                 params=params)
    sim.topics = sim.coord.topics
    sim.trainers = {d: offset_trainer(0.01 * (i + 1), 10 * (i + 1)) for i, d in enumerate(DEVICES)}
    sim.start()
    sim.settle()
    for _ in range(10):
        sim.advance(61.0)
    return sim


def test_every_topic_the_cores_use_is_granted_and_five_rounds_commit_with_deltas():
    sim = _federation(acl.GRANTS)
    assert sim.denied == []
    assert [c.outcome for c in sim.closed()] == ["committed"] * 5
    assert sum(a.stats.delta_fetches for a in sim.agents.values()) == 4 * len(DEVICES)
    used = {topic for _, _, topic in sim.used}
    assert any("/modeldelta/" in t for t in used)


def test_positive_control_without_the_modeldelta_row_every_round_after_the_first_is_abandoned():
    no_delta = {role: tuple(g for g in grants if "modeldelta" not in g.topic) for role, grants in acl.GRANTS.items()}
    sim = _federation(no_delta)
    outcomes = [c.outcome for c in sim.closed()]
    # Round 2 ships model v1 as a delta from v0, which no device may read: it and every
    # retry after it wait out their deadline.
    assert outcomes[0] == "committed" and len(outcomes) >= 5
    assert set(outcomes[1:]) == {"abandoned"}
    assert {(c == "coordinator", access) for c, access, t in sim.denied if "/modeldelta/" in t} == {(True, "write"), (False, "read")}


def test_every_topics_method_has_a_row_in_the_table():
    t = Topics("farm")
    produced = [t.manifest, t.model(3, 0), t.model_filter(3), t.model_delta(2, 3, 0), t.model_delta_filter(2, 3),
                t.up("pi-kitchen", 1, "u1", 0), t.up_filter, t.ack("pi-kitchen"), t.status("pi-kitchen"),
                t.status_filter, t.coordinator_status, t.coordinator_probe]
    rows = [f"fedsync/farm/{r.filter.replace('{device}', '+')}" for r in TOPIC_TABLE]
    for topic in produced:
        assert any(acl.covers(row.replace("+/#", "#"), topic) for row in rows), topic


def test_the_readme_topic_tree_lists_every_row():
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    tree = readme.split("## Topic tree", 1)[1].split("```", 2)[1]
    listed = re.findall(r"^fedsync/\{federation\}/(\S+)", tree, re.M)
    assert len(listed) == len(TOPIC_TABLE)
    for row, line in zip(TOPIC_TABLE, listed):
        assert line.split("/")[0] == row.filter.split("/")[0], (row.filter, line)


def test_rendered_mosquitto_acl_grants_the_delta_and_the_coordinator_status_read():
    text = acl.mosquitto_acl("farm", ["pi-kitchen"])
    device = text.split("user pi-kitchen", 1)[1]
    coordinator = text.split("user coordinator", 1)[1].split("user ", 1)[0]
    assert "topic read fedsync/farm/modeldelta/#" in device
    assert "topic write fedsync/+/modeldelta/#" in coordinator
    assert "topic read fedsync/+/coordinator/status" in coordinator
    assert "topic write fedsync/+/coordinator/probe" in coordinator


def test_the_coordinator_services_own_subscriptions_and_probe_are_granted():
    t = Topics("farm")
    for flt in (t.up_filter, t.status_filter, t.coordinator_status, t.coordinator_probe):
        assert acl.allowed("coordinator", "farm", "coordinator", "read", flt), flt
    for topic in (t.coordinator_probe, t.coordinator_status, t.manifest, t.ack("pi-kitchen")):
        assert acl.allowed("coordinator", "farm", "coordinator", "write", topic), topic
    assert not acl.allowed("device", "farm", "pi-kitchen", "write", t.coordinator_probe)
