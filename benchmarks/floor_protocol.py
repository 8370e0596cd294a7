"""The floor: the least CPython can do per event here, an asyncio Protocol + httptools loop.

    python benchmarks/floor_protocol.py INPUT.jsonl SUMMARY.json \
        --base-url http://127.0.0.1:8080/client/v4 --account-id acc --workflow wf \
        --concurrency 64 --loop uvloop

Not a client anyone would ship: it is the cost below which no Python client of this job
can go on this machine. The input is read as bytes and every request (head and ``orjson``
body) is built in memory before the first send. Then ``--concurrency`` keep-alive
connections, each one :class:`asyncio.Protocol`: write one request, let llhttp
(``httptools``) parse the answer as it arrives, count it ok on status 200 and
``orjson.loads(body)["success"] is True``, write the next. No futures, no tasks per
request, no timeouts, no retries, no error handling beyond counting, no results, no
durability. Its only output is one summary line, ``{"events": N, "ok": K}``.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Iterator
from typing import cast
from urllib.parse import urlsplit

import httptools
import orjson
from suite.baseline import load_requests, parse_args, run_and_report


class FloorConn(asyncio.Protocol):
    """One connection: sends the next request as soon as the previous answer is parsed."""

    def __init__(self, todo: Iterator[bytes], done: asyncio.Future[None]) -> None:
        self.todo = todo
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []
        self.ok = 0
        self.sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._next()

    def _next(self) -> None:
        assert self.transport is not None
        request = next(self.todo, None)
        if request is None:
            self.transport.close()
            return
        self.sent += 1
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.body.clear()
        if self.parser.get_status_code() == 200 and orjson.loads(body).get("success") is True:
            self.ok += 1
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def send_all(host: str, port: int, concurrency: int, requests: list[bytes]) -> int:
    loop = asyncio.get_running_loop()
    todo = iter(requests)
    conns: list[FloorConn] = []
    waits: list[asyncio.Future[None]] = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        _, proto = await loop.create_connection(
            functools.partial(FloorConn, todo, done), host, port
        )
        conns.append(proto)
        waits.append(done)
    await asyncio.gather(*waits)
    return sum(c.ok for c in conns)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    url = urlsplit(args.base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    token = os.environ["CLOUDFLARE_API_TOKEN"]
    head = (
        f"Host: {url.netloc}\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/json\r\nConnection: keep-alive\r\n"
    ).encode()
    path_from = len(f"{url.scheme}://{url.netloc}")
    requests = [
        b"POST "
        + u[path_from:].encode()
        + b" HTTP/1.1\r\n"
        + head
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
        for u, body in load_requests(args)
    ]
    return run_and_report(args, len(requests), send_all(host, port, args.concurrency, requests))


if __name__ == "__main__":
    sys.exit(main())
