"""How fast an emulated instance reacts: a delay drawn from a configured distribution.

``Spread.parse("200ms±50ms")`` is uniform on 150..250 ms; ``"200ms~50ms"`` is normal with
mean 200 ms and standard deviation 50 ms (cut at 0, since a delay cannot be negative);
``"200ms"`` is a fixed delay. ``+-`` may stand for ``±``.

Draws are taken from a hash of the seed, the instance id and what is drawn, not from a
random stream: the emulator derives an instance's state anew on every read, and each read
must see the same delays.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from hashlib import sha256
from statistics import NormalDist
from typing import Final, Literal

from dispatcher.emulator.units import format_seconds, parse_duration

__all__ = ["Spread", "unit_draw"]

Distribution = Literal["fixed", "uniform", "normal"]
_SPREAD: Final = re.compile(r"\s*(?P<mean>[^±~+]+?)\s*(?:(?P<op>±|\+-|~)\s*(?P<spread>.+?))?\s*")


def unit_draw(seed: int, instance_id: str, what: str) -> float:
    """A number in (0, 1), the same for the same seed, instance and ``what``."""
    digest = sha256(f"{seed}:{instance_id}:{what}".encode()).digest()
    # Never exactly 0 or 1: NormalDist.inv_cdf refuses both.
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2**64


@dataclass(frozen=True, slots=True, kw_only=True)
class Spread:
    """A delay in seconds: ``mean``, and ``spread`` (uniform: half-width; normal: sigma)."""

    mean: float
    spread: float = 0.0
    distribution: Distribution = "fixed"

    def __post_init__(self) -> None:
        for name in ("mean", "spread"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"a delay's {name} must be seconds >= 0, got {value!r}")
        if self.distribution not in ("fixed", "uniform", "normal"):
            raise ValueError(f"unknown distribution {self.distribution!r}")
        if self.distribution == "uniform" and self.spread > self.mean:
            raise ValueError(
                f"{format_seconds(self.mean)}s±{format_seconds(self.spread)}s would go below 0: "
                "the spread must not exceed the mean"
            )

    @classmethod
    def parse(cls, text: str) -> Spread:
        """``200ms±50ms`` (uniform), ``200ms~50ms`` (normal, sigma), ``200ms`` (fixed)."""
        match = _SPREAD.fullmatch(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not a delay: use 200ms, 200ms±50ms (uniform) or 200ms~50ms (normal)"
            )
        try:
            mean = parse_duration(match["mean"])
            if match["op"] is None:
                return cls(mean=mean)
            spread = parse_duration(match["spread"])
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        kind: Distribution = "normal" if match["op"] == "~" else "uniform"
        try:
            return cls(mean=mean, spread=spread, distribution=kind)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None

    def draw(self, u: float) -> float:
        """The delay for a uniform number ``u`` in (0, 1)."""
        if self.distribution == "fixed" or self.spread == 0:
            return self.mean
        if self.distribution == "uniform":
            return self.mean + (2 * u - 1) * self.spread
        return max(0.0, NormalDist(self.mean, self.spread).inv_cdf(u))

    def __str__(self) -> str:
        mean = f"{format_seconds(self.mean)}s"
        if self.distribution == "fixed" or self.spread == 0:
            return mean
        op = "~" if self.distribution == "normal" else "±"
        return f"{mean}{op}{format_seconds(self.spread)}s"
