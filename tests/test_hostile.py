"""Both clients against a hostile server: every answer gives the envelope the table says.

Each case of :data:`tests.hostile_server.CASES` names what one attempt must see; the
truth table (:data:`dispatcher.results.envelopes.TRUTH_TABLE`) turns that into ``ok`` and
``delivery``. The engine runs each case once per client, and the two must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from hostile_server import CASES, EMAIL, KEY, SECRET, Case, refused_url, serve

from dispatcher.clients.aiohttp_client import HttpTransport
from dispatcher.clients.base import Transport, TransportConfig
from dispatcher.clients.fast import FastTransport
from dispatcher.model import Delivery, Envelope, ErrorKind, Event, Record
from dispatcher.results.envelopes import Seen, judge, seen_of
from dispatcher.sending.engine import Engine
from dispatcher.sending.gate import RateGate
from dispatcher.sending.policy import RetryPolicy

CLIENTS: dict[str, Callable[[TransportConfig], Transport]] = {
    "fast": FastTransport,
    "aiohttp": HttpTransport,
}
SECRETS = (SECRET, KEY, EMAIL)


def config(base_url: str, *, legacy: bool = False) -> TransportConfig:
    headers = (
        {"X-Auth-Email": EMAIL, "X-Auth-Key": KEY}
        if legacy
        else {"Authorization": f"Bearer {SECRET}"}
    )
    return TransportConfig(
        base_url=base_url,
        account_id="acc",
        auth_headers=headers,
        timeout=1.0,
        connect_timeout=1.0,
        pool_size=2,
    )


def event(key: str = "k1") -> Event:
    return Event(
        key=key,
        source="t",
        line=1,
        workflow="wf",
        instance_id="i1",
        event_type="evt",
        body=b'{"n":1}',
    )


async def one_envelope(tx: Transport) -> Envelope:
    """The envelope the engine writes after exactly one attempt."""
    engine = Engine(
        transport=tx,
        gate=RateGate(None),
        policy=RetryPolicy(max_attempts=1, max_rate_limited=1, max_retry_wait=60),
        concurrency=1,
    )

    async def batches() -> Any:
        batch: list[Record] = [event()]
        yield batch

    send, receive = anyio.create_memory_object_stream[Envelope](4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run, batches(), send)
        async with receive:
            got = [env async for env in receive]
    assert len(got) == 1
    return got[0]


def expected(case: Case) -> tuple[bool, Delivery | None, ErrorKind | None]:
    ok, delivery = judge(frozenset({case.seen}), False)
    kind = case.kind
    if case.name == "rate_limited_429":
        kind = ErrorKind.RATE_LIMITED  # one 429 allowed: the policy gave up
    return ok, delivery, kind


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in str(text), f"a credential leaked into {text!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_both_clients_give_the_tables_envelope(case: Case) -> None:
    seen: dict[str, tuple[object, ...]] = {}
    for name, make in CLIENTS.items():
        legacy = name == "aiohttp" and "echo" in case.name  # both schemes get echoed
        async with serve(case) as server:
            tx = make(config(server.url, legacy=legacy))
            try:
                outcome = await tx.send(event())
                env = await one_envelope(tx)
            finally:
                await tx.aclose()
        assert seen_of(outcome) is case.seen, (name, outcome)
        assert outcome.error_kind is case.kind, (name, outcome)
        if case.retry_after is not None:
            assert outcome.retry_after == case.retry_after, (name, outcome)
        ok, delivery, kind = expected(case)
        assert (env.ok, env.delivery) == (ok, delivery), (name, env)
        assert (env.error.kind if env.error else None) is kind, (name, env)
        assert env.attempts == 1
        assert sum(env.statuses.values()) == 1
        # No redirect followed, no second host reached, no credential in anything written.
        assert len(server.requests) == 2 * case.requests, (name, server.requests)
        assert server.other_requests == []
        assert_no_secret(repr(outcome), repr(env), repr(tx))
        seen[name] = (env.ok, env.delivery, env.status, env.error and env.error.kind)
    assert seen["fast"] == seen["aiohttp"]


@pytest.mark.parametrize("client", CLIENTS)
async def test_connection_refused_is_never_connected(client: str) -> None:
    tx = CLIENTS[client](config(refused_url()))
    try:
        outcome = await tx.send(event())
        env = await one_envelope(tx)
    finally:
        await tx.aclose()
    assert seen_of(outcome) is Seen.NOT_CONNECTED
    # Nothing ever listened there: the run stops (kind stopped, so --resume sends it).
    assert (env.ok, env.delivery, env.error and env.error.kind) == (
        False,
        Delivery.NOT_SENT,
        ErrorKind.STOPPED,
    )
    assert env.statuses == {"connect": 1}


async def test_messages_keep_a_readable_head_of_an_echoing_page() -> None:
    case = next(c for c in CASES if c.name == "unauthorized_401_echoes_request")
    async with serve(case) as server:
        tx = FastTransport(config(server.url))
        try:
            outcome = await tx.send(event())
        finally:
            await tx.aclose()
    assert outcome.message is not None
    assert "<redacted>" in outcome.message
    assert "POST /client/v4/accounts/acc/" in outcome.message
    assert_no_secret(outcome.message)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize(
    ("case_name", "code", "message"),
    [
        ("gzip_error_404", 10400, "instance not found"),
        ("deflate_error_500", 10001, "internal error"),
    ],
)
async def test_a_compressed_error_body_keeps_its_cloudflare_code(
    client: str, case_name: str, code: int, message: str
) -> None:
    case = next(c for c in CASES if c.name == case_name)
    async with serve(case) as server:
        tx = CLIENTS[client](config(server.url))
        try:
            outcome = await tx.send(event())
            env = await one_envelope(tx)
        finally:
            await tx.aclose()
    assert outcome.cf_code == code
    assert outcome.message == message
    assert env.error is not None
    assert (env.error.code, env.error.message) == (code, message)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("case_name", ["gzip_corrupt_error_503", "gzip_corrupt_200", "brotli_200"])
async def test_an_undecodable_body_says_so_in_words_not_bytes(client: str, case_name: str) -> None:
    case = next(c for c in CASES if c.name == case_name)
    async with serve(case) as server:
        tx = CLIENTS[client](config(server.url))
        try:
            outcome = await tx.send(event())
        finally:
            await tx.aclose()
    assert not outcome.ok
    assert outcome.message is not None
    assert "body" in outcome.message
    assert outcome.message.isprintable()
    assert "\ufffd" not in outcome.message  # no compressed bytes decoded as text
