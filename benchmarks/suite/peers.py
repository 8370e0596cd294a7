"""The contenders (peers): how each is started, on which event loop, and how a run is checked.

Six tools, each on both event loops, so every ratio compares like with like:

- ``dispatcher``: ``dispatcher send``. It uses uvloop when uvloop is importable, so its
  asyncio runs start through :data:`NO_UVLOOP`, which hides uvloop from it;
- ``lean``: ``baseline_lean.py``, the fastest honest aiohttp client (no per-event output);
- ``typical``: ``baseline_aiohttp.py``, the simple aiohttp pool most users write;
- ``httpx``: ``baseline_httpx.py``, the lean client on ``httpx.AsyncClient``;
- ``sdk``: ``sdk_cloudflare.py``, the official SDK;
- ``floor``: ``floor_protocol.py``, an asyncio Protocol + httptools loop, no bookkeeping;

each script run with ``--loop asyncio|uvloop``. ``lean``, ``httpx`` and ``floor`` write one
summary line (``{"events": N, "ok": K}``) instead of a result per event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from suite.config import ACCOUNT, BENCH_DIR, TOKEN, WORKFLOW, say
from suite.processes import ChildResult, count_ok, run_child
from suite.servers import Nginx, base_url

TOOLS: Final = ("dispatcher", "lean", "typical", "httpx", "sdk", "floor")
SCRIPTS: Final = {
    "lean": "baseline_lean.py",
    "typical": "baseline_aiohttp.py",
    "httpx": "baseline_httpx.py",
    "sdk": "sdk_cloudflare.py",
    "floor": "floor_protocol.py",
}
# These write one summary line, not one result line per event.
SUMMARY_TOOLS: Final = frozenset({"lean", "httpx", "floor"})
LOOPS: Final = ("asyncio", "uvloop")
# Grouped by loop: a round runs one loop's contenders, then the other's.
CONTENDERS: Final = tuple(f"{tool}/{loop}" for loop in LOOPS for tool in TOOLS)

# `python -m dispatcher`, with uvloop hidden: find_spec("uvloop") sees None in sys.modules,
# so the dispatcher runs on asyncio's default loop, with the code and flags unchanged.
NO_UVLOOP: Final = (
    "import sys; sys.modules['uvloop'] = None; sys.argv[0] = 'dispatcher'; "
    "from dispatcher.commands.cli import main; sys.exit(main())"
)


def tool_of(name: str) -> str:
    return name.split("/", 1)[0]


def loop_of(name: str) -> str:
    return name.split("/", 1)[1]


@dataclass(slots=True)
class Setup:
    tmp: Path
    nginx: Nginx
    env: dict[str, str]
    concurrency: int
    python: str = sys.executable


def child_env(port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CLOUDFLARE_", "DISPATCHER_")) and k != "PYTHONPATH"
    }
    env.update(
        CLOUDFLARE_API_TOKEN=TOKEN,
        CLOUDFLARE_ACCOUNT_ID=ACCOUNT,
        CLOUDFLARE_BASE_URL=base_url(port),
    )
    return env


def dispatcher_argv(
    setup: Setup,
    inp: Path,
    out: Path,
    *,
    loop: str = "uvloop",
    rate: str = "unlimited",
    port: int | None = None,
) -> list[str]:
    start = ["-m", "dispatcher"] if loop == "uvloop" else ["-c", NO_UVLOOP]
    argv = [
        setup.python,
        *start,
        "send",
        str(inp),
        "--workflow",
        WORKFLOW,
        "--results",
        str(out),
        "--rate",
        rate,
        "--concurrency",
        str(setup.concurrency),
        "--quiet",
        "--overwrite",
        "--progress",
        "off",
    ]
    if port is not None:
        argv += ["--base-url", base_url(port)]
    return argv


def script_argv(setup: Setup, script: str, inp: Path, out: Path, loop: str) -> list[str]:
    return [
        setup.python,
        str(BENCH_DIR / script),
        str(inp),
        str(out),
        "--base-url",
        base_url(setup.nginx.port),
        "--account-id",
        ACCOUNT,
        "--workflow",
        WORKFLOW,
        "--concurrency",
        str(setup.concurrency),
        "--loop",
        loop,
    ]


def contender_argv(setup: Setup, name: str, inp: Path, out: Path) -> list[str]:
    tool, loop = tool_of(name), loop_of(name)
    if tool == "dispatcher":
        return dispatcher_argv(setup, inp, out, loop=loop)
    return script_argv(setup, SCRIPTS[tool], inp, out, loop)


def count_summary(out: Path) -> tuple[int, int]:
    """(events, ok) from a summary line, as count_ok gives (lines, ok) for results."""
    try:
        data = json.loads(out.read_bytes())
        return int(data["events"]), int(data["ok"])
    except (ValueError, KeyError, TypeError):
        return 0, 0


def run_timeout(events: int) -> float:
    return 60.0 + events / 50.0  # even a slow contender does 50 events/s here


def run_checked(
    setup: Setup,
    name: str,
    inp: Path,
    events: int,
    *,
    label: str,
    timeout: float | None = None,
    sample_every: float | None = None,
) -> ChildResult:
    stem = name.replace("/", "-")
    out = setup.tmp / f"{stem}-{label}.results.jsonl"
    log = setup.tmp / f"{stem}-{label}.log"
    timeout = timeout if timeout is not None else run_timeout(events)
    result = run_child(
        name,
        contender_argv(setup, name, inp, out),
        setup.env,
        events=events,
        timeout=timeout,
        log=log,
        nginx=setup.nginx,
        sample_every=sample_every,
    )
    count = count_summary if tool_of(name) in SUMMARY_TOOLS else count_ok
    lines, ok = count(out) if out.exists() else (0, 0)
    problems = []
    if result.timed_out:
        problems.append(f"stopped after the {timeout:.0f} s time limit")
    if result.exit_code != 0:
        problems.append(f"exit code {result.exit_code}")
    if lines != events or ok != events:
        problems.append(f"{ok} ok results in {lines} lines for {events} events")
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    if not problems:
        return result
    tail = log.read_text(errors="replace")[-2000:]
    say(f"warning: {name} ({label}): {'; '.join(problems)}; its output ends with:\n{tail}")
    return dataclasses.replace(result, problem="; ".join(problems))
