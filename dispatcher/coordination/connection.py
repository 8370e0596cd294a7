"""One Redis connection per process, and what to do while Redis is away: fail closed.

Nothing new is sent while Redis cannot be reached (a run that guessed the budget alone
could lock the whole account out for five minutes): callers wait in :meth:`Link.call`,
which retries with jittered exponential backoff and says so in :attr:`Link.state`.
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import anyio
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dispatcher.coordination.urls import redact, scrub

__all__ = ["BACKOFF_CAP", "PROBE_TIMEOUT", "Link", "RedisGone", "fail_fast", "probe", "redact"]

_T = TypeVar("_T")

BACKOFF_FIRST: Final = 0.1  # seconds before the first reconnect attempt
BACKOFF_CAP: Final = 2.0  # longest wait between attempts: Redis back means sending again soon
SOCKET_TIMEOUT: Final = 2.0
UNREACHABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)
PROBE_TIMEOUT: Final = 3.0  # the one check at start: connect, authenticate, select, PING
# Redis refusing this run's credentials or rights mid-run (a password changed, an ACL
# user revoked): no retry helps, so the run gives up on Redis at once, not after the
# outage timeout. Checked before UNREACHABLE: the first two are ConnectionErrors.
REFUSED: Final = (AuthenticationError, AuthorizationError, NoPermissionError)


# Set in the tasks that must not wait for Redis once the run gave up on it (the claims of
# the envelopes, the hand-back of shards): their calls raise RedisGone. Elsewhere (the
# heartbeat, the budget's publisher) a call then waits until its task is cancelled.
fail_fast: Final = contextvars.ContextVar("dispatcher_redis_fail_fast", default=False)


class RedisGone(Exception):  # not an error of the caller's: a state
    """The run gave up on Redis (unreachable for longer than ``--redis-outage-timeout``,
    or stopping while it was away): every call fails at once from then on."""


def _reason(exc: BaseException, url: str) -> str:
    """Why ``url`` cannot be used, in a few words, without its password."""
    if isinstance(exc, AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return "authentication failed: wrong user name or password, or none given"
    if isinstance(exc, NoPermissionError | AuthorizationError):
        return f"permission denied: {' '.join(str(exc).split())}"
    if isinstance(exc, ResponseError):
        text = str(exc)
        if "DB index is out of range" in text or "invalid DB index" in text:
            return "the server has no such database (its 'databases' setting is lower)"
        if "AUTH" in text:
            return f"authentication failed: {text}"
        return f"the server refused: {text}"
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "no answer in time"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"cannot connect: {text}"


async def probe(url: str, within: float = PROBE_TIMEOUT) -> str | None:
    """Connect once (``AUTH``, ``SELECT``, ``PING``) within ``within`` seconds: ``None``
    if Redis answers, else why not (one line, never the password)."""
    try:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=within,
            socket_connect_timeout=within,
            retry=Retry(NoBackoff(), 0),
            driver_info=None,
        )
    except (ValueError, TypeError) as exc:
        return scrub(f"invalid URL: {exc}", url)
    try:
        with anyio.fail_after(within):
            await client.ping()
    except TimeoutError:
        return f"no answer within {within:g} s"
    except (RedisError, OSError, ValueError, TypeError) as exc:
        # ValueError, TypeError: an option of the URL's query redis-py cannot use.
        if isinstance(exc, ValueError | TypeError):
            return scrub(f"invalid URL: {exc}", url)
        return scrub(_reason(exc, url), url)
    finally:
        shield = anyio.CancelScope(shield=True)
        with shield, anyio.move_on_after(1), contextlib.suppress(RedisError, OSError):
            await client.aclose()
    return None


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

    __slots__ = (
        "_gave_up",
        "_on_state",
        "_rng",
        "_since",
        "client",
        "gone",
        "outages",
        "state",
        "trips",
        "url",
    )

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
        self.gone: str | None = None  # why the run gave up on Redis (see give_up)
        self._gave_up = anyio.Event()

    @property
    def connected(self) -> bool:
        return self._since is None

    def unreachable_for(self) -> float:
        """Seconds since Redis went away (0 while connected)."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    async def call(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``op`` until it succeeds; while Redis is unreachable, wait and retry.

        Once the run has given up on Redis (:meth:`give_up`), raises :class:`RedisGone`
        at once where :data:`fail_fast` is set (calls waiting to retry too), and waits to
        be cancelled elsewhere."""
        delay = BACKOFF_FIRST
        while True:
            if self.gone is not None:
                if fail_fast.get():
                    raise RedisGone(self.gone)
                await anyio.sleep_forever()
            self.trips += 1
            try:
                result = await op()
            except REFUSED as exc:
                self.down(exc)
                self.give_up(f"redis refused this run: {scrub(_reason(exc, self.url), self.url)}")
                continue
            except UNREACHABLE as exc:
                self.down(exc)
                # Full jitter: processes that lost Redis together do not come back together.
                wait = delay * (0.5 + self._rng())
                with anyio.move_on_after(wait):
                    await self._gave_up.wait()
                delay = min(BACKOFF_CAP, delay * 2)
                continue
            self.up()
            return result

    def give_up(self, reason: str) -> None:
        """Stop waiting for Redis: every call from now on raises :class:`RedisGone`."""
        if self.gone is None:
            self.gone = reason
            self._gave_up.set()

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
