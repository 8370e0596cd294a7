"""Where a `dispatcher send` spends its time: py-spy samples of a whole run, by stage.

py-spy (a sampling profiler, ``pip install py-spy``; the ``bench`` extra) records the
contender's every thread at a fixed rate without changing its code, so the figures are
those of the real process: the reader thread, the event loop, the client. Each sample is
given to one stage by its innermost frame in ``dispatcher/`` (a call into anyio or asyncio
made by the engine counts as the engine's); a sample with an import on its stack is
start-up, and a thread waiting on a lock or a queue is idle and left out. uvloop's loop is C
code that py-spy cannot look into: its own work (epoll, socket reads) shows as
``Runner.run``, under "event loop".

Also here: the cost of the strict success check (``orjson.loads`` of every 2xx body),
timed on nginx's success body.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import timeit
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import orjson

from suite.config import SUCCESS_BODY, say
from suite.peers import Setup, dispatcher_argv
from suite.processes import write_input

SAMPLE_RATE: Final = 250  # per second
TOP: Final = 15

# The stages of issue 27, each a (stage, substring of a frame's file, function names or
# None for any), tried in order on each frame from the innermost out. A frame reads
# ``qualname (path:line)``. "client: parse" is llhttp's callbacks and the outcome built
# from the answer; the rest of the client (the request head, the write, the connection
# pool, the future) is "client: write".
READ: Final = "read and validate"
GATE: Final = "gate (rate, concurrency)"
ENGINE: Final = "engine and stats"
WRITE: Final = "client: write the request"
PARSE: Final = "client: parse the answer"
ENVELOPE: Final = "envelope: build and encode"
COMMIT: Final = "commit: results, journal, fsync"
_PARSE_FNS: Final = (
    "_Conn.data_received",
    "_Conn.on_message_begin",
    "_Conn.on_status",
    "_Conn.on_header",
    "_Conn.on_headers_complete",
    "_Conn.on_body",
    "_Conn.on_message_complete",
    "_Conn._complete",
    "_Conn._reset",
    "_check_header",
)
STAGES: Final[tuple[tuple[str, str, tuple[str, ...] | None], ...]] = (
    (READ, "dispatcher/inputs/", None),
    (READ, "dispatcher/run/runner.py", ("input_batches", "_batched")),
    (GATE, "dispatcher/sending/gate.py", None),
    (GATE, "dispatcher/sending/pacing.py", None),
    (GATE, "dispatcher/sending/policy.py", None),
    (ENGINE, "dispatcher/sending/", None),
    (PARSE, "dispatcher/clients/fast.py", _PARSE_FNS),
    (PARSE, "dispatcher/clients/base.py", None),
    (WRITE, "dispatcher/clients/", None),
    (ENVELOPE, "dispatcher/results/envelopes.py", None),
    (ENVELOPE, "dispatcher/results/sinks.py", ("encode",)),
    (COMMIT, "dispatcher/results/", None),
    (COMMIT, "dispatcher/run/runner.py", ("GroupCommit", "drain_to_sink", "close_sink")),
)
# The table's order: the pipeline's, then what is no stage.
STAGE_ORDER: Final = (READ, GATE, ENGINE, WRITE, PARSE, ENVELOPE, COMMIT)
# Frames that only start the loop and wait on it: what runs under them is the loop's own.
OUTER: Final = ("dispatcher/commands/", "dispatcher/__main__.py", "run (dispatcher/run/runner.py")
OTHER_OURS: Final = "other dispatcher code"
STARTUP: Final = "start-up: imports"
LOOP: Final = "event loop and anyio (no dispatcher frame)"
IDLE_LEAVES: Final = re.compile(
    r"^(\w+\.)?(wait|get|_wait_for_tstate_lock|select|poll) \(.*(threading|queue|selectors)\.py"
)
_LINE: Final = re.compile(r":\d+\)$")


@dataclass(slots=True)
class Profile:
    label: str
    samples: int = 0  # not idle
    idle: int = 0
    stages: collections.Counter[str] = field(default_factory=collections.Counter)
    leaves: collections.Counter[str] = field(default_factory=collections.Counter)

    def share(self, count: int) -> float:
        return count / self.samples if self.samples else 0.0


def _stage(frames: list[str]) -> str:
    if any("importlib._bootstrap" in f for f in frames):
        return STARTUP
    for frame in reversed(frames):
        if "dispatcher/" in frame and "site-packages" not in frame:
            if any(outer in frame for outer in OUTER):
                continue  # the CLI and the runner wait under the loop: not a stage
            fn = frame.partition(" (")[0]
            for stage, where, fns in STAGES:
                if where in frame and (fns is None or fn.startswith(fns)):
                    return stage
            return OTHER_OURS
    return LOOP


def summarize(label: str, lines: Iterable[str]) -> Profile:
    """A profile from py-spy's raw output (``frame;frame;... count`` a line)."""
    prof = Profile(label=label)
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        # py-spy puts the thread first when asked; drop anything that is not a frame.
        frames = [f for f in frames if " (" in f]
        if not frames:
            continue
        leaf = _LINE.sub(")", frames[-1])
        if IDLE_LEAVES.match(leaf):
            prof.idle += count
            continue
        prof.samples += count
        prof.stages[_stage(frames)] += count
        prof.leaves[_short(leaf)] += count
    return prof


def _short(frame: str) -> str:
    """``fn (path/to/site-packages/pkg/mod.py)`` -> ``fn (pkg/mod.py)``."""
    name, _, path = frame.partition(" (")
    path = path.rstrip(")")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3":
                path = path.split("/", 1)[-1]
    return f"{name} ({path})"


def find_py_spy(python: str) -> str | None:
    beside = Path(python).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_run(setup: Setup, loop: str, events: int) -> Profile | None:
    """py-spy over one whole ``dispatcher send`` of ``events`` records on ``loop``."""
    py_spy = find_py_spy(setup.python)
    if py_spy is None:
        say("profile: py-spy not found (pip install py-spy, or make bench): skipped")
        return None
    inp = setup.tmp / f"profile-{events}.jsonl"
    if not inp.exists():
        write_input(inp, events)
    raw = setup.tmp / f"profile-{loop}.txt"
    out = setup.tmp / f"profile-{loop}.results.jsonl"
    argv = [
        py_spy,
        "record",
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        "raw",
        "--output",
        str(raw),
        "--",
        *dispatcher_argv(setup, inp, out, loop=loop),
    ]
    say(f"profile: py-spy over dispatcher/{loop} with {events:,} events")
    proc = subprocess.run(
        argv, env=setup.env, capture_output=True, text=True, timeout=120 + events / 100
    )
    out.unlink(missing_ok=True)
    if proc.returncode != 0 or not raw.exists():
        say(f"warning: py-spy failed ({proc.returncode}): {proc.stderr[-1000:]}")
        return None
    with raw.open() as f:
        prof = summarize(f"dispatcher/{loop}", f)
    top = ", ".join(f"{stage} {prof.share(n):.0%}" for stage, n in prof.stages.most_common(4))
    say(f"  {prof.samples} samples (and {prof.idle} idle): {top}")
    return prof


def strict_check_ns() -> float:
    """Nanoseconds per ``orjson.loads`` of the success body (the strict success check)."""
    body = SUCCESS_BODY.encode()
    loads = orjson.loads
    timer = timeit.Timer(lambda: loads(body))
    number = 100_000
    best = min(timer.repeat(repeat=5, number=number))
    return best / number * 1e9


def profile_table(profiles: list[Profile], cpu_us: dict[str, float]) -> list[str]:
    """Share of samples by stage, one column per profile; µs/event from the run's CPU."""
    head = "| stage | " + " | ".join(p.label for p in profiles) + " |"
    rows = [head, "| --- |" + " ---: |" * len(profiles)]
    order: dict[str, float] = {}
    for p in profiles:
        for stage, n in p.stages.items():
            order[stage] = order.get(stage, 0.0) + p.share(n)
    rest = sorted((s for s in order if s not in STAGE_ORDER), key=order.__getitem__, reverse=True)
    for stage in [*STAGE_ORDER, *rest]:
        cells = []
        for p in profiles:
            share = p.share(p.stages.get(stage, 0))
            us = cpu_us.get(p.label)
            cells.append(f"{share:.1%}" + (f" ({share * us:.0f} us)" if us else ""))
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    if all(cpu_us.get(p.label) for p in profiles):
        cells = [f"100% ({cpu_us[p.label]:.0f} us)" for p in profiles]
        rows.append("| **all (CPU per event)** | " + " | ".join(cells) + " |")
    rows.append("| samples (not idle) | " + " | ".join(f"{p.samples:,}" for p in profiles) + " |")
    return rows


def top_table(prof: Profile, top: int = TOP) -> list[str]:
    rows = [
        f"| {prof.label}: function (innermost frame) | share of samples |",
        "| --- | ---: |",
    ]
    for leaf, n in prof.leaves.most_common(top):
        rows.append(f"| `{leaf}` | {prof.share(n):.1%} |")
    return rows


if __name__ == "__main__":  # summarize saved raw files: python -m suite.profiling FILE...
    import sys

    for path in sys.argv[1:]:
        with open(path) as f:
            p = summarize(path, f)
        print("\n".join(profile_table([p], {})))
        print()
        print("\n".join(top_table(p)))
        print()
