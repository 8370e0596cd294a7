"""The Prometheus side of ``--metrics-port`` (imports ``prometheus_client``, the extra
``metrics``): one custom collector that turns a :class:`~dispatcher.commands.metrics.Snapshot`
into metric families at each scrape, in a private registry."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dispatcher.commands.metrics_snapshot import Snapshot, SnapshotSource
from dispatcher.model import Delivery
from dispatcher.sending.stats import LATENCY_BOUNDS_MS, status_class

PREFIX = "dispatcher_"
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")
CREATE_OUTCOMES = ("created", "exists", "rejected", "unknown")


class RunCollector(Collector):
    __slots__ = ("_source",)

    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        snap = self._source()
        if snap is None:
            return
        yield from families(snap)


def families(snap: Snapshot) -> Iterator[Metric]:
    if snap.records is not None:
        records = CounterMetricFamily(
            f"{PREFIX}records",
            "Records with their final envelope written, by delivery",
            labels=["delivery"],
        )
        # Every state from the start, so that rate() sees a series go from 0.
        for state in Delivery:
            records.add_metric([state.value], snap.records.get(state.value, 0))
        yield records
    if snap.instances is not None:
        instances = CounterMetricFamily(
            f"{PREFIX}instances",
            "create: instances settled, by outcome",
            labels=["outcome"],
        )
        for outcome in CREATE_OUTCOMES:
            instances.add_metric([outcome], snap.instances.get(outcome, 0))
        yield instances
    yield CounterMetricFamily(
        f"{PREFIX}attempts", "Requests that left or tried to (retries included)", snap.attempts
    )
    by_class: Counter[str] = Counter()
    for status, n in snap.answers.items():
        by_class[status_class(status or None)] += n
    answers = CounterMetricFamily(
        f"{PREFIX}answers",
        "Attempts by the HTTP status class of their answer (none: no answer came)",
        labels=["status_class"],
    )
    for cls in STATUS_CLASSES:
        answers.add_metric([cls], by_class.get(cls, 0))
    yield answers
    yield CounterMetricFamily(f"{PREFIX}rate_limited", "Answers with HTTP 429", snap.rate_limited)
    yield CounterMetricFamily(f"{PREFIX}retries", "Attempts after a record's first", snap.retries)
    yield GaugeMetricFamily(f"{PREFIX}in_flight", "Requests sent and not answered", snap.in_flight)
    if snap.gate_rate is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}gate_rate",
            "The rate the run aims at now, per second (absent: unlimited)",
            snap.gate_rate,
        )
    if snap.latency_counts:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(LATENCY_BOUNDS_MS, snap.latency_counts, strict=False):
            total += n
            buckets.append((_le(bound), total))
        total += snap.latency_counts[-1]
        buckets.append(("+Inf", total))
        yield HistogramMetricFamily(
            f"{PREFIX}request_latency_seconds",
            "Latency of each record's last attempt (load: of each request)",
            buckets=buckets,
            sum_value=snap.latency_sum_ms / 1000.0,
        )
    if snap.pauses is not None:
        yield CounterMetricFamily(
            f"{PREFIX}pauses", "Run-wide pauses (a 429's Retry-After, a spent budget)", snap.pauses
        )
    if snap.paused_s is not None:
        yield CounterMetricFamily(
            f"{PREFIX}paused_seconds", "Seconds the pauses asked for", snap.paused_s
        )
    if snap.arrivals is not None:
        yield CounterMetricFamily(
            f"{PREFIX}arrivals", "load: arrivals the schedule released", snap.arrivals
        )
    if snap.dropped is not None:
        yield CounterMetricFamily(
            f"{PREFIX}dropped", "load: arrivals dropped, no idle worker", snap.dropped
        )
    yield GaugeMetricFamily(
        f"{PREFIX}elapsed_seconds", "Seconds since the run began", snap.elapsed_s
    )


def _le(bound_ms: int) -> str:
    return repr(bound_ms / 1000.0)


def serve(host: str, port: int, source: SnapshotSource) -> tuple[Any, threading.Thread]:
    """Listen on ``host:port`` in a daemon thread; raises OSError when it cannot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(source))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread
