"""`dispatcher load`: an open-model load test of one workflow, judged by thresholds.

With ``--observe`` the instances' steps are read after their events were accepted, or
watched through the relay's ``POST /watch`` with ``--target relay``
(:mod:`dispatcher.run.observe`), and the reaction figures stand beside the accept ones.

Exit codes: 0 done and every ``--threshold`` held, 2 usage or config error (a
``--metrics-port`` that cannot be served included), 3 stopped
early (credentials rejected, nothing listens at the target), 4 a threshold was breached,
130 interrupted, 141 stdout closed early (``--results - | head -1``; the ``--plot`` is
written all the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from typing import Final, TextIO

import anyio
import orjson

from dispatcher.commands.cli import stdout_gone
from dispatcher.commands.metrics import LoadSource, add_metrics_arguments
from dispatcher.commands.metrics import start as start_metrics
from dispatcher.emulator.units import parse_share
from dispatcher.inputs.records import InputError, KeyDeriver, ReadOptions, read_batches
from dispatcher.inputs.validation import MAX_BODY_BYTES, RuleViolation, check_path
from dispatcher.model import Invalid
from dispatcher.report.observed import ObserveSummary, sidecar_path, write_sidecar
from dispatcher.report.observed import render as render_observed
from dispatcher.report.summary import (
    Threshold,
    check_thresholds,
    format_metric,
    parse_threshold,
    render,
)
from dispatcher.results.sinks import check_results_path
from dispatcher.run.config import add_send_arguments, load_send_settings
from dispatcher.run.loadtest import (
    DEFAULT_CONCURRENCY,
    DEFAULT_RESULTS,
    LoadProfile,
    LoadResult,
    LoadRun,
    LoadSettings,
    live_view,
    parse_stage_rate,
)
from dispatcher.run.observe import (
    DEFAULT_BUDGET,
    DEFAULT_REACTION_TIMEOUT,
    Observer,
    ObserveSettings,
)
from dispatcher.run.settings import ConfigError, SendSettings, parse_duration

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_STOPPED: Final = 3
EXIT_THRESHOLD: Final = 4
EXIT_INTERRUPTED: Final = 130
DEFAULT_SAMPLE: Final = 1.0
_OBSERVED_METRICS: Final = ("reaction_", "next_step_", "completion_", "unreacted")
DEFAULT_DURATION: Final = "30s"
_MAX_INVALID_SHOWN: Final = 5

# Flags of `send` that mean exactly the same here (target, credentials, timeouts): taken
# with their help from send's parser, and parsed by send's loader below.
_SHARED_FLAGS: Final = (
    "--target",
    "--relay-secret-file",
    "--batch-size",
    "--http-client",
    "--validate-ids",
    "--account-id",
    "--base-url",
    "--token",
    "--token-file",
    "--timeout",
    "--connect-timeout",
    "--overwrite",
    "--quiet",
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Arrivals follow --rate/--duration or --ramp whatever the server does; an arrival "
        "that finds all --concurrency workers busy is dropped and counted, never queued. "
        "No retries: each arrival is one request. Credentials and target as for send: "
        "CLOUDFLARE_API_TOKEN (or CLOUDFLARE_EMAIL + CLOUDFLARE_API_KEY, or --token-file), "
        "CLOUDFLARE_ACCOUNT_ID, CLOUDFLARE_BASE_URL; --target wrangler-dev needs none of "
        "them, --target relay the relay's secret (DISPATCHER_RELAY_SECRET). Latency "
        "thresholds (p99<800ms) judge the 2xx answers; rejected_p99 the others, all_p99 all."
    )
    # Borrow send's definitions of the shared flags, so help and parsing stay the same.
    donor = argparse.ArgumentParser(add_help=False)
    add_send_arguments(donor)
    for action in donor._actions:
        if any(opt in _SHARED_FLAGS for opt in action.option_strings):
            parser._add_action(action)

    what = parser.add_argument_group("what each arrival sends")
    what.add_argument("--workflow", default=None, metavar="NAME", help="workflow (required)")
    what.add_argument(
        "--event-type", default=None, metavar="TYPE", help="event type of every request (required)"
    )
    body = what.add_mutually_exclusive_group()
    body.add_argument(
        "--body", default=None, metavar="JSON", help="payload of every request (default: none)"
    )
    body.add_argument(
        "--body-file", default=None, metavar="PATH", help="read the payload from PATH"
    )
    body.add_argument(
        "--bodies",
        default=None,
        metavar="FILE",
        help="JSONL file of payloads, one JSON value a line, cycled through the arrivals",
    )
    who = parser.add_argument_group("instances (one of)")
    who.add_argument(
        "--instances", default=None, metavar="FILE", help="instance ids, one a line (# comments)"
    )
    who.add_argument(
        "--instance-prefix",
        default=None,
        metavar="P",
        help="generate ids P0, P1, ... (with --instance-count)",
    )
    who.add_argument("--instance-count", default=None, metavar="N", help="how many ids to generate")
    pace = parser.add_argument_group("arrivals")
    pace.add_argument("--rate", default=None, metavar="RATE", help="constant rate: 50/s, 3000/1m")
    pace.add_argument(
        "--duration",
        default=None,
        metavar="DURATION",
        help=f"how long --rate lasts (default: {DEFAULT_DURATION})",
    )
    pace.add_argument(
        "--ramp",
        action="append",
        default=[],
        metavar="STAGES",
        help="START:END:DURATION (10/s:200/s:60s) or RATE:DURATION (200/s:30s); stages "
        "chain, repeated or comma-separated; instead of --rate",
    )
    pace.add_argument(
        "--concurrency",
        default=str(DEFAULT_CONCURRENCY),
        metavar="N",
        help=f"workers, i.e. requests in flight at most (default: {DEFAULT_CONCURRENCY})",
    )
    judge = parser.add_argument_group("results and thresholds")
    judge.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        metavar="PATH",
        help=f"where envelopes go: JSONL, SQLite, - for stdout (default: {DEFAULT_RESULTS})",
    )
    judge.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="EXPR",
        help="exit 4 unless it holds: p50/p90/p95/p99/max/mean<800ms (2xx answers; "
        "rejected_p99 etc. for the others, all_p99 etc. for all), error_rate<0.5%%, "
        "dropped<1%%, rate>=45/s; may be repeated",
    )
    watch = parser.add_argument_group("observing the workflow (docs/load.md)")
    watch.add_argument(
        "--observe",
        action="store_true",
        help="also watch each observed instance (--target relay: the relay's POST /watch; "
        "else its steps, read): reaction latency (accepted → "
        "waitForEvent's end), next step's and instance's end, unreacted; written to "
        "RESULTS.observe.jsonl",
    )
    watch.add_argument(
        "--observe-sample",
        default=None,
        metavar="P",
        help="share of the confirmed events to observe, every k-th (default: 100%%)",
    )
    watch.add_argument(
        "--reaction-timeout",
        default=None,
        metavar="DURATION",
        help="an event not consumed this long after it was accepted is unreacted "
        f"(default: {DEFAULT_REACTION_TIMEOUT:g}s)",
    )
    watch.add_argument(
        "--observe-budget",
        default=None,
        metavar="P|RATE",
        help="the reads' own pace (--target relay: POST /watch requests): a share of the "
        f"peak arrival rate (20%%) or a rate (5/s) (default: {DEFAULT_BUDGET:.0%})",
    )
    judge.add_argument(
        "--plot", default=None, metavar="FILE", help="draw the run into FILE (.png or .html)"
    )
    judge.add_argument(
        "--format",
        choices=("text", "json", "markdown"),
        default="text",
        dest="report_format",
        help="format of the closing report (default: text)",
    )
    add_metrics_arguments(parser)


class _Usage(Exception):
    pass


def _instances(args: argparse.Namespace, send: SendSettings) -> tuple[str, ...]:
    # load_settings checked both flags before send's loader ran.
    assert send.workflow is not None
    assert send.event_type is not None
    if args.instances is not None:
        if args.instance_prefix is not None or args.instance_count is not None:
            raise _Usage("--instances cannot be combined with --instance-prefix/--instance-count")
        options = ReadOptions(
            workflow=send.workflow, event_type=send.event_type, strict_ids=send.validate_ids
        )
        ids: list[str] = []
        bad: list[str] = []
        try:
            for batch in read_batches(args.instances, "ids", options, KeyDeriver()):
                for rec in batch:
                    if isinstance(rec, Invalid):
                        bad.append(f"{rec.source}:{rec.line}: {rec.message}")
                    else:
                        ids.append(rec.instance_id)
        except InputError as exc:
            raise _Usage(str(exc)) from None
        if bad:
            shown = "; ".join(bad[:_MAX_INVALID_SHOWN])
            raise _Usage(f"--instances: {len(bad)} invalid line(s): {shown}")
        if not ids:
            raise _Usage(f"--instances {args.instances}: no instance ids in the file")
        return tuple(ids)
    if args.instance_prefix is None or args.instance_count is None:
        raise _Usage(
            "give the instances: --instances FILE, or --instance-prefix P --instance-count N"
        )
    try:
        count = int(args.instance_count)
    except ValueError:
        raise _Usage(
            f"--instance-count: expected a whole number, got {args.instance_count!r}"
        ) from None
    if count < 1:
        raise _Usage("--instance-count must be at least 1")
    try:
        # The longest generated id is the one to check: same prefix, most digits.
        check_path(
            send.workflow,
            f"{args.instance_prefix}{count - 1}",
            send.event_type,
            strict_ids=send.validate_ids,
        )
    except RuleViolation as exc:
        raise _Usage(f"--instance-prefix: {exc.message}") from None
    return tuple(f"{args.instance_prefix}{i}" for i in range(count))


def _bodies(args: argparse.Namespace, send: SendSettings) -> tuple[bytes | None, ...]:
    if args.bodies is None:
        return (send.body,)
    if send.body is not None:
        raise _Usage("--bodies cannot be combined with --body or --body-file")
    bodies: list[bytes | None] = []
    try:
        with open(args.bodies, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if len(raw) > MAX_BODY_BYTES + 2:
                    raise _Usage(f"{args.bodies}:{lineno}: body over {MAX_BODY_BYTES} bytes")
                try:
                    body = orjson.dumps(orjson.loads(raw))
                except orjson.JSONDecodeError as exc:
                    raise _Usage(f"{args.bodies}:{lineno}: not JSON: {exc}") from None
                if len(body) > MAX_BODY_BYTES:
                    raise _Usage(f"{args.bodies}:{lineno}: body over {MAX_BODY_BYTES} bytes")
                bodies.append(body)
    except OSError as exc:
        raise _Usage(f"--bodies: cannot read {args.bodies}: {exc.strerror}") from None
    if not bodies:
        raise _Usage(f"--bodies {args.bodies}: no bodies in the file")
    return tuple(bodies)


def _profile(args: argparse.Namespace) -> LoadProfile:
    if args.ramp:
        if args.rate is not None or args.duration is not None:
            raise _Usage("--ramp gives rates and durations itself: drop --rate/--duration")
        try:
            return LoadProfile.parse_ramp(args.ramp)
        except ValueError as exc:
            raise _Usage(str(exc)) from None
    if args.rate is None:
        raise _Usage("give the arrival rate: --rate 50/s [--duration 30s], or --ramp")
    try:
        rate = parse_stage_rate(args.rate)
        seconds = parse_duration(args.duration or DEFAULT_DURATION)
        return LoadProfile.constant(rate, seconds)
    except ValueError as exc:
        raise _Usage(f"--rate/--duration: {exc}") from None


def load_settings(args: argparse.Namespace, env: dict[str, str] | os._Environ[str]) -> LoadSettings:
    """Build the load test's settings; credentials and target exactly as ``send`` reads them."""
    if args.workflow is None or args.event_type is None:
        raise _Usage("--workflow and --event-type are required")
    # send's loader checks the shared flags and reads the credentials: only its view of
    # them is taken, so a DISPATCHER_RATE meant for send does not reach a load test.
    borrowed = argparse.Namespace(
        inputs=["-"],
        rate="unlimited",
        concurrency=args.concurrency,
        results=args.results,
        **{
            name: getattr(args, name, None)
            for name in (
                "target",
                "relay_secret_file",
                "batch_size",
                "http_client",
                "workflow",
                "event_type",
                "body",
                "body_file",
                "validate_ids",
                "account_id",
                "base_url",
                "token_file",
                "timeout",
                "connect_timeout",
                "overwrite",
                "quiet",
            )
        },
    )
    send = load_send_settings(borrowed, env)
    thresholds: list[Threshold] = []
    for text in args.threshold:
        try:
            thresholds.append(parse_threshold(text))
        except ValueError as exc:
            raise _Usage(f"--threshold {exc}") from None
    return LoadSettings(
        workflow=args.workflow,
        event_type=args.event_type,
        instances=_instances(args, send),
        bodies=_bodies(args, send),
        profile=_profile(args),
        concurrency=send.concurrency,
        target=send.target,
        account_id=send.account_id,
        base_url=send.base_url,
        credentials=send.credentials,
        relay_secret=send.relay_secret,
        batch_size=send.batch_size,
        http_client=send.http_client,
        timeout=send.timeout,
        connect_timeout=send.connect_timeout,
        results=send.results,
        overwrite=send.overwrite,
        thresholds=tuple(thresholds),
    )


