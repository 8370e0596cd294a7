"""Cloudflare-style rate limiting: a fixed window per credential, then a lockout.

Model: each credential's window opens with its first request and lasts ``window`` seconds;
the first ``quota`` requests in it pass. The request after that starts a lockout of
``lockout`` seconds during which every request of that credential is refused (the refused
ones do not extend it). When the lockout ends the credential starts a fresh window.

Time is passed in by the caller, so tests move a number instead of sleeping.
"""

from __future__ import annotations

from typing import NamedTuple

from dispatcher.emulator.units import ceil_seconds


class Verdict(NamedTuple):
    """The limiter's answer to one request.

    ``reset`` is whole seconds (rounded up, >= 1) until the budget comes back: the end of
    the window, or of the lockout. ``retry_after`` is set only when refused.
    """

    allowed: bool
    remaining: int
    reset: int
    retry_after: int | None


class _Budget:
    __slots__ = ("locked_until", "start", "used")

    def __init__(self, start: float) -> None:
        self.start = start
        self.used = 0
        self.locked_until = 0.0


class FixedWindowLimiter:
    """Per-key budgets of ``quota`` requests per ``window`` seconds, with a lockout."""

    __slots__ = ("_budgets", "_lockout", "_quota", "_window")

    def __init__(self, quota: int, window: float, lockout: float) -> None:
        self._quota = quota
        self._window = window
        self._lockout = lockout
        self._budgets: dict[str, _Budget] = {}

    def hit(self, key: str, now: float) -> Verdict:
        """Spend one request of ``key``'s budget at time ``now`` (seconds, monotonic)."""
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = _Budget(now)
        elif budget.locked_until:
            if now < budget.locked_until:
                wait = ceil_seconds(budget.locked_until - now)
                return Verdict(False, 0, wait, wait)
            budget.start, budget.used, budget.locked_until = now, 0, 0.0
        elif now >= budget.start + self._window:
            budget.start, budget.used = now, 0
        if budget.used >= self._quota:
            budget.locked_until = now + self._lockout
            wait = ceil_seconds(self._lockout)
            return Verdict(False, 0, wait, wait)
        budget.used += 1
        return Verdict(
            True, self._quota - budget.used, ceil_seconds(budget.start + self._window - now), None
        )

    def reset(self) -> None:
        self._budgets.clear()
