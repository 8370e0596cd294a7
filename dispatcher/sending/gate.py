"""The run-wide rate gate: one per run, shared by every worker, passed by every attempt.

Two things hold an attempt back: the pace, and a pause-until deadline that a 429 sets for
the whole run, since Cloudflare locks out the account, not the request. The pace is a small
leaky bucket (aiolimiter) by default, or, once :meth:`RateGate.set_strict` is on, a due-time
schedule with zero tolerance: no two requests leave closer than 1/rate (see docs/rate.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import typing
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from aiolimiter import AsyncLimiter

__all__ = ["Gate", "GateCounts", "GateStats", "RateGate", "default_burst"]

# Sleeps in an event loop end late: epoll rounds timeouts up to whole milliseconds and a
# busy loop wakes later still. With a bucket of one, that lateness is lost for good (the
# bucket cannot drain below empty), so each request costs 1/rate plus the lateness: about
# 5% short at 50/s and 23% short at 500/s (with test_gate's 1 ms-granular late timers).
# A bucket of b absorbs up to (b - 1) / rate of lateness per wake-up. But every request
# the bucket lets out back to back is one a limiter nobody announced may refuse: nginx's
# limit_req at 500 r/s with burst=5 refused 30% of a fixed --rate 490/s while the bucket
# held 20 ms of traffic (10 requests). So the bucket holds one request plus 6 ms of
# traffic: 6 ms of slack, which kept 500/s within 0.3% on this 2-core machine at load 4
# (a bucket of 2, 2 ms of slack, lost 11% there), and at most 4 back to back at 500/s,
# under a limiter's burst of 5. Up to 5/s, which covers the account-wide 1200 per 5
# minutes (4/s), a late millisecond costs at most 0.5%, so the bucket stays at one and
# the pace is strictly burst-free.
_BURST_FREE_UP_TO: typing.Final = 5.0  # requests/s
_SLACK_S: typing.Final = 0.006
# Strict spacing sleeps to this much before a due time, then yields to the loop until the
# precise timer reaches it: an epoll timeout ends up to 1 ms late, and a late slot is lost.
SPIN_S: typing.Final = 0.001
# A limiter stamps a request when its loop reads it, off a clock cached per loop pass
# (nginx's ngx_current_msec). A server that stood still while our last request waited is
# late stamping it, and the next one, spaced 1/rate from ours, looks closer to it than that:
# against nginx limit_req burst=0 on a shared 2-core machine, stalls of 3 to 16 ms made
# requests sent 6 to 14 ms apart look 0 to 5 ms apart. The client does the same to itself:
# between a slot and its write the engine journals the record, and 1 to 2% of writes left
# over 1 ms after their slot (up to 25 ms). So under strict spacing the next request also
# waits out how much later than usual the last slot's answer was heard of: it left, or was
# stamped, that much later. An answer not heard of by the usual span plus this grace tells
# of a stall, and the next request waits for it (at most one more interval or 20 ms, so a
# hung request costs a slot or two, not the run). The grace covers the loop's own jitter in
# seeing answers (the median span is the usual one); a push takes no grace off.
HOLD_GRACE_S: typing.Final = 0.0005
HOLD_MAX_S: typing.Final = 0.02  # ... or this long, if more: the longest stall seen was 16 ms
_SPANS: typing.Final = 64  # slots' answer spans kept for the usual one
_FRESH_S: typing.Final = 10.0  # answers reported this recently keep the hold on (pauses too)


def default_burst(rate: float) -> int:
    """Bucket size for ``rate`` requests/s: 1 up to 5/s, then one plus 6 ms of traffic."""
    if rate <= _BURST_FREE_UP_TO:
        return 1
    return 1 + math.ceil(rate * _SLACK_S - 1e-9)


@dataclass(frozen=True, slots=True, kw_only=True)
class GateStats:
    """What the gate did, for the run summary."""

    acquired: int  # slots handed out: one per attempt sent
    pauses: int  # pause periods started (an extension of a running pause is not a new one)
    paused_s: float  # total length of all pauses as set, overlaps counted once


class GateCounts(Protocol):
    """What the summary reads of any gate's counts (:class:`GateStats` is one)."""

    @property
    def acquired(self) -> int: ...

    @property
    def pauses(self) -> int: ...

    @property
    def paused_s(self) -> float: ...


