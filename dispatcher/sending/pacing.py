"""Rate intelligence: reading the server's rate headers and adapting the run's gate.

Cloudflare's budget is account-wide and a single 429 locks the account out for the
whole window (five minutes on the real API), so the cheapest 429 is the one never
provoked. The :class:`Pacer` watches every answer and sets the gate's rate:

1. **Policy ceiling.** ``Ratelimit-Policy: "burst";q=Q;w=W`` says the budget; the run never
   goes faster than ``SAFETY * Q / W`` (95%: the server's window and ours never line up
   exactly), whatever ``--rate`` asked.
2. **Budget stretching.** ``Ratelimit: "default";r=R;t=T`` says what is left and when it comes
   back. Others (other tokens, the dashboard) spend the same budget, so when ``R`` would run
   out before ``T`` at the current pace the rate drops to ``R / T`` until the reset. Only
   for ``T`` of at least 2 s: the header counts whole seconds, so shorter resets are too
   coarse to divide by.
3. **Exhaustion guard.** When ``R`` is no more than the requests already in flight, the
   next request would be refused and lock the account out: the run pauses for ``T``
   (for resets under 2 s, only at ``R = 0``: ``T`` is rounded up to whole seconds).
4. **``--rate auto``** (AIMD, like TCP): start at 1 request/s; double every second of clean
   answers (slow start) until the first 429, then add ``max(0.5, 5%)`` per clean second;
   on a 429, after the run-wide pause for ``Retry-After``, halve. As soon as the server
   sends its policy, the rate jumps to the policy ceiling and stays under it.

All time comes from an injected clock, so this is tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from dispatcher.model import Outcome

SAFETY: Final = 0.95
AUTO_START: Final = 1.0  # requests/s before anything is known
AUTO_FLOOR: Final = 0.2
AUTO_STEP: Final = 0.5  # additive increase per clean second, at least
AUTO_STEP_FRACTION: Final = 0.05
INTERVAL: Final = 1.0  # seconds between auto adjustments
_MIN_STRETCH_RESET: Final = 2.0
_CHANGE: Final = 0.03  # ignore rate changes smaller than this fraction (each costs a bucket)


class Gate(Protocol):
    """What the pacer drives (the run's :class:`~dispatcher.sending.gate.RateGate`)."""

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
        "_auto",
        "_clock",
        "_gate",
        "_last_tick",
        "_policy_rate",
        "_share",
        "_slow_start",
        "_stretch_until",
        "_target",
        "_trouble",
    )

    def __init__(
        self,
        gate: Gate,
        requested: float | None,
        *,
        auto: bool,
        clock: Callable[[], float],
        share: float = 1.0,
    ) -> None:
        """``requested``: the rate asked for (``None``: unlimited); ignored when ``auto``.

        ``share``: this run's part of the account's budget (``1/N`` for each of
        ``--processes N``), applied to what the headers say.
        """
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self._share = share
        self._gate = gate
        self._auto = auto
        self._clock = clock
        self._policy_rate: float | None = None
        self._stretch_until = 0.0
        self._slow_start = True
        self._trouble = False
        self._last_tick = clock()
        self._target: float | None = AUTO_START if auto else requested
        self._apply(self._target, force=True)

    @property
    def target(self) -> float | None:
        """The rate the pacer aims for now (before stretching for a short budget)."""
        return self._target

    @property
    def policy_rate(self) -> float | None:
        return self._policy_rate

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
                if self._auto:
                    self._slow_start = False
                    self._target = policy
        if outcome.status == 429:
            self._trouble = True
            if self._auto and self._target is not None:
                # The pause itself comes from the policy's Retry-After; here, slow down.
                self._target = max(AUTO_FLOOR, self._target / 2)
                self._slow_start = False
                self._last_tick = now
        elif self._auto and now - self._last_tick >= INTERVAL:
            self._tick(now)
        stretched: float | None = None
        if info is not None and info.remaining is not None and info.reset is not None:
            # Requests still out will spend what is left. But a reset under 2 s is rounded
            # up to whole seconds, so a pause could cost a whole window: there, pause only
            # once the server itself says nothing is left.
            spoken_for = in_flight if info.reset >= _MIN_STRETCH_RESET else 0
            if info.remaining <= spoken_for and info.reset > 0:
                # Spent: anything sent now would be refused and start a lockout.
                self._gate.pause_for(info.reset)
            elif info.reset >= _MIN_STRETCH_RESET:
                pace = self._ceiling(self._target)
                lasting = self._share * info.remaining / info.reset
                if pace is None or lasting < pace:
                    stretched = lasting
                    self._stretch_until = now + info.reset
        if stretched is None and now < self._stretch_until:
            return  # keep the stretched pace until the reset we were told of
        rate = stretched if stretched is not None else self._ceiling(self._target)
        self._apply(rate)

    def _tick(self, now: float) -> None:
        """One clean interval has passed: raise the auto rate."""
        elapsed = now - self._last_tick
        self._last_tick = now
        if self._trouble:
            self._trouble = False
            return
        target = self._target if self._target is not None else AUTO_START
        if self._slow_start:
            target *= 2.0 ** min(elapsed / INTERVAL, 4.0)
        else:
            target += max(AUTO_STEP, AUTO_STEP_FRACTION * target) * (elapsed / INTERVAL)
        if self._policy_rate is not None:
            target = min(target, self._policy_rate)
        self._target = target
