"""The relay client against a hostile relay on 127.0.0.1: every event gets the table's envelope.

The relay answers one ``POST /events`` for a whole batch, so one bad answer decides many
records at once. Each case here is one way a relay (or whatever answers in its place) has
failed: a timeout, a body that is not the relay's answer, a result for the wrong key, a
5xx, a 401, a cut-off or reset connection. The engine sends a batch of events through the
real :class:`~dispatcher.clients.relay.RelayTransport`, and every event's envelope must
follow the truth table (``dispatcher.results.envelopes.TRUTH_TABLE``): ``confirmed`` only
on that event's own ok result, never ``not_sent`` once the batch may have left, and the
secret in nothing written.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hostile_server import CASES, Case, answer, read_request, refused_url, serve

from dispatcher.clients.relay import RelayConfig, RelayTransport
from dispatcher.model import Delivery, Envelope, ErrorKind, Event, Record
from dispatcher.sending.engine import Engine
from dispatcher.sending.gate import RateGate
from dispatcher.sending.policy import RetryPolicy

SECRET = "relay-fault-secret-5be1d0c2"
JSON = "Content-Type: application/json"
KEYS = ("k1", "k2", "k3")

U, C, R, N = Delivery.UNKNOWN, Delivery.CONFIRMED, Delivery.REJECTED, Delivery.NOT_SENT


def event(key: str) -> Event:
    return Event(
        key=key,
        source="t.jsonl",
        line=int(key[1:]) if key[1:].isdigit() else 1,
        workflow="wf",
        instance_id=f"inst-{key}",
        event_type="go",
        body=b'{"n":1}',
    )


def transport(base_url: str, *, batch_size: int = len(KEYS)) -> RelayTransport:
    return RelayTransport(
        RelayConfig(
            base_url=base_url,
            secret=SECRET,
            batch_size=batch_size,
            timeout=1.0,
            connect_timeout=1.0,
            pool_size=2,
        )
    )


async def run_engine(
    tx: RelayTransport,
    keys: Sequence[str] = KEYS,
    *,
    attempts: int = 1,
    on_engine: Callable[[Engine], None] | None = None,
) -> dict[str, Envelope]:
    """Every record's envelope, keyed by record key, after the engine sent ``keys``."""
    engine = Engine(
        transport=tx,
        gate=RateGate(None),
        policy=RetryPolicy(
            max_attempts=attempts,
            max_rate_limited=1,
            max_retry_wait=60,
            base_delay=0.01,
            max_delay=0.05,
        ),
        concurrency=len(keys),
    )
    if on_engine is not None:
        on_engine(engine)

    async def batches() -> AsyncIterator[list[Record]]:
        yield [event(k) for k in keys]

    send, receive = anyio.create_memory_object_stream[Envelope](len(keys) + 1)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run, batches(), send)
            async with receive:
                got = [env async for env in receive]
    finally:
        await tx.aclose()
    assert sorted(e.key for e in got) == sorted(keys)
    return {e.key: e for e in got}


def kind_of(env: Envelope) -> ErrorKind | None:
    return env.error.kind if env.error is not None else None


def assert_no_secret(*things: object) -> None:
    for thing in things:
        assert SECRET not in repr(thing), f"the relay secret leaked into {thing!r}"


# -- A relay that answers each batch as a case says ---------------------------------------

Writer = asyncio.StreamWriter
Answer = Callable[[Writer, list[dict[str, Any]], "FakeRelay"], Awaitable[None]]


@dataclass
class FakeRelay:
    """Reads each ``POST /events`` and lets ``answer`` reply; keeps every batch's events.

    ``delivered`` counts, per key, the events this relay would have sent to the Workflow:
    it dedupes by key as relay/ does, so a retried batch delivers nothing twice.
    """

    answer: Answer
    url: str = ""
    batches: list[list[dict[str, Any]]] = field(default_factory=list)
    delivered: dict[str, int] = field(default_factory=dict)
    got_batch: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for e in events:
            deduped = e["key"] in self.delivered
            if not deduped:
                self.delivered[e["key"]] = 1
            results.append({"key": e["key"], "ok": True, "deduped": deduped})
        return results

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        with contextlib.suppress(
            ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError
        ):
            while not writer.is_closing():
                request = await read_request(reader)
                events = orjson.loads(request.partition(b"\r\n\r\n")[2])["events"]
                self.batches.append(events)
                self.got_batch.set()
                await self.answer(writer, events, self)
        writer.close()


