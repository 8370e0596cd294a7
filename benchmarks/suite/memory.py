"""Peak RSS of dispatcher send by input size (100k and 1M records)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from suite.config import deciles, say
from suite.peers import Setup, run_checked
from suite.processes import ChildResult, write_input


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRun:
    records: int
    loop: str
    result: ChildResult


def memory_runs(
    setup: Setup, records: int, loops: Sequence[str], timeout: float
) -> list[MemoryRun]:
    """One ``dispatcher send`` of ``records`` generated records on each loop, RSS sampled."""
    runs = []
    inp = setup.tmp / f"memory-{records}.jsonl"
    write_input(inp, records)
    for loop in loops:
        name = f"dispatcher/{loop}"
        say(f"memory: {name} with {records:,} records (time limit {timeout:.0f} s)")
        r = run_checked(
            setup, name, inp, records, label=f"mem{records}", timeout=timeout, sample_every=1.0
        )
        say(
            f"  {records:>9,} records {r.wall_s:7.1f} s {r.rate:8.0f} events/s  "
            f"peak RSS {r.maxrss_mib:5.1f} MiB; RSS by tenths: {deciles(r.rss_samples)}"
        )
        runs.append(MemoryRun(records=records, loop=loop, result=r))
    inp.unlink()
    return runs
