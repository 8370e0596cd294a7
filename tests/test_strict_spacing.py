"""Strict spacing: no two requests closer than 1/rate, lateness lost rather than made up,
and a told rate that turns strict and steps down after a 429. Fake clocks only."""

from __future__ import annotations

import itertools

import pytest
from test_gate import REALISTIC, FakeTimeLoop, limit_req_refusals, paced_times, run
from test_pacing import Clock, answer

from dispatcher.sending.gate import RateGate
from dispatcher.sending.pacing import SHARE, Pacer


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
    assert gate.rate is not None
    assert SHARE * 0.9 * 200 <= gate.rate < 200
    for _ in range(20_000):  # 100 s clean after: the creep never passes the told rate
        clock.now += 0.005
        pacer.observe(answer(latency=0.001), in_flight=1)
        assert gate.rate is not None
        assert gate.rate <= 200.0
    assert pacer.found is None  # a told run remembers nothing


def test_a_told_rate_under_a_policy_stays_as_it_was() -> None:
    clock, gate = Clock(), StrictFakeGate()
    pacer = Pacer(gate, 200.0, auto=False, clock=clock)
    pacer.observe(answer(429, q=1200, w=300, retry_after=1.0), in_flight=1)
    assert not gate.strict
