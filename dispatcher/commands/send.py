"""`dispatcher send`: the main job from the shell, with signals, progress and a summary.

Exit codes: 0 every record confirmed (also when the inputs hold no record at all: a
warning says so; with --instances-of --waiting-for, instances skipped as not waiting do
not count against it), 1 some failed (with --verify: or a confirmed record was not
consumed), 2 usage, input, config or results-path mistake
(another run holding the same --results included, a --redis that cannot be used at
start, a --metrics-port that cannot be served, an --instances-of listing refused on its
first page: unknown workflow, bad credentials), 3 stopped early (a target where nothing
listens included: one line says so; Redis unreachable for --redis-outage-timeout too; a
later listing page refused), 5 results could not be written (full disk, read-only folder:
the run stopped sending, --resume continues), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Final

import anyio
import orjson

from dispatcher.commands.cli import user_error
from dispatcher.commands.dryrun import add_dry_run_argument, dry_run, instances_dry_run
from dispatcher.commands.metrics import RunSource, add_metrics_arguments
from dispatcher.commands.metrics import start as start_metrics
from dispatcher.commands.progress import ProgressMode, format_summary, resolve_mode, show_progress
from dispatcher.commands.verify import VerifyInputError, VerifyPlan, out_path_for, verify_file
from dispatcher.commands.verify import exit_code as verify_exit_code
from dispatcher.coordination.urls import REDIS_SCHEMES, redact
from dispatcher.model import Delivery, ErrorKind
from dispatcher.results.errors import ResultsWriteError
from dispatcher.results.ledger import load_ledger, read_envelopes
from dispatcher.results.sinks import check_results_path
from dispatcher.run import runner
from dispatcher.run.config import add_send_arguments, load_send_settings
from dispatcher.run.multiproc import run_parallel
from dispatcher.run.settings import DEFAULT_RATE, Rate, SendSettings, parse_duration
from dispatcher.run.signals import watch_signals
from dispatcher.sending.engine import Engine
from dispatcher.sending.stats import RunStats

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_STOPPED: Final = 3
EXIT_WRITE_FAILED: Final = 5
EXIT_INTERRUPTED: Final = 130


def configure(parser: argparse.ArgumentParser) -> None:
    add_send_arguments(parser)
    add_dry_run_argument(parser)
    add_metrics_arguments(parser)
    group = parser.add_argument_group("verify (after the send)")
    group.add_argument(
        "--verify",
        action="store_true",
        default=False,
        help="when the send ends, read the instance of every confirmed record, as "
        "`dispatcher verify RESULTS` does, print its summary, write RESULTS.verify.jsonl, and "
        "exit 1 when a record is not consumed (api and wrangler-dev targets)",
    )
    group.add_argument(
        "--wait-up-to",
        default=None,
        metavar="DURATION",
        help="with --verify: read waiting records again until they move, for up to this long "
        "(e.g. 5m; default 0s)",
    )


def verify_plan(args: argparse.Namespace, settings: SendSettings) -> VerifyPlan | None:
    """The plan of ``--verify`` (None without it); raises VerifyInputError for a mistake."""
    if not getattr(args, "verify", False):
        if getattr(args, "wait_up_to", None) is not None:
            raise VerifyInputError("--wait-up-to: only with --verify")
        return None
    try:
        wait_up_to = parse_duration(args.wait_up_to or "0s")
    except ValueError as exc:
        raise VerifyInputError(f"--wait-up-to: {exc}") from None
    if settings.target == "relay":
        raise VerifyInputError(
            "--verify: the relay cannot read an instance's steps; send with --target api or "
            "wrangler-dev, or run `dispatcher verify RESULTS --target api` after the send"
        )
    if settings.results == "-":
        raise VerifyInputError("--verify: needs --results FILE (not stdout) to read back")
    rate = settings.rate
    if isinstance(rate, Rate):
        per_second: float | None = rate.per_second
        rate_text = str(rate)
    elif rate == "auto" and settings.target == "api":
        per_second, rate_text = DEFAULT_RATE.per_second, str(DEFAULT_RATE)
    else:
        per_second, rate_text = None, "unlimited"
    creds = settings.credentials
    return VerifyPlan(
        results=settings.results,
        out=out_path_for(settings.results),
        target=settings.target,
        base_url=settings.base_url,
        account_id=settings.account_id,
        headers=creds.headers() if creds is not None and settings.target == "api" else {},
        rate=per_second,
        rate_text=rate_text,
        wait_up_to=wait_up_to,
        workflow=settings.workflow or settings.instances_of,
        prog="dispatcher send --verify",
    )


def _verify_after(plan: VerifyPlan, send_code: int) -> int:
    """Verify what the send wrote; the send's own failure code wins over verify's."""
    if send_code not in (EXIT_OK, EXIT_FAILED):
        print(
            "dispatcher send --verify: skipped: the send did not finish; --resume it, then "
            f"run dispatcher verify {shlex.quote(plan.results)}",
            file=sys.stderr,
        )
        return send_code
    summary = anyio.run(verify_file, plan, sys.stderr, backend="asyncio")
    return send_code if send_code != EXIT_OK else verify_exit_code(summary)


def exit_code(stats: RunStats) -> int:
    if stats.write_error is not None:
        return EXIT_WRITE_FAILED
    if stats.interrupted:
        return EXIT_INTERRUPTED
    if stats.stop_reason is not None:
        return EXIT_STOPPED
    # Records a resumed run skipped still count: their earlier envelopes say they failed.
    unsettled = sum(n for reason, n in stats.skipped.items() if reason != "confirmed")
    # Instances --waiting-for left out are the selection working, not a failure.
    failed = stats.failed - stats.errors[ErrorKind.SKIPPED.value]
    return EXIT_OK if failed == 0 and unsettled == 0 else EXIT_FAILED


async def _main(settings: SendSettings, metrics: RunSource | None = None) -> RunStats:
    mode = resolve_mode(settings.progress, settings.quiet, sys.stderr)
    if settings.processes > 1:
        if metrics is not None:
            rate = settings.rate
            per_s = rate.per_second if isinstance(rate, Rate) else None
            metrics.gate_rate = lambda: per_s  # each process has its own gate: the setting
        show = functools.partial(_show, mode=mode, inputs=settings.inputs, metrics=metrics)
        return await run_parallel(settings, show=show)
    engines: list[Engine] = []
    run_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        def hook(engine: Engine) -> None:
            engines.append(engine)
            tg.start_soon(watch_signals, engine, run_scope, settings.grace)
            gate = engine._gate  # the run's pause lives there; progress only reads it

            def paused_for() -> float:
                return gate.paused_until - anyio.current_time()

            if metrics is not None and metrics.stats is None:
                metrics.stats = engine.stats
                metrics.gate_rate = lambda: gate.rate

            tg.start_soon(
                show_progress, engine.stats, mode, sys.stderr, settings.inputs, paused_for
            )

        with run_scope:
            await runner.run(settings, engine_hook=hook)
        tg.cancel_scope.cancel()
    stats = engines[0].stats if engines else RunStats()
    if run_scope.cancelled_caught:
        stats.interrupted = True
    return stats


async def _show(
    stats: RunStats,
    *,
    mode: ProgressMode,
    inputs: tuple[str, ...],
    metrics: RunSource | None = None,
) -> None:
    if metrics is not None:
        metrics.stats = stats  # the merged counters of every process
    await show_progress(stats, mode, sys.stderr, inputs)


def _never_reached(stats: RunStats) -> bool:
    """The run stopped on a refused connection, and no record can have reached the target."""
    if stats.unreachable is None or stats.interrupted or stats.write_error is not None:
        return False
    reached = (Delivery.CONFIRMED, Delivery.REJECTED, Delivery.UNKNOWN)
    return stats.rate_limited == 0 and not any(stats.deliveries[d.value] for d in reached)


def _nothing_read(stats: RunStats, settings: SendSettings) -> bool:
    """Whether the inputs held no record at all. Not known for a run that stopped early
    (it may have stopped before its first record) or took its records from a --job
    (another process may have sent them all): those never say the input was empty."""
    if settings.job is not None or stats.interrupted or stats.stop_reason is not None:
        return False
    if settings.instances_of is not None:
        return False  # the summary says how many the listing named
    if stats.write_error is not None:
        return False
    return stats.records == 0 and not stats.skipped and not stats.crashed_unknown


def run(args: argparse.Namespace) -> int:
    # Mistakes (ConfigError, InputError, ResultsPathError, LedgerError: all UserError)
    # propagate to commands.cli.main, which prints them as one line with exit 2.
    needs: list[str] | None = [] if args.dry_run else None
    settings = load_send_settings(args, os.environ, needs=needs)
    runner.check_inputs(settings)
    plan = None if needs is not None else verify_plan(args, settings)
    if needs is not None:
        if _results_in_the_way(settings):
            print(
                f"dispatcher send --dry-run: warning: --results {settings.results} already "
                "holds results; a real run needs --resume or --overwrite",
                file=sys.stderr,
            )
        if settings.instances_of is not None:
            return instances_dry_run(settings, sys.stdout, needs=needs)
        return dry_run(settings, sys.stdout, needs=needs)
    check_results_path(
        settings.results,
        resume=settings.keeps_results,
        overwrite=settings.overwrite,
    )
    finish = finish_command(getattr(args, "_argv", None), settings)
    source = RunSource()
    metrics = start_metrics(args, source, prog="dispatcher send")
    try:
        stats = anyio.run(
            _main,
            settings,
            source if metrics is not None else None,
            backend="asyncio",
            backend_options=runner.backend_options(),
        )
    except KeyboardInterrupt:
        # Ctrl-C before the run had installed its own handler: nothing was sent yet.
        print("dispatcher send: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        mistake = user_error(exc)
        if isinstance(mistake, ResultsWriteError):
            # The disk refused where no stop could be asked for first (a job's claimed
            # envelopes): one line all the same, and what to run once there is room.
            print(
                f"dispatcher send: error: {mistake}; what is on disk is kept: free space or "
                f"fix the folder, then: {finish or 'run the same command with --resume'}",
                file=sys.stderr,
            )
            return EXIT_WRITE_FAILED
        # A bug, not a mistake (those are UserError): the traceback follows, but first
        # what to run once it is fixed or worked around.
        if finish is not None and mistake is None:
            print(f"dispatcher send: crashed; to finish the job: {finish}", file=sys.stderr)
        raise
    finally:
        if metrics is not None:
            metrics.close()
    if _nothing_read(stats, settings):
        # Exit 0 all the same: nothing failed. A script can grep stderr for "no records".
        print(
            f"dispatcher send: warning: no records in {', '.join(settings.inputs)}; "
            "nothing was sent",
            file=sys.stderr,
        )
    # Reading the whole ledger back costs memory in proportion to the results (about
    # 100 MiB at 1M records): only when some record's delivery can be unknown.
    maybe_unknown = (
        stats.deliveries[Delivery.UNKNOWN.value] > 0
        or stats.skipped.get("unknown", 0) > 0
        or stats.crashed_unknown > 0
    )
    unknown_list: str | None = None
    try:
        if maybe_unknown:
            unknown_list = write_unknown_list(settings.results)
        else:
            remove_unknown_list(settings.results)
    except OSError as exc:
        # The envelopes are durable: a list beside them that cannot be written changes
        # nothing of the run's outcome (an immutable or full folder).
        stats.warnings.append(
            f"could not update {unknown_list_path(settings.results)}: "
            f"{exc.strerror or exc}; the results say the same of each record"
        )
    for warning in stats.warnings:
        print(f"dispatcher send: warning: {warning}", file=sys.stderr)
    if _never_reached(stats):
        # Nothing listens at the target: a summary of zeros would bury the one fact that
        # matters, so one line, even with --quiet.
        then = finish_command(getattr(args, "_argv", None), settings, stats)
        print(
            f"dispatcher send: stopped: {stats.unreachable} No request reached it: "
            f"{stats.records:,} records not sent" + (f"; to finish: {then}" if then else ""),
            file=sys.stderr,
            flush=True,
        )
        return exit_code(stats)
    stopped = stats.stop_reason is not None or stats.interrupted or stats.write_error is not None
    if not settings.quiet:
        finish = finish_command(getattr(args, "_argv", None), settings, stats)
        summary = format_summary(
            stats,
            settings.results,
            finish=finish if stopped else None,
            unknown_list=unknown_list,
        )
        print(summary, file=sys.stderr, flush=True)
    elif stopped and (finish := finish_command(getattr(args, "_argv", None), settings, stats)):
        print(f"dispatcher send: stopped; to finish the job: {finish}", file=sys.stderr)
    if stats.write_error is not None:
        # Even with --quiet: the run stopped for a reason the user must fix first.
        then = finish_command(getattr(args, "_argv", None), settings, stats)
        print(
            f"dispatcher send: error: {stats.write_error}; nothing more was sent and what is "
            "on disk is kept: free space or fix the folder, then: "
            f"{then or 'run the same command with --resume'}",
            file=sys.stderr,
            flush=True,
        )
    code = exit_code(stats)
    return code if plan is None else _verify_after(plan, code)


# Answers that say nothing of the record itself: after fixing the cause (the token), the
# records they rejected must be sent again, which takes --retry-failed. Records refused
# with 429 need no flag: a plain --resume sends them (they were never delivered).
_NOT_THE_RECORDS_FAULT: Final = frozenset({"401", "403"})


def finish_command(
    argv: Sequence[str] | None, settings: SendSettings, stats: RunStats | None = None
) -> str | None:
    """The command line that sends what this run leaves: the same one, with --resume
    (and --retry-failed when records were refused for the credentials or the rate).

    ``None`` when there is nothing to resume from (results on stdout) or the command
    line is not known (a caller that did not go through ``commands.cli.main``).
    """
    if argv is None or settings.results == "-":
        return None
    tokens = [t for t in argv if t not in ("--overwrite", "--no-resume", "--dry-run")]
    # A --redis URL may hold a password: the command is printed (and logged) without it.
    shown = [_redact_token(t) for t in tokens]
    hint = (
        "   (put the Redis password back in place of ***, or set DISPATCHER_REDIS_URL)"
        if shown != tokens
        else ""
    )
    tokens = shown
    if settings.job is not None:
        # A job resumes by itself: the same command takes up what is left in Redis.
        command = shlex.join(["dispatcher", *tokens]) + hint
        return command + ("   (with the same input on stdin)" if "-" in settings.inputs else "")
    if "--resume" not in tokens:
        tokens.append("--resume")
    if (
        stats is not None
        and _NOT_THE_RECORDS_FAULT & set(stats.statuses)
        and "--retry-failed" not in tokens
    ):
        tokens.append("--retry-failed")
    command = shlex.join(["dispatcher", *tokens]) + hint
    if "-" in settings.inputs:
        command += "   (with the same input on stdin)"
    return command


def _redact_token(token: str) -> str:
    """``token`` of a command line without a password it may hold (a --redis URL)."""
    flag, eq, value = token.partition("=")
    if eq and flag.startswith("--") and value.startswith(REDIS_SCHEMES):
        return f"{flag}={redact(value)}"
    return redact(token) if token.startswith(REDIS_SCHEMES) else token


def unknown_list_path(results: str) -> str:
    return f"{results}.unknown.jsonl"


def remove_unknown_list(results: str) -> None:
    """No record is unknown: an older list beside the results is out of date."""
    if results != "-":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unknown_list_path(results))


def write_unknown_list(results: str) -> str | None:
    """List the records whose final delivery is ``unknown`` beside the results.

    One JSON line each (key, file:line, instance, event type, attempts, error), for the
    user to check before deciding to resend them. Returns the path, or ``None`` (and
    removes an outdated list) when no record's delivery is unknown.
    """
    if results == "-" or not os.path.exists(results):
        return None
    path = unknown_list_path(results)
    ledger = load_ledger(results, on_torn=lambda torn: None)
    unknown = {key for key, state in ledger.items() if state.delivery is Delivery.UNKNOWN}
    if not unknown:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return None
    rows: dict[str, bytes] = {}
    for env in read_envelopes(results, on_torn=lambda torn: None):
        if env.key in unknown:
            rows[env.key] = orjson.dumps(
                {
                    "key": env.key,
                    "source": env.source,
                    "line": env.line,
                    "workflow": env.workflow,
                    "instance_id": env.instance_id,
                    "event_type": env.event_type,
                    "attempts": env.attempts,
                    "error": None if env.error is None else env.error.message,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
    with open(path, "wb") as out:
        out.writelines(rows.values())
    return path


def _results_in_the_way(settings: SendSettings) -> bool:
    path = settings.results
    return (
        not (settings.resume or settings.overwrite)
        and path != "-"
        and os.path.exists(path)
        and os.path.getsize(path) > 0
    )
