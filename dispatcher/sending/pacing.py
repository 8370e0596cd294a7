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
4. **``--rate auto``** without a policy: :class:`~dispatcher.sending.search.Search`. Slow
   start is a ramp from :data:`AUTO_START` (a step per answer); each 429 ends a run, and a
   run's sends fit nginx's ``limit_req`` for every burst; a ramp's run and a steady run's
   meet at the limiter's burst and rate, which the rate then holds just under. A limit that
   came down is probed back up within seconds; one never seen higher after a minute.
   As soon as the server sends its policy, the rate jumps to the policy ceiling.
5. **Strict spacing.** Auto asks the gate for strict spacing from the start (no two requests
   closer than 1/rate: see :meth:`~dispatcher.sending.gate.RateGate.set_strict`), so a
   limiter without a burst (``limit_req`` with ``burst=0``) accepts every request under its
   rate and the search has one unknown, the rate. A told ``--rate`` keeps the gate's small
   bucket until its first 429 without a policy; then it turns strict and searches as auto
   does from there, the told rate its ceiling (the user's number is a ceiling, not a promise
   the server agreed to).

6. **Cloudflare's API** (``guarded``: see :func:`guarded`): a 429 there locks the whole
   account out for five minutes, so ``--rate auto`` never probes. It paces at the documented
   budget (1200 requests per 5 minutes, times :data:`SAFETY`) until the first
   ``Ratelimit-Policy`` says the budget, then at the policy's rate; a 429 without a policy
   only steps the rate down (:data:`BACKOFF`), never back up.

All time comes from an injected clock, so this is tested without sleeping.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol, runtime_checkable
from urllib.parse import urlsplit

from dispatcher.model import Outcome
from dispatcher.sending.search import AUTO_FLOOR, AUTO_START, Search

SAFETY: Final = 0.98
# Cloudflare's API: the documented account-wide budget (requests per second, 1200 per 5
# minutes), and the hosts where a 429 costs a five-minute lockout of the whole account.
CLOUDFLARE_BUDGET: Final = 1200 / 300
GUARDED_HOSTS: Final = frozenset({"api.cloudflare.com"})
DOUBLING: Final = 0.1  # s per doubling in slow start, while answers are clean
RAMP: Final = 1000.0  # requests/s per s at most in slow start (from 100/s on)
SLOW_START_STEP: Final = 0.05  # s between steps at least (and one clean answer)
SLOW_START_MAX: Final = 1.0  # s between steps at most, however few the answers
INTERVAL: Final = 0.5  # seconds between auto adjustments once the first 429 was seen
BACKOFF: Final = 0.85  # of the rate that drew a 429, when the answers tell nothing better
SLOW_START_BACKOFF: Final = 0.5  # the same, in slow start: the level before was clean
FIT_BURST: Final = 5  # requests a limiter is assumed to let through beyond its rate
FIT_SPAN: Final = 10.0  # s of sends the estimate looks back over
FIT_MIN: Final = 30  # admitted sends below which an estimate says little
SHARE: Final = 0.97  # of the estimated limit, right after an episode
TOP: Final = 0.99  # of where the creep aims: where it stops
BLUR: Final = 0.03  # share of the estimate answers' timing blurs (a loaded server lags)
STALL: Final = 0.015  # s: answers this slow around a 429 tell of a stalled server
STALL_FACTOR: Final = 5.0  # ... and this many times the usual latency
STALL_SEEN: Final = 0.1  # s before a 429 in which a stall counts
STALL_GAP: Final = 0.5  # ... seen as a gap in the answers this share of the slowest one
WIDE: Final = (1.03, 1.1)  # bounds this far apart (upper / lower): aim from middle to top
CLOSE: Final = 0.03  # within this share of where the creep stops, hold
HOLD: Final = 30.0  # s held clean just under the ceiling before probing past it
PROVEN: Final = 2.0  # s held clean after which a single 429 costs only 3% for long
PROBE: Final = 0.01  # growth past a ceiling held clean, per clean interval
# A told rate that drew a 429 (no policy): the step below the rate that drew it, where the
# creep back stops, and how low 429s can take it (of the told rate). Under strict spacing a
# 429 at a told rate says the limit is under it or the server stalled (see gate.py's hold),
# not by how much: a fit of the sends cut told 200/s to 53/s against nginx at 200/s.
TOLD_STEP: Final = 0.95
TOLD_TOP: Final = 0.97
TOLD_FLOOR: Final = 0.5
_MIN_STRETCH_RESET: Final = 2.0
_CHANGE: Final = 0.03  # ignore rate changes smaller than this fraction (each costs a bucket)
_SENDS: Final = 8192  # answers kept for the estimate (bounded memory)
_LATENCIES: Final = 64  # answers' latencies kept for the usual one
_REFINES: Final = 16  # late 2xx per episode that refine its estimate (each costs a scan)


