"""Records whose attempts saw different things, and records stopped between attempts.

Real servers on 127.0.0.1 (the hostile server's), real clients, the real engine and runner.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from factories import make_events
from hostile_server import (
    HTML,
    JSON,
    SECRET,
    SUCCESS_BODY,
    Case,
    HostileServer,
    Writer,
    answer,
    serve,
)

from dispatcher.emulator import Emulator, EmulatorConfig
from dispatcher.model import Delivery, ErrorKind
from dispatcher.results.envelopes import Seen
from dispatcher.results.ledger import load_ledger
from dispatcher.run import runner
from dispatcher.run.settings import Credentials, SendSettings, parse_rate
from dispatcher.sending.engine import Engine
from dispatcher.sending.policy import RetryPolicy


def settings(url: str, results: Path, inputs: tuple[str, ...] = (), **kw: Any) -> SendSettings:
    base: dict[str, Any] = {
        "inputs": inputs,
        "workflow": "wf",
        "account_id": "acc",
        "base_url": url,
        "credentials": Credentials(token=SECRET),
        "rate": "unlimited",
        "concurrency": 4,
        "results": str(results),
        "quiet": True,
        # Long enough that a loaded machine does not turn an answer into a timeout.
        "timeout": 5.0,
        "connect_timeout": 5.0,
    }
    base.update(kw)
    return SendSettings(**base)


def scripted(*steps: str) -> Case:
    """A server whose n-th request gets ``steps[n]``: 503, 200, hang, html200, stop-listening."""

    async def act(writer: Writer, request: bytes, server: HostileServer) -> None:
        step = steps[min(len(server.requests), len(steps)) - 1]
        if step == "hang+close":
            # Take the request, answer nothing, and stop listening: retries are refused.
            assert server.listener is not None
            server.listener.close()
            await asyncio.sleep(5)
        elif step == "503":
            writer.write(answer("503 Service Unavailable", [HTML], b"busy"))
        elif step == "200":
            writer.write(answer("200 OK", [JSON], SUCCESS_BODY))
        await writer.drain()

    return Case("scripted", act, Seen.ERROR, ErrorKind.HTTP)


FAST = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.01)
SLOW = RetryPolicy(max_attempts=5, base_delay=60.0, max_delay=60.0)


@pytest.mark.parametrize("client", ["fast", "aiohttp"])
async def test_a_timeout_then_refused_connections_is_unknown(client: str, tmp_path: Path) -> None:
    # The first POST arrived and timed out; the retries were refused. It may have arrived.
    async with serve(scripted("hang+close")) as server:
        s = settings(server.url, tmp_path / "r.jsonl", http_client=client, timeout=0.5)
        got = [env async for env in runner.dispatch(make_events(1), s, policy=FAST)]
    (env,) = got
    assert (env.ok, env.delivery, env.attempts) == (False, Delivery.UNKNOWN, 3)
    assert env.statuses == {"timeout": 1, "connect": 2}
    assert env.error is not None
    assert env.error.kind is ErrorKind.CONNECT


async def test_statuses_count_every_attempt(tmp_path: Path) -> None:
    async with serve(scripted("503", "503", "200")) as server:
        s = settings(server.url, tmp_path / "r.jsonl")
        (env,) = [env async for env in runner.dispatch(make_events(1), s, policy=FAST)]
    assert (env.ok, env.delivery, env.attempts) == (True, Delivery.CONFIRMED, 3)
    assert env.statuses == {"503": 2, "200": 1}


async def test_started_at_is_when_the_first_request_left(tmp_path: Path) -> None:
    # Five records at 10/s: picked up together, sent ~100 ms apart; the gate is waited_ms.
    async with Emulator(EmulatorConfig(tokens=(SECRET,), limit=None)) as emu:
        s = settings(emu.base_url, tmp_path / "r.jsonl", rate=parse_rate("10/s"))
        got = [env async for env in runner.dispatch(make_events(5), s)]
    starts = sorted(e.started_at for e in got if e.started_at is not None)
    assert len(starts) == 5
    got.sort(key=lambda e: e.waited_ms)
    span = (starts[-1] - starts[0]).total_seconds()
    assert span >= 0.3
    last = got[-1]
    assert last.waited_ms >= 250
    # The gate wait is not counted again in elapsed_ms: it fits in the span from when the
    # first request left to the end (50 ms for the wall clock against the monotonic one),
    # which the 250+ ms wait would overflow. Compared with elapsed_ms < waited_ms, as it
    # was, a request slower than the wait on a loaded machine is no failure.
    assert last.started_at is not None
    span_ms = (last.finished_at - last.started_at).total_seconds() * 1000
    assert last.elapsed_ms <= span_ms + 50, (last.elapsed_ms, span_ms, last.waited_ms)


async def test_stop_between_retries_leaves_records_for_a_plain_resume(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b"".join(
            orjson.dumps({"id": f"k{i}", "instance_id": f"i{i}", "event_type": "e"}) + b"\n"
            for i in range(6)
        )
    )
    results = tmp_path / "r.jsonl"
    async with serve(scripted("503")) as server:
        s = settings(server.url, results, inputs=(str(src),), concurrency=8)
        engines: list[Engine] = []

        async def stop_once_all_wait() -> None:
            while not engines or engines[0].stats.attempts < 6:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            engines[0].stop("SIGINT: stopped reading")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_once_all_wait)
                stats = await runner.run(s, policy=SLOW, engine_hook=engines.append)
    envs = [orjson.loads(line) for line in results.read_bytes().splitlines()]
    assert len(envs) == 6
    for env in envs:
        # Answered 503 once, stopped before retry 2 of 5: not final, and not "rejected, done".
        assert env["delivery"] == "rejected"
        assert env["error"]["kind"] == "stopped"
        assert env["attempts"] == 1
        assert env["statuses"] == {"503": 1}
    assert stats.stop_reason is not None
    ledger = load_ledger(str(results))
    async with Emulator(EmulatorConfig(tokens=(SECRET,), limit=None)) as emu:
        s = settings(emu.base_url, results, inputs=(str(src),), resume=True)
        stats = await runner.run(s)
        accepted = dict(emu.log.accepted)
    assert len(ledger) == 6
    assert stats.confirmed == 6  # a plain --resume sent every one of them again
    assert len(accepted) == 6


async def test_cancelling_dispatch_keeps_the_envelopes_of_records_between_retries(
    tmp_path: Path,
) -> None:
    async with serve(scripted("503")) as server:
        s = settings(server.url, tmp_path / "r.jsonl")
        got = []
        stream = runner.dispatch(make_events(4), s, policy=SLOW)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:

                async def cancel_once_all_wait() -> None:
                    stats = stream.stats
                    while stats.attempts < 4 or stats.in_flight:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    tg.cancel_scope.cancel()  # cancels the loop below, as a caller's would

                tg.start_soon(cancel_once_all_wait)
                async with stream:
                    async for env in stream:
                        got.append(env)
    assert got == []  # every record was waiting for its retry
    assert sorted(e.key for e in stream.abandoned) == ["k0", "k1", "k2", "k3"]
    for env in stream.abandoned:
        assert (env.delivery, env.attempts) == (Delivery.REJECTED, 1)
        assert env.error is not None
        assert env.error.kind is ErrorKind.STOPPED


async def test_stopping_dispatch_gracefully_yields_stopped_envelopes(tmp_path: Path) -> None:
    async with serve(scripted("503")) as server:
        s = settings(server.url, tmp_path / "r.jsonl")
        async with runner.dispatch(make_events(3), s, policy=SLOW) as stream:

            async def stop_soon() -> None:
                while stream.stats.attempts < 3:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                stream.stop()

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stop_soon)
                    got = [env async for env in stream]
    assert sorted(e.key for e in got) == ["k0", "k1", "k2"]
    assert {(e.delivery, e.error.kind if e.error else None) for e in got} == {
        (Delivery.REJECTED, ErrorKind.STOPPED)
    }
    assert stream.abandoned == []
