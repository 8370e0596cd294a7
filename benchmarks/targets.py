"""Events per second through each target, in one run: the emulator (REST), wrangler dev
(REST) and the relay in wrangler dev at batch sizes 1, 10 and 100.

    .venv/bin/python benchmarks/targets.py [--events N] [--rounds R]   (or: make bench-targets)

Every scenario sends N events with the dispatcher's own engine (``dispatch()``, the
same code as ``dispatcher send``), no rate limit, and counts only confirmed envelopes.
The emulator runs in this process (on the client's loop, so it competes with the client
for one core). wrangler dev runs two Workers as a user runs them: the relay with
relay/wrangler.jsonc as shipped, and tests/wrangler_project's Workflow, bound by
``script_name`` (tests/wrangler_dev.py). Before each timed scenario its instances are
created and waited for until every one has reached its ``waitForEvent``, untimed: an
instance still starting would take workerd's CPU from the events being timed.

Besides events/s, each scenario reports the CPU time per event of workerd (every process
of wrangler's process group, from /proc) and of this process, over the timed window: on
a shared machine the CPU per event is steadier than the rate, and 1000 / (workerd ms per
event) is the rate one free core would give. Scenarios alternate over the rounds, so a
machine busy with something else slows them alike; the median of the rounds is reported,
with its ratio to the emulator's, and the load average before and after. Needs Node 22
and wrangler (.ci/setup.d/20-node-wrangler.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from wrangler_dev import WORKFLOW, WranglerDev, missing, wrangler_dev

from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.model import Delivery, Event
from dispatcher.run.runner import dispatch
from dispatcher.run.settings import Credentials, SendSettings

SECRET = "bench-relay-secret"
_TICK = os.sysconf("SC_CLK_TCK")


def events(prefix: str, n: int) -> list[Event]:
    return [
        Event(
            key=f"{prefix}-{i}",
            source="bench",
            line=i + 1,
            workflow=WORKFLOW,
            instance_id=f"{prefix}-{i}",
            event_type="go",
            body=b'{"n":%d}' % i,
        )
        for i in range(n)
    ]


def group_cpu(pgid: int) -> float:
    """CPU seconds (user + system) of the live processes in process group ``pgid``."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # pgrp; then utime, stime at 11, 12
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class Run:
    rate: float  # confirmed events per second
    server_ms: float | None  # workerd CPU ms per event (None: the in-process emulator)
    client_ms: float  # this process's CPU ms per event (the emulator's included)


async def timed(batch: list[Event], settings: SendSettings, pgid: int | None) -> Run:
    server0 = group_cpu(pgid) if pgid is not None else 0.0
    client0 = own_cpu()
    started = time.perf_counter()
    confirmed = 0
    async for envelope in dispatch(batch, settings):
        confirmed += envelope.delivery == Delivery.CONFIRMED
    elapsed = time.perf_counter() - started
    client = own_cpu() - client0
    server = group_cpu(pgid) - server0 if pgid is not None else None
    if confirmed != len(batch):
        raise RuntimeError(f"only {confirmed} of {len(batch)} confirmed")
    n = len(batch)
    return Run(
        rate=n / elapsed,
        server_ms=None if server is None else 1000 * server / n,
        client_ms=1000 * client / n,
    )


def _ready(wd: WranglerDev, ids: list[str]) -> None:
    wd.create(ids)
    found = wd.wait_waiting(ids, timeout=120)
    late = [i for i, s in found.items() if not s.get("steps")]
    if late:
        raise RuntimeError(f"{len(late)} instances never reached their waitForEvent")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if (reason := missing()) is not None:
        print(f"targets: {reason}", file=sys.stderr)
        return 2
    n = args.events
    results: dict[str, list[Run]] = {}
    load_before = _load()
    began = time.perf_counter()
    with wrangler_dev(SECRET) as wd:
        async with Emulator(EmulatorConfig(limit=None)) as emu:
            base = SendSettings(
                inputs=(),
                rate="unlimited",
                results="-",
                quiet=True,
                target="wrangler-dev",
                base_url=wd.base_url,
                concurrency=16,
            )
            scenarios: list[tuple[str, SendSettings, bool]] = [
                (
                    "emulator (REST, in-process), `--concurrency 16`",
                    replace(
                        base,
                        target="api",
                        base_url=emu.base_url,
                        account_id="bench",
                        credentials=Credentials(token="bench-token"),
                    ),
                    False,
                ),
                ("wrangler dev (REST), `--concurrency 16`", base, True),
            ]
            for size in (1, 10, 100):
                concurrency = max(16, 2 * size)
                relay = replace(
                    base,
                    target="relay",
                    relay_secret=SECRET,
                    batch_size=size,
                    concurrency=concurrency,
                )
                name = f"relay in wrangler dev, batch {size}, `--concurrency {concurrency}`"
                scenarios.append((name, relay, True))
            for r in range(args.rounds):
                for i, (name, settings, in_wrangler) in enumerate(scenarios):
                    batch = events(f"r{r}s{i}", n)
                    if in_wrangler:
                        await asyncio.to_thread(_ready, wd, [e.instance_id for e in batch])
                    run = await timed(batch, settings, wd.pgid if in_wrangler else None)
                    results.setdefault(name, []).append(run)
                    print(
                        f"round {r + 1}: {name}: {run.rate:.0f} events/s, workerd "
                        f"{run.server_ms or 0:.1f} ms/event (load {_load()})",
                        file=sys.stderr,
                    )
    wall = time.perf_counter() - began
    baseline = statistics.median(run.rate for run in results[scenarios[0][0]])
    print(
        f"\n{n} events per scenario, median of {args.rounds} rounds; load average (1, 5, 15 "
        f"min) {load_before} before, {_load()} after; {wall:.0f} s in all\n"
    )
    print("| target | events/s | vs emulator | workerd CPU ms/event | dispatcher CPU ms/event |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        rate = statistics.median(run.rate for run in runs)
        server = [run.server_ms for run in runs if run.server_ms is not None]
        server_text = f"{statistics.median(server):.1f}" if server else "-"
        client = statistics.median(run.client_ms for run in runs)
        print(f"| {name} | {rate:.0f} | {rate / baseline:.2f}x | {server_text} | {client:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