@contextlib.asynccontextmanager
async def relay(answer_: Answer) -> AsyncIterator[FakeRelay]:
    fake = FakeRelay(answer_)
    server = await asyncio.start_server(fake._serve, "127.0.0.1", 0)
    fake.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield fake
        server.close()


def body(results: object, *, success: object = True) -> bytes:
    return orjson.dumps({"success": success, "errors": [], "messages": [], "results": results})


def ok(e: dict[str, Any]) -> dict[str, Any]:
    return {"key": e["key"], "ok": True, "deduped": False}


def reply(
    make: Callable[[list[dict[str, Any]]], bytes], status: str = "200 OK", ctype: str = JSON
) -> Answer:
    async def act(writer: Writer, events: list[dict[str, Any]], fake: FakeRelay) -> None:
        writer.write(answer(status, [ctype], make(events)))
        await writer.drain()

    return act


def raw(make: Callable[[list[dict[str, Any]]], bytes], *, reset: bool = False) -> Answer:
    """Send exactly these bytes, then close (FIN) or reset (RST) the connection."""

    async def act(writer: Writer, events: list[dict[str, Any]], fake: FakeRelay) -> None:
        writer.write(make(events))
        await writer.drain()
        if reset:
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    return act


async def hang(writer: Writer, events: list[dict[str, Any]], fake: FakeRelay) -> None:
    # The relay took the batch and sent it; the answer never comes back in time.
    fake.deliver(events)
    await asyncio.sleep(30)


