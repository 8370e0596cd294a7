"""One Redis connection per process, and what to do while Redis is away: fail closed.

Nothing new is sent while Redis cannot be reached (a run that guessed the budget alone
could lock the whole account out for five minutes): callers wait in :meth:`Link.call`,
which retries with jittered exponential backoff and says so in :attr:`Link.state`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["BACKOFF_CAP", "Link", "redact"]

_T = TypeVar("_T")

BACKOFF_FIRST: Final = 0.1  # seconds before the first reconnect attempt
BACKOFF_CAP: Final = 2.0  # longest wait between attempts: Redis back means sending again soon
SOCKET_TIMEOUT: Final = 2.0
UNREACHABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)


def redact(url: str) -> str:
    """``url`` without its password, for messages and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def client_for(url: str) -> aioredis.Redis:
    """A client that fails fast: the retrying happens in :class:`Link`, visibly."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        # No CLIENT SETINFO on every new connection: two round trips each, for a label.
        driver_info=None,
        decode_responses=False,
    )


class Link:
    """A Redis client plus the fail-closed retry loop every coordination call goes through.

    ``state`` is ``"connected"`` or ``"unreachable: <error>; retrying"`` for the progress
    display; ``outages`` counts how often Redis went away, ``trips`` the round trips
    (one command, script or pipeline each, whether or not it got through).
    """

    __slots__ = ("_on_state", "_rng", "_since", "client", "outages", "state", "trips", "url")

    def __init__(
        self,
        url: str,
        *,
        rng: Callable[[], float] = random.random,
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self._on_state = on_state
        self.client = client_for(url)
        self._rng = rng
        self.state = "connected"
        self.outages = 0
        self.trips = 0
        self._since: float | None = None

    @property
    def connected(self) -> bool:
        return self._since is None

    def unreachable_for(self) -> float:
        """Seconds since Redis went away (0 while connected)."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    async def call(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``op`` until it succeeds; while Redis is unreachable, wait and retry."""
        delay = BACKOFF_FIRST
        while True:
            self.trips += 1
            try:
                result = await op()
            except UNREACHABLE as exc:
                self.down(exc)
                # Full jitter: processes that lost Redis together do not come back together.
                wait = delay * (0.5 + self._rng())
                await anyio.sleep(wait)
                delay = min(BACKOFF_CAP, delay * 2)
                continue
            self.up()
            return result

    def down(self, exc: BaseException) -> None:
        """Redis went away (seen here or on another connection, such as pub/sub)."""
        if self._since is None:
            self._since = time.monotonic()
            self.outages += 1
        self._set(f"redis unreachable ({type(exc).__name__}); sending nothing new")

    def up(self) -> None:
        if self._since is not None:
            self._since = None
            self._set("connected")

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            if self._on_state is not None:
                self._on_state(state)

    async def aclose(self) -> None:
        await self.client.aclose()
