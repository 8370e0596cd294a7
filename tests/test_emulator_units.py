"""The emulator's pure pieces: settings, flag syntax, the rate-limit model, the fault plan."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence

import orjson
import pytest

import dispatcher.emulator as emulator_pkg
from dispatcher.emulator import (
    EmulatorConfig,
    EmulatorLog,
    FaultKind,
    Faults,
    Limit,
    RequestEntry,
    parse_duration,
    parse_fault,
    parse_latency,
)
from dispatcher.emulator.faults import EventKey, FaultPlan
from dispatcher.emulator.handler import BadSegment, parse_event_path
from dispatcher.emulator.ratelimit import FixedWindowLimiter


def test_public_api_is_exactly_what_is_exported() -> None:
    assert sorted(emulator_pkg.__all__) == [
        "Emulator",
        "EmulatorConfig",
        "EmulatorLog",
        "FaultKind",
        "Faults",
        "InstanceModel",
        "Limit",
        "RequestEntry",
        "parse_duration",
        "parse_fault",
        "parse_latency",
    ]
    for name in emulator_pkg.__all__:
        assert hasattr(emulator_pkg, name)


# -- durations and limits --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1.0), ("2.5s", 2.5), ("5m", 300.0), ("1h", 3600.0), ("7", 7.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "ms", "5 minutes", "-1s", "1d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_limit_parse() -> None:
    assert Limit.parse("200/1s") == Limit(quota=200, window=1.0)
    assert Limit.parse("1200/5m") == Limit(quota=1200, window=300.0)
    assert Limit.parse("5/500ms") == Limit(quota=5, window=0.5)
    assert Limit.parse("off") is None
    assert str(Limit.parse("1200/5m")) == "1200/300s"


@pytest.mark.parametrize("text", ["1200", "x/5m", "0/5m", "5/0s", "5/soon", "-1/1s"])
def test_limit_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"limit|duration|quota|window"):
        Limit.parse(text)


def test_config_is_frozen_keyword_only_and_has_cloudflare_defaults() -> None:
    cfg = EmulatorConfig()
    assert cfg.limit == Limit(quota=1200, window=300.0)
    assert cfg.effective_lockout == 300.0
    assert cfg.host == "127.0.0.1"
    assert cfg.port == 0
    assert cfg.keep_requests
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        EmulatorConfig(("tok",))  # type: ignore[call-arg]
    assert EmulatorConfig(limit=Limit(quota=5, window=1.0), lockout=3).effective_lockout == 3
    assert EmulatorConfig(limit=None).effective_lockout is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tokens": ("",)}, "tokens"),
        ({"tokens": ["tok"]}, "tokens"),
        ({"legacy_keys": (("a@b.c",),)}, "legacy_keys"),
        ({"legacy_keys": (("a@b.c", ""),)}, "legacy_keys"),
        ({"lockout": 0}, "lockout"),
        ({"known_instances": {"a"}}, "known_instances"),
        ({"port": 70000}, "port"),
        ({"host": ""}, "host"),
        ({"seed": "1"}, "seed"),
        ({"limit": "1200/5m"}, "limit"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EmulatorConfig(**kwargs)  # type: ignore[arg-type]


# -- fault syntax ----------------------------------------------------------------------


def test_parse_fault() -> None:
    assert parse_fault("500=5%") == (FaultKind.HTTP_500, 0.05)
    assert parse_fault("drop=0.01") == (FaultKind.DROP, 0.01)
    assert parse_fault("DROP = 1%") == (FaultKind.DROP, 0.01)
    assert parse_fault("502=100%") == (FaultKind.HTTP_502, 1.0)


@pytest.mark.parametrize(
    ("text", "why"),
    [("404=5%", "unknown fault"), ("500", "give a probability"), ("500=lots", "not a probability"),
     ("500=150%", "within")],
)  # fmt: skip
def test_parse_fault_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_fault(text)


def test_parse_latency() -> None:
    assert parse_latency("20ms") == pytest.approx((0.02, 0.02))
    assert parse_latency("0..50ms") == pytest.approx((0.0, 0.05))
    assert parse_latency("10ms..1s") == pytest.approx((0.01, 1.0))
    with pytest.raises(ValueError, match="above"):
        parse_latency("50..10ms")


def test_faults_parse_and_describe() -> None:
    faults = Faults.parse(["500=5%", "drop=1%"], latency="0..50ms", first=2)
    assert faults == Faults(http_500=0.05, drop=0.01, latency=(0.0, 0.05), first=2)
    assert (
        faults.describe()
        == "500=5%, drop=1%, first 2 attempt(s) of each event only, latency 0ms..50ms"
    )
    assert Faults().describe() == "none"
    assert Faults.parse([], latency="20ms").describe() == "latency 20ms"


@pytest.mark.parametrize(
    "kwargs",
    [{"http_500": 0.7, "http_503": 0.4}, {"drop": -0.1}, {"latency": (0.2, 0.1)}, {"first": 0}],
)
def test_faults_reject_impossible_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"probabilit|latency|first"):
        Faults(**kwargs)  # type: ignore[arg-type]


# -- the rate-limit model, on a clock we move by hand ----------------------------------


def test_limiter_fixed_window_then_lockout() -> None:
    limiter = FixedWindowLimiter(quota=3, window=10.0, lockout=30.0)
    verdicts = [limiter.hit("a", t) for t in (100.0, 101.0, 102.5)]
    assert [v.allowed for v in verdicts] == [True, True, True]
    assert [v.remaining for v in verdicts] == [2, 1, 0]
    assert [v.reset for v in verdicts] == [10, 9, 8]  # whole seconds to the window's end, up
    refused = limiter.hit("a", 103.0)
    assert not refused.allowed
    assert (refused.remaining, refused.reset, refused.retry_after) == (0, 30, 30)
    # Locked out for the whole lockout even though the window ended; refusals don't extend it.
    later = limiter.hit("a", 120.2)
    assert not later.allowed
    assert later.retry_after == 13  # 133.0 - 120.2 = 12.8, rounded up
    assert limiter.hit("b", 120.2).allowed  # budgets are per credential
    back = limiter.hit("a", 133.0)
    assert back.allowed
    assert back.remaining == 2  # a fresh window opened when the lockout ended


def test_limiter_window_rolls_over() -> None:
    limiter = FixedWindowLimiter(quota=2, window=1.0, lockout=1.0)
    assert limiter.hit("a", 0.0).allowed
    assert limiter.hit("a", 0.5).allowed
    assert limiter.hit("a", 1.0).remaining == 1  # new window at t=1.0
    assert limiter.hit("a", 1.1).remaining == 0
    assert limiter.hit("a", 1.2).retry_after == 1


def test_limiter_retry_after_is_at_least_one_second() -> None:
    limiter = FixedWindowLimiter(quota=1, window=0.2, lockout=0.2)
    limiter.hit("a", 0.0)
    assert limiter.hit("a", 0.05).retry_after == 1
    assert limiter.hit("a", 0.249).retry_after == 1


# -- the fault plan --------------------------------------------------------------------


def _outcomes(plan: FaultPlan, events: Sequence[EventKey]) -> list[str]:
    return [str(plan.decide(event)[0]) for event in events]


def test_fault_plan_is_reproducible_from_the_seed_whatever_the_order() -> None:
    faults = Faults(http_500=0.2, http_502=0.1, http_503=0.1, drop=0.1)
    events: list[EventKey] = [("wf", f"i{k}", "ev", None) for k in range(200)]
    first = _outcomes(FaultPlan(faults, seed=1), events)
    again = _outcomes(FaultPlan(faults, seed=1), events)
    backwards = _outcomes(FaultPlan(faults, seed=1), events[::-1])[::-1]
    other_seed = _outcomes(FaultPlan(faults, seed=2), events)
    assert first == again == backwards
    assert first != other_seed
    counts = Counter(first)
    # 200 draws at 50 % total: every kind shows up, and about half pass.
    assert set(counts) == {"None", "500", "502", "503", "drop"}
    assert 70 <= counts["None"] <= 130


def test_fault_plan_first_k_attempts_only() -> None:
    plan = FaultPlan(Faults(http_500=1.0, first=2), seed=0)
    event = ("wf", "i", "ev", "abc")
    assert [plan.decide(event)[0] for _ in range(4)] == [
        FaultKind.HTTP_500,
        FaultKind.HTTP_500,
        None,
        None,
    ]
    assert plan.attempts(event) == 4
    assert plan.decide(("wf", "i", "ev", "other body"))[0] is FaultKind.HTTP_500


def test_fault_plan_latency_fixed_and_uniform() -> None:
    fixed = FaultPlan(Faults(latency=(0.02, 0.02)), seed=0)
    assert fixed.decide(("wf", "i", "ev", None)) == (None, 0.02)
    uniform = FaultPlan(Faults(latency=(0.01, 0.05)), seed=0)
    delays = [uniform.decide(("wf", f"i{k}", "ev", None))[1] for k in range(100)]
    assert all(0.01 <= d <= 0.05 for d in delays)
    assert max(delays) - min(delays) > 0.02


# -- paths and the log -----------------------------------------------------------------


def test_parse_event_path_decodes_after_splitting() -> None:
    base = "/client/v4/accounts/acc/workflows/"
    assert parse_event_path(base + "wf/instances/i-1/events/ev") == ("acc", "wf", "i-1", "ev")
    assert parse_event_path(base + "w%5Ff/instances/a%2Fb/events/e%20v") == (
        "acc",
        "w_f",
        "a/b",
        "e v",
    )
    for other in (base + "wf/instances/i/events/", base + "wf/instances/i", "/client/v4/user", "/"):
        assert parse_event_path(other) is None
    with pytest.raises(BadSegment):
        parse_event_path(base + "wf/instances/%FF/events/ev")


def test_log_helpers_and_snapshot() -> None:
    log = EmulatorLog()
    key = ("wf", "i", "ev", None)
    log.accept(key, 1.0)
    log.accept(key, 2.0)
    log.accept(("wf", "j", "ev", "ff"), 3.0)
    log.record(RequestEntry(1.0, 200, "wf", "i", "ev", None))
    log.record(RequestEntry(1.5, None, "wf", "i", "ev", None))
    log.fault(FaultKind.DROP)
    assert log.total_accepted() == 3
    assert log.duplicates() == {key: 2}
    assert log.status_counts == Counter({200: 1, "dropped": 1})
    snap = log.snapshot()
    assert orjson.loads(orjson.dumps(snap)) == snap
    assert snap["accepted"] == {
        "total": 3,
        "unique": 2,
        "duplicate_events": 1,
        "duplicate_deliveries": 1,
    }
    assert snap["status_counts"] == {"200": 1, "dropped": 1}
    assert snap["faults"] == {"drop": 1}
    log.clear()
    assert log.total_requests() == 0
    assert not log.accepted


def test_log_can_skip_the_per_request_list() -> None:
    log = EmulatorLog(keep_requests=False)
    log.record(RequestEntry(1.0, 429, None, None, None, None, 971))
    assert log.requests == []
    assert log.status_counts[429] == 1
