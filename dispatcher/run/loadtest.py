"""Open-model load tests: arrivals on a schedule, a fixed pool of workers, drops counted.

A load test measures; it does not try to get events through. So, unlike ``send``:

- arrivals come at the profile's rate whatever the server does (an *open* model, like
  k6's arrival-rate executors and vegeta's attack): a slow server does not slow the
  arrivals down, which is what hides latency in closed-loop tools (coordinated omission);
- an arrival that finds every worker busy is **dropped and counted**, not queued: a queue
  would delay it and its latency would not be the server's (k6's ``dropped_iterations``);
- nothing is retried and a 429 does not pause anything: each arrival is one request and
  its envelope says what the server answered, 429 included.

Arrival times are those where the integral of the rate reaches a whole number: for a
constant rate r the k-th arrival is at k / r; a ramp is piecewise linear and the times
come from solving the quadratic of each stage, so ``10/s:200/s:60s`` sends
(10 + 200) / 2 * 60 = 6300 requests, ever closer together.

Each arrival sends the run's one event type to the next instance (round robin) with the
next body (cycled), through the transport of the run's ``--target`` (the same as
``send``'s: :func:`~dispatcher.run.runner.transport_for`), and its envelope goes to
the results sink like ``send``'s, so ``report`` reads it.
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TextIO

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dispatcher.clients.base import Transport
from dispatcher.clients.targets import DEFAULT_RELAY_BATCH, TARGETS, Target, spec_of
from dispatcher.model import Delivery, Envelope, Event
from dispatcher.report.plot import LoadOverlay, Points
from dispatcher.report.summary import Breach, Report, ReportBuilder, Threshold, check_thresholds
from dispatcher.results import envelopes
from dispatcher.results.sinks import Sink, open_sink
from dispatcher.run.runner import drain_to_sink, transport_for
from dispatcher.run.settings import Credentials, HttpClient, Rate, parse_duration, parse_rate
from dispatcher.sending.stats import LatencyBuckets

__all__ = [
    "DEFAULT_CONCURRENCY",
    "LoadProfile",
    "LoadResult",
    "LoadSettings",
    "LoadStats",
    "Stage",
    "live_view",
    "parse_stage_rate",
    "run_load",
    "status_line",
]

DEFAULT_CONCURRENCY: Final = 64
DEFAULT_RESULTS: Final = "load-results.jsonl"
LIVE_WINDOW: Final = 5.0  # seconds of answers the live p50/p99 are taken over
LIVE_INTERVAL: Final = 1.0
_AUTH_STATUSES: Final = frozenset({401, 403})


# --- the arrival profile -------------------------------------------------------------------


def parse_stage_rate(text: str) -> float:
    """Requests per second from ``50/s``, ``3000/1m``, ``50``; ``0`` is allowed (a ramp
    may start or end at rest)."""
    cleaned = text.strip().lower()
    if cleaned in ("0", "0/s", "0.0", "0.0/s"):
        return 0.0
    rate = parse_rate(text)
    if not isinstance(rate, Rate):
        raise ValueError(f"{text!r}: a load test needs a number of requests, such as 50/s")
    return rate.per_second


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    """The rate goes linearly from ``start`` to ``end`` requests/s over ``seconds``."""

    start: float
    end: float
    seconds: float

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"a stage's {name} rate must be 0 or more, got {value!r}")
        if not math.isfinite(self.seconds) or self.seconds <= 0:
            raise ValueError(f"a stage must last longer than zero, got {self.seconds!r}s")

    @property
    def arrivals(self) -> float:
        return (self.start + self.end) / 2 * self.seconds

    @classmethod
    def parse(cls, text: str) -> Stage:
        """``10/s:200/s:60s`` (a ramp) or ``200/s:30s`` (a steady stage)."""
        parts = text.strip().split(":")
        try:
            if len(parts) == 3:
                start, end = parse_stage_rate(parts[0]), parse_stage_rate(parts[1])
            elif len(parts) == 2:
                start = end = parse_stage_rate(parts[0])
            else:
                raise ValueError("expected START:END:DURATION or RATE:DURATION")
            seconds = parse_duration(parts[-1])
            return cls(start=start, end=end, seconds=seconds)
        except ValueError as exc:
            raise ValueError(
                f"--ramp {text!r}: {exc} (stages look like 10/s:200/s:60s or 200/s:30s)"
            ) from None


@dataclass(frozen=True, slots=True)
class LoadProfile:
    """Stages run one after the other; the rate is piecewise linear over them."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a load profile needs at least one stage")

    @classmethod
    def constant(cls, rate: float, seconds: float) -> LoadProfile:
        return cls((Stage(start=rate, end=rate, seconds=seconds),))

    @classmethod
    def parse_ramp(cls, specs: Sequence[str]) -> LoadProfile:
        """Stages from ``--ramp`` values; each may hold several, comma-separated."""
        return cls(tuple(Stage.parse(s) for spec in specs for s in spec.split(",") if s.strip()))

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def expected_arrivals(self) -> int:
        return sum(1 for _ in self.arrivals())

    @property
    def mean_rate(self) -> float:
        return sum(s.arrivals for s in self.stages) / self.seconds

    def rate_at(self, t: float) -> float:
        """The target rate ``t`` seconds in (0 outside the profile)."""
        begin = 0.0
        for s in self.stages:
            if begin <= t <= begin + s.seconds:
                return s.start + (s.end - s.start) * (t - begin) / s.seconds
            begin += s.seconds
        return 0.0

    def points(self) -> list[tuple[float, float]]:
        """(seconds, rate) at every stage boundary: the target line of a plot."""
        out: list[tuple[float, float]] = []
        t = 0.0
        for s in self.stages:
            out += [(t, s.start), (t + s.seconds, s.end)]
            t += s.seconds
        return out

    def describe(self) -> str:
        def rate(r: float) -> str:
            return f"{r:g}/s"

        parts = [
            f"{rate(s.start)} for {s.seconds:g}s"
            if s.start == s.end
            else f"{rate(s.start)} → {rate(s.end)} over {s.seconds:g}s"
            for s in self.stages
        ]
        return ", then ".join(parts)

    def arrivals(self) -> Iterator[float]:
        """Arrival times in seconds from the start, in order."""
        t0 = 0.0
        done = 0.0  # arrivals the earlier stages account for (a real number)
        k = 0
        for s in self.stages:
            end = done + s.arrivals
            slope = (s.end - s.start) / s.seconds
            # 1e-9: a stage of exactly n arrivals must not gain an n+1-th from rounding.
            while k < end - 1e-9:
                x = k - done
                if x <= 0:
                    tau = 0.0
                elif slope == 0:
                    tau = x / s.start
                else:
                    # Solves start*tau + slope/2*tau^2 = x in the form that stays exact
                    # when the slope is tiny or negative (no cancellation).
                    disc = max(s.start * s.start + 2 * slope * x, 0.0)
                    tau = 2 * x / (s.start + math.sqrt(disc))
                yield t0 + min(tau, s.seconds)
                k += 1
            done = end
            t0 += s.seconds


