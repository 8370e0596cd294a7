"""`dispatcher report RESULTS...`: what one or more runs did, from their results files.

Exit codes: 0 report printed (and every ``--threshold`` held), 2 a file cannot be read or
a flag is wrong, 4 a threshold was breached.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Final

import orjson

from dispatcher.report.summary import (
    DEFAULT_TOP,
    FORMATS,
    Format,
    ReportBuilder,
    Threshold,
    check_thresholds,
    parse_threshold,
    render,
)
from dispatcher.results.ledger import LedgerError, TornTail, read_envelopes
from dispatcher.run.settings import parse_duration

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_THRESHOLD: Final = 4


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Several files are several runs: within a file the last envelope of a key wins, "
        "across files every file's envelopes are counted. Plots need the plot extra: "
        "pip install 'cf-workflows-dispatcher[plot]'."
    )
    parser.add_argument(
        "results",
        nargs="+",
        metavar="RESULTS",
        help="results file of send or load: JSONL, or SQLite (.sqlite, .sqlite3, .db); "
        "a `dispatcher verify` output adds a verify section",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        dest="report_format",
        help="output format (default: text)",
    )
    parser.add_argument(
        "--top",
        type=int,
        default=DEFAULT_TOP,
        metavar="N",
        help=f"how many slowest and failed records to list (default: {DEFAULT_TOP})",
    )
    parser.add_argument(
        "--bucket",
        default=None,
        metavar="DURATION",
        help="throughput bucket width, whole seconds such as 1s or 1m "
        "(default: the narrowest round width giving at most 60 rows)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="also draw latency over time, rate per second and a latency histogram "
        "into FILE (.png or .html)",
    )
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="EXPR",
        help="fail (exit 4) unless it holds: p50/p90/p95/p99/max/mean<800ms, "
        "error_rate<0.5%%, rate>=45/s; may be repeated",
    )


def _error(message: str) -> int:
    print(f"dispatcher report: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    fmt: Format = args.report_format
    thresholds: list[Threshold] = []
    try:
        for text in args.threshold:
            threshold = parse_threshold(text)
            if threshold.metric == "dropped":
                raise ValueError(
                    f"{text!r}: dropped arrivals are known only to `dispatcher load`, "
                    "results files do not record them"
                )
            thresholds.append(threshold)
        bucket = None
        if args.bucket is not None:
            seconds = parse_duration(args.bucket)
            if seconds < 1 or not seconds.is_integer():
                raise ValueError(f"--bucket {args.bucket!r}: give whole seconds, at least 1s")
            bucket = int(seconds)
        if args.top < 0:
            raise ValueError("--top must be 0 or more")
    except ValueError as exc:
        return _error(str(exc))
    if args.plot is not None:
        from dispatcher.report.plot import PlotUnavailable, check_plot_path

        try:
            check_plot_path(args.plot)
        except (ValueError, PlotUnavailable) as exc:
            return _error(str(exc))
    for path in args.results:
        if not os.path.exists(path):
            return _error(f"{path}: no such file")
        if os.path.isdir(path):
            return _error(f"{path}: is a folder; give the results files in it")

    from dispatcher.report.verify import VerifySection, is_verify_file

    verify = VerifySection()
    runs: list[str] = []
    try:
        for path in args.results:
            if is_verify_file(path):
                verify.add_file(path)  # `dispatcher verify` output: its own section
            else:
                runs.append(path)
    except ValueError as exc:
        return _error(str(exc))
    if not runs:
        print(verify.render(fmt), flush=True)
        return EXIT_OK

    builder = ReportBuilder(top=args.top)
    points = None
    if args.plot is not None:
        from dispatcher.report.plot import Points

        points = Points()

    def torn(t: TornTail) -> None:
        builder.note(f"{t.path}:{t.line}: skipped a partial last line ({t.size} bytes)")

    # load --observe left RESULTS.observe.jsonl beside a results file: the reaction section.
    from dispatcher.report import observed as obs

    watched = {p for p in runs if os.path.exists(obs.sidecar_path(p))}
    try:
        parts = [obs.read_sidecar(obs.sidecar_path(p)) for p in runs if p in watched]
    except ValueError as exc:
        return _error(str(exc))
    arrivals: list[float] = []  # send times of the observed runs' requests, for the knee
    try:
        for path in runs:
            builder.start_run(path)
            for env in read_envelopes(path, on_torn=torn):
                builder.add(env)
                if points is not None:
                    points.add(env)
                if path in watched and env.latency_ms is not None:
                    arrivals.append(env.finished_at.timestamp() - env.latency_ms / 1000)
    except LedgerError as exc:
        return _error(str(exc))
    report = builder.build(bucket_s=bucket)
    text = render(report, fmt)
    observed = obs.merge(parts) if parts else None
    metrics = report.metrics()
    if observed is not None:
        metrics.update(observed.metrics())
        if fmt == "json":
            doc = orjson.loads(text)
            doc["observe"] = observed.as_dict(report.latency_accepted)
            text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
        else:
            knee_rate = obs.knee_of(arrivals, observed)
            section = obs.render(observed, report.latency_accepted, fmt, knee_rate)
            text = f"{text}\n\n{section}" if fmt == "markdown" else f"{text}\n{section}"
    if verify.files:
        text = verify.append_to(text, fmt)
    print(text, flush=True)
    if args.plot is not None and points is not None:
        from dispatcher.report.plot import PlotUnavailable, write_plot

        try:
            write_plot(args.plot, report, points, observed=observed)
        except PlotUnavailable as exc:
            return _error(str(exc))
        print(f"dispatcher report: plot written to {args.plot}", file=sys.stderr)
    breaches = check_thresholds(thresholds, metrics)
    for breach in breaches:
        print(f"dispatcher report: threshold breached: {breach.describe()}", file=sys.stderr)
    return EXIT_THRESHOLD if breaches else EXIT_OK
