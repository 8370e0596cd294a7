"""A server that answers every request ``429`` with ``Retry-After: 0`` (or a date in the
past, or garbage): the run pauses at least a second, longer on repeats, instead of asking
again as fast as the connections allow (1,000 requests in 0.05 s before the floor).

The engine, both real clients and the hostile server on 127.0.0.1, ``--rate unlimited``
(no pacing: only the pause holds the workers back); the server counts what it received.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from factories import make_events
from hostile_server import JSON, Case, answer, serve
from test_hostile import CLIENTS, config

from dispatcher.model import Delivery, Envelope, ErrorKind, Record
from dispatcher.results.envelopes import Seen
from dispatcher.sending.engine import Engine
from dispatcher.sending.gate import RateGate
from dispatcher.sending.policy import RetryPolicy

CONCURRENCY = 16
RUN_S = 2.5
BODY = b'{"success":false,"errors":[{"code":971,"message":"Please wait and consider throttling"}]}'


def storm(retry_after: str, status: str = "429 Too Many Requests") -> Case:
    data = answer(status, [JSON, f"Retry-After: {retry_after}"], BODY)

    async def act(writer: object, request: bytes, server: object) -> None:
        writer.write(data)  # type: ignore[attr-defined]
        await writer.drain()  # type: ignore[attr-defined]

    return Case(f"storm_{retry_after}", act, Seen.ERROR, ErrorKind.HTTP)


async def storm_run(case: Case, client: str) -> tuple[int, list[Envelope], float]:
    """Requests the server got in RUN_S seconds, the envelopes, and the gate's pauses."""
    async with serve(case) as server:
        tx = CLIENTS[client](config(server.url))
        gate = RateGate(None)  # --rate unlimited
        engine = Engine(
            transport=tx,
            gate=gate,
            policy=RetryPolicy(),
            concurrency=CONCURRENCY,
            rng=random.Random(7).random,
        )

        async def batches() -> AsyncIterator[list[Record]]:
            yield make_events(200)

        send, receive = anyio.create_memory_object_stream[Envelope](1000)
        got: list[Envelope] = []
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run, batches(), send)
                started = time.monotonic()
                with anyio.move_on_after(RUN_S):
                    async for env in receive:
                        got.append(env)
                engine.stop("the test's time is up")
                async with receive:
                    got.extend([env async for env in receive])
        finally:
            await tx.aclose()
        assert time.monotonic() - started < RUN_S + 5
        return len(server.requests), got, gate.stats.paused_s


PAST = "Wed, 21 Oct 2015 07:28:00 GMT"


@pytest.mark.parametrize(
    ("retry_after", "client"),
    [("0", "fast"), ("0", "aiohttp"), (PAST, "fast"), ("garbage", "aiohttp"), ("-1", "fast")],
)
async def test_a_429_storm_gets_a_few_rounds_not_thousands(retry_after: str, client: str) -> None:
    requests, got, paused = await storm_run(storm(retry_after), client)
    # The first round (one request per worker) at 0 s, the second after a pause of at least
    # 1 s, the third at least 2 s later: at most 3 rounds in 2.5 s. Before the floor a
    # "Retry-After: 0" server got about 20,000 requests/s here.
    assert requests <= 3 * CONCURRENCY, requests
    assert paused >= 1.0
    # Nothing was delivered, and nothing says otherwise.
    assert all(env.delivery is not Delivery.CONFIRMED for env in got)
    assert all(env.delivery is Delivery.REJECTED for env in got), {e.delivery for e in got}


async def test_a_503_storm_with_retry_after_zero_waits_between_attempts() -> None:
    requests, got, _ = await storm_run(storm("0", "503 Service Unavailable"), "fast")
    # Per record, not run-wide: each worker's record waits at least 1 s between attempts,
    # so in 2.5 s each worker sends at most 3 (the 4th would come after 1 + 1 + 1 s).
    assert requests <= 3 * CONCURRENCY, requests
    assert all(env.delivery is not Delivery.CONFIRMED for env in got)


async def test_the_cli_at_rate_unlimited_sends_a_few_rounds_into_a_storm(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    import orjson
    from hostile_server import SECRET

    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b"".join(
            orjson.dumps({"instance_id": f"i{k}", "event_type": "e"}) + b"\n" for k in range(500)
        )
    )
    async with serve(storm("0")) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}
        env.update(
            CLOUDFLARE_API_TOKEN=SECRET, CLOUDFLARE_ACCOUNT_ID="acc", CLOUDFLARE_BASE_URL=server.url
        )
        args = [
            sys.executable,
            *("-m", "dispatcher", "send", str(src), "--workflow", "wf"),
            *("--results", str(tmp_path / "r.jsonl"), "--progress", "off"),
            *("--rate", "unlimited", "--concurrency", str(CONCURRENCY)),
        ]
        async with await anyio.open_process(args, env=env, stderr=subprocess.PIPE) as proc:
            # The interpreter's start-up, however long a loaded machine takes (a fixed 1 s
            # for it left no storm at all when it took longer), then RUN_S of the storm.
            with anyio.fail_after(60):
                while not server.requests:  # noqa: ASYNC110 (the server has no event to wait on)
                    await anyio.sleep(0.02)
            await anyio.sleep(RUN_S)
            proc.send_signal(signal.SIGINT)
            assert proc.stderr is not None
            err = b"".join([chunk async for chunk in proc.stderr]).decode()
            code = await proc.wait()
        requests = len(server.requests)
    assert code == 130, err
    assert "Traceback" not in err
    assert "paused" in err
    assert 0 < requests <= 3 * CONCURRENCY, requests
