"""What parsing one answer costs in the fast client: llhttp (httptools) vs the hand-written parser.

    .venv/bin/python benchmarks/parser_cost.py            # 7 rounds of 20,000 answers each
    .venv/bin/python benchmarks/parser_cost.py --quick

Both parsers are the client's connection protocol (``asyncio.Protocol``) fed the same bytes
the way the event loop feeds them: ``request()`` and then ``data_received()`` with a whole
answer, its future resolved, per answer. The answers are a Cloudflare-like success envelope
with the API's usual headers (Content-Length framed, and chunked), in one read and split
across three reads. ``+ rule`` adds the answer rule both clients share
(``outcome_from_response``: header reads and the ``orjson`` success check), so the ratio
shows what the parser costs within a whole answer. No network, no sleeping: CPU only.

Rounds alternate between the contenders so that a busy machine slows both alike; the
verdict is the ratio of medians, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from handwritten_parser import _Conn as HandWrittenConn

from dispatcher.clients.base import outcome_from_response
from dispatcher.clients.fast import _Conn as LlhttpConn

BODY = b'{"success":true,"errors":[],"messages":[],"result":{"event_id":"e-1"}}'
HEADERS = (
    b"Date: Tue, 01 Dec 2026 23:00:00 GMT\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: keep-alive\r\n"
    b"CF-Ray: 8f1e2d3c4b5a6978-AMS\r\n"
    b"CF-Cache-Status: DYNAMIC\r\n"
    b'Ratelimit: "default";r=1180;t=287\r\n'
    b'Ratelimit-Policy: "burst";q=1200;w=300\r\n'
    b"Server: cloudflare\r\n"
    b"Strict-Transport-Security: max-age=31536000\r\n"
    b"Vary: Accept-Encoding\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Set-Cookie: __cflb=0H28vgHxwvgAQtjUGU4vq74ZFe3sNVUZ; SameSite=None; Secure; "
    b"path=/; expires=Wed, 02-Dec-26 00:00:00 GMT; HttpOnly\r\n"
)
LENGTH = b"HTTP/1.1 200 OK\r\n" + HEADERS + f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY
CHUNKED = (
    b"HTTP/1.1 200 OK\r\n"
    + HEADERS
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + f"{len(BODY):x}\r\n".encode()
    + BODY
    + b"\r\n0\r\n\r\n"
)


class _NullTransport(asyncio.Transport):
    def write(self, data: Any) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def _pieces(answer: bytes, reads: int) -> list[bytes]:
    step = -(-len(answer) // reads)
    return [answer[i : i + step] for i in range(0, len(answer), step)]


def run_round(
    make: Callable[[set[Any]], Any], answer: bytes, reads: int, n: int, rule: bool
) -> float:
    """Seconds per answer over ``n`` answers on one keep-alive connection."""
    loop = asyncio.new_event_loop()
    try:
        conn = make(set())
        conn.connection_made(_NullTransport())
        pieces = _pieces(answer, reads)
        started = time.perf_counter()
        for _ in range(n):
            future = loop.create_future()
            conn.request(b"", future)
            for piece in pieces:
                conn.data_received(piece)
            response = future.result()
            if rule:
                outcome_from_response(response.status, response.body, response.headers, 0.0)
        return (time.perf_counter() - started) / n
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5,000 answers")
    args = parser.parse_args()
    rounds, n = (3, 5_000) if args.quick else (7, 20_000)
    contenders: dict[str, Callable[[set[Any]], Any]] = {
        "hand-written (before)": HandWrittenConn,
        "llhttp / httptools (now)": LlhttpConn,
    }
    shapes = [
        ("Content-Length, 1 read", LENGTH, 1, False),
        ("chunked, 1 read", CHUNKED, 1, False),
        ("Content-Length, 3 reads", LENGTH, 3, False),
        ("Content-Length, 1 read + rule", LENGTH, 1, True),
    ]
    print(f"{rounds} rounds x {n:,} answers; median microseconds per answer\n")
    print(f"{'answer':34} " + " ".join(f"{name:>26}" for name in contenders) + "   ratio")
    for label, answer, reads, rule in shapes:
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, make in contenders.items():
                times[name].append(run_round(make, answer, reads, n, rule))
        medians = {name: statistics.median(ts) * 1e6 for name, ts in times.items()}
        before, now = medians.values()
        cells = " ".join(f"{m:>24.2f}us" for m in medians.values())
        print(f"{label:34} {cells}   {now / before:.2f}x")
    print("\nratio = now / before: below 1 means llhttp is faster")


if __name__ == "__main__":
    main()