def head_then_cut(events: list[dict[str, Any]]) -> bytes:
    whole = body([ok(e) for e in events])
    return (
        f"HTTP/1.1 200 OK\r\n{JSON}\r\nContent-Length: {len(whole)}\r\n\r\n".encode()
        + whole[: len(whole) // 2]
    )


def echo_secret(events: list[dict[str, Any]]) -> bytes:
    leak = f"binding said: Authorization: Bearer {SECRET}"
    return body(
        [{"key": e["key"], "ok": False, "code": "maybe_delivered", "message": leak} for e in events]
    )


@dataclass(frozen=True, slots=True)
class Fault:
    """One way the relay answers, and each event's (delivery, error kind, status) after it."""

    name: str
    answer: Answer
    expect: tuple[tuple[Delivery, ErrorKind | None, int | None], ...]


def every(delivery: Delivery, kind: ErrorKind | None, status: int | None) -> tuple[Any, ...]:
    return ((delivery, kind, status),) * len(KEYS)


HTTP, TIMEOUT, CONNECTION, PROTOCOL = (
    ErrorKind.HTTP,
    ErrorKind.TIMEOUT,
    ErrorKind.CONNECTION,
    ErrorKind.PROTOCOL,
)

FAULTS: tuple[Fault, ...] = (
    Fault("all_ok", reply(lambda ev: body([ok(e) for e in ev])), every(C, None, 200)),
    Fault(
        "one_code_each",
        reply(
            lambda ev: body(
                [
                    ok(ev[0]),
                    {"key": ev[1]["key"], "ok": False, "code": "not_found", "message": "gone"},
                    {"key": ev[2]["key"], "ok": False, "code": "maybe_delivered", "message": "x"},
                ]
            )
        ),
        ((C, None, 200), (R, HTTP, 404), (U, CONNECTION, None)),
    ),
    Fault(
        "invalid_failed_in_flight",
        reply(
            lambda ev: body(
                [
                    {"key": ev[0]["key"], "ok": False, "code": "invalid", "message": "bad id"},
                    {"key": ev[1]["key"], "ok": False, "code": "failed", "message": "get()"},
                    {"key": ev[2]["key"], "ok": False, "code": "in_flight", "message": "busy"},
                ]
            )
        ),
        ((R, HTTP, 400), (R, HTTP, 503), (U, CONNECTION, None)),
    ),
    Fault(
        "unknown_code_may_have_arrived",
        reply(lambda ev: body([{"key": e["key"], "ok": False, "code": "new_code"} for e in ev])),
        every(U, CONNECTION, None),
    ),
    Fault(
        "key_reused_is_rejected_never_confirmed",
        reply(lambda ev: body([{"key": e["key"], "ok": False, "code": "key_reused"} for e in ev])),
        every(R, HTTP, 409),
    ),
    Fault(
        "unverifiable_old_key_is_unknown_not_retried",
        reply(
            lambda ev: body([{"key": e["key"], "ok": False, "code": "unverifiable"} for e in ev])
        ),
        every(U, HTTP, 200),
    ),
    Fault("timeout", hang, every(U, TIMEOUT, None)),
    Fault(
        "malformed_json",
        reply(lambda ev: b'{"success": true, "results": [{"key"'),
        every(U, HTTP, 200),
    ),
    Fault(
        "html_200",
        reply(lambda ev: b"<html>Sign in</html>", ctype="Content-Type: text/html"),
        every(U, HTTP, 200),
    ),
    Fault("fewer_results", reply(lambda ev: body([ok(e) for e in ev[:-1]])), every(U, HTTP, 200)),
    Fault(
        "more_results",
        reply(lambda ev: body([ok(e) for e in ev] + [ok(ev[0])])),
        every(U, HTTP, 200),
    ),
    Fault(
        "result_for_a_key_not_in_the_batch",
        reply(lambda ev: body([ok(ev[0]), ok({"key": "stranger"}), ok(ev[2])])),
        ((C, None, 200), (U, HTTP, 200), (C, None, 200)),
    ),
    Fault(
        "results_out_of_order",
        reply(lambda ev: body([ok(ev[1]), ok(ev[0]), ok(ev[2])])),
        ((U, HTTP, 200), (U, HTTP, 200), (C, None, 200)),
    ),
    Fault(
        "result_without_key",
        reply(lambda ev: body([{"ok": True}, ok(ev[1]), ok(ev[2])])),
        ((U, HTTP, 200), (C, None, 200), (C, None, 200)),
    ),
    Fault(
        "ok_not_exactly_true",
        reply(
            lambda ev: body(
                [{"key": e["key"], "ok": v} for e, v in zip(ev, ("true", 1, []), strict=True)]
            )
        ),
        every(U, CONNECTION, None),
    ),
    Fault(
        "results_not_objects",
        reply(lambda ev: body([True, "ok", None])),
        every(U, HTTP, 200),
    ),
    Fault("results_missing", reply(lambda ev: b'{"success":true}'), every(U, HTTP, 200)),
    Fault("results_not_a_list", reply(lambda ev: body({"k1": True})), every(U, HTTP, 200)),
    Fault(
        "success_false_with_ok_results",
        reply(lambda ev: body([ok(e) for e in ev], success=False)),
        every(U, HTTP, 200),
    ),
    Fault(
        "success_nested_not_top_level",
        reply(
            lambda ev: orjson.dumps({"result": {"success": True, "results": [ok(e) for e in ev]}})
        ),
        every(U, HTTP, 200),
    ),
    Fault("empty_200", reply(lambda ev: b""), every(U, HTTP, 200)),
    Fault(
        "no_content_204", raw(lambda ev: b"HTTP/1.1 204 No Content\r\n\r\n"), every(U, HTTP, 204)
    ),
    Fault(
        "http_500_json",
        reply(
            lambda ev: b'{"success":false,"errors":[{"code":10001,"message":"boom"}]}', "500 Oops"
        ),
        every(U, HTTP, 500),
    ),
    Fault(
        "http_502_html",
        reply(lambda ev: b"<h1>502</h1>", "502 Bad Gateway", "Content-Type: text/html"),
        every(U, HTTP, 502),
    ),
    Fault(
        "http_401_wrong_secret",
        reply(
            lambda ev: b'{"success":false,"errors":[{"code":10000,"message":"wrong secret"}]}',
            "401 Unauthorized",
        ),
        every(R, HTTP, 401),
    ),
    Fault("truncated_body_then_close", raw(head_then_cut), every(U, CONNECTION, None)),
    Fault("reset_mid_answer", raw(head_then_cut, reset=True), every(U, CONNECTION, None)),
    Fault("closed_before_answer", raw(lambda ev: b""), every(U, CONNECTION, None)),
    Fault(
        "not_http",
        raw(lambda ev: b"SSH-2.0-OpenSSH_9.6\r\n"),
        every(U, PROTOCOL, None),
    ),
    Fault(
        "answer_over_the_cap",
        raw(
            lambda ev: (
                answer("200 OK", [JSON], b"", length=False)[:-2]
                + b"Content-Length: 99999999\r\n\r\n"
            )
        ),
        every(U, PROTOCOL, None),
    ),
    Fault("secret_echoed_in_messages", reply(echo_secret), every(U, CONNECTION, None)),
)


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_each_event_gets_the_envelope_its_own_result_gives(fault: Fault) -> None:
    async with relay(fault.answer) as fake:
        tx = transport(fake.url)
        envs = await run_engine(tx)
    # One batch left, holding every event, once: no redirect, no retry.
    assert [[e["key"] for e in b] for b in fake.batches] == [list(KEYS)]
    got = tuple((envs[k].delivery, kind_of(envs[k]), envs[k].status) for k in KEYS)
    assert got == fault.expect
    for env in envs.values():
        assert env.ok is (env.delivery is C)
        assert env.attempts == 1
    assert_no_secret(tx, *envs.values())
    if fault.name == "secret_echoed_in_messages":
        assert all("<redacted>" in (e.error.message if e.error else "") for e in envs.values())


# Generic HTTP faults (tests/hostile_server.py): no answer there is the relay's, so no event
# is ever confirmed; these are refusals of the whole batch, everything else is in doubt.
REFUSALS = {
    "redirect_302_same_host",
    "redirect_307_other_host",
    "redirect_308_to_https_elsewhere",
    "redirect_loop",
    "not_modified_304",
    "switching_protocols_101",
    "rate_limited_429",
    "unauthorized_401_echoes_request",
    "bad_request_400_json_echoes_request",
    "gzip_error_404",
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_no_answer_of_another_server_confirms_or_crashes(case: Case) -> None:
    async with serve(case) as server:
        tx = transport(server.url, batch_size=2)
        envs = await run_engine(tx, KEYS[:2])
        requests, stolen = len(server.requests), server.other_requests
    assert requests == 1  # one batch, no redirect followed
    assert stolen == []
    expect = R if case.name in REFUSALS else U
    assert {e.delivery for e in envs.values()} == {expect}, envs
    assert_no_secret(tx, *envs.values())


async def test_never_connected_is_not_sent() -> None:
    envs = await run_engine(transport(refused_url()))
    # Nothing ever listened there: the run stops (kind stopped, so --resume sends them).
    assert {(e.delivery, kind_of(e)) for e in envs.values()} == {(N, ErrorKind.STOPPED)}
    assert {e.statuses["connect"] for e in envs.values()} == {1}
    assert all("nothing listens on 127.0.0.1:" in str(e.error) for e in envs.values())


def switch(*answers: Answer) -> Answer:
    """The n-th batch gets the n-th answer (the last one from then on)."""

    async def act(writer: Writer, events: list[dict[str, Any]], fake: FakeRelay) -> None:
        await answers[min(len(fake.batches), len(answers)) - 1](writer, events, fake)

    return act


async def deliver(writer: Writer, events: list[dict[str, Any]], fake: FakeRelay) -> None:
    writer.write(answer("200 OK", [JSON], body(fake.deliver(events))))
    await writer.drain()


async def test_a_timed_out_batch_is_retried_with_the_same_keys_and_delivered_once() -> None:
    async with relay(switch(hang, deliver)) as fake:
        envs = await run_engine(transport(fake.url), attempts=3)
    assert {e.delivery for e in envs.values()} == {C}
    assert {k: e.statuses for k, e in envs.items()} == {k: {"timeout": 1, "200": 1} for k in KEYS}
    # The retry carries the record keys the relay dedupes by: it delivered each one once.
    assert sorted(e["key"] for b in fake.batches[1:] for e in b) == sorted(KEYS)
    assert fake.delivered == dict.fromkeys(KEYS, 1)


async def test_a_5xx_batch_is_retried_and_a_timeout_then_refusal_stays_unknown() -> None:
    fail_502 = reply(lambda ev: b"<h1>502</h1>", "502 Bad Gateway", "Content-Type: text/html")
    async with relay(switch(fail_502, deliver)) as fake:
        envs = await run_engine(transport(fake.url), attempts=2)
    assert {k: (e.delivery, e.statuses) for k, e in envs.items()} == {
        k: (C, {"502": 1, "200": 1}) for k in KEYS
    }
    # The batch timed out, then the relay was gone: it may have arrived, so never not_sent.
    async with relay(hang) as fake:
        tx = transport(fake.url)
        task = asyncio.create_task(run_engine(tx, attempts=2))
        await fake.got_batch.wait()
    envs = await task
    assert {(e.delivery, e.attempts) for e in envs.values()} == {(U, 2)}


async def test_resend_unknown_after_a_timed_out_batch_delivers_nothing_twice(
    tmp_path: Path,
) -> None:
    lines = [
        {"workflow": "wf", "instance_id": f"inst-{i}", "event_type": "go", "body": {"n": i}}
        for i in range(5)
    ]
    (tmp_path / "events.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DISPATCHER_"))}
    env["DISPATCHER_RELAY_SECRET"] = SECRET

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dispatcher",
            "send",
            "--progress",
            "off",
            "--target",
            "relay",
            "--base-url",
            fake.url,
            "--timeout",
            "1s",
            "--max-attempts",
            "1",
            *args,
            "events.jsonl",
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, (out + err).decode()

    def results() -> dict[str, dict[str, Any]]:
        docs = [orjson.loads(x) for x in (tmp_path / "results.jsonl").read_bytes().splitlines()]
        return {d["key"]: d for d in docs}  # the last line for a key wins

    async with relay(switch(hang, deliver)) as fake:
        code, said = await cli()
        assert code == 1, said
        first = results()
        assert {d["delivery"] for d in first.values()} == {"unknown"}
        assert {d["error"]["kind"] for d in first.values()} == {"timeout"}
        # A plain resume leaves them alone: they may have arrived.
        code, said = await cli("--resume")
        assert len(fake.batches) == 1, said
        code, said = await cli("--resume", "--resend-unknown")
        assert code == 0, said
    assert {d["delivery"] for d in results().values()} == {"confirmed"}
    assert [sorted(e["key"] for e in b) for b in fake.batches] == [sorted(first)] * 2
    assert fake.delivered == dict.fromkeys(first, 1)
    assert SECRET not in said + (tmp_path / "results.jsonl").read_text()


