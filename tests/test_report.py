"""`dispatcher report`: numbers checked against a results file built by hand, and against
real runs on the emulator with injected latency."""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from dispatcher.commands.cli import main
from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind
from dispatcher.report.summary import (
    Report,
    ReportBuilder,
    check_thresholds,
    choose_bucket,
    parse_threshold,
    render,
)
from dispatcher.results.ledger import read_envelopes
from dispatcher.results.sinks import encode
from dispatcher.results.sqlite_sink import SqliteSink
from dispatcher.run import runner
from dispatcher.run.settings import Credentials, SendSettings

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
HDR_PRECISION = 1e-3  # 3 significant digits


def env(
    key: str,
    *,
    at: float,
    latency: float | None,
    status: int | None = 200,
    attempts: int = 1,
    delivery: Delivery = Delivery.CONFIRMED,
    kind: ErrorKind | None = None,
    code: int | None = None,
    elapsed: float | None = None,
    line: int = 1,
) -> Envelope:
    finished = T0 + timedelta(seconds=at)
    error = None
    if kind is not None:
        error = EnvelopeError(kind=kind, code=code, message=f"{kind} {code}")
    took = elapsed if elapsed is not None else (latency or 0.0)
    return Envelope(
        key=key,
        source="events.jsonl",
        line=line,
        workflow="wf",
        instance_id=None if delivery is Delivery.NOT_SENT else f"inst-{key}",
        event_type="evt",
        ok=delivery is Delivery.CONFIRMED,
        status=status,
        attempts=attempts,
        delivery=delivery,
        error=error,
        started_at=None if attempts == 0 else finished - timedelta(milliseconds=took),
        finished_at=finished,
        latency_ms=latency,
        elapsed_ms=took,
    )


def hand_built() -> list[Envelope]:
    """28 final envelopes, plus a superseded line for key "dup", written first."""
    envs = [
        # An earlier run's line for "dup": the later confirmed line must win.
        env(
            "dup",
            at=0.1,
            latency=999.0,
            status=500,
            delivery=Delivery.REJECTED,
            kind=ErrorKind.HTTP,
            code=10001,
        ),
    ]
    # 20 confirmed at 10, 20, ... 200 ms, two a second over 10 s.
    envs += [env(f"ok{i:02d}", at=i * 0.5, latency=10.0 * (i + 1), line=i + 2) for i in range(20)]
    envs += [
        env("retried-a", at=3.2, latency=15.0, attempts=3, elapsed=1500.0),
        env("retried-b", at=3.4, latency=16.0, attempts=2, elapsed=700.0),
        env(
            "e500",
            at=4.1,
            latency=250.0,
            status=500,
            attempts=5,
            delivery=Delivery.REJECTED,
            kind=ErrorKind.HTTP,
            code=10001,
            elapsed=9000.0,
        ),
        env(
            "e404",
            at=4.6,
            latency=30.0,
            status=404,
            delivery=Delivery.REJECTED,
            kind=ErrorKind.HTTP,
            code=10400,
        ),
        env(
            "e429",
            at=5.5,
            latency=5.0,
            status=429,
            delivery=Delivery.REJECTED,
            kind=ErrorKind.RATE_LIMITED,
            code=971,
        ),
        env(
            "lost",
            at=7.9,
            latency=1000.0,
            status=None,
            attempts=2,
            delivery=Delivery.UNKNOWN,
            kind=ErrorKind.TIMEOUT,
            elapsed=2500.0,
        ),
        env(
            "bad-line",
            at=0.0,
            latency=None,
            status=None,
            attempts=0,
            delivery=Delivery.NOT_SENT,
            kind=ErrorKind.INVALID,
        ),
        env("dup", at=9.0, latency=12.0, line=99),
    ]
    return envs


def write_jsonl(path: Path, envs: list[Envelope]) -> None:
    path.write_bytes(b"".join(encode(e) for e in envs))


def hdr_rank(values: list[float], p: float) -> float:
    """The p-th percentile by HdrHistogram_py's rule: the value of rank round(p% * n)."""
    ordered = sorted(values)
    return ordered[max(int(p / 100 * len(ordered) + 0.5), 1) - 1]


FINAL_LATENCIES = [10.0 * (i + 1) for i in range(20)] + [15.0, 16.0, 250.0, 30.0, 5.0, 1000.0, 12.0]


def report_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["report", *args, "--format", "json"]) == 0
    doc: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    return doc


