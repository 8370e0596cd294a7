"""A hostile HTTP server on 127.0.0.1: each case answers the way some real server once did.

Captive portals, proxies, load balancers and broken servers send things no API does: HTML
with a 200, redirects, cut-off bodies, framing no parser should accept, HTTP/2 to an
HTTP/1.1 client, endless heads. A :class:`Case` is one such answer, written as the raw
bytes (and socket actions) the server sends after reading one request; :data:`CASES` lists
them with what one attempt must see (:class:`~dispatcher.results.envelopes.Seen`) and its
error kind, from which the truth table gives the envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from dispatcher.model import ErrorKind
from dispatcher.results.envelopes import Seen

SECRET = "hostile-secret-tok-9f3a1c77"
EMAIL = "ops@example.test"
KEY = "legacy-key-0c5d7e61b2"

Writer = asyncio.StreamWriter
Action = Callable[[Writer, bytes, "HostileServer"], Awaitable[None]]


def answer(status: str, headers: list[str], body: bytes = b"", *, length: bool = True) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


SUCCESS_BODY = b'{"success":true,"errors":[],"messages":[],"result":{}}'
NOT_FOUND_BODY = (
    b'{"success":false,"errors":[{"code":10400,"message":"instance not found"}],"messages":[]}'
)
INTERNAL_BODY = (
    b'{"success":false,"errors":[{"code":10001,"message":"internal error"}],"messages":[]}'
)


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def _corrupt(data: bytes) -> bytes:
    """Flip bytes in the middle of a compressed stream (its header stays valid)."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 4]) + data[middle + 4 :]


JSON = "Content-Type: application/json"
HTML = "Content-Type: text/html; charset=utf-8"


def _send(data: bytes, *, close: bool = True) -> Action:
    async def act(writer: Writer, request: bytes, server: HostileServer) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return act


def _reset_after(data: bytes) -> Action:
    """Send ``data``, let it arrive, then reset the connection (RST, not FIN)."""

    async def act(writer: Writer, request: bytes, server: HostileServer) -> None:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    return act


def _echo(status: str, *, as_json: bool) -> Action:
    """An error page that quotes the request back, credentials and all."""

    async def act(writer: Writer, request: bytes, server: HostileServer) -> None:
        text = request.decode("latin-1")
        if as_json:
            import orjson

            body = orjson.dumps(
                {
                    "success": False,
                    "errors": [{"code": 10000, "message": f"bad request: {text}"}],
                }
            )
            writer.write(answer(status, [JSON], body))
        else:
            writer.write(answer(status, [HTML], f"<pre>{text}</pre>".encode("latin-1")))
        await writer.drain()
        writer.close()

    return act


def _redirect(status: str, where: Callable[[HostileServer], str]) -> Action:
    async def act(writer: Writer, request: bytes, server: HostileServer) -> None:
        writer.write(answer(status, [f"Location: {where(server)}", HTML], b"<a>moved</a>"))
        await writer.drain()
        writer.close()

    return act


async def _hang(writer: Writer, request: bytes, server: HostileServer) -> None:
    await asyncio.sleep(30)


async def _close_silently(writer: Writer, request: bytes, server: HostileServer) -> None:
    writer.close()


def _many_headers(count: int, size: int) -> bytes:
    headers = [f"X-Filler-{i}: {'a' * size}" for i in range(count)]
    return answer("200 OK", [JSON, *headers], SUCCESS_BODY)


