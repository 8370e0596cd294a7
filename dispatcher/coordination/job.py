"""One job's work shared by every process started with the same ``--job NAME``.

The input is cut into shards (line ranges of a few thousand records; a Stream entry per
record would cost more memory than the records). Shards wait in a Redis Stream read by
one consumer group; each process takes one at a time. A process heartbeats the shards it
holds (``XCLAIM ... JUSTID`` resets their idle time), so a shard idle for longer than the
heartbeat timeout belongs to a dead process and ``XAUTOCLAIM`` hands it to another.

A record's final envelope is claimed once, ``HSETNX`` on its key: a reclaimed shard skips
the records already final, and an envelope whose claim fails is dropped. A shard is
acknowledged only once every one of its records is final; the job is done when every
shard is.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from dispatcher.coordination.connection import Link

__all__ = ["HEARTBEAT_S", "Job", "JobKeys", "Shard", "heartbeat_timeout"]

GROUP: Final = "workers"
HEARTBEAT_S: Final = 1.0
DEFAULT_TIMEOUT_S: Final = 30.0
TIMEOUT_ENV: Final = "DISPATCHER_JOB_TIMEOUT"
_EXPIRE_S: Final = 7 * 86400

CLAIM: Final = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'final', 1)
  return 1
end
return 0
"""

RELEASE: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HINCRBY', KEYS[2], 'final', -1)
  return 1