async def test_ctrl_c_cuts_off_a_hanging_batch_after_the_grace(tmp_path: Path) -> None:
    # The relay holds the batch (its timeout is 30 s); Ctrl-C with --grace 1s must end the
    # run about a second later, every record unknown (it may have arrived), none lost.
    lines = [
        {"workflow": "wf", "instance_id": f"inst-{i}", "event_type": "go", "body": {"n": i}}
        for i in range(5)
    ]
    (tmp_path / "events.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDFLARE_", "DISPATCHER_"))}
    env["DISPATCHER_RELAY_SECRET"] = SECRET
    async with relay(hang) as fake:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "dispatcher", "send", "--progress", "off"),
            *("--target", "relay", "--base-url", fake.url, "--timeout", "30s"),
            *("--grace", "1s", "events.jsonl"),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(fake.got_batch.wait(), 30)
        loop = asyncio.get_running_loop()
        interrupted = loop.time()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        took = loop.time() - interrupted
    assert proc.returncode == 130, err.decode()
    assert took < 15, f"the run took {took:.1f} s to end after Ctrl-C with --grace 1s"
    docs = [orjson.loads(x) for x in (tmp_path / "results.jsonl").read_bytes().splitlines()]
    assert len(docs) == len(lines)
    assert {(d["delivery"], d["error"]["kind"]) for d in docs} == {("unknown", "stopped")}


