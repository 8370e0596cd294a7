"""One job's work shared by every process started with the same ``--job NAME``.

The input is cut into shards (line ranges of a few thousand records; a Stream entry per
record would cost more memory than the records). Shards wait in a Redis Stream read by
one consumer group; each process takes one at a time. A process heartbeats the shards it
holds (``XCLAIM ... JUSTID`` resets their idle time), so a shard idle for longer than the
heartbeat timeout belongs to a dead process and ``XAUTOCLAIM`` hands it to another. A
process that stops (Ctrl-C) hands back the shards it did not finish at once.

A record's final envelope is claimed once, ``HSETNX`` on its key, and the claim *carries
the envelope* until its writer says it is in its results file:

1. ``settle``: one script call claims a batch of envelopes; each claim's value is
   ``p:<tag>`` (the worker's number in the job) plus the envelope (pending);
2. the writer appends the envelopes it won to its own results file;
3. the next ``settle`` call (at once if nothing else is ready) marks them written: the
   value shrinks to the worker's tag, and the shards whose records are all final and
   written are acknowledged in the same call.

So a process killed between its claim and its write (on any host) leaves its envelopes
in Redis: whoever takes the shard over finds claims pending for a dead worker, *adopts*
them (the claim passes to it, atomically) and writes those envelopes, the very ones the
dead process had, into its own file. Claim-then-write was chosen over write-then-claim
because nothing has to de-duplicate afterwards: a record's envelope is in exactly one
results file, and ``dispatcher report`` reads them together as they are. The one window
left is a kill after the write and before the mark (one round trip): on the same host the
adopter reads the dead worker's results file and only marks what it finds there; across
hosts that envelope is written twice, identically.
"""

from __future__ import annotations

import math
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

PENDING: Final = b"p:"  # a claim's value until its envelope is written: p:<tag>\n<envelope>

SETTLE: Final = """
local worker = ARGV[1]
local prefix = 'p:' .. worker .. '\\n'
local i = 3
local n = tonumber(ARGV[i]); i = i + 1
for j = 1, n do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v and string.sub(v, 1, #prefix) == prefix then redis.call('HSET', KEYS[1], ARGV[i], worker) end
  i = i + 1
end
n = tonumber(ARGV[i]); i = i + 1
local acked = 0
for j = 1, n do
  acked = acked + redis.call('XACK', KEYS[3], ARGV[2], ARGV[i]); i = i + 1
end
if acked > 0 then redis.call('HINCRBY', KEYS[2], 'acked', acked) end
local won, out = 0, {}
while i < #ARGV do
  local r = redis.call('HSETNX', KEYS[1], ARGV[i], prefix .. ARGV[i + 1])
  won = won + r
  if r == 0 then
    -- Ours already: this call is a retry of one whose answer was lost.
    local v = redis.call('HGET', KEYS[1], ARGV[i])
    if string.sub(v, 1, #prefix) == prefix then r = 1 end
  end
  out[#out + 1] = r
  i = i + 2
end
if won > 0 then redis.call('HINCRBY', KEYS[2], 'final', won) end
return out
"""

