"""Rate intelligence: the pacer on a fake clock, then against the emulator's limiter."""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from dispatcher.emulator import Emulator, EmulatorConfig, Limit
from dispatcher.model import ErrorKind, Outcome, RateLimitInfo
from dispatcher.results.ledger import load_ceiling, save_ceiling
from dispatcher.run import runner
from dispatcher.run.settings import Credentials, SendSettings, parse_rate
from dispatcher.sending.pacing import (
    CLOUDFLARE_BUDGET,
    INTERVAL,
    SAFETY,
    SHARE,
    Pacer,
    guarded,
)
from dispatcher.sending.search import AUTO_START, DOUBLING, FIRST_SHARE, STEP


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
    retry_after: float | None = None,
    latency: float = 0.01,
) -> Outcome:
    info = None
    if any(v is not None for v in (r, t, q, w)):
        info = RateLimitInfo(remaining=r, reset=t, quota=q, window=w)
    ok = status == 200
    return Outcome(
        status=status,
        ok=ok,
        sent=True,
        latency_s=latency,
        error_kind=None if ok else ErrorKind.HTTP,
        retry_after=retry_after,
        ratelimit=info,
    )


@dataclass
class SimRun:
    wall: float
    attempts: int
    refused: int
    accepted: list[float]
    found: float | None