def test_hand_built_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.jsonl"
    write_jsonl(path, hand_built())
    doc = report_json(capsys, str(path), "--top", "3")

    assert doc["records"] == 28  # 29 lines, "dup" counted once
    assert doc["confirmed"] == 23
    assert doc["failed"] == 4 + 1  # e500, e404, e429, lost, bad-line
    assert doc["sent"] == 27  # everything but the invalid line
    assert doc["delivery"] == {"confirmed": 23, "rejected": 3, "not_sent": 1, "unknown": 1}
    assert doc["status"] == {"200": 23, "none": 2, "404": 1, "429": 1, "500": 1}
    assert doc["errors"] == {
        "http/10001": 1,
        "http/10400": 1,
        "invalid": 1,
        "rate_limited/971": 1,
        "timeout": 1,
    }
    assert doc["cf_codes"] == {"971": 1, "10001": 1, "10400": 1}
    assert doc["attempts"] == {
        "total": 20 + 3 + 2 + 5 + 1 + 1 + 2 + 0 + 1,
        "retries": 2 + 1 + 4 + 1,
        "records_retried": 4,
        "distribution": {"0": 1, "1": 23, "2": 2, "3": 1, "5": 1},
    }
    lat = doc["latency_ms"]
    assert lat["count"] == len(FINAL_LATENCIES)
    assert lat["max"] == 1000.0  # exact
    assert lat["min"] == 5.0
    assert lat["mean"] == pytest.approx(sum(FINAL_LATENCIES) / len(FINAL_LATENCIES))
    for p in (50, 90, 95, 99):
        expected = hdr_rank(FINAL_LATENCIES, p)
        assert lat[f"p{p}"] == pytest.approx(expected, rel=HDR_PRECISION), p
    # Throughput: every record once, by finish second.
    buckets = doc["throughput"]["buckets"]
    assert doc["throughput"]["bucket_s"] == 1
    assert sum(b["records"] for b in buckets) == 28
    assert sum(b["confirmed"] for b in buckets) == 23
    assert sum(b["rate_limited"] for b in buckets) == 1
    assert [b["records"] for b in buckets] == [3, 2, 2, 4, 4, 3, 2, 3, 2, 3]
    # The slowest and the failed, with their keys.
    assert [r["key"] for r in doc["slowest"]] == ["lost", "e500", "ok19"]
    failed = doc["failed_records"]
    assert failed["total"] == 5
    assert [r["key"] for r in failed["first"]] == ["e500", "e404", "e429"]


def test_sqlite_results_give_the_same_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl, db = tmp_path / "r.jsonl", tmp_path / "r.sqlite"
    envs = hand_built()
    write_jsonl(jsonl, envs)

    async def fill() -> None:
        sink = SqliteSink(str(db))
        for e in envs:
            sink.write(e)
        await sink.aclose()

    import anyio

    anyio.run(fill)
    a = report_json(capsys, str(jsonl))
    b = report_json(capsys, str(db))
    for key in ("records", "confirmed", "delivery", "status", "errors", "attempts", "latency_ms"):
        assert a[key] == b[key], key


def test_several_files_are_several_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    write_jsonl(one, hand_built())
    write_jsonl(two, [env("ok00", at=20.0, latency=40.0), env("x", at=21.0, latency=60.0)])
    doc = report_json(capsys, str(one), str(two))
    # The key ok00 is in both files: two runs, counted twice.
    assert doc["records"] == 28 + 2
    assert [(r["path"], r["records"]) for r in doc["runs"]] == [(str(one), 28), (str(two), 2)]


