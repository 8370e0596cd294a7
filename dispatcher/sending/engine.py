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
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dispatcher.clients.base import Transport
from dispatcher.model import Envelope, ErrorKind, Event, Invalid, Outcome, Record
from dispatcher.results import envelopes
from dispatcher.results.errors import ResultsWriteError
from dispatcher.sending.gate import Gate
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


class Backlog(Protocol):
    """Records started whose envelope is not durable yet (the crash journal): while
    ``pending`` is at ``limit``, no record's first request leaves, so that however slow
    the disk, a crash leaves at most ``limit`` records in doubt."""

    @property
    def pending(self) -> int: ...

    @property
    def limit(self) -> int | None: ...

    async def freed(self) -> None:
        """Return once some pending record's envelope became durable."""


class _Active:
    """A record between its first attempt and its envelope (for a hard stop's accounting)."""

    __slots__ = ("event", "history", "in_flight")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.history = envelopes.History()
        self.in_flight = False


class Engine:
    """One run's worker pool. Use :meth:`run` once; :meth:`stop` asks it to wind down."""

    def __init__(
        self,
        *,
        transport: Transport,
        gate: Gate,
        policy: RetryPolicy,
        concurrency: int,
        queue_size: int | None = None,
        stats: RunStats | None = None,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
        stop_rules: StopRules | None = None,
        mark_started: Callable[[Event], None] | None = None,
        pacer: Pacer | None = None,
        auth_hint: str = "check the credentials",
        backlog: Backlog | None = None,
        announce: Callable[[Event], Awaitable[str | None]] | None = None,
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
        # Awaited before a record's first request, after the gate (a job's write-ahead to
        # Redis): None to go on, else why the run must stop (the record is not sent).
        self._announce = announce
        self._active: dict[int, _Active] = {}
        self._pacer = pacer
        self._auth_hint = auth_hint  # what to check when the first answers are 401/403
        limit = None if backlog is None else backlog.limit
        self._backlog = backlog if limit is not None else None  # None: no hold
        self._backlog_limit = limit or 0
        self._admitted = 0  # records past _admit() not yet journaled (counted as pending)
        self._held = 0  # workers waiting in _admit()
        self._held_since = 0.0

    def abandoned(self) -> list[Envelope]:
        """Envelopes for records cut off by a hard stop, after the engine was cancelled.

        The truth table decides, with error kind ``stopped``: a request in flight may
        have arrived (``unknown``); a record between retries keeps what its attempts
        proved. Records never attempted get none: they are left for later.
        """
        now = _now()
        out: list[Envelope] = []
        for active in self._active.values():
            env = envelopes.for_history(
                active.event,
                active.history,
                finished_at=now,
                elapsed_s=self._elapsed(active.history),
                stopped=self._stopped_message(in_flight=active.in_flight),
                in_flight=active.in_flight,
            )
            if env is not None:
                out.append(env)
        self._active.clear()
        return out

    def _elapsed(self, history: envelopes.History) -> float:
        # From the first request to now, without the time held at the gate meanwhile.
        if history.attempts == 0 and history.started_at is None:
            return 0.0
        return self._clock() - history.t_first - (history.waited_s - history.waited_before)

    def _stopped_message(self, *, in_flight: bool) -> str:
        reason = self.stats.stop_reason or "the run was cancelled"
        if in_flight:
            return f"stopped ({reason}) while a request was in flight; it may have arrived"
        return f"stopped ({reason}) before this record's next attempt"

    def _check_stop_rules(self, env: Envelope) -> None:
        reason = self._watch.check(env)
        if reason is not None:
            self.stop(reason)

    def _check_lockout(self, outcome: Outcome) -> None:
        """Stop the run when a 429 asks for a longer wait than the run may pause.

        The lockout is the account's, not the record's: every record sent into it would be
        refused too, and each refusal may extend it. Nothing more is sent; the records
        refused and those not yet attempted are left for ``--resume``.
        """
        wait = self._policy.rate_limit_wait(outcome)
        if wait <= self._policy.max_retry_wait or self._stopping:
            return
        self.stats.locked_out_s = wait
        until = datetime.now(UTC) + timedelta(seconds=wait)
        self.stop(
            f"the API is locked out for {wait:g} s (Retry-After, until {until:%H:%M:%S} UTC), "
            f"longer than --max-retry-wait {self._policy.max_retry_wait:g} s; "
            "records answered 429 are not delivered and --resume sends them"
        )

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

    async def _wait(self, seconds: float | None, history: envelopes.History | None = None) -> bool:
        """Wait at the gate (``None``) or for a backoff; False if the run stopped meanwhile.

        Time held at the gate is added to ``history.waited_s``.
        """
        if self._stopping:
            return False
        if seconds is None and self._gate.ready():
            # The common case, an open gate: acquire() returns without suspending, so it
            # needs no cancel scope (creating one costs more than the rest of an attempt).
            await self._gate.acquire()
            return True
        with anyio.CancelScope() as scope:
            self._wait_scopes.add(scope)
            t0 = self._clock()
            try:
                if seconds is None:
                    await self._gate.acquire()
                else:
                    await anyio.sleep(seconds)
            finally:
                self._wait_scopes.discard(scope)
                if seconds is None and history is not None:
                    history.waited_s += self._clock() - t0
        return not scope.cancelled_caught and not self._stopping

    async def _announced(self, event: Event) -> bool:
        """Announce ``event`` before its first request; False if the run stopped or must."""
        assert self._announce is not None
        with anyio.CancelScope() as scope:
            self._wait_scopes.add(scope)
            try:
                reason = await self._announce(event)
            finally:
                self._wait_scopes.discard(scope)
        if scope.cancelled_caught or self._stopping:
            return False
        if reason is not None:
            self.stop(reason)
            return False
        return True

    async def _admit(self) -> bool:
        """Hold a record's first request while the backlog is full; False if stopped.

        Records admitted but not yet journaled (waiting at the gate) count as pending, so
        the backlog never holds more than its limit, however many workers pass at once.
        """
        backlog = self._backlog
        if backlog is None:
            return True
        while backlog.pending + self._admitted >= self._backlog_limit:
            if self._stopping:
                return False
            with anyio.CancelScope() as scope:
                self._wait_scopes.add(scope)
                if not self._held:
                    self._held_since = self._clock()
                self._held += 1
                try:
                    await backlog.freed()
                finally:
                    self._wait_scopes.discard(scope)
                    self._held -= 1
                    if not self._held:  # wall time with any worker held, not their sum
                        self.stats.disk_held_s += self._clock() - self._held_since
            if scope.cancelled_caught:
                return False
        self._admitted += 1
        return True

    async def _deliver(self, event: Event) -> Envelope | None:
        if not await self._admit():
            return None  # never attempted: left for a later run
        admitted = self._backlog is not None  # counted in _admitted until journaled
        rate_limited = 0
        stats = self.stats
        clock = self._clock
        active = _Active(event)
        history = active.history
        slot = id(active)
        done = False
        try:
            while True:
                if not await self._wait(None, history):
                    break
                announcing = history.attempts == 0 and self._announce is not None
                if announcing and not await self._announced(event):
                    break  # never attempted: no envelope, left for a later run
                history.leaving(_now(), clock())
                if history.attempts == 0:
                    self._active[slot] = active
                    if admitted:
                        # Journaled next (or stopped): pending counts it from here.
                        admitted = False
                        self._admitted -= 1
                    if self._mark_started is not None:
                        try:
                            self._mark_started(event)
                        except ResultsWriteError as exc:
                            # Not journaled, so never sent; nor is anything after it.
                            self.stop(str(exc))
                            break
                else:
                    stats.retries += 1
                stats.attempts += 1
                stats.in_flight += 1
                active.in_flight = True
                try:
                    outcome = await self._transport.send(event)
                except ResultsWriteError as exc:
                    # The journal's held lines could not be written, so the transport wrote
                    # no request of theirs (hold_writes): this attempt never left.
                    stats.attempts -= 1
                    if history.attempts:
                        stats.retries -= 1
                    active.in_flight = False
                    self.stop(str(exc))
                    break
                finally:
                    stats.in_flight -= 1
                active.in_flight = False
                stats.answers[outcome.status or 0] += 1
                history.add(outcome)
                if self._pacer is not None:
                    self._pacer.observe(outcome, stats.in_flight)
                if outcome.stop_run is not None:
                    # Every record would get the same answer, and this one is not at fault:
                    # stopped before its next attempt, for --resume once the setting is fixed.
                    if not outcome.sent and stats.unreachable is None:
                        stats.unreachable = outcome.stop_run  # refused: nothing listens
                    self.stop(outcome.stop_run)
                    break
                if outcome.status == 429:
                    rate_limited += 1
                    stats.rate_limited += 1
                elif outcome.status in _AUTH_STATUSES and stats.confirmed == 0:
                    self.stop(
                        f"credentials rejected (HTTP {outcome.status}: "
                        f"{outcome.message or 'no message'}); {self._auth_hint}"
                    )
                decision = self._policy.decide(outcome, history.attempts, rate_limited, self._rng)
                if isinstance(decision, Final):
                    gave_up = ErrorKind.RATE_LIMITED if decision.reason == "rate_limited" else None
                    if gave_up is not None:
                        self._check_lockout(outcome)
                    done = True
                    return envelopes.for_history(
                        event,
                        history,
                        finished_at=_now(),
                        elapsed_s=self._elapsed(history),
                        gave_up=gave_up,
                    )
                if self._stopping:
                    break
                if decision.pause_all:
                    # A 429 is account-wide: every worker waits, not only this one.
                    self._gate.pause_for(decision.delay)
                elif not await self._wait(decision.delay):
                    break
            # Stopped before its last allowed attempt: not final (resume decides by the
            # table); never attempted: no envelope, left for a later run.
            done = True
            return envelopes.for_history(
                event,
                history,
                finished_at=_now(),
                elapsed_s=self._elapsed(history),
                stopped=self._stopped_message(in_flight=False),
            )
        finally:
            if admitted:
                self._admitted -= 1  # stopped at the gate, before its first request
            # On a hard stop (cancellation), in flight or waiting for a retry, the record
            # stays listed: abandoned() gives it its envelope.
            if done:
                self._active.pop(slot, None)