def observe_settings(args: argparse.Namespace, settings: LoadSettings) -> ObserveSettings | None:
    """``--observe`` and its flags, checked; None without ``--observe``."""
    observed = [t.text for t in settings.thresholds if t.metric.startswith(_OBSERVED_METRICS)]
    if not args.observe:
        for flag, value in (
            ("--observe-sample", args.observe_sample),
            ("--reaction-timeout", args.reaction_timeout),
            ("--observe-budget", args.observe_budget),
        ):
            if value is not None:
                raise _Usage(f"{flag} needs --observe")
        if observed:
            raise _Usage(f"--threshold {observed[0]} needs --observe")
        return None
    if settings.results == "-":
        raise _Usage("--observe writes RESULTS.observe.jsonl beside the results: give --results")
    sample = DEFAULT_SAMPLE
    if args.observe_sample is not None:
        try:
            sample = parse_share(args.observe_sample, "share")
        except ValueError as exc:
            raise _Usage(f"--observe-sample: {exc}") from None
        if sample <= 0:
            raise _Usage("--observe-sample must be above 0")
    timeout = DEFAULT_REACTION_TIMEOUT
    if args.reaction_timeout is not None:
        try:
            timeout = parse_duration(args.reaction_timeout)
        except ValueError as exc:
            raise _Usage(f"--reaction-timeout: {exc}") from None
        if timeout <= 0:
            raise _Usage("--reaction-timeout must be above 0")
    peak = max(max(st.start, st.end) for st in settings.profile.stages)
    text = args.observe_budget if args.observe_budget is not None else f"{DEFAULT_BUDGET:.0%}"
    try:
        if "/" in text:
            budget = parse_stage_rate(text)
        else:
            budget = parse_share(text, "share or rate (20% or 5/s)") * peak
    except ValueError as exc:
        raise _Usage(f"--observe-budget: {exc}") from None
    if budget <= 0:
        raise _Usage(f"--observe-budget {text}: gives no reads at all; give a share above 0")
    return ObserveSettings(
        target=settings.target,
        base_url=settings.base_url,
        account_id=settings.account_id,
        workflow=settings.workflow,
        event_type=settings.event_type,
        headers=observe_headers(settings),
        budget=budget,
        sample=sample,
        reaction_timeout=timeout,
        timeout=settings.timeout,
    )


