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

import contextlib
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import orjson
from redis.exceptions import ResponseError

from dispatcher.coordination.connection import Link

__all__ = [
    "HEARTBEAT_S",
    "Job",
    "JobKeys",
    "JobMismatch",
    "JobStateLost",
    "Shard",
    "heartbeat_timeout",
]

_T = TypeVar("_T")

GROUP: Final = "workers"
HEARTBEAT_S: Final = 1.0
DEFAULT_TIMEOUT_S: Final = 30.0
TIMEOUT_ENV: Final = "DISPATCHER_JOB_TIMEOUT"
# The name this process gives its host in a job: workers of one host read each other's
# results files and journals. For hosts that share a hostname (containers).
HOST_ENV: Final = "DISPATCHER_JOB_HOST"
# After Redis lost a job: how long a process waits for the job's other hosts to rejoin
# (each claims what its results hold first), and the hosts not to wait for.
RECOVERY_WAIT_ENV: Final = "DISPATCHER_JOB_RECOVERY_WAIT"
RECOVER_WITHOUT_ENV: Final = "DISPATCHER_JOB_RECOVER_WITHOUT"
DEFAULT_RECOVERY_WAIT_S: Final = 600.0
_EXPIRE_S: Final = 7 * 86400

PENDING: Final = b"p:"  # a claim's value until its envelope is written: p:<tag>\n<envelope>

# Every script that changes a job first checks its epoch (set once, when the job is
# created): a Redis that restarted empty, was flushed or lost the job's keys has none, and
# the call changes nothing. SETTLE also counts each worker's calls in ``gen:<tag>``: the
# worker keeps the count too, so a Redis restored from an older snapshot (which forgets
# some of its claims) answers with a count it has already seen.
LOST: Final = -1

SETTLE: Final = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[3] then return {-1} end
local worker = ARGV[1]
local started = KEYS[4]
local prefix = 'p:' .. worker .. '\\n'
local gen = redis.call('HINCRBY', KEYS[2], 'gen:' .. worker, 1)
local i = 4
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
-- Records this worker announced that ended unsent (stopped before any attempt arrived).
n = tonumber(ARGV[i]); i = i + 1
for j = 1, n do
  if redis.call('HGET', started, ARGV[i]) == worker then redis.call('HDEL', started, ARGV[i]) end
  i = i + 1
