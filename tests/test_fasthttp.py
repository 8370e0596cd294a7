"""FastTransport: the same outcomes as the aiohttp transport, from a much leaner client.

Against the in-process emulator for the API's behaviour, and against tiny raw servers
written here for the framing and connection edge cases the emulator cannot produce.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from dispatcher.clients.base import TransportConfig
from dispatcher.clients.fast import FastTransport
from dispatcher.emulator import Emulator, EmulatorConfig, Faults, Limit
from dispatcher.model import ErrorKind, Event

SECRET = "tok-fasthttp-5ec2e7"
OK_BODY = b'{"success":true,"errors":[],"messages":[],"result":{"instanceId":"x"}}'

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def event(instance_id: str = "i1", event_type: str = "evt", body: bytes | None = b"{}") -> Event:
    return Event(
        key="k",
        source="t",
        line=1,
        workflow="wf",
        instance_id=instance_id,
        event_type=event_type,
        body=body,
    )


def config(base_url: str, **kw: float) -> TransportConfig:
    return TransportConfig(
        base_url=base_url,
        account_id="acc",
        auth_headers={"Authorization": f"Bearer {SECRET}"},
        timeout=kw.get("timeout", 5.0),
        connect_timeout=kw.get("connect_timeout", 2.0),
        pool_size=int(kw.get("pool_size", 8)),
    )


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One whole request (head and Content-Length body) off a raw connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def ok_response(extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(OK_BODY)).encode()
        + b"\r\n\r\n"
        + OK_BODY
    )


class RawServer:
    """A raw asyncio server on 127.0.0.1 that counts the connections it accepted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def raw_server(
    handler: Handler, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[RawServer, str]]:
    raw = RawServer(handler)
    server = await asyncio.start_server(raw._serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls is not None else "http"
    async with server:
        yield raw, f"{scheme}://127.0.0.1:{port}/client/v4"
        server.close()


# -- against the emulator -------------------------------------------------------------------


async def test_success_with_and_without_body_and_encoded_ids() -> None:
    cfg = EmulatorConfig(tokens=(SECRET,), limit=None, strict_ids=False)
    async with Emulator(cfg) as emu, FastTransport(config(emu.base_url)) as tx:
        first = await tx.send(event("a/b c", body=b'{"x":1}'))
        no_body = await tx.send(event("c", body=None))
        accepted = set(emu.log.accepted)
    assert first.ok
    assert first.status == 200
    assert first.sent
    assert no_body.ok
    # "a/b c" went out as one percent-encoded segment and arrived decoded whole.
    assert ("wf", "a/b c", "evt") in {k[:3] for k in accepted}
    assert ("wf", "c", "evt", None) in accepted


async def test_not_found_maps_to_http_error_with_cloudflare_code() -> None:
    cfg = EmulatorConfig(limit=None, known_instances=frozenset({"i1"}))
    async with Emulator(cfg) as emu, FastTransport(config(emu.base_url)) as tx:
        outcome = await tx.send(event("nobody"))
    assert outcome.status == 404
    assert not outcome.ok
    assert outcome.error_kind is ErrorKind.HTTP
    assert outcome.cf_code == 10400


async def test_rate_limited_answer_carries_retry_after_and_ratelimit() -> None:
    cfg = EmulatorConfig(limit=Limit(quota=1, window=60.0))
    async with Emulator(cfg) as emu, FastTransport(config(emu.base_url)) as tx:
        first = await tx.send(event("i1"))
        limited = await tx.send(event("i2"))
    assert first.ok
    assert first.ratelimit is not None
    assert first.ratelimit.quota == 1
    assert limited.status == 429
    assert limited.retry_after is not None
    assert limited.retry_after > 0
    assert limited.ratelimit is not None
    assert limited.ratelimit.remaining == 0


async def test_latency_over_timeout_is_a_sent_timeout() -> None:
    cfg = EmulatorConfig(limit=None, faults=Faults.parse([], latency="500ms"))
    async with Emulator(cfg) as emu, FastTransport(config(emu.base_url, timeout=0.1)) as tx:
        outcome = await tx.send(event())
    assert outcome.status is None
    assert outcome.error_kind is ErrorKind.TIMEOUT
    assert outcome.sent is True
    assert outcome.latency_s < 0.4


async def test_dropped_connection_is_sent_connection_error() -> None:
    cfg = EmulatorConfig(limit=None, faults=Faults.parse(["drop=100%"]))
    async with Emulator(cfg) as emu, FastTransport(config(emu.base_url)) as tx:
        outcome = await tx.send(event())
    assert outcome.error_kind is ErrorKind.CONNECTION
    assert outcome.sent is True
    assert outcome.status is None


async def test_many_concurrent_sends_share_the_pool_and_arrive_once() -> None:
    cfg = EmulatorConfig(limit=None)
    async with Emulator(cfg) as emu, FastTransport(config(emu.base_url, pool_size=8)) as tx:
        outcomes = await asyncio.gather(*(tx.send(event(f"i{k}")) for k in range(200)))
        per_instance = [str(r.instance_id) for r in emu.log.requests]
    assert all(o.ok for o in outcomes)
    assert sorted(per_instance) == sorted(f"i{k}" for k in range(200))


async def test_token_never_in_repr_or_messages() -> None:
    cfg = EmulatorConfig(limit=None, faults=Faults.parse(["drop=100%"]))
    async with Emulator(cfg) as emu:
        tx = FastTransport(config(emu.base_url))
        assert SECRET not in repr(tx)
        dropped = await tx.send(event())
        await tx.aclose()
    assert SECRET not in str(dropped)
    with pytest.raises(ValueError, match="line break") as info:
        FastTransport(
            TransportConfig(
                base_url="http://127.0.0.1:1",
                account_id="acc",
                auth_headers={"Authorization": f"Bearer {SECRET}\r\nX-Evil: 1"},
            )
        )
    assert SECRET not in str(info.value)


# -- against raw servers --------------------------------------------------------------------


async def test_a_request_after_an_answered_one_still_times_out() -> None:
    # One deadline timer serves every request: it first fires for the answered request's
    # deadline and must then re-arm for the stalled one, which has to time out, not hang.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok_response())
        await read_request(reader)
        await asyncio.sleep(30)  # the second request is never answered

    async with raw_server(handler) as (_, url), FastTransport(config(url, timeout=0.3)) as tx:
        first = await tx.send(event("a"))
        await asyncio.sleep(0.15)
        second = await asyncio.wait_for(tx.send(event("b")), 10)
    assert first.ok
    assert second.error_kind is ErrorKind.TIMEOUT
    assert second.sent is True
    assert 0.25 <= second.latency_s < 5


async def test_request_head_is_exact() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            raw.requests.append(await read_request(reader))
            writer.write(ok_response())

    async with raw_server(handler) as (raw, url), FastTransport(config(url)) as tx:
        assert (await tx.send(event("a b", body=b'{"x":1}'))).ok
        assert (await tx.send(event("c", body=None))).ok
    with_body, without = raw.requests
    host = url.removeprefix("http://").removesuffix("/client/v4")
    assert with_body.startswith(
        b"POST /client/v4/accounts/acc/workflows/wf/instances/a%20b/events/evt HTTP/1.1\r\n"
        + f"Host: {host}\r\n".encode()
    )
    assert f"Authorization: Bearer {SECRET}\r\n".encode() in with_body
    assert with_body.endswith(b'Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{"x":1}')
    assert b"Content-Type" not in without
    assert without.endswith(b"Content-Length: 0\r\n\r\n")
    assert raw.connections == 1  # keep-alive: both on one connection


async def test_proxy_502_with_html_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        page = b"<html><body>502 Bad Gateway</body></html>"
        writer.write(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: "
            + str(len(page)).encode()
            + b"\r\n\r\n"
            + page
        )

    async with raw_server(handler) as (_, url), FastTransport(config(url)) as tx:
        outcome = await tx.send(event())
    assert outcome.status == 502
    assert outcome.error_kind is ErrorKind.HTTP
    assert outcome.cf_code is None
    assert "502 Bad Gateway" in str(outcome.message)


async def test_chunked_answer_in_pieces_then_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            half = len(OK_BODY) // 2
            parts = [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nRatelimit: ",
                b'"default";r=9;t=3\r\n\r\n',
                f"{half:x};ext=1\r\n".encode() + OK_BODY[:half],
                b"\r\n" + f"{len(OK_BODY) - half:X}\r\n".encode(),
                OK_BODY[half:] + b"\r\n0\r\n",
                b"X-Trailer: t\r\n\r\n",
            ]
            for part in parts:  # each piece separately: the parser must resume mid-frame
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.001)

    async with raw_server(handler) as (raw, url), FastTransport(config(url)) as tx:
        first = await tx.send(event())
        second = await tx.send(event())
    assert first.ok
    assert second.ok
    assert first.ratelimit is not None
    assert first.ratelimit.remaining == 9
    assert raw.connections == 1


