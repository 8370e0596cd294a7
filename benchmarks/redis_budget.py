"""The Redis coordination (``--redis``, ``--job``): throughput, rate accuracy, Redis cost.

    .venv/bin/python benchmarks/redis_budget.py            # or: make bench-redis

Starts its own redis-server on a free port and an emulator (no limit) in this process,
then runs real ``dispatcher send`` processes:

1. 1, 2 and 4 processes sharing one budget (``--rate R``, each asking for all of it), one
   job (``--job``): aggregate throughput, and accuracy = achieved / R, where achieved is
   measured at the emulator while every process runs. The baseline of the same run is one
   process without Redis at the same rate.
2. Redis round trips per event: commands counted with ``INFO commandstats`` over the
   4-process job, divided by the records.
3. Redis memory for a 1M-record job: ``used_memory`` before and after a job, per shard and
   per record key; the 1M figure is computed from those (stated as such).
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


async def run_processes(
    count: int,
    source: Path,
    folder: Path,
    base_url: str,
    redis_url: str | None,
    rate: str,
    job: str | None,
) -> float:
    env = {**os.environ, "CLOUDFLARE_API_TOKEN": TOKEN, "DISPATCHER_JOB_SHARD_LINES": "1000"}
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
    rows: list[tuple[str, int, float, float, float]] = []
    try:
        async with Emulator(EmulatorConfig(limit=None, keep_requests=True)) as emu:
            source = write_input(folder / "in.jsonl", records)
            emu.log.clear()
            wall = await run_processes(1, source, folder, emu.base_url, None, f"{rate}/s", None)
            got = achieved([r.t for r in emu.log.requests])
            rows.append(("1 process, no Redis (baseline)", 1, records / wall, got, got / rate))
            trips = 0.0
            for n in (1, 2, 4):
                server.command("flushall")
                server.command("config", "resetstat")
                emu.log.clear()
                job = f"bench{n}"
                wall = await run_processes(
                    n, source, folder, emu.base_url, server.url, f"{rate}/s", job
                )
                got = achieved([r.t for r in emu.log.requests])
                calls = commandstats(server)
                trips = sum(v for k, v in calls.items() if k not in {"info", "config|resetstat"})
                rows.append((f"{n} process(es), --redis --job", n, records / wall, got, got / rate))
                if n == 4:
                    # INFO commandstats also counts the commands scripts run inside Redis;
                    # the round trips are the commands clients send (a pipeline's
                    # commands counted one by one, so this is an upper bound).
                    sent = sum(calls.get(k, 0) for k in CLIENT_COMMANDS)
                    per_event = sent / records
                    in_scripts = trips - sent
                    detail = ", ".join(f"{k} {v / records:.2f}" for k, v in sorted(calls.items()))
            # Memory: a job of memory_records records, measured, then scaled.
            server.command("flushall")
            big = write_input(folder / "big.jsonl", memory_records, prefix="m")
            before = used_memory(server)
            await run_processes(1, big, folder, emu.base_url, server.url, "unlimited", "mem")
            after = used_memory(server)
    finally:
        server.stop()
    print(f"## Redis coordination ({records} records at --rate {rate:g}/s, 2-core box)\n")
    print("| run | processes | wall throughput (records/s) | achieved rate (req/s) | accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for name, n, thr, got, acc in rows:
        print(f"| {name} | {n} | {thr:.1f} | {got:.1f} | {acc:.1%} |")
    print(
        f"\nRedis round trips per event (4 processes, --job): {per_event:.2f} "
        f"(commands run inside scripts, not round trips: {in_scripts / records:.2f}/event; "
        f"all: {detail})"
    )
    per_record = (after - before) / memory_records
    shards = -(-memory_records // 2000)
    print(
        f"\nRedis memory: {after - before:,} bytes for a {memory_records:,}-record job "
        f"({shards} shards of 2000): {per_record:.1f} bytes per record; a 1M-record job "
        f"computed from it: {per_record * 1_000_000 / 2**20:.1f} MiB (the final-envelope "
        "hash, one field per record key, dominates; shards are ~500 entries)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--memory-records", type=int, default=50_000)
    args = parser.parse_args()
    anyio.run(main, args.rate, args.records, args.memory_records)