# --- settings and live statistics ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSettings:
    """Everything a load test needs, checked by whoever built it (see load_cmd)."""

    workflow: str
    event_type: str
    instances: tuple[str, ...]
    bodies: tuple[bytes | None, ...] = (None,)  # cycled; (None,): requests carry no body
    profile: LoadProfile
    concurrency: int = DEFAULT_CONCURRENCY
    # Where the requests go (dispatcher.clients.targets): only "api" needs an account id
    # and credentials, only "relay" its shared secret.
    target: Target = "api"
    account_id: str | None = None
    base_url: str
    credentials: Credentials | None = None
    relay_secret: str | None = field(default=None, repr=False, compare=False)
    batch_size: int = DEFAULT_RELAY_BATCH  # events per POST /events, target relay only
    http_client: HttpClient = "fast"
    timeout: float = 30.0
    connect_timeout: float = 10.0
    results: str = DEFAULT_RESULTS
    overwrite: bool = False
    thresholds: tuple[Threshold, ...] = ()

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("a load test needs at least one instance id")
        if not self.bodies:
            raise ValueError("bodies must hold at least one body (None for no body)")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.target == "api" and (self.account_id is None or self.credentials is None):
            raise ValueError("the api target needs an account id and credentials")
        if self.target == "relay" and not self.relay_secret:
            raise ValueError("the relay target needs the relay's secret")


