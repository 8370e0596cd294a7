"""What one ``--metrics-port`` scrape shows: plain values, copied from a run's counters.

Apart from :mod:`dispatcher.commands.metrics` (the flags, the server's start) and
:mod:`dispatcher.commands.metrics_text` (the Prometheus families), which both read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """What one scrape shows: plain values copied from the run's counters."""

    attempts: int
    retries: int
    rate_limited: int
    in_flight: int
    answers: Mapping[int, int]  # HTTP status -> attempts answered so (0: no answer)
    latency_counts: Sequence[int] = ()  # per LATENCY_BOUNDS_MS bucket, the last one above all
    latency_sum_ms: float = 0.0
    gate_rate: float | None = None  # the target rate now, requests (load: arrivals) per s
    records: Mapping[str, int] | None = None  # final envelopes by delivery (send, load)
    instances: Mapping[str, int] | None = None  # create: instances by outcome
    pauses: int | None = None
    paused_s: float | None = None
    arrivals: int | None = None  # load
    dropped: int | None = None  # load
    elapsed_s: float = 0.0


SnapshotSource = Callable[[], Snapshot | None]
"""Returns the run's snapshot, or None before the run has its counters."""
