"""An in-memory MQTT stand-in for driving the sans-IO cores (no sockets, no clock).

Like h11's tests, two kinds of peer pass messages over an in-memory link: one
:class:`CoordinatorCore` and several :class:`AgentCore`. The broker here keeps
retained messages, matches ``+``/``#`` filters and delivers in order; faults
(drop, duplicate, reorder, corrupt) are injected by the test through hooks.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from fedsync.coordinator.core import CoordinatorCore, RoundClosed, RoundPolicy
from fedsync.device_agent.agent import AgentCore, Finished, Train
from fedsync.actions import Publish, Subscribe, Unsubscribe
from fedsync.messages import PeerStatus, encode
from fedsync.topics import Topics


def topic_matches(flt: str, topic: str) -> bool:
    f, t = flt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def offset_trainer(offset: float, num_samples: int):
    """A trainer whose result is global + offset: deltas are known exactly."""
    def fit(params, hyper):
        return {k: v + np.float32(offset) for k, v in params.items()}, num_samples, {"train_loss": offset}
    return fit


@dataclass
class Sim:
    devices: list[str]
    policy: RoundPolicy
    trainers: dict = field(default_factory=dict)
    params: dict = field(default_factory=lambda: {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)})
    now: float = 1000.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.topics = Topics("sim")
        self.coord = CoordinatorCore(self.topics, self.params, self.policy, hyper={"lr": 0.1}, incarnation=1,
                                     seed=self.seed)
        self.agents = {d: AgentCore(d, self.topics, random.Random(d), resend_after=5.0) for d in self.devices}
        self.retained: dict[str, bytes] = {}
        self.subs: dict[str, set[str]] = {"coordinator": {self.topics.up_filter, self.topics.status_filter}}
        self.queue: deque = deque()
        self.events: list = []
        self.finished: set[str] = set()
        self.pending_train: list[tuple[str, Train]] = []
        self.on_publish = None  # hook(sender, Publish) -> list[Publish] to deliver instead
        self.offline: set[str] = set()
        self.stalled: set[str] = set()  # devices whose training never finishes (until removed)

    # -- the in-memory broker --------------------------------------------------------

    def publish(self, sender: str, p: Publish) -> None:
        for msg in (self.on_publish(sender, p) if self.on_publish else [p]):
            if msg.retain:
                if msg.payload:
                    self.retained[msg.topic] = msg.payload
                else:
                    self.retained.pop(msg.topic, None)
            for client, filters in self.subs.items():
                if client not in self.offline and any(topic_matches(f, msg.topic) for f in filters):
                    self.queue.append((client, msg.topic, msg.payload))

    def run(self, client: str, actions: list) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self.publish(client, a)
            elif isinstance(a, Subscribe):
                self.subs.setdefault(client, set()).add(a.topic_filter)
                for t, p in list(self.retained.items()):
                    if topic_matches(a.topic_filter, t):
                        self.queue.append((client, t, p))
            elif isinstance(a, Unsubscribe):
                self.subs.get(client, set()).discard(a.topic_filter)
            elif isinstance(a, Train):
                self.pending_train.append((client, a))
            elif isinstance(a, Finished):
                self.finished.add(client)
            else:
                self.events.append(a)

    def connect(self, device: str) -> None:
        self.offline.discard(device)
        self.run(device, self.agents[device].on_connect(self.now))
        self.publish(device, Publish(self.topics.status(device), encode(PeerStatus(device, "online")), 1, True))

    def disconnect(self, device: str) -> None:
        """The broker notices the device is gone and publishes its last will."""
        self.offline.add(device)
        self.subs.pop(device, None)
        self.publish(device, Publish(self.topics.status(device), encode(PeerStatus(device, "offline")), 1, True))

    def start(self) -> None:
        self.run("coordinator", self.coord.start(self.now))
        for d in self.devices:
            self.connect(d)

    def step(self) -> bool:
        """Deliver one message or run one training; False when idle."""
        if self.queue:
            client, topic, payload = self.queue.popleft()
            if client == "coordinator":
                self.run(client, self.coord.on_message(topic, payload, self.now))
            elif client not in self.offline:
                self.run(client, self.agents[client].on_message(topic, payload, self.now))
            return True
        ready = [i for i, (c, _) in enumerate(self.pending_train) if c not in self.stalled]
        if ready:
            client, t = self.pending_train.pop(ready[0])
            if client in self.offline:
                return True
            new, n, metrics = self.trainers[client](t.params, t.hyper)
            self.run(client, self.agents[client].on_trained(t.round_id, new, n, metrics, self.now))
            return True
        return False

    def settle(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("simulation did not settle")

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.run("coordinator", self.coord.tick(self.now))
        for d, a in self.agents.items():
            if d not in self.offline:
                self.run(d, a.tick(self.now))
        self.settle()

    def closed(self) -> list[RoundClosed]:
        return [e for e in self.events if isinstance(e, RoundClosed)]
