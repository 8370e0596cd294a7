"""A disk slower than the run: the run slows down, and a crash still leaves few in doubt.

A crash leaves ``unknown`` the records started whose envelope was not yet durable. Those
finished but waiting for a flush grew with the disk's latency: at 3,000 records/s, a
100 ms fsync left 300 of them. Now a record's first request waits while the run has
more of them than its workers plus 50 ms of traffic at its rate (at least 24, at least
``--concurrency``), whatever the disk.

fsync is made slow in-process; the crash is a copy of the results and the journal taken
on the event loop between two steps of the run, which is what a kill -9 leaves behind
(the page cache), and a resume of that copy says how many records it had to call unknown.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import anyio
import pytest
from crashkit import TOKEN, final_by_instance, settings_for, write_input

from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.model import Event
from dispatcher.results.journal import Journal
from dispatcher.run import runner
from dispatcher.run.settings import Rate

FSYNC_S = 0.1


def snapshot(out: Path, into: Path) -> Path:
    """The files as a kill -9 at this instant would leave them (results, then journal)."""
    into.mkdir()
    for name in (out.name, out.name + ".inflight"):
        if (out.parent / name).exists():
            shutil.copyfile(out.parent / name, into / name)
    return into / out.name


@pytest.mark.parametrize(("concurrency", "rate", "limit"), [(16, 2000, 116), (64, 4000, 264)])
async def test_a_slow_disk_slows_the_run_but_a_crash_leaves_no_more_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrency: int, rate: int, limit: int
) -> None:
    ids = [f"s{k}" for k in range(1600)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    pace = {"concurrency": concurrency, "rate": Rate(count=rate, per=1.0)}
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(FSYNC_S)  # in the flush's thread, as a busy disk would
        real_fsync(fd)

    most = 0
    real_mark = Journal.mark

    def mark(journal: Journal, event: Event) -> None:
        nonlocal most
        real_mark(journal, event)
        most = max(most, journal.pending)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    monkeypatch.setattr(Journal, "mark", mark)
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="5ms"))
    crashes: list[Path] = []
    async with Emulator(cfg) as emu:
        # Workers plus as many envelopes, or 50 ms at the rate if more: a 100 ms fsync is
        # twice that much traffic, so the disk, not the rate, sets the pace.
        assert runner.in_doubt_limit(settings_for(emu, src, out, **pace), None) == limit

        async def crash_now_and_then() -> None:
            while True:
                await anyio.sleep(0.15)
                if out.exists():
                    crashes.append(snapshot(out, tmp_path / f"crash{len(crashes)}"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(crash_now_and_then)
            stats = await runner.run(settings_for(emu, src, out, **pace))
            tg.cancel_scope.cancel()
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert stats.confirmed == len(ids)
        assert stats.disk_held_s > 0.2  # the disk set the pace, and the summary says so
        assert 0 < most <= limit
        assert len(crashes) >= 3
        unknown = []
        for crashed in crashes[:: max(1, len(crashes) // 5)]:  # five, spread over the run
            resumed = await runner.run(settings_for(emu, src, crashed, resume=True))
            unknown.append(resumed.crashed_unknown)
            assert sorted(final_by_instance(crashed)) == sorted(ids)
    assert max(unknown) <= limit, unknown
    assert max(unknown) > 0, "some crash caught records in doubt"