@dataclass(slots=True)
class LoadStats:
    """Counters the workers and the scheduler update, read by the live view."""

    arrivals: int = 0
    sent: int = 0
    dropped: int = 0
    in_flight: int = 0
    answered: int = 0
    confirmed: int = 0
    rate_limited: int = 0
    max_lag_s: float = 0.0  # how late the scheduler released an arrival, at worst
    t0_epoch: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    stop_reason: str | None = None
    interrupted: bool = False
    stdout_closed: bool = False  # --results - and the reader went away (`| head -1`)
    drop_times: array[float] = field(default_factory=lambda: array("d"))
    # (monotonic time answered, latency ms) of recent answers, for the live percentiles:
    # accepted (2xx) and rejected apart, as the thresholds judge them (a 429 comes back in
    # a fraction of a millisecond and would make a refusing server look fast).
    recent: deque[tuple[float, float]] = field(default_factory=deque)
    recent_rejected: deque[tuple[float, float]] = field(default_factory=deque)
    # For --metrics-port: envelopes by delivery, answers by status (0: none), latencies.
    deliveries: Counter[str] = field(default_factory=Counter)
    answers: Counter[int] = field(default_factory=Counter)
    latency: LatencyBuckets = field(default_factory=LatencyBuckets)

    @property
    def errors(self) -> int:
        return self.answered - self.confirmed

    def record(self, env: Envelope) -> None:
        self.answered += 1
        self.deliveries[env.delivery] += 1
        self.answers[env.status or 0] += 1
        if env.delivery is Delivery.CONFIRMED:
            self.confirmed += 1
        if env.status == 429:
            self.rate_limited += 1
        if env.latency_ms is not None:
            self.latency.add(env.latency_ms)
        if env.latency_ms is not None and env.status is not None:
            accepted = 200 <= env.status < 300
            (self.recent if accepted else self.recent_rejected).append(
                (time.monotonic(), env.latency_ms)
            )

    def window_percentiles(
        self, now: float, *, rejected: bool = False
    ) -> tuple[float | None, float | None]:
        """p50 and p99 of the accepted (2xx) answers of the last :data:`LIVE_WINDOW`
        seconds; of the other answers with ``rejected``."""
        recent = self.recent_rejected if rejected else self.recent
        while recent and recent[0][0] < now - LIVE_WINDOW:
            recent.popleft()
        if not recent:
            return None, None
        values = sorted(lat for _, lat in recent)
        n = len(values)
        # Nearest rank: the value at or below which p % of the answers fall.
        return values[max(math.ceil(0.5 * n) - 1, 0)], values[max(math.ceil(0.99 * n) - 1, 0)]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    stats: LoadStats
    report: Report
    points: Points
    overlay: LoadOverlay
    metrics: dict[str, float | None]
    breaches: list[Breach]


# --- the run --------------------------------------------------------------------------------


class _TeeSink:
    """Writes to the results sink and feeds the report and the plot on the way.

    With ``--results -`` the reader may go away (``| head -1``): ``on_gone`` is told once,
    later envelopes go nowhere, and the report and the plot still get every one.
    """

    __slots__ = ("_builder", "_gone", "_on_envelope", "_on_gone", "_points", "_sink")

    def __init__(
        self,
        sink: Sink,
        builder: ReportBuilder,
        points: Points,
        on_gone: Callable[[], None],
        on_envelope: Callable[[Envelope], None] | None = None,
    ) -> None:
        self._on_envelope = on_envelope
        self._sink = sink
        self._builder = builder
        self._points = points
        self._on_gone = on_gone
        self._gone = False

    def write(self, env: Envelope) -> None:
        if not self._gone:
            self._sink.write(env)
        self._builder.add(env)
        self._points.add(env)
        if self._on_envelope is not None:
            self._on_envelope(env)  # load --observe: it queues a read, never waits

    def _closed(self) -> None:
        if not self._gone:
            self._gone = True
            self._on_gone()

    async def flush(self) -> None:
        if self._gone:
            return
        try:
            await self._sink.flush()
        except BrokenPipeError:
            self._closed()

    async def aclose(self) -> None:
        if self._gone:
            return  # stdout: nothing to close, and a last flush would only fail again
        try:
            await self._sink.aclose()
        except BrokenPipeError:
            self._closed()


