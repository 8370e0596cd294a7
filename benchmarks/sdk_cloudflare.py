"""The official ``cloudflare`` SDK's ``AsyncCloudflare`` behind a bounded worker pool.

    python benchmarks/sdk_cloudflare.py INPUT.jsonl RESULTS.jsonl \
        --base-url http://127.0.0.1:8080/client/v4 --account-id acc --workflow wf \
        --concurrency 64 --loop uvloop

The token comes from CLOUDFLARE_API_TOKEN. One client (its httpx keep-alive pool holds up
to 100 idle connections, more than the workers), a fixed pool of workers fed through a
bounded asyncio.Queue, one result line per event: the way one uses the SDK for many calls.
The SDK keeps its default retry policy (2 retries).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

import cloudflare
from cloudflare import AsyncCloudflare

SDK_DEFAULT_RETRIES = 2


async def worker(
    queue: asyncio.Queue[tuple[int, str] | None],
    client: AsyncCloudflare,
    account_id: str,
    workflow: str,
    out: TextIO,
) -> None:
    while True:
        item = await queue.get()
        if item is None:
            return
        line_no, line = item
        event = json.loads(line)
        instance_id = event["instance_id"]
        result: dict[str, Any] = {"line": line_no, "instance_id": instance_id}
        try:
            await client.workflows.instances.events.create(
                event["event_type"],
                account_id=account_id,
                workflow_name=workflow,
                instance_id=instance_id,
                body=event.get("body"),
            )
            result["ok"] = True
        except cloudflare.APIStatusError as exc:
            result["ok"] = False
            result["status"] = exc.status_code
            result["error"] = str(exc)
        except cloudflare.APIError as exc:
            result["ok"] = False
            result["error"] = repr(exc)
        out.write(json.dumps(result) + "\n")


async def send_all(args: argparse.Namespace, inp: TextIO, out: TextIO) -> None:
    client = AsyncCloudflare(
        api_token=os.environ["CLOUDFLARE_API_TOKEN"],
        base_url=args.base_url,
        max_retries=SDK_DEFAULT_RETRIES,
    )
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue(maxsize=args.concurrency * 2)
    try:
        workers = [
            asyncio.create_task(worker(queue, client, args.account_id, args.workflow, out))
            for _ in range(args.concurrency)
        ]
        for line_no, line in enumerate(inp, 1):
            if line.strip():
                await queue.put((line_no, line))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
    finally:
        await client.close()


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
