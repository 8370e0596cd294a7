"""What a person sees during and after a run: live progress and the closing summary."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final, Literal, TextIO

import anyio

from dispatcher.sending.stats import RunStats

LINE_INTERVAL: Final = 5.0  # seconds between plain progress lines when stderr is no terminal
BAR_INTERVAL: Final = 0.25

ProgressMode = Literal["auto", "bar", "lines", "off"]


def status_line(stats: RunStats) -> str:
    elapsed = stats.elapsed()
    return (
        f"{stats.records:,} done ({stats.confirmed:,} ok, {stats.failed:,} failed), "
        f"{stats.in_flight} in flight, {stats.attempts / elapsed:,.1f} req/s, "
        f"{stats.retries:,} retries, {stats.rate_limited:,} 429s, {elapsed:,.0f}s"
    ) + (f"; {stats.coordination}" if stats.coordination else "")


def bar_status(stats: RunStats) -> str:
    """The text beside the bar, which shows the counts already."""
    return (
        f"{stats.failed:,} failed · {stats.in_flight} in flight · "
        f"{stats.attempts / stats.elapsed():,.0f} req/s · {stats.retries:,} retries · "
        f"{stats.rate_limited:,} 429s"
    ) + (f" · {stats.coordination}" if stats.coordination else "")


def resolve_mode(mode: ProgressMode, quiet: bool, stream: TextIO) -> ProgressMode:
    if quiet:
        return "off"
    if mode == "auto":
        return "bar" if stream.isatty() else "lines"
    return mode


def count_lines(paths: Sequence[str]) -> int | None:
    """Roughly how many records the inputs hold (lines; None when one is stdin)."""
    if "-" in paths:
        return None
    total = 0
    for path in paths:
        last = b"\n"
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                total += chunk.count(b"\n")
                last = chunk[-1:]
        total += last != b"\n"
    return total


async def show_progress(
    stats: RunStats,
    mode: ProgressMode,
    stream: TextIO = sys.stderr,
    inputs: Sequence[str] = (),
) -> None:
    """Run until cancelled: a live bar on a terminal, or a plain line every few seconds."""
    if mode == "off":
        await anyio.sleep_forever()
    if mode == "lines":
        while True:
            await anyio.sleep(LINE_INTERVAL)
            print(f"dispatcher: {status_line(stats)}", file=stream, flush=True)
    # Imported here: rich costs ~50 ms to import and only terminals need it.
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        SpinnerColumn(),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=Console(file=stream), transient=True) as progress:
        task = progress.add_task("send", total=None, status="")
        async with anyio.create_task_group() as tg:

            async def total() -> None:
                # Counting lines reads the inputs once more: in a thread, while sending.
                lines = await anyio.to_thread.run_sync(count_lines, inputs, abandon_on_cancel=True)
                if lines:
                    progress.update(task, total=lines)

            if inputs:
                tg.start_soon(total)
            while True:
                done = stats.records + sum(stats.skipped.values())
                progress.update(task, completed=done, status=bar_status(stats))
                await anyio.sleep(BAR_INTERVAL)


def _table(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return []
    parts = ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return [f"  {title:<11}{parts}"]


def format_summary(stats: RunStats, results: str) -> str:
    elapsed = stats.elapsed()
    lines = ["", "dispatcher: run summary"]
    lines.append(
        f"  records    {stats.records:,} ({stats.confirmed:,} confirmed, {stats.failed:,} not)"
    )
    lines += _table("delivery", dict(stats.deliveries))
    lines += _table("status", dict(stats.statuses))
    lines += _table("errors", dict(stats.errors))
    lines.append(
        f"  requests   {stats.attempts:,} ({stats.retries:,} retries, "
        f"{stats.rate_limited:,} answered 429)"
    )
    if stats.pauses:
        lines.append(
            f"  paused     {stats.pauses:,} times, {stats.paused_s:,.1f} s in all "
            "(every worker waits out a 429's Retry-After or a spent budget)"
        )
    mean = stats.latency_sum_ms / stats.latency_count if stats.latency_count else 0.0
    lines.append(
        f"  rate       {stats.attempts / elapsed:,.1f} requests/s, "
        f"{stats.confirmed / elapsed:,.1f} confirmed/s; mean latency {mean:,.1f} ms"
    )
    if stats.skipped:
        hints = {
            "confirmed": "already confirmed",
            "failed": "failed before; --retry-failed sends them again",
            "unknown": "delivery unknown; --resend-unknown sends them again",
            "invalid": "invalid input; fix the lines to send them",
        }
        for reason, count in sorted(stats.skipped.items()):
            lines.append(f"  skipped    {count:,} {hints.get(reason, reason)}")
    if stats.crashed_unknown:
        lines.append(
            f"  crashed    {stats.crashed_unknown:,} records in flight when an earlier run "
            "died now say delivery unknown"
        )
    lines.append(f"  wall time  {elapsed:,.2f} s")
    lines.append(f"  results    {'stdout' if results == '-' else results}")
    if stats.stop_reason is not None:
        lines.append(f"  stopped    {stats.stop_reason}")
        lines.append("             records not attempted have no envelope: run again to send them")
    return "\n".join(lines)
