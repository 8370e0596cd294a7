"""The report counts every request, retries included, and splits accepted from rejected.

Envelopes carry ``statuses`` (attempt outcome -> count) once the envelope builder writes
it; until then, and for older files, the report falls back to the final status and
counts the retries before it as "earlier (not recorded)".
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
