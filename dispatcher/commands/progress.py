"""What a person sees during and after a run: live progress and the closing summary."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Final, Literal, TextIO

import anyio

from dispatcher.model import Delivery, ErrorKind
from dispatcher.sending.stats import RunStats

LINE_INTERVAL: Final = 5.0  # seconds between plain progress lines when stderr is no terminal
BAR_INTERVAL: Final = 0.25
MIN_RATE_SECONDS: Final = 1.0  # shorter runs get no rate in the summary
DISK_HELD_SHOWN_S: Final = 0.5  # the summary tells of the disk holding requests from this

ProgressMode = Literal["auto", "bar", "lines", "off"]


PausedFor = Callable[[], float]
"""Seconds until the run's pause ends (0 or less: not paused)."""


def pause_text(stats: RunStats, paused_for: PausedFor | None) -> str | None:
    """``paused: rate limited, resuming in 37 s`` while every worker waits, else None."""
    if paused_for is None:
        return None
    left = paused_for()
    if left <= 0:
        return None
    why = "rate limited" if stats.rate_limited else "waiting for the rate budget"
    return f"paused: {why}, resuming in {math.ceil(left):,} s"


def status_line(stats: RunStats, paused_for: PausedFor | None = None) -> str:
    elapsed = stats.elapsed()
    line = (
        f"{stats.records:,} done ({stats.confirmed:,} ok, {stats.failed:,} failed), "
        f"{stats.in_flight} in flight, {stats.attempts / elapsed:,.1f} req/s, "
        f"{stats.retries:,} retries, {stats.rate_limited:,} 429s, {elapsed:,.0f}s"
    ) + (f"; {stats.coordination}" if stats.coordination else "")
    paused = pause_text(stats, paused_for)
    return f"{line}; {paused}" if paused else line


def bar_status(stats: RunStats, paused_for: PausedFor | None = None) -> str:
    """The text beside the bar, which shows the counts already."""
    paused = pause_text(stats, paused_for)
    text = (
        f"{stats.failed:,} failed · {stats.in_flight} in flight · "
        f"{stats.attempts / stats.elapsed():,.0f} req/s · {stats.retries:,} retries · "
        f"{stats.rate_limited:,} 429s"
    ) + (f" · {stats.coordination}" if stats.coordination else "")
    return f"{paused} · {text}" if paused else text


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
    paused_for: PausedFor | None = None,
) -> None:
    """Run until cancelled: a live bar on a terminal, or a plain line every few seconds.

    ``paused_for`` tells how long the run's pause has still to go, so that a run waiting
    out a 429 says so instead of looking stuck.
    """
    if mode == "off":
        await anyio.sleep_forever()
    if mode == "lines":
        while True:
            await anyio.sleep(LINE_INTERVAL)
            print(f"dispatcher: {status_line(stats, paused_for)}", file=stream, flush=True)
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
        TextColumn("ETA"),
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
                progress.update(task, completed=done, status=bar_status(stats, paused_for))
                await anyio.sleep(BAR_INTERVAL)


def _table(title: str, counts: dict[str, int]) -> list[str]:
    if not counts:
        return []
    parts = ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return [f"  {title:<11}{parts}"]


