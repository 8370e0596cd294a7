"""The rate gate, run on an event loop whose clock only moves when the loop would sleep.

``FakeTimeLoop`` never waits: whenever nothing is ready to run, its selector jumps the
clock to the next timer. So seconds of paced traffic take milliseconds, and the times
asserted are exact. ``granularity`` and ``lateness`` make it wake late the way a real
loop does (epoll rounds timeouts up to whole milliseconds, then the loop runs behind), to
check the pace holds up against late timers.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import selectors
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio
import pytest

from dispatcher.sending.gate import GateStats, RateGate, default_burst

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

MIN_STEP = 1e-8


class _JumpingSelector(selectors.SelectSelector):
    def __init__(self, loop: FakeTimeLoop) -> None:
        super().__init__()
        self._fake_loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:
            raise RuntimeError("deadlock: nothing ready and no timer pending")
        self._fake_loop.advance(timeout)
        return []


class FakeTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, *, granularity: float = 0.0, lateness: float = 0.0) -> None:
        self.now = 0.0
        self.granularity = granularity
        self.lateness = lateness
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[Ts]], object],
        *args: *Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        # A real clock moves on between loop passes, so a timer set for "now" (aiolimiter
        # sets one when float residue leaves its bucket a hair over full) finds the bucket
        # drained a little by the time it fires. Here the clock only moves to reach a timer,
        # so such a timer is set a step past the loop's clock resolution (which would fire it
        # without moving the clock) or it would fire at the same instant forever.
        return super().call_at(max(when, self.now + MIN_STEP), callback, *args, context=context)

    def advance(self, timeout: float) -> None:
        if self.granularity:
            timeout = math.ceil(timeout / self.granularity) * self.granularity
        self.now += timeout + self.lateness


def run(
    main: Callable[[FakeTimeLoop], Awaitable[T]], *, granularity: float = 0.0, lateness: float = 0.0
) -> T:
    loop = FakeTimeLoop(granularity=granularity, lateness=lateness)

    async def wrapper() -> T:
        return await main(loop)

    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(wrapper())


# A real loop on Linux: whole-millisecond timeouts, and another 0.3 ms behind on each wake.
REALISTIC = {"granularity": 0.001, "lateness": 0.0003}


async def acquire_times(gate: RateGate, loop: FakeTimeLoop, n: int) -> list[float]:
    times = []
    for _ in range(n):
        await gate.acquire()
        times.append(loop.time())
    return times


async def achieved_rate(gate: RateGate, *, workers: int, span: float) -> float:
    """Acquisitions per second over ``span`` seconds, after a short warm-up."""

    async def worker() -> None:
        while True:
            await gate.acquire()

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
        # Leave out the start-up burst: the pace is what a long run sees.
        await anyio.sleep(0.1)
        before = gate.stats.acquired
        await anyio.sleep(span)
        after = gate.stats.acquired
        tg.cancel_scope.cancel()
    return (after - before) / span


def test_second_acquire_waits_one_interval_no_burst() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        return await acquire_times(RateGate(4), loop, 4)

    assert run(main) == pytest.approx([0.0, 0.25, 0.5, 0.75])


def test_concurrent_workers_share_one_pace() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(4)
        times: list[float] = []

        async def worker() -> None:
            times.extend(await acquire_times(gate, loop, 3))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
        return sorted(times)

    assert run(main) == pytest.approx([i / 4 for i in range(12)])


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.5, 1), (4, 1), (5, 1), (5.5, 2), (50, 2), (200, 3), (500, 4), (1000, 7), (5000, 31)],
)
def test_default_burst_is_one_at_low_rates_then_6_ms_of_slack(rate: float, burst: int) -> None:
    assert default_burst(rate) == burst
    assert RateGate(rate).burst == burst


@pytest.mark.parametrize(
    ("rate", "span"), [(4, 60.0), (5, 60.0), (6, 60.0), (50, 10.0), (500, 5.0), (2000, 1.0)]
)
def test_achieved_rate_tracks_requested_rate_with_late_timers(rate: float, span: float) -> None:
    async def main(loop: FakeTimeLoop) -> float:
        return await achieved_rate(RateGate(rate), workers=50, span=span)

    assert run(main, **REALISTIC) == pytest.approx(rate, rel=0.01)


def limit_req_refusals(times: list[float], rate: float, burst: int) -> int:
    """How many of ``times`` nginx's ``limit_req rate=<rate>r/s burst=<burst> nodelay``
    would refuse: a GCRA that lets ``burst`` requests beyond the pace through."""
    tat, refused = -math.inf, 0
    for t in times:
        if tat - t > burst / rate + 1e-9:
            refused += 1
        else:
            tat = max(tat, t) + 1 / rate
    return refused


async def paced_times(gate: RateGate, loop: FakeTimeLoop, *, workers: int, n: int) -> list[float]:
    times: list[float] = []

    async def worker() -> None:
        while len(times) < n:
            await gate.acquire()
            times.append(loop.time())

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
    return times[:n]


@pytest.mark.parametrize("timers", [REALISTIC, {"granularity": 0.001, "lateness": 0.003}])
def test_a_fixed_rate_just_under_a_small_burst_limiter_is_never_refused(
    timers: dict[str, float],
) -> None:
    # --rate 490/s against nginx limit_req 500 r/s burst=5 was refused 30% of the time:
    # late timers let the gate's 20 ms bucket (10 requests) out at once, and every pause
    # ended with one. Timers here wake up to 1.3 ms late, or 4 ms late every time.
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(490)
        times = await paced_times(gate, loop, workers=64, n=2000)
        gate.pause_for(1.0)  # a 429 from elsewhere: the run resumes after it
        return times + await paced_times(gate, loop, workers=64, n=500)

    times = run(main, **timers)
    assert limit_req_refusals(times, 500, 5) == 0
    assert limit_req_refusals(times, 500, 3) == 0  # never more than 3 beyond the pace


def test_late_timers_cost_no_rate_at_the_small_bucket() -> None:
    # Every wake-up 5 ms late: 500/s is kept within 1% with a bucket of 4.
    async def main(loop: FakeTimeLoop) -> float:
        return await achieved_rate(RateGate(500), workers=64, span=5.0)

    assert RateGate(500).burst == 4
    assert run(main, granularity=0.001, lateness=0.005) == pytest.approx(500, rel=0.01)


def test_after_a_pause_a_bigger_bucket_resumes_at_the_pace() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(100, burst=5)
        gate.pause_for(2)
        return sorted(await paced_times(gate, loop, workers=8, n=5))

    # One at once, then one every 10 ms: not the five the drained bucket would let out.
    assert run(main) == pytest.approx([2.0, 2.01, 2.02, 2.03, 2.04])


def test_bucket_of_one_loses_rate_to_late_timers() -> None:
    # Why the default burst grows with the rate: without it, each late wake-up is lost.
    async def main(loop: FakeTimeLoop) -> float:
        return await achieved_rate(RateGate(500, burst=1), workers=50, span=2.0)

    assert run(main, **REALISTIC) < 0.9 * 500


def test_explicit_burst_lets_that_many_through_at_once() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        return await acquire_times(RateGate(2, burst=3), loop, 5)

    assert run(main) == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0])


def test_unlimited_never_waits() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(None)
        assert gate.rate is None
        assert gate.burst is None
        return await acquire_times(gate, loop, 1000)

    assert set(run(main)) == {0.0}


def test_unlimited_still_waits_out_a_pause() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(None)
        gate.pause_for(3)
        return await acquire_times(gate, loop, 3)

    assert run(main) == pytest.approx([3.0, 3.0, 3.0])


def test_pause_holds_every_waiter_and_extension_moves_them_all() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(None)
        done: list[float] = []

        async def worker() -> None:
            await gate.acquire()
            done.append(loop.time())

        gate.pause_for(5)
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(worker)
            await anyio.sleep(2)
            assert done == []
            gate.pause_for(10)  # a second 429: the deadline moves from 5 to 12
            await anyio.sleep(2)
            gate.pause_for(1)  # shorter than what is left: no effect
            assert gate.paused_until == pytest.approx(12)
        return done

    assert run(main) == pytest.approx([12.0, 12.0, 12.0])


def test_after_a_pause_workers_resume_at_the_pace_not_in_a_burst() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(4)
        gate.pause_for(10)
        times: list[float] = []

        async def worker() -> None:
            await gate.acquire()
            times.append(loop.time())

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
        return sorted(times)

    assert run(main) == pytest.approx([10.0, 10.25, 10.5, 10.75])


def test_pause_started_while_queued_in_the_bucket_still_holds_the_request() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(1)
        await gate.acquire()  # t=0; the next slot is at t=1
        times: list[float] = []

        async def worker() -> None:
            await gate.acquire()
            times.append(loop.time())

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            await anyio.sleep(0.5)
            gate.pause_for(5)  # a 429 from another worker: locked out until 5.5
        return times

    assert run(main) == pytest.approx([5.5])


def test_set_rate_changes_the_pace() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(1)
        times = await acquire_times(gate, loop, 2)  # 0, 1
        gate.set_rate(4)
        assert gate.rate == 4
        # The bucket stays as full as it was (one just left at 1.0): no free burst.
        times += await acquire_times(gate, loop, 3)  # every 0.25 s after 1.0
        gate.set_rate(0.5)
        times += await acquire_times(gate, loop, 2)  # full again: 2 s after 1.75
        return times

    assert run(main) == pytest.approx([0.0, 1.0, 1.25, 1.5, 1.75, 3.75, 5.75])


def test_many_small_rate_changes_never_add_up_to_a_burst() -> None:
    """The pacer may trim the rate after every answer (stretching a budget); each change
    used to start an empty bucket, which let the run out at many times the rate."""

    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(10)
        times: list[float] = []
        for k in range(20):
            await gate.acquire()
            times.append(loop.time())
            gate.set_rate(10 - 0.1 * k)
        return times

    times = run(main)
    # 20 requests at just under 10/s: about 2 s, not 20 at once.
    assert times[-1] - times[0] >= 19 / 10.0


def test_burst_given_to_the_constructor_survives_set_rate() -> None:
    gate = RateGate(100, burst=1)
    gate.set_rate(1000)
    assert gate.burst == 1
    gate = RateGate(100)
    gate.set_rate(1000)
    assert gate.burst == default_burst(1000)


def test_set_rate_moves_tasks_already_waiting_in_the_bucket() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(0.1)  # one every 10 s
        await gate.acquire()
        times: list[float] = []

        async def worker() -> None:
            await gate.acquire()
            times.append(loop.time())

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(worker)
            await anyio.sleep(1)
            gate.set_rate(2)  # speeding up reaches tasks already queued
        return sorted(times)

    # The bucket keeps its fill (90% of it at t=1, the request at t=0 still in it), so
    # the first one waits that share of a new interval: never a burst from a change.
    assert run(main) == pytest.approx([1.45, 1.95, 2.45])


def test_set_rate_to_unlimited_releases_waiters() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(0.1)
        await gate.acquire()
        times: list[float] = []

        async def worker() -> None:
            await gate.acquire()
            times.append(loop.time())

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(worker)
            await anyio.sleep(1)
            gate.set_rate(None)
        return times

    assert run(main) == pytest.approx([1.0, 1.0, 1.0])


def test_cancelling_a_queued_waiter_leaves_the_pace_intact() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(1)
        await gate.acquire()
        with anyio.move_on_after(0.5):
            await gate.acquire()
        return await acquire_times(gate, loop, 2)

    assert run(main) == pytest.approx([1.0, 2.0])


def test_stats_count_acquisitions_pauses_and_paused_time() -> None:
    async def main(loop: FakeTimeLoop) -> GateStats:
        gate = RateGate(None)
        gate.pause_for(5)  # pause 1: 0..5
        await anyio.sleep(1)
        gate.pause_for(10)  # extends to 11: +6
        await acquire_times(gate, loop, 2)
        gate.pause_for(0)  # nothing to hold
        gate.pause_for(3)  # pause 2: 11..14
        await gate.acquire()
        return gate.stats

    stats = run(main)
    assert (stats.acquired, stats.pauses) == (3, 2)
    assert stats.paused_s == pytest.approx(14.0)


def test_injected_clock_drives_pause_bookkeeping() -> None:
    now = 100.0
    gate = RateGate(None, clock=lambda: now)
    assert gate.paused_until == -math.inf
    gate.pause_for(30)
    assert gate.paused_until == 130.0
    now = 120.0
    gate.pause_for(5)
    assert gate.paused_until == 130.0
    assert gate.stats == GateStats(acquired=0, pauses=1, paused_s=30.0)


@pytest.mark.parametrize("rate", [0, -1, math.nan, math.inf])
def test_rejects_bad_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        RateGate(rate)
    gate = RateGate(1)
    with pytest.raises(ValueError, match="rate"):
        gate.set_rate(rate)
    assert gate.rate == 1


@pytest.mark.parametrize("burst", [0, -3, True])
def test_rejects_bad_bursts(burst: int) -> None:
    with pytest.raises(ValueError, match="burst"):
        RateGate(10, burst=burst)


@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf])
def test_rejects_bad_pauses(seconds: float) -> None:
    gate = RateGate(None, clock=lambda: 0.0)
    with pytest.raises(ValueError, match="pause"):
        gate.pause_for(seconds)
