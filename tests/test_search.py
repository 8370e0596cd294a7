"""``--rate auto`` against a limiter that says nothing but 429 (dispatcher/sending/search.py):
the fit of nginx's ``limit_req`` to a run's sends, and whole runs through a model of nginx
on simulated time."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
from test_pacing import SimGate, send_all

from dispatcher.sending.pacing import Pacer
from dispatcher.sending.search import AUTO_START, Run, Search, crossing, excess, rate_for


class Nginx:
    """``limit_req`` as nginx 1.22 runs it: ``excess`` in requests, stamped on a clock of
    whole milliseconds (``ngx_current_msec``); a request whose excess would pass ``burst``
    is refused and changes nothing."""

    def __init__(self, rate: float, burst: float, quantum: float = 0.001) -> None:
        self.rate, self.burst, self.quantum = rate, burst, quantum
        self._excess = 0.0
        self._last: float | None = None

    def admit(self, at: float) -> bool:
        stamp = math.floor(at / self.quantum) * self.quantum if self.quantum else at
        last = self._last
        e = 0.0 if last is None else max(0.0, self._excess - self.rate * (stamp - last) + 1.0)
        if e > self.burst + 1e-9:
            return False
        self._excess = e
        if last is None or stamp > last:
            self._last = stamp
        return True


@dataclass
class Ran:
    goodput: float  # 2xx per second from the first send to the last 2xx, as a share of R
    refused: int
    records: int
    rates: list[tuple[float, float]]  # (when, rate) each time the pacer set it


def through_nginx(
    limit: float,
    burst: float,
    *,
    seconds: float = 30.0,
    rtt: float = 0.001,
    changes: tuple[tuple[float, float], ...] = (),
    jitter: float = 0.0,
    stall: tuple[float, float] | None = None,
    seed: int = 1,
) -> Ran:
    """``seconds`` x ``limit`` records with ``--rate auto`` through :class:`Nginx`, 429s with
    ``Retry-After: 1`` pausing the run as the engine does (the refused record is sent
    again). ``changes``: ``(at, factor)``, the limit is ``factor`` x ``limit`` from ``at`` s.
    ``jitter``: up to this many s added to each request's way to nginx. ``stall``: ``(at,
    length)``, nginx stands still: what arrives meanwhile it reads at the end, together."""
    rnd = random.Random(seed)
    gate = SimGate()
    pacer = Pacer(gate, None, auto=True, clock=lambda: gate.now)
    nginx = Nginx(limit, burst)
    records = int(limit * seconds)

    def server(now: float) -> tuple[bool, float]:
        arrive = now + rtt / 2 + rnd.random() * jitter
        if stall is not None and stall[0] <= arrive < stall[0] + stall[1]:
            arrive = stall[0] + stall[1]
        nginx.rate = limit * next((f for at, f in reversed(changes) if arrive >= at), 1.0)
        return nginx.admit(arrive), arrive + rtt / 2

    sent = send_all(gate, pacer, records, server)
    return Ran(len(sent.accepted) / sent.accepted[-1] / limit, sent.refused, records, gate.rates)


def steady(rate: float, n: int, start: float = 0.0) -> list[float]:
    return [start + k / rate for k in range(n)]


def run_of(times: list[float], nginx: Nginx) -> Run:
    """Send at ``times`` until nginx refuses one: the run up to that refusal."""
    sends = []
    for t in times:
        ok = nginx.admit(t)
        sends.append((t, ok))
        if not ok:
            return Run(tuple(sends))
    raise AssertionError("nothing was refused")


def test_excess_is_what_nginx_counts() -> None:
    # At 100/s a request every 5 ms adds half a request of excess to the first one's 0: the
    # 4th finds 1.5.
    run = Run((*((t, True) for t in steady(200.0, 4)[:-1]), (0.015, False)))
    assert excess(run, 100.0) == pytest.approx(1.5)
    assert excess(run, 200.0) == pytest.approx(0.0)


@pytest.mark.parametrize(("limit", "burst"), [(100.0, 0), (100.0, 5), (300.0, 20)])
def test_a_steady_run_tells_the_limit_once_the_burst_is_known(limit: float, burst: int) -> None:
    run = run_of(steady(1.5 * limit, 1000), Nginx(limit, burst, quantum=0.0))
    found = rate_for(run, burst)
    assert found is not None
    assert 0.9 * limit <= found <= 1.5 * limit
    if burst:
        assert found == pytest.approx(limit, rel=0.04)


@pytest.mark.parametrize(("limit", "burst"), [(200.0, 5), (500.0, 20), (20.0, 5)])
def test_a_ramp_and_a_steady_run_cross_at_the_limiters_burst_and_rate(
    limit: float, burst: int
) -> None:
    # One refusal fits a limiter of any burst, at a rate for each; a ramp's and a steady
    # run's rates for each burst meet at the limiter's own.
    ramp: list[float] = []
    t, r = 0.0, AUTO_START
    while t < 3.0 and r < 10 * limit:
        ramp.append(t)
        t += 1 / r
        r *= min(1.1, 2 ** ((1 / r) / 0.1))
    first = run_of(ramp, Nginx(limit, burst, quantum=0.0))
    pace = 0.9 / (first.sends[-1][0] - first.sends[-2][0])
    second = run_of(steady(pace, 10_000, start=10.0), Nginx(limit, burst, quantum=0.0))
    fit = crossing(first, second)
    assert fit is not None
    b, rate, spread = fit
    assert round(b) == burst
    assert rate == pytest.approx(limit, rel=0.05)
    assert spread < 0.01


def test_a_refusal_right_after_the_first_request_says_burst_0_and_ramps_from_a_quarter() -> None:
    search = Search(0.0)
    search.answered(0.001, 0.0, ok=True)
    assert search.answered(0.05, 0.05, ok=False)
    assert search.burst == 0
    pace = search.rate
    assert pace == pytest.approx(AUTO_START / 4, rel=0.15)
    search.pause_until(1.05)
    t = 1.05
    for _ in range(5):
        t += 1 / search.rate
        search.answered(t, t, ok=True)
    assert search.rate > 1.4 * pace  # ramping back up, a step per answer


# The grid (30-s runs, RTT 0), as this model of nginx runs it. The cells the model
# misses: 5/s at every burst, 20/s at burst 20, 500/s at bursts 5 and 20 (docs/rate.md).
MET = [(20, 0), (20, 5), (200, 0), (200, 5), (200, 20), (500, 0)]


@pytest.mark.parametrize(("limit", "burst"), MET)
def test_auto_meets_the_goal_against_nginx(limit: int, burst: int) -> None:
    ran = through_nginx(limit, burst)
    assert ran.goodput >= 0.9
    assert ran.refused <= 0.02 * ran.records


@pytest.mark.parametrize("burst", [0, 5])
@pytest.mark.parametrize("limit", [200, 500])
def test_auto_follows_a_limit_halved_then_doubled_within_ten_seconds(
    limit: int, burst: int
) -> None:
    ran = through_nginx(limit, burst, seconds=40, changes=((10.0, 0.5), (20.0, 1.0)))

    def rate_at(t: float) -> float:
        return next(r for when, r in reversed(ran.rates) if when <= t)

    assert rate_at(9.9) >= 0.9 * limit
    assert 0.8 * limit / 2 <= rate_at(20.0) <= limit / 2  # from 10 s to 20 s: halved
    assert rate_at(30.0) >= 0.9 * limit  # within 10 s of the limit coming back


def test_a_stall_while_held_costs_a_few_percent_not_the_search() -> None:
    # nginx stood still 20 ms at 12 s: what queued reached it as a burst, refused at the
    # held pace. One pause and a step down, not a search from scratch.
    ran = through_nginx(200, 0)
    held = next(r for when, r in reversed(ran.rates) if when <= 11.0)
    stalled = through_nginx(200, 0, stall=(12.0, 0.02))
    assert stalled.goodput >= ran.goodput - 0.05  # a 1 s pause and 3%, not a new search
    after = next(r for when, r in reversed(stalled.rates) if when <= 15.0)
    assert after >= 0.96 * held