def gzipped(make: Callable[[list[dict[str, Any]]], bytes], status: str = "200 OK") -> Answer:
    async def act(writer: Writer, events: list[dict[str, Any]], fake: FakeRelay) -> None:
        writer.write(answer(status, [JSON, "Content-Encoding: gzip"], gzip.compress(make(events))))
        await writer.drain()

    return act


def too_large_over(limit: int, *, max_batch: int | None = None) -> Answer:
    """413 for a batch of more than ``limit`` events (naming ``max_batch`` when given),
    else deliver it."""

    async def act(writer: Writer, events: list[dict[str, Any]], fake: FakeRelay) -> None:
        if len(events) > limit:
            doc: dict[str, Any] = {"success": False, "errors": [{"code": 10413, "message": "big"}]}
            if max_batch is not None:
                doc["limits"] = {"max_batch": max_batch, "max_body_bytes": 1 << 25}
            writer.write(answer("413 Payload Too Large", [JSON], orjson.dumps(doc)))
            await writer.drain()
        else:
            await deliver(writer, events, fake)

    return act


async def test_a_gzipped_relay_answer_is_read_once_decoded() -> None:
    # aiohttp decodes the relay's answers itself: each event's own result still counts, and
    # a refusal's message is words, not compressed bytes.
    async with relay(gzipped(lambda events: body([ok(e) for e in events]))) as fake:
        envs = await run_engine(transport(fake.url))
    assert {e.delivery for e in envs.values()} == {C}
    refusal = orjson.dumps(
        {"success": False, "errors": [{"code": 400, "message": "batch malformed"}]}
    )
    async with relay(gzipped(lambda events: refusal, "400 Bad Request")) as fake:
        envs = await run_engine(transport(fake.url))
    assert {e.delivery for e in envs.values()} == {R}
    assert {e.error.message for e in envs.values() if e.error} == {"batch malformed"}


