"""The engine: source → bounded stream → fixed pool of workers → bounded stream → results.

Every task lives in one task group. Stages end by closing their send side, so the
results stream ends exactly when the last worker has written its last envelope.
The engine knows no file formats and no HTTP library: it gets batches of records, a
transport, a rate gate and a retry policy, and emits one envelope per record it finishes.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dispatcher.clients.base import Transport
from dispatcher.model import Envelope, ErrorKind, Event, Invalid, Outcome, Record
from dispatcher.results import envelopes
from dispatcher.sending.gate import RateGate
from dispatcher.sending.pacing import Pacer
from dispatcher.sending.policy import Final, RetryPolicy
from dispatcher.sending.stats import RunStats

_T = TypeVar("_T")

# 401/403 before any success means the credentials are wrong for every record: stop early.
_AUTH_STATUSES = frozenset({401, 403})


def _now() -> datetime:
    return datetime.now(UTC)


async def _put(stream: MemoryObjectSendStream[_T], item: _T) -> None:
    """Send without an event-loop trip when the buffer has room (send() checkpoints)."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


class GateStatsLike(Protocol):
    @property
    def pauses(self) -> int: ...

    @property
    def paused_s(self) -> float: ...


class Gate(Protocol):
    """What the engine needs of a gate: :class:`RateGate`, or a shared one (``--redis``)."""

    @property
    def stats(self) -> GateStatsLike: ...

    def ready(self) -> bool: ...

    async def acquire(self) -> None: ...

    def pause_for(self, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class StopRules:
    """When failures stop a run early (exit 3), leaving the rest for ``--resume``.

    Failures are sent records whose final envelope is not confirmed; invalid input lines
    do not count (they say nothing about the API).
    """

    max_failures: int | None = None
    max_error_rate: float | None = None  # a fraction, 0 < rate <= 1
    window: int = 100  # the error rate is taken over this many most recent sent records

    def __post_init__(self) -> None:
        if self.max_failures is not None and self.max_failures < 1:
            raise ValueError("--max-failures must be at least 1")
        if self.max_error_rate is not None and not 0 < self.max_error_rate <= 1:
            raise ValueError("--max-error-rate must be above 0% and at most 100%")
        if self.window < 1:
            raise ValueError("--error-window must be at least 1")


class FailureWatch:
    """Applies :class:`StopRules` to a stream of envelopes of sent records."""

    __slots__ = ("_failures", "_recent", "_recent_failed", "_rules")

    def __init__(self, rules: StopRules) -> None:
        self._rules = rules
        self._recent: deque[bool] = deque(maxlen=rules.window)
        self._recent_failed = 0
        self._failures = 0

    def check(self, env: Envelope) -> str | None:
        """Take one envelope into account; the reason to stop, if a rule is now broken."""
        if env.attempts == 0:
            return None  # invalid input or never sent: says nothing about the API
        rules = self._rules
        failed = not env.ok
        self._failures += failed
        if rules.max_failures is not None and self._failures >= rules.max_failures:
            return f"--max-failures {rules.max_failures} reached"
        if rules.max_error_rate is None:
            return None
        recent = self._recent
        if len(recent) == recent.maxlen and recent[0]:
            self._recent_failed -= 1
        recent.append(failed)
        self._recent_failed += failed
        if len(recent) == recent.maxlen:
            rate = self._recent_failed / len(recent)
            if rate > rules.max_error_rate:
                return (
                    f"--max-error-rate {rules.max_error_rate:.1%} exceeded: "
                    f"{rate:.1%} of the last {len(recent)} sent records failed"
                )
        return None


class _Active:
    """A record between its first attempt and its envelope (for a hard stop's accounting)."""

    __slots__ = ("attempts", "event", "in_flight", "last", "started_at", "t0")

    def __init__(self, event: Event, started_at: datetime, t0: float) -> None:
        self.event = event
        self.started_at = started_at
        self.t0 = t0
        self.attempts = 0
        self.in_flight = False
        self.last: Outcome | None = None


class Engine:
    """One run's worker pool. Use :meth:`run` once; :meth:`stop` asks it to wind down."""

    def __init__(
        self,
        *,
        transport: Transport,
        gate: RateGate | Gate,
        policy: RetryPolicy,
        concurrency: int,
        queue_size: int | None = None,
        stats: RunStats | None = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        stop_rules: StopRules | None = None,
        mark_started: Callable[[Event], None] | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._transport = transport
        self._gate = gate
        self._policy = policy
        self._concurrency = concurrency
        self._queue_size = queue_size if queue_size is not None else concurrency * 4
        self._rng = rng
        self._clock = clock
        self.stats = stats if stats is not None else RunStats()
        self._stopping = False
        self._stop_event = anyio.Event()
        self._source_scope: anyio.CancelScope | None = None
        self._wait_scopes: set[anyio.CancelScope] = set()
        self._rules = stop_rules if stop_rules is not None else StopRules()
        self._watch = FailureWatch(self._rules)
        # Told of each record just before its first request leaves (the crash journal).
        self._mark_started = mark_started
        self._active: dict[int, _Active] = {}
        self._pacer = pacer

    def abandoned(self) -> list[Envelope]:
        """Envelopes for records cut off by a hard stop, after the engine was cancelled.

        A request in flight may have arrived: ``unknown``. A record between retries ends
        with its last answer. Records never attempted get none: they are left for later.
        """
        now = _now()
        out: list[Envelope] = []
        for active in self._active.values():
            event = active.event
            if active.in_flight or active.last is None:
                env = envelopes.for_cut_off(
                    event,
                    attempts=active.attempts,
                    started_at=active.started_at,
                    now=now,
                    elapsed_s=self._clock() - active.t0,
                )
            else:
                env = envelopes.for_outcome(
                    event,
                    active.last,
                    attempts=active.attempts,
                    started_at=active.started_at,
                    finished_at=now,
                    elapsed_s=self._clock() - active.t0,
                )
            out.append(env)
        self._active.clear()
        return out

    def _check_stop_rules(self, env: Envelope) -> None:
        reason = self._watch.check(env)
        if reason is not None:
            self.stop(reason)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self, reason: str) -> None:
        """Stop reading and starting records; requests already in flight finish.

        Records not yet attempted get no envelope: they are left for a later run.
        """
        if self._stopping:
            return
        self._stopping = True
        self.stats.stop_reason = reason
        self._stop_event.set()
        if self._source_scope is not None:
            self._source_scope.cancel()
        for scope in list(self._wait_scopes):
            scope.cancel()

    async def run(
        self, batches: AsyncIterable[list[Record]], out: MemoryObjectSendStream[Envelope]
    ) -> None:
        """Send every record of ``batches``; emit envelopes to ``out`` and close it."""
        send_work, recv_work = anyio.create_memory_object_stream[Event](self._queue_size)
        try:
            async with out, anyio.create_task_group() as tg:
                for _ in range(self._concurrency):
                    tg.start_soon(self._worker, recv_work.clone(), out.clone())
                recv_work.close()
                await self._source(batches, send_work, out)
        finally:
            self.stats.finished = time.monotonic()
            gate = self._gate.stats
            self.stats.pauses, self.stats.paused_s = gate.pauses, gate.paused_s

    async def _source(
        self,
        batches: AsyncIterable[list[Record]],
        work: MemoryObjectSendStream[Event],
        out: MemoryObjectSendStream[Envelope],
    ) -> None:
        async with work:
            with anyio.CancelScope() as scope:
                self._source_scope = scope
                if self._stopping:
                    return
                async for batch in batches:
                    for record in batch:
                        if isinstance(record, Invalid):
                            env = envelopes.for_invalid(record, _now())
                            self.stats.record(env)
                            await _put(out, env)
                        else:
                            await _put(work, record)
                    if self._stopping:
                        return

    async def _worker(
        self, work: MemoryObjectReceiveStream[Event], out: MemoryObjectSendStream[Envelope]
    ) -> None:
        async with work, out:
            while True:
                # Take what is ready without a trip through the event loop; anyio's
                # receive() checkpoints on every item, which costs more than the item.
                try:
                    event = work.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        event = await work.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                if self._stopping:
                    # Drain without sending: these are left for a later run.
                    continue
                env = await self._deliver(event)
                if env is not None:
                    self.stats.record(env)
                    self._check_stop_rules(env)
                    await _put(out, env)

    async def _wait(self, seconds: float | None) -> bool:
        """Wait at the gate (``None``) or for a backoff; False if the run stopped meanwhile."""
        if self._stopping:
            return False
        if seconds is None and self._gate.ready():
            # The common case, an open gate: acquire() returns without suspending, so it
            # needs no cancel scope (creating one costs more than the rest of an attempt).
            await self._gate.acquire()
            return True
        with anyio.CancelScope() as scope:
            self._wait_scopes.add(scope)
            try:
                if seconds is None:
                    await self._gate.acquire()
                else:
                    await anyio.sleep(seconds)
            finally:
                self._wait_scopes.discard(scope)
        return not scope.cancelled_caught and not self._stopping

    async def _deliver(self, event: Event) -> Envelope | None:
        started_at = _now()
        t0 = self._clock()
        rate_limited = 0
        stats = self.stats
        active = _Active(event, started_at, t0)
        slot = id(active)
        try:
            while True:
                if not await self._wait(None):
                    break
                if active.attempts == 0:
                    self._active[slot] = active
                    if self._mark_started is not None:
                        self._mark_started(event)
                else:
                    stats.retries += 1
                stats.attempts += 1
                stats.in_flight += 1
                active.in_flight = True
                try:
                    outcome = await self._transport.send(event)
                finally:
                    stats.in_flight -= 1
                active.in_flight = False
                active.attempts += 1
                active.last = outcome
                if self._pacer is not None:
                    self._pacer.observe(outcome, stats.in_flight)
                if outcome.status == 429:
                    rate_limited += 1
                    stats.rate_limited += 1
                elif outcome.status in _AUTH_STATUSES and stats.confirmed == 0:
                    self.stop(
                        f"credentials rejected (HTTP {outcome.status}: "
                        f"{outcome.message or 'no message'}); check the token and that it "
                        "has the Workers Scripts Write permission"
                    )
                decision = self._policy.decide(outcome, active.attempts, rate_limited, self._rng)
                if isinstance(decision, Final):
                    gave_up = ErrorKind.RATE_LIMITED if decision.reason == "rate_limited" else None
                    return envelopes.for_outcome(
                        event,
                        outcome,
                        attempts=active.attempts,
                        started_at=started_at,
                        finished_at=_now(),
                        elapsed_s=self._clock() - t0,
                        gave_up=gave_up,
                    )
                if self._stopping:
                    break
                if decision.pause_all:
                    # A 429 is account-wide: every worker waits, not only this one.
                    self._gate.pause_for(decision.delay)
                elif not await self._wait(decision.delay):
                    break
            if active.last is None:
                return None  # never attempted: left for a later run, no envelope
            return envelopes.for_outcome(
                event,
                active.last,
                attempts=active.attempts,
                started_at=started_at,
                finished_at=_now(),
                elapsed_s=self._clock() - t0,
            )
        finally:
            # On a hard stop (cancellation) the record stays listed for abandoned().
            if not active.in_flight:
                self._active.pop(slot, None)