class Gate(Protocol):
    """A run's budget, shared by every worker: what the engine and the pacer use of it.

    :class:`RateGate` is the one-process implementation; a gate shared by several runs of
    one account (in Redis, say) offers the same. Every attempt calls :meth:`acquire` just
    before its request leaves; :meth:`pause_for` holds every attempt of the run (a 429's
    ``Retry-After``, a spent budget); the pacer steers :attr:`rate` with :meth:`set_rate`.
    """

    @property
    def rate(self) -> float | None:
        """Requests per second, or ``None`` when unlimited."""
        ...

    @property
    def stats(self) -> GateCounts: ...

    @property
    def paused_until(self) -> float:
        """The loop time until which every attempt is held (in the past when not paused)."""
        ...

    def set_rate(self, rate: float | None) -> None: ...

    def pause_for(self, seconds: float) -> None:
        """Hold every acquire until ``seconds`` from now; never shortens a longer pause."""
        ...

    def ready(self) -> bool:
        """Whether :meth:`acquire` would return without suspending."""
        ...

    async def acquire(self) -> None:
        """Wait until the run is not paused and the rate allows one more request."""
        ...


def _carry_level(old: AsyncLimiter, new: AsyncLimiter) -> None:
    """Fill ``new`` to the share of its capacity that ``old`` holds right now.

    aiolimiter has no public way to read or set a bucket's level; its two attributes have
    been stable since 1.0. Without a running loop (or should they change) the new bucket
    simply starts empty, as aiolimiter's own would.
    """
    try:
        old._leak()  # brings _level up to date with the loop's clock
        share = old._level / old.max_rate
        new._level = min(share, 1.0) * new.max_rate
        new._last_check = old._last_check
    except (AttributeError, RuntimeError):
        return


def _check_rate(rate: float | None) -> None:
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number of requests per second > 0, got {rate!r}")