def _chunked(*chunks: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    for chunk in chunks:
        out += f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    return out + b"0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Case:
    """One hostile answer and what one attempt against it must see."""

    name: str
    action: Action
    seen: Seen
    kind: ErrorKind | None  # the attempt's error kind (None: confirmed)
    why: str = ""
    retry_after: float | None = None
    requests: int = 1  # requests the server may receive (a redirect followed would be 2)


CASES: tuple[Case, ...] = (
    Case("success", _send(answer("200 OK", [JSON], SUCCESS_BODY)), Seen.SUCCESS, None),
    Case(
        "captive_portal_html_200",
        _send(answer("200 OK", [HTML], b"<html><body>Log in to the Wi-Fi</body></html>")),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
    ),
    Case(
        "html_quoting_success_true",
        _send(answer("200 OK", [HTML], b'<html>{"success":true}</html>')),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
    ),
    Case("empty_200", _send(answer("200 OK", [JSON])), Seen.IN_DOUBT, ErrorKind.HTTP),
    Case("json_array_200", _send(answer("200 OK", [JSON], b"[]")), Seen.IN_DOUBT, ErrorKind.HTTP),
    Case(
        "success_is_string",
        _send(answer("200 OK", [JSON], b'{"success":"false"}')),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
    ),
    Case(
        "success_missing",
        _send(answer("200 OK", [JSON], b'{"result":{}}')),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
    ),
    Case(
        "nested_success_true",
        _send(answer("200 OK", [JSON], b'{"success":false,"result":{"success":true}}')),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "success_then_trailing_garbage",
        _send(answer("200 OK", [JSON], b'{"success":true}<!-- cache -->')),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
    ),
    Case(
        "no_content_204", _send(b"HTTP/1.1 204 No Content\r\n\r\n"), Seen.IN_DOUBT, ErrorKind.HTTP
    ),
    Case(
        "body_cut_by_reset",
        _reset_after(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + SUCCESS_BODY),
        Seen.NO_ANSWER,
        ErrorKind.CONNECTION,
    ),
    Case(
        "body_cut_by_close",
        _send(b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n" + SUCCESS_BODY),
        Seen.NO_ANSWER,
        ErrorKind.CONNECTION,
    ),
    Case(
        "chunked_body_cut_by_close",
        _send(_chunked(SUCCESS_BODY)[:-5]),
        Seen.NO_ANSWER,
        ErrorKind.CONNECTION,
    ),
    Case(
        "read_until_close_clean",
        _send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + SUCCESS_BODY),
        Seen.SUCCESS,
        None,
        why="no Content-Length, not chunked: the close ends the body (RFC 9112 6.3)",
    ),
    Case(
        "chunked_success",
        _send(_chunked(SUCCESS_BODY[:10], SUCCESS_BODY[10:]), close=False),
        Seen.SUCCESS,
        None,
    ),
    Case(
        "interim_100_then_success",
        _send(b"HTTP/1.1 100 Continue\r\n\r\n" + answer("200 OK", [JSON], SUCCESS_BODY)),
        Seen.SUCCESS,
        None,
    ),
    Case(
        "early_hints_103_then_success",
        _send(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            + answer("200 OK", [JSON], SUCCESS_BODY)
        ),
        Seen.SUCCESS,
        None,
    ),
    Case(
        "junk_after_the_answer",
        _send(answer("200 OK", [JSON], SUCCESS_BODY) + b"HTTP/1.1 500 Oops\r\n\r\n"),
        Seen.SUCCESS,
        None,
        why="the answer is whole; the junk only makes the connection unusable",
    ),
    Case(
        "redirect_302_same_host",
        _redirect("302 Found", lambda s: f"{s.url}/elsewhere"),
        Seen.ERROR,
        ErrorKind.HTTP,
        why="a followed 302 turns the POST into a GET whose 200 looked like a confirmation",
    ),
    Case(
        "redirect_307_other_host",
        _redirect("307 Temporary Redirect", lambda s: s.other_url),
        Seen.ERROR,
        ErrorKind.HTTP,
        why="a followed 307 carries the credentials to the other host",
    ),
    Case(
        "redirect_308_to_https_elsewhere",
        _redirect("308 Permanent Redirect", lambda s: "https://login.example.test/"),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "redirect_loop",
        _redirect("301 Moved Permanently", lambda s: s.url),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "not_modified_304",
        _send(b"HTTP/1.1 304 Not Modified\r\n\r\n"),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "duplicate_content_length_differs",
        _send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 16\r\n\r\n" + b"x" * 16),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "duplicate_content_length_same",
        _send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nContent-Length: 16\r\n\r\n"
            + b'{"success":true}'
        ),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
        why="RFC 9112 6.3 allows a recipient to reject it, and llhttp does",
    ),
    Case(
        "content_length_and_chunked",
        _send(
            b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'10\r\n{"success":true}\r\n0\r\n\r\n'
        ),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
        why="a body framed two ways is how responses get smuggled",
    ),
    Case(
        "space_before_colon",
        _send(b'HTTP/1.1 200 OK\r\nContent-Length : 16\r\n\r\n{"success":true}'),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "chunk_size_0x",
        _send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'0x10\r\n{"success":true}\r\n0\r\n\r\n'
        ),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "chunk_size_not_hex",
        _send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "header_over_8k",
        _send(answer("200 OK", [JSON, "X-Big: " + "a" * 9000], SUCCESS_BODY)),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "head_over_64k_in_one_write",
        _send(_many_headers(100, 700)),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "too_many_headers",
        _send(_many_headers(200, 3)),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "endless_head",
        _send(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 20_000, close=False),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "body_over_1mib_announced",
        _send(answer("200 OK", [JSON], b" " * (2 * 1024 * 1024))),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "chunked_body_over_1mib",
        _send(_chunked(*([b" " * 65536] * 20))),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "garbage_status_line",
        _send(b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "not_http_at_all",
        _send(b"SSH-2.0-OpenSSH_9.6\r\n"),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "http2_preface",
        _send(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", close=False),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
        why="an h2-only server answers an HTTP/1.1 request with a SETTINGS frame",
    ),
    Case(
        "switching_protocols_101",
        _send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
            close=False,
        ),
        Seen.ERROR,
        ErrorKind.HTTP,
        why="101 is a final answer, not an interim one: waiting for another only times out",
    ),
    Case(
        "null_byte_in_header",
        _send(answer("200 OK", [JSON, "X-Bad: a\x00b"], SUCCESS_BODY)),
        Seen.NO_ANSWER,
        ErrorKind.PROTOCOL,
    ),
    Case(
        "gzip_body_nobody_asked_for",
        _send(answer("200 OK", [JSON, "Content-Encoding: gzip"], gzip.compress(SUCCESS_BODY))),
        Seen.SUCCESS,
        None,
        why="neither client asks for compression, but a proxy may compress anyway: decoded, "
        "the envelope is complete",
    ),
    Case(
        "gzip_twice_and_identity",
        _send(
            answer(
                "200 OK",
                [JSON, "Content-Encoding: gzip, identity, GZIP"],
                gzip.compress(gzip.compress(SUCCESS_BODY)),
            )
        ),
        Seen.SUCCESS,
        None,
        why="codings are undone last first, case-insensitively; identity is none",
    ),
    Case(
        "gzip_two_members",
        _send(
            answer(
                "200 OK",
                [JSON, "Content-Encoding: gzip"],
                gzip.compress(SUCCESS_BODY[:10]) + gzip.compress(SUCCESS_BODY[10:]),
            )
        ),
        Seen.SUCCESS,
        None,
        why="a gzip file may hold several members (RFC 1952 2.2)",
    ),
    Case(
        "deflate_zlib_body",
        _send(answer("200 OK", [JSON, "Content-Encoding: deflate"], zlib.compress(SUCCESS_BODY))),
        Seen.SUCCESS,
        None,
    ),
    Case(
        "deflate_raw_body",
        _send(answer("200 OK", [JSON, "Content-Encoding: deflate"], _raw_deflate(SUCCESS_BODY))),
        Seen.SUCCESS,
        None,
        why="raw deflate without the zlib wrapper, which some servers send for deflate",
    ),
    Case(
        "gzip_corrupt_200",
        _send(
            answer(
                "200 OK",
                [JSON, "Content-Encoding: gzip"],
                _corrupt(gzip.compress(SUCCESS_BODY)),
            )
        ),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
        why="a body that does not decode confirms nothing, though a 2xx may have taken it",
    ),
    Case(
        "gzip_cut_200",
        _send(answer("200 OK", [JSON, "Content-Encoding: gzip"], gzip.compress(SUCCESS_BODY)[:-6])),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
        why="the framing is whole but the gzip stream (and its checksum) is cut",
    ),
    Case(
        "gzip_with_trailing_bytes_200",
        _send(
            answer("200 OK", [JSON, "Content-Encoding: gzip"], gzip.compress(SUCCESS_BODY) + b"xyz")
        ),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
    ),
    Case(
        "plain_body_labelled_gzip_200",
        _send(answer("200 OK", [JSON, "Content-Encoding: gzip"], SUCCESS_BODY)),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
        why="the label says the bytes are compressed: taken at its word, they are garbage",
    ),
    Case(
        "brotli_200",
        _send(answer("200 OK", [JSON, "Content-Encoding: br"], b"\x1b\x2b\x00\xf8" * 4)),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
        why="no brotli decoder is installed: an undecoded body confirms nothing",
    ),
    Case(
        "gzip_bomb_200",
        _send(
            answer(
                "200 OK",
                [JSON, "Content-Encoding: gzip"],
                gzip.compress(SUCCESS_BODY[:-1] + b" " * (2 * 1024 * 1024) + b"}"),
            )
        ),
        Seen.IN_DOUBT,
        ErrorKind.HTTP,
        why="decompressed, the body is over the 1 MiB cap both clients apply",
    ),
    Case(
        "gzip_error_404",
        _send(
            answer(
                "404 Not Found",
                [JSON, "Content-Encoding: gzip"],
                gzip.compress(NOT_FOUND_BODY),
            )
        ),
        Seen.ERROR,
        ErrorKind.HTTP,
        why="the Cloudflare error code is inside the compressed body",
    ),
    Case(
        "deflate_error_500",
        _send(
            answer(
                "500 Internal Server Error",
                [JSON, "Content-Encoding: deflate"],
                zlib.compress(INTERNAL_BODY),
            )
        ),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "gzip_corrupt_error_503",
        _send(
            answer(
                "503 Service Unavailable",
                [JSON, "Content-Encoding: gzip"],
                _corrupt(gzip.compress(INTERNAL_BODY)),
            )
        ),
        Seen.ERROR,
        ErrorKind.HTTP,
        why="an error status is an error answer whatever its body; the message says why "
        "the body says nothing",
    ),
    Case(
        "bad_gateway_html_502",
        _send(answer("502 Bad Gateway", [HTML], b"<html><h1>502 Bad Gateway</h1></html>")),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "unavailable_503_retry_after",
        _send(answer("503 Service Unavailable", ["Retry-After: 7", HTML], b"maintenance")),
        Seen.ERROR,
        ErrorKind.HTTP,
        retry_after=7.0,
    ),
    Case(
        "rate_limited_429",
        _send(
            answer(
                "429 Too Many Requests",
                ["Retry-After: 1", JSON],
                b'{"success":false,"errors":[{"code":971,"message":"slow down"}]}',
            )
        ),
        Seen.ERROR,
        ErrorKind.HTTP,
        retry_after=1.0,
    ),
    Case(
        "unauthorized_401_echoes_request",
        _echo("401 Unauthorized", as_json=False),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "bad_request_400_json_echoes_request",
        _echo("400 Bad Request", as_json=True),
        Seen.ERROR,
        ErrorKind.HTTP,
    ),
    Case(
        "lf_only_line_endings",
        _send(b'HTTP/1.1 200 OK\nContent-Length: 16\n\n{"success":true}'),
        Seen.SUCCESS,
        None,
        why="RFC 9112 2.2 lets a recipient take a bare LF as a line end; both clients do",
    ),
    Case(
        "closed_without_answer",
        _close_silently,
        Seen.NO_ANSWER,
        ErrorKind.CONNECTION,
    ),
    Case("no_answer_timeout", _hang, Seen.NO_ANSWER, ErrorKind.TIMEOUT),
)


