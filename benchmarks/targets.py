"""Events per second through each target, in one run: the emulator (REST), wrangler dev
(REST) and the relay in wrangler dev at batch sizes 1, 10 and 100.

    .venv/bin/python benchmarks/targets.py [--events N] [--rounds R]   (or: make bench-targets)

Every scenario sends N events with the dispatcher's own engine (``dispatch()``, the
same code as ``dispatcher send``), no rate limit, and counts only confirmed envelopes.
The emulator runs in this process (on the client's loop, so it competes with the client
for one core); wrangler dev is one workerd process running tests/wrangler_project, whose
instances are created before each timed scenario and not timed. Scenarios alternate
over the rounds, so a machine busy with something else slows them alike; the median of
the rounds is reported, with its ratio to the emulator's. Needs Node 22 and wrangler
(.ci/setup.d/20-node-wrangler.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from wrangler_dev import WORKFLOW, WranglerDev, missing, wrangler_dev

from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.model import Delivery, Event
from dispatcher.run.runner import dispatch
from dispatcher.run.settings import Credentials, SendSettings

SECRET = "bench-relay-secret"


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


async def timed(batch: list[Event], settings: SendSettings) -> float:
    started = time.perf_counter()
    confirmed = 0
    async for envelope in dispatch(batch, settings):
        confirmed += envelope.delivery == Delivery.CONFIRMED
    elapsed = time.perf_counter() - started
    if confirmed != len(batch):
        raise RuntimeError(f"only {confirmed} of {len(batch)} confirmed")
    return len(batch) / elapsed


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if (reason := missing()) is not None:
        print(f"targets: {reason}", file=sys.stderr)
        return 2
    n = args.events
    results: dict[str, list[float]] = {}
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
                    "emulator (REST)",
                    replace(
                        base,
                        target="api",
                        base_url=emu.base_url,
                        account_id="bench",
                        credentials=Credentials(token="bench"),
                    ),
                    False,
                ),
                ("wrangler dev (REST)", base, True),
            ]
            for size in (1, 10, 100):
                relay = replace(
                    base,
                    target="relay",
                    relay_secret=SECRET,
                    batch_size=size,
                    concurrency=max(16, 2 * size),
                )
                scenarios.append((f"relay in wrangler dev, batch {size}", relay, True))
            for r in range(args.rounds):
                for name, settings, needs_instances in scenarios:
                    prefix = f"b{r}-{len(results.get(name, []))}-{abs(hash(name)) % 10**6}"
                    batch = events(prefix, n)
                    if needs_instances:
                        await asyncio.to_thread(_create, wd, [e.instance_id for e in batch])
                    rate = await timed(batch, settings)
                    results.setdefault(name, []).append(rate)
                    print(f"round {r + 1}: {name}: {rate:.0f} events/s", file=sys.stderr)
    baseline = statistics.median(results["emulator (REST)"])
    print(f"\n{n} events per scenario, median of {args.rounds} rounds\n")
    print("| target | events/s | vs emulator |")
    print("| --- | ---: | ---: |")
    for name, rates in results.items():
        med = statistics.median(rates)
        print(f"| {name} | {med:.0f} | {med / baseline:.2f}x |")
    return 0


def _create(wd: WranglerDev, ids: list[str]) -> None:
    wd.create(ids)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
