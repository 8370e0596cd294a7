"""Injected failures: what may go wrong, how often, and a reproducible decision per attempt.

Each decision is a keyed hash of (seed, event, attempt number) rather than a draw from one
shared RNG, so the same seed gives the same faults to the same attempts however many
workers race each other: a failing test replays exactly.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final

from dispatcher.emulator.units import format_seconds, parse_duration, parse_share

EventKey = tuple[str, str, str, str | None]  # workflow, instance_id, event_type, body sha256

_TWO_64: Final = float(2**64)


class FaultKind(enum.StrEnum):
    """What an injected fault does; the value is how the shell flag names it."""

    HTTP_500 = "500"  # Cloudflare envelope, code 10001
    HTTP_502 = "502"  # text/html, as a proxy in front of the API would answer
    HTTP_503 = "503"  # Cloudflare envelope
    DROP = "drop"  # the connection closes after the request is read; no answer at all


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Probabilities (0..1) of each fault per attempt, plus added latency.

    ``latency`` is ``(low, high)`` seconds, drawn uniformly; ``(x, x)`` is a fixed delay.
    ``first=k`` lets faults hit only the first k attempts of each event (same workflow,
    instance, event type and body), so attempt k+1 always gets through. Latency is added
    to every attempt that reaches the event handler, whatever ``first`` says.
    """

    http_500: float = 0.0
    http_502: float = 0.0
    http_503: float = 0.0
    drop: float = 0.0
    latency: tuple[float, float] = (0.0, 0.0)
    first: int | None = None

    def __post_init__(self) -> None:
        for kind, p in self.probabilities().items():
            if not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
                raise ValueError(f"fault {kind} probability must be within 0..1, got {p!r}")
        total = sum(self.probabilities().values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities add up to {total:.0%}, over 100%")
        if (
            not isinstance(self.latency, tuple)
            or len(self.latency) != 2
            or not all(isinstance(s, int | float) and 0 <= s < math.inf for s in self.latency)
            or self.latency[0] > self.latency[1]
        ):
            raise ValueError(
                f"latency must be (low, high) seconds, 0 <= low <= high, got {self.latency!r}"
            )
        if self.first is not None and (
            isinstance(self.first, bool) or not isinstance(self.first, int) or self.first < 1
        ):
            raise ValueError(f"first must be a whole number >= 1 or None, got {self.first!r}")

    def probabilities(self) -> dict[FaultKind, float]:
        return {
            FaultKind.HTTP_500: self.http_500,
            FaultKind.HTTP_502: self.http_502,
            FaultKind.HTTP_503: self.http_503,
            FaultKind.DROP: self.drop,
        }

    @property
    def any_failure(self) -> bool:
        return any(p > 0 for p in self.probabilities().values())

    @property
    def any_latency(self) -> bool:
        return self.latency[1] > 0

    def describe(self) -> str:
        """One line for the shell banner, in the same syntax as the flags."""
        parts = [f"{kind}={_percent(p)}" for kind, p in self.probabilities().items() if p > 0]
        if self.first is not None and parts:
            parts.append(f"first {self.first} attempt(s) of each event only")
        low, high = self.latency
        if high > 0:
            parts.append(
                f"latency {_ms(low)}" if low == high else f"latency {_ms(low)}..{_ms(high)}"
            )
        return ", ".join(parts) if parts else "none"

    @classmethod
    def parse(
        cls,
        faults: Iterable[str] = (),
        *,
        latency: str | None = None,
        first: int | None = None,
    ) -> Faults:
        """The shell syntax in code: ``Faults.parse(["500=5%", "drop=1%"], latency="0..50ms")``."""
        return cls.from_flags(
            [parse_fault(spec) for spec in faults],
            parse_latency(latency) if latency is not None else None,
            first,
        )

    @classmethod
    def from_flags(
        cls,
        faults: list[tuple[FaultKind, float]] | None = None,
        latency: tuple[float, float] | None = None,
        first: int | None = None,
    ) -> Faults:
        """Build from parsed ``--fault``/``--latency``/``--faults-first`` values; a kind given
        twice keeps the last value, as repeated flags usually do."""
        chosen = dict(faults or [])
        return cls(
            http_500=chosen.get(FaultKind.HTTP_500, 0.0),
            http_502=chosen.get(FaultKind.HTTP_502, 0.0),
            http_503=chosen.get(FaultKind.HTTP_503, 0.0),
            drop=chosen.get(FaultKind.DROP, 0.0),
            latency=latency or (0.0, 0.0),
            first=first,
        )


def _percent(p: float) -> str:
    return f"{format_seconds(round(p * 100, 3))}%"


def _ms(seconds: float) -> str:
    return f"{format_seconds(round(seconds * 1000, 3))}ms"


def parse_fault(text: str) -> tuple[FaultKind, float]:
    """``"500=5%"`` -> ``(FaultKind.HTTP_500, 0.05)``; ``"drop=0.01"`` is 1 %."""
    name, sep, value = text.partition("=")
    try:
        kind = FaultKind(name.strip().lower())
    except ValueError:
        kinds = ", ".join(k.value for k in FaultKind)
        raise ValueError(
            f"{text!r}: unknown fault {name.strip()!r}, expected one of {kinds}"
        ) from None
    if not sep:
        raise ValueError(f"{text!r}: give a probability, like {kind}=5% or {kind}=0.05")
    try:
        return kind, parse_share(value, "probability")
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def parse_latency(text: str) -> tuple[float, float]:
    """``"20ms"`` -> (0.02, 0.02) fixed; ``"0..50ms"`` / ``"10ms..50ms"`` -> uniform range.

    A unit written only after the upper bound applies to both ends.
    """
    low_text, sep, high_text = text.partition("..")
    if not sep:
        fixed = parse_duration(text)
        return fixed, fixed
    high_text = high_text.strip()
    low_text = low_text.strip()
    if low_text and low_text[-1].isdigit():
        unit = high_text.lstrip("0123456789.")
        low_text += unit
    low, high = parse_duration(low_text), parse_duration(high_text)
    if low > high:
        raise ValueError(f"{text!r}: the low end is above the high end")
    return low, high


class FaultPlan:
    """Decides, per attempt at an event, which fault (if any) and how much latency it gets."""

    __slots__ = ("_attempts", "_first", "_key", "_lat_low", "_lat_span", "_thresholds")

    def __init__(self, faults: Faults, seed: int) -> None:
        self._key = str(seed).encode()
        self._first = faults.first
        self._lat_low = faults.latency[0]
        self._lat_span = faults.latency[1] - faults.latency[0]
        self._attempts: dict[EventKey, int] = {}
        cumulative = 0.0
        thresholds: list[tuple[float, FaultKind]] = []
        for kind, p in faults.probabilities().items():
            if p > 0:
                cumulative += p
                thresholds.append((cumulative, kind))
        self._thresholds = tuple(thresholds)

    def decide(self, event: EventKey) -> tuple[FaultKind | None, float]:
        """Count one more attempt at ``event``; return its fault and its added latency."""
        attempt = self._attempts.get(event, 0) + 1
        self._attempts[event] = attempt
        workflow, instance_id, event_type, body_sha = event
        material = f"{workflow}\0{instance_id}\0{event_type}\0{body_sha or ''}\0{attempt}"
        digest = blake2b(material.encode(), key=self._key, digest_size=16).digest()
        kind: FaultKind | None = None
        if self._first is None or attempt <= self._first:
            roll = int.from_bytes(digest[:8], "big") / _TWO_64
            for threshold, candidate in self._thresholds:
                if roll < threshold:
                    kind = candidate
                    break
        latency = self._lat_low
        if self._lat_span:
            latency += self._lat_span * (int.from_bytes(digest[8:], "big") / _TWO_64)
        return kind, latency

    def attempts(self, event: EventKey) -> int:
        return self._attempts.get(event, 0)
