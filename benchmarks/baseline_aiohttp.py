"""The baseline: the simplest aiohttp worker pool a competent user would write by hand.

    python benchmarks/baseline_aiohttp.py INPUT.jsonl RESULTS.jsonl \
        --base-url http://127.0.0.1:8080/client/v4 --account-id acc --workflow wf \
        --concurrency 64 --loop uvloop

The token comes from CLOUDFLARE_API_TOKEN, like the other contenders. Honest and
competent: one ClientSession (keep-alive pool) shared by a fixed pool of workers fed
through a bounded asyncio.Queue, one result line per event. Not optimised beyond what a
typical user writes: stdlib json, the URL built per event, aiohttp's own JSON encoding,
no retries, no rate limiting, no validation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import aiohttp


async def worker(
    queue: asyncio.Queue[tuple[int, str] | None],
    session: aiohttp.ClientSession,
    prefix: str,
    headers: dict[str, str],
    out: TextIO,
) -> None:
    while True:
        item = await queue.get()
        if item is None:
            return
        line_no, line = item
        event = json.loads(line)
        instance_id = event["instance_id"]
        event_type = event["event_type"]
        url = f"{prefix}/{instance_id}/events/{event_type}"
        result: dict[str, Any] = {"line": line_no, "instance_id": instance_id}
        try:
            async with session.post(url, json=event.get("body"), headers=headers) as resp:
                data = await resp.json()
                result["status"] = resp.status
                result["ok"] = resp.status == 200 and data.get("success") is True
                result["errors"] = data.get("errors")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            result["ok"] = False
            result["error"] = repr(exc)
        out.write(json.dumps(result) + "\n")


async def send_all(args: argparse.Namespace, inp: TextIO, out: TextIO) -> None:
    token = os.environ["CLOUDFLARE_API_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    prefix = (
        f"{args.base_url.rstrip('/')}/accounts/{args.account_id}"
        f"/workflows/{args.workflow}/instances"
    )
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(maxsize=args.concurrency * 2)
    async with aiohttp.ClientSession() as session:
        workers = [
            asyncio.create_task(worker(queue, session, prefix, headers, out))
            for _ in range(args.concurrency)
        ]
        for line_no, line in enumerate(inp, 1):
            if line.strip():
                await queue.put((line_no, line))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        # Typed here: uvloop is only in the bench extra, so mypy may not see it.
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None  # asyncio's default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("results")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--account-id", required=True)
    parser.add_argument("--workflow", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop: asyncio's default, or uvloop's (to compare like with like)",
    )
    args = parser.parse_args()
    with (
        open(args.input) as inp,
        open(args.results, "w") as out,
        asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner,
    ):
        runner.run(send_all(args, inp, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
