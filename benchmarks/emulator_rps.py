"""Requests per second the emulator answers, against a bare aiohttp server as the baseline.

    .venv/bin/python benchmarks/emulator_rps.py               # both servers in subprocesses
    .venv/bin/python benchmarks/emulator_rps.py --in-process  # emulator on the client's loop

Both servers listen on 127.0.0.1 and the same client (N keep-alive connections, each
sending POSTs back to back) measures them in alternating rounds of the same run, so a
machine busy with something else slows both alike; the medians and their ratio are what
to compare. Every round is bounded in requests and in seconds. On Linux it also reports
the server process's CPU time per request, which depends less on the client than req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from dispatcher.emulator import Emulator, EmulatorConfig

BODY = b'{"order":42,"amount_cents":1999,"currency":"EUR"}'
HEADERS = {"Authorization": "Bearer bench-token", "Content-Type": "application/json"}
URL_LINE = re.compile(r"(http://127\.0\.0\.1:\d+/client/v4)")
START_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    server_cpu: float | None  # seconds of server CPU over the measured requests

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request(self) -> float | None:
        return self.server_cpu / self.requests if self.server_cpu and self.requests else None


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    base_url: str
    pid: int | None  # the server's process, for its CPU time; None when it is this one


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), else None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def load(
    session: aiohttp.ClientSession, target: Target, *, connections: int, count: int, seconds: float
) -> Result:
    """``connections`` workers each send POSTs back to back until ``count`` or ``seconds``."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    cpu_before = cpu_seconds(target.pid)
    started = time.perf_counter()
    deadline = started + seconds

    async def worker(w: int) -> None:
        nonlocal errors, issued
        n = 0
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            n += 1
            url = f"{target.base_url}/accounts/acc/workflows/bench/instances/w{w}-{n}/events/ev"
            t0 = time.perf_counter()
            async with session.post(url, data=BODY, headers=HEADERS) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker(w) for w in range(connections)))
    elapsed = time.perf_counter() - started
    cpu_after = cpu_seconds(target.pid)
    return Result(
        requests=len(latencies),
        errors=errors,
        seconds=elapsed,
        latencies=latencies,
        server_cpu=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
    )


@contextlib.asynccontextmanager
async def subprocess_server(name: str, *argv: str) -> AsyncIterator[Target]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)).decode()
            if not line:
                raise RuntimeError(f"{name} server exited before printing its URL")
            if match := URL_LINE.search(line):
                break
        yield Target(name, match[1], proc.pid)
    finally:
        proc.terminate()
        await proc.communicate()


@contextlib.asynccontextmanager
async def in_process_emulator() -> AsyncIterator[Target]:
    async with Emulator(EmulatorConfig(limit=None, keep_requests=False)) as emu:
        yield Target("emulator", emu.base_url, None)


async def serve_baseline() -> None:
    """A bare aiohttp server: one route, a constant body, nothing else."""
    body = b'{"success":true,"errors":[],"messages":[],"result":{"instanceId":"x","timestamp":"t"}}'

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"baseline on http://127.0.0.1:{runner.addresses[0][1]}/client/v4", flush=True)
    await asyncio.Event().wait()


def summary(name: str, results: list[Result]) -> str:
    latencies = sorted(t for r in results for t in r.latencies)
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    cpus = [c for r in results if (c := r.cpu_per_request) is not None]
    cpu = f"  server CPU {statistics.median(cpus) * 1e6:4.0f} us/request" if cpus else ""
    return (
        f"{name:<9} median {statistics.median(r.rps for r in results):>7,.0f} req/s "
        f"(rounds: {', '.join(f'{r.rps:,.0f}' for r in results)})  "
        f"p50 {p50:.1f} ms  p99 {p99:.1f} ms  errors {sum(r.errors for r in results)}{cpu}"
    )


async def main(args: argparse.Namespace) -> None:
    emulate = ("-m", "dispatcher", "emulate", "--port", "0", "--limit", "off")
    baseline = (str(Path(__file__)), "--serve-baseline")
    async with contextlib.AsyncExitStack() as stack:
        targets = [
            await stack.enter_async_context(
                in_process_emulator()
                if args.in_process
                else subprocess_server("emulator", *emulate)
            )
        ]
        if not args.no_baseline:
            targets.append(
                await stack.enter_async_context(subprocess_server("baseline", *baseline))
            )
        connector = aiohttp.TCPConnector(limit=args.connections)
        session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))
        results: dict[str, list[Result]] = {t.name: [] for t in targets}
        for round_ in range(args.rounds + 1):
            for target in targets:
                result = await load(
                    session,
                    target,
                    connections=args.connections,
                    count=args.requests if round_ else args.connections * 20,
                    seconds=args.seconds,
                )
                if round_:  # round 0 only opens the connections and warms both servers up
                    results[target.name].append(result)

    where = "in-process" if args.in_process else "separate process"
    print(
        f"{args.connections} connections, {args.rounds} alternating rounds of at most "
        f"{args.requests} requests / {args.seconds:g} s, 127.0.0.1, {where} emulator"
    )
    for name, rounds in results.items():
        print(summary(name, rounds))
    if "baseline" in results:
        ours, base = results["emulator"], results["baseline"]
        ratio = statistics.median(r.rps for r in ours) / statistics.median(r.rps for r in base)
        line = f"ratio     emulator / bare aiohttp: req/s {ratio:.2f}"
        cpu_ours = [c for r in ours if (c := r.cpu_per_request) is not None]
        cpu_base = [c for r in base if (c := r.cpu_per_request) is not None]
        if cpu_ours and cpu_base:
            cost = statistics.median(cpu_ours) / statistics.median(cpu_base)
            line += f", server CPU per request {cost:.2f}"
        print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (32)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per server (3)")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per round, at most")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per round, at most")
    parser.add_argument("--in-process", action="store_true", help="emulator on the client's loop")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare aiohttp server")
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    asyncio.run(serve_baseline() if arguments.serve_baseline else main(arguments))
