"""One account's budget in Redis, shared by every process and host that names the account.

Every attempt takes its permit from a GCRA *reservation* script (one round trip; the
script reads the server's ``TIME``, so hosts' clocks do not matter). The script answers
how long the caller must wait for its slot, so nobody polls. A 429 anywhere sets a
pause-until in the same hash and publishes it: every process holds its workers at once,
and a worker that wakes from a reservation made before the 429 takes a new one instead of
sending into the lockout. A process whose pacer lowered its rate (``Ratelimit`` headers
say the budget is short) lowers the shared rate for everyone while it keeps saying so.

Keys are hash-tagged by account (``dispatcher:{acct:ID}:...``) so a Redis Cluster keeps
each account's keys in one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import anyio

from dispatcher.coordination.connection import UNREACHABLE, Link

__all__ = ["BudgetKeys", "SharedGate", "SharedGateStats"]

# A lowered rate stays in force this long after the last reservation that asked for it.
FLOOR_TTL_US: Final = 2_000_000
# Headroom kept below a rate the server announced (one below what this process asked).
# The shared slots are exact on Redis's clock, but each process's requests reach the API
# after a delay of their own (its event loop's lateness, its network path), and a server
# window opened by a late request then holds slots from a little longer than itself: at
# 98% of a 50/1s policy, 49 slots span exactly one second, so a window opened 1 ms late
# holds 50 (the pacer pauses everyone until it ends) and one opened 21 ms late holds 51
# (a 429 and a lockout). 2% leaves room for 20 ms of spread between processes. A rate
# this low is paced strictly, without the burst: the two permits a burst of 2 lets out
# after each pause put one more into the window they open.
ARRIVAL_SPREAD: Final = 0.02
_US: Final = 1_000_000

RESERVE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local h = redis.call('HMGET', KEYS[1], 'tat', 'pause', 'floor', 'floor_until')
local tat = tonumber(h[1]) or now
local pause = tonumber(h[2]) or 0
local floor = tonumber(h[3]) or 0
local floor_until = tonumber(h[4]) or 0
local interval = tonumber(ARGV[1])
if ARGV[2] == '1' then
  if floor_until <= now or interval > floor then floor = interval end
  floor_until = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'floor', string.format('%.0f', floor),
             'floor_until', string.format('%.0f', floor_until))
end
if floor_until > now and floor > interval then interval = floor end
if tat < now then tat = now end
local start = tat - (tonumber(ARGV[3]) - 1) * interval
if start < now then start = now end
if start < pause then start = pause end
if tat < start then tat = start end
redis.call('HSET', KEYS[1], 'tat', string.format('%.0f', tat + interval))
redis.call('HINCRBY', KEYS[1], 'permits', 1)
redis.call('PEXPIRE', KEYS[1], 86400000)
return {math.floor(start - now), math.floor(pause - now), math.floor(interval)}
"""

PAUSE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = tonumber(redis.call('HGET', KEYS[1], 'pause')) or 0
local untl = now + tonumber(ARGV[1])
if untl <= pause then return math.floor(pause - now) end
if pause < now then
  redis.call('HINCRBY', KEYS[1], 'pauses', 1)
  redis.call('HINCRBY', KEYS[1], 'paused_us', math.floor(untl - now))
else
  redis.call('HINCRBY', KEYS[1], 'paused_us', math.floor(untl - pause))
end
redis.call('HSET', KEYS[1], 'pause', string.format('%.0f', untl))
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PUBLISH', KEYS[2], math.floor(untl - now))
return math.floor(untl - now)
"""


class BudgetKeys:
    """The Redis names of one account's budget."""

    __slots__ = ("budget", "channel")

    def __init__(self, account_id: str) -> None:
        tag = f"{{acct:{account_id}}}"
        self.budget = f"dispatcher:{tag}:budget"
        self.channel = f"dispatcher:{tag}:pause"


@dataclass(frozen=True, slots=True)
class SharedGateStats:
    """What this process's gate did (the same fields as ``GateStats``)."""

    acquired: int
    pauses: int
    paused_s: float


