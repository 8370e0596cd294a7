"""The fast client's hand-written HTTP/1.1 answer parser as it was before httptools.

Kept only as the baseline of ``benchmarks/parser_cost.py``; the client no longer uses it
(it accepted ``0x46`` chunk sizes and ``Content-Length : n``, and let a head past its limit
when it came in one read). Code unchanged apart from this docstring and the imports.
"""

from __future__ import annotations

import asyncio
import re
from typing import Final, NamedTuple, cast

from multidict import CIMultiDict


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
