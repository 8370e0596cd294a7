"""A full disk or an unwritable results folder mid-run: stop sending, exit 5, resume.

ENOSPC is real: a small tmpfs (mounting needs root, as in CI; skipped otherwise). EACCES
and a short journal write are injected into the writers (root ignores permissions).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anyio
import pytest
from crashkit import (
    TOKEN,
    FillingDisk,
    accepted_counts,
    check_after_resume,
    cmd,
    env_for,
    final_by_instance,
    journals,
    run_cli,
    settings_for,
    tmpfs,
    write_input,
)

from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.results import sinks
from dispatcher.results.journal import Journal, read_crashed
from dispatcher.run import runner


async def test_a_full_disk_stops_the_run_with_exit_5_and_resume_finishes(tmp_path: Path) -> None:
    ids = [f"d{k}" for k in range(1500)]
    src = write_input(tmp_path / "in.jsonl", ids)
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="5ms"))
    with tmpfs(tmp_path / "disk", "96k") as disk:
        out = disk / "out.jsonl"
        async with Emulator(cfg) as emu:
            env = env_for(emu)
            args = cmd(src, out, "--rate", "unlimited", "--concurrency", "8")
            args.remove("--quiet")
            code, stderr = await run_cli(args, env)
            assert code == 5, stderr
            assert "Traceback" not in stderr
            assert "No space left on device" in stderr
            assert "run summary" in stderr
            last = stderr.strip().splitlines()[-1]
            assert last.startswith("dispatcher send: error: cannot write results to ")
            assert last.endswith(
                f"dispatcher send {src} --workflow wf --results {out} "
                "--rate unlimited --concurrency 8 --resume"
            )
            sent_first = emu.log.total_requests()
            assert sent_first < len(ids)  # it stopped sending
            confirmed_first = {
                i for i, e in final_by_instance(out).items() if e["delivery"] == "confirmed"
            }
            await anyio.run_process(["mount", "-o", "remount,size=16m", str(disk)])
            code, stderr = await run_cli(cmd(src, out, "--rate", "unlimited", "--resume"), env)
            assert code in (0, 1), stderr  # 1: records that may have arrived say unknown
            assert not journals(disk, "out.jsonl")
            deliveries = check_after_resume(emu, out, ids, confirmed_first)
    # Only what was in flight, or done but not yet durable, is left unknown.
    assert sum(d == "unknown" for d in deliveries.values()) <= 8 + 40


async def test_a_results_folder_turned_unwritable_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"a{k}" for k in range(600)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    real = sinks._write_all
    calls = 0

    def refuse_after_3(fd: int, data: memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real(fd, data)

    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="5ms"))
    async with Emulator(cfg) as emu:
        monkeypatch.setattr(sinks, "_write_all", refuse_after_3)
        stats = await runner.run(settings_for(emu, src, out))
        assert stats.write_error is not None
        assert "Permission denied" in stats.write_error
        sent = emu.log.total_requests()
        assert sent < len(ids)
        assert stats.attempts == sent  # nothing more left once the writer failed
        assert journals(tmp_path, "out.jsonl"), "records without a durable envelope"
        confirmed_first = {
            i for i, e in final_by_instance(out).items() if e["delivery"] == "confirmed"
        }
        monkeypatch.setattr(sinks, "_write_all", real)
        await runner.run(settings_for(emu, src, out, resume=True))
        deliveries = check_after_resume(emu, out, ids, confirmed_first)
    unknown = {i for i, d in deliveries.items() if d == "unknown"}
    assert len(unknown) <= 4 + 40
    # Every record the API accepted without a durable envelope is among them.
    assert set(accepted_counts(emu)) <= confirmed_first | unknown | {
        i for i, d in deliveries.items() if d == "confirmed"
    }


async def test_a_short_journal_write_stops_that_record_before_its_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"j{k}" for k in range(300)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"

    def on_the_50th_line(lines: int, records: list[bytes]) -> int | None:
        # The write holding the 50th journal line gets as far as half of that line. One
        # write may hold the lines of several records (one loop turn's:
        # tests/test_journal_batch.py).
        if not lines < 50 <= lines + len(records):
            return None
        k = 50 - lines - 1  # the 50th line's place in this write
        return sum(map(len, records[:k])) + len(records[k]) // 2

    disk = FillingDisk(on_the_50th_line)

    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None)
    async with Emulator(cfg) as emu:
        monkeypatch.setattr(os, "write", disk)
        stats = await runner.run(settings_for(emu, src, out, concurrency=16))
        monkeypatch.setattr(os, "write", disk.real)
        assert stats.write_error is not None
        assert "No space left on device" in stats.write_error
        # No record of the torn write left, nor anything after them.
        assert emu.log.total_requests() <= 49
        assert disk.torn
        assert not set(disk.torn) & {r.instance_id for r in emu.log.requests}
        assert stats.attempts == emu.log.total_requests()
        crashed = read_crashed(str(out) + ".inflight")
        assert crashed is not None
        assert crashed.torn_keys == []  # the half line was cut back off
        assert crashed.unidentified == 0
        await runner.run(settings_for(emu, src, out, resume=True))
        deliveries = check_after_resume(emu, out, ids, set())
    assert set(deliveries.values()) == {"confirmed"}
    assert accepted_counts(emu) == dict.fromkeys(ids, 1)


async def test_a_torn_journal_line_means_may_have_been_sent(tmp_path: Path) -> None:
    ids = [f"x{k}" for k in range(20)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    journal = Journal(str(out) + ".inflight", results=str(out))
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None)
    async with Emulator(cfg) as emu:
        # A crashed run's journal: two whole lines, then one cut off mid-line (power loss).
        records = [
            r async for batch in runner.input_batches(settings_for(emu, src, out)) for r in batch
        ]
        for record in records[:3]:
            journal.mark(record)  # type: ignore[arg-type]
        journal.close(delete=False)
        path = out.with_name("out.jsonl.inflight")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 40])
        stats = await runner.run(settings_for(emu, src, out, resume=True))
        sent = {str(r.instance_id) for r in emu.log.requests}
    assert stats.crashed_unknown == 3
    final = final_by_instance(out)
    assert sent == set(ids[3:])  # the three may have arrived: not sent again
    # The torn one is known by its key: its envelope says unknown, not "not sent".
    assert [e["delivery"] for e in final.values()].count("unknown") == 3
    assert not journals(tmp_path, "out.jsonl")
