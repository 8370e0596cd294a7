"""The aiohttp client: one HTTP attempt for one event through one ``aiohttp.ClientSession``."""

from __future__ import annotations

import ssl
import time
from types import TracebackType
from typing import Self

import aiohttp
from yarl import URL

from dispatcher.clients.base import (
    _JSON_HEADERS,
    USER_AGENT,
    TransportConfig,
    UrlBuilder,
    outcome_from_response,
)
from dispatcher.clients.proxy import proxy_for
from dispatcher.model import ErrorKind, Event, Outcome


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HttpTransport:
    """The real transport: one keep-alive ``ClientSession`` for the whole run."""

    __slots__ = (
        "_config",
        "_empty_headers",
        "_headers",
        "_json_headers",
        "_proxy",
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

    def _open(self) -> aiohttp.ClientSession:
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
        try:
            async with session.post(
                url,
                data=body,
                headers=self._json_headers if body is not None else self._empty_headers,
                proxy=self._proxy,
            ) as resp:
                raw = await resp.read()
                return outcome_from_response(
                    resp.status, raw, resp.headers, time.perf_counter() - started
                )
        except aiohttp.ConnectionTimeoutError as exc:
            # Timed out while connecting: the request never left.
            return self._failure(ErrorKind.CONNECT, False, started, exc)
        except aiohttp.ClientConnectorError as exc:
            return self._failure(ErrorKind.CONNECT, False, started, exc)
        except TimeoutError as exc:
            return self._failure(ErrorKind.TIMEOUT, True, started, exc)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # The connection broke after the request may have been written.
            return self._failure(ErrorKind.CONNECTION, True, started, exc)

    @staticmethod
    def _failure(kind: ErrorKind, sent: bool, started: float, exc: BaseException) -> Outcome:
        return Outcome(
            status=None,
            ok=False,
            sent=sent,
            latency_s=time.perf_counter() - started,
            error_kind=kind,
            message=_describe(exc),
        )
