"""The retry policy: classification, backoff, header parsing and the decisions they drive."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dispatcher.clients.headers import parse_ratelimit, parse_retry_after
from dispatcher.model import ErrorKind, Outcome, RateLimitInfo
from dispatcher.sending.policy import (
    Final,
    Retry,
    RetryPolicy,
    backoff,
    classify,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
ALMOST_ONE = 0.9999999999


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def answer(status: int, *, cf_code: int | None = None, **kw: Any) -> Outcome:
    return Outcome(
        status=status,
        ok=200 <= status < 300 and cf_code is None,
        sent=True,
        latency_s=0.01,
        error_kind=None if 200 <= status < 300 else ErrorKind.HTTP,
        cf_code=cf_code,
        **kw,
    )


def no_answer(kind: ErrorKind) -> Outcome:
    return Outcome(
        status=None, ok=False, sent=kind is not ErrorKind.CONNECT, latency_s=1.0, error_kind=kind
    )


OK = answer(200)
RATE_LIMITED = answer(429, retry_after=300.0)
SERVER_ERROR = answer(503)
NOT_FOUND = answer(404, cf_code=10400)


# --- classify ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (answer(200), "ok"),
        (answer(201), "ok"),
        (answer(429), "rate_limited"),
        (answer(429, retry_after=60.0), "rate_limited"),
        (answer(408), "retryable"),
        (answer(500), "retryable"),
        (answer(502), "retryable"),  # the bare gateway page, no envelope
        (answer(503), "retryable"),
        (answer(504), "retryable"),
        (answer(599), "retryable"),
        (answer(500, cf_code=10001), "retryable"),
        (answer(400, cf_code=10001), "retryable"),  # internal error: retried whatever the status
        (answer(200, cf_code=10001), "retryable"),  # success: false in a 200
        (answer(400), "permanent"),
        (answer(401), "permanent"),
        (answer(403), "permanent"),
        (answer(404), "permanent"),
        (answer(404, cf_code=10400), "permanent"),
        (answer(405), "permanent"),
        (answer(409), "permanent"),
        (answer(413), "permanent"),
        (answer(422), "permanent"),
        (answer(200, cf_code=10000), "permanent"),
        (no_answer(ErrorKind.TIMEOUT), "retryable"),
        (no_answer(ErrorKind.CONNECTION), "retryable"),
        (no_answer(ErrorKind.CONNECT), "retryable"),
        (no_answer(ErrorKind.INVALID), "permanent"),
        (no_answer(ErrorKind.STOPPED), "permanent"),
        (no_answer(ErrorKind.RATE_LIMITED), "permanent"),
    ],
    ids=lambda v: repr(v) if isinstance(v, str) else None,
)
def test_classify(outcome: Outcome, expected: str) -> None:
    assert classify(outcome) == expected


# --- backoff ----------------------------------------------------------------------------


def test_backoff_with_zero_rng_is_zero() -> None:
    for attempt in (1, 2, 10, 1000):
        assert backoff(attempt, base=0.5, cap=30.0, rng=fixed(0.0)) == 0.0


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    limits = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    ceilings = [backoff(n, base=0.5, cap=30.0, rng=fixed(ALMOST_ONE)) for n in range(1, 10)]
    assert ceilings == pytest.approx(limits, rel=1e-6)
    assert all(c < limit for c, limit in zip(ceilings, limits, strict=True))


def test_backoff_is_uniform_within_the_ceiling() -> None:
    assert backoff(3, base=0.5, cap=30.0, rng=fixed(0.25)) == pytest.approx(0.5)


def test_backoff_survives_huge_attempt_numbers() -> None:
    assert backoff(10**6, base=0.5, cap=30.0, rng=fixed(0.5)) == pytest.approx(15.0)


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff(0, base=0.5, cap=30.0, rng=fixed(0.5))


# --- decide -----------------------------------------------------------------------------


def test_ok_is_final() -> None:
    assert RetryPolicy().decide(OK, 1, 0, fixed(0.5)) == Final("ok")


@pytest.mark.parametrize("outcome", [NOT_FOUND, answer(401), answer(400), answer(413)])
def test_permanent_error_is_final_on_the_first_attempt(outcome: Outcome) -> None:
    assert RetryPolicy().decide(outcome, 1, 0, fixed(0.5)) == Final("permanent")


def test_retryable_error_backs_off_until_attempts_run_out() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay=1.0, max_delay=100.0)
    decisions = [policy.decide(SERVER_ERROR, n, 0, fixed(0.5)) for n in (1, 2, 3, 4)]
    assert decisions == [
        Retry(delay=0.5, pause_all=False),
        Retry(delay=1.0, pause_all=False),
        Retry(delay=2.0, pause_all=False),
        Final("exhausted"),
    ]


@pytest.mark.parametrize("kind", [ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.CONNECT])
def test_transport_failures_are_retried(kind: ErrorKind) -> None:
    decision = RetryPolicy().decide(no_answer(kind), 1, 0, fixed(0.5))
    assert decision == Retry(delay=0.25, pause_all=False)


def test_max_attempts_one_means_no_retry() -> None:
    assert RetryPolicy(max_attempts=1).decide(SERVER_ERROR, 1, 0, fixed(0.5)) == Final("exhausted")


def test_429_pauses_the_whole_run_for_retry_after() -> None:
    assert RetryPolicy().decide(RATE_LIMITED, 1, 1, fixed(0.5)) == Retry(
        delay=300.0, pause_all=True
    )


def test_429_asking_longer_than_max_retry_wait_is_final() -> None:
    policy = RetryPolicy(max_retry_wait=120.0)
    assert policy.decide(RATE_LIMITED, 1, 1, fixed(0.5)) == Final("rate_limited")
    exactly = answer(429, retry_after=120.0)
    assert policy.decide(exactly, 1, 1, fixed(0.5)) == Retry(delay=120.0, pause_all=True)


def test_429_without_retry_after_waits_the_default() -> None:
    policy = RetryPolicy(default_retry_after=7.0)
    assert policy.decide(answer(429), 1, 1, fixed(0.5)) == Retry(delay=7.0, pause_all=True)


def test_429_without_retry_after_uses_an_exhausted_ratelimit_reset() -> None:
    spent = answer(429, ratelimit=RateLimitInfo(remaining=0, reset=42.0))
    assert RetryPolicy().decide(spent, 1, 1, fixed(0.5)) == Retry(delay=42.0, pause_all=True)
    # A reset with budget left says nothing about this refusal: the default applies.
    left = answer(429, ratelimit=RateLimitInfo(remaining=3, reset=42.0))
    assert RetryPolicy().decide(left, 1, 1, fixed(0.5)) == Retry(delay=5.0, pause_all=True)


def test_429s_do_not_use_up_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay=1.0)
    # Ten 429s, then a 503: the 503 is only the first failure that counts.
    assert policy.decide(SERVER_ERROR, 11, 10, fixed(0.5)) == Retry(delay=0.5, pause_all=False)
    assert policy.decide(SERVER_ERROR, 12, 10, fixed(0.5)) == Final("exhausted")
    # And a 429 after the attempts are spent on 503s is still retried.
    assert policy.decide(RATE_LIMITED, 3, 1, fixed(0.5)) == Retry(delay=300.0, pause_all=True)


def test_429s_are_bounded_by_max_rate_limited() -> None:
    policy = RetryPolicy(max_rate_limited=3)
    assert policy.decide(RATE_LIMITED, 2, 2, fixed(0.5)) == Retry(delay=300.0, pause_all=True)
    assert policy.decide(RATE_LIMITED, 3, 3, fixed(0.5)) == Final("rate_limited")


def test_decide_does_not_depend_on_anything_but_its_arguments() -> None:
    policy = RetryPolicy()
    first = policy.decide(SERVER_ERROR, 2, 0, fixed(0.3))
    assert policy.decide(SERVER_ERROR, 2, 0, fixed(0.3)) == first


@pytest.mark.parametrize(("attempts", "rate_limited"), [(0, 0), (1, 2), (3, -1)])
def test_decide_rejects_impossible_counters(attempts: int, rate_limited: int) -> None:
    with pytest.raises(ValueError, match=r"attempts|rate_limited"):
        RetryPolicy().decide(SERVER_ERROR, attempts, rate_limited, fixed(0.5))


# --- the 429 floor: a Retry-After of 0 is no licence to ask again at once -------------------

PAST_DATE = "Sun, 01 Mar 2026 11:00:00 GMT"  # an hour before NOW
STORM_HEADERS = ["0", "0.0", PAST_DATE, "garbage", "-5", ""]


def _storm_answer(header: str) -> Outcome:
    return answer(429, retry_after=parse_retry_after(header, now=NOW))


@pytest.mark.parametrize("header", STORM_HEADERS)
def test_a_429_never_pauses_the_run_less_than_the_floor(header: str) -> None:
    policy = RetryPolicy()
    for rng in (fixed(0.0), fixed(0.5), fixed(ALMOST_ONE)):
        decision = policy.decide(_storm_answer(header), 1, 1, rng)
        assert isinstance(decision, Retry)
        assert decision.pause_all
        assert decision.delay >= 1.0


def test_a_spent_ratelimit_reset_of_zero_still_waits_the_floor() -> None:
    spent = answer(429, ratelimit=RateLimitInfo(remaining=0, reset=0.0))
    decision = RetryPolicy().decide(spent, 1, 1, fixed(0.0))
    assert decision == Retry(delay=1.0, pause_all=True)


def test_the_429_floor_doubles_on_repeats_up_to_its_cap() -> None:
    policy = RetryPolicy(min_retry_after=1.0, max_rate_limit_floor=30.0)
    zero = _storm_answer("0")
    delays = [policy.decide(zero, n, n, fixed(0.0)) for n in range(1, 9)]
    assert delays == [
        Retry(delay=d, pause_all=True) for d in (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0)
    ]


def test_the_429_floor_takes_its_jitter_from_the_injected_rng() -> None:
    policy = RetryPolicy()
    zero = _storm_answer("0")
    low = policy.decide(zero, 3, 3, fixed(0.0))
    high = policy.decide(zero, 3, 3, fixed(ALMOST_ONE))
    assert isinstance(low, Retry)
    assert isinstance(high, Retry)
    assert low.delay == 4.0
    assert 4.0 < high.delay < 6.0
    # The same rng gives the same pause: nothing but the arguments counts.
    assert policy.decide(zero, 3, 3, fixed(0.3)) == policy.decide(zero, 3, 3, fixed(0.3))


def test_a_longer_retry_after_than_the_floor_is_honoured_exactly() -> None:
    assert RetryPolicy().decide(answer(429, retry_after=42.0), 1, 1, fixed(ALMOST_ONE)) == Retry(
        delay=42.0, pause_all=True
    )


@pytest.mark.parametrize("header", ["0", PAST_DATE])
def test_a_503_with_retry_after_zero_waits_at_least_the_floor(header: str) -> None:
    unavailable = answer(503, retry_after=parse_retry_after(header, now=NOW))
    decision = RetryPolicy().decide(unavailable, 1, 0, fixed(0.0))
    assert decision == Retry(delay=1.0, pause_all=False)


@pytest.mark.parametrize("header", STORM_HEADERS)
def test_a_429_storm_on_a_fake_clock_sends_a_handful_not_thousands(header: str) -> None:
    """One record against a server that answers every request 429 with ``header``: the
    clock only moves by the waits the policy asks for, so this counts the requests the
    policy allows in 30 s of a storm (without the floor: every request at once)."""
    policy = RetryPolicy(max_rate_limited=10_000)
    rng = random.Random(23).random
    clock, requests, refused = 0.0, 0, _storm_answer(header)
    while clock < 30.0:
        requests += 1
        decision = policy.decide(refused, requests, requests, rng)
        assert isinstance(decision, Retry)
        clock += decision.delay
    assert requests <= 6  # 1 + 2 + 4 + 8 + 16 s of floors (jitter only lengthens them)


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", 0),
        ("max_attempts", 2.5),
        ("max_attempts", True),
        ("max_rate_limited", 0),
        ("base_delay", -1.0),
        ("base_delay", float("nan")),
        ("max_delay", float("inf")),
        ("max_retry_wait", -0.5),
        ("default_retry_after", "5"),
        ("min_retry_after", -1.0),
        ("max_rate_limit_floor", float("nan")),
    ],
)
def test_policy_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=rf"RetryPolicy\.{field} "):
        RetryPolicy(**kwargs)


def test_cap_below_base_caps_every_backoff() -> None:
    policy = RetryPolicy(base_delay=10.0, max_delay=1.0)
    assert policy.decide(SERVER_ERROR, 1, 0, fixed(0.5)) == Retry(delay=0.5, pause_all=False)


def test_default_wait_over_the_longest_wait_makes_a_bare_429_final() -> None:
    policy = RetryPolicy(max_retry_wait=2.0)  # default_retry_after stays 5
    assert policy.decide(answer(429), 1, 1, fixed(0.5)) == Final("rate_limited")
    assert policy.decide(answer(429, retry_after=1.5), 1, 1, fixed(0.5)) == Retry(
        delay=1.5, pause_all=True
    )


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.max_attempts = 3  # type: ignore[misc]


# --- parse_retry_after ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("  30 ", 30.0),
        ("1.5", 1.5),
        ("Sun, 01 Mar 2026 12:05:00 GMT", 300.0),  # IMF-fixdate
        ("Sunday, 01-Mar-26 12:00:30 GMT", 30.0),  # obsolete RFC 850
        ("Sun Mar  1 12:01:00 2026", 60.0),  # obsolete asctime
        ("Sun, 01 Mar 2026 11:00:00 GMT", 0.0),  # already past
    ],
)
def test_parse_retry_after(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value", [None, "", "   ", "-5", "soon", "1e3", "inf", "nan", "5 s", "+5", "Sun, 99 Mar 2026"]
)
def test_parse_retry_after_rejects_garbage(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_parse_retry_after_defaults_now_to_the_current_time() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=100)
    seconds = parse_retry_after(soon.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    assert seconds is not None
    assert 90 < seconds <= 100


# --- parse_ratelimit --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratelimit", "policy", "expected"),
    [
        (
            '"default";r=50;t=30',
            '"burst";q=1200;w=300',
            RateLimitInfo(remaining=50, reset=30.0, quota=1200, window=300.0),
        ),
        ('"default";r=0;t=12', None, RateLimitInfo(remaining=0, reset=12.0)),
        (None, '"burst";q=1200;w=300', RateLimitInfo(quota=1200, window=300.0)),
        (  # spaces around everything
            ' "default" ; r = 7 ; t = 3 ',
            '"burst" ;q=100; w=60',
            RateLimitInfo(remaining=7, reset=3.0, quota=100, window=60.0),
        ),
        (  # unknown params and a token name
            'default;pk=:YWJj:;r=5;x="y;z";t=1',
            '"burst";q=10;qu="requests";w=1',
            RateLimitInfo(remaining=5, reset=1.0, quota=10, window=1.0),
        ),
        (  # several policies: the first counts
            '"burst";r=3;t=1, "daily";r=900;t=3600',
            '"burst";q=10;w=1, "daily";q=1000;w=86400',
            RateLimitInfo(remaining=3, reset=1.0, quota=10, window=1.0),
        ),
        (  # a comma inside a quoted name is not a list separator
            '"a,b";r=4;t=2',
            None,
            RateLimitInfo(remaining=4, reset=2.0),
        ),
        ('"default";t=2.5', None, RateLimitInfo(reset=2.5)),  # missing r
        (  # garbled values leave only their own field unset
            '"default";r=-1;t=abc',
            '"burst";q=1.5;w=300',
            RateLimitInfo(window=300.0),
        ),
        ('"default";R=9;T=4', None, RateLimitInfo(remaining=9, reset=4.0)),
    ],
)
def test_parse_ratelimit(
    ratelimit: str | None, policy: str | None, expected: RateLimitInfo
) -> None:
    assert parse_ratelimit(ratelimit, policy) == expected


@pytest.mark.parametrize(
    ("ratelimit", "policy"),
    [
        (None, None),
        ("", ""),
        ("garbage", "more garbage"),
        ('"default"', '"burst"'),
        ('"default";r', '"burst";q='),
        (";;;,,,", '"""'),
        ('"unterminated;r=5', None),
        ("limit=100, remaining=50, reset=30", None),  # an older draft's form
    ],
)
def test_parse_ratelimit_returns_none_for_garbage(
    ratelimit: str | None, policy: str | None
) -> None:
    assert parse_ratelimit(ratelimit, policy) is None
