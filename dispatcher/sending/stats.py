"""Run-wide counters, updated by the engine, read by the progress view and the summary."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from dispatcher.model import Delivery, Envelope
from dispatcher.results.envelopes import STATUS_TEXT

# Upper bounds (ms) of the latency buckets that --metrics-port serves as a Prometheus
# histogram: prometheus_client's default buckets (5 ms to 10 s), one more for 30 s.
LATENCY_BOUNDS_MS: Final = (
    5,
    10,
    25,
    50,
    75,
    100,
    250,
    500,
    750,
    1000,
    2500,
    5000,
    7500,
    10000,
    30000,
)


class LatencyBuckets:
    """Counts of latencies at or under each of :data:`LATENCY_BOUNDS_MS` (the last slot:
    above them all), plus their sum. One bisect and two additions per latency: kept always,
    so that a scrape reads them and the run pays nothing extra for being watched."""

    __slots__ = ("counts", "sum_ms")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.sum_ms = 0.0

    def add(self, ms: float) -> None:
        self.counts[bisect_left(LATENCY_BOUNDS_MS, ms)] += 1
        self.sum_ms += ms

    def remove(self, ms: float) -> None:
        self.counts[bisect_left(LATENCY_BOUNDS_MS, ms)] -= 1
        self.sum_ms -= ms


def status_class(status: int | None) -> str:
    """``2xx`` … ``5xx`` for an HTTP status, ``none`` when no answer came."""
    return "none" if status is None else f"{status // 100}xx"


@dataclass(slots=True)
class RunStats:
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    records: int = 0  # envelopes written
    attempts: int = 0  # requests that left or tried to
    retries: int = 0
    rate_limited: int = 0  # 429 answers
    pauses: int = 0  # run-wide pauses (429 Retry-After, spent budget)
    paused_s: float = 0.0
    disk_held_s: float = 0.0  # first requests held while envelopes waited for the disk
    in_flight: int = 0
    deliveries: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # final status; "none" without answer
    errors: Counter[str] = field(default_factory=Counter)  # "kind" or "kind/code"
    skipped: Counter[str] = field(default_factory=Counter)  # resume: reason -> records
    crashed_unknown: int = 0  # records a crashed run had started, now marked unknown
    crashed_unreadable: int = 0  # journal lines of a crashed run torn before their key
    write_error: str | None = None  # the results could not be written: the run stopped
    stop_reason: str | None = None
    # The run stopped because the target refused its connections before any was accepted
    # (nothing listens there): the reason, also in stop_reason.
    unreachable: str | None = None
    locked_out_s: float | None = None  # a 429 asked for a longer wait than allowed: stopped
    interrupted: bool = False
    coordination: str | None = None  # --redis: None while connected, else what is wrong
    coordination_dropped: int = 0  # --job: envelopes dropped, another process's was final
    # One line each: an end-of-run step on the disk that failed after the envelopes were
    # durable (a journal or lock file that could not be removed); the run's outcome stands.
    warnings: list[str] = field(default_factory=list)
    # --instances-of: the GETs the listing spent from the same gate, apart from the sends.
    list_requests: int = 0  # pages of the list endpoint
    read_requests: int = 0  # one instance's steps (--waiting-for)
    listed: int = 0  # instances the list endpoint named
    # Latencies of the last attempts, kept only as a running sum for the summary's mean.
    latency_sum_ms: float = 0.0
    latency_count: int = 0
    latency: LatencyBuckets = field(default_factory=LatencyBuckets)
    # Every attempt's answer by HTTP status (0: no answer came), for --metrics-port.
    answers: Counter[int] = field(default_factory=Counter)

    def record(self, env: Envelope) -> None:
        # Once per envelope: the status's text from a table built once, not str() each time.
        self.records += 1
        self.deliveries[env.delivery.value] += 1
        status = env.status
        if status is None:
            self.statuses["none"] += 1  # no answer
        else:
            self.statuses[STATUS_TEXT.get(status) or str(status)] += 1
        error = env.error
        if error is not None:
            kind = error.kind.value
            if error.code is not None:
                kind = f"{kind}/{error.code}"
            self.errors[kind] += 1
        latency = env.latency_ms
        if latency is not None:
            self.latency_sum_ms += latency
            self.latency_count += 1
            self.latency.add(latency)

    def unrecord(self, env: Envelope) -> None:
        """Take back :meth:`record` of ``env``: its envelope is not written after all (a
        --job leaves a record that is not final to another process or the next run)."""
        self.records -= 1
        self.deliveries[env.delivery.value] -= 1
        self.statuses["none" if env.status is None else str(env.status)] -= 1
        if env.error is not None:
            label = env.error.kind.value
            if env.error.code is not None:
                label = f"{label}/{env.error.code}"
            self.errors[label] -= 1
        for counter in (self.deliveries, self.statuses, self.errors):
            for name in [name for name, n in counter.items() if n <= 0]:
                del counter[name]
        if env.latency_ms is not None:
            self.latency_sum_ms -= env.latency_ms
            self.latency_count -= 1
            self.latency.remove(env.latency_ms)

    @property
    def confirmed(self) -> int:
        return self.deliveries[Delivery.CONFIRMED.value]

    @property
    def failed(self) -> int:
        return self.records - self.confirmed

    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return max(end - self.started, 1e-9)
