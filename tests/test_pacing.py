"""Rate intelligence: the pacer on a fake clock, then against the emulator's limiter."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from dispatcher.emulator import Emulator, EmulatorConfig, Limit
from dispatcher.model import ErrorKind, Outcome, RateLimitInfo
from dispatcher.run import runner
from dispatcher.run.settings import Credentials, SendSettings, parse_rate
from dispatcher.sending.pacing import AUTO_START, SAFETY, Pacer


class FakeGate:
    def __init__(self) -> None:
        self.rate: float | None = None
        self.pauses: list[float] = []
        self.sets = 0

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        self.sets += 1

    def pause_for(self, seconds: float) -> None:
        self.pauses.append(seconds)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def answer(
    status: int = 200,
    *,
    r: int | None = None,
    t: float | None = None,
    q: int | None = None,
    w: float | None = None,
) -> Outcome:
    info = None
    if any(v is not None for v in (r, t, q, w)):
        info = RateLimitInfo(remaining=r, reset=t, quota=q, window=w)
    ok = status == 200
    return Outcome(
        status=status,
        ok=ok,
        sent=True,
        latency_s=0.01,
        error_kind=None if ok else ErrorKind.HTTP,
        ratelimit=info,
    )


def test_policy_header_caps_a_faster_requested_rate() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, 500.0, auto=False, clock=clock)
    assert gate.rate == 500.0
    pacer.observe(answer(r=1199, t=300, q=1200, w=300), in_flight=1)
    assert gate.rate == pytest.approx(SAFETY * 4.0)


def test_a_share_of_the_budget_for_each_of_several_processes() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock, share=0.5)
    pacer.observe(answer(r=1199, t=300, q=1200, w=300), in_flight=1)
    assert gate.rate == pytest.approx(SAFETY * 4.0 / 2)


def test_slower_requested_rate_is_kept() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, 2.0, auto=False, clock=clock)
    pacer.observe(answer(r=1199, t=300, q=1200, w=300), in_flight=1)
    assert gate.rate == 2.0


def test_budget_spent_by_others_stretches_the_pace_until_reset() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, 4.0, auto=False, clock=clock)
    # 300 left for the next 150 s: at 4/s it would run out after 75 s.
    pacer.observe(answer(r=300, t=150, q=1200, w=300), in_flight=1)
    assert gate.rate == pytest.approx(2.0)
    clock.now += 60
    pacer.observe(answer(q=1200, w=300), in_flight=1)  # no news of the budget
    assert gate.rate == pytest.approx(2.0)
    clock.now += 91  # past the reset we were told of
    pacer.observe(answer(r=1199, t=300, q=1200, w=300), in_flight=1)
    assert gate.rate == pytest.approx(SAFETY * 4.0)


def test_spent_budget_pauses_the_run_until_reset() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, 4.0, auto=False, clock=clock)
    pacer.observe(answer(r=2, t=40, q=1200, w=300), in_flight=3)
    assert gate.pauses == [40]


def test_auto_slow_start_doubles_then_halves_on_429() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock)
    assert gate.rate == AUTO_START
    for expected in (2.0, 4.0, 8.0):
        clock.now += 1.0
        pacer.observe(answer(), in_flight=1)
        assert gate.rate == pytest.approx(expected)
    pacer.observe(answer(429), in_flight=1)
    assert gate.rate == pytest.approx(4.0)
    # After the 429: one quiet interval, then additive increase, not doubling.
    clock.now += 1.0
    pacer.observe(answer(), in_flight=1)
    clock.now += 1.0
    pacer.observe(answer(), in_flight=1)
    assert 4.0 < gate.rate < 5.0


def test_auto_follows_the_policy_header_at_once() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock)
    pacer.observe(answer(r=49, t=1, q=50, w=1), in_flight=1)
    assert gate.rate == pytest.approx(SAFETY * 50)
    for _ in range(5):
        clock.now += 1
        pacer.observe(answer(r=40, t=1, q=50, w=1), in_flight=1)
    assert gate.rate == pytest.approx(SAFETY * 50)


def test_small_changes_do_not_churn_the_gate() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, 10.0, auto=False, clock=clock)
    before = gate.sets
    for _ in range(100):
        pacer.observe(answer(r=3000, t=100, q=4000, w=200), in_flight=1)
    assert gate.sets == before  # 10/s is under the policy and lasts: nothing to change


TOKEN = "tok-pacing-3391"


def settings_for(emu: Emulator, src: Path, out: Path, rate: str) -> SendSettings:
    return SendSettings(
        inputs=(str(src),),
        workflow="wf",
        account_id="acc",
        base_url=emu.base_url,
        credentials=Credentials(token=TOKEN),
        rate=parse_rate(rate),
        concurrency=8,
        results=str(out),
        quiet=True,
    )


def write_input(path: Path, n: int) -> Path:
    path.write_bytes(
        b"".join(
            orjson.dumps({"instance_id": f"p{k}", "event_type": "e"}) + b"\n" for k in range(n)
        )
    )
    return path


async def test_rate_at_the_limit_provokes_almost_no_429(tmp_path: Path) -> None:
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=Limit.parse("50/1s"))
    src = write_input(tmp_path / "in.jsonl", 250)
    async with Emulator(cfg) as emu:
        stats = await runner.run(settings_for(emu, src, tmp_path / "out.jsonl", "50/s"))
    assert stats.confirmed == 250
    assert stats.rate_limited <= 0.01 * stats.attempts


async def test_auto_rate_delivers_everything_near_the_limit(tmp_path: Path) -> None:
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=Limit.parse("50/1s"))
    src = write_input(tmp_path / "in.jsonl", 300)
    async with Emulator(cfg) as emu:
        stats = await runner.run(settings_for(emu, src, tmp_path / "out.jsonl", "auto"))
        accepted = sorted(t for times in emu.log.accepted.values() for t in times)
    assert stats.confirmed == 300
    # Goodput after the first 2 seconds, up to the last second before the input ran out.
    start, end = accepted[0] + 2.0, accepted[-1] - 0.5
    window = [t for t in accepted if start <= t < end]
    goodput = len(window) / (end - start)
    assert goodput >= 0.85 * 50
