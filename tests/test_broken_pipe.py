"""`dispatcher send --results - | head -1`: a closed stdout ends the run quietly, exit 141."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from crashkit import env_for, write_input

from dispatcher.emulator import Emulator, EmulatorConfig


async def into_head(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    """``command | head -1`` against an emulator: one line, exit 141, no traceback."""
    shell = f"{shlex.join(command)} | head -1"
    async with Emulator(EmulatorConfig(limit=None)) as emu:
        done = await anyio.run_process(
            ["bash", "-o", "pipefail", "-c", shell], env=env_for(emu), check=False
        )
    err = done.stderr.decode()
    assert "Traceback" not in err
    assert "ExceptionGroup" not in err
    assert "BrokenPipe" not in err
    assert len(done.stdout.decode().splitlines()) == 1
    assert done.returncode == 141, err
    return done


async def test_send_into_a_closed_pipe_exits_141_without_a_traceback(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", [f"i{k}" for k in range(3000)])
    send = [sys.executable, "-m", "dispatcher", "send", str(src), "--workflow", "wf"]
    send += ["--results", "-", "--quiet", "--rate", "unlimited"]
    await into_head(send)


async def test_load_into_a_closed_pipe_exits_141_and_still_writes_the_plot(
    tmp_path: Path,
) -> None:
    pytest.importorskip("plotly", reason="the plot extra is not installed")
    plot = tmp_path / "l.html"
    load = [sys.executable, "-m", "dispatcher", "load", "--workflow", "wf"]
    load += ["--event-type", "evt", "--instance-prefix", "i", "--instance-count", "5"]
    load += ["--rate", "200/s", "--duration", "2s", "--results", "-", "--plot", str(plot)]
    load += ["--quiet"]
    done = await into_head(load)
    err = done.stderr.decode()
    # The load test ran to its planned end: the plot is of the whole run, not of the
    # moment the reader left.
    assert "arrivals   400:" in err
    assert "stdout closed early" in err
    text = plot.read_text()
    assert "Plotly" in text
    assert "p50 (2xx)" in text
