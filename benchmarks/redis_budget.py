"""The Redis coordination (``--redis``, ``--job``): throughput, rate accuracy, Redis cost.

    .venv/bin/python benchmarks/redis_budget.py            # or: make bench-redis

Starts its own redis-server on a free port and an emulator (no limit) in this process,
then runs real ``dispatcher send`` processes:

1. 1, 2 and 4 processes sharing one budget (``--rate R``, each asking for all of it), one
   job (``--job``): aggregate throughput, and accuracy = achieved / R, where achieved is
   measured at the emulator while every process runs. The baseline of the same run is one
   process without Redis at the same rate.
2. Redis round trips per event: each process counts its own (one command, script call or
   pipeline each, ``Link.trips``) and leaves the count in its last heartbeat; the sum over
   the job's processes, divided by the records. ``INFO commandstats`` is shown beside it:
   it counts the commands clients sent one by one (a pipeline's too), so it is higher.
3. Redis memory for a 1M-record job: ``used_memory`` before and after a job of
   ``--memory-records`` records (measured), scaled to 1M (computed, stated as such).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from redis_server import RedisServer

from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.run.shared import SHARD_RECORDS

TOKEN = "bench-token"
# Commands the clients send (everything else in commandstats runs inside our scripts).
CLIENT_COMMANDS = (
    "evalsha",
    "eval",
    "script|load",
    "xreadgroup",
    "xautoclaim",
    "xclaim",
    "hexists",
    "hgetall",
    "hello",
    "subscribe",
    "set",
    "expire",
    "xgroup|create",
    "client|setinfo",
)


def write_input(path: Path, count: int, prefix: str = "b") -> Path:
    lines = (
        orjson.dumps(
            {"workflow": "wf", "instance_id": f"{prefix}{i}", "event_type": "go", "body": {"n": i}}
        )
        for i in range(count)
    )
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def commandstats(server: RedisServer) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in server.command("info", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            calls = int(rest.split(",")[0].split("=")[1])
            out[name.removeprefix("cmdstat_")] = calls
    return out


def used_memory(server: RedisServer) -> int:
    for line in server.command("info", "memory").decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    raise RuntimeError("no used_memory")


SHARD_LINES = 250  # 16 shards of the default 4000 records: work for 4 processes to share


def trips_of(server: RedisServer, job: str) -> int:
    """The round trips every process of ``job`` counted, from their last heartbeats."""
    lines = server.command("hgetall", f"dispatcher:{{job:{job}}}:workers").splitlines()
    return sum(int(orjson.loads(beat).get("trips", 0)) for beat in lines[1::2])


async def run_processes(
    count: int,
    source: Path,
    folder: Path,
    base_url: str,
    redis_url: str | None,
    rate: str,
    job: str | None,
    shard_lines: int = SHARD_LINES,
) -> float:
    env = {
        **os.environ,
        "CLOUDFLARE_API_TOKEN": TOKEN,
        "DISPATCHER_JOB_SHARD_LINES": str(shard_lines),
    }
    t0 = time.monotonic()

    async def one(i: int) -> None:
        args = [
            sys.executable,
            *("-m", "dispatcher", "send", str(source), "--account-id", "bench"),
            *("--base-url", base_url, "--rate", rate, "--concurrency", "16"),
            *("--results", str(folder / f"out-{job}-{i}.jsonl"), "--overwrite", "--quiet"),
        ]
        if redis_url is not None:
            args += ["--redis", redis_url]
        if job is not None:
            args += ["--job", job]
        result = await anyio.run_process(args, env=env, check=False)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.decode()[-1000:])

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return time.monotonic() - t0


def aggregate(times: list[float]) -> float:
    """Records per second from the job's first request to its last (no start-up)."""
    return (len(times) - 1) / (max(times) - min(times))


def achieved(times: list[float]) -> float:
    times = sorted(times)
    # The middle 80%: start-up and the last stragglers are not the steady rate.
    lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
    inside = [t for t in times if lo <= t <= hi]
    return (len(inside) - 1) / (hi - lo)


async def main(rate: float, records: int, memory_records: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    server = RedisServer(folder)
    server.start()
    rows: list[tuple[str, int, float, float, float, float, str, str]] = []
    loads: list[str] = []
    try:
        async with Emulator(EmulatorConfig(limit=None, keep_requests=True)) as emu:
            source = write_input(folder / "in.jsonl", records)
            emu.log.clear()
            loads.append(f"before: {os.getloadavg()[0]:.1f}")
            wall = await run_processes(1, source, folder, emu.base_url, None, f"{rate}/s", None)
            times = [r.t for r in emu.log.requests]
            got = achieved(times)
            rows.append(
                (
                    "no Redis (baseline)",
                    1,
                    records / wall,
                    aggregate(times),
                    got,
                    got / rate,
                    "-",
                    "-",
                )
            )
            for n in (1, 2, 4):
                server.command("flushall")
                server.command("config", "resetstat")
                emu.log.clear()
                job = f"bench{n}"
                wall = await run_processes(
                    n, source, folder, emu.base_url, server.url, f"{rate}/s", job
                )
                times = [r.t for r in emu.log.requests]
                got = achieved(times)
                calls = commandstats(server)
                sent = sum(calls.get(k, 0) for k in CLIENT_COMMANDS)
                trips = trips_of(server, job)
                rows.append(
                    (
                        "--redis --job",
                        n,
                        records / wall,
                        aggregate(times),
                        got,
                        got / rate,
                        f"{trips / records:.2f}",
                        f"{sent / records:.2f}",
                    )
                )
                loads.append(f"after {n}: {os.getloadavg()[0]:.1f}")
            # Memory: a job of memory_records records, measured, then scaled.
            server.command("flushall")
            big = write_input(folder / "big.jsonl", memory_records, prefix="m")
            before = used_memory(server)
            await run_processes(
                1, big, folder, emu.base_url, server.url, "unlimited", "mem", SHARD_RECORDS
            )
            after = used_memory(server)
            final_fields = int(server.command("hlen", "dispatcher:{job:mem}:final"))
            shards = int(server.command("xlen", "dispatcher:{job:mem}:shards"))
    finally:
        server.stop()
    print(f"## Redis coordination ({records} records at --rate {rate:g}/s, 2-core box)\n")
    print(
        "| run | processes | wall throughput (records/s, with start-up) "
        "| aggregate (records/s, first to last request) | achieved rate (req/s, middle 80%) "
        "| accuracy | round trips/event | commands/event |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, n, thr, agg, got, acc, trips_s, sent_s in rows:
        print(
            f"| {name} | {n} | {thr:.1f} | {agg:.1f} ({agg / rate:.0%}) | {got:.1f} | {acc:.1%} "
            f"| {trips_s} | {sent_s} |"
        )
    print(f"\nLoad average (1 min): {'; '.join(loads)}")
    per_record = (after - before) / memory_records
    print(
        f"\nRedis memory: {after - before:,} bytes for a {memory_records:,}-record job "
        f"(measured: {shards} shards of {SHARD_RECORDS} lines, {final_fields:,} final "
        f"claims): {per_record:.1f} bytes per record; a 1M-record job computed from it: "
        f"{per_record * 1_000_000 / 2**20:.1f} MiB (the final-claim hash, one field per "
        "record key, dominates)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--memory-records", type=int, default=20_000)
    args = parser.parse_args()
    anyio.run(main, args.rate, args.records, args.memory_records)
