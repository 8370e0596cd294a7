"""FastTransport: a lean HTTP/1.1 client for exactly one job, POSTing events to one host.

The aiohttp transport spends most of a request's CPU in generic machinery this job never
uses (cookie jars, redirects, tracing, per-request tasks and stream readers). Here every
connection is one small :class:`asyncio.Protocol` that parses the answer as it arrives and
resolves one future; the request head is a template built once per run in which only the
path and ``Content-Length`` change. Failures map to the same
:class:`~dispatcher.model.ErrorKind` values, with the same ``sent`` rule, as
:class:`~dispatcher.clients.aiohttp_client.HttpTransport`, and answers go through the same
:func:`~dispatcher.clients.base.outcome_from_response`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from types import TracebackType
from typing import Final, NamedTuple, Self, cast
from urllib.parse import urlsplit

from multidict import CIMultiDict

from dispatcher.clients.base import USER_AGENT, TransportConfig, UrlBuilder, outcome_from_response
from dispatcher.clients.proxy import open_tunnel, proxy_for
from dispatcher.model import ErrorKind, Event, Outcome

__all__ = ["FastTransport"]

# Header names whose values the outcome or the framing needs; everything else is skipped
# unparsed, which is most of the saving on a typical Cloudflare answer.
_KEPT_HEADER: Final = re.compile(
    rb"\r\n(retry-after|ratelimit|ratelimit-policy|content-length|transfer-encoding|connection)"
    rb"[ \t]*:([^\r\n]*)",
    re.IGNORECASE,
)
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?:[ \r]|$)")
# A head or chunk-size line longer than this is not an answer from the API: stop reading.
_MAX_HEAD: Final = 64 * 1024
_MAX_LINE: Final = 8 * 1024

# Parser states.
_IDLE: Final = 0
_HEAD: Final = 1
_LENGTH: Final = 2
_CHUNK_SIZE: Final = 3
_CHUNK_DATA: Final = 4
_TRAILERS: Final = 5
_TO_CLOSE: Final = 6


class _BadResponse(Exception):
    """The bytes on the connection are not an HTTP/1.x answer we can frame."""


class _Disconnected(ConnectionError):
    """The connection ended before a whole answer arrived."""


class _Response(NamedTuple):
    status: int
    headers: CIMultiDict[str]
    body: bytes
    keep_alive: bool


class _Conn(asyncio.Protocol):
    """One keep-alive connection: writes one request, parses its answer incrementally."""

    __slots__ = (
        "_body_left",
        "_buf",
        "_chunks",
        "_headers",
        "_keep_alive",
        "_registry",
        "_state",
        "_status",
        "_waiter",
        "closed",
        "transport",
    )

    def __init__(self, registry: set[_Conn]) -> None:
        self._registry = registry
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[_Response] | None = None
        self._buf = bytearray()
        self._state = _IDLE
        self._status = 0
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._keep_alive = True
        self._body_left = 0
        self._chunks: list[bytes] = []

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE:
            # Bytes nobody asked for (a 408 before an idle close, or junk): whatever comes
            # next on this connection could be mistaken for the next answer, so drop it.
            self.abort()
            return
        self._buf += data
        try:
            self._parse()
        except _BadResponse as exc:
            self._fail(exc)
            self.abort()

    def eof_received(self) -> bool | None:
        # Returning a false value lets the transport close itself; connection_lost follows.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._registry.discard(self)
        if self._state == _TO_CLOSE:
            # No Content-Length and not chunked: the close is what ends the body.
            self._complete(bytes(self._buf))
            self._buf.clear()
            return
        if self._state != _IDLE:
            reason = f" ({_describe(exc)})" if exc is not None else ""
            self._fail(_Disconnected(f"the server closed the connection before answering{reason}"))

    # -- used by FastTransport -------------------------------------------------------------

    def request(self, data: bytes, future: asyncio.Future[_Response]) -> None:
        transport = self.transport
        assert transport is not None  # only pooled after connection_made
        self._waiter = future
        self._state = _HEAD
        self._keep_alive = True
        transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- parsing ---------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._waiter = None
        self._state = _IDLE
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _complete(self, body: bytes) -> None:
        waiter = self._waiter
        self._waiter = None
        self._state = _IDLE
        if self._buf:
            # Bytes beyond the answer: the connection's framing can no longer be trusted.
            self._keep_alive = False
        if waiter is not None and not waiter.done():
            waiter.set_result(_Response(self._status, self._headers, body, self._keep_alive))

    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise _BadResponse("response head too large")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._start_body(head)
            elif state == _LENGTH:
                left = self._body_left
                if len(buf) < left:
                    return
                body = bytes(buf[:left])
                del buf[:left]
                self._complete(body)
                return
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_LINE:
                        raise _BadResponse("chunk size line too long")
                    return
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise _BadResponse("bad chunk size") from None
                if size < 0:
                    raise _BadResponse("bad chunk size")
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._body_left = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                left = self._body_left
                if len(buf) < left + 2:
                    return
                if buf[left : left + 2] != b"\r\n":
                    raise _BadResponse("chunk not followed by CRLF")
                self._chunks.append(bytes(buf[:left]))
                del buf[: left + 2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_LINE:
                        raise _BadResponse("trailer line too long")
                    return
                del buf[: end + 2]
                if end == 0:  # the empty line that ends the trailers
                    body = b"".join(self._chunks)
                    self._chunks = []
                    self._complete(body)
                    return
            else:  # _TO_CLOSE: connection_lost completes it
                return

    def _start_body(self, head: bytes) -> None:
        status_line = _STATUS_LINE.match(head)
        if status_line is None:
            raise _BadResponse("not an HTTP/1.x status line")
        status = int(status_line[2])
        http10 = status_line[1] == b"0"
        headers: CIMultiDict[str] = CIMultiDict()
        length: bytes | None = None
        chunked = False
        te_seen = False
        connection = b""
        # One C-level scan picks out the few headers we keep; the rest are never split.
        for raw_name, raw_value in _KEPT_HEADER.findall(head):
            name = raw_name.lower()
            value = raw_value.strip()
            headers.add(name.decode("latin-1"), value.decode("latin-1"))
            if name == b"content-length":
                if length is not None and length != value:
                    raise _BadResponse("conflicting Content-Length headers")
                length = value
            elif name == b"transfer-encoding":
                te_seen = True
                # Only the last coding frames the body.
                chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            else:  # connection
                connection += b"," + value.lower()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            return
        if connection:
            tokens = {t.strip() for t in connection.split(b",")}
            self._keep_alive = (b"keep-alive" in tokens) if http10 else (b"close" not in tokens)
        else:
            self._keep_alive = not http10
        self._status = status
        self._headers = headers
        if status in (204, 304):
            self._complete(b"")
        elif te_seen:
            if chunked:
                self._chunks = []
                self._state = _CHUNK_SIZE
            else:
                self._keep_alive = False
                self._state = _TO_CLOSE
        elif length is not None:
            if not length.isdigit():
                raise _BadResponse("bad Content-Length")
            self._body_left = int(length)
            self._state = _LENGTH
        else:
            self._keep_alive = False
            self._state = _TO_CLOSE


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _expire(future: asyncio.Future[_Response]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no complete answer within the timeout"))


def _check_header(name: str, value: str) -> None:
    # A line break would let a header value smuggle in other headers or a second request.
    # The message names the header, never its value: that is the secret.
    if any(c in name for c in "\r\n:") or not name.strip():
        raise ValueError(f"auth header name {name!r} is not a valid HTTP header name")
    if "\r" in value or "\n" in value:
        raise ValueError(f"the value of auth header {name!r} holds a line break")


class FastTransport:
    """The fast transport: up to ``pool_size`` keep-alive connections to one host.

    Same contract as :class:`~dispatcher.clients.aiohttp_client.HttpTransport`:
    :meth:`send` makes one attempt and never retries, and never raises for a network failure.
    """

    __slots__ = (
        "_config",
        "_conns",
        "_host",
        "_idle",
        "_port",
        "_pre",
        "_proxy",
        "_slots",
        "_ssl",
        "_tail_empty",
        "_tail_json",
        "_url",
    )

    def __init__(self, config: TransportConfig, *, ssl_context: ssl.SSLContext | None = None):
        parts = urlsplit(config.base_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base URL must be http(s)://host[:port][/path], got {parts.scheme}")
        if not parts.path.isascii():
            # The request line is sent as is: the base path must already be percent-encoded.
            raise ValueError("base URL path must be ASCII (percent-encode it)")
        if config.pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {config.pool_size}")
        self._config = config
        self._host = parts.hostname
        default_port = 443 if scheme == "https" else 80
        self._port = parts.port or default_port
        # Verification stays on by default; create_connection sends SNI from server_hostname.
        # A caller-built context is for a private CA (and the tests' own certificate).
        if scheme == "https":
            self._ssl: ssl.SSLContext | None = ssl_context or ssl.create_default_context()
        else:
            self._ssl = None
        # The builder only sees the path: the head carries the host separately.
        self._url = UrlBuilder(parts.path, config.account_id)
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self._port != default_port:
            host = f"{host}:{self._port}"
        for name, value in config.auth_headers.items():
            _check_header(name, value)
        common = f"Host: {host}\r\nUser-Agent: {USER_AGENT}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in config.auth_headers.items()
        )
        self._pre = b"POST "
        self._tail_json = f" HTTP/1.1\r\n{common}Content-Type: application/json\r\nContent-Length: "
        self._tail_empty = f" HTTP/1.1\r\n{common}Content-Length: 0\r\n\r\n".encode()
        self._proxy = proxy_for(config.base_url)
        self._idle: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self._slots = asyncio.Semaphore(config.pool_size)

    def __repr__(self) -> str:
        # The config's repr redacts the auth headers; nothing else here holds them.
        return f"FastTransport({self._config!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._idle.clear()
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        # One turn of the loop lets the transports finish closing before the loop may end.
        await asyncio.sleep(0)

    def _head(self, path: str, body: bytes | None) -> bytes:
        if body is None:
            return self._pre + path.encode("ascii") + self._tail_empty
        tail = f"{path}{self._tail_json}{len(body)}\r\n\r\n".encode()
        return self._pre + tail + body

    async def _connect(self, deadline: float) -> _Conn:
        loop = asyncio.get_running_loop()
        config = self._config
        limit = min(config.connect_timeout, deadline - time.perf_counter())
        async with asyncio.timeout(max(limit, 0.0)):
            if self._proxy is not None:  # HTTPS_PROXY: TLS inside a CONNECT tunnel
                sock = await open_tunnel(self._proxy, self._host, self._port)
                _, conn = await loop.create_connection(
                    lambda: _Conn(self._conns),
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
                return conn
            _, conn = await loop.create_connection(
                lambda: _Conn(self._conns),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        return conn

    async def send(self, event: Event) -> Outcome:
        started = time.perf_counter()
        timeout = self._config.timeout
        data = self._head(
            self._url(event.workflow, event.instance_id, event.event_type), event.body
        )
        slots = self._slots
        if slots.locked():
            # All connections busy: the wait counts against the timeout, like aiohttp's
            # pool wait, and nothing has left yet.
            try:
                async with asyncio.timeout(timeout):
                    await slots.acquire()
            except TimeoutError as exc:
                return _failure(ErrorKind.CONNECT, False, started, exc)
        else:
            await slots.acquire()
        try:
            conn = None
            idle = self._idle
            while idle:
                candidate = idle.pop()  # LIFO: the most recently used is least likely closed
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                try:
                    conn = await self._connect(started + timeout)
                except (OSError, TimeoutError) as exc:
                    # Refused, DNS, TLS handshake (ssl.SSLError is an OSError), timed out.
                    return _failure(ErrorKind.CONNECT, False, started, exc)
            loop = asyncio.get_running_loop()
            future: asyncio.Future[_Response] = loop.create_future()
            timer = loop.call_at(
                loop.time() + timeout - (time.perf_counter() - started), _expire, future
            )
            try:
                conn.request(data, future)
                response = await future
            except TimeoutError as exc:
                conn.abort()
                return _failure(ErrorKind.TIMEOUT, True, started, exc)
            except (OSError, _BadResponse) as exc:
                # Written (or being written) and then the connection broke, including a
                # keep-alive connection the server closed just as we reused it: the server
                # may have read the request, so it counts as sent.
                conn.abort()
                return _failure(ErrorKind.CONNECTION, True, started, exc)
            except BaseException:
                # Cancelled mid-request: the answer may still arrive, so this connection
                # can never be reused.
                conn.abort()
                raise
            finally:
                timer.cancel()
            if response.keep_alive and not conn.closed:
                idle.append(conn)
            else:
                conn.close()
            return outcome_from_response(
                response.status, response.body, response.headers, time.perf_counter() - started
            )
        finally:
            slots.release()


def _failure(kind: ErrorKind, sent: bool, started: float, exc: BaseException) -> Outcome:
    return Outcome(
        status=None,
        ok=False,
        sent=sent,
        latency_s=time.perf_counter() - started,
        error_kind=kind,
        message=_describe(exc),
    )