class SimGate:
    """A perfect pacer's gate on simulated time: the rate and pause-until, nothing else."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.paused_until = -math.inf
        self.now = 0.0
        self.rates: list[tuple[float, float]] = []  # (when, rate) each time it was set

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate
        if rate is not None:
            self.rates.append((self.now, rate))

    def pause_for(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.now + seconds)


@dataclass
class Sent:
    """What a simulated run did: when each 2xx came back, attempts, 429s, the last time."""

    accepted: list[float]
    attempts: int
    refused: int
    wall: float


def send_all(
    gate: SimGate,
    pacer: Pacer,
    records: int,
    server: Callable[[float], tuple[bool, float]],
    retry_after: float = 1.0,
) -> Sent:
    """Send ``records`` through ``pacer``'s ``gate`` on simulated time. ``server(sent at)``
    says whether the request is admitted and when its answer comes back. Every 429 pauses
    the run for ``retry_after``, as the engine does; the refused record is sent again."""
    pending, attempts, refused, in_flight, seq = records, 0, 0, 0, 0
    accepted: list[float] = []
    answers: list[tuple[float, int, bool, float]] = []  # (when, seq, ok, sent at)
    next_send = now = 0.0
    while len(accepted) < records:
        send_at = max(next_send, gate.paused_until) if pending else math.inf
        if answers and answers[0][0] <= send_at:
            now, _, ok, sent_at = heapq.heappop(answers)
            gate.now = now
            in_flight -= 1
            status = 200 if ok else 429
            pacer.observe(
                answer(status, retry_after=None if ok else retry_after, latency=now - sent_at),
                in_flight,
            )
            if ok:
                accepted.append(now)
            else:
                refused += 1
                gate.pause_for(retry_after)
                pending += 1
            continue
        now = gate.now = send_at
        pending -= 1
        attempts += 1
        in_flight += 1
        ok, done = server(now)
        seq += 1
        heapq.heappush(answers, (done, seq, ok, now))
        next_send = now + (1 / gate.rate if gate.rate else 0.0)
    return Sent(accepted, attempts, refused, now)


def simulate(
    limit: float,
    records: int,
    *,
    burst: int = 5,
    delay: bool = False,
    rtt: float = 0.002,
    retry_after: float = 1.0,
    remembered: float | None = None,
    stalls: tuple[float, float, float] | None = None,
    told: float | None = None,
) -> SimRun:
    """Send ``records`` with ``--rate auto`` through nginx's ``limit_req`` (a GCRA of
    ``limit``/s with ``burst``; refused requests answer 429 with ``Retry-After``, and with
    ``delay`` the ones within the burst wait for their turn instead of passing at once).
    ``stalls=(every, length, first)``: the server stops for ``length`` s every ``every`` s
    from ``first`` on (a busy machine), and what arrived meanwhile reaches the limiter at
    once, as a burst. ``told``: ``--rate told/s`` instead of auto."""
    gate = SimGate()
    pacer = Pacer(gate, told, auto=told is None, clock=lambda: gate.now, remembered=remembered)
    tat = 0.0  # the limiter's theoretical arrival time

    def server(now: float) -> tuple[bool, float]:
        nonlocal tat
        arrive = now + rtt / 2
        if stalls is not None and arrive >= stalls[2]:
            phase = (arrive - stalls[2]) % stalls[0]
            if phase < stalls[1]:
                arrive += stalls[1] - phase
        tat = max(tat, arrive)
        if tat - arrive > burst / limit + 1e-12:
            return False, arrive + rtt / 2
        done = (tat if delay else arrive) + rtt / 2
        tat += 1 / limit
        return True, done

    sent = send_all(gate, pacer, records, server, retry_after)
    return SimRun(
        wall=sent.wall,
        attempts=sent.attempts,
        refused=sent.refused,
        accepted=sent.accepted,
        found=pacer.found,
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


def test_auto_slow_start_ramps_a_step_per_answer() -> None:
    # A ramp, not a staircase: each answer adds at most STEP (10%), and no more than a
    # doubling per 0.1 s of time, so near the limit consecutive requests differ by a few
    # percent in spacing and the first refusal tells where the limit is.
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock)
    assert gate.rate == AUTO_START
    clock.now += 0.25  # an answer after a long silence: one step, not 2.5 doublings
    pacer.observe(answer(), in_flight=0)
    assert gate.rate == pytest.approx(AUTO_START * (1 + STEP))
    before = gate.rate or 0.0
    clock.now += 0.001  # at hundreds per second, a millisecond's worth of doubling
    pacer.observe(answer(), in_flight=0)
    assert gate.rate == pytest.approx(before * 2 ** (0.001 / DOUBLING))


def test_one_episode_of_many_429s_is_one_decrease() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock, remembered=64 / SHARE)
    assert gate.rate == pytest.approx(64.0)
    # 32 requests were in flight when the limiter started refusing: all 32 come back 429
    # over the next 20 ms, each sent before the first of them was answered.
    first: float | None = None
    for k in range(32):
        clock.now += 0.000625
        pacer.observe(answer(429, retry_after=1.0, latency=0.05), in_flight=31 - k)
        first = gate.rate if first is None else first
    after = gate.rate or 0.0
    assert after == first
    assert after < 64.0
    # A 429 for a request sent after that decrease is news: a second episode.
    clock.now += 1.5
    pacer.observe(answer(429, retry_after=1.0, latency=0.01), in_flight=0)
    assert (gate.rate or 0.0) < after


def test_an_early_429_takes_at_most_a_tenth_off_a_remembered_ceiling() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock, remembered=500.0)
    before = gate.rate
    assert before is not None
    assert before == pytest.approx(500.0 * SHARE)
    for _ in range(10):  # 10 answers in 20 ms: far too few to say where the limit is
        clock.now += 0.002
        pacer.observe(answer(latency=0.001), in_flight=1)
    clock.now += 0.002
    pacer.observe(answer(429, retry_after=1.0, latency=0.001), in_flight=0)
    # A second run of --rate auto at 500/s was held at 42% of it for the whole run when
    # such a 429 was taken as the limit's measure (the 10 answers "admitted" ~200/s).
    assert (gate.rate or 0.0) >= FIRST_SHARE * before * 0.99


def test_one_429_after_seconds_held_clean_costs_about_3_percent() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock, remembered=200.0)

    def clean(seconds: float) -> None:  # answers at the gate's pace
        for _ in range(int(seconds * 190)):
            clock.now += 1 / (gate.rate or 190.0)
            pacer.observe(answer(latency=0.001), in_flight=1)

    clean(3.0)
    before = gate.rate
    assert before is not None
    # A stalled server turned the pace into a burst; then clean answers again.
    pacer.observe(answer(429, retry_after=1.0, latency=0.001), in_flight=0)
    clock.now += 1.0
    clean(3.0)
    assert (gate.rate or 0.0) >= SHARE * before * 0.999


def test_recovers_within_seconds_after_one_episode() -> None:
    gate, clock = FakeGate(), Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock, remembered=100.0)
    before = gate.rate
    assert before is not None
    # Others spent the budget for a moment: one 429, then clean answers at the pace.
    pacer.observe(answer(429, retry_after=1.0, latency=0.01), in_flight=0)
    assert (gate.rate or 0.0) < before
    recovered_at = None
    for k in range(1, 2000):
        clock.now += 0.01
        pacer.observe(answer(), in_flight=0)
        if recovered_at is None and (gate.rate or 0.0) >= 0.97 * before:
            recovered_at = k * 0.01
    # Back to 97% of the rate before in a few seconds of clean answers (it took 45 s when
    # each 429 of one lockout halved the rate again).
    assert recovered_at is not None
    assert recovered_at <= 1 + 3 * INTERVAL + 0.1  # the Retry-After, then three steps


@pytest.mark.parametrize("delay", [False, True], ids=["nodelay", "delay"])
@pytest.mark.parametrize("limit", [10, 12, 15, 20, 30, 50, 100, 200, 300, 500])
def test_auto_converges_to_an_unannounced_limit(limit: int, delay: bool) -> None:
    # 25 s of records at R through a GCRA of burst 5 (429 with Retry-After: 1), with and
    # without nodelay. Two episodes at most (a ramp's and a steady run's refusals cross at
    # the limiter's burst and rate: see search.py), each costing the 1 s Retry-After; the
    # issue's grid against nginx's whole-millisecond clock is in test_search.py. Not met
    # here: 5 to 8/s (2.4 to 12% of attempts refused: runs of a few requests tell little).
    run = simulate(limit, limit * 25, delay=delay)
    assert run.refused <= 0.02 * run.attempts
    late = [t for t in run.accepted if t >= 10.0]
    assert (len(late) - 1) / (late[-1] - late[0]) >= 0.89 * limit
    assert run.found is not None
    assert 0.9 * limit <= run.found <= 1.12 * limit


@pytest.mark.parametrize("limit", [20, 200, 500])
def test_a_remembered_ceiling_skips_the_search(limit: int) -> None:
    first = simulate(limit, limit * 12)
    second = simulate(limit, limit * 12, remembered=first.found)
    assert second.refused == 0
    assert limit * 12 / second.wall >= 0.89 * limit
    assert second.wall < first.wall


def test_spent_short_window_pauses_to_its_end_not_a_whole_second() -> None:
    gate, clock = FakeGate(), Clock()
    Pacer(gate, 19.0, auto=False, clock=clock)
    pacer = Pacer(gate, 19.0, auto=False, clock=clock)
    pacer.observe(answer(r=19, t=1, q=20, w=1), in_flight=0)  # the window's first request
    for r in range(18, -1, -1):
        clock.now += 0.05
        pacer.observe(answer(r=r, t=1, q=20, w=1), in_flight=0)
    # The 20th answer, 0.95 s in, says nothing is left; "t=1" is rounded up to whole
    # seconds, but the window began with the first answer: 0.05 s to go, not 1 s.
    assert gate.pauses == [pytest.approx(0.05)]


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


async def test_rate_just_under_an_announced_short_window_keeps_its_pace(tmp_path: Path) -> None:
    # 19/s under 20/1s: the 20th request of a window is often answered r=0, t=1 (t rounds
    # up). Pausing for that whole second cut the pace to 13.9/s; the window ends sooner.
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=Limit.parse("20/1s"))
    src = write_input(tmp_path / "in.jsonl", 100)
    async with Emulator(cfg) as emu:
        stats = await runner.run(settings_for(emu, src, tmp_path / "out.jsonl", "19/s"))
        accepted = sorted(t for times in emu.log.accepted.values() for t in times)
    assert stats.confirmed == 100
    assert stats.rate_limited == 0
    assert stats.paused_s < 0.5
    assert (len(accepted) - 1) / (accepted[-1] - accepted[0]) >= 0.9 * 19


def test_the_ceiling_found_is_remembered_per_endpoint_and_account(tmp_path: Path) -> None:
    results = str(tmp_path / "out.jsonl")
    at = datetime.now(UTC)
    assert load_ceiling(results, "http://a/client/v4", "acc") is None
    save_ceiling(results, "http://a/client/v4", "acc", 196.5, at)
    save_ceiling(results, "http://b/client/v4", "acc", 20.0, at)
    assert load_ceiling(results, "http://a/client/v4/", "acc") == 196.5
    assert load_ceiling(results, "http://a/client/v4", "other") is None
    assert load_ceiling(results, "http://b/client/v4", "acc") == 20.0
    Path(f"{results}.ceiling.json").write_text("{not json")
    assert load_ceiling(results, "http://a/client/v4", "acc") is None  # a hint, not a must


def auto_settings(base_url: str | None = None) -> SendSettings:
    """A ``--rate auto`` send's settings; ``base_url`` None: the default, Cloudflare's API."""
    settings = SendSettings(
        inputs=("in.jsonl",),
        workflow="wf",
        account_id="acc",
        credentials=Credentials(token=TOKEN),
        rate=parse_rate("auto"),
    )
    return settings if base_url is None else dataclasses.replace(settings, base_url=base_url)


def test_auto_starts_just_under_a_remembered_ceiling() -> None:
    settings = auto_settings("http://127.0.0.1:8787/client/v4")  # not Cloudflare's: it probes
    gate, _ = runner.gate_for(settings, remembered=200.0)
    assert gate.rate == pytest.approx(200.0 * SHARE)
    gate, _ = runner.gate_for(settings)
    assert gate.rate == AUTO_START


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.cloudflare.com/client/v4", True),
        ("https://API.Cloudflare.com./client/v4", True),
        ("http://127.0.0.1:8787/client/v4", False),
        ("https://api.cloudflare.com.example.net/client/v4", False),
    ],
)
def test_only_cloudflares_api_is_guarded(url: str, expected: bool) -> None:
    assert guarded(url) is expected


def test_auto_never_probes_past_the_budget_against_cloudflares_api() -> None:
    # The default base URL is Cloudflare's API: there a 429 locks the account out for five
    # minutes, so auto paces at the documented budget (1200 per 5 minutes), not slow start
    # from 20/s, and neither clean answers nor a remembered ceiling take it higher.
    settings = auto_settings()
    gate, pacer = runner.gate_for(settings, remembered=200.0)
    budget = SAFETY * CLOUDFLARE_BUDGET
    assert gate.rate == pytest.approx(budget)
    clock = Clock()
    pacer = Pacer(gate, None, auto=True, clock=clock, guarded=True)
    for _ in range(2000):  # 8 min of clean answers without rate headers
        clock.now += 0.25
        pacer.observe(answer(latency=0.05), in_flight=1)
        assert gate.rate is not None
        assert gate.rate <= budget + 1e-9
    # A 429 with no policy: others spend the budget too. The rate steps down, and stays.
    clock.now += 0.25
    pacer.observe(answer(429, retry_after=300.0, latency=0.05), in_flight=1)
    stepped = gate.rate
    assert stepped is not None
    assert stepped < budget
    for _ in range(2000):
        clock.now += 0.3
        pacer.observe(answer(latency=0.05), in_flight=1)
        assert gate.rate == stepped
    # The policy header wins: the announced budget, never more.
    pacer.observe(answer(r=599, t=300, q=600, w=300), in_flight=1)
    assert gate.rate == pytest.approx(SAFETY * 600 / 300)
    assert pacer.found is None  # nothing learnt by probing, nothing to remember


@pytest.mark.parametrize("rtt", [0.002, 0.05, 0.2])
@pytest.mark.parametrize("limit", [20.0, 200.0])
def test_a_told_rate_over_a_strict_limit_steps_under_it_however_late_the_answers(
    limit: float, rtt: float
) -> None:
    # Told 3% over a limiter of burst 0: the 429 makes the told rate step to 95% of itself
    # and creep to 97%, under the limit. With a 50-ms round trip, the 2xx sent before the
    # 429 and answered after it were read by the auto fit (which takes a burst of 5): the
    # told rate fell to two thirds of the limit.
    run = simulate(limit, int(30 * limit), burst=0, rtt=rtt, told=1.03 * limit)
    goodput = len(run.accepted) / run.wall / limit
    assert goodput >= 0.9
    assert run.refused <= 0.01 * len(run.accepted)
