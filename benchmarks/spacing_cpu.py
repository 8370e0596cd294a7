"""What strict spacing costs: CPU and pace of the gate alone at a rate, bucket against strict.

64 workers take slots from one :class:`RateGate` for a few seconds, once with today's small
bucket (the baseline, measured in the same run) and once with strict spacing. Printed per
mode: achieved rate as a share of the set one, the smallest gap between two slots as a share
of 1/rate, and CPU seconds per wall second (one core = 100%).

    python benchmarks/spacing_cpu.py [--rate 500] [--seconds 10] [--uvloop]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time

import anyio

from dispatcher.sending.gate import RateGate

WORKERS = 64


async def measure(rate: float, seconds: float, *, strict: bool) -> tuple[float, float, float]:
    gate = RateGate(rate, strict=strict)
    times: list[float] = []

    async def worker() -> None:
        while True:
            await gate.acquire()
            times.append(time.perf_counter())

    async with anyio.create_task_group() as tg:
        for _ in range(WORKERS):
            tg.start_soon(worker)
        await anyio.sleep(0.2)  # past the start-up
        del times[:]
        cpu, wall = time.process_time(), time.perf_counter()
        await anyio.sleep(seconds)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        tg.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return len(times) / wall / rate, min(gaps) * rate, cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    backend = {"use_uvloop": args.uvloop}
    print(f"rate {args.rate:g}/s, {args.seconds:g} s, {WORKERS} workers, uvloop={args.uvloop}")
    print("| mode | achieved / set | smallest gap x rate | CPU |")
    print("| --- | --- | --- | --- |")
    for strict in (False, True):
        share, gap, cpu = anyio.run(
            functools.partial(measure, args.rate, args.seconds, strict=strict),
            backend="asyncio",
            backend_options=backend,
        )
        mode = "strict" if strict else "bucket"
        print(f"| {mode} | {share:.1%} | {gap:.3f} | {cpu:.1%} |")


if __name__ == "__main__":
    main()
