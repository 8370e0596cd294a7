"""`dispatcher status`: the whole of a shared job, read from Redis.

Shows progress (shards and records final), the rate records become final, the account's
shared budget (permits, pauses, a pause running now) and the processes working on it.

Exit codes: 0 shown, 2 bad flags or no such job, 3 Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Final

import orjson

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3
LIVE_WITHIN_S: Final = 5.0  # a worker whose last heartbeat is older is shown as gone


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        dest="redis_url",
        metavar="URL",
        default=None,
        help="the Redis the job's processes use (env DISPATCHER_REDIS_URL)",
    )
    parser.add_argument(
        "--job", default=None, metavar="NAME", help="the job's name (env DISPATCHER_JOB)"
    )
    parser.add_argument(
        "--sample",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long to watch the final count to measure the rate (default: 1)",
    )


def _int(value: object) -> int:
    return int(str(value)) if value else 0


def run(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get("DISPATCHER_REDIS_URL", "").strip() or None
    name = args.job or os.environ.get("DISPATCHER_JOB", "").strip() or None
    if url is None or name is None:
        missing = "--redis URL" if url is None else "--job NAME"
        print(f"dispatcher status: error: {missing} is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        import redis
        from redis.exceptions import RedisError

        from dispatcher.coordination.budget import BudgetKeys
        from dispatcher.coordination.connection import redact
        from dispatcher.coordination.job import JobKeys
    except ImportError:
        print(
            "dispatcher status: error: needs redis-py: "
            "pip install 'cf-workflows-dispatcher[redis]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    keys = JobKeys(name)
    from dispatcher.coordination.urls import check_redis_url, scrub

    problem = check_redis_url(url)
    if problem is not None:
        print(f"dispatcher status: error: --redis: {redact(url)}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        client: Any = redis.Redis.from_url(
            url, socket_timeout=3, socket_connect_timeout=3, decode_responses=True
        )
        meta = client.hgetall(keys.meta)
        if not meta:
            print(f"dispatcher status: error: no job {name!r} in {redact(url)}", file=sys.stderr)
            return EXIT_USAGE
        first = _int(client.hget(keys.meta, "final"))
        t0 = time.monotonic()
        time.sleep(max(0.0, args.sample))
        meta = client.hgetall(keys.meta)
        elapsed = time.monotonic() - t0
        workers = client.hgetall(keys.workers)
        pending = client.xpending(keys.shards, "workers")
        account = str(meta.get("account", ""))
        budget = client.hgetall(BudgetKeys(account).budget) if account else {}
        server_now = client.time()
    except (RedisError, OSError) as exc:
        print(
            f"dispatcher status: error: cannot reach {redact(url)}: {type(exc).__name__}",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except (ValueError, TypeError) as exc:  # an option of the URL redis-py cannot use
        print(
            f"dispatcher status: error: --redis: {redact(url)}: invalid URL: "
            f"{scrub(str(exc), url)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    final = _int(meta.get("final"))
    records = meta.get("records")
    shards = meta.get("shards")
    acked = _int(meta.get("acked"))
    held = int(pending.get("pending", 0)) if isinstance(pending, dict) else 0
    out = sys.stdout
    print(f"job {name} on {redact(url)}", file=out)
    if shards is None:
        print(f"  shards    {acked} done, {held} held; still being cut from the input", file=out)
        print(f"  records   {final:,} final", file=out)
    else:
        total = int(records or 0)
        share = f" ({final / total:.1%})" if total else ""
        state = "done" if acked >= int(shards) else "running"
        print(f"  state     {state}", file=out)
        print(f"  shards    {acked} of {int(shards)} done, {held} held by workers", file=out)
        print(f"  records   {final:,} of {total:,} final{share}", file=out)
    rate = (final - first) / elapsed if elapsed > 0 else 0.0
    print(f"  rate      {rate:,.1f} records/s final (over {elapsed:.1f} s)", file=out)
    if account:
        now_us = server_now[0] * 1_000_000 + server_now[1]
        pause_left = (_int(budget.get("pause")) - now_us) / 1e6
        pauses = _int(budget.get("pauses"))
        paused = _int(budget.get("paused_us")) / 1e6
        line = (
            f"  budget    account {account}: {_int(budget.get('permits')):,} permits, "
            f"{pauses} pause(s), {paused:.1f} s paused"
        )
        if pause_left > 0:
            line += f"; PAUSED for {pause_left:.1f} s more"
        print(line, file=out)
    live, gone = [], 0
    wall = time.time()
    for worker, raw in sorted(workers.items()):
        beat = orjson.loads(raw)
        if wall - float(beat.get("seen", 0)) > LIVE_WITHIN_S:
            gone += 1
            continue
        live.append(
            f"    {worker}: {beat.get('records', 0):,} records, "
            f"{beat.get('shards', 0)} shard(s) held, {beat.get('in_flight', 0)} in flight, "
            f"{beat.get('rate_limited', 0)} 429s"
            + (f", {beat['adopted']} adopted from dead workers" if beat.get("adopted") else "")
        )
    print(f"  workers   {len(live)} live, {gone} gone", file=out)
    for line in live:
        print(line, file=out)
    return EXIT_OK
