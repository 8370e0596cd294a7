"""Rate intelligence: reading the server's rate headers and adapting the run's gate.

Cloudflare's budget is account-wide and a single 429 locks the account out for the
whole window (five minutes on the real API), so the cheapest 429 is the one never
provoked. The :class:`Pacer` watches every answer and sets the gate's rate:

1. **Policy ceiling.** ``Ratelimit-Policy: "burst";q=Q;w=W`` says the budget; the run never
   goes faster than ``SAFETY * Q / W`` (98%: the server's window and ours never line up
   exactly), whatever ``--rate`` asked.
2. **Budget stretching.** ``Ratelimit: "default";r=R;t=T`` says what is left and when it comes
   back. Others (other tokens, the dashboard) spend the same budget, so when ``R`` would run
   out before ``T`` at the current pace the rate drops to ``R / T`` until the reset. Only
   for ``T`` of at least 2 s: the header counts whole seconds, so shorter resets are too
   coarse to divide by.
3. **Exhaustion guard.** When ``R`` is no more than the requests already in flight, the
   next request would be refused and lock the account out: the run pauses until the
   reset. For resets under 2 s only at ``R = 0``, and ``T`` (rounded up to whole seconds,
   so up to a whole window too long) is replaced by the end of the window as seen from
   here: one window after the answer that showed the budget refilled.
4. **``--rate auto``** without a policy: a search, one decision per congestion episode.
   Slow start doubles the rate after every few clean answers (at least 0.1 s apart) from
   4/s. A 429 starts an episode: the rate that drew it is the *ceiling*; the rate drops to
   half of it (in slow start) or 85% of it, and never above 97% of the goodput just
   measured (a limiter that queues admits exactly its rate). 429s answering requests sent
   before that drop are the same episode and change nothing. Each clean second then
   halves the gap to the ceiling; within 3% of it the rate holds for 30 s before probing
   past it by 5% a second. A ceiling remembered from an earlier run starts the search
   there. As soon as the server sends its policy, the rate jumps to the policy ceiling.

All time comes from an injected clock, so this is tested without sleeping.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from dispatcher.model import Outcome

SAFETY: Final = 0.98
AUTO_START: Final = 4.0  # requests/s before anything is known (the API's documented 4/s)
AUTO_FLOOR: Final = 0.2
SLOW_START_ANSWERS: Final = 3  # clean answers per doubling
SLOW_START_MIN: Final = 0.1  # s per doubling at least: a limiter's burst hides an overshoot
SLOW_START_MAX: Final = 1.0  # s per doubling at most, however few the answers
INTERVAL: Final = 0.5  # seconds between auto adjustments once the first 429 was seen
BACKOFF: Final = 0.85  # of the rate that drew a 429, outside slow start
SLOW_START_BACKOFF: Final = 0.5  # the level before was clean
GOODPUT_SHARE: Final = 0.97  # of the goodput measured just before a 429
GOODPUT_WINDOW: Final = 0.2  # s of 2xx answers the goodput is measured over
CLOSE: Final = 0.03  # within this share of the ceiling, hold
HOLD: Final = 30.0  # s held clean just under the ceiling before probing past it
PROBE: Final = 0.05  # growth past a ceiling held clean, per clean interval
# The gate's bucket under --rate auto: a limiter nobody announced may tolerate little burst
# (nginx's limit_req: none unless configured), and the gate's usual 20 ms of traffic (10
# requests at 500/s) would be refused in part after any late timer.
AUTO_BURST: Final = 2
_MIN_STRETCH_RESET: Final = 2.0
_CHANGE: Final = 0.03  # ignore rate changes smaller than this fraction (each costs a bucket)
_OK_TIMES: Final = 4096  # answers kept for the goodput measure (bounded memory)


class Steered(Protocol):
    """The part of a run's :class:`~dispatcher.sending.gate.Gate` the pacer drives."""

    @property
    def rate(self) -> float | None: ...

    def set_rate(self, rate: float | None) -> None: ...

    def pause_for(self, seconds: float) -> None: ...


def _close(rate: float | None, current: float | None) -> bool:
    if rate is None or current is None:
        return rate is current
    return abs(rate - current) <= _CHANGE * current


