"""Durations as people type them on the command line, and as HTTP headers print them."""

from __future__ import annotations

import math
import re
from typing import Final

_UNITS: Final[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|)\s*")


def parse_duration(text: str) -> float:
    """``"20ms"`` -> 0.02, ``"5m"`` -> 300.0; a bare number is seconds."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 500ms, 1s, 2.5s, 5m, 1h)")
    return float(match[1]) * _UNITS[match[2]]


def parse_share(text: str, what: str = "share") -> float:
    """``5%`` or ``0.05`` -> 0.05, within 0..1; ``ValueError`` says it is not a ``what``."""
    spec = text.strip()
    try:
        value = float(spec[:-1]) / 100 if spec.endswith("%") else float(spec)
    except ValueError:
        raise ValueError(f"{spec!r} is not a {what} (5% or 0.05)") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{spec!r} is not within 0..100%")
    return value


def format_seconds(seconds: float) -> str:
    """Whole seconds print as integers (``300``), others with up to 3 decimals (``0.5``)."""
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0")


def ceil_seconds(seconds: float) -> int:
    # A tiny positive remainder must still read as 1 s, never 0: a client told "retry in 0"
    # would hammer a server that is still refusing it.
    return max(1, math.ceil(seconds - 1e-9))
