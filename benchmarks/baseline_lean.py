"""The lean baseline: the fastest honest aiohttp client we could write by hand.

    python benchmarks/baseline_lean.py INPUT.jsonl SUMMARY.json \
        --base-url http://127.0.0.1:8080/client/v4 --account-id acc --workflow wf \
        --concurrency 64 --loop uvloop

The token comes from CLOUDFLARE_API_TOKEN, like the other contenders. What a user who cares
about speed writes: the input read as bytes in one go, each line parsed with ``orjson``
and its request (URL, body bytes) built in memory before the first send; one
``ClientSession``; a fixed pool of workers taking the next request from one shared
iterator (no queue); per answer, the body read and checked with ``orjson.loads``
(HTTP 200 and ``"success": true``). It skips what the dispatcher does: no validation of
the records, no per-event result, nothing durable, no retries, no rate limit. Its only
output is one summary line at the end, ``{"events": N, "ok": K}``, so the benchmark can
check that every event was answered with success.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator

import aiohttp
import orjson
from suite.baseline import Request, load_requests, parse_args, run_and_report


async def worker(
    todo: Iterator[Request], session: aiohttp.ClientSession, headers: dict[str, str]
) -> int:
    ok = 0
    loads = orjson.loads
    for url, body in todo:  # one iterator shared by every worker: each takes the next
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status == 200 and loads(raw).get("success") is True:
                    ok += 1
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
            pass  # counted as not ok
    return ok


async def send_all(args: argparse.Namespace, requests: list[Request]) -> int:
    token = os.environ["CLOUDFLARE_API_TOKEN"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    todo = iter(requests)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        counts = await asyncio.gather(
            *(worker(todo, session, headers) for _ in range(args.concurrency))
        )
    return sum(counts)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    requests = load_requests(args)
    return run_and_report(args, len(requests), send_all(args, requests))


if __name__ == "__main__":
    sys.exit(main())
