"""The retry policy: what to do after each attempt, as pure functions of the outcome.

Nothing here sleeps, reads a clock or touches a socket: the engine passes in the outcome,
its counters and a random source, and carries out the :class:`Decision` it gets back.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from dispatcher.model import ErrorKind, Outcome

__all__ = [
    "Classification",
    "Decision",
    "Final",
    "FinalReason",
    "Retry",
    "RetryPolicy",
    "backoff",
    "classify",
]

Classification: TypeAlias = Literal["ok", "rate_limited", "retryable", "permanent"]
FinalReason: TypeAlias = Literal["ok", "permanent", "exhausted", "rate_limited"]

# Cloudflare's "internal error": the API's own fault, worth another try whatever the status.
CF_INTERNAL_ERROR: typing.Final = 10001

_RETRYABLE_KINDS: typing.Final = frozenset(
    {ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.CONNECT, ErrorKind.PROTOCOL}
)

# Past 2**64 the cap has long since won; stopping here keeps 2.0**n from overflowing.
_MAX_EXPONENT: typing.Final = 64


@dataclass(frozen=True, slots=True)
class Final:
    """Stop: this attempt's outcome is the record's last word."""

    reason: FinalReason


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again after ``delay`` seconds.

    ``pause_all`` is set for a 429: the lockout is account-wide, so the whole run (every
    worker, through the rate gate) must hold off until ``delay`` has passed, not just this
    record.
    """

    delay: float
    pause_all: bool


Decision: TypeAlias = Final | Retry


def classify(outcome: Outcome) -> Classification:
    """Sort an attempt's outcome into what the policy does with it."""
    if outcome.ok:
        return "ok"
    status = outcome.status
    # A 429 is checked before the error code: whatever else it says, the account is locked
    # out and the whole run must pause.
    if status == 429:
        return "rate_limited"
    if outcome.cf_code == CF_INTERNAL_ERROR:
        return "retryable"
    if status is None:
        # No answer: only a broken transport is worth retrying; anything else (stopped,
        # invalid) would fail the same way again.
        return "retryable" if outcome.error_kind in _RETRYABLE_KINDS else "permanent"
    if status == 408 or 500 <= status <= 599:
        return "retryable"
    return "permanent"


def backoff(attempt: int, *, base: float, cap: float, rng: Callable[[], float]) -> float:
    """Full-jitter backoff before retry number ``attempt`` (1 after the first failure).

    ``uniform(0, min(cap, base * 2**(attempt - 1)))``: spreading retries over the whole
    window keeps many workers that failed together from retrying together.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return rng() * ceiling


# RFC 9110 delta-seconds is digits only; fractions are tolerated because some servers send them.
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry; one frozen value per run.

    429s are counted apart from other failures: the lockout is account-wide, not the
    record's fault, so they do not use up ``max_attempts``; ``max_rate_limited`` bounds
    them instead.
    """

    max_attempts: int = 5
    """Attempts that may end in a retryable error (408, 5xx, timeout, connection, connect,
    protocol)."""
    base_delay: float = 0.5
    """Backoff ceiling for the first retry; it doubles on each one after."""
    max_delay: float = 30.0
    """Backoff ceiling never grows past this."""
    max_retry_wait: float = 600.0
    """The longest ``Retry-After`` honoured: a 429 asking for more is final, a 503's is cut."""
    default_retry_after: float = 5.0
    """The wait after a 429 that named none usable."""
    max_rate_limited: int = 50
    """429 answers a record may get; the last of them is final."""
    min_retry_after: float = 1.0
    """The least wait a ``Retry-After`` leads to, however little it asks for (``0``, a
    date in the past): a 429 pauses the run at least this long, a 503 holds its record
    back at least this long. A server that answers every request ``429, Retry-After: 0``
    would otherwise be asked again at once, as fast as the connections allow."""
    max_rate_limit_floor: float = 30.0
    """The 429 floor doubles with each 429 a record got in a row, up to this."""

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_rate_limited"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"RetryPolicy.{name} must be an integer >= 1, got {value!r}")
        for name in (
            "base_delay",
            "max_delay",
            "max_retry_wait",
            "default_retry_after",
            "min_retry_after",
            "max_rate_limit_floor",
        ):
            value = getattr(self, name)
            if not _is_seconds(value):
                raise ValueError(
                    f"RetryPolicy.{name} must be a finite number of seconds >= 0, got {value!r}"
                )
        # No cross-field rules: a cap below the base just caps every backoff, and a default
        # wait over max_retry_wait makes a 429 without Retry-After final. Both are well
        # defined, and refusing them would break configs that set only one of the pair.

    def decide(
        self, outcome: Outcome, attempts: int, rate_limited: int, rng: Callable[[], float]
    ) -> Decision:
        """What to do after an attempt.

        ``attempts`` counts every attempt made for the record so far, this one and any 429s
        included; ``rate_limited`` counts the 429s among them, this one included. ``rng()``
        returns a float in ``[0, 1)``.
        """
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if not 0 <= rate_limited <= attempts:
            raise ValueError(
                f"rate_limited must be in 0..attempts ({attempts}), got {rate_limited}"
            )
        kind = classify(outcome)
        if kind == "ok":
            return Final("ok")
        if kind == "permanent":
            return Final("permanent")
        if kind == "rate_limited":
            wait = self.rate_limit_wait(outcome)
            if wait > self.max_retry_wait or rate_limited >= self.max_rate_limited:
                return Final("rate_limited")
            # What the server asked for, but never less than the floor: a Retry-After of 0
            # (or a date past, or none usable with a Ratelimit reset of 0) must not turn
            # every worker into a tight loop of 429s.
            floor = self.rate_limit_floor(max(rate_limited, 1), rng)
            return Retry(delay=max(wait, floor), pause_all=True)
        failures = attempts - rate_limited
        if failures >= self.max_attempts:
            return Final("exhausted")
        delay = backoff(failures, base=self.base_delay, cap=self.max_delay, rng=rng)
        retry_after = outcome.retry_after
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            # A 503's Retry-After sets this record's earliest retry (the client reads it
            # on 429 and 503 only), never under the floor and never past --max-retry-wait.
            asked = max(retry_after, self.min_retry_after)
            delay = max(delay, min(asked, self.max_retry_wait))
        return Retry(delay=delay, pause_all=False)

    def rate_limit_floor(self, rate_limited: int, rng: Callable[[], float]) -> float:
        """The least a record's ``rate_limited``-th 429 in a row pauses the run.

        ``min_retry_after`` doubling with each one, capped at ``max_rate_limit_floor``,
        plus up to half again of jitter (so processes or hosts sharing an account that were
        refused together do not all come back together). Never under ``min_retry_after``.
        """
        if rate_limited < 1:
            raise ValueError(f"rate_limited must be >= 1, got {rate_limited}")
        floor = self.min_retry_after * 2.0 ** min(rate_limited - 1, _MAX_EXPONENT)
        floor = max(min(floor, self.max_rate_limit_floor), self.min_retry_after)
        return floor * (1.0 + 0.5 * rng())

    def rate_limit_wait(self, outcome: Outcome) -> float:
        """How long a 429 asks the run to hold off (before the floor of
        :meth:`rate_limit_floor`, which :meth:`decide` adds).

        ``Retry-After`` first; failing that, the ``Ratelimit`` reset when it says nothing is
        left (same promise, other header); failing that, ``default_retry_after``.
        """
        retry_after = outcome.retry_after
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            return retry_after
        info = outcome.ratelimit
        if info is not None and info.remaining == 0 and info.reset is not None:
            return info.reset
        return self.default_retry_after