class Steered(Protocol):
    """The part of a run's :class:`~dispatcher.sending.gate.Gate` the pacer drives."""

    @property
    def rate(self) -> float | None: ...

    def set_rate(self, rate: float | None) -> None: ...

    def pause_for(self, seconds: float) -> None: ...


@runtime_checkable
class Spaced(Protocol):
    """A gate that can space requests strictly (:class:`~dispatcher.sending.gate.RateGate`);
    one that cannot (a gate shared in Redis, whose GCRA spaces them already) is left be."""

    def set_strict(self, strict: bool = True) -> None: ...


@runtime_checkable
class Answered(Protocol):
    """A gate that holds the next request until the server can have stamped the last one
    (:meth:`~dispatcher.sending.gate.RateGate.answered`): fed every answer's round trip
    while the limit is searched for."""

    def answered(self, latency_s: float) -> None: ...


def guarded(base_url: str) -> bool:
    """Whether ``base_url`` is Cloudflare's API, where ``--rate auto`` must never probe past
    the announced budget (a 429 locks the account out for five minutes)."""
    try:
        host = urlsplit(base_url).hostname
    except ValueError:
        return False
    return host is not None and host.rstrip(".").lower() in GUARDED_HOSTS


def _close(rate: float | None, current: float | None) -> bool:
    if rate is None or current is None:
        return rate is current
    return abs(rate - current) <= _CHANGE * current


def _aim(low: float, high: float) -> float:
    """Where between an episode's bounds the creep aims: their middle while they are close,
    the upper bound once they are :data:`WIDE` apart. Wide bounds come from an episode with
    a short window of sends behind it (a slow limit: mostly the limiter's burst; or slow
    start crossing the limit just before its 429), and there the lower bound is the loose
    one: against nginx at 20/s the bounds were 15.8 and 19.7. Aiming at the upper bound
    costs one more 429 if the limit is lower, and that episode has seconds of sends behind
    it, which pin the limit; aiming at the middle cost a tenth of the run instead (a fifth
    at 8/s)."""
    near, far = WIDE
    weight = min(1.0, max(0.5, 0.5 + 0.5 * (high / low - near) / (far - near)))
    return low + weight * (high - low)


