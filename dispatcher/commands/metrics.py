"""``--metrics-port PORT``: live Prometheus text of a ``send``, ``load`` or ``create`` run.

The run's own counters (:class:`~dispatcher.sending.stats.RunStats`, the load test's
``LoadStats``, create's request counts) are read at each scrape into a :class:`Snapshot`;
nothing is added to the per-event path but what those counters keep anyway. The text is
served by ``prometheus_client`` (the optional extra ``metrics``) from a private registry,
in a daemon thread, on 127.0.0.1 unless ``--metrics-host`` says otherwise. No label holds
a URL, an id or a credential: only delivery states, status classes and create outcomes
(docs/metrics.md lists every metric).

Exit code 2 (usage) with one line on stderr: the extra is not installed, or the port
cannot be listened on (in use, not allowed, out of range).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from dispatcher.commands.metrics_snapshot import Snapshot, SnapshotSource
from dispatcher.model import UserError

if TYPE_CHECKING:
    from dispatcher.run.loadtest import LoadStats
    from dispatcher.sending.stats import RunStats

DEFAULT_HOST: Final = "127.0.0.1"
EXTRA_HINT: Final = "pip install 'cf-workflows-dispatcher[metrics]'"


class MetricsError(UserError):
    """``--metrics-port`` cannot be served: one line, exit 2."""

    exit_code = 2


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live metrics (docs/metrics.md)")
    group.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus text on http://HOST:PORT/metrics during the run "
        "(needs the 'metrics' extra)",
    )
    group.add_argument(
        "--metrics-host",
        default=DEFAULT_HOST,
        metavar="HOST",
        help=f"the address --metrics-port listens on (default: {DEFAULT_HOST}; the metrics "
        "hold no secret, but say how much a run sent)",
    )


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {port}")
    return port


@dataclass(slots=True)
class MetricsServer:
    """The running exposition server; :meth:`close` stops it."""

    _server: Any
    _thread: Any
    url: str

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start(args: argparse.Namespace, source: SnapshotSource, *, prog: str) -> MetricsServer | None:
    """Serve ``source`` when ``--metrics-port`` is given (else None). Raises
    :class:`MetricsError` when the extra is missing or the port cannot be had."""
    port: int | None = getattr(args, "metrics_port", None)
    if port is None:
        return None
    host: str = getattr(args, "metrics_host", DEFAULT_HOST)
    try:
        from dispatcher.commands import metrics_text
    except ImportError as exc:
        if exc.name != "prometheus_client":
            raise
        raise MetricsError(
            f"--metrics-port: needs prometheus-client, the 'metrics' extra: {EXTRA_HINT}"
        ) from None
    try:
        server, thread = metrics_text.serve(host, port, source)
    except OSError as exc:
        raise MetricsError(
            f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    except OverflowError as exc:  # a port the OS will not take
        raise MetricsError(f"--metrics-port {port}: {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/metrics"
    if not getattr(args, "quiet", False):
        print(f"{prog}: metrics on {url}", file=sys.stderr, flush=True)
    return MetricsServer(server, thread, url)


def of_run(stats: RunStats, gate_rate: float | None) -> Snapshot:
    """A ``send`` run's counters."""
    return Snapshot(
        attempts=stats.attempts,
        retries=stats.retries,
        rate_limited=stats.rate_limited,
        in_flight=stats.in_flight,
        answers=dict(stats.answers),
        latency_counts=list(stats.latency.counts),
        latency_sum_ms=stats.latency.sum_ms,
        gate_rate=gate_rate,
        records=dict(stats.deliveries),
        pauses=stats.pauses,
        paused_s=stats.paused_s,
        elapsed_s=stats.elapsed(),
    )


def of_load(stats: LoadStats, target_rate: float) -> Snapshot:
    """A load test's counters; one attempt per arrival sent, never a retry."""
    return Snapshot(
        attempts=stats.sent,
        retries=0,
        rate_limited=stats.rate_limited,
        in_flight=stats.in_flight,
        answers=dict(stats.answers),
        latency_counts=list(stats.latency.counts),
        latency_sum_ms=stats.latency.sum_ms,
        gate_rate=target_rate,
        records={str(k): v for k, v in dict(stats.deliveries).items()},
        arrivals=stats.arrivals,
        dropped=stats.dropped,
        elapsed_s=(stats.finished or time.monotonic()) - stats.started,
    )


def _unlimited() -> float | None:
    return None


@dataclass(slots=True)
class RunSource:
    """A ``send`` run's counters, once the run has them (its engine is built inside it)."""

    stats: RunStats | None = None
    gate_rate: Callable[[], float | None] = _unlimited

    def __call__(self) -> Snapshot | None:
        return None if self.stats is None else of_run(self.stats, self.gate_rate())


@dataclass(slots=True)
class LoadSource:
    """A load test's counters; the gate rate is the profile's target rate at this second."""

    rate_at: Callable[[float], float]
    stats: LoadStats | None = None

    def __call__(self) -> Snapshot | None:
        stats = self.stats
        if stats is None:
            return None
        return of_load(stats, self.rate_at(time.monotonic() - stats.started))