class RateGate:
    """Paces every attempt of a run and holds them all while the run is paused.

    ``rate`` is requests per second (``None``: no pacing, though pauses still hold).
    ``burst`` is how many requests may leave back to back after an idle spell; by default
    :func:`default_burst`. ``clock`` defaults to the running loop's ``time()``, which is
    also what the bucket and ``anyio.sleep`` use; an injected clock must read the same time
    base (it exists for checking pause bookkeeping without a loop).

    ``strict`` starts with strict spacing on (see :meth:`set_strict`). Its schedule reads
    ``timer`` (default :func:`time.perf_counter`: a loop's clock may count whole
    milliseconds, as uvloop's does); each wait sleeps to ``spin`` s before the due time,
    then yields to the loop until ``timer`` reaches it.
    """

    __slots__ = (
        "_acquired",
        "_answer",
        "_answered_at",
        "_bucket_waiters",
        "_burst",
        "_clock",
        "_last_sent",
        "_limiter",
        "_paused_s",
        "_paused_until",
        "_pauses",
        "_rate",
        "_resumed_after",
        "_spans",
        "_spin",
        "_started",
        "_strict",
        "_timer",
        "_turn",
    )

    def __init__(
        self,
        rate: float | None,
        *,
        burst: int | None = None,
        clock: Callable[[], float] | None = None,
        strict: bool = False,
        timer: Callable[[], float] = time.perf_counter,
        spin: float = SPIN_S,
    ) -> None:
        _check_rate(rate)
        if not (math.isfinite(spin) and spin >= 0):
            raise ValueError(f"spin must be a finite number of seconds >= 0, got {spin!r}")
        if burst is not None and (
            not isinstance(burst, int) or isinstance(burst, bool) or burst < 1
        ):
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        self._clock = clock
        self._burst = burst
        self._rate: float | None = None
        self._limiter: AsyncLimiter | None = None
        # Cancel scopes of tasks queued inside the current bucket, so set_rate can move them.
        self._bucket_waiters: set[anyio.CancelScope] = set()
        self._paused_until = -math.inf
        self._resumed_after = -math.inf  # the pause whose end last refilled the bucket
        self._acquired = 0
        self._pauses = 0
        self._paused_s = 0.0
        self._strict = strict
        self._started = False  # whether the bucket has handed out its first slot
        self._timer = timer
        self._spin = spin
        self._last_sent = -math.inf  # timer reading when the last strict slot was taken
        # Strict slots go one at a time, in arrival order: only the head waiter sleeps.
        self._turn = anyio.Lock()
        # (when, how long after its slot) each strict slot's answer was heard of, and when
        # the last slot's was.
        self._spans: deque[tuple[float, float]] = deque(maxlen=_SPANS)
        self._answered_at: float | None = None
        self._answer: anyio.Event | None = None
        self.set_rate(rate)

    @property
    def rate(self) -> float | None:
        """Requests per second, or ``None`` when unlimited."""
        return self._rate

    @property
    def burst(self) -> int | None:
        """The current bucket size, or ``None`` when unlimited (1 under strict spacing)."""
        if self._limiter is None:
            return None
        return 1 if self._strict else int(self._limiter.max_rate)

    @property
    def strict(self) -> bool:
        """Whether requests are spaced strictly (no two closer than 1/rate)."""
        return self._strict

    def set_strict(self, strict: bool = True) -> None:
        """Switch strict spacing on (or off) now.

        Strict spacing schedules each request at a due time, one interval after the last
        one actually left, with no tolerance: a limiter of any burst, ``limit_req`` with
        ``burst=0`` included, admits every request at a rate at or under its own. A slot
        taken late is lost, never made up with a burst, so the achieved rate is a little
        under the set one by the wake-ups' lateness (which the spin keeps small). Turned on
        with requests out under the bucket, the first strict one waits a whole interval.
        """
        if strict == self._strict:
            return
        self._strict = strict
        if strict:
            self._last_sent = self._timer()
        self._release_waiters()

    def answered(self, latency_s: float) -> None:
        """An answer came back ``latency_s`` after its request left (see :meth:`_hold`).

        Reported by the pacer for answers with nothing but a 429 to go on. An answer to a
        request sent at or after the last strict slot is that slot's: how long after the
        slot it is heard of (the engine's journal write before the request, the round trip,
        the loop's delay in seeing the answer) is kept for the usual span.
        """
        rate = self._rate
        if rate is None or not self._strict or not (math.isfinite(latency_s) and latency_s >= 0):
            return
        now = self._timer()
        if now - latency_s < self._last_sent - 0.4 / rate:
            return  # an earlier slot's
        self._answered_at = now
        self._spans.append((now, now - self._last_sent))
        if self._answer is not None:
            self._answer.set()

    def _usual(self) -> float | None:
        """The median recent span from slot to answer, or ``None`` when none is known."""
        if not self._spans or self._timer() - self._spans[-1][0] > _FRESH_S:
            return None
        spans = sorted(span for _, span in self._spans)
        return spans[len(spans) // 2]

    async def _hold(self, due: float, rate: float) -> float:
        """The due time once the last slot's answer is taken into account.

        An answer heard of later after its slot than usual moves the next due time on by
        as much: the request left late (the engine journals it between the slot and the
        write), or the server stamped it late. (With no grace: nginx's whole-millisecond
        clock refused a request its stamps put 5.0 ms after the last at 200/s, after a
        push that took the grace off.) An answer still out past the usual span and
        :data:`HOLD_GRACE_S` is waited for, up to one more interval or :data:`HOLD_MAX_S`.
        """
        usual = self._usual()
        if usual is None:
            return due
        if self._answered_at is None:
            overdue = self._last_sent + usual + HOLD_GRACE_S
            if self._timer() < overdue:
                return due  # not late yet: no sign the server stood still
            self._answer = anyio.Event()
            longest = due + max(1.0 / rate, HOLD_MAX_S)
            with anyio.move_on_after(max(0.0, longest - self._timer())):
                await self._answer.wait()
            self._answer = None
            if self._answered_at is None:
                return longest
        return max(due, self._answered_at + 1.0 / rate - usual)

    def _release_waiters(self) -> None:
        waiters, self._bucket_waiters = self._bucket_waiters, set()
        for scope in waiters:
            scope.cancel()

    @property
    def paused_until(self) -> float:
        """Clock time until which every acquire waits; ``-inf`` if never paused."""
        return self._paused_until

    @property
    def stats(self) -> GateStats:
        return GateStats(acquired=self._acquired, pauses=self._pauses, paused_s=self._paused_s)

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    def set_rate(self, rate: float | None) -> None:
        """Change the rate now.

        The bucket is replaced by one for the new rate that is as full as the old one was,
        so a change never lets a burst out by itself: the pacer may change the rate after
        every answer (stretching a budget), and fresh empty buckets let ``burst`` requests
        out each time, many times the rate in all. Tasks already queued in the old bucket
        are moved to the new one, so a faster rate speeds them up and a slower one holds
        them back at once. A ``burst`` given to the constructor is kept; otherwise it
        follows the rate.
        """
        _check_rate(rate)
        self._rate = rate
        old = self._limiter
        if rate is None:
            self._limiter = None
        else:
            burst = self._burst if self._burst is not None else default_burst(rate)
            # AsyncLimiter(n, period) lets n through at once, then one every period / n:
            # n / rate as the period keeps the pace at `rate` with a bucket of n.
            self._limiter = AsyncLimiter(burst, burst / rate)
            if old is not None:
                _carry_level(old, self._limiter)
        self._release_waiters()

    def pause_for(self, seconds: float) -> None:
        """Hold every acquire until ``seconds`` from now; never shortens a longer pause."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"pause must be a finite number of seconds >= 0, got {seconds!r}")
        now = self._now()
        until = now + seconds
        if until <= self._paused_until:
            return
        if now >= self._paused_until:
            self._pauses += 1
        self._paused_s += until - max(now, self._paused_until)
        self._paused_until = until

    def ready(self) -> bool:
        """Whether :meth:`acquire` would return at once, without suspending.

        Lets a caller skip the bookkeeping it needs around a wait (a cancel scope) in the
        common case of an open gate.
        """
        if self._now() < self._paused_until:
            return False
        limiter = self._limiter
        if limiter is None:
            return True
        if self._strict:
            return not self._turn.locked() and self._timer() >= self._due()
        return not self._bucket_waiters and limiter.has_capacity()

    async def acquire(self) -> None:
        """Wait until the run is not paused and the bucket has room, then take one slot."""
        while True:
            if await self._wait_out_pause():
                self._resume_at_pace()
            limiter = self._limiter
            if limiter is not None and self._strict:
                if not await self._take_turn():
                    continue
            elif limiter is not None:
                if not self._started:
                    self._started = True
                    if self._burst is None:  # a burst asked for is let out at once
                        self._one_at_once(limiter)
                if limiter.has_capacity():
                    # Room right now: aiolimiter's acquire returns without suspending.
                    await limiter.acquire()
                elif not await self._queue_in_bucket(limiter):
                    continue
                # A 429 may have paused the run while this task sat in the bucket; sending
                # now would land inside the lockout. The slot is given up: the bucket has
                # drained by the time the pause ends anyway.
                if self._now() < self._paused_until:
                    continue
            self._acquired += 1
            return

    async def _wait_out_pause(self) -> bool:
        """Sleep until the run is not paused; ``True`` if there was a pause to wait out."""
        waited = False
        # Not a polling loop: each pass sleeps to the deadline, and loops only when a 429
        # moved the deadline meanwhile (or the timer fired a clock tick early).
        while (remaining := self._paused_until - self._now()) > 0:
            waited = True
            await anyio.sleep(remaining)
        return waited

    def _resume_at_pace(self) -> None:
        """After a pause, one request may leave at once and the rest follow at the pace.

        The bucket drained during the pause, so every waiter would find room and leave
        together: a burst of the bucket's size, right when the limiter that paused the run
        starts admitting again (against nginx at 500 r/s with burst=5, the 10 requests of
        a 20 ms bucket drew a 429 at the end of every pause).
        """
        if self._resumed_after == self._paused_until:
            return
        self._resumed_after = self._paused_until
        if self._limiter is not None:
            self._one_at_once(self._limiter)

    @staticmethod
    def _one_at_once(limiter: AsyncLimiter) -> None:
        """Leave room in ``limiter`` for one request now; the rest follow at the pace.

        Also for the run's first request: a bucket starts full, and 64 workers starting
        together took all of it, 2 or 3 requests back to back at 20 to 200/s, which a
        limiter without a burst refuses (nginx ``limit_req`` at 200/s, burst 0: 3 to 7 429s
        in the first 10 ms of a told ``--rate 200/s``, and the run then turns strict).
        """
        with contextlib.suppress(AttributeError, RuntimeError):
            limiter._leak()
            limiter._level = max(limiter._level, limiter.max_rate - 1)

    async def _queue_in_bucket(self, limiter: AsyncLimiter) -> bool:
        """Wait for a slot of ``limiter``; ``False`` if set_rate replaced it meanwhile."""
        with anyio.CancelScope() as scope:
            self._bucket_waiters.add(scope)
            try:
                await limiter.acquire()
            finally:
                self._bucket_waiters.discard(scope)
        return not scope.cancelled_caught

    def _due(self) -> float:
        rate = self._rate
        return -math.inf if rate is None else self._last_sent + 1.0 / rate

    async def _take_turn(self) -> bool:
        """Take the next strict slot; ``False`` if the pace or the mode changed meanwhile,
        or a pause began: the caller starts over."""
        async with self._turn:
            if not self._strict or self._now() < self._paused_until:
                return False
            due = self._due()
            if self._timer() < due and not await self._sleep_until(due):
                return False
            rate = self._rate
            if rate is not None:
                held = await self._hold(due, rate)
                if held > self._timer() and not await self._sleep_until(held):
                    return False
            if self._now() < self._paused_until or not self._strict:
                return False
            # One interval from when this slot was actually taken, not from when it was
            # due: lateness moves the schedule on rather than letting two out close.
            self._last_sent = self._timer()
            self._answered_at = None
            return True

    async def _sleep_until(self, due: float) -> bool:
        """Sleep until ``timer`` reaches ``due``; ``False`` if set_rate cut the sleep short."""
        with anyio.CancelScope() as scope:
            self._bucket_waiters.add(scope)
            try:
                # Not waiting for an event: for a deadline. The last stretch yields to the
                # loop pass by pass instead of relying on a timeout the selector rounds up
                # to whole milliseconds.
                while (left := due - self._timer()) > 0:  # noqa: ASYNC110
                    await anyio.sleep(left - self._spin if left > self._spin else 0)
            finally:
                self._bucket_waiters.discard(scope)
        return not scope.cancelled_caught
