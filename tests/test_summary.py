"""The closing summary of `send`: counts that add up, and the command that finishes the job."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
from factories import make_envelope

from dispatcher.commands.progress import format_summary, pause_text
from dispatcher.commands.send import finish_command, write_unknown_list
from dispatcher.model import Delivery, EnvelopeError, ErrorKind
from dispatcher.results.sinks import encode
from dispatcher.run.settings import Credentials, SendSettings
from dispatcher.sending.stats import RunStats

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LOST = EnvelopeError(kind=ErrorKind.TIMEOUT, code=None, message="no answer in 30s")


def settings(results: str = "r.jsonl", inputs: tuple[str, ...] = ("in.jsonl",)) -> SendSettings:
    return SendSettings(
        inputs=inputs,
        account_id="acc",
        credentials=Credentials(token="tok-summary"),
        results=results,
    )


def stats_with(*deliveries: Delivery, elapsed: float = 10.0) -> RunStats:
    stats = RunStats(started=0.0, finished=elapsed)
    for k, delivery in enumerate(deliveries):
        ok = delivery is Delivery.CONFIRMED
        stats.record(
            make_envelope(
                f"k{k}",
                T0,
                ok=ok,
                delivery=delivery,
                status=200 if ok else None,
                error=None if ok else LOST,
            )
        )
    return stats


def test_unknown_records_are_counted_in_the_records_line() -> None:
    text = format_summary(stats_with(Delivery.CONFIRMED, Delivery.UNKNOWN), "r.jsonl")
    assert "records    2 (1 confirmed, 0 failed, 1 unknown)" in text


def test_paused_never_exceeds_the_wall_time_and_short_runs_get_no_rate() -> None:
    stats = stats_with(Delivery.CONFIRMED, elapsed=8.88)
    stats.pauses, stats.paused_s = 1, 9.0  # a pause set for 9 s; the run stopped inside it
    text = format_summary(stats, "r.jsonl")
    assert "paused     1 times, 8.9 s in all" in text
    assert "wall time  8.88 s" in text
    short = format_summary(stats_with(Delivery.CONFIRMED, elapsed=0.07), "r.jsonl")
    assert "too short to measure a rate" in short
    assert "requests/s" not in short


def test_the_finish_command_resumes_and_retries_what_the_stop_refused() -> None:
    argv = ["send", "in.jsonl", "--workflow", "wf", "--results", "r.jsonl", "--overwrite"]
    assert finish_command(argv, settings()) == (
        "dispatcher send in.jsonl --workflow wf --results r.jsonl --resume"
    )
    refused = RunStats()
    refused.statuses["401"] = 8
    assert finish_command(argv, settings(), refused) == (
        "dispatcher send in.jsonl --workflow wf --results r.jsonl --resume --retry-failed"
    )
    assert finish_command(argv, settings(results="-")) is None
    quoted = finish_command(["send", "my events.jsonl"], settings(inputs=("my events.jsonl",)))
    assert quoted == "dispatcher send 'my events.jsonl' --resume"
    stopped = stats_with(Delivery.CONFIRMED)
    stopped.stop_reason = "SIGINT twice: stopped at once"
    text = format_summary(stopped, "r.jsonl", finish="dispatcher send in.jsonl --resume")
    assert text.splitlines()[-1] == "  to finish  dispatcher send in.jsonl --resume"
    assert "finished the requests in flight" not in text


def test_unknown_records_are_listed_beside_the_results(tmp_path: Path) -> None:
    results = tmp_path / "r.jsonl"
    lost = make_envelope("b", T0, ok=False, status=None, delivery=Delivery.UNKNOWN, error=LOST)
    later = make_envelope("c", T0, ok=False, status=None, delivery=Delivery.UNKNOWN, error=LOST)
    results.write_bytes(
        encode(make_envelope("a", T0))
        + encode(lost)
        + encode(later)
        + encode(make_envelope("c", T0))
    )
    listed = write_unknown_list(str(results))
    assert listed == f"{results}.unknown.jsonl"
    rows = [orjson.loads(line) for line in Path(listed).read_bytes().splitlines()]
    # "c" was unknown, then confirmed by a later run: only "b" is still to decide.
    assert [(r["key"], r["instance_id"], r["error"]) for r in rows] == [
        ("b", "inst-b", "no answer in 30s")
    ]
    results.write_bytes(encode(make_envelope("a", T0)))
    assert write_unknown_list(str(results)) is None
    assert not Path(listed).exists()  # an outdated list does not linger
    text = format_summary(stats_with(Delivery.UNKNOWN), str(results), unknown_list=listed)
    assert f"unknown    listed in {listed}" in text
    assert "--resume --resend-unknown" in text


def test_progress_says_when_the_run_is_paused() -> None:
    stats = RunStats()
    stats.rate_limited = 3
    assert pause_text(stats, lambda: 36.2) == "paused: rate limited, resuming in 37 s"
    assert pause_text(stats, lambda: -1.0) is None
    assert pause_text(RunStats(), lambda: 2.0) == (
        "paused: waiting for the rate budget, resuming in 2 s"
    )


def test_the_summary_tells_when_the_disk_held_the_run_back() -> None:
    stats = stats_with(Delivery.CONFIRMED)
    assert "disk" not in format_summary(stats, "r.jsonl")
    stats.disk_held_s = 3.24
    text = format_summary(stats, "r.jsonl")
    assert "  disk       new requests held 3.2 s in all (finished envelopes waited" in text
