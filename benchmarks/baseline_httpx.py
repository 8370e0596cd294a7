"""The httpx baseline: ``httpx.AsyncClient``, written as leanly as the aiohttp lean one.

    python benchmarks/baseline_httpx.py INPUT.jsonl SUMMARY.json \
        --base-url http://127.0.0.1:8080/client/v4 --account-id acc --workflow wf \
        --concurrency 64 --loop uvloop

Many users' first choice of async HTTP client. Everything but the client is
``baseline_lean.py``'s: the input read as bytes, requests built in memory with ``orjson``,
a fixed pool of workers on one shared iterator, ``orjson.loads`` of every answer (HTTP 200
and ``"success": true``), one summary line at the end. One ``AsyncClient`` whose pool holds
as many keep-alive connections as there are workers; HTTP/1.1, no retries. It skips
validation, per-event results and durability, like the lean baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterator

import httpx
import orjson
from suite.baseline import Request, load_requests, parse_args, run_and_report


async def worker(todo: Iterator[Request], client: httpx.AsyncClient) -> int:
    ok = 0
    loads = orjson.loads
    for url, body in todo:  # one iterator shared by every worker: each takes the next
        try:
            resp = await client.post(url, content=body)
            if resp.status_code == 200 and loads(resp.content).get("success") is True:
                ok += 1
        except (httpx.HTTPError, orjson.JSONDecodeError):
            pass  # counted as not ok
    return ok


async def send_all(args: argparse.Namespace, requests: list[Request]) -> int:
    token = os.environ["CLOUDFLARE_API_TOKEN"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    todo = iter(requests)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30.0) as client:
        counts = await asyncio.gather(*(worker(todo, client) for _ in range(args.concurrency)))
    return sum(counts)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    requests = load_requests(args)
    return run_and_report(args, len(requests), send_all(args, requests))


if __name__ == "__main__":
    sys.exit(main())