class Pacer:
    """Adapts one gate to what the server says. One per run, fed every answer."""

    __slots__ = (
        "_answered",
        "_answers",
        "_auto",
        "_auto_search",
        "_cap",
        "_ceiling_rate",
        "_climb",
        "_clock",
        "_decreased_at",
        "_episode_at",
        "_estimate",
        "_excused",
        "_floor",
        "_gate",
        "_guarded",
        "_held_since",
        "_high",
        "_last_remaining",
        "_last_tick",
        "_latencies",
        "_moved",
        "_policy_rate",
        "_quiet_until",
        "_refined",
        "_search",
        "_sends",
        "_share",
        "_slow_start",
        "_stretch_until",
        "_stretched_at",
        "_target",
        "_top",
        "_trouble",
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
        guarded: bool = False,
    ) -> None:
        """``requested``: the rate asked for (``None``: unlimited); ignored when ``auto``.

        ``share``: this run's part of the account's budget (``1/N`` for each of
        ``--processes N``), applied to what the headers say. ``remembered``: the ceiling an
        earlier run found for this endpoint and account (see :attr:`found`); ``auto``
        starts just under it instead of searching from :data:`AUTO_START`. ``guarded``
        (Cloudflare's API: :func:`guarded`): ``auto`` never probes, it paces at the
        documented budget until a policy header says the real one, and a 429 only slows
        it; nothing is remembered for the next run.
        """
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self._share = share
        self._gate = gate
        # Checked once: isinstance() against a runtime-checkable Protocol walks the
        # protocol's attributes on every call (3.5% of a send's samples, once per answer).
        self._answered = gate.answered if isinstance(gate, Answered) else None
        self._auto = auto
        # Whether answers steer the rate: from the start under auto, from its first 429
        # for a told rate, which is then the ceiling (``_cap``) the search stays under.
        self._guarded = auto and guarded
        self._search = auto and not self._guarded
        self._cap = None if auto else requested
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
        self._ceiling_rate: float | None = None  # the rate that drew the last 429
        self._episode_at = -math.inf  # when the request that started the episode was sent
        self._estimate: float | None = None  # the limit's lower bound, from the last episode
        self._refined = 0  # late 2xx of the episode taken into its estimate
        self._excused = False  # a 429 in slow start was put down to a stalled server
        self._floor = 0.0  # the episode under way lowers the rate no further than this
        self._climb = False  # ... and its 429 came at a rate proven clean: climb back
        self._top: float | None = None  # where the creep after an episode stops
        self._high: float | None = None  # the limit's upper bound, from the last episode
        self._held_since: float | None = None
        self._moved = False  # the search changed the target since the gate was last set
        self._sends: deque[tuple[float, bool]] = deque(maxlen=_SENDS)  # (sent at, 2xx)
        self._latencies: deque[tuple[float, float]] = deque(maxlen=_LATENCIES)  # (at, s)
        self._last_remaining: int | None = None
        self._window_end: float | None = None
        self._target: float | None = AUTO_START if auto else requested
        # Auto against a limiter that says nothing but 429 (see search.py).
        self._auto_search: Search | None = None
        if self._guarded:
            self._target = SAFETY * share * CLOUDFLARE_BUDGET
            self._slow_start = False
        elif auto:
            found = None if remembered is None else remembered * share
            self._auto_search = Search(now, remembered=found)
            self._target = self._auto_search.rate
        if auto:
            # A told rate keeps the gate's bucket until its first 429 (see _told_refused),
            # as issue 25 asks: it holds 500/s within 0.3%. Spaced strictly from the start,
            # a told 200/s got 75.7% against nginx at burst 5 (load ~4, no 429); the bucket
            # 79.3% with one 429. The bucket's start-up burst costs one 429 at burst 0.
            self._space_strictly()
        self._apply(self._target, force=True)

    def _space_strictly(self) -> None:
        if isinstance(self._gate, Spaced):
            self._gate.set_strict(True)

    @property
    def target(self) -> float | None:
        """The rate the pacer aims for now (before stretching for a short budget)."""
        return self._target

    @property
    def policy_rate(self) -> float | None:
        return self._policy_rate

    @property
    def found(self) -> float | None:
        """What auto learnt of the endpoint's limit, for the next run: the estimate from the
        last congestion episode, or the rate held clean since (whole-account rates, before
        ``share``). ``None`` when there is nothing to remember."""
        if not self._auto or self._guarded or self._policy_rate is not None:
            return None
        if self._auto_search is not None:
            found = self._auto_search.found
            return None if found is None else found / self._share
        if self._slow_start:
            return None
        rate = self._estimate if self._estimate is not None else self._target
        if rate is None or rate <= 0:
            return None
        return max(rate, self._target or 0.0) / self._share

    def _ceiling(self, rate: float | None) -> float | None:
        for cap in (self._policy_rate, self._cap if self._search else None):
            if cap is not None:
                rate = cap if rate is None else min(rate, cap)
        return rate

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
        if (
            outcome.status == 429
            and not self._search
            and self._cap is not None
            and self._policy_rate is None
        ):
            self._told_refused()
        searching = self._search and self._policy_rate is None
        if outcome.sent and self._policy_rate is None and self._answered is not None:
            self._answered(outcome.latency_s)
        search = self._auto_search
        if search is not None and self._policy_rate is None:
            if outcome.sent and (outcome.ok or outcome.status == 429):
                if search.answered(now, now - outcome.latency_s, outcome.ok):
                    self._target = search.rate
                    self._moved = True
                if outcome.status == 429 and outcome.retry_after is not None:
                    search.pause_until(now + outcome.retry_after)
            searching = False
        if searching and outcome.sent:
            self._latencies.append((now, outcome.latency_s))
        if outcome.status == 429:
            self._trouble = True
            if searching:
                self._congestion(now, outcome)
            elif self._guarded and self._policy_rate is None:
                self._guarded_refused(now, outcome)
        elif searching:
            if outcome.ok:
                sent = now - outcome.latency_s
                self._sends.append((sent, True))
                if self._auto and sent <= self._decreased_at and now <= self._quiet_until:
                    # Sent before the decrease, answered late: news for auto's fit. A told
                    # rate's step is its own (95% of it), whatever such answers say.
                    self._refine(sent)
            self._answers += 1
            self._tick(now)
        elif outcome.ok and self._cap is not None and self._policy_rate is None:
            # A told rate keeps its sends, for the estimate should a 429 ever come back.
            self._sends.append((now - outcome.latency_s, True))
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

    def _guarded_refused(self, now: float, outcome: Outcome) -> None:
        """A 429 from Cloudflare's API before any policy said the budget: others spend it
        too. Once per episode, the rate steps down to :data:`BACKOFF` of itself; it never
        climbs back (only a policy header raises it)."""
        if now - outcome.latency_s <= self._decreased_at:
            return  # sent before the last decrease: the same episode
        rate = self._target if self._target is not None else SAFETY * CLOUDFLARE_BUDGET
        self._target = max(AUTO_FLOOR, BACKOFF * rate)
        self._moved = True
        self._decreased_at = now

    def _told_refused(self) -> None:
        """A told rate drew a 429, and no policy says the budget: the server's limiter is at
        or under the told rate, and shows no burst to spare. Space strictly from now on, and
        let this 429 start an episode as under auto: the rate steps below the told one, to
        just under the limit the sends so far tell."""
        self._search = True
        self._slow_start = False
        self._space_strictly()

    def _fit(self, end: float) -> tuple[float, float, int] | None:
        """The limit's bounds from the sends so far: ``end`` is a send answered 2xx, and
        the episode's first refused send (:attr:`_episode_at`) came after some of them.

        In any ``d`` s a limiter of ``R``/s and burst ``b`` admits at most ``R * d + b + 1``
        (nginx's ``limit_req``, any GCRA), so each window ending at ``end`` gives ``R >=
        (admitted - b - 1) / d``, ``b`` taken as :data:`FIT_BURST`. The refused send says
        that over the window since the limiter's bucket was last empty, ``R < (admitted -
        b) / d``; that window is not known, so the bound is the largest over all. Also
        returned: how many sends the window that gave the lower bound admitted. A lower
        bound of 0 says the limiter let through no more than its burst.
        """
        sends = sorted(self._sends)
        refused = self._episode_at
        low = high = 0.0
        admitted = before = counted = 0
        since = max(end, refused) - FIT_SPAN
        for sent, ok in reversed(sends):
            if sent < since:
                break
            if not ok:
                continue
            if sent <= end:
                admitted += 1
                if end > sent and (admitted - 1 - FIT_BURST) / (end - sent) > low:
                    low, counted = (admitted - 1 - FIT_BURST) / (end - sent), admitted
            if sent < refused:
                before += 1
                high = max(high, (before - FIT_BURST) / (refused - sent))
        if low <= 0 and high <= 0:
            return None
        return low, max(low, high), counted

    def _settle(self, low: float, high: float, counted: int) -> None:
        """Aim just under the limit the episode showed, then creep towards the middle of
        its bounds, short of it by what the timing of answers blurs (:data:`BLUR`): a
        slow limit's bounds are far apart (few requests per window), a fast one's close."""
        cap = self._ceiling_rate if self._ceiling_rate is not None else math.inf
        self._estimate, self._high = low, high
        self._target = max(AUTO_FLOOR, self._floor, SHARE * min(low, cap))
        middle = max(low, _aim(low, high) - BLUR * low)
        self._top = max(self._target, TOP * min(middle, cap))
        if self._climb and counted < FIT_MIN and self._floor > SHARE * low:
            # A few answers since a pause say little (they may all be a burst of new
            # connections): climb back towards the rate that drew the 429.
            self._top = max(self._top, TOP * cap)
        self._moved = True

    def _refine(self, sent: float) -> None:
        """A 2xx sent before the episode's decrease, answered since (a limiter that queues
        answers late what it admitted): it may end, or fill, the window that tells most."""
        if self._ceiling_rate is None or self._refined >= _REFINES:
            return
        self._refined += 1
        latest = max(t for t, ok in self._sends if ok and t <= self._decreased_at)
        for end in {sent, latest}:
            fit = self._fit(end)
            if fit is not None and fit[0] > (self._estimate or 0.0):
                self._settle(*fit)

    def _congestion(self, now: float, outcome: Outcome) -> None:
        """A 429: one decrease per episode, however many requests it answers."""
        sent = now - outcome.latency_s
        self._sends.append((sent, False))
        if sent <= self._decreased_at:
            return  # sent before the last decrease: the same episode
        if not self._auto and self._cap is not None:
            self._told_congestion(now, outcome)
            return
        rate = self._target if self._target is not None else AUTO_START
        self._episode_at = sent
        self._refined = 0
        last_ok = max((t for t, ok in self._sends if ok and t < sent), default=None)
        if self._slow_start and not self._excused and self._stalled(now):
            self._excused = True  # once: on a busy machine stalls come all the time
            # The server stood still: what queued meanwhile reached its limiter at once,
            # a burst no pace below the limit avoids. Wait, then climb on from below.
            fit = None if last_ok is None else self._fit(last_ok)
            low = 0.0 if fit is None else SHARE * fit[0]
            self._target = max(AUTO_FLOOR, low, SLOW_START_BACKOFF * rate)
            self._moved = True
            self._pause_search(now, outcome)
            return
        self._ceiling_rate = rate
        # At a rate proven clean (under the last episode's estimate, or one remembered), one
        # episode takes at most 15% off it, however little the few answers since a pause
        # tell (a later episode takes more). Past the estimate (the creep aiming at the
        # upper bound) this 429 says the limit is below that rate, and the proof stands.
        proven = self._estimate
        self._climb = False
        if self._slow_start or proven is None:
            self._floor = 0.0
        elif rate > proven * (1 + CLOSE):
            self._floor = SHARE * proven
        else:
            self._floor, self._climb = BACKOFF * rate, True
        # A 429 after seconds held clean at this rate, under the limit estimated before, is
        # more likely a burst the server made of our pace (a stall) than the limit: climb
        # back to 97% of it. Were the limit lower, the next episode comes before the rate
        # has held clean again.
        held = (
            self._held_since is not None
            and now - self._held_since >= PROVEN
            and proven is not None
            and rate <= proven
        )
        fit = None if last_ok is None else self._fit(last_ok)
        if fit is not None and fit[0] > 0:
            self._settle(*fit)
            if held and self._top is not None:
                self._top = max(self._top, SHARE * rate)
        elif fit is not None and proven is None:
            # Only the limiter's burst got through (a slow limit, reached at once): no lower
            # bound, but the refusal bounds it from above. Aim just under that. (Not at a
            # rate proven clean: a 429 among the first requests of a run that starts from a
            # remembered ceiling says little, and climbs back as below.)
            high = min(fit[1], rate)
            self._estimate, self._high = None, high
            self._target = max(AUTO_FLOOR, SHARE * high)  # no floor: nothing was proven
            self._top = TOP * high
            self._moved = True
        else:
            backoff = SLOW_START_BACKOFF if self._slow_start else BACKOFF
            self._estimate, self._top = None, None
            self._target = max(AUTO_FLOOR, rate * backoff)
            self._moved = True
        self._slow_start = False
        self._pause_search(now, outcome)

    def _told_congestion(self, now: float, outcome: Outcome) -> None:
        """A told rate's episode: step to :data:`TOLD_STEP` of the rate that drew it, creep
        back to :data:`TOLD_TOP` of it and hold there (then probe on, as auto does), never
        under :data:`TOLD_FLOOR` of the told rate nor over it."""
        cap = self._cap if self._cap is not None else AUTO_START
        rate = self._gate.rate or self._target or cap
        floor = TOLD_FLOOR * cap
        self._ceiling_rate = rate
        self._estimate = self._high = None
        self._target = max(floor, TOLD_STEP * rate)
        self._top = max(self._target, TOLD_TOP * rate)
        self._moved = True
        self._slow_start = False
        self._pause_search(now, outcome)

    def _stalled(self, now: float) -> bool:
        """Whether answers just before a 429 took so much longer than usual that the server
        stood still (the first of the burst it then saw waited longest), and may have spent
        its limiter's burst on what queued meanwhile."""
        if len(self._latencies) < _LATENCIES // 2:
            return False
        usual = sorted(latency for _, latency in self._latencies)[len(self._latencies) // 2]
        since = now - STALL_SEEN
        slowest = max((latency for at, latency in self._latencies if at >= since), default=0.0)
        if slowest <= max(STALL, STALL_FACTOR * usual):
            return False
        # A stalled server answers nothing for a while, then everything at once: a gap in
        # the answers about as long as the slowest one took. A limiter that queues what it
        # admits (limit_req without nodelay) answers at its own pace throughout, each
        # answer a little later: slow answers, no gap (at most 1/burst of the delay).
        gap, previous = 0.0, None
        for at, _ in self._latencies:
            if previous is not None and at >= since:
                gap = max(gap, at - previous)
            previous = at
        return gap >= STALL_GAP * slowest

    def _pause_search(self, now: float, outcome: Outcome) -> None:
        self._decreased_at = now
        wait = outcome.retry_after if outcome.retry_after is not None else 0.0
        self._quiet_until = now + max(0.0, wait)
        self._last_tick = self._quiet_until
        self._answers = 0
        self._trouble = False
        self._held_since = None

    def _narrow(self, now: float) -> bool:
        """While the last episode's bounds are far apart (a slow limit: few sends before
        its 429, most of them the limiter's burst), sends held clean at the middle raise
        the lower bound: the creep then aims at the new middle. A bisection, so a slow
        limit is found in seconds, not after the 30 s hold; and its next 429, if any, comes
        with a long window of sends that pins the limit."""
        low, high, top = self._estimate, self._high, self._top
        if low is None or high is None or top is None or high <= top * (1 + 2 * CLOSE):
            return False
        last_ok = max((t for t, ok in self._sends if ok and t <= now), default=None)
        fit = None if last_ok is None else self._fit(last_ok)
        if fit is None or fit[0] <= low * (1 + _CHANGE):
            return False
        self._estimate = low = fit[0]
        cap = self._ceiling_rate if self._ceiling_rate is not None else math.inf
        middle = max(low, (low + high) / 2 - BLUR * low)
        self._top = max(top, TOP * min(middle, cap))
        return self._top > top

    def _tick(self, now: float) -> None:
        """Raise the auto rate after a clean stretch."""
        elapsed = now - self._last_tick
        target = self._target if self._target is not None else AUTO_START
        if self._slow_start:
            if elapsed < SLOW_START_MAX and (elapsed < SLOW_START_STEP or self._answers < 1):
                return
            self._last_tick, self._answers = now, 0
            # Doubling every 0.1 s of clean answers (at most twice between two answers),
            # but no faster than RAMP/s each second: how long the limiter stays saturated
            # before its first 429 is what the estimate has to go on, and a doubling
            # overshoots a fast limit so far that its burst lasts a few milliseconds.
            grown = target * 2.0 ** min(elapsed / DOUBLING, 2.0)
            self._target = min(grown, target + RAMP * min(elapsed, 2 * DOUBLING))
            self._moved = True
            return
        if elapsed < INTERVAL:
            return
        self._last_tick, self._answers = now, 0
        if self._trouble:
            self._trouble = False
            return
        top = self._top
        if top is None and self._ceiling_rate is not None:
            top = TOP * self._ceiling_rate
        if top is not None and target < top * (1 - CLOSE):
            target += (top - target) / 2  # halve the gap to where the creep stops
        elif top is not None:
            target = max(target, top)
            if self._held_since is None:
                self._held_since = now
            if now - self._held_since >= PROVEN and self._narrow(now):
                self._held_since = None  # bounds narrowed: creep on to their new middle
            elif now - self._held_since >= HOLD:
                # Held clean long enough: the limit may have moved.
                self._top = self._ceiling_rate = None
        else:
            target *= 1 + PROBE * min(elapsed / INTERVAL, 4.0)
        if self._cap is not None:
            target = min(target, self._cap)  # a told rate is a ceiling
        self._moved = target != self._target
        self._target = target