def observe_headers(settings: LoadSettings) -> dict[str, str]:
    """The observer's auth: the API's credentials, the relay's secret, none for wrangler dev."""
    if settings.target == "relay" and settings.relay_secret:
        return {"Authorization": f"Bearer {settings.relay_secret}"}
    if settings.credentials is not None and settings.target == "api":
        return dict(settings.credentials.headers())
    return {}


def observe_note(settings: LoadSettings, observe: ObserveSettings) -> str | None:
    """A warning when the reads' budget is far below what the sample needs."""
    if observe.target == "relay":
        return None  # one /watch request holds up to 100 instances, not one read each
    events = min(settings.profile.expected_arrivals, len(settings.instances)) * observe.sample
    # At least one read per observed event; the reads run on after the arrivals.
    seconds = events / observe.budget
    if seconds <= settings.profile.seconds + observe.reaction_timeout:
        return None
    fit = (settings.profile.seconds * observe.budget) / max(events / observe.sample, 1)
    return (
        f"observing {events:,.0f} events at most {observe.budget:,.1f} reads/s takes "
        f"{seconds:,.0f} s or more; --observe-sample {min(fit, 1):.0%} or a larger "
        "--observe-budget would fit the run"
    )


async def _watch_signals(run: LoadRun, hard_stop: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            run.stats.interrupted = True
            if run.stats.stop_reason is None:
                run.stop(f"{name}: stopped the arrivals, let the requests in flight finish")
                print(f"\nload: {name}: no more arrivals; again to stop at once", file=sys.stderr)
            else:
                hard_stop.cancel()
                return


async def _main(
    settings: LoadSettings,
    quiet: bool,
    observer: Observer | None = None,
    metrics: LoadSource | None = None,
) -> tuple[LoadRun, LoadResult | None]:
    run = LoadRun(settings, on_envelope=None if observer is None else observer.offer)
    if metrics is not None:
        metrics.stats = run.stats
    result: LoadResult | None = None
    async with anyio.create_task_group() as tg:
        hard_stop = anyio.CancelScope()
        tg.start_soon(_watch_signals, run, hard_stop)
        if not quiet:
            tg.start_soon(lambda: live_view(run.stats, settings.profile, rich=sys.stderr.isatty()))
        with hard_stop:
            # The observer reads on its own session at its own pace; the load's arrivals
            # never wait for it. After the last arrival it reads on until every observed
            # event is settled (consumed, or its reaction timeout passed).
            async with anyio.create_task_group() as watching:
                if observer is not None:
                    watching.start_soon(observer.run)
                result = await run.run()
                if observer is not None:
                    observer.t0 = run.stats.t0_epoch
                    if not quiet:
                        print(
                            f"load: arrivals done; reading the last observed instances "
                            f"(up to {observer.settings.reaction_timeout:g} s)",
                            file=sys.stderr,
                            flush=True,
                        )
                    observer.close()
        tg.cancel_scope.cancel()
    return run, result


def _closing(result: LoadResult, settings: LoadSettings) -> str:
    s = result.stats
    profile = settings.profile
    lines = [
        "",
        f"load: {profile.describe()} → {settings.workflow}/{settings.event_type}, "
        f"{len(settings.instances):,} instance(s), {settings.concurrency} workers",
        f"  arrivals   {s.arrivals:,}: {s.sent:,} sent, {s.dropped:,} dropped "
        f"({s.dropped / s.arrivals if s.arrivals else 0:.1%}; no idle worker)",
        f"  rate       {format_metric('rate', result.metrics.get('rate'))} sent "
        f"(target mean {profile.mean_rate:,.1f}/s); scheduler at most "
        f"{s.max_lag_s * 1000:,.1f} ms late",
    ]
    if s.stop_reason is not None:
        lines.append(f"  stopped    {s.stop_reason}")
    if s.stdout_closed:
        lines.append("  results    stdout closed early (--results -): the rest only in this report")
    for t in settings.thresholds:
        breached = any(b.threshold is t for b in result.breaches)
        lines.append(
            f"  threshold  {t.text}: {'BREACHED' if breached else 'ok'} "
            f"(measured {format_metric(t.metric, result.metrics.get(t.metric))})"
        )
    return "\n".join(lines)


def observed_knee(result: LoadResult, observed: ObserveSummary) -> float | None:
    """The knee of a ramp (dispatcher.report.observed.knee); None for a constant rate."""
    if len({y for _, y in result.overlay.target}) < 2:
        return None
    from dispatcher.report.observed import knee_of

    return knee_of(list(result.points.t), observed)


def _load_dict(result: LoadResult, settings: LoadSettings) -> dict[str, object]:
    s = result.stats
    breached = {id(b.threshold) for b in result.breaches}
    return {
        "profile": settings.profile.describe(),
        "target_mean_rate": settings.profile.mean_rate,
        "concurrency": settings.concurrency,
        "arrivals": s.arrivals,
        "sent": s.sent,
        "dropped": s.dropped,
        "rate": result.metrics.get("rate"),
        "max_scheduler_lag_ms": round(s.max_lag_s * 1000, 3),
        "stopped": s.stop_reason,
        "thresholds": [
            {
                "threshold": t.text,
                "measured": result.metrics.get(t.metric),
                "ok": id(t) not in breached,
            }
            for t in settings.thresholds
        ],
    }


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args, os.environ)
        observe = observe_settings(args, settings)
        if args.plot is not None:
            from dispatcher.report.plot import PlotUnavailable, check_plot_path

            try:
                check_plot_path(args.plot)
            except PlotUnavailable as exc:
                raise _Usage(str(exc)) from None
    except (ConfigError, ValueError, _Usage) as exc:
        print(f"dispatcher load: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Folder missing, read-only, or earlier results without --overwrite: one line, exit 2
    # (commands.cli.main prints it), before a single arrival.
    check_results_path(
        settings.results, resume=False, overwrite=settings.overwrite, can_resume=False
    )
    # Before the first line of the run: a port that cannot be had is its one line.
    source = LoadSource(settings.profile.rate_at)
    metrics = start_metrics(args, source, prog="dispatcher load")
    quiet = bool(args.quiet)
    if not quiet:
        print(
            f"load: {settings.profile.describe()} ({settings.profile.expected_arrivals:,} "
            f"arrivals) → {settings.base_url} ({settings.target}), "
            f"{settings.concurrency} workers",
            file=sys.stderr,
            flush=True,
        )
    observer = None if observe is None else Observer(observe)
    if observe is not None and not quiet:
        note = observe_note(settings, observe)
        if note is not None:
            print(f"load: {note}", file=sys.stderr, flush=True)
    try:
        _, result = anyio.run(
            _main,
            settings,
            quiet,
            observer,
            source if metrics is not None else None,
            backend="asyncio",
        )
    except KeyboardInterrupt:
        print("dispatcher load: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if metrics is not None:
            metrics.close()
    if result is None:
        print("dispatcher load: stopped at once; results hold what had finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    observed: ObserveSummary | None = None
    if observer is not None:
        observed = observer.summary()
        write_sidecar(sidecar_path(settings.results), observed.header, observer.rows)
        result.metrics.update(observed.metrics())
        result = dataclasses.replace(
            result, breaches=check_thresholds(settings.thresholds, result.metrics)
        )
    # The report is what a load test is run for: stdout, unless envelopes already go there.
    out: TextIO = sys.stderr if settings.results == "-" else sys.stdout
    # A reader that went away (`| head -1`) ends the run with 141, as SIGPIPE would, but
    # only once the plot asked for is written: it is the other thing the run was for.
    gone = result.stats.stdout_closed
    try:
        if args.report_format == "json":
            # One JSON document, so that `| jq` works: the report plus what only load knows.
            doc = result.report.as_dict()
            doc["load"] = _load_dict(result, settings)
            if observed is not None:
                doc["observe"] = observed.as_dict(result.report.latency_accepted)
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode(), file=out, flush=True)
        else:
            print(render(result.report, args.report_format), file=out)
            if observed is not None:
                knee_rate = observed_knee(result, observed)
                accept = result.report.latency_accepted
                if args.report_format == "markdown":
                    print(file=out)  # a blank line before the section's heading
                print(render_observed(observed, accept, args.report_format, knee_rate), file=out)
            print(_closing(result, settings), file=out, flush=True)
    except BrokenPipeError:
        gone = True
    if args.plot is not None:
        from dispatcher.report.plot import write_plot

        write_plot(
            args.plot, result.report, result.points, overlay=result.overlay, observed=observed
        )
        if not quiet:
            print(f"load: plot written to {args.plot}", file=sys.stderr)
    for breach in result.breaches:
        print(f"dispatcher load: threshold breached: {breach.describe()}", file=sys.stderr)
    if gone:
        return stdout_gone()
    if result.stats.interrupted:
        return EXIT_INTERRUPTED
    if result.stats.stop_reason is not None:
        print(f"dispatcher load: stopped: {result.stats.stop_reason}", file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_THRESHOLD if result.breaches else EXIT_OK
