"""Prometheus metrics for a running coordinator, without touching the service.

Theory of operation
-------------------
:func:`serve_metrics` attaches to a :class:`fedsync.coordinator.service.CoordinatorService`
from the outside, in two ways:

* a custom collector, registered on its own ``CollectorRegistry`` (never the
  global one, so two coordinators in one process, or a test, cannot collide),
  reads ``service.core.stats`` and ``service.core.online`` **at scrape time**.
  The core's counters stay the one source of truth; nothing is counted twice
  and nothing can drift. The counters are plain ints and a ``Counter`` that
  the service thread mutates; each is read once per scrape with an operation
  that holds the GIL throughout (``dict(counter)``, ``len(set)``), so a scrape
  never sees a dict change size under it.
* a chained ``service.on_event`` handler observes ``RoundClosed`` events into
  the round-duration histogram, then calls whatever handler was installed
  before. If someone replaces ``service.on_event`` later (the CLI sets its
  own), the next scrape notices and chains onto the new handler, with a
  ``metrics_hook_rechained`` warning: rounds closed in between are missing from
  the histogram, but the counters are unaffected. Install the metrics last to
  avoid that.

Counters restored from a checkpoint after a restart continue from the
checkpointed values; work done after the last checkpoint and before a crash is
counted again when the journal is replayed, so a counter can step back after a
``kill -9``. Prometheus treats any decrease as a counter reset, so ``rate()``
stays correct.

Every metric name, its type and labels are listed in ``docs/operations.md``.

>>> # server = serve_metrics(service, port=9464)   # after service.on_event is set
>>> # ... curl http://127.0.0.1:9464/metrics ...
>>> # server.stop()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedsync.coordinator.core import RoundClosed
from fedsync.errors import OperatorError
from fedsync.log import log_event

log = logging.getLogger("fedsync.metrics")

# Rounds last from under a second (loopback labs) to tens of minutes (phones on cellular,
# round_timeout up to ~1 h); buckets span that range roughly x2-x2.5 apart.
ROUND_DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)


class CoordinatorCollector(Collector):
    """Turns a service's ``core.stats`` and ``core.online`` into metric families at scrape time."""

    def __init__(self, service: Any, federation: str) -> None:
        self._service = service
        self._federation = federation
        self.before_collect = None  # callable run at the start of each scrape (hook check)

    def collect(self) -> Iterator[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        core = self._service.core
        s = core.stats
        reasons = dict(s.rejected_by_reason)  # one GIL-held copy: the service thread may add keys
        online = len(core.online)
        r = core.round  # read once: the service thread replaces it when a round closes

        rounds = CounterMetricFamily("fedsync_rounds", "Rounds closed, by outcome.", labels=["outcome"])
        rounds.add_metric(["committed"], s.rounds_committed)
        rounds.add_metric(["abandoned"], s.rounds_abandoned)
        yield rounds
        yield CounterMetricFamily("fedsync_updates_accepted", "Updates counted into an aggregate "
                                  "(complete, verified, first per device and round).", value=s.updates_accepted)
        yield CounterMetricFamily("fedsync_updates_refused", "Complete, verified updates refused by policy "
                                  "(norm bound, sample-count bound, staleness); reasons are in "
                                  "fedsync_shards_rejected's reason label.", value=s.updates_refused)
        yield CounterMetricFamily("fedsync_shards_accepted", "Update shards newly held.", value=s.shards_accepted)
        yield CounterMetricFamily("fedsync_duplicate_shards", "Update shard deliveries dropped as duplicates "
                                  "(QoS 1 redeliveries, device resends, late redeliveries).",
                                  value=s.duplicates_dropped)
        rejected = CounterMetricFamily("fedsync_shards_rejected", "Inputs dropped as invalid, by reason "
                                       "(ProtocolError reasons; see docs/protocol.md).", labels=["reason"])
        for reason in sorted(reasons):
            rejected.add_metric([reason], reasons[reason])
        yield rejected
        traffic = CounterMetricFamily("fedsync_bytes", "MQTT payload bytes: in = update shards received, "
                                      "out = everything the coordinator published.", labels=["direction"])
        traffic.add_metric(["in"], s.bytes_in)
        traffic.add_metric(["out"], s.bytes_out)
        yield traffic
        yield CounterMetricFamily("fedsync_devices_offline_detected", "Online -> offline transitions "
                                  "(last wills and clean exits).", value=s.devices_offline_detected)
        yield CounterMetricFamily("fedsync_receipts_suppressed", "Rejected receipts about bad input not sent: "
                                  "at most one per device per second.", value=s.receipts_suppressed)

        yield GaugeMetricFamily("fedsync_devices_online", "Devices whose retained status is online.", value=online)
        yield GaugeMetricFamily("fedsync_model_version", "Version of the current global model.", value=core.version)
        yield GaugeMetricFamily("fedsync_round_open", "1 while a round is open, else 0.", value=int(r is not None))
        yield GaugeMetricFamily("fedsync_round_id", "Id of the open round, or of the last closed one.",
                                value=r.manifest.round_id if r is not None else core.closed_through)
        yield GaugeMetricFamily("fedsync_round_selected_devices", "Devices selected for the open round (0 if none).",
                                value=len(r.selected) if r is not None else 0)
        yield GaugeMetricFamily("fedsync_round_accepted_updates", "Updates accepted so far in the open round.",
                                value=len(r.assembler.accepted_devices) if r is not None else 0)
        yield GaugeMetricFamily("fedsync_finished", "1 once the configured number of rounds has committed.",
                                value=int(core.finished))
        link = getattr(self._service, "link", None)
        if link is not None:
            yield GaugeMetricFamily("fedsync_broker_connected", "1 while the coordinator's MQTT session is up.",
                                    value=int(link.connected.is_set()))
        yield from _broker_families(self._service)
        info = GaugeMetricFamily("fedsync_coordinator_info", "Constant 1, labelled with this coordinator's identity.",
                                 labels=["federation", "incarnation"])
        info.add_metric([self._federation, str(core.incarnation)], 1)
        yield info


def _broker_families(service: Any) -> Iterator[Metric]:
    """The service's own view of the broker (coordinator/broker_watch.py), if it has one."""
    watch = getattr(service, "watch", None)
    if watch is None:
        return
    b = watch.stats
    yield CounterMetricFamily("fedsync_retained_audits", "Audits of the broker's retained manifest and model "
                              "(one after every connection).", value=b.retained_audits)
    yield CounterMetricFamily("fedsync_retained_republished", "Retained manifest, model or delta shards the "
                              "broker lacked or held with other bytes, republished.", value=b.retained_republished)
    yield CounterMetricFamily("fedsync_retained_cleared", "Retained model or delta shards deleted that the "
                              "coordinator no longer publishes (an old version, a stale delta).",
                              value=b.retained_cleared)
    yield CounterMetricFamily("fedsync_retained_uploads_cleared", "Update messages a device published retained: "
                              "ignored and deleted from the broker.", value=b.retained_uploads_cleared)
    yield CounterMetricFamily("fedsync_shard_gaps", "Update shards found missing when a later shard of the same "
                              "update arrived (dropped between device and coordinator, e.g. by the broker's "
                              "queue limits).", value=watch.gaps.gaps)
    yield CounterMetricFamily("fedsync_shard_gaps_filled", "Of fedsync_shard_gaps, shards that arrived later "
                              "(the device re-sent them after a partial receipt).", value=watch.gaps.filled)
    yield CounterMetricFamily("fedsync_device_floods", "(device, round) pairs in which a device sent more than "
                              "4 x its update's shards + 16 messages (logged as device_flooding).",
                              value=b.flooding_reports)


class MetricsServer:
    """A running ``/metrics`` endpoint for one coordinator service. Create with :func:`serve_metrics`."""

    def __init__(self, service: Any, port: int, host: str = "127.0.0.1") -> None:
        self.service = service
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = CoordinatorCollector(service, service.core.topics.federation)
        self.collector.before_collect = self._ensure_hooked
        self.registry.register(self.collector)
        self.round_duration = Histogram(
            "fedsync_round_duration_seconds", "Manifest issued to round closed, by outcome (coordinator clock).",
            ["outcome"], registry=self.registry, buckets=ROUND_DURATION_BUCKETS)
        for outcome in ("committed", "abandoned"):
            self.round_duration.labels(outcome)  # export zeros from the start, so rate() has a baseline
        self.last_round_closed = Gauge(
            "fedsync_last_round_closed_timestamp_seconds", "Coordinator-clock time the last round closed "
            "(0 until one closes while this endpoint runs): alert when it stops moving.", registry=self.registry)
        self._lock = threading.Lock()
        self._previous = None  # the handler we chained onto
        self._hook = self._make_hook()
        self._install_hook()
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # the port is the operator's to fix: one line, not a traceback
            with self._lock:
                self.service.on_event = self._previous  # leave the service as we found it
            reason = exc.strerror or str(exc)
            raise OperatorError(f"metrics port {port}: {reason[:1].lower()}{reason[1:]}") from None
        self.host = host
        self.port = int(self._httpd.server_address[1])  # the real port when 0 was asked for
        log_event(log, "metrics_listening", logging.DEBUG, url=self.url)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def _make_hook(self):
        def hook(event: object) -> None:
            # Ours first: whoever chained before us may block or raise; the service guards the call.
            if isinstance(event, RoundClosed):
                self.round_duration.labels(event.outcome).observe(max(0.0, event.closed_at - event.started_at))
                self.last_round_closed.set(event.closed_at)
            previous = self._previous
            if previous is not None:
                previous(event)
        return hook

    def _install_hook(self) -> None:
        with self._lock:
            self._previous = self.service.on_event
            self.service.on_event = self._hook

    def _ensure_hooked(self) -> None:
        current = self.service.on_event
        if current is not self._hook and self._hook is not None:
            log_event(log, "metrics_hook_rechained", logging.WARNING,
                      note="service.on_event was replaced after serve_metrics; round durations in between are lost")
            self._install_hook()

    def stop(self) -> None:
        """Close the endpoint and unhook from the service (restoring the handler we chained onto)."""
        with self._lock:
            if self.service.on_event is self._hook:
                self.service.on_event = self._previous
            self._hook = None  # type: ignore[assignment]
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


def serve_metrics(service: Any, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve Prometheus metrics for ``service`` on ``http://host:port/metrics``.

    ``port=0`` picks a free port (``MetricsServer.port``). Call it after
    ``service.on_event`` is set; the existing handler keeps being called.
    A port that cannot be bound raises :class:`fedsync.errors.OperatorError`.

    >>> # server = serve_metrics(service, 9464); ...; server.stop()
    """
    return MetricsServer(service, port, host)