def test_text_and_markdown_show_what_failed_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    write_jsonl(path, hand_built())
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "28: 23 confirmed (82.1%), 5 not; 27 sent" in text
    assert "http/10001: 1" in text
    assert "p50" in text
    assert "p99" in text
    assert "e500  events.jsonl:1  inst-e500  rejected  status 500  attempts 5" in text
    assert "failed: first 5 of 5" in text
    assert main(["report", str(path), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("# dispatcher report")
    assert "| `lost` |" in md
    assert "| last attempt | 27 |" in md


def test_unreadable_input_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{}\n")
    assert main(["report", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


# --- thresholds -----------------------------------------------------------------------------


def test_threshold_parsing() -> None:
    t = parse_threshold("p99<800ms")
    assert (t.metric, t.op, t.value) == ("p99", "<", 800.0)
    assert parse_threshold("p50 <= 1.5s").value == 1500.0
    assert parse_threshold("error_rate<0.5%").value == pytest.approx(0.005)
    assert parse_threshold("dropped<1%").value == pytest.approx(0.01)
    assert parse_threshold("rate>=45/s").value == 45.0
    for bad in ("p99", "p98<1s", "error_rate<5", "p99<fast", "dropped<1%%"):
        with pytest.raises(ValueError, match=r"p99|p98|error_rate|dropped"):
            parse_threshold(bad)


def test_thresholds_judge_the_measured_values() -> None:
    ts = [parse_threshold("p99<800ms"), parse_threshold("error_rate<1%")]
    breaches = check_thresholds(ts, {"p99": 900.0, "error_rate": 0.0})
    assert [b.threshold.text for b in breaches] == ["p99<800ms"]
    assert breaches[0].describe() == "p99<800ms: measured 900.0 ms"
    # No data is a breach: a test that measured nothing must not pass.
    assert len(check_thresholds(ts, {"p99": None, "error_rate": None})) == 2


def test_report_threshold_breach_exits_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "results.jsonl"
    write_jsonl(path, hand_built())
    code = main(
        [
            "report",
            str(path),
            *("--threshold", "all_p99<500ms"),
            *("--threshold", "p50<1s"),
            *("--threshold", "p99<500ms"),
            *("--threshold", "rejected_max<200ms"),
        ]
    )
    assert code == 4
    err = capsys.readouterr().err
    # all_: every attempt's latency, the 1 s timeout included.
    assert "all_p99<500ms: measured 1,000.0 ms" in err
    # Plain p99 judges the 2xx answers (the slowest took 200 ms): it holds.
    assert "p50<1s" not in err
    assert "p99<500ms:" not in err.replace("all_p99<500ms:", "")
    # rejected_: the error answers (the 500 took 250 ms).
    assert "rejected_max<200ms: measured 250.0 ms" in err


def test_choose_bucket_keeps_rows_few() -> None:
    assert choose_bucket(10) == 1
    assert choose_bucket(600) == 15
    assert choose_bucket(86_400) == 1800


# --- real runs against the emulator ---------------------------------------------------------


async def send_ids(emu: Emulator, tmp_path: Path, name: str, count: int = 30) -> Report:
    ids = tmp_path / f"{name}.txt"
    ids.write_text("".join(f"i{k}\n" for k in range(count)))
    results = tmp_path / f"{name}.jsonl"
    settings = SendSettings(
        inputs=(str(ids),),
        workflow="wf",
        event_type="evt",
        account_id="acc",
        base_url=emu.base_url,
        credentials=Credentials(token="tok-report-test"),
        rate="unlimited",
        concurrency=count,
        results=str(results),
    )
    await runner.run(settings)
    builder = ReportBuilder()
    builder.start_run(str(results))
    builder.add_all(read_envelopes(str(results)))
    return builder.build()


async def test_percentiles_move_with_injected_latency(tmp_path: Path) -> None:
    async with Emulator(EmulatorConfig(limit=None)) as fast_emu:
        fast = await send_ids(fast_emu, tmp_path, "fast")
    slow_faults = Faults.parse([], latency="200ms")
    async with Emulator(EmulatorConfig(limit=None, faults=slow_faults)) as slow_emu:
        slow = await send_ids(slow_emu, tmp_path, "slow")
    assert fast.confirmed == slow.confirmed == 30
    assert fast.latency.p50_ms is not None
    assert slow.latency.p50_ms is not None
    assert slow.latency.p99_ms is not None
    assert slow.latency.max_ms is not None
    assert fast.latency.min_ms is not None
    assert slow.latency.min_ms is not None
    # The added 200 ms moves the whole distribution: nothing is faster than what was
    # injected, and the fastest request moves by about it. (The minimum, not the median,
    # is compared: on a loaded 2-core machine, opening 30 connections at once can add
    # 100 ms to a median of either run.) The move has no lower bound of its own: the two
    # runs are seconds apart, and under load the fast run's fastest took 61 ms, leaving
    # a move of 179 ms; nothing under 200 ms in the slow run is the lower bound.
    assert slow.latency.min_ms >= 200
    assert slow.latency.min_ms - fast.latency.min_ms <= 400
    assert slow.latency.p50_ms >= max(200, fast.latency.p50_ms)
    assert slow.latency.p50_ms <= slow.latency.p99_ms <= slow.latency.max_ms


# --- plots ----------------------------------------------------------------------------------

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="the plot extra is not installed: pip install 'cf-workflows-dispatcher[plot]'",
)
needs_plotly = pytest.mark.skipif(
    importlib.util.find_spec("plotly") is None,
    reason="the plot extra is not installed: pip install 'cf-workflows-dispatcher[plot]'",
)


@needs_matplotlib
def test_png_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.jsonl"
    write_jsonl(path, hand_built())
    png = tmp_path / "run.png"
    assert main(["report", str(path), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1500, 1100)
    assert len(data) > 30_000  # three panels with data, not an empty canvas
    assert f"plot written to {png}" in capsys.readouterr().err


@needs_plotly
def test_html_plot(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    write_jsonl(path, hand_built())
    html = tmp_path / "run.html"
    assert main(["report", str(path), "--plot", str(html)]) == 0
    text = html.read_text()
    assert "dispatcher: results.jsonl" in text
    assert (
        "latency of each record&#39;s last attempt" in text
        or "latency of each record's last attempt" in text
    )
    assert "Plotly" in text  # plotly.js inside: opens offline


def test_plot_without_the_extra_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.jsonl"
    write_jsonl(path, hand_built())
    # None in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    for name in ("run.png", "run.html"):
        assert main(["report", str(path), "--plot", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "pip install 'cf-workflows-dispatcher[plot]'" in err
    assert not (tmp_path / "run.png").exists()
    assert main(["report", str(path), "--plot", str(tmp_path / "run.svg")]) == 2
    assert ".png or .html" in capsys.readouterr().err


def test_render_formats_agree(tmp_path: Path) -> None:
    builder = ReportBuilder()
    builder.add_all(hand_built()[1:])
    report = builder.build()
    doc = orjson.loads(render(report, "json"))
    assert doc["records"] == report.records == 28
    assert "p99" in render(report, "text")
