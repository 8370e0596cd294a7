"""Reading the rate headers of an answer: ``Retry-After``, ``Ratelimit`` and ``Ratelimit-Policy``.

Pure functions of header values; the policy and the pacer act on what they return.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from dispatcher.model import RateLimitInfo

__all__ = ["parse_ratelimit", "parse_retry_after"]

_DELTA_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or ``None`` when it is unusable.

    Accepts delta-seconds and any of RFC 9110's HTTP-date forms; a date already past gives
    ``0.0``. ``now`` (aware, defaults to the current UTC time) is only read for dates.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(text)
    except (ValueError, TypeError, OverflowError, IndexError):
        return None
    if when.tzinfo is None:
        # HTTP dates are always GMT; the asctime form and "-0000" parse as naive.
        when = when.replace(tzinfo=UTC)
    if now is None:
        now = datetime.now(UTC)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _split_unquoted(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside structured-field quoted strings (which may contain it)."""
    parts: list[str] = []
    start = 0
    in_quote = False
    escaped = False
    for i, ch in enumerate(text):
        if in_quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
        elif ch == '"':
            in_quote = True
        elif ch == sep:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _first_member_params(header: str | None) -> dict[str, str]:
    """The parameters of the first list member: ``"default";r=5;t=30`` -> {r: 5, t: 30}."""
    if header is None:
        return {}
    member = _split_unquoted(header, ",")[0]
    params: dict[str, str] = {}
    # The first piece is the policy name; only the parameters carry numbers.
    for piece in _split_unquoted(member, ";")[1:]:
        key, eq, raw = piece.partition("=")
        key = key.strip().lower()
        if not key or not eq or key in params:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1].strip()
        params[key] = raw
    return params


_SF_INTEGER = re.compile(r"\d{1,15}")
_SF_DECIMAL = re.compile(r"\d{1,15}(?:\.\d{1,3})?")


def _int_param(params: dict[str, str], key: str) -> int | None:
    raw = params.get(key)
    return int(raw) if raw is not None and _SF_INTEGER.fullmatch(raw) else None


def _seconds_param(params: dict[str, str], key: str) -> float | None:
    raw = params.get(key)
    return float(raw) if raw is not None and _SF_DECIMAL.fullmatch(raw) else None


def parse_ratelimit(ratelimit: str | None, policy: str | None) -> RateLimitInfo | None:
    """Read the ``Ratelimit`` and ``Ratelimit-Policy`` headers (IETF ratelimit-headers draft).

    ``Ratelimit: "default";r=<remaining>;t=<reset s>`` and
    ``Ratelimit-Policy: "burst";q=<quota>;w=<window s>``. Only the first list member of each
    counts; unknown parameters are skipped and a garbled one leaves just its field unset,
    since these headers only tune pacing and must never fail a request. ``None`` when
    neither header gave a usable number.
    """
    current = _first_member_params(ratelimit)
    limits = _first_member_params(policy)
    info = RateLimitInfo(
        remaining=_int_param(current, "r"),
        reset=_seconds_param(current, "t"),
        quota=_int_param(limits, "q"),
        window=_seconds_param(limits, "w"),
    )
    if info == RateLimitInfo():
        return None
    return info
