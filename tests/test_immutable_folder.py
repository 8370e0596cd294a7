"""The results folder made immutable (``chattr +i``) while a run writes into it.

Files already open there can still be written, so every envelope gets to disk; what fails
is each end-of-run step that changes the folder itself: removing the journal, the lock
file, the list of unknown records. Those happen after every envelope is durable, so the
run keeps its summary and its true exit code, with one warning line per path left behind
(before: the journal's unlink was a traceback, exit 2, ``crashed``, no summary).

Real ``chattr +i`` on the test's own folder (root on ext4, as in CI); skipped where the
filesystem or the user cannot set the flag. The flag is always cleared afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from crashkit import TOKEN, env_for, envelopes, write_input

from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.results.journal import Journal
from dispatcher.results.lock import acquire

RECORDS = 3000


def _chattr(flag: str, path: Path) -> bool:
    done = subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False)
    return done.returncode == 0


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    if not _chattr("+i", folder):
        pytest.skip("chattr +i is not available here (needs root on ext4 or the like)")
    try:
        yield
    finally:
        _chattr("-i", folder)


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "results"
    where.mkdir()
    try:
        yield where
    finally:
        _chattr("-i", where)  # whatever happened, pytest must be able to remove it


def test_the_journal_and_lock_say_what_they_left_behind(folder: Path) -> None:
    results = str(folder / "r.jsonl")
    lock = acquire(results)
    assert lock is not None
    journal = Journal(results + ".inflight", results=results)
    with immutable(folder):
        left = journal.close()
        lock_left = lock.release()
        assert left is not None
        assert left.startswith(f"could not remove {results}.inflight: Operation not permitted;")
        assert "emptied instead" in left
        assert os.path.getsize(results + ".inflight") == 0  # names no record any more
        assert lock_left is not None
        assert lock_left.startswith(f"could not remove {results}.lock: Operation not permitted")


def _writing(out: Path, journals: list[Path]) -> bool:
    return out.exists() and out.stat().st_size > 0 and all(j.exists() for j in journals)


def _args(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        *("-m", "dispatcher", "send", str(src), "--workflow", "wf", "--results", str(out)),
        *("--progress", "off", *extra),
    ]


@pytest.mark.parametrize(("name", "processes"), [("r.jsonl", 1), ("r.sqlite", 1), ("r.jsonl", 2)])
async def test_a_folder_made_immutable_mid_run_keeps_the_summary_and_exit_0(
    tmp_path: Path, folder: Path, name: str, processes: int
) -> None:
    src = write_input(tmp_path / "in.jsonl", [f"m{k}" for k in range(RECORDS)])
    out = folder / name
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="1ms"))
    async with Emulator(cfg) as emu:
        env = env_for(emu)
        args = _args(src, out, "--rate", "1500/s", "--processes", str(processes))
        async with await anyio.open_process(args, env=env, stderr=subprocess.PIPE) as proc:
            # Wait until the run is writing (its lock, journal and results exist), then
            # freeze the folder under it.
            journals = [Path(f"{out}.inflight.{i}") for i in range(processes)]
            if processes == 1:
                journals = [Path(f"{out}.inflight")]
            with anyio.fail_after(30):
                while not _writing(out, journals):  # noqa: ASYNC110 (polling the disk)
                    await anyio.sleep(0.02)
            with immutable(folder):
                assert proc.stderr is not None
                stderr = b""
                async for chunk in proc.stderr:
                    stderr += chunk
                code = await proc.wait()
                text = stderr.decode()
                sent = emu.log.total_requests()
        assert code == 0, text
        assert "Traceback" not in text
        assert "crashed" not in text
        assert "run summary" in text
        assert f"{RECORDS:,} confirmed" in text
        warnings = [line for line in text.splitlines() if "warning: could not remove" in line]
        assert warnings, text
        assert any(str(out) + ".inflight" in line for line in warnings), warnings
        assert all("Operation not permitted" in line for line in warnings)
        assert sent == RECORDS
        finals = {e["key"]: e["delivery"] for e in envelopes(out)}
        assert len(finals) == RECORDS
        assert set(finals.values()) == {"confirmed"}
        # The folder writable again: a resume sends nothing more and says all is done.
        result = await anyio.run_process(_args(src, out, "--resume"), env=env, check=False)
        again = result.stderr.decode()
        assert result.returncode == 0, again
        assert "unknown" not in again.split("run summary")[-1].split("records")[0]
        assert emu.log.total_requests() == RECORDS  # nothing sent twice
        assert f"{RECORDS:,} already confirmed" in again


@pytest.mark.parametrize("processes", [1, 2])
async def test_a_folder_immutable_from_the_start_sends_nothing_and_says_so(
    tmp_path: Path, folder: Path, processes: int
) -> None:
    # A results file and lock file left by an earlier run: they open, but no journal can
    # be created beside them, and a run never sends what it could not journal.
    src = write_input(tmp_path / "in.jsonl", [f"s{k}" for k in range(50)])
    out = folder / "r.jsonl"
    for path in (str(out), f"{out}.lock"):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None)
    async with Emulator(cfg) as emu:
        with immutable(folder):
            args = _args(src, out, "--processes", str(processes))
            result = await anyio.run_process(args, env=env_for(emu), check=False)
        text = result.stderr.decode()
        assert result.returncode == 5, text
        assert "Traceback" not in text
        assert "Operation not permitted" in text
        assert emu.log.total_requests() == 0


async def test_an_unknown_list_that_cannot_be_written_is_a_warning(
    tmp_path: Path, folder: Path
) -> None:
    # Every request dropped mid-answer: the records end unknown, and the run writes the
    # list of them beside the results, which the frozen folder refuses.
    src = write_input(tmp_path / "in.jsonl", [f"u{k}" for k in range(20)])
    out = folder / "r.jsonl"
    for path in (str(out), f"{out}.lock", f"{out}.inflight"):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse(["drop=100%"]))
    async with Emulator(cfg) as emu:
        with immutable(folder):
            args = _args(src, out, "--max-attempts", "1")
            result = await anyio.run_process(args, env=env_for(emu), check=False)
        text = result.stderr.decode()
    assert result.returncode == 1, text  # some records are not confirmed: the true code
    assert "Traceback" not in text
    assert "run summary" in text
    assert f"warning: could not update {out}.unknown.jsonl: Operation not permitted" in text
    assert f"warning: could not remove {out}.inflight: Operation not permitted" in text
    finals = {e["key"]: e["delivery"] for e in envelopes(out)}
    assert len(finals) == 20
    assert set(finals.values()) == {"unknown"}
