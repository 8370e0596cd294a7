"""Strict spacing: no two requests closer than 1/rate, lateness lost rather than made up,
and a told rate that turns strict and steps down after a 429. Fake clocks only."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from test_gate import REALISTIC, FakeTimeLoop, limit_req_refusals, paced_times, run
from test_pacing import Clock, answer

from dispatcher.sending.gate import HOLD_MAX_S, RateGate
from dispatcher.sending.pacing import TOLD_FLOOR, TOLD_STEP, TOLD_TOP, Pacer


def strict_gate(rate: float, loop: FakeTimeLoop) -> RateGate:
    return RateGate(rate, strict=True, timer=loop.time, spin=0.0)


@pytest.mark.parametrize("rate", [5.0, 20.0, 200.0, 500.0])
@pytest.mark.parametrize("timers", [{}, REALISTIC, {"granularity": 0.001, "lateness": 0.003}])
def test_no_two_sends_closer_than_one_interval(rate: float, timers: dict[str, float]) -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = strict_gate(rate, loop)
        times = await paced_times(gate, loop, workers=64, n=300)
        gate.pause_for(1.0)  # a 429: the run resumes after it, still strictly spaced
        times += await paced_times(gate, loop, workers=64, n=100)
        gate.set_rate(rate / 2)
        return times + await paced_times(gate, loop, workers=64, n=50)

    times = run(main, **timers)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps[:399]) >= 1 / rate - 1e-9
    assert min(gaps[400:]) >= 2 / rate - 1e-9
    # So a limiter without any burst (nginx's default) refuses none of them.
    assert limit_req_refusals(times, rate, 0) == 0


def test_a_late_wake_up_is_not_made_up_with_a_burst() -> None:
    # Every wake-up 3 ms late at 200/s (5 ms apart): each slot is lost for good, so the pace
    # falls to one per 8 ms, and never two within 5 ms to catch up.
    async def main(loop: FakeTimeLoop) -> list[float]:
        return await paced_times(strict_gate(200, loop), loop, workers=16, n=200)

    times = run(main, lateness=0.003)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.005 - 1e-9
    assert gaps[1:] == pytest.approx([0.008] * (len(gaps) - 1))


def test_the_bucket_would_have_made_it_up() -> None:
    # The baseline the test above is about: the small bucket spends its slack on lateness.
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(200)
        return await paced_times(gate, loop, workers=16, n=200)

    times = run(main, lateness=0.003)
    assert min(b - a for a, b in itertools.pairwise(times)) < 0.005


def test_the_spin_finishes_on_the_precise_timer() -> None:
    # A timer that moves on at every read, as perf_counter does while the loop spins: no
    # slot leaves before its due time.
    ticks = itertools.count()

    def timer() -> float:
        return next(ticks) * 1e-5

    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(500, strict=True, timer=timer, spin=0.001)
        stamps: list[float] = []
        for _ in range(20):
            await gate.acquire()
            stamps.append(timer())
        return stamps

    stamps = run(main)
    assert min(b - a for a, b in itertools.pairwise(stamps)) >= 0.002


class StrictFakeGate:
    def __init__(self) -> None:
        self.rate: float | None = None
        self.strict = False

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate

    def pause_for(self, seconds: float) -> None:
        pass

    def set_strict(self, strict: bool = True) -> None:
        self.strict = strict


def test_auto_spaces_strictly_from_the_start() -> None:
    gate = StrictFakeGate()
    Pacer(gate, None, auto=True, clock=Clock())
    assert gate.strict


def test_a_told_rate_keeps_its_bucket_until_a_429_then_turns_strict_and_steps_down() -> None:
    clock, gate = Clock(), StrictFakeGate()
    pacer = Pacer(gate, 200.0, auto=False, clock=clock)
    for _ in range(1000):  # 5 s of clean answers at the told rate
        clock.now += 0.005
        pacer.observe(answer(latency=0.001), in_flight=1)
    assert (gate.strict, gate.rate) == (False, 200.0)
    clock.now += 0.005
    pacer.observe(answer(429, retry_after=1.0, latency=0.001), in_flight=1)
    assert gate.strict
    assert gate.rate == pytest.approx(TOLD_STEP * 200)
    for _ in range(20_000):  # 100 s clean after: the creep never passes the told rate
        clock.now += 0.005
        pacer.observe(answer(latency=0.001), in_flight=1)
        assert gate.rate is not None
        assert gate.rate <= 200.0
    assert pacer.found is None  # a told run remembers nothing


def test_a_told_rate_creeps_back_to_just_under_the_rate_that_drew_a_429() -> None:
    clock, gate = Clock(), StrictFakeGate()
    pacer = Pacer(gate, 200.0, auto=False, clock=clock)
    clock.now += 0.005
    pacer.observe(answer(429, retry_after=1.0, latency=0.001), in_flight=1)
    for _ in range(2000):  # 10 s clean: back at 97% of 200/s, and held there
        clock.now += 0.005
        pacer.observe(answer(latency=0.001), in_flight=1)
    assert gate.rate == pytest.approx(TOLD_TOP * 200, rel=0.02)
    # Each further 429 takes 5% off the rate that drew it, never below half the told rate.
    for _ in range(40):
        clock.now += 2.0
        pacer.observe(answer(429, retry_after=1.0, latency=0.001), in_flight=1)
    assert gate.rate == pytest.approx(TOLD_FLOOR * 200)


def test_a_told_rate_under_a_policy_keeps_its_rate() -> None:
    clock, gate = Clock(), StrictFakeGate()
    pacer = Pacer(gate, 200.0, auto=False, clock=clock)
    pacer.observe(answer(429, q=1200, w=300, retry_after=1.0), in_flight=1)
    assert gate.rate == pytest.approx(0.98 * 1200 / 300)


class Answers:
    """Answers for a strict gate's slots: each ``latency`` s after it left, via the gate's
    ``answered`` (as the pacer reports them)."""

    def __init__(self, gate: RateGate, loop: FakeTimeLoop, latency: Callable[[int], float]):
        self.gate, self.loop, self.latency, self.sent = gate, loop, latency, 0

    async def send(self) -> None:
        await self.gate.acquire()
        k, self.sent = self.sent, self.sent + 1
        delay = self.latency(k)
        self.loop.call_later(delay, self.gate.answered, delay)


@pytest.mark.parametrize("stall", [0.003, 0.011])
def test_a_server_stall_holds_the_next_request_as_long(stall: float) -> None:
    # 200/s, answers in 0.3 ms, but the server sits on every 50th request for `stall` s
    # before stamping it: the next leaves 5 ms after that, not 5 ms after ours.
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = strict_gate(200, loop)
        answers = Answers(gate, loop, lambda k: stall + 0.0003 if k % 50 == 49 else 0.0003)
        times = []
        for _ in range(300):
            await answers.send()
            times.append(loop.time())
        return times

    times = run(main)
    stamps = [t + (stall if k % 50 == 49 else 0.0) for k, t in enumerate(times)]
    assert min(b - a for a, b in itertools.pairwise(stamps)) >= 0.005 - 1e-9
    # Only the requests after a stall were held: the pace otherwise stays at 200/s.
    assert len(times) / (times[-1] - times[0]) >= 200 * 300 / (300 + 6 * stall * 200) * 0.99


def test_a_hung_request_costs_one_slot_not_the_run() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = strict_gate(200, loop)
        answers = Answers(gate, loop, lambda k: 30.0 if k == 100 else 0.0003)
        times = []
        for _ in range(200):
            await answers.send()
            times.append(loop.time())
        return times

    times = run(main)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.005 - 1e-9
    assert max(gaps) <= 0.005 + HOLD_MAX_S + 1e-9
    assert sum(gap > 0.0051 for gap in gaps) == 1


def test_without_answers_reported_nothing_is_held() -> None:
    async def main(loop: FakeTimeLoop) -> list[float]:
        return await paced_times(strict_gate(200, loop), loop, workers=8, n=100)

    gaps = [b - a for a, b in itertools.pairwise(run(main))]
    assert gaps == pytest.approx([0.005] * len(gaps))


@pytest.mark.parametrize("rate", [20.0, 200.0, 500.0])
def test_a_told_rate_does_not_burst_at_the_start(rate: float) -> None:
    # A told rate's bucket starts with room for one request, not for its whole size: with
    # 64 workers starting together, the first second is spaced 1/rate, so a limiter without
    # a burst (nginx's default) refuses none of it. (A full bucket let 2 to 4 out at once.)
    async def main(loop: FakeTimeLoop) -> list[float]:
        gate = RateGate(rate)
        assert gate.burst is not None
        assert gate.burst > 1
        return await paced_times(gate, loop, workers=64, n=int(rate))

    times = run(main)
    # (The fake loop moves a timer set for "now" on by 1e-8 s, which aiolimiter's float
    # residue then shows as a gap a hair under 1/rate.)
    assert min(b - a for a, b in itertools.pairwise(times)) >= 1 / rate - 1e-7
    assert limit_req_refusals([t * (1 + 1e-5) for t in times], rate, 0) == 0