ADOPT: Final = """
local mine = 'p:' .. ARGV[1] .. '\\n'
local out = {}
for i = 2, #ARGV, 2 do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  local theirs = 'p:' .. ARGV[i + 1] .. '\\n'
  if v and string.sub(v, 1, #theirs) == theirs then
    local envelope = string.sub(v, #theirs + 1)
    redis.call('HSET', KEYS[1], ARGV[i], mine .. envelope)
    out[#out + 1] = envelope
  elseif v and string.sub(v, 1, #mine) == mine then
    out[#out + 1] = string.sub(v, #mine + 1)  -- a retry: adopted already
  else
    out[#out + 1] = false
  end
end
return out
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


def heartbeat_timeout() -> float:
    """Seconds a shard may go without a heartbeat before another process takes it over
    (``DISPATCHER_JOB_TIMEOUT``); ``ValueError`` says what is wrong with the setting."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 3 * HEARTBEAT_S):
        raise ValueError(f"must be a number of seconds >= {3 * HEARTBEAT_S:g}, got {raw!r}")
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
        # What this process's claims carry: a number the job hands out (see create), a
        # few bytes per record key instead of the worker's name (a 1M job holds 1M).
        self.tag = self.worker
        self.held: set[str] = set()  # shards taken and not yet acknowledged
        self.taken = 0
        self.reclaimed = 0
        client = link.client
        self._settle = client.register_script(SETTLE)
        self._adopt = client.register_script(ADOPT)
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

        created = await self.link.call(op)
        joined = await self.link.call(lambda: self.link.client.hincrby(self.keys.meta, "joined", 1))
        self.tag = f"{int(joined):x}"
        return created

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

    async def claimers(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The claims on ``keys`` that exist (one round trip): the writer's tag once the
        envelope is written, ``p:<tag>\n<envelope>`` while it is pending."""
        if not keys:
            return {}
        values = await self.link.call(lambda: self.link.client.hmget(self.keys.final, list(keys)))
        return {
            key: value if isinstance(value, bytes) else str(value).encode()
            for key, value in zip(keys, values, strict=True)
            if value is not None
        }

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Every worker's last heartbeat."""
        raw = await self.link.call(lambda: self.link.client.hgetall(self.keys.workers))
        return {_text(k): orjson.loads(v) for k, v in raw.items()}

    async def settle(
        self,
        written: Sequence[str] = (),
        acks: Sequence[str] = (),
        claims: Sequence[tuple[str, bytes]] = (),
    ) -> list[bool]:
        """One round trip: mark this process's pending claims on ``written`` as written,
        acknowledge the shards ``acks``, then claim each ``(key, envelope)``; for each
        claim, whether this process won it (``False``: another envelope is final).

        Safe to repeat (``Link.call`` retries a call whose answer was lost): a claim found
        pending under this process's name is its own, won."""
        if not (written or acks or claims):
            return []
        args: list[Any] = [self.tag, GROUP, len(written), *written, len(acks), *acks]
        for key, envelope in claims:
            args += [key, envelope]
        keys = [self.keys.final, self.keys.meta, self.keys.shards]
        won = await self.link.call(lambda: self._settle(keys=keys, args=args))
        for shard in acks:
            self.held.discard(shard)
        return [bool(w) for w in won]

    async def adopt(self, claims: Mapping[str, str]) -> dict[str, bytes]:
        """Take over the pending claims of dead workers (key -> their tag): the envelopes
        this process must now write, by key (a claim that changed meanwhile is not taken)."""
        if not claims:
            return {}
        args: list[Any] = [self.tag]
        for key, worker in claims.items():
            args += [key, worker]
        got = await self.link.call(lambda: self._adopt(keys=[self.keys.final], args=args))
        return {key: env for key, env in zip(claims, got, strict=True) if env}

    async def done(self) -> bool:
        """Whether every shard of the job is in the Stream and acknowledged."""
        meta = await self.link.call(
            lambda: self.link.client.hmget(self.keys.meta, ["shards", "acked"])
        )
        shards, acked = meta
        return shards is not None and int(acked or 0) >= int(shards)

    async def leave(self, stats: Mapping[str, object]) -> None:
        """This process stops: hand back the shards it holds unfinished (idle for longer
        than the timeout at once, so the next ``take`` anywhere reclaims them) and say
        it has gone in a last heartbeat."""
        client = self.link.client
        held: list[Any] = sorted(self.held)
        beat = orjson.dumps(
            {
                **stats,
                "host": self.host,
                "tag": self.tag,
                "shards": 0,
                "reclaimed": self.reclaimed,
                "seen": time.time(),
                "gone": True,
            }
        )

        async def op() -> None:
            async with client.pipeline(transaction=False) as pipe:
                if held:
                    idle = int(self.timeout * 1000) * 10
                    pipe.xclaim(
                        self.keys.shards, GROUP, self.worker, 0, held, idle=idle, justid=True
                    )
                pipe.hset(self.keys.workers, self.worker, beat)
                if self.planning:
                    pipe.delete(self.keys.planner)
                await pipe.execute()

        await self.link.call(op)
        self.held.clear()

    async def heartbeat(self, stats: Mapping[str, object]) -> None:
        """Say this process lives, and keep the shards it holds from looking abandoned."""
        client = self.link.client
        held: list[Any] = sorted(self.held)
        beat = orjson.dumps(
            {
                **stats,
                "host": self.host,
                "tag": self.tag,
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
