"""The aiohttp client: one HTTP attempt for one event through one ``aiohttp.ClientSession``."""

from __future__ import annotations

import ssl
import time
from types import SimpleNamespace, TracebackType
from typing import Final, Self

import aiohttp
from yarl import URL

from dispatcher.clients.base import (
    _JSON_HEADERS,
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
from dispatcher.clients.proxy import proxy_for
from dispatcher.model import ErrorKind, Event, Outcome

_READ: Final = 64 * 1024


class _TooLarge(Exception):
    """An answer over the head or body cap: not one the API sends."""


class _Malformed(Exception):
    """An answer aiohttp's lenient parser let through that the strict rule refuses."""


_SPACE: Final = (b" ", b"\t")


class HttpTransport:
    """The real transport: one keep-alive ``ClientSession`` for the whole run."""

    __slots__ = (
        "_config",
        "_empty_headers",
        "_headers",
        "_json_headers",
        "_port",
        "_proxy",
        "_reached",
        "_redact",
        "_session",
        "_timeout",
        "_url",
    )

    def __init__(self, config: TransportConfig, *, session: aiohttp.ClientSession | None = None):
        self._config = config
        self._url = UrlBuilder(config.base_url, config.account_id)
        self._headers = {"User-Agent": USER_AGENT, **config.auth_headers}
        self._timeout = aiohttp.ClientTimeout(total=config.timeout, connect=config.connect_timeout)
        self._session = session
        self._redact = Redactor(config.auth_headers)
        # Some connection of this run was accepted: a refusal after that is a restart to
        # retry, not a target that was never there (see refused_outcome).
        self._reached = False
        self._port = URL(config.base_url).port or 0  # yarl fills in the scheme's default
        # HTTPS_PROXY / NO_PROXY, resolved once (clients/proxy.py); aiohttp tunnels https
        # through CONNECT. trust_env stays off: it would also read ~/.netrc credentials.
        route = proxy_for(config.base_url)
        self._proxy = route.url if route is not None else None
        self._json_headers: dict[str, str] | None = _JSON_HEADERS
        self._empty_headers: dict[str, str] | None = None
        if route is not None:
            # aiohttp copies a session's default headers into the CONNECT request and turns
            # Authorization into Proxy-Authorization: the proxy would read the token. Behind
            # a proxy the credentials go with each request instead, inside the tunnel.
            self._headers = {"User-Agent": USER_AGENT}
            self._json_headers = {**_JSON_HEADERS, **config.auth_headers}
            self._empty_headers = dict(config.auth_headers)

    def __repr__(self) -> str:
        return f"HttpTransport({self._config!r})"

    async def _connected(
        self,
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceConnectionCreateEndParams,
    ) -> None:
        self._reached = True

    def _open(self) -> aiohttp.ClientSession:
        # Told of each new connection (not of each request), before its request is written.
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._connected)
        connector = aiohttp.TCPConnector(
            limit=self._config.pool_size,
            # TLS verification stays on: the default context verifies certificates.
            ssl=ssl.create_default_context(),
            ttl_dns_cache=300,
        )
        return aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._timeout,
            raise_for_status=False,
            # The same limits as the fast client's, so the two agree on every answer.
            max_line_size=MAX_LINE,
            max_field_size=MAX_FIELD,
            max_headers=MAX_HEADERS,
            # No cookie ever goes back to a server: the endpoint sets none worth keeping.
            cookie_jar=aiohttp.DummyCookieJar(),
            # Ask for no compression, as the fast client: an answer is a few hundred bytes.
            # A body compressed anyway is decoded by outcome_from_response, the same code
            # for both clients, so that they read the same bytes the same way.
            skip_auto_headers=("Accept-Encoding",),
            auto_decompress=False,
            trace_configs=[trace],
        )

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, event: Event) -> Outcome:
        session = self._session
        if session is None:
            session = self._session = self._open()
        # Our segments are already percent-encoded; yarl must not re-encode them.
        url = URL(self._url(event.workflow, event.instance_id, event.event_type), encoded=True)
        body = event.body
        started = time.perf_counter()
        redact = self._redact
        try:
            # No redirect is followed: the endpoint never redirects, a redirect would turn
            # the POST into a GET, and a credential must never go to another host.
            async with session.post(
                url,
                data=body,
                headers=self._json_headers if body is not None else self._empty_headers,
                allow_redirects=False,
                proxy=self._proxy,
            ) as resp:
                self._reached = True  # also for a session passed in, which has no trace
                raw = await _read_capped(resp)
                return outcome_from_response(
                    resp.status, raw, resp.headers, time.perf_counter() - started, redact
                )
        except aiohttp.ConnectionTimeoutError as exc:
            # Timed out while connecting: the request never left.
            return self._failure(ErrorKind.CONNECT, False, started, exc)
        except aiohttp.ClientConnectorError as exc:
            outcome = self._failure(ErrorKind.CONNECT, False, started, exc)
            if (
                not self._reached
                and self._proxy is None
                and not isinstance(exc, aiohttp.ClientProxyConnectionError)
                and is_refused(exc.os_error)
            ):
                return refused_outcome(outcome, exc.host, exc.port or self._port)
            return outcome
        except TimeoutError as exc:
            return self._failure(ErrorKind.TIMEOUT, True, started, exc)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            # The connection broke after the request may have been written, or the body
            # was cut off: the server may have read the request.
            return self._failure(ErrorKind.CONNECTION, True, started, exc)
        except aiohttp.ClientOSError as exc:
            return self._failure(ErrorKind.CONNECTION, True, started, exc)
        except Exception as exc:  # the transport boundary: nothing escapes
            # An answer that is not HTTP/1.x aiohttp can frame (parser errors, an oversized
            # head or body, an upgrade...): the request left, so it may have arrived.
            return self._failure(ErrorKind.PROTOCOL, True, started, exc)

    def _failure(self, kind: ErrorKind, sent: bool, started: float, exc: BaseException) -> Outcome:
        return failure(
            kind, sent, time.perf_counter() - started, describe(exc, self._redact), self._redact
        )


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body, refusing an answer whose head or body is over the caps."""
    head = 0
    for name, value in resp.raw_headers:
        head += len(name) + len(value) + 4
        if name[-1:] in _SPACE:
            # aiohttp's parser is lenient here; the fast client's is not, and a space
            # before the colon is how a header gets past one parser and not another.
            raise _Malformed(f"whitespace before the colon of header {name.strip()!r}")
    if head > MAX_HEAD:
        raise _TooLarge(f"answer head over {MAX_HEAD} bytes")
    length = resp.content_length
    if length is not None and length > MAX_BODY:
        raise _TooLarge(f"answer body of {length} bytes is over {MAX_BODY}")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(_READ)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge(f"answer body over {MAX_BODY} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