class Pacer:
    """Adapts one gate to what the server says. One per run, fed every answer."""

    __slots__ = (
        "_answers",
        "_auto",
        "_ceiling_rate",
        "_clock",
        "_decreased_at",
        "_gate",
        "_good",
        "_held_since",
        "_last_remaining",
        "_last_tick",
        "_moved",
        "_ok_times",
        "_policy_rate",
        "_quiet_until",
        "_share",
        "_slow_start",
        "_stretch_until",
        "_stretched_at",
        "_target",
        "_trouble",
        "_unproven",
        "_window_end",
    )

    def __init__(
        self,
        gate: Steered,
        requested: float | None,
        *,
        auto: bool,
        clock: Callable[[], float],
        share: float = 1.0,
        remembered: float | None = None,
    ) -> None:
        """``requested``: the rate asked for (``None``: unlimited); ignored when ``auto``.

        ``share``: this run's part of the account's budget (``1/N`` for each of
        ``--processes N``), applied to what the headers say. ``remembered``: the ceiling an
        earlier run found for this endpoint and account (see :attr:`found`); ``auto``
        starts just under it instead of searching from :data:`AUTO_START`.
        """
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self._share = share
        self._gate = gate
        self._auto = auto
        self._clock = clock
        self._policy_rate: float | None = None
        self._stretch_until = 0.0
        self._stretched_at = -math.inf
        self._slow_start = True
        self._trouble = False
        now = clock()
        self._last_tick = now
        self._answers = 0
        self._decreased_at = -math.inf
        self._quiet_until = -math.inf
        self._ceiling_rate: float | None = None  # the lowest rate that drew a 429 lately
        self._good = 0.0  # the fastest rate held clean for a whole interval
        self._held_since: float | None = None
        self._unproven = False  # out of slow start by a 429, no rate held clean since
        self._moved = False  # the search changed the target since the gate was last set
        self._ok_times: deque[float] = deque(maxlen=_OK_TIMES)
        self._last_remaining: int | None = None
        self._window_end: float | None = None
        self._target: float | None = AUTO_START if auto else requested
        if auto and remembered is not None and math.isfinite(remembered) and remembered > 0:
            self._ceiling_rate = remembered * share
            self._target = max(AUTO_FLOOR, remembered * share * (1 - CLOSE))
            self._slow_start = False
        self._apply(self._target, force=True)

    @property
    def target(self) -> float | None:
        """The rate the pacer aims for now (before stretching for a short budget)."""
        return self._target

    @property
    def policy_rate(self) -> float | None:
        return self._policy_rate

    @property
    def found(self) -> float | None:
        """What auto learnt of the endpoint's limit, for the next run: the fastest rate held
        clean, or the rate just under the lowest one that drew a 429 (whole-account rates,
        before ``share``). ``None`` when there is nothing to remember."""
        if not self._auto or self._policy_rate is not None:
            return None
        target = self._target or 0.0
        rate = target if self._ceiling_rate is not None and target <= self._ceiling_rate else 0.0
        if rate <= 0 and not self._slow_start:
            rate = self._good
        return rate / self._share if rate > 0 else None

    def _ceiling(self, rate: float | None) -> float | None:
        if self._policy_rate is None:
            return rate
        return self._policy_rate if rate is None else min(rate, self._policy_rate)

    def _apply(self, rate: float | None, *, force: bool = False) -> None:
        if not force and _close(rate, self._gate.rate):
            return
        self._gate.set_rate(rate)

    def observe(self, outcome: Outcome, in_flight: int) -> None:
        """Take one answer into account; ``in_flight`` counts requests still out."""
        now = self._clock()
        info = outcome.ratelimit
        if info is not None and info.quota is not None and info.window:
            policy = SAFETY * self._share * info.quota / info.window
            if self._policy_rate is None or abs(policy - self._policy_rate) > 1e-9:
                self._policy_rate = policy
                if self._target is None or policy < self._target:
                    self._moved = True  # a ceiling under the target applies however close
                if self._auto:
                    self._slow_start = False
                    self._target = policy
        searching = self._auto and self._policy_rate is None
        if outcome.status == 429:
            self._trouble = True
            if searching:
                self._congestion(now, outcome)
        elif searching:
            if outcome.ok:
                self._ok_times.append(now)
            self._answers += 1
            self._tick(now)
        stretched: float | None = None
        if info is not None and info.remaining is not None and info.reset is not None:
            self._track_window(now, info.remaining, info.window, in_flight)
            # Requests still out will spend what is left. But a reset under 2 s is rounded
            # up to whole seconds, so a pause could cost a whole window: there, pause only
            # once the server itself says nothing is left, and only to the window's end.
            spoken_for = in_flight if info.reset >= _MIN_STRETCH_RESET else 0
            if info.remaining <= spoken_for and info.reset > 0:
                # Spent: anything sent now would be refused and start a lockout.
                self._gate.pause_for(self._until_reset(now, info.reset))
            elif info.reset >= _MIN_STRETCH_RESET:
                pace = self._ceiling(self._target)
                lasting = self._share * info.remaining / info.reset
                if pace is None or lasting < pace:
                    stretched = lasting
                    self._stretch_until = now + info.reset
        if stretched is None and now < self._stretch_until:
            return  # keep the stretched pace until the reset we were told of
        rate = stretched if stretched is not None else self._ceiling(self._target)
        # A step of the search is applied however small: it comes at most once an interval.
        moved, self._moved = self._moved, False
        if stretched is not None and now - self._stretched_at < INTERVAL:
            # Each change hands out a fresh bucket, and the budget left moves with every
            # answer: re-stretch at most once an interval (the guard still pauses in time).
            return
        if stretched is not None:
            self._stretched_at = now
        self._apply(rate, force=moved and stretched is None)

    def _track_window(
        self, now: float, remaining: int, window: float | None, in_flight: int
    ) -> None:
        """Note when the server's window began: when ``remaining`` went up by more than
        answers overtaking each other can explain, or the last one must have ended."""
        last = self._last_remaining
        self._last_remaining = remaining
        # Past the end of the window we know of, an answer that still finds budget left is
        # from a new window; one saying nothing is left answers a request of the old one.
        ended = self._window_end is not None and now >= self._window_end and remaining > 0
        if window and (last is None or ended or remaining > last + in_flight):
            # It began before this answer arrived, so it ends no later than a window on.
            self._window_end = now + window

    def _until_reset(self, now: float, reset: float) -> float:
        if reset < _MIN_STRETCH_RESET and self._window_end is not None:
            left = self._window_end - now
            if left < reset:
                return max(0.0, left)  # at most until the latest the window can end
        return reset

    def _goodput(self, now: float) -> float | None:
        """2xx answers per second over the last :data:`GOODPUT_WINDOW`, if it was unpaused."""
        start = now - GOODPUT_WINDOW
        if start < self._quiet_until or len(self._ok_times) < SLOW_START_ANSWERS:
            return None
        times = self._ok_times
        if times[0] > start:
            return None  # not a whole window of answers kept
        count = 0
        for t in reversed(times):
            if t < start:
                break
            count += 1
        return count / GOODPUT_WINDOW

    def _congestion(self, now: float, outcome: Outcome) -> None:
        """A 429: one decrease per episode, however many requests it answers."""
        if now - outcome.latency_s <= self._decreased_at:
            return  # sent before the last decrease: the same episode
        rate = self._target if self._target is not None else AUTO_START
        self._ceiling_rate = rate
        if self._slow_start or self._unproven:
            new = rate * SLOW_START_BACKOFF  # nothing held clean yet: the limit may be far
            self._unproven = True
        elif 0 < self._good < rate:
            # The limit lies between the fastest rate held clean and this one. A limiter's
            # burst hides a small excess for a while, so the 429 may answer an earlier,
            # slower step of the climb: the ceiling is taken halfway.
            new = self._good
            self._ceiling_rate = (self._good + rate) / 2
        else:
            # Refused at a rate that had looked clean: the limiter's burst had hidden it.
            new = rate * BACKOFF
            self._good = 0.0
        # Answered slower than sent: the limiter held us to about its rate. (Not in slow
        # start, where the window spans slower steps of the climb.)
        goodput = None if self._slow_start else self._goodput(now)
        if goodput is not None and goodput < rate:
            new = min(new, GOODPUT_SHARE * goodput)
            self._ceiling_rate = min(self._ceiling_rate, goodput)
        self._target = max(AUTO_FLOOR, new)
        self._moved = True
        self._slow_start = False
        self._decreased_at = now
        wait = outcome.retry_after if outcome.retry_after is not None else 0.0
        self._quiet_until = now + max(0.0, wait)
        self._last_tick = self._quiet_until
        self._answers = 0
        self._trouble = False
        self._held_since = None

    def _tick(self, now: float) -> None:
        """Raise the auto rate after a clean stretch."""
        elapsed = now - self._last_tick
        target = self._target if self._target is not None else AUTO_START
        if self._slow_start:
            if elapsed < SLOW_START_MAX and (
                elapsed < SLOW_START_MIN or self._answers < SLOW_START_ANSWERS
            ):
                return
            self._last_tick, self._answers = now, 0
            self._target = target * 2.0
            self._moved = True
            return
        if elapsed < INTERVAL:
            return
        self._last_tick, self._answers = now, 0
        if self._trouble:
            self._trouble = False
            return
        self._unproven = False
        self._good = max(self._good, target)
        ceiling = self._ceiling_rate
        if ceiling is not None and target < ceiling * (1 - CLOSE):
            target += (ceiling - target) / 2  # halve the gap to the rate that drew a 429
        elif ceiling is not None and target < ceiling:
            if self._held_since is None:
                self._held_since = now
            if now - self._held_since >= HOLD:
                self._ceiling_rate = None  # held clean long enough: the limit may have moved
        else:
            target *= 1 + PROBE * min(elapsed / INTERVAL, 4.0)
        self._moved = target != self._target
        self._target = target