async def test_read_to_close_body_and_connection_close_answer_opens_a_new_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if raw.connections == 1:
            writer.write(ok_response(b"Connection: close\r\n"))
        else:
            # Neither Content-Length nor chunked: the close ends the body.
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + OK_BODY)
        await writer.drain()

    async with raw_server(handler) as (raw, url), FastTransport(config(url)) as tx:
        first = await tx.send(event())
        second = await tx.send(event())
        third = await tx.send(event())
    assert (first.ok, second.ok, third.ok) == (True, True, True)
    assert raw.connections == 3


async def test_reused_connection_closed_without_answer_is_sent_then_next_is_fresh() -> None:
    # The race a keep-alive client cannot avoid: the server closes the connection just as
    # the next request goes out. It may have read it, so it counts as sent; no retry here.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok_response())
        await writer.drain()
        if raw.connections == 1:
            await read_request(reader)  # read the second request, answer nothing, close
            return
        while True:
            await read_request(reader)
            writer.write(ok_response())

    async with raw_server(handler) as (raw, url), FastTransport(config(url)) as tx:
        first = await tx.send(event())
        broken = await tx.send(event())
        after = await tx.send(event())
    assert first.ok
    assert broken.error_kind is ErrorKind.CONNECTION
    assert broken.sent is True
    assert after.ok
    assert raw.connections == 2