end
local won, out = 0, {gen}
while i < #ARGV do
  local r = redis.call('HSETNX', KEYS[1], ARGV[i], prefix .. ARGV[i + 1])
  won = won + r
  if r == 0 then
    -- Ours already: this call is a retry of one whose answer was lost.
    local v = redis.call('HGET', KEYS[1], ARGV[i])
    if string.sub(v, 1, #prefix) == prefix then r = 1 end
  end
  out[#out + 1] = r
  -- Final now (ours or another's): no longer in doubt if its sender dies.
  redis.call('HDEL', started, ARGV[i])
  i = i + 2
end
if won > 0 then redis.call('HINCRBY', KEYS[2], 'final', won) end
return out
"""

# The write-ahead of a record's first request, from any host: ``started`` maps its key to
# the worker about to send it, until the record is final (SETTLE). Whoever takes over the
# shard of a worker that died treats the records it had announced as in doubt.
ANNOUNCE: Final = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then return -1 end
for i = 4, #ARGV do redis.call('HSET', KEYS[1], ARGV[i], ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

ADOPT: Final = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[2] then return {-1} end
local mine = 'p:' .. ARGV[1] .. '\\n'
local out = {}
for i = 3, #ARGV, 2 do
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
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[2] then return -1 end
if tonumber(redis.call('HGET', KEYS[2], 'published') or '0') ~= tonumber(ARGV[1]) then
  return 0
end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HSET', KEYS[2], 'published', tonumber(ARGV[1]) + 1)
return 1
"""

CREATE: Final = """
local fp = redis.call('HGET', KEYS[2], 'fingerprint')
if fp then
  if fp ~= ARGV[1] then
    local inputs = redis.call('HGET', KEYS[2], 'inputs') or ''
    return {'other', inputs, redis.call('HGET', KEYS[2], 'created') or ''}
  end
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'lost', '', ''} end
  local joined = redis.call('HINCRBY', KEYS[2], 'joined', 1)
  return {'joined', redis.call('HGET', KEYS[2], 'epoch') or '', tostring(joined)}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local inputs = redis.call('HGET', KEYS[2], 'inputs') or 'an older dispatcher'
  return {'other', inputs, redis.call('HGET', KEYS[2], 'created') or ''}
end
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return {'lost', '', ''}  -- part of a job whose meta is gone
end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[6], '0', 'MKSTREAM')
redis.call('HSET', KEYS[2], 'fingerprint', ARGV[1], 'epoch', ARGV[2], 'created', ARGV[3],
  'account', ARGV[4], 'inputs', ARGV[5], 'joined', 1)
return {'created', ARGV[2], '1'}
"""

SEAL: Final = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'shards', ARGV[2], 'records', ARGV[3])
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""

SEED: Final = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then return -1 end
local won = 0
for i = 3, #ARGV do won = won + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[2]) end
if won > 0 then redis.call('HINCRBY', KEYS[2], 'final', won) end
return won
"""


class JobStateLost(Exception):
    """Redis no longer holds this job as this process knew it: it restarted empty, was
    flushed, lost the job's keys, or was restored from an older snapshot. Nothing more may
    be claimed or sent: the claims that would stop a second delivery may be gone."""


class JobMismatch(Exception):
    """The job's name is bound to another input or other options."""


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


def recovery_wait() -> float:
    """Seconds to wait for the job's other hosts after a loss (``ValueError``: bad value)."""
    raw = os.environ.get(RECOVERY_WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_RECOVERY_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"must be a number of seconds >= 0, got {raw!r}")
    return value


def recover_without() -> frozenset[str]:
    """Hosts a recovering job does not wait for (``*``: none waited for)."""
    raw = os.environ.get(RECOVER_WITHOUT_ENV, "")
    return frozenset(h.strip() for h in raw.split(",") if h.strip())


class JobKeys:
    """The Redis names of one job, hash-tagged so a Cluster keeps them in one slot."""

    __slots__ = ("final", "meta", "planner", "shards", "started", "workers")

    def __init__(self, name: str) -> None:
        tag = f"dispatcher:{{job:{name}}}"
        self.shards = f"{tag}:shards"
        self.final = f"{tag}:final"
        self.meta = f"{tag}:meta"
        self.workers = f"{tag}:workers"
        self.planner = f"{tag}:planner"
        self.started = f"{tag}:started"


@dataclass(frozen=True, slots=True)
class Shard:
    id: str
    fields: Mapping[str, str]
    reclaimed: bool


def _created_for(inputs: str, created: str) -> str:
    when = ""
    with contextlib.suppress(ValueError):
        stamp = datetime.fromtimestamp(float(created), UTC)
        when = f", created {stamp:%Y-%m-%d %H:%M}Z"
    return f"is bound to another input or other options ({inputs or 'unknown'}{when})"


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
        self.host = os.environ.get(HOST_ENV, "").strip() or socket.gethostname()
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
        self._create = client.register_script(CREATE)
        self._seal = client.register_script(SEAL)
        self._seed = client.register_script(SEED)
        self._announce = client.register_script(ANNOUNCE)
        self.planning = False
        self.epoch = ""  # the job's, learnt when joining it (see create)
        self.gen = 0  # this process's settle calls as Redis last counted them

    async def create(
        self, account_id: str = "", *, fingerprint: str = "", inputs: str = ""
    ) -> bool:
        """Join the job, creating its Stream and group if it is new; ``False`` if another
        process had created it.

        The job's name is bound to ``fingerprint`` (its inputs and options) when it is
        created: :class:`JobMismatch` if it was created for another, :class:`JobStateLost`
        if only part of it is left in Redis."""
        keys = [self.keys.shards, self.keys.meta, self.keys.final]
        args: list[Any] = [
            fingerprint,
            uuid.uuid4().hex,
            str(time.time()),
            account_id,
            inputs,
            GROUP,
        ]
        got = await self.link.call(lambda: self._create(keys=keys, args=args))
        status, detail, extra = (_text(v) for v in got)
        if status == "other":
            raise JobMismatch(_created_for(detail, extra))
        if status == "lost":
            raise JobStateLost(f"part of job {self.name}'s state is missing from Redis")
        self.epoch = detail
        self.tag = f"{int(extra):x}"
        return status == "created"

    async def recovery(self, expect: Sequence[str], recovered: bool) -> set[str]:
        """After Redis lost the job: add ``expect`` to the hosts that must rejoin before
        anything is sent, say this host has (``recovered``: its results are claimed
        again), and return the hosts still awaited (one round trip)."""
        meta = self.keys.meta
        client = self.link.client

        async def op() -> list[Any]:
            async with client.pipeline(transaction=True) as pipe:
                for host in expect:
                    pipe.hset(meta, f"expect:{host}", 1)
                if recovered:
                    pipe.hset(meta, f"recovered:{self.host}", 1)
                pipe.hgetall(meta)
                return list(await pipe.execute())

        fields = {_text(k): v for k, v in (await self.link.call(op))[-1].items()}
        if _text(fields.get("epoch", b"")) != self.epoch:
            raise self._lost()
        waited = {k[len("expect:") :] for k in fields if k.startswith("expect:")}
        back = {k[len("recovered:") :] for k in fields if k.startswith("recovered:")}
        return waited - back

    async def generation(self, tag: str) -> int:
        """How many settle calls Redis counts for the worker ``tag`` of this job."""
        value = await self.link.call(lambda: self.link.client.hget(self.keys.meta, f"gen:{tag}"))
        return int(value or 0)

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
        flat: list[Any] = [index, self.epoch]
        for key, value in fields.items():
            flat += [key, value]
        keys = [self.keys.shards, self.keys.meta]
        if await self.link.call(lambda: self._publish(keys=keys, args=flat)) == LOST:
            raise self._lost()

    async def seal(self, shards: int, records: int) -> None:
        """Every shard is in the Stream: from now on the job can be done."""
        keys = [self.keys.meta, self.keys.shards, self.keys.final]
        args: list[Any] = [self.epoch, shards, records, _EXPIRE_S]
        if await self.link.call(lambda: self._seal(keys=keys, args=args)) == LOST:
            raise self._lost()

    async def seed(self, keys: Sequence[str]) -> int:
        """Claim ``keys`` as final and written (their envelopes are in a results file
        already): how many had no claim. For a job whose Redis state was lost."""
        args: list[Any] = [self.epoch, self.tag, *keys]
        won = await self.link.call(
            lambda: self._seed(keys=[self.keys.final, self.keys.meta], args=args)
        )
        if won == LOST:
            raise self._lost()
        return int(won)

    def _lost(self) -> JobStateLost:
        return JobStateLost(
            f"Redis no longer holds job {self.name}'s state (restarted empty, flushed or "
            "restored from an older snapshot)"
        )

    async def _guarded(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """``op`` through the link; a Stream or group that vanished is a lost job."""
        try:
            return await self.link.call(op)
        except ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):
                raise self._lost() from None
            raise

    async def take(self, block_ms: int = 500) -> Shard | None:
        """The next shard for this process: a new one, or one whose holder died."""
        client = self.link.client
        keys = self.keys

        async def read() -> object:
            return await client.xreadgroup(
                GROUP, self.worker, {keys.shards: ">"}, count=1, block=block_ms
            )

        got = await self._guarded(read)
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

        claimed = await self._guarded(reclaim)
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

    async def announce(self, keys: Sequence[str]) -> None:
        """Say, before their first request leaves, that this process sends ``keys``
        (one round trip): if it dies, whoever takes its shards over, on any host, gives
        them ``unknown`` instead of sending them again. :class:`JobStateLost` if Redis
        lost the job (then nothing may be sent)."""
        args: list[Any] = [self.epoch, self.tag, _EXPIRE_S, *keys]
        got = await self.link.call(
            lambda: self._announce(keys=[self.keys.started, self.keys.meta], args=args)
        )
        if got == LOST:
            raise self._lost()

    async def announced(self, keys: Sequence[str]) -> dict[str, str]:
        """Which of ``keys`` a worker announced and has not settled: key -> its tag."""
        if not keys:
            return {}
        values = await self.link.call(lambda: self.link.client.hmget(self.keys.started, list(keys)))
        return {k: _text(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def settle(
        self,
        written: Sequence[str] = (),
        acks: Sequence[str] = (),
        claims: Sequence[tuple[str, bytes]] = (),
        unsent: Sequence[str] = (),
    ) -> list[bool]:
        """One round trip: mark this process's pending claims on ``written`` as written,
        acknowledge the shards ``acks``, forget the announcements of ``unsent`` (records
        it stopped before anything may have arrived), then claim each ``(key, envelope)``;
        for each claim, whether this process won it (``False``: another envelope is final).

        Safe to repeat (``Link.call`` retries a call whose answer was lost): a claim found
        pending under this process's name is its own, won."""
        if not (written or acks or claims or unsent):
            return []
        args: list[Any] = [self.tag, GROUP, self.epoch, len(written), *written, len(acks), *acks]
        args += [len(unsent), *unsent]
        for key, envelope in claims:
            args += [key, envelope]
        keys = [self.keys.final, self.keys.meta, self.keys.shards, self.keys.started]
        got = await self.link.call(lambda: self._settle(keys=keys, args=args))
        gen, won = int(got[0]), got[1:]
        # A retried call (its answer lost) counts twice: more than one step is fine.
        if gen == LOST or gen <= self.gen:
            raise self._lost()
        self.gen = gen
        for shard in acks:
            self.held.discard(shard)
        return [bool(w) for w in won]

    async def adopt(self, claims: Mapping[str, str]) -> dict[str, bytes]:
        """Take over the pending claims of dead workers (key -> their tag): the envelopes
        this process must now write, by key (a claim that changed meanwhile is not taken)."""
        if not claims:
            return {}
        args: list[Any] = [self.tag, self.epoch]
        for key, worker in claims.items():
            args += [key, worker]
        keys = [self.keys.final, self.keys.meta]
        got = await self.link.call(lambda: self._adopt(keys=keys, args=args))
        if got and got[0] == LOST:
            raise self._lost()
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
                await pipe.execute(raise_on_error=False)

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

        async def op() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                if held:
                    pipe.xclaim(self.keys.shards, GROUP, self.worker, 0, held, justid=True)
                pipe.hset(self.keys.workers, self.worker, beat)
                if self.planning:
                    pipe.pexpire(self.keys.planner, int(self.timeout * 1000))
                pipe.expire(self.keys.workers, _EXPIRE_S)
                pipe.hget(self.keys.meta, "epoch")
                return list(await pipe.execute(raise_on_error=False))

        replies = await self.link.call(op)
        failed = [r for r in replies if isinstance(r, Exception)]
        if replies[-1] != self.epoch.encode() or any("NOGROUP" in str(r) for r in failed):
            raise self._lost()
        if failed:
            raise failed[0]
