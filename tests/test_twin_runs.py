"""Twin runs: a second run on results another live run holds exits 2 and sends nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest
from crashkit import (
    TOKEN,
    accepted_counts,
    cmd,
    env_for,
    final_by_instance,
    run_cli,
    wait_until_sending,
    write_input,
)

from dispatcher.emulator import Emulator, EmulatorConfig, Faults
from dispatcher.model import UserError
from dispatcher.results.lock import ResultsLocked, acquire


@pytest.mark.parametrize("processes", ["1", "2"])
async def test_a_second_run_on_the_same_results_exits_2_naming_the_pid(
    tmp_path: Path, processes: str
) -> None:
    ids = [f"t{k}" for k in range(400)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    cfg = EmulatorConfig(tokens=(TOKEN,), limit=None, faults=Faults.parse([], latency="20ms"))
    async with Emulator(cfg) as emu:
        env = env_for(emu)
        first = await anyio.open_process(
            cmd(src, out, "--rate", "40/s", "--processes", processes), env=env
        )
        await wait_until_sending(emu, 30)
        # The cron overlap: the same command again, resuming, while the first still runs.
        code, stderr = await run_cli(cmd(src, out, "--rate", "unlimited", "--resume"), env)
        assert code == 2, stderr
        assert stderr.count("\n") == 1, stderr  # one line, no traceback
        assert f"pid {first.pid}" in stderr
        assert str(out) in stderr
        first.send_signal(signal.SIGINT)  # it drains and ends, whatever the machine's load
        with anyio.fail_after(30):
            assert await first.wait() == 130
        # Once the first has ended, the lock is free: a resume sends the rest.
        code, stderr = await run_cli(cmd(src, out, "--rate", "unlimited", "--resume"), env)
        assert code == 0, stderr
        counts = accepted_counts(emu)
    assert counts == dict.fromkeys(ids, 1)  # nothing delivered twice
    assert len(final_by_instance(out)) == 400


def test_the_lock_is_a_user_error_and_goes_with_its_holder(tmp_path: Path) -> None:
    results = str(tmp_path / "out.jsonl")
    held = acquire(results)
    assert held is not None
    with pytest.raises(ResultsLocked) as caught:
        acquire(results)
    assert isinstance(caught.value, UserError)
    assert caught.value.exit_code == 2
    assert caught.value.pid == os.getpid()
    held.release()
    again = acquire(results)  # released: free at once
    assert again is not None
    again.release()
    assert acquire("-") is None  # stdout results have nothing to lock