def format_summary(
    stats: RunStats,
    results: str,
    *,
    finish: str | None = None,
    unknown_list: str | None = None,
) -> str:
    """The closing summary. ``finish`` is the command that sends what the run left
    (shown after a stop); ``unknown_list`` the file listing the records whose delivery is
    unknown (shown when there are any)."""
    elapsed = stats.elapsed()
    unknown = stats.deliveries[Delivery.UNKNOWN.value]
    left_out = stats.errors[ErrorKind.SKIPPED.value]
    failed = stats.failed - unknown - left_out
    lines = ["", "dispatcher: run summary"]
    lines.append(
        f"  records    {stats.records:,} ({stats.confirmed:,} confirmed, {failed:,} failed, "
        f"{unknown:,} unknown" + (f", {left_out:,} skipped: not waiting" if left_out else "") + ")"
    )
    lines += _table("delivery", dict(stats.deliveries))
    lines += _table("status", dict(stats.statuses))
    lines += _table("errors", dict(stats.errors))
    lines.append(
        f"  requests   {stats.attempts:,} ({stats.retries:,} retries, "
        f"{stats.rate_limited:,} answered 429)"
    )
    if stats.list_requests:
        # The listing's GETs passed the same gate: the account's budget spent on reading.
        lines.append(
            f"  listing    {stats.listed:,} instances listed: {stats.list_requests:,} list "
            f"requests, {stats.read_requests:,} step reads (from the same --rate budget; "
            f"{stats.attempts + stats.list_requests + stats.read_requests:,} requests in all)"
        )
    if stats.pauses:
        # A pause is counted as it was set; a run that stopped during one waited less.
        paused = min(stats.paused_s, elapsed)
        lines.append(
            f"  paused     {stats.pauses:,} times, {paused:,.1f} s in all "
            "(every worker waits out a 429's Retry-After or a spent budget)"
        )
    if stats.disk_held_s >= DISK_HELD_SHOWN_S:
        lines.append(
            f"  disk       new requests held {min(stats.disk_held_s, elapsed):,.1f} s in all "
            "(finished envelopes waited for the disk; that keeps a crash's unknown bounded)"
        )
    mean = stats.latency_sum_ms / stats.latency_count if stats.latency_count else 0.0
    # Requests over the wall time, start of the run to its end. Under a second that is
    # mostly the gate's small burst and one latency, not a rate: 8 requests stopped by a
    # 401 after 0.07 s would read 117/s at --rate 50/s.
    if elapsed >= MIN_RATE_SECONDS:
        rate = (
            f"{stats.attempts / elapsed:,.1f} requests/s, "
            f"{stats.confirmed / elapsed:,.1f} confirmed/s over the wall time"
        )
    else:
        rate = f"- (the run took under {MIN_RATE_SECONDS:g} s: too short to measure a rate)"
    lines.append(f"  rate       {rate}; mean latency {mean:,.1f} ms")
    if stats.skipped:
        hints = {
            "confirmed": "already confirmed",
            "failed": "failed before; --retry-failed sends them again",
            "unknown": "delivery unknown; --resend-unknown sends them again",
            "invalid": "invalid input; fix the lines to send them",
        }
        for reason, count in sorted(stats.skipped.items()):
            lines.append(f"  skipped    {count:,} {hints.get(reason, reason)}")
        unsettled = sum(n for reason, n in stats.skipped.items() if reason != "confirmed")
        if unsettled:
            lines.append(
                f"  unsettled  {unsettled:,} skipped records are not confirmed (so exit 1)"
            )
    if stats.crashed_unknown:
        lines.append(
            f"  crashed    {stats.crashed_unknown:,} records in flight when an earlier run "
            "died now say delivery unknown"
        )
    if stats.crashed_unreadable:
        lines.append(
            f"  crashed    {stats.crashed_unreadable:,} journal lines of an earlier run were "
            "torn before their key: that many records may have been sent, unnamed"
        )
    lines.append(f"  wall time  {elapsed:,.2f} s")
    lines.append(f"  results    {'stdout' if results == '-' else results}")
    if unknown_list is not None:
        lines.append(
            f"  unknown    listed in {unknown_list}: each may or may not have arrived. Check "
            "those instances (dashboard, wrangler workflows instances describe); resend the "
            "ones that did not get the event with --resume --resend-unknown, which resends "
            "all of them, or leave them"
        )
    if stats.write_error is not None:
        lines.append(f"  not saved  {stats.write_error}: stopped sending")
    elif stats.stop_reason is not None:
        lines.append(f"  stopped    {stats.stop_reason}")
        if finish is None:
            lines.append(
                "             records not attempted have no envelope: run again to send them"
            )
    if finish is not None:
        lines.append(f"  to finish  {finish}")
    return "\n".join(lines)
