"""HTTPS_PROXY / NO_PROXY: both clients tunnel through a CONNECT proxy on 127.0.0.1.

The API is an aiohttp HTTPS server with a trustme certificate for 127.0.0.1; the proxy is
a tiny CONNECT relay that keeps every byte the client sent it. The token must reach the
API and never be readable by the proxy.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
import trustme
from aiohttp import web

from dispatcher.clients.aiohttp_client import HttpTransport
from dispatcher.clients.base import TransportConfig
from dispatcher.clients.fast import FastTransport
from dispatcher.clients.proxy import ProxyError, proxy_for
from dispatcher.clients.relay import RelayConfig, RelayTransport
from dispatcher.model import Event

TOKEN = "tok-SECRET-7f3a9c"


def event() -> Event:
    return Event(
        key="k", source="t", line=1, workflow="wf", instance_id="i1", event_type="e", body=b"{}"
    )


class ConnectProxy:
    """CONNECT host:port, then relay both ways; ``seen`` is what the client sent."""

    def __init__(self) -> None:
        self.seen = bytearray()
        self.targets: list[str] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.seen += head
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if method != b"CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self.targets.append(target.decode())
        host, port = target.decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await src.read(65536):
                    if keep:
                        self.seen += data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


@asynccontextmanager
async def https_api(ca: trustme.CA) -> AsyncIterator[tuple[str, list[str]]]:
    auth: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        auth.append(request.headers.get("Authorization", ""))
        if request.path.endswith("/events"):  # the relay Worker's batch endpoint
            events = (await request.json())["events"]
            results = [{"key": e["key"], "ok": True} for e in events]
            return web.json_response({"success": True, "results": results})
        return web.json_response({"success": True, "errors": [], "messages": [], "result": {}})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}/client/v4", auth
    finally:
        await runner.cleanup()


@asynccontextmanager
async def connect_proxy() -> AsyncIterator[ConnectProxy]:
    proxy = ConnectProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()


def config(url: str) -> TransportConfig:
    return TransportConfig(
        base_url=url,
        account_id="acc",
        auth_headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5.0,
        connect_timeout=5.0,
        pool_size=2,
    )


@pytest.mark.parametrize("client", ["fast", "aiohttp", "relay"])
async def test_https_goes_through_the_connect_tunnel_and_the_proxy_never_sees_the_token(
    client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with https_api(ca) as (url, auth), connect_proxy() as proxy:
        for name in ("NO_PROXY", "no_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        if client == "fast":
            async with FastTransport(config(url), ssl_context=trusting) as fast:
                outcomes = [await fast.send(event()) for _ in range(2)]
        elif client == "relay":
            # A relay Worker on workers.dev is reached through the proxy as the API is.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting))
            relay = RelayTransport(RelayConfig(base_url=url, secret=TOKEN), session=session)
            try:
                outcomes = [await relay.send(event()) for _ in range(2)]
            finally:
                await relay.aclose()  # closes the session too
        else:
            # Behind a proxy HttpTransport sends the credentials with each request: a
            # session default header would be copied into the CONNECT by aiohttp.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting))
            async with HttpTransport(config(url), session=session) as slow:
                outcomes = [await slow.send(event()) for _ in range(2)]
    assert all(o.ok for o in outcomes), outcomes
    api_port = url.split(":")[2].split("/")[0]
    assert proxy.targets
    assert set(proxy.targets) == {f"127.0.0.1:{api_port}"}
    assert auth == [f"Bearer {TOKEN}"] * 2  # the API got the token...
    assert TOKEN.encode() not in proxy.seen, bytes(proxy.seen).split(b"\r\n\r\n")[0]
    assert b"Bearer" not in proxy.seen


def test_no_proxy_and_variable_precedence() -> None:
    url = "https://api.cloudflare.com/client/v4"
    assert proxy_for(url, {}) is None
    route = proxy_for(url, {"HTTPS_PROXY": "http://p:3128"})
    assert route is not None
    assert (route.host, route.port, route.variable) == ("p", 3128, "HTTPS_PROXY")
    lower = proxy_for(url, {"HTTPS_PROXY": "http://p:1", "https_proxy": "q:2"})
    assert lower is not None
    assert (lower.host, lower.port) == ("q", 2)
    assert proxy_for(url, {"ALL_PROXY": "http://a:9"}) is not None
    for no_proxy in ("*", "cloudflare.com", ".cloudflare.com", "api.cloudflare.com"):
        assert proxy_for(url, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": no_proxy}) is None
    assert proxy_for(url, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"}) is not None
    # A plain-http (loopback) target is never proxied: the token would cross in clear text.
    assert proxy_for("http://127.0.0.1:8787/client/v4", {"HTTP_PROXY": "http://p:1"}) is None


def test_a_proxy_url_with_a_password_is_never_printed_and_socks_is_refused() -> None:
    route = proxy_for("https://h/x", {"HTTPS_PROXY": "http://user:hunter2@p:3128"})
    assert route is not None
    assert "hunter2" not in repr(route)
    assert "hunter2" not in str(route)
    with pytest.raises(ProxyError, match=r"HTTPS_PROXY: only http://host:port proxies"):
        proxy_for("https://h/x", {"HTTPS_PROXY": "socks5://p:1080"})
