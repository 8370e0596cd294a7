"""A `send` without `--redis` never loads redis-py: its import is ~60% of a plain
send's start-up (py-spy, BENCHMARKS.md), and only the --redis path needs it."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import orjson
from crashkit import env_for, write_input

from dispatcher.emulator import Emulator, EmulatorConfig


def _imported(importtime: str) -> set[str]:
    """Module names from ``python -X importtime``'s report (``... | ... | name``)."""
    names = set()
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


async def test_a_send_without_redis_does_not_import_redis(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", [f"i{k}" for k in range(50)])
    out = tmp_path / "out.jsonl"
    send = [sys.executable, "-X", "importtime", "-m", "dispatcher", "send", str(src)]
    send += ["--workflow", "wf", "--results", str(out), "--quiet", "--rate", "unlimited"]
    async with Emulator(EmulatorConfig(limit=None)) as emu:
        done = await anyio.run_process(send, env=env_for(emu), check=False)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    envelopes = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [e["delivery"] for e in envelopes] == ["confirmed"] * 50
    names = _imported(err)
    assert "dispatcher.run.runner" in names  # the report is read right
    assert not {n for n in names if n == "redis" or n.startswith("redis.")}