class SharedGate:
    """A rate gate whose budget and pause live in Redis: the interface of ``RateGate``.

    Use inside ``async with gate.running():``, which listens for pauses set elsewhere and
    publishes the ones set here. ``rate`` is what this process asks for (``None``:
    unlimited, though the shared pause and lowered rate still hold); ``burst`` lets that
    many permits go back to back after an idle spell, counted account-wide.
    """

    def __init__(self, link: Link, account_id: str, rate: float | None, *, burst: int = 1) -> None:
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError(
                f"rate must be a finite number of requests per second > 0, got {rate!r}"
            )
        self._link = link
        self._keys = BudgetKeys(account_id)
        self._configured = rate
        self._rate = rate
        self._burst = burst
        self._paused_until = -math.inf
        self._acquired = 0
        self._pauses = 0
        self._paused_s = 0.0
        self._to_publish: float | None = None  # a local deadline not yet told to Redis
        self._wake = anyio.Event()
        self._reserve = link.client.register_script(RESERVE)
        self._pause = link.client.register_script(PAUSE)

    @property
    def link(self) -> Link:
        return self._link

    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def burst(self) -> int | None:
        return None if self._rate is None else self._burst

    @property
    def paused_until(self) -> float:
        return self._paused_until

    @property
    def stats(self) -> SharedGateStats:
        return SharedGateStats(self._acquired, self._pauses, self._paused_s)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def set_rate(self, rate: float | None) -> None:
        """What this process asks for; below the configured rate, it lowers everyone's."""
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise ValueError(
                f"rate must be a finite number of requests per second > 0, got {rate!r}"
            )
        self._rate = rate

    def _hold(self, until: float) -> None:
        now = self._now()
        if until <= self._paused_until:
            return
        if now >= self._paused_until:
            self._pauses += 1
        self._paused_s += until - max(now, self._paused_until)
        self._paused_until = until

    def pause_for(self, seconds: float) -> None:
        """Hold this process now, and every other one as soon as Redis has heard of it."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"pause must be a finite number of seconds >= 0, got {seconds!r}")
        until = self._now() + seconds
        self._hold(until)
        if self._to_publish is None or until > self._to_publish:
            self._to_publish = until
        self._wake.set()

    def ready(self) -> bool:
        # Every permit costs a round trip, so acquire always suspends.
        return False

    def _lowered(self) -> bool:
        rate, asked = self._rate, self._configured
        return rate is not None and (asked is None or rate < asked * 0.999)

    async def acquire(self) -> None:
        """Wait out any pause, reserve a slot in the shared budget, wait for it."""
        while True:
            while (remaining := self._paused_until - self._now()) > 0:  # noqa: ASYNC110
                await anyio.sleep(remaining)
            rate, lowered = self._rate, self._lowered()
            if rate is not None and lowered:
                rate *= 1 - ARRIVAL_SPREAD
            interval = 0 if rate is None else max(1, round(_US / rate))
            # No burst at a rate the server announced: back-to-back permits after a pause
            # would open its next window with one more than the pace allows.
            burst = 1 if lowered else self._burst
            args = [interval, 1 if lowered else 0, burst, FLOOR_TTL_US]
            wait_us, _pause_us, _interval = await self._link.call(
                functools.partial(self._reserve, keys=[self._keys.budget], args=args)
            )
            if wait_us > 0:
                await anyio.sleep(wait_us / _US)
            if self._now() < self._paused_until:
                continue  # a 429 arrived while this slot waited: it falls in the lockout
            if not self._link.connected:
                continue  # Redis went away meanwhile: fail closed, wait for it in _reserve
            self._acquired += 1
            return

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SharedGate]:
        """Listen for pauses set by other processes and publish this one's."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen)
            tg.start_soon(self._publish)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _publish(self) -> None:
        keys = [self._keys.budget, self._keys.channel]
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            until = self._to_publish
            self._to_publish = None
            if until is None:
                continue
            args = [max(0, round((until - self._now()) * _US))]
            await self._link.call(functools.partial(self._pause, keys=keys, args=args))

    async def _listen(self) -> None:
        client = self._link.client
        while True:
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._keys.channel)
                # A pause set while this process was not listening is in the hash.
                pause = await client.hget(self._keys.budget, "pause")
                now_us = await client.time()
                self._link.trips += 3
                if pause is not None:
                    left = int(pause) - (now_us[0] * _US + now_us[1])
                    if left > 0:
                        self._hold(self._now() + left / _US)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._hold(self._now() + int(message["data"]) / _US)
            except UNREACHABLE as exc:
                self._link.down(exc)
                await anyio.sleep(0.2)
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(*UNREACHABLE):
                    # redis-py < 8.2 leaves aclose untyped: a typed name for it checks on both.
                    close: Callable[[], Awaitable[object]] = pubsub.aclose
                    await close()
