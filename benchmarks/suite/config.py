"""Constants every part of the benchmark shares: names, bodies, targets, limits."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

BENCH_DIR: Final = Path(__file__).resolve().parent.parent
REPO: Final = BENCH_DIR.parent
REPORT: Final = REPO / "BENCHMARKS.md"

ACCOUNT: Final = "bench-account"
WORKFLOW: Final = "bench-wf"
TOKEN: Final = "bench-token"
SUCCESS_BODY: Final = (
    '{"success":true,"errors":[],"messages":[],'
    '"result":{"instanceId":"x","timestamp":"2026-01-01T00:00:00Z"}}'
)
EVENT_BODY: Final = '{"order":42,"amount_cents":1999,"currency":"EUR"}'
CONCURRENCY: Final = 64
SDK_EVENTS: Final = 1500
# httpx's pool costs milliseconds of CPU per request at 64 connections (measured: 4.5-5.3
# ms/event), so it too sends a prefix of the input, as the SDK does.
HTTPX_EVENTS: Final = 3000
EVENTS: Final = 100_000  # per dispatcher and baseline run: start-up a small share
QUICK_EVENTS: Final = 20_000

# Targets from the issues (#16: on each event loop, in the same run).
TARGET_VS_BASELINE: Final = 1.5  # against the typical baseline (issue 16)
TARGET_VS_LEAN: Final = 1.5  # against the lean baseline (issue 27)
TARGET_VS_SDK: Final = 20.0
TARGET_RSS_MIB: Final = 60.0
TARGET_RATE_ERROR: Final = 0.02
FLAT_TOLERANCE: Final = 0.10  # peak RSS at 1M within 10% of the peak at 100k

NGINX_START_TIMEOUT: Final = 10.0
NGINX_STOP_TIMEOUT: Final = 10.0
WRK_SECONDS: Final = 5
CHILD_KILL_GRACE: Final = 5.0


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def signed_pct(x: float) -> str:
    return f"{x:+.2%}"


def verdict_text(ok: bool | None) -> str:
    if ok is None:
        return "not checked"
    return "**met**" if ok else "**NOT met**"


def span(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(min(values))} - {fmt(max(values))}" if values else "n/a"


def times(ratio: float) -> str:
    return f"{ratio:.2f}x" if math.isfinite(ratio) and ratio > 0 else "n/a"


def deciles(samples: Sequence[tuple[float, float]]) -> str:
    """RSS at 10%, 20%, ... 100% of the run's samples, MiB."""
    if not samples:
        return "n/a"
    n = len(samples)
    return " ".join(f"{samples[min(n - 1, (n * k) // 10)][1]:.0f}" for k in range(1, 11))