KEYS5 = ("k1", "k2", "k3", "k4", "k5")


async def test_a_413_batch_is_split_until_it_fits_and_no_record_is_rejected() -> None:
    # Too large in bytes (no limits named: a proxy in front, or the relay's body limit).
    async with relay(too_large_over(2)) as fake:
        envs = await run_engine(transport(fake.url, batch_size=5), KEYS5)
    assert {k: e.delivery for k, e in envs.items()} == dict.fromkeys(KEYS5, C)
    assert fake.delivered == dict.fromkeys(KEYS5, 1)
    assert [len(b) for b in fake.batches] == [5, 3, 2, 1, 2]


async def test_a_413_for_one_event_alone_rejects_that_event_only() -> None:
    async with relay(too_large_over(0)) as fake:
        envs = await run_engine(transport(fake.url, batch_size=1), KEYS[:1])
    (env,) = envs.values()
    assert (env.delivery, env.status) == (R, 413)
    assert env.error is not None
    assert "alone as too large" in env.error.message
    assert fake.delivered == {}


async def test_a_413_naming_a_max_batch_below_batch_size_stops_the_run() -> None:
    seen: list[Engine] = []
    async with relay(too_large_over(2, max_batch=2)) as fake:
        envs = await run_engine(transport(fake.url), on_engine=seen.append)
    reason = seen[0].stats.stop_reason
    assert reason is not None
    assert "--batch-size" in reason
    assert "MAX_BATCH" in reason
    # Refused before anything was sent: not final, a plain --resume sends them again.
    assert {(e.delivery, kind_of(e), e.status) for e in envs.values()} == {
        (R, ErrorKind.STOPPED, 413)
    }
    assert fake.delivered == {}
    assert len(fake.batches) == 1


@pytest.mark.parametrize("code", ["key_reused", "unverifiable"])
async def test_key_reused_and_unverifiable_are_not_retried(code: str) -> None:
    answer_ = reply(lambda ev: body([{"key": e["key"], "ok": False, "code": code} for e in ev]))
    async with relay(answer_) as fake:
        envs = await run_engine(transport(fake.url), attempts=3)
    assert len(fake.batches) == 1
    assert {e.delivery for e in envs.values()} == {R if code == "key_reused" else U}