async def test_idle_connection_the_server_closed_is_not_reused() -> None:
    # A close seen while the connection sat idle means nothing was sent on it: the next
    # request goes on a fresh connection and succeeds.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok_response())
        await writer.drain()
        if raw.connections == 1:
            return  # idle close, as a server's keep-alive timeout does
        while True:
            await read_request(reader)
            writer.write(ok_response())

    async with raw_server(handler) as (raw, url), FastTransport(config(url)) as tx:
        assert (await tx.send(event())).ok
        await asyncio.sleep(0.05)  # the FIN arrives while idle
        assert (await tx.send(event())).ok
    assert raw.connections == 2


async def test_connection_refused_is_connect_not_sent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with FastTransport(config(f"http://127.0.0.1:{port}/client/v4")) as tx:
        outcome = await tx.send(event())
    assert outcome.error_kind is ErrorKind.CONNECT
    assert outcome.sent is False
    assert outcome.status is None
    assert SECRET not in str(outcome.message)


async def test_tls_handshake_failure_is_connect_not_sent() -> None:
    # A plain-HTTP server behind an https URL: the handshake fails, nothing was sent.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    async with raw_server(handler) as (_, url):
        tls_url = url.replace("http://", "https://")
        async with FastTransport(config(tls_url, connect_timeout=1.0)) as tx:
            outcome = await tx.send(event())
    assert outcome.error_kind is ErrorKind.CONNECT
    assert outcome.sent is False


@pytest.fixture
def cert_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"),
            *("ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


async def test_https_verifies_the_certificate_and_keeps_alive(
    cert_pair: tuple[Path, Path],
) -> None:
    key, cert = cert_pair
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(ok_response())

    async with raw_server(handler, tls=server_ctx) as (raw, url):
        trusting = ssl.create_default_context(cafile=str(cert))
        async with FastTransport(config(url), ssl_context=trusting) as tx:
            outcomes = [await tx.send(event()) for _ in range(3)]
        # The default context does not trust a self-signed certificate: verification is on.
        async with FastTransport(config(url)) as tx:
            untrusted = await tx.send(event())
    assert all(o.ok for o in outcomes)
    # Three requests on one TLS connection; the refused handshake never reached the handler.
    assert raw.connections == 1
    assert untrusted.error_kind is ErrorKind.CONNECT
    assert untrusted.sent is False
    assert "CERTIFICATE_VERIFY_FAILED" in str(untrusted.message)


async def test_cancelled_send_closes_its_connection() -> None:
    answer = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await answer.wait()
            writer.write(ok_response())

    async with raw_server(handler) as (raw, url), FastTransport(config(url)) as tx:
        task = asyncio.create_task(tx.send(event()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        answer.set()
        # The late answer must not be taken as this request's: a new connection is used.
        assert (await tx.send(event())).ok
    assert raw.connections == 2


async def test_garbage_answer_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with raw_server(handler) as (_, url), FastTransport(config(url)) as tx:
        outcome = await tx.send(event())
    assert outcome.error_kind is ErrorKind.PROTOCOL
    assert outcome.sent is True


async def test_aclose_closes_every_connection() -> None:
    closed = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed
        try:
            while True:
                await read_request(reader)
                writer.write(ok_response())
        except asyncio.IncompleteReadError:
            closed += 1

    async with raw_server(handler) as (raw, url):
        tx = FastTransport(config(url, pool_size=4))
        outcomes = await asyncio.gather(*(tx.send(event(f"i{k}")) for k in range(4)))
        assert all(o.ok for o in outcomes)
        await tx.aclose()
        await asyncio.sleep(0.05)
        assert closed == raw.connections == 4


async def test_held_writes_wait_for_the_barrier_and_a_failed_barrier_sends_nothing() -> None:
    cfg = EmulatorConfig(limit=None)
    calls: list[int] = []  # requests the server had when the barrier ran

    async with Emulator(cfg) as emu, FastTransport(config(emu.base_url, pool_size=8)) as tx:

        def barrier() -> None:
            calls.append(emu.log.total_requests())

        tx.hold_writes(barrier)
        outcomes = await asyncio.gather(*(tx.send(event(f"h{k}")) for k in range(8)))
        assert all(o.ok for o in outcomes)
        # The 8 sends of one turn were written together, after one barrier call.
        assert calls == [0]

        def refuse() -> None:
            raise OSError(28, "No space left on device")

        tx.hold_writes(refuse)
        results = await asyncio.gather(
            *(tx.send(event(f"r{k}")) for k in range(8)), return_exceptions=True
        )
        assert all(isinstance(r, OSError) and r.errno == 28 for r in results)
        assert emu.log.total_requests() == 8  # none of them left

        tx.hold_writes(None)
        again = await asyncio.gather(*(tx.send(event(f"a{k}")) for k in range(8)))
        assert all(o.ok for o in again)
        assert emu.log.total_requests() == 16
