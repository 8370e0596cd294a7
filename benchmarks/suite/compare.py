"""Events per second: every contender on both event loops, in interleaved rounds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from suite.config import pct, say
from suite.machine import load
from suite.peers import CONTENDERS, Setup, run_checked, tool_of
from suite.processes import ChildResult, write_input


@dataclass(slots=True)
class Comparison:
    events: dict[str, int]
    rounds: list[dict[str, ChildResult]] = field(default_factory=list)
    startup: list[dict[str, ChildResult]] = field(default_factory=list)

    def results(self, name: str) -> list[ChildResult]:
        """The runs of ``name`` that count: exit code 0, one ok result per event."""
        return [r[name] for r in self.rounds if r[name].problem is None]

    def failed(self) -> list[ChildResult]:
        return [r for rnd in self.rounds for r in rnd.values() if r.problem is not None]

    def median_rate(self, name: str) -> float:
        return statistics.median(r.rate for r in self.results(name))

    def median_startup(self, name: str) -> float:
        return statistics.median(s[name].wall_s for s in self.startup if s[name].problem is None)

    def steady_rate(self, name: str) -> float:
        """Events/s with the median 1-event run's wall time (start-up, imports) taken out."""
        startup = self.median_startup(name)
        rates = [
            (r.events - 1) / (r.wall_s - startup) for r in self.results(name) if r.wall_s > startup
        ]
        return statistics.median(rates) if rates else 0.0

    def median_cpu(self, name: str) -> float:
        return statistics.median(r.cpu_us_per_event for r in self.results(name))

    def round_ratios(self, a: str, b: str) -> list[float]:
        return [
            r[a].rate / r[b].rate
            for r in self.rounds
            if r[a].problem is None and r[b].problem is None and r[b].rate > 0
        ]


def compare(setup: Setup, rounds: int, events: int, fewer: dict[str, int]) -> Comparison:
    """``fewer``: events per run of the slow tools (``sdk``, ``httpx``), a prefix of the input."""
    counts = {name: min(events, fewer.get(tool_of(name), events)) for name in CONTENDERS}
    inputs: dict[int, Path] = {}
    for n in sorted({*counts.values(), 1}):
        inputs[n] = setup.tmp / f"input-{n}.jsonl"
        write_input(inputs[n], n)  # each is a prefix of the largest: the same events
    comparison = Comparison(events=counts)
    for rnd in range(rounds):
        # The order rotates, so no contender always runs first (or after the same one).
        k = rnd % len(CONTENDERS)
        order = CONTENDERS[k:] + CONTENDERS[:k]
        say(f"round {rnd + 1}/{rounds} ({', '.join(order)}), load {load()}")
        startup: dict[str, ChildResult] = {}
        for name in order:
            startup[name] = run_checked(setup, name, inputs[1], 1, label=f"start{rnd}")
        comparison.startup.append(startup)
        results: dict[str, ChildResult] = {}
        for name in order:
            r = run_checked(setup, name, inputs[counts[name]], counts[name], label=f"r{rnd}")
            results[name] = r
            say(
                f"  {name:<18} {r.events:>7} events {r.wall_s:7.2f} s {r.rate:8.0f} events/s  "
                f"CPU {r.cpu_us_per_event:5.0f} us/event  peak RSS {r.maxrss_mib:5.1f} MiB  "
                f"nginx busy {pct(r.nginx_busy)}"
            )
        comparison.rounds.append(results)
    for path in inputs.values():
        path.unlink()
    for name in CONTENDERS:
        if not comparison.results(name) or not any(
            s[name].problem is None for s in comparison.startup
        ):
            raise RuntimeError(f"every run of {name} failed: see the warnings above")
    return comparison