class LoadRun:
    """One load test. :meth:`stop` ends the arrivals; requests in flight still finish."""

    def __init__(
        self,
        settings: LoadSettings,
        *,
        transport: Transport | None = None,
        sink: Sink | None = None,
        stats: LoadStats | None = None,
        top: int = 10,
        on_envelope: Callable[[Envelope], None] | None = None,
    ) -> None:
        self._on_envelope = on_envelope
        self.settings = settings
        self.stats = stats if stats is not None else LoadStats()
        self._transport = transport
        self._sink = sink
        self._top = top
        self._arrivals_scope: anyio.CancelScope | None = None
        self._stop_requested = False
        # Unique per run: a results file appended to by two tests keeps their keys apart.
        self.run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)

    def stop(self, reason: str) -> None:
        if self.stats.stop_reason is None:
            self.stats.stop_reason = reason
        self._stop_requested = True
        if self._arrivals_scope is not None:
            self._arrivals_scope.cancel()

    def _stdout_closed(self) -> None:
        # The run goes on to its planned end: its report and plot are what a load test is
        # for, and they still get every envelope (unlike `send`, whose envelopes are the
        # record of what was delivered, and which stops).
        self.stats.stdout_closed = True

    async def run(self) -> LoadResult:
        settings = self.settings
        stats = self.stats
        builder = ReportBuilder(top=self._top)
        builder.start_run(settings.results)
        points = Points()
        own_tx = self._transport is None
        tx = transport_for(settings) if self._transport is None else self._transport
        sink = (
            self._sink
            if self._sink is not None
            else open_sink(settings.results, truncate=settings.overwrite)
        )
        tee = _TeeSink(sink, builder, points, self._stdout_closed, self._on_envelope)
        env_send, env_recv = anyio.create_memory_object_stream[Envelope](settings.concurrency * 4)
        # No buffer: send_nowait succeeds only if a worker is waiting, i.e. idle.
        work_send, work_recv = anyio.create_memory_object_stream[int](0)
        stats.started = time.monotonic()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain_to_sink, env_recv, tee)
                async with env_send, anyio.create_task_group() as workers:
                    # start(), not start_soon(): each worker is waiting for work before
                    # the first arrival, or that arrival would count as dropped.
                    for _ in range(settings.concurrency):
                        await workers.start(self._worker, tx, work_recv.clone(), env_send.clone())
                    work_recv.close()
                    await self._schedule(work_send)
        finally:
            stats.finished = time.monotonic()
            with anyio.CancelScope(shield=True):
                env_recv.close()
                await tee.aclose()
                if own_tx:
                    await tx.aclose()
        report = builder.build()
        metrics = dict(report.metrics())
        metrics["dropped"] = stats.dropped / stats.arrivals if stats.arrivals else None
        # The rate a load test is judged on is what it sent over its planned duration
        # (docs/load.md), neither the span of the answers nor first-to-last arrival, which
        # is one interval short: 10 arrivals at 5/s span 1.8 s, and 10 / 1.8 = 5.6/s.
        # A run stopped early is judged over the time it actually ran.
        elapsed = max(stats.finished - stats.started, 1e-9)
        stopped_early = stats.stop_reason is not None or stats.interrupted
        elapsed_plan = (
            min(settings.profile.seconds, elapsed) if stopped_early else (settings.profile.seconds)
        )
        metrics["rate"] = stats.sent / elapsed_plan if stats.sent else None
        return LoadResult(
            stats=stats,
            report=report,
            points=points,
            overlay=LoadOverlay(
                t0=stats.t0_epoch,
                target=settings.profile.points(),
                dropped=stats.drop_times,
            ),
            metrics=metrics,
            breaches=check_thresholds(settings.thresholds, metrics),
        )

    async def _schedule(self, work: MemoryObjectSendStream[int]) -> None:
        stats = self.stats
        async with work:
            with anyio.CancelScope() as scope:
                self._arrivals_scope = scope
                if self._stop_requested:
                    return
                start = anyio.current_time()
                stats.t0_epoch = time.time()
                for seq, offset in enumerate(self.settings.profile.arrivals()):
                    due = start + offset
                    now = anyio.current_time()
                    if due > now:
                        await anyio.sleep(due - now)
                        now = anyio.current_time()
                    # A late wake-up releases the arrivals it missed at once: their times
                    # are fixed by the schedule, not by how busy this process is.
                    stats.max_lag_s = max(stats.max_lag_s, now - due)
                    stats.arrivals += 1
                    try:
                        work.send_nowait(seq)
                    except anyio.WouldBlock:
                        stats.dropped += 1
                        stats.drop_times.append(time.time())

    async def _worker(
        self,
        tx: Transport,
        work: MemoryObjectReceiveStream[int],
        out: MemoryObjectSendStream[Envelope],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        settings = self.settings
        stats = self.stats
        instances, bodies = settings.instances, settings.bodies
        source = "load"
        async with work, out:
            task_status.started()
            async for seq in work:
                event = Event(
                    key=f"{self.run_id}-{seq:07d}",
                    source=source,
                    line=seq + 1,
                    workflow=settings.workflow,
                    instance_id=instances[seq % len(instances)],
                    event_type=settings.event_type,
                    body=bodies[seq % len(bodies)],
                )
                started_at = datetime.now(UTC)
                t0 = time.perf_counter()
                stats.sent += 1
                stats.in_flight += 1
                try:
                    outcome = await tx.send(event)
                finally:
                    stats.in_flight -= 1
                env = envelopes.for_outcome(
                    event,
                    outcome,
                    started_at=started_at,
                    finished_at=datetime.now(UTC),
                    elapsed_s=time.perf_counter() - t0,
                )
                stats.record(env)
                if outcome.stop_run is not None:
                    self.stop(outcome.stop_run)  # a setting that cannot work (relay/README.md)
                elif outcome.status in _AUTH_STATUSES and stats.confirmed == 0:
                    # Every request would get the same answer: measuring it is pointless.
                    self.stop(
                        f"credentials rejected (HTTP {outcome.status}: "
                        f"{outcome.message or 'no message'}); {spec_of(settings.target).auth_hint}"
                    )
                await out.send(env)


async def run_load(
    settings: LoadSettings,
    *,
    transport: Transport | None = None,
    sink: Sink | None = None,
    stats: LoadStats | None = None,
) -> LoadResult:
    """Run one load test to its end and return what it measured (the Python API)."""
    return await LoadRun(settings, transport=transport, sink=sink, stats=stats).run()


# --- the live view ----------------------------------------------------------------------------


def status_line(stats: LoadStats, profile: LoadProfile, rate_now: float, since: float) -> str:
    """One line of the live view; ``rate_now`` is the send rate over the last ``since`` s."""
    now = time.monotonic()
    elapsed = now - stats.started
    p50, p99 = stats.window_percentiles(now)
    _, rejected_p99 = stats.window_percentiles(now, rejected=True)

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f} ms"

    # The target over the same interval as the measured rate: compare like with like
    # while the rate ramps (the rate is linear within a stage, so the mean is exact there).
    target = (profile.rate_at(max(elapsed - since, 0.0)) + profile.rate_at(elapsed)) / 2
    err_pct = f"{stats.errors / stats.answered:.1%}" if stats.answered else "-"
    return (
        f"{min(elapsed, profile.seconds):4.0f}s/{profile.seconds:g}s  "
        f"rate {rate_now:6.1f}/s (target {target:,.1f}/s)  in flight {stats.in_flight:3d}  "
        f"2xx p50 {ms(p50)} p99 {ms(p99)}, rejected p99 {ms(rejected_p99)} "
        f"(last {LIVE_WINDOW:g}s)  errors {stats.errors:,} ({err_pct})  "
        f"429s {stats.rate_limited:,}  "
        f"dropped {stats.dropped:,}"
    )


async def live_view(
    stats: LoadStats, profile: LoadProfile, *, stream: TextIO = sys.stderr, rich: bool = False
) -> None:
    """Until cancelled: a line a second (plain), or one line redrawn in place (rich)."""
    last_sent, last_t = stats.sent, time.monotonic()

    def tick() -> str:
        nonlocal last_sent, last_t
        now = time.monotonic()
        since = max(now - last_t, 1e-9)
        rate_now = (stats.sent - last_sent) / since
        last_sent, last_t = stats.sent, now
        return status_line(stats, profile, rate_now, since)

    if not rich:
        while True:
            await anyio.sleep(LIVE_INTERVAL)
            print(f"load: {tick()}", file=stream, flush=True)
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    with Live(Text("load: starting"), console=Console(file=stream), transient=False) as live:
        while True:
            await anyio.sleep(LIVE_INTERVAL)
            # One line, cut to the terminal's width: a wrapped line redraws as a smear.
            live.update(Text(f"load: {tick()}", no_wrap=True, overflow="ellipsis"))
