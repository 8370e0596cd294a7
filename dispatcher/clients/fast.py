"""FastTransport: a lean HTTP/1.1 client for exactly one job, POSTing events to one host.

The aiohttp transport spends most of a request's CPU in generic machinery this job never
uses (cookie jars, redirects, tracing, per-request tasks and stream readers). Here every
connection is one small :class:`asyncio.Protocol` whose answer llhttp (through
``httptools``, strict) parses as it arrives, resolving one future; the request head is a
template built once per run in which only the path and ``Content-Length`` change. Failures
map to the same :class:`~dispatcher.model.ErrorKind` values, with the same ``sent`` rule,
as :class:`~dispatcher.clients.aiohttp_client.HttpTransport`, answers go through the same
:func:`~dispatcher.clients.base.outcome_from_response`, and both apply the same size caps
(``tests/test_hostile.py`` checks that the two agree on every hostile answer). No redirect
is followed: a 3xx is the final answer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, NamedTuple, Self, cast
from urllib.parse import urlsplit

import httptools

from dispatcher.clients.base import (
    MAX_BODY,
    MAX_FIELD,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_LINE,
    USER_AGENT,
    Redactor,
    TransportConfig,
    UrlBuilder,
    describe,
    failure,
    is_refused,
    outcome_from_response,
    refused_outcome,
)
from dispatcher.clients.proxy import open_tunnel, proxy_for
from dispatcher.model import ErrorKind, Event, Outcome

__all__ = ["FastTransport"]

# Header names the outcome needs; every other header is counted and measured, not kept.
_KEPT: Final = frozenset(
    {b"retry-after", b"ratelimit", b"ratelimit-policy", b"location", b"content-encoding"}
)
_CONTENT_TYPE: Final = b"content-type"
_CONTENT_LENGTH: Final = b"content-length"
_TRANSFER_ENCODING: Final = b"transfer-encoding"


class _BadResponse(Exception):
    """The bytes on the connection are not an HTTP/1.x answer we accept."""


class _Disconnected(ConnectionError):
    """The connection ended before a whole answer arrived."""


class _Response(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case name -> its first value, only those kept
    body: bytes
    keep_alive: bool


class _Conn(asyncio.Protocol):
    """One keep-alive connection: writes one request; llhttp (``httptools``) parses its answer.

    llhttp is strict by default (no leniencies are turned on): it refuses a chunk size like
    ``0x46``, a space before a header's colon, a duplicate ``Content-Length`` and a body
    framed two ways. The callbacks add the size caps shared with the aiohttp client.
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_fed",
        "_head_done",
        "_head_size",
        "_headers",
        "_interim",
        "_needs_eof",
        "_nheaders",
        "_parser",
        "_registry",
        "_waiter",
        "closed",
        "deadline",
        "transport",
    )

    def __init__(self, registry: set[_Conn]) -> None:
        self._registry = registry
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[_Response] | None = None
        # The loop time at which the request out now times out; read by FastTransport's
        # one deadline timer, only while a waiter is set.
        self.deadline = 0.0
        self._parser = httptools.HttpResponseParser(self)
        # The one leniency: a bare LF as a line end, which RFC 9112 2.2 lets a recipient
        # accept, and aiohttp does; nothing else is relaxed.
        self._parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
        self._reset()

    def _reset(self) -> None:
        # A plain dict, not a multidict: only the few headers the outcome reads are kept,
        # by lower-case name, first value wins (as a multidict's get() gives).
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._nheaders = 0
        self._fed = 0
        self._head_done = False
        self._interim = False
        self._needs_eof = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (a 408 before an idle close, or junk): whatever comes
            # next on this connection could be mistaken for the next answer, so drop it.
            self.abort()
            return
        if not self._head_done:
            # Bounds the memory of a head that never ends, whatever the reads look like;
            # the callbacks below count the head exactly when it comes in one read.
            self._fed += len(data)
            if self._fed > MAX_HEAD + len(data):
                self._fail(_BadResponse(f"answer head over {MAX_HEAD} bytes"))
                self.abort()
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_BadResponse("the server switched protocols (HTTP 101): not an API answer"))
            self.abort()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _BadResponse):
                self._fail(cause)
            else:
                self._fail(_BadResponse(f"malformed answer: {exc}"))
            self.abort()

    def eof_received(self) -> bool | None:
        # Returning a false value lets the transport close itself; connection_lost follows.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._registry.discard(self)
        if self._waiter is None:
            return
        if exc is None and self._needs_eof:
            # No Content-Length and not chunked: a clean close is what ends the body. A reset
            # (exc set) cuts it, and a cut body is never an answer.
            self._complete(keep_alive=False)
            return
        reason = f" ({type(exc).__name__})" if exc is not None else ""
        what = "in the middle of the answer" if self._head_done else "before answering"
        self._fail(_Disconnected(f"the server closed the connection {what}{reason}"))

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second answer after the one we asked for: the framing is not trustworthy.
            raise _BadResponse("more bytes after the answer")
        # request() has reset the state, and an interim answer's end resets it again.

    def on_status(self, status: bytes) -> None:
        self._head_size += len(status) + 13
        if self._head_size > MAX_LINE:
            raise _BadResponse(f"status line over {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if size > MAX_FIELD:
            raise _BadResponse(f"a header over {MAX_FIELD} bytes")
        self._head_size += size + 4
        if self._head_size > MAX_HEAD:
            raise _BadResponse(f"answer head over {MAX_HEAD} bytes")
        self._nheaders += 1
        if self._nheaders > MAX_HEADERS:
            raise _BadResponse(f"more than {MAX_HEADERS} headers")
        lower = name.lower()
        if lower in _KEPT or lower == _CONTENT_TYPE:
            self._headers.setdefault(lower.decode("latin-1"), value.decode("latin-1").strip())
        elif lower == _CONTENT_LENGTH:
            # llhttp has checked it is digits; refuse a body over the cap before reading it.
            if int(value) > MAX_BODY:
                raise _BadResponse(f"answer body of {int(value)} bytes is over {MAX_BODY}")
            self._needs_eof = False
            self._headers["content-length"] = ""
        elif lower == _TRANSFER_ENCODING:
            self._headers.setdefault("transfer-encoding", value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._head_done = True
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows. A 101
            # is not interim: it is the final answer (an error), as it is to aiohttp.
            self._interim = True
            return
        headers = self._headers
        if status in (204, 304) or "content-length" in headers:
            return
        coding = headers.get("transfer-encoding")
        chunked = coding is not None and coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
        self._needs_eof = not chunked

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            raise _BadResponse(f"answer body over {MAX_BODY} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._reset()
            return
        parser = self._parser
        # After a 101 the bytes on the connection are another protocol's: never reuse it.
        self._complete(keep_alive=parser.should_keep_alive() and parser.get_status_code() != 101)

    # -- used by FastTransport -------------------------------------------------------------

    def request(self, data: bytes, future: asyncio.Future[_Response], deadline: float) -> None:
        self.expect(future, deadline)
        transport = self.transport
        assert transport is not None  # only pooled after connection_made
        transport.write(data)

    def expect(self, future: asyncio.Future[_Response], deadline: float) -> None:
        """Wait for the answer of a request written next (by :meth:`request` or later)."""
        self._waiter = future
        self.deadline = deadline
        self._reset()

    def unwritten(self, exc: Exception) -> None:
        """Its request was never written (the barrier before it failed): fail the wait."""
        self._fail(_Unwritten(exc))

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _complete(self, *, keep_alive: bool) -> None:
        waiter = self._waiter
        self._waiter = None
        self._needs_eof = False
        body = self._body
        raw = body[0] if len(body) == 1 else b"".join(body)
        if waiter is not None and not waiter.done():
            status = self._parser.get_status_code()
            waiter.set_result(_Response(status, self._headers, raw, keep_alive))


class _Unwritten(Exception):
    """A request held for the barrier was never written: the barrier raised ``cause``."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


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
        "_barrier",
        "_config",
        "_conns",
        "_head_empty",
        "_head_json",
        "_host",
        "_idle",
        "_port",
        "_proxy",
        "_queued",
        "_reached",
        "_redact",
        "_slots",
        "_ssl",
        "_timer",
        "_timer_at",
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
        self._redact = Redactor(config.auth_headers)
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
        # The whole head as one bytes template, built once: per request, one %-format
        # fills in the path, Content-Length and body (a "%" of a header value escaped).
        head = f"POST %b HTTP/1.1\r\n{common}".replace("%", "%%").replace("%%b", "%b", 1)
        self._head_json = (
            f"{head}Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b".encode()
        )
        self._head_empty = f"{head}Content-Length: 0\r\n\r\n".encode()
        self._proxy = proxy_for(config.base_url)
        self._idle: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self._slots = asyncio.Semaphore(config.pool_size)
        # One loop timer for every request out, armed at or before the earliest deadline
        # among them (see _arm), in place of a call_at and a cancel per request.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Some connection of this run was accepted: a refusal after that is a restart to
        # retry, not a target that was never there (see refused_outcome).
        self._reached = False
        # hold_writes(): the requests of this loop turn, written after one barrier call.
        self._barrier: Callable[[], None] | None = None
        self._queued: list[tuple[_Conn, bytes]] = []

    def hold_writes(self, barrier: Callable[[], None] | None) -> None:
        """Write the requests of one loop turn together, each after one ``barrier()`` call.

        The crash journal's hook: its lines for those requests reach the OS in one write,
        and no request leaves before that write is done. A barrier that raises writes no
        request of that turn; each of their :meth:`send` calls raises its exception.
        ``None``: each request is written at once (the default).
        """
        self._barrier = barrier

    def _hold(self, loop: asyncio.AbstractEventLoop, conn: _Conn, data: bytes) -> None:
        queued = self._queued
        if not queued:
            loop.call_soon(self._write_held)
        queued.append((conn, data))

    def _write_held(self) -> None:
        queued, self._queued = self._queued, []
        barrier = self._barrier
        if barrier is not None:
            try:
                barrier()
            except Exception as exc:  # the journal could not be written: nothing leaves
                for conn, _ in queued:
                    conn.unwritten(exc)
                return
        for conn, data in queued:
            transport = conn.transport
            # Closed meanwhile (the server's close, a cancel): its send has its answer.
            if not conn.closed and transport is not None:
                transport.write(data)

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._idle.clear()
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        # One turn of the loop lets the transports finish closing before the loop may end.
        await asyncio.sleep(0)

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Make sure the deadline timer fires no later than ``deadline``.

        The invariant: while any request is out, the timer is armed at or before its
        deadline. Requests start in order with the same timeout, so a new deadline is
        almost never the earliest and this is one comparison.
        """
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """The timer fired: time out each request whose deadline has come, re-arm for the rest.

        "Has come" is the loop's own judgement: the timer fired for ``_timer_at``, so every
        deadline at or before it is due, exactly as its own ``call_at`` would have been.
        """
        due = self._timer_at
        self._timer = None
        earliest = None
        for conn in list(self._conns):
            waiter = conn._waiter
            if waiter is None or waiter.done():
                continue
            if conn.deadline <= due:
                _expire(waiter)
            elif earliest is None or conn.deadline < earliest:
                earliest = conn.deadline
        if earliest is not None:
            self._arm(loop, earliest)

    def _head(self, path: str, body: bytes | None) -> bytes:
        if body is None:
            return self._head_empty % path.encode("ascii")
        return self._head_json % (path.encode("ascii"), len(body), body)

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
                return self._failure(ErrorKind.CONNECT, False, started, exc)
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
                    outcome = self._failure(ErrorKind.CONNECT, False, started, exc)
                    if not self._reached and self._proxy is None and is_refused(exc):
                        return refused_outcome(outcome, self._host, self._port)
                    return outcome
                self._reached = True
            loop = asyncio.get_running_loop()
            future: asyncio.Future[_Response] = loop.create_future()
            deadline = loop.time() + timeout - (time.perf_counter() - started)
            self._arm(loop, deadline)
            try:
                if self._barrier is None:
                    conn.request(data, future, deadline)
                else:
                    conn.expect(future, deadline)
                    self._hold(loop, conn, data)
                response = await future
            except _Unwritten as exc:
                # Nothing was written on it: the connection is as clean as before.
                idle.append(conn)
                raise exc.cause from None
            except TimeoutError as exc:
                conn.abort()
                return self._failure(ErrorKind.TIMEOUT, True, started, exc)
            except _BadResponse as exc:
                # An answer we cannot frame: the request left, so it may have arrived.
                conn.abort()
                return self._failure(ErrorKind.PROTOCOL, True, started, exc)
            except OSError as exc:
                # Written (or being written) and then the connection broke, including a
                # keep-alive connection the server closed just as we reused it: the server
                # may have read the request, so it counts as sent.
                conn.abort()
                return self._failure(ErrorKind.CONNECTION, True, started, exc)
            except BaseException:
                # Cancelled mid-request: the answer may still arrive, so this connection
                # can never be reused.
                conn.abort()
                raise
            if response.keep_alive and not conn.closed:
                idle.append(conn)
            else:
                conn.close()
            return outcome_from_response(
                response.status,
                response.body,
                response.headers,
                time.perf_counter() - started,
                self._redact,
            )
        finally:
            slots.release()

    def _failure(self, kind: ErrorKind, sent: bool, started: float, exc: BaseException) -> Outcome:
        return failure(
            kind, sent, time.perf_counter() - started, describe(exc, self._redact), self._redact
        )