@dataclass
class HostileServer:
    """Serves one :class:`Case` on 127.0.0.1; counts the requests it and a second host get."""

    case: Case
    url: str = ""
    other_url: str = ""
    requests: list[bytes] = field(default_factory=list)
    other_requests: list[bytes] = field(default_factory=list)
    listener: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        try:
            # CancelledError too: the server closing ends a handler, and asyncio 3.11 logs it.
            with contextlib.suppress(
                ConnectionError, asyncio.IncompleteReadError, OSError, asyncio.CancelledError
            ):
                while True:
                    request = await read_request(reader)
                    self.requests.append(request)
                    await self.case.action(writer, request, self)
                    if writer.is_closing():
                        return
        finally:
            writer.close()

    async def _serve_other(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, OSError):
            self.other_requests.append(await read_request(reader))
            writer.write(answer("200 OK", [JSON], SUCCESS_BODY))
            await writer.drain()
        writer.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def serve(case: Case) -> AsyncIterator[HostileServer]:
    hostile = HostileServer(case)
    main = await asyncio.start_server(hostile._serve, "127.0.0.1", 0)
    other = await asyncio.start_server(hostile._serve_other, "127.0.0.1", 0)
    hostile.listener = main
    hostile.url = f"http://127.0.0.1:{main.sockets[0].getsockname()[1]}/client/v4"
    hostile.other_url = f"http://127.0.0.1:{other.sockets[0].getsockname()[1]}/steal"
    async with main, other:
        yield hostile
        main.close()
        other.close()


def refused_url() -> str:
    """A 127.0.0.1 URL where nothing listens (a port just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/client/v4"
