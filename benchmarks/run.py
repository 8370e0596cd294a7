"""The benchmark: `dispatcher send` against hand-written clients, httpx and the official SDK.

    .venv/bin/python benchmarks/run.py            # full run, writes BENCHMARKS.md (~30 min)
    .venv/bin/python benchmarks/run.py --quick    # make bench-quick: ~2 min, prints the ratios

One command, one run, six tools (dispatcher, lean and typical aiohttp baselines, httpx, the
SDK, and the Protocol + httptools floor) sending the same generated JSONL events to the same local
server, each on both event loops (asyncio's default and uvloop), each as a whole process
(JSONL in, one result line per event out). The parts, one module each in ``suite/``:

- ``machine``: the tools (nginx and wrk, installed with apt-get if missing) and the machine;
- ``servers``: nginx answering the API's success envelope on 127.0.0.1, and wrk's ceiling;
- ``processes``: one contender as a whole process, with its own wall time, CPU and peak RSS;
- ``peers``: the contenders (``dispatcher``, ``lean``, ``typical``, ``httpx``, ``sdk``,
  ``floor``, each ``/asyncio`` and ``/uvloop``), how each starts, and the check of every run;
- ``compare``: events/s in interleaved rounds; ``memory``: peak RSS at 1M records;
  ``profiling``: py-spy over whole runs; ``rate``: the accuracy of ``--rate 500/s``;
- ``report``: the tables, written into BENCHMARKS.md between this script's markers (the
  rest of the file, other benchmarks' sections, is left as it is).

The machine is shared and noisy, so the rounds are interleaved (the order rotates each
round), every figure is a median over rounds, and the verdicts are ratios between
contenders on the same loop, measured in the same run. Traffic goes to 127.0.0.1 only.
Every loop is bounded in count, every wait in time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from suite.compare import compare
from suite.config import (
    CONCURRENCY,
    EVENTS,
    HTTPX_EVENTS,
    QUICK_EVENTS,
    REPORT,
    SDK_EVENTS,
    say,
)
from suite.machine import ensure_tools, load, machine
from suite.memory import memory_runs
from suite.peers import LOOPS, Setup, child_env
from suite.profiling import profile_run, strict_check_ns
from suite.rate import rate_run
from suite.report import Report, write_section
from suite.servers import Nginx, wrk_ceiling

PROFILE_EVENTS = 100_000


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop nginx and the children."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


PARTS = ("compare", "memory", "profile", "rate")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark dispatcher send against an aiohttp baseline and the official "
        "SDK, on both event loops, on a local nginx; writes BENCHMARKS.md."
    )
    p.add_argument(
        "--quick", action="store_true", help=f"1 round of {QUICK_EVENTS:,} events, no 1M run"
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument(
        "--events", type=int, help=f"events per run (default {EVENTS:,}; quick {QUICK_EVENTS:,})"
    )
    p.add_argument(
        "--sdk-events",
        type=int,
        help=f"events per SDK run (default {SDK_EVENTS:,}: the SDK is slow)",
    )
    p.add_argument(
        "--httpx-events",
        type=int,
        help=f"events per httpx run (default {HTTPX_EVENTS:,}: its pool is slow)",
    )
    p.add_argument("--big", type=int, default=1_000_000, help="records of the memory runs")
    p.add_argument(
        "--big-timeout",
        type=float,
        default=600.0,
        help="time limit of each memory run, seconds (default 600)",
    )
    p.add_argument(
        "--memory-loops",
        default=",".join(LOOPS),
        help="event loops of the memory runs, in order (default asyncio,uvloop)",
    )
    p.add_argument("--profile-events", type=int, default=PROFILE_EVENTS)
    p.add_argument("--rate", type=float, default=500.0, help="rate of the accuracy run, per s")
    p.add_argument("--rate-seconds", type=float, default=10.0, help="length of that run")
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=PARTS,
        help="leave a part out (repeatable)",
    )
    p.add_argument("--report", default=str(REPORT), help="where to write the report")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.events = args.events or (QUICK_EVENTS if args.quick else EVENTS)
    args.sdk_events = args.sdk_events or min(args.events, SDK_EVENTS // (3 if args.quick else 1))
    args.httpx_events = args.httpx_events or min(
        args.events, HTTPX_EVENTS // (3 if args.quick else 1)
    )
    if args.quick:
        # Quick: the two ratios and CPU per event, nothing else (about 2 minutes).
        for part in ("memory", "profile", "rate"):
            if part not in args.skip:
                args.skip.append(part)
    if args.rounds < 1 or args.rounds > 50 or args.events < 100 or args.concurrency < 1:
        p.error("--rounds 1..50, --events >= 100 and --concurrency >= 1, please")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for module in ("dispatcher", "aiohttp", "cloudflare", "uvloop", "httpx", "httptools"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(
                f"bench: {module} is not importable by {sys.executable}: run this with the "
                "project's virtualenv and its bench extra (make bench installs it)"
            )
    command = "python benchmarks/run.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    started = time.monotonic()
    ensure_tools()
    report = Report(
        command=command,
        mode="quick" if args.quick else "full",
        machine=machine(),
        load_start=load(),
        concurrency=args.concurrency,
    )
    with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as t:
        tmp = Path(t)
        nginx = Nginx(tmp)
        try:
            nginx.start()
            nginx.check_answer()
            say("nginx answers POSTs with the success envelope (checked, keep-alive too)")
            ceiling, report.wrk_command = wrk_ceiling(nginx, tmp, args.concurrency)
            report.wrk_rates.append(ceiling)
            say(f"nginx ceiling: {ceiling:,.0f} requests/s ({report.wrk_command})")
            setup = Setup(
                tmp=tmp, nginx=nginx, env=child_env(nginx.port), concurrency=args.concurrency
            )
            if "compare" not in args.skip:
                report.comparison = compare(
                    setup,
                    args.rounds,
                    args.events,
                    {"sdk": args.sdk_events, "httpx": args.httpx_events},
                )
            if "profile" not in args.skip:
                report.profile_events = args.profile_events
                for loop in LOOPS:
                    prof = profile_run(setup, loop, args.profile_events)
                    if prof is not None:
                        report.profiles.append(prof)
                report.strict_ns = strict_check_ns()
            if "memory" not in args.skip:
                loops = [loop for loop in args.memory_loops.split(",") if loop in LOOPS]
                report.memory = memory_runs(setup, args.big, loops, args.big_timeout)
            if "rate" not in args.skip:
                report.rate = rate_run(setup, args.rate, args.rate_seconds)
            ceiling, _ = wrk_ceiling(nginx, tmp, args.concurrency)
            report.wrk_rates.append(ceiling)
            say(f"nginx ceiling at the end: {ceiling:,.0f} requests/s")
        except KeyboardInterrupt:
            say("interrupted: stopping")
            return 130
        finally:
            nginx.stop()
    report.load_end = load()
    git_end = machine()["git"]
    if git_end != report.machine["git"]:
        report.machine["git"] += f" at the start; {git_end} at the end"
    report.elapsed_s = time.monotonic() - started
    print(report.text_summary(), flush=True)
    if args.quick and args.report == str(REPORT):
        say("quick mode: BENCHMARKS.md left as it is (pass --report FILE to write one)")
        return 0
    write_section(Path(args.report), report.markdown())
    say(f"wrote {args.report} ({report.elapsed_s / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
