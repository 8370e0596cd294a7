"""`dispatcher send --processes N` against the lean baseline run as N processes.

    .venv/bin/python benchmarks/scaling.py --events 40000 --rounds 2 --write BENCHMARKS.md

For each N (default 1, 2, 4): the dispatcher as ``send --processes N --concurrency 64``
(64 in flight per process: its workers each hold their own ``--concurrency``), and the
lean baseline (``baseline_lean.py``) as N processes started together, each sending its
N-th of the same input with 64 in flight, all under one launcher. events/s = events /
wall time from the start to the last process's end; CPU is every process's (the launcher
reaps them). Interleaved rounds, medians; nginx on 127.0.0.1 (``suite.servers``).
``--write`` replaces the section between this script's markers in that file.

The machine's core count is in the table: N processes beyond the free cores only share
them (and nginx runs on the same cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from suite.config import say
from suite.machine import load, machine
from suite.peers import Setup, child_env, dispatcher_argv, script_argv
from suite.processes import ChildResult, count_ok, run_child, write_input
from suite.servers import Nginx

START: Final = "<!-- scaling:start -->"
END: Final = "<!-- scaling:end -->"

# Starts every argv (JSON list of lists) at once, waits for all; exit 1 if any failed.
FANOUT: Final = """\
import json, os, sys
pids = [os.posix_spawn(a[0], a, os.environ) for a in json.loads(sys.argv[1])]
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
sys.exit(0 if all(c == 0 for c in codes) else 1)
"""


def split_input(src: Path, parts: int) -> list[Path]:
    lines = src.read_bytes().splitlines(keepends=True)
    out = []
    for k in range(parts):
        path = src.with_suffix(f".{parts}-{k}.jsonl")
        path.write_bytes(b"".join(lines[k::parts]))
        out.append(path)
    return out


def run_dispatcher(setup: Setup, inp: Path, events: int, n: int) -> ChildResult:
    out = setup.tmp / "scaling.results.jsonl"
    argv = [*dispatcher_argv(setup, inp, out, loop="uvloop"), "--processes", str(n)]
    res = run_child(
        f"dispatcher x{n}",
        argv,
        setup.env,
        events=events,
        timeout=60 + events / 50,
        log=setup.tmp / "scaling.log",
        nginx=setup.nginx,
    )
    lines, ok = count_ok(out)
    if res.exit_code != 0 or ok != events:
        raise SystemExit(f"scaling: dispatcher x{n}: exit {res.exit_code}, {ok}/{lines} ok")
    return res


def run_lean(setup: Setup, inp: Path, events: int, n: int) -> ChildResult:
    parts = split_input(inp, n)
    summaries = [setup.tmp / f"lean-{n}-{k}.json" for k in range(n)]
    argvs = [
        script_argv(setup, "baseline_lean.py", part, summary, "uvloop")
        for part, summary in zip(parts, summaries, strict=True)
    ]
    launcher = [sys.executable, "-S", "-c", FANOUT, json.dumps(argvs)]
    res = run_child(
        f"lean x{n}",
        launcher,
        setup.env,
        events=events,
        timeout=60 + events / 50,
        log=setup.tmp / "scaling.log",
        nginx=setup.nginx,
    )
    ok = sum(json.loads(s.read_bytes())["ok"] for s in summaries if s.exists())
    if res.exit_code != 0 or ok != events:
        raise SystemExit(f"scaling: lean x{n}: exit {res.exit_code}, {ok}/{events} ok")
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--processes", default="1,2,4", help="the values of N, comma-separated")
    p.add_argument("--write", metavar="FILE")
    args = p.parse_args(argv)
    ns = [int(x) for x in args.processes.split(",")]
    started = time.monotonic()
    load_start = load()
    info = machine()
    rows: dict[tuple[str, int], list[ChildResult]] = {}
    with tempfile.TemporaryDirectory(prefix="dispatcher-scaling-") as t:
        tmp = Path(t)
        nginx = Nginx(tmp)
        nginx.start()
        try:
            setup = Setup(tmp=tmp, nginx=nginx, env=child_env(nginx.port), concurrency=64)
            inp = tmp / "in.jsonl"
            write_input(inp, args.events)
            for r in range(args.rounds):
                for n in ns:
                    order = ("dispatcher", "lean") if (r + n) % 2 == 0 else ("lean", "dispatcher")
                    for tool in order:
                        run = run_dispatcher if tool == "dispatcher" else run_lean
                        res = run(setup, inp, args.events, n)
                        rows.setdefault((tool, n), []).append(res)
                        say(
                            f"round {r + 1} {tool} x{n}: {res.rate:,.0f} events/s, "
                            f"{res.cpu_us_per_event:.0f} us CPU/event"
                        )
        finally:
            nginx.stop()
    load_end = load()
    minutes = (time.monotonic() - started) / 60
    cmd = "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = [
        START,
        "## `--processes N`: scaling against the lean baseline as N processes",
        "",
        f"Written by `{cmd.strip()}` (`benchmarks/scaling.py`), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, git {info['git']}, "
        f"{minutes:.1f} min. **{os.cpu_count()} cores** ({info['cpu']}), shared "
        f"with nginx and with other work: load average {load_start} at the start, "
        f"{load_end} at the end. {args.events:,} events per run, uvloop, 64 in flight "
        f"per process, {args.rounds} interleaved rounds, medians. dispatcher: `send "
        "--processes N` (one results file, durable as ever); lean: `baseline_lean.py` "
        "started N times at once, each on its N-th of the input (no results, nothing "
        "durable). events/s: all events / wall time until the last process ended.",
        "",
        "| N | dispatcher events/s | lean x N events/s | **dispatcher / lean** | "
        "dispatcher vs N = 1 | lean vs N = 1 | CPU us/event: dispatcher, lean |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base_d = statistics.median(x.rate for x in rows[("dispatcher", ns[0])])
    base_l = statistics.median(x.rate for x in rows[("lean", ns[0])])
    for n in ns:
        d, lean = rows[("dispatcher", n)], rows[("lean", n)]
        rd = statistics.median(x.rate for x in d)
        rl = statistics.median(x.rate for x in lean)
        cd = statistics.median(x.cpu_us_per_event for x in d)
        cl = statistics.median(x.cpu_us_per_event for x in lean)
        text.append(
            f"| {n} | {rd:,.0f} | {rl:,.0f} | **{rd / rl:.2f}x** | {rd / base_d:.2f}x | "
            f"{rl / base_l:.2f}x | {cd:.0f}, {cl:.0f} |"
        )
    text += ["", END, ""]
    section = "\n".join(text)
    print(section)
    if args.write:
        path = Path(args.write)
        old = path.read_text()
        if START in old and END in old:
            before, rest = old.split(START, 1)
            after = rest.split(END, 1)[1].lstrip("\n")
            new = before + section + ("\n" + after if after else "")
        else:
            new = old.rstrip("\n") + "\n\n" + section
        path.write_text(new)
        say(f"wrote its section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