end
return 0
"""

PUBLISH: Final = """
if tonumber(redis.call('HGET', KEYS[2], 'published') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HSET', KEYS[2], 'published', tonumber(ARGV[1]) + 1)
return 1
"""

ACK: Final = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'acked', 1)
  return 1
end
return 0
"""


def heartbeat_timeout() -> float:
    """Seconds a shard may go without a heartbeat before another process takes it over."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 3 * HEARTBEAT_S:
        raise ValueError(f"{TIMEOUT_ENV} must be at least {3 * HEARTBEAT_S:g} seconds, got {raw!r}")
    return value


class JobKeys:
    """The Redis names of one job, hash-tagged so a Cluster keeps them in one slot."""

    __slots__ = ("final", "meta", "planner", "shards", "workers")

    def __init__(self, name: str) -> None:
        tag = f"dispatcher:{{job:{name}}}"
        self.shards = f"{tag}:shards"
        self.final = f"{tag}:final"
        self.meta = f"{tag}:meta"
        self.workers = f"{tag}:workers"
        self.planner = f"{tag}:planner"


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    fields: Mapping[str, str]
    reclaimed: bool


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


class Job:
    """This process's handle on a shared job."""

    def __init__(self, link: Link, name: str, *, timeout: float | None = None) -> None:
        self.link = link
        self.name = name
        self.keys = JobKeys(name)
        self.timeout = timeout if timeout is not None else heartbeat_timeout()
        self.host = socket.gethostname()
        self.worker = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.held: set[str] = set()  # shards taken and not yet acknowledged
        self.taken = 0
        self.reclaimed = 0
        client = link.client
        self._claim = client.register_script(CLAIM)
        self._ack = client.register_script(ACK)
        self._release = client.register_script(RELEASE)
        self._publish = client.register_script(PUBLISH)
        self.planning = False

    async def create(self, account_id: str = "") -> bool:
        """Create the job's Stream and group; ``False`` if another process already did."""

        async def op() -> bool:
            client = self.link.client
            try:
                await client.xgroup_create(self.keys.shards, GROUP, id="0", mkstream=True)
            except Exception as exc:  # redis.ResponseError: BUSYGROUP
                if "BUSYGROUP" in str(exc):
                    return False
                raise
            meta: dict[Any, Any] = {"created": str(time.time()), "account": account_id}
            await client.hset(self.keys.meta, mapping=meta)
            return True

        return await self.link.call(op)

    async def become_planner(self) -> bool:
        """Take the job's planner lock: cutting the input into shards is one process's
        work, and another's once that one stops heartbeating (it died mid-plan)."""
        ttl = int(self.timeout * 1000)
        got = await self.link.call(
            lambda: self.link.client.set(self.keys.planner, self.worker, nx=True, px=ttl)
        )
        self.planning = bool(got)
        return self.planning

    async def published(self) -> int:
        """How many shards are in the Stream (a new planner carries on from there)."""
        value = await self.link.call(lambda: self.link.client.hget(self.keys.meta, "published"))
        return int(value or 0)

    async def sealed(self) -> bool:
        return bool(
            await self.link.call(lambda: self.link.client.hexists(self.keys.meta, "shards"))
        )

    async def publish(self, index: int, fields: Mapping[str, str]) -> None:
        """Shard number ``index``; added once only, whoever publishes it."""
        flat: list[Any] = [index]
        for key, value in fields.items():
            flat += [key, value]
        keys = [self.keys.shards, self.keys.meta]
        await self.link.call(lambda: self._publish(keys=keys, args=flat))

    async def seal(self, shards: int, records: int) -> None:
        """Every shard is in the Stream: from now on the job can be done."""
        client = self.link.client

        async def op() -> None:
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(self.keys.meta, mapping={"shards": shards, "records": records})
                for key in (self.keys.shards, self.keys.final, self.keys.meta):
                    pipe.expire(key, _EXPIRE_S)
                await pipe.execute()

        await self.link.call(op)

    async def take(self, block_ms: int = 500) -> Shard | None:
        """The next shard for this process: a new one, or one whose holder died."""
        client = self.link.client
        keys = self.keys

        async def read() -> object:
            return await client.xreadgroup(
                GROUP, self.worker, {keys.shards: ">"}, count=1, block=block_ms
            )

        got = await self.link.call(read)
        if got:
            # [[stream, [(id, fields)]]] (RESP2) or {stream: [[(id, fields)]]} (RESP3)
            entries: Any = got[0][1] if isinstance(got, list) else next(iter(got.values()))[0]  # type: ignore[attr-defined]
            if entries:
                sid, fields = entries[0]
                return self._took(sid.decode(), fields, reclaimed=False)

        async def reclaim() -> object:
            return await client.xautoclaim(
                keys.shards, GROUP, self.worker, int(self.timeout * 1000), "0-0", count=1
            )

        claimed = await self.link.call(reclaim)
        entries = claimed[1] if isinstance(claimed, list | tuple) else []
        for sid, fields in entries:
            if fields:  # a deleted entry comes back without fields
                return self._took(sid.decode(), fields, reclaimed=True)
        return None

    def _took(self, sid: str, fields: Mapping[bytes, bytes], *, reclaimed: bool) -> Shard:
        self.held.add(sid)
        self.taken += 1
        self.reclaimed += reclaimed
        return Shard(sid, _decode(fields), reclaimed)

    async def claimers(self, keys: Sequence[str]) -> dict[str, str]:
        """Which of ``keys`` already have their final envelope, and whose (one round trip)."""
        if not keys:
            return {}
        values = await self.link.call(lambda: self.link.client.hmget(self.keys.final, list(keys)))
        return {
            key: _text(value) for key, value in zip(keys, values, strict=True) if value is not None
        }

    async def release(self, key: str, worker: str) -> bool:
        """Undo ``worker``'s claim on ``key`` (it died before its envelope was written)."""
        keys = [self.keys.final, self.keys.meta]
        args = [key, worker]
        return bool(await self.link.call(lambda: self._release(keys=keys, args=args)))

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Every worker's last heartbeat."""
        raw = await self.link.call(lambda: self.link.client.hgetall(self.keys.workers))
        return {_text(k): orjson.loads(v) for k, v in raw.items()}

    async def claim(self, key: str) -> bool:
        """Make this process's envelope the final one for ``key``; ``False`` if one is."""
        keys = [self.keys.final, self.keys.meta]
        args = [key, self.worker]
        return bool(await self.link.call(lambda: self._claim(keys=keys, args=args)))

    async def ack(self, shard_id: str) -> None:
        keys = [self.keys.shards, self.keys.meta]
        args = [GROUP, shard_id]
        await self.link.call(lambda: self._ack(keys=keys, args=args))
        self.held.discard(shard_id)

    async def done(self) -> bool:
        """Whether every shard of the job is in the Stream and acknowledged."""
        meta = await self.link.call(
            lambda: self.link.client.hmget(self.keys.meta, ["shards", "acked"])
        )
        shards, acked = meta
        return shards is not None and int(acked or 0) >= int(shards)

    async def heartbeat(self, stats: Mapping[str, object]) -> None:
        """Say this process lives, and keep the shards it holds from looking abandoned."""
        client = self.link.client
        held: list[Any] = sorted(self.held)
        beat = orjson.dumps(
            {
                **stats,
                "host": self.host,
                "shards": len(held),
                "reclaimed": self.reclaimed,
                "seen": time.time(),
            }
        )

        async def op() -> None:
            async with client.pipeline(transaction=False) as pipe:
                if held:
                    pipe.xclaim(self.keys.shards, GROUP, self.worker, 0, held, justid=True)
                pipe.hset(self.keys.workers, self.worker, beat)
                if self.planning:
                    pipe.pexpire(self.keys.planner, int(self.timeout * 1000))
                pipe.expire(self.keys.workers, _EXPIRE_S)
                await pipe.execute()

        await self.link.call(op)
