"""Hierarchical aggregation: an edge coordinator that is one device to the level above.

Theory of operation
-------------------
An edge site (a farm, a building) runs its own broker and coordinator for its
local devices. Upstream it is a single device: :class:`EdgeTrainer` implements
the device agent's :class:`~fedsync.device_agent.trainer.Trainer` protocol, so the
ordinary :class:`~fedsync.device_agent.service.AgentHost` carries it — the same
manifest, outbox, shards, receipts and last will as any phone.

``fit(params)`` hands the upstream model to the edge's coordinator core
(``adopt``: driven mode, one round per call), waits for that round to commit and
returns the edge's result: the weighted mean of its devices' models and, as
``num_samples``, their total sample count. The root's FedAvg then computes
``sum_e W_e (mean_e - g) / sum_e W_e = sum_k n_k (w_k - g) / sum_k n_k``: exactly
flat FedAvg over every device (tests/test_hierarchy.py checks it to float
tolerance), while the root sees one upload per edge instead of one per device.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from fedsync.coordinator.core import RoundClosed
from fedsync.coordinator.service import CoordinatorService
from fedsync.trainer_api import EvalResult, FitResult
from fedsync.params import flatten, unflatten


class EdgeRoundFailed(RuntimeError):
    """The edge's local round was abandoned (below quorum at its deadline)."""


class EdgeTrainer:
    """An edge coordinator seen from upstream as one device's trainer.

    ``service`` must run a core built with ``driven=True``; its ``on_event`` is
    chained, not replaced.
    """

    def __init__(self, service: CoordinatorService, timeout: float = 600.0) -> None:
        self.service = service
        self.timeout = timeout
        self._lock = threading.Lock()
        self._result: RoundClosed | None = None
        self._done = threading.Event()
        previous = service.on_event

        def on_event(event: object) -> None:
            if previous is not None:
                previous(event)
            if isinstance(event, RoundClosed):
                with self._lock:
                    self._result = event
                self._done.set()

        service.on_event = on_event

    def fit(self, params: Mapping[str, np.ndarray], hyper: Mapping[str, float], rng: np.random.Generator) -> FitResult:
        spec = self.service.core.spec
        vector = flatten(params, spec)
        self._done.clear()
        self.service.call(lambda core, now: core.adopt(vector, dict(hyper), now))
        if not self._done.wait(self.timeout):
            raise EdgeRoundFailed(f"edge round did not close within {self.timeout} s")
        with self._lock:
            event = self._result
        if event is None or event.outcome != "committed" or event.vector is None:
            raise EdgeRoundFailed(f"edge round {event.round_id if event else '?'} was {event.outcome if event else '?'}")
        return FitResult(unflatten(event.vector, spec), max(1, event.total_samples),
                         dict(event.metrics, edge_devices=float(len(event.accepted))))

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvalResult:
        raise NotImplementedError("an edge has no test data of its own; evaluate at the devices")
