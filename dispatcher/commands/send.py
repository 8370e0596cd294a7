"""`dispatcher send`: the main job from the shell, with signals, progress and a summary.

Exit codes: 0 every record confirmed, 1 some failed, 2 usage or config error (another
run holds the same --results included), 3 stopped early, 5 results could not be written
(full disk, read-only folder: the run stopped sending, --resume continues), 130
interrupted.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
from typing import Final

import anyio

from dispatcher.commands.dryrun import add_dry_run_argument, dry_run
from dispatcher.commands.progress import ProgressMode, format_summary, resolve_mode, show_progress
from dispatcher.inputs.records import InputError
from dispatcher.model import UserError
from dispatcher.results.ledger import LedgerError
from dispatcher.run import runner
from dispatcher.run.config import add_send_arguments, load_send_settings
from dispatcher.run.multiproc import run_parallel
from dispatcher.run.settings import ConfigError, SendSettings
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


def exit_code(stats: RunStats) -> int:
    if stats.write_error is not None:
        return EXIT_WRITE_FAILED
    if stats.interrupted:
        return EXIT_INTERRUPTED
    if stats.stop_reason is not None:
        return EXIT_STOPPED
    # Records a resumed run skipped still count: their earlier envelopes say they failed.
    unsettled = sum(n for reason, n in stats.skipped.items() if reason != "confirmed")
    return EXIT_OK if stats.failed == 0 and unsettled == 0 else EXIT_FAILED


async def _main(settings: SendSettings) -> RunStats:
    mode = resolve_mode(settings.progress, settings.quiet, sys.stderr)
    if settings.processes > 1:
        show = functools.partial(_show, mode=mode, inputs=settings.inputs)
        return await run_parallel(settings, show=show)
    engines: list[Engine] = []
    run_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        def hook(engine: Engine) -> None:
            engines.append(engine)
            tg.start_soon(watch_signals, engine, run_scope, settings.grace)
            tg.start_soon(show_progress, engine.stats, mode, sys.stderr, settings.inputs)

        with run_scope:
            await runner.run(settings, engine_hook=hook)
        tg.cancel_scope.cancel()
    stats = engines[0].stats if engines else RunStats()
    if run_scope.cancelled_caught:
        stats.interrupted = True
    return stats


async def _show(stats: RunStats, *, mode: ProgressMode, inputs: tuple[str, ...]) -> None:
    await show_progress(stats, mode, sys.stderr, inputs)


def _results_in_the_way(path: str) -> bool:
    return path != "-" and os.path.exists(path) and os.path.getsize(path) > 0


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_send_settings(args, os.environ)
        runner.check_inputs(settings)
    except (ConfigError, InputError) as exc:
        print(f"dispatcher send: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.dry_run:
        return dry_run(settings, sys.stdout)
    if not (settings.overwrite or settings.resume) and _results_in_the_way(settings.results):
        print(
            f"dispatcher send: error: --results {settings.results} already holds results; "
            "pass --resume to continue that run, --overwrite to replace it, or choose "
            "another --results path",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        stats = anyio.run(
            _main, settings, backend="asyncio", backend_options=runner.backend_options()
        )
    except LedgerError as exc:
        print(f"dispatcher send: error: cannot resume: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (UserError, BaseExceptionGroup) as exc:
        # Another run holds the results (2), or they cannot be written at all (5); it may
        # come wrapped in the task group's exception group.
        error = _user_error(exc)
        if isinstance(error, KeyboardInterrupt):
            print("dispatcher send: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        if error is None:
            raise
        print(f"dispatcher send: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        # Ctrl-C before the run had installed its own handler: nothing was sent yet.
        print("dispatcher send: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not settings.quiet:
        print(format_summary(stats, settings.results), file=sys.stderr, flush=True)
    if stats.write_error is not None:
        # Even with --quiet: the run stopped for a reason the user must fix.
        print(
            f"dispatcher send: error: {stats.write_error}; nothing more was sent, what is "
            f"on disk is kept. Free space or fix the folder, then: {resume_command()}",
            file=sys.stderr,
            flush=True,
        )
    return exit_code(stats)


def _user_error(exc: BaseException) -> UserError | KeyboardInterrupt | None:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, UserError | KeyboardInterrupt) else None


def resume_command(argv: list[str] | None = None) -> str:
    """This command line, made to continue its run: ``--resume``, never ``--overwrite``."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["dispatcher", *args])
