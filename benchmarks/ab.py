"""`dispatcher send` at a git revision against the working tree, interleaved: what a change
to the hot path bought, in CPU per event and events/s, on both event loops.

    .venv/bin/python benchmarks/ab.py HEAD~1 --events 20000 --rounds 3

The revision's ``dispatcher/`` is extracted with ``git archive`` into a temporary folder
and put first on PYTHONPATH; the working tree's runs have the working tree there.
Every round runs ``before`` and ``after`` on each loop, in an order that alternates, so a
ratio compares runs seconds apart on the same (shared, noisy) machine. Prints medians and
the after / before ratios; BENCHMARKS.md is not written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from suite.config import BENCH_DIR, say
from suite.machine import load
from suite.peers import LOOPS, Setup, child_env, dispatcher_argv
from suite.processes import ChildResult, count_ok, run_child, write_input
from suite.servers import Nginx


def extract(rev: str, into: Path) -> Path:
    root = BENCH_DIR.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "dispatcher"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def check_code(env: dict[str, str], want: Path) -> None:
    """The children import the dispatcher from ``want``, or the comparison is void."""
    got = subprocess.run(
        [sys.executable, "-c", "import dispatcher; print(dispatcher.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(got).resolve().is_relative_to(want.resolve()):
        raise SystemExit(f"ab: the children import {got}, not from {want}")


def one(setup: Setup, env: dict[str, str], name: str, inp: Path, events: int) -> ChildResult:
    out = setup.tmp / "ab.results.jsonl"
    loop = name.split("/")[1]
    result = run_child(
        name,
        dispatcher_argv(setup, inp, out, loop=loop),
        env,
        events=events,
        timeout=60.0 + events / 50.0,
        log=setup.tmp / "ab.log",
        nginx=setup.nginx,
    )
    lines, ok = count_ok(out)
    if result.exit_code != 0 or ok != events:
        tail = (setup.tmp / "ab.log").read_text(errors="replace")[-1500:]
        raise SystemExit(f"ab: {name}: exit {result.exit_code}, {ok}/{lines} ok:\n{tail}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rev", help="the git revision to compare the working tree with")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--loops", default=",".join(LOOPS))
    args = p.parse_args(argv)
    loops = [loop for loop in args.loops.split(",") if loop in LOOPS]
    say(f"load average at the start: {load()}")
    results: dict[str, list[ChildResult]] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dispatcher-ab-") as t:
        tmp = Path(t)
        old = extract(args.rev, Path(tempfile.mkdtemp(dir=tmp)))
        # The children's sys.path[0] is their working directory: not the repository's, or
        # its dispatcher/ would shadow the revision's on PYTHONPATH.
        os.chdir(tmp)
        nginx = Nginx(tmp)
        nginx.start()
        try:
            setup = Setup(
                tmp=tmp, nginx=nginx, env=child_env(nginx.port), concurrency=args.concurrency
            )
            # The working tree first too: in a git worktree the installed (editable)
            # package may be another checkout's.
            here = str(BENCH_DIR.parent)
            envs = {
                "before": {**setup.env, "PYTHONPATH": str(old)},
                "after": {**setup.env, "PYTHONPATH": here},
            }
            check_code(envs["before"], old)
            check_code(envs["after"], BENCH_DIR.parent)
            inp = tmp / "in.jsonl"
            write_input(inp, args.events)
            for r in range(args.rounds):
                sides = ("before", "after") if r % 2 == 0 else ("after", "before")
                for loop in loops:
                    for side in sides:
                        name = f"{side}/{loop}"
                        res = one(setup, envs[side], name, inp, args.events)
                        results.setdefault(name, []).append(res)
                        say(
                            f"round {r + 1} {name}: {res.rate:,.0f} events/s, "
                            f"{res.cpu_us_per_event:.0f} us CPU/event, "
                            f"{res.maxrss_mib:.1f} MiB"
                        )
        finally:
            nginx.stop()
    print(
        f"\n{args.rounds} rounds x {args.events:,} events, {args.rev} (before) vs the "
        f"working tree (after), {time.monotonic() - started:.0f} s; load at the end {load()}"
    )
    for loop in loops:
        b, a = results[f"before/{loop}"], results[f"after/{loop}"]
        cpu_b = statistics.median(x.cpu_us_per_event for x in b)
        cpu_a = statistics.median(x.cpu_us_per_event for x in a)
        rate_b = statistics.median(x.rate for x in b)
        rate_a = statistics.median(x.rate for x in a)
        rss_b = statistics.median(x.maxrss_mib for x in b)
        rss_a = statistics.median(x.maxrss_mib for x in a)
        print(
            f"{loop}: CPU us/event {cpu_b:.0f} -> {cpu_a:.0f} ({cpu_a / cpu_b:.2f}x); "
            f"events/s {rate_b:,.0f} -> {rate_a:,.0f} ({rate_a / rate_b:.2f}x); "
            f"peak RSS {rss_b:.1f} -> {rss_a:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
