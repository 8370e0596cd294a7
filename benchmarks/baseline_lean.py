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
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import orjson

Request = tuple[str, bytes]


def build_requests(data: bytes, prefix: str) -> list[Request]:
    """(URL, body bytes) per non-blank line of the JSONL input."""
    requests: list[Request] = []
    loads, dumps = orjson.loads, orjson.dumps
    for line in data.splitlines():
        if not line.strip():
            continue
        event = loads(line)
        url = f"{prefix}/{event['instance_id']}/events/{event['event_type']}"
        requests.append((url, dumps(event.get("body"))))
    return requests


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


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None  # asyncio's default


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("input")
    parser.add_argument("summary", help="where to write the one summary line")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--account-id", required=True)
    parser.add_argument("--workflow", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    return parser.parse_args()


def prefix_of(args: argparse.Namespace) -> str:
    return (
        f"{args.base_url.rstrip('/')}/accounts/{args.account_id}"
        f"/workflows/{args.workflow}/instances"
    )


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    requests = build_requests(Path(args.input).read_bytes(), prefix_of(args))
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        ok = runner.run(send_all(args, requests))
    Path(args.summary).write_bytes(orjson.dumps({"events": len(requests), "ok": ok}) + b"\n")
    return 0 if ok == len(requests) else 1


if __name__ == "__main__":
    sys.exit(main())
