"""What the hand-written baselines share (lean, httpx, floor): their command line, the
input read as bytes and turned into requests in memory, the event loop, the summary line.

Each baseline script keeps only its client; this is the rest, so the three read and
report the same way and differ only where they are compared.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

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


def load_requests(args: argparse.Namespace) -> list[Request]:
    """The whole input, read as bytes, as (URL, body) pairs: built before the first send."""
    return build_requests(Path(args.input).read_bytes(), prefix_of(args))


def run_and_report(
    args: argparse.Namespace, events: int, send_all: Coroutine[Any, Any, int]
) -> int:
    """Run ``send_all`` (it returns the ok count) on ``--loop``; write the summary line
    ``{"events": N, "ok": K}``; exit status 0 only if every event was ok."""
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        ok = runner.run(send_all)
    Path(args.summary).write_bytes(orjson.dumps({"events": events, "ok": ok}) + b"\n")
    return 0 if ok == events else 1
