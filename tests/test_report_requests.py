"""The report counts every request, retries included, and splits accepted from rejected.

Envelopes carry ``statuses`` (attempt outcome -> count) once the envelope builder writes
it; until then, and for older files, the report falls back to the final status and
counts the retries before it as "earlier (not recorded)".
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import make_envelope

from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind
from dispatcher.report.summary import EARLIER, ReportBuilder, render
from dispatcher.results.ledger import read_envelopes
from dispatcher.results.sinks import encode

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def with_statuses(key: str, statuses: dict[str, int], **kw: object) -> Envelope:
    base = dataclasses.asdict(make_envelope(key, T0, **kw))
    base["delivery"] = kw.get("delivery", Delivery.CONFIRMED)
    base["error"] = kw.get("error")
    base["statuses"] = statuses
    return Envelope(**base)


def test_every_request_is_counted_from_statuses() -> None:
    builder = ReportBuilder()
    builder.add(with_statuses("a", {"503": 2, "200": 1}, attempts=3))
    builder.add(with_statuses("b", {"429": 1, "timeout": 1, "200": 1}, attempts=3))
    builder.add(with_statuses("c", {"200": 1}))
    report = builder.build()
    assert report.requests == {"200": 3, "503": 2, "429": 1, "timeout": 1}
    assert sum(report.requests.values()) == 7
    # The 429 that was retried shows in the throughput though the record ended 200.
    assert sum(b.rate_limited for b in report.throughput) == 1
    assert "requests   200: 3, 503: 2, 429: 1, timeout: 1" in render(report, "text")


def test_without_statuses_the_final_answer_and_unrecorded_retries(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    error = EnvelopeError(kind=ErrorKind.HTTP, code=10001, message="internal")
    envs = [
        make_envelope("a", T0, attempts=3),
        make_envelope(
            "b", T0, ok=False, status=500, attempts=2, delivery=Delivery.REJECTED, error=error
        ),
    ]
    path.write_bytes(b"".join(encode(e) for e in envs))
    builder = ReportBuilder()
    builder.add_all(read_envelopes(str(path)))
    assert builder.build().requests == {EARLIER: 3, "200": 1, "500": 1}


def test_rejected_latencies_are_kept_apart_from_accepted_ones() -> None:
    builder = ReportBuilder()
    for k in range(50):
        builder.add(make_envelope(f"ok{k}", T0 + timedelta(seconds=k), latency_ms=100.0 + k))
    error = EnvelopeError(kind=ErrorKind.RATE_LIMITED, code=971, message="slow down")
    for k in range(60):
        builder.add(
            make_envelope(
                f"rl{k}",
                T0 + timedelta(seconds=k),
                ok=False,
                status=429,
                latency_ms=0.4,
                delivery=Delivery.REJECTED,
                error=error,
            )
        )
    report = builder.build()
    # Mixed, the median is a 429's fraction of a millisecond; apart, each is itself.
    assert report.latency.p50_ms is not None
    assert report.latency.p50_ms < 1
    assert report.latency_accepted.count == 50
    assert report.latency_accepted.p50_ms is not None
    assert 120 <= report.latency_accepted.p50_ms <= 130
    assert report.latency_rejected.count == 60
    assert report.latency_rejected.max_ms == 0.4
    text = render(report, "text")
    assert "accepted   p50 12" in text
    assert "rejected   p50 0.4" in text


# --- the plot shows every request ----------------------------------------------------------


def test_the_plot_places_every_request_retries_included() -> None:
    pytest.importorskip("numpy", reason="the plot extra is not installed")
    from dispatcher.report.plot import EARLIER as EARLIER_KIND
    from dispatcher.report.plot import HTTP_ERROR, NO_ANSWER, RATE_LIMITED, Points, _series

    points = Points()
    # Three 429s, then confirmed, over 3 s: the 429s fall between the first request and
    # the last, not on the record's finish.
    points.add(
        with_statuses(
            "a",
            {"429": 3, "200": 1},
            attempts=4,
            finished_at=T0 + timedelta(seconds=3),
            latency_ms=10.0,
        )
    )
    # An older envelope (no statuses): its one retry is an earlier attempt, outcome unknown.
    points.add(make_envelope("b", T0, attempts=2))
    # Cut off with a request out (no final latency): both attempts are earlier ones.
    points.add(
        with_statuses(
            "c",
            {"503": 1, "stopped": 1},
            attempts=2,
            ok=False,
            status=None,
            latency_ms=None,
            delivery=Delivery.UNKNOWN,
            error=EnvelopeError(kind=ErrorKind.STOPPED, code=None, message="stopped"),
            finished_at=T0 + timedelta(seconds=1),
        )
    )
    assert points.requests == 4 + 2 + 2
    kinds = sorted(points.earlier_kind)
    assert kinds == sorted([RATE_LIMITED] * 3 + [EARLIER_KIND, HTTP_ERROR, NO_ANSWER])
    a_times = [
        t - T0.timestamp()
        for t, k in zip(points.earlier_t, points.earlier_kind, strict=True)
        if k == RATE_LIMITED
    ]
    assert a_times[0] == pytest.approx(0.0)
    assert all(0.0 <= t < 3.0 for t in a_times)
    # The bars add up to the requests made: 8, not the 3 records' last attempts.
    s = _series(points, None)
    assert round(sum(float(v.sum()) for v in s.per_kind) * s.width) == 8
    assert round(float(s.per_kind[RATE_LIMITED].sum()) * s.width) == 3


def test_the_demo_plot_counts_the_retried_faults(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    from dispatcher.report.plot import Points

    envs = [
        with_statuses(
            f"k{i}", {"503": 1, "200": 1} if i % 4 == 0 else {"200": 1}, attempts=1 + (i % 4 == 0)
        )
        for i in range(40)
    ]
    points = Points()
    for e in envs:
        points.add(e)
    assert points.requests == 50
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(encode(e) for e in envs))
    builder = ReportBuilder()
    builder.add_all(read_envelopes(str(path)))
    report = builder.build()
    from dispatcher.report.plot import _headline

    assert "40 records sent, 50 requests (10 retries)" in _headline(report, None, points)


def test_the_plot_headline_latency_is_the_2xx_answers_429s_apart() -> None:
    # Issue 22: a load run refused mostly with fast 429s showed a headline p50 of 0.3 ms.
    pytest.importorskip("numpy", reason="the plot extra is not installed")
    from dispatcher.report.plot import Points, _headline, _series

    limited = EnvelopeError(kind=ErrorKind.RATE_LIMITED, code=971, message="slow down")
    envs = [
        with_statuses(f"ok{i}", {"200": 1}, latency_ms=100.0 + i, line=i + 1) for i in range(10)
    ]
    envs += [
        with_statuses(
            f"rl{i}",
            {"429": 1},
            ok=False,
            status=429,
            latency_ms=0.3,
            delivery=Delivery.REJECTED,
            error=limited,
            line=100 + i,
        )
        for i in range(30)
    ]
    builder = ReportBuilder()
    points = Points()
    for e in envs:
        builder.add(e)
        points.add(e)
    report = builder.build()
    assert report.latency.p50_ms is not None
    assert report.latency.p50_ms < 1  # all answers mixed: the 429s win
    headline = _headline(report, None, points)
    parts = headline.split("  ·  ")
    p50 = next(p for p in parts if p.startswith("p50 (2xx) "))
    assert 100 <= float(p50.removeprefix("p50 (2xx) ").removesuffix(" ms")) <= 110
    assert "p50 (429 and other errors, 30) 0.3 ms" in parts
    assert not any(p.startswith("p50 ") and "0.3 ms" in p and "429" not in p for p in parts)
    # The p50 line over time is the confirmed requests' too.
    import numpy as np

    s = _series(points, None)
    drawn = s.p50[~np.isnan(s.p50)]
    assert len(drawn) > 0
    assert (drawn >= 100).all()
