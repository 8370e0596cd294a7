"""``--rate auto`` against a limiter that says nothing but 429: find its rate and burst.

Under strict spacing (no two requests closer than 1/rate: see
:meth:`~dispatcher.sending.gate.RateGate.set_strict`) a limiter refuses nothing at or under
its rate, whatever its burst. What is left to find is the rate ``R``, and the burst ``b``
only matters for reading the refusals: nginx's ``limit_req`` (any GCRA) keeps an *excess*
per key, ``e = max(0, e - R * dt + 1)`` for each request it admits (``dt`` since the last
one it admitted), and refuses a request whose excess would pass ``b``.

The search runs in *runs*, each from a pause's end (or the start) to its first 429:

1. **Ramp.** The rate grows on every answer, doubling every :data:`DOUBLING` s but by at
   most :data:`STEP` per answer, so near the limit consecutive requests differ by a few
   percent in spacing. Slow start is a ramp from :data:`AUTO_START`.
2. **An episode** (a 429 sent after the last decrease; 429s sent before it are the same
   episode). For each burst ``b`` the run's sends fix the rate at which that refusal comes
   exactly when it did (:func:`rate_for`). One run gives a curve ``R(b)``; two runs at
   different paces (a ramp, then a steady rate) cross at the limiter's ``(b, R)``
   (:func:`crossing`), which is what the search settles on.
3. **After an episode** the rate resumes just under what the runs say: with one run, under
   its ``R(0)`` (:data:`FIRST_SHARE`: were the burst bigger, the next run refuses within a
   few dozen requests and the two cross); with a crossing, :data:`SHARE` of it. A refusal
   right after a pause (the second request) says burst 0 and a limit far under the pace:
   the run resumes at half and ramps up, so the next refusal pins the limit.
4. **Hold and probe.** Held clean for :data:`HOLD` s, the rate ramps on past its ceiling
   slowly (the limit may have gone up). When an episode brought the rate under one held
   clean before (the limit went down), the probe back up comes after :data:`RECHECK` s
   instead, doubling the wait after each probe that drew a 429: a limit that comes back is
   followed within seconds, one that does not costs a pause per probe, less and less often.

Everything is pure arithmetic on an injected clock: tested without sleeping
(tests/test_search.py, and tests/test_pacing.py's nginx model).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Final

# requests/s before anything is known: the first answers tell a policy at once, and from
# 4/s (the API's documented rate) slow start spent its first 0.5 s at under 20/s
AUTO_START: Final = 20.0
AUTO_FLOOR: Final = 0.2
DOUBLING: Final = 0.1  # s per doubling while ramping
STEP: Final = 0.1  # most the rate grows per answer while ramping
PROBE_DOUBLING: Final = 2.0  # s per doubling when probing past a ceiling held clean
FIRST_SHARE: Final = 0.9  # of one run's R(0): the refusal came a step or two past it
SHARE: Final = 0.97  # of the limit two runs agree on
HOLD: Final = 60.0  # s held clean before probing past the ceiling
RECHECK: Final = 4.0  # s held clean under a rate held before, before probing back up
BURSTS: Final = (
    0,
    0.5,
    1,
    1.5,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    10,
    12,
    14,
    16,
    18,
    20,
    24,
    28,
    32,
    40,
    48,
    64,
)
SHORT: Final = 3  # admitted requests in a run under which its refusal tells little
AGREE: Final = 0.1  # runs whose R(b) differ by more than this share tell of a change
_RUN_SENDS: Final = 256  # sends of a run the fit reads (the last ones before the 429)
_SENDS: Final = 8192


@dataclass(frozen=True, slots=True)
class Run:
    """The sends of one run up to its refusal: ``(sent at, admitted)``, sorted, the refused
    one last."""

    sends: tuple[tuple[float, bool], ...]

    @property
    def admitted(self) -> int:
        return sum(1 for _, ok in self.sends if ok)


def excess(run: Run, rate: float) -> float:
    """The excess nginx would have found for the run's refused (last) send, in requests,
    were its limit ``rate``: the admitted sends before it update the state, starting empty."""
    e, last = 0.0, None
    for sent, ok in run.sends[:-1]:
        if not ok:
            continue
        e = 0.0 if last is None else max(0.0, e - rate * (sent - last) + 1.0)
        last = sent
    if last is None:
        return 0.0
    return max(0.0, e - rate * (run.sends[-1][0] - last) + 1.0)


def admitted_rate(run: Run) -> float:
    """The rate of the closest two admitted sends of the run in a row (``inf`` if none):
    a limiter of burst 0 is at least that fast."""
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(run.sends[:-1]) if a[1] and b[1]]
    closest = min((g for g in gaps if g > 0), default=math.inf)
    return 1.0 / closest if math.isfinite(closest) else math.inf


def rate_for(run: Run, burst: float) -> float | None:
    """The limit at which a limiter of ``burst`` refuses the run's last send: the largest
    ``R`` whose excess there passes ``burst`` (excess falls as ``R`` grows). ``None`` when
    no rate explains the refusal: fewer sends were admitted than the burst lets through."""
    if excess(run, 0.0) <= burst:
        return None
    low, high = 0.0, 1.0
    while excess(run, high) > burst:
        high *= 2.0
        if high > 1e7:
            return high
    for _ in range(30):
        mid = (low + high) / 2
        if excess(run, mid) > burst:
            low = mid
        else:
            high = mid
    return low


def crossing(first: Run, second: Run) -> tuple[float, float, float] | None:
    """``(burst, rate, spread)`` where two runs' curves ``R(b)`` meet: each refusal is
    explained by a limiter of that burst and rate. The curves may meet twice (a ramp's is
    convex, a steady run's straight): both limiters would have refused the same two
    requests, and the slower one is taken. Without a meeting, where they come closest, and
    how far apart they are there (as a share of the lower rate). ``None`` when no burst
    explains both runs."""

    def gap(burst: float) -> tuple[float, float] | None:
        a, b = rate_for(first, burst), rate_for(second, burst)
        if a is None or b is None or min(a, b) <= 0:
            return None
        return a - b, min(a, b)

    points = [(burst, g) for burst in BURSTS if (g := gap(burst)) is not None]
    if not points:
        return None
    met: list[tuple[float, float, float]] = []
    for (b0, (d0, _)), (b1, (d1, _)) in itertools.pairwise(points):
        if d0 == 0 or (d0 > 0) != (d1 > 0):
            low, high = b0, b1
            for _ in range(20):
                mid = (low + high) / 2
                g = gap(mid)
                if g is None:
                    break
                if (g[0] > 0) == (d0 > 0) and g[0] != 0:
                    low = mid
                else:
                    high = mid
            g = gap(low)
            if g is not None:
                met.append((low, g[1], abs(g[0]) / g[1]))
    if met:
        return min(met, key=lambda m: m[1])
    burst, (d, rate) = min(points, key=lambda p: abs(p[1][0]) / p[1][1])
    return burst, rate, abs(d) / rate


class Search:
    """The rate ``--rate auto`` sets while no policy header is known. Fed every answer."""

    __slots__ = (
        "_burst",
        "_cap",
        "_clock",
        "_decreased_at",
        "_estimate",
        "_held_since",
        "_last",
        "_peak",
        "_quiet_until",
        "_ramp",
        "_ramp_doubling",
        "_recheck",
        "_recovering",
        "_run_from",
        "_runs",
        "_sends",
        "episodes",
        "rate",
    )

    def __init__(self, clock_now: float, *, remembered: float | None = None) -> None:
        self.rate = AUTO_START
        self.episodes = 0
        self._sends: deque[tuple[float, bool]] = deque(maxlen=_SENDS)
        self._runs: list[Run] = []  # the runs since the limit last seemed to change
        self._run_from = -math.inf  # sends from here on belong to the current run
        self._decreased_at = -math.inf
        self._quiet_until = -math.inf
        self._last = clock_now  # when the ramp last grew
        self._ramp = True  # growing on each answer (slow start, a probe)
        self._ramp_doubling = DOUBLING
        self._cap = math.inf  # a ramp stops here
        self._burst: float | None = None  # the limiter's burst, once two runs agree
        self._estimate: float | None = None  # the limit the runs tell
        self._held_since: float | None = None
        self._peak = 0.0  # the highest rate held clean for HOLD / RECHECK s
        self._recheck = RECHECK
        self._recovering: float | None = None  # where the ramp after a short run began
        if remembered is not None and math.isfinite(remembered) and remembered > 0:
            self._estimate = remembered
            self.rate = max(AUTO_FLOOR, SHARE * remembered)
            self._ramp = False
            self._held_since = clock_now

    @property
    def found(self) -> float | None:
        """The limit to remember for the next run: the estimate, or the rate held clean
        since if higher; ``None`` while nothing is known (no episode, no ceiling)."""
        if self._estimate is None:
            return None
        return max(self._estimate, self.rate)

    @property
    def burst(self) -> float | None:
        return self._burst

    def answered(self, now: float, sent: float, ok: bool) -> bool:
        """A 2xx (``ok``) or 429 for a request sent at ``sent``; ``True`` when the rate
        changed."""
        self._sends.append((sent, ok))
        if not ok:
            return self._refused(now, sent)
        return self._grow(now)

    def _grow(self, now: float) -> bool:
        if now < self._quiet_until:
            return False
        if self._ramp:
            elapsed = max(0.0, now - self._last)
            self._last = now
            # Far under where a ramp stops, bigger steps: the limit is near the top.
            step = 3 * STEP if math.isfinite(self._cap) and self.rate < self._cap / 2 else STEP
            grown = self.rate * min(1.0 + step, float(2.0 ** (elapsed / self._ramp_doubling)))
            if grown >= self._cap:
                grown, self._ramp = self._cap, False
                self._held_since = now
            changed = grown != self.rate
            self.rate = grown
            return changed
        if self._held_since is None:
            self._held_since = now
        held = now - self._held_since
        if self._peak and self.rate >= self._peak and held >= RECHECK:
            # Held clean for seconds back at the rate held before the limit came down: the
            # limit is back.
            self._estimate = max(self._estimate or 0.0, self._peak)
            self._peak, self._recheck = 0.0, RECHECK
        below_peak = self._peak > (self._estimate or self.rate) * (1 + AGREE)
        if held >= HOLD or (below_peak and held >= self._recheck):
            self._peak = max(self._peak, self.rate)
            # Probe: ramp on, slowly past a ceiling held long, at once back to a rate held
            # before the limit came down (and no further: were the limit back, a ramp past
            # it would cost a pause to learn what the rate held before already says).
            self._ramp, self._last = True, now
            self._ramp_doubling = DOUBLING if below_peak else PROBE_DOUBLING
            self._cap = self._peak if below_peak else math.inf
            if below_peak:
                self._recheck *= 2.0
        return False

    def _run(self, sent: float) -> Run:
        sends = sorted(s for s in self._sends if s[0] >= self._run_from and s[0] <= sent)
        return Run(tuple(sends[-_RUN_SENDS:]))

    def _refused(self, now: float, sent: float) -> bool:
        if sent <= self._decreased_at:
            return False  # sent before the last decrease: the same episode
        self.episodes += 1
        pace, probing = self.rate, self._ramp
        run = self._run(sent)
        self._decreased_at = now
        if not self._ramp and self._held_since is not None and now - self._held_since >= RECHECK:
            self._peak = max(self._peak, pace)  # held clean for seconds: it was the limit
        self._held_since = None
        if run.admitted <= SHORT:
            # Refused among the first requests of a run: the limit is under this pace by
            # how much a few requests at one pace do not tell (two such runs tell the same,
            # whatever the pace). Resume at a quarter and ramp up to it: a ramp's refusal
            # pins the limit. Refused right after the first request, the burst is 0.
            if run.admitted <= 1:
                self._burst = 0.0
            self._runs = []
            if self._recovering is not None:
                # Again, on the ramp up from the last such refusal: the limit is under where
                # that ramp began, or just over it. Ramp up again from half of it.
                self._resume(now, min(pace, self._recovering) / 2, ramp_to=pace)
            else:
                self._resume(now, pace / 4, ramp_to=pace)
            self._recovering = self.rate
            return True
        self._recovering = None
        if self._burst is None:
            runs = [*self._runs[-1:], run]
            fit = crossing(runs[0], runs[1]) if len(runs) > 1 else None
            if fit is not None and fit[2] > AGREE:
                fit = None  # the runs disagree: the limit moved; start over from this run
                runs = [run]
            self._runs = runs
            if fit is None:
                # One run: were the burst bigger than 0, the next run is refused within a
                # few dozen requests and the two runs cross. A run held clean for hundreds
                # of requests proves its pace whatever the burst (a stall, more likely).
                self._estimate = min(rate_for(run, 0.0) or pace, pace)
                long = run.admitted >= _RUN_SENDS - 1
                self._resume(now, (SHARE if long else FIRST_SHARE) * self._estimate)
                return True
            # nginx counts its burst in whole requests; at the nearest whole one, the
            # lower of the two runs' rates.
            burst = float(round(fit[0]))
            known = [r for r in (rate_for(r, burst) for r in runs) if r is not None and r > 0]
            self._burst = burst
            self._estimate = min([fit[1], pace, *known])
            self._resume(now, SHARE * self._estimate)
            return True
        # The burst is known: this run alone tells the limit (it may have moved).
        rate = rate_for(run, self._burst) or rate_for(run, 0.0) or pace
        if self._burst == 0:
            # Burst 0: the refused spacing bounds the limit from above, the closest spacing
            # admitted from below; between them lies a ramp's step. Take the lower.
            rate = min(rate, admitted_rate(run))
        self._estimate = min(rate, pace)
        if probing and self._estimate >= self._peak * (1 - AGREE):
            self._peak, self._recheck = 0.0, RECHECK  # back at the rate held before
        self._resume(now, SHARE * self._estimate)
        return True

    def _resume(self, now: float, rate: float, *, ramp_to: float | None = None) -> None:
        self.rate = max(AUTO_FLOOR, rate)
        self._run_from = now
        self._quiet_until = now  # the caller's pause holds the sends; answers may come on
        self._last = now
        if ramp_to is not None:
            self._ramp, self._cap, self._ramp_doubling = True, ramp_to, DOUBLING
        else:
            self._ramp, self._cap = False, math.inf

    def pause_until(self, until: float) -> None:
        """The run is paused until ``until``: the next run starts there, the ramp too."""
        self._run_from = max(self._run_from, until)
        self._quiet_until = max(self._quiet_until, until)
        self._last = max(self._last, until)
