"""``--redis`` and ``--job``: wiring a run to the coordination stage.

With ``--redis`` the run's gate is the account's shared budget. With ``--job`` too, the
records come from shards of the job (the first process to arrive cuts the input into
shards while the others already start on them) and every envelope goes through its claim
before it is written, straight to the OS, so a kill -9 right after a claim loses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Final

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream

from dispatcher.coordination.budget import SharedGate
from dispatcher.coordination.connection import Link
from dispatcher.coordination.job import HEARTBEAT_S, Job, Shard
from dispatcher.inputs.keys import KeyDeriver
from dispatcher.inputs.records import (
    ReadOptions,
    detect_format,
    line_offsets,
    read_batches,
    read_line_range,
)
from dispatcher.model import Envelope, Record
from dispatcher.results.journal import Journal
from dispatcher.results.sinks import JsonlSink, Sink, encode
from dispatcher.run.settings import ConfigError, Rate, SendSettings
from dispatcher.sending.gate import default_burst
from dispatcher.sending.pacing import Pacer
from dispatcher.sending.stats import RunStats

__all__ = ["SHARD_RECORDS", "Coordinated", "coordinated"]

SHARD_RECORDS: Final = 2000  # lines per shard: a Stream entry per shard, not per record
SHARD_ENV: Final = "DISPATCHER_JOB_SHARD_LINES"  # for tests and benchmarks of small jobs
_FLUSH_S: Final = 1.0


def shard_lines() -> int:
    raw = os.environ.get(SHARD_ENV, "").strip()
    if not raw:
        return SHARD_RECORDS
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(SHARD_ENV, f"must be a whole number of lines >= 1, got {raw!r}")
    return int(raw)


def check_job_inputs(settings: SendSettings) -> None:
    for path in settings.inputs:
        if path == "-":
            raise ConfigError("--job", "shares line ranges of files: stdin cannot be shared")
        fmt = detect_format(path, settings.format)
        if fmt == "csv":
            raise ConfigError("--job", f"{path}: CSV rows may span lines; use JSONL or an id list")


class _Tracker:
    """Which shard each record in the engine came from, and how many are left per shard."""

    def __init__(self) -> None:
        self.shard_of: dict[str, list[str]] = {}
        self.left: Counter[str] = Counter()
        self.sealed: set[str] = set()

    def add(self, shard: str, keys: list[str]) -> None:
        for key in keys:
            self.shard_of.setdefault(key, []).append(shard)
        self.left[shard] += len(keys)

    def finished(self, key: str) -> str | None:
        """One record of ``key`` is final; its shard if that was the shard's last."""
        shards = self.shard_of.get(key)
        if not shards:
            return None
        shard = shards.pop()
        if not shards:
            del self.shard_of[key]
        self.left[shard] -= 1
        if self.left[shard] <= 0:
            del self.left[shard]
            return shard
        return None


class Coordinated:
    """One process's part in a coordinated run: the shared gate, and the job if any."""

    def __init__(self, settings: SendSettings, stats: RunStats, options: ReadOptions) -> None:
        self.settings = settings
        self.options = options
        self.stats = stats
        assert settings.redis_url is not None
        self.link = Link(settings.redis_url, on_state=self._state)
        rate = settings.rate
        requested = rate.per_second if isinstance(rate, Rate) else None
        burst = 1 if requested is None else default_burst(requested)
        # Keyed by account: every run on it shares the budget (a relay has none: its URL).
        budget_key = settings.account_id or settings.base_url
        self.gate = SharedGate(self.link, budget_key, requested, burst=burst)
        # The budget is the account's, shared in Redis: each process paces on all of it.
        self.pacer = Pacer(
            self.gate, requested, auto=rate == "auto", clock=time.monotonic, share=1.0
        )
        self.job = Job(self.link, settings.job) if settings.job is not None else None
        self._results_path = os.path.abspath(settings.results)
        self._tracker = _Tracker()
        self._tg: anyio.abc.TaskGroup | None = None

    def _state(self, state: str) -> None:
        self.stats.coordination = None if state == "connected" else state

    # --- the records ---------------------------------------------------------------

    def _plan(self) -> Iterator[dict[str, str]]:
        """Shards of every input, with the keys a one-process run would give their records
        where a shard read alone would give another (repeats of an earlier shard's record)."""
        settings = self.settings
        options = self.options
        everything = KeyDeriver()
        try:
            for index, path in enumerate(settings.inputs):
                fmt = detect_format(path, settings.format)
                whole = (r for batch in read_batches(path, fmt, options, everything) for r in batch)
                for first, offset, count in line_offsets(path, shard_lines()):
                    own = KeyDeriver()
                    fixes: dict[str, str] = {}
                    n = 0
                    try:
                        for batch in read_line_range(
                            path, fmt, options, own, offset=offset, first_line=first, count=count
                        ):
                            for record in batch:
                                n += 1
                                truth = next(whole)
                                if truth.key != record.key:
                                    fixes[str(record.line)] = truth.key
                    finally:
                        own.close()
                    yield {
                        "input": str(index),
                        "path": path,
                        "offset": str(offset),
                        "first": str(first),
                        "lines": str(count),
                        "records": str(n),
                        "keys": _json(fixes),
                    }
        finally:
            everything.close()

    async def _publish_plan(self) -> None:
        assert self.job is not None
        job = self.job
        plan = self._plan()
        done = await job.published()  # a planner that died left off here
        shards = records = 0
        while True:
            shard = await anyio.to_thread.run_sync(next, plan, None)
            if shard is None:
                break
            if shards >= done:
                await job.publish(shards, shard)
            shards += 1
            records += int(shard["records"])
        await job.seal(shards, records)
        job.planning = False

    def _read(self, shard: Shard) -> list[Record]:
        fields = shard.fields
        path = fields["path"]
        fmt = detect_format(path, self.settings.format)
        fixes = _unjson(fields.get("keys", "{}"))
        keys = KeyDeriver()
        out: list[Record] = []
        try:
            for batch in read_line_range(
                path,
                fmt,
                self.options,
                keys,
                offset=int(fields["offset"]),
                first_line=int(fields["first"]),
                count=int(fields["lines"]),
            ):
                for record in batch:
                    fixed = fixes.get(str(record.line))
                    if fixed is not None:
                        record = dataclasses.replace(record, key=fixed)
                    out.append(record)
        finally:
            keys.close()
        return out

    async def batches(self) -> AsyncGenerator[list[Record], None]:
        """Records of the shards this process takes, until every shard of the job is done."""
        job = self.job
        assert job is not None
        while True:
            shard = await job.take()
            if shard is None:
                if await job.done():
                    return
                if (
                    not job.planning
                    and self._tg is not None
                    and not await job.sealed()
                    and await job.become_planner()
                ):
                    self._tg.start_soon(self._publish_plan)
                continue
            records = await anyio.to_thread.run_sync(self._read, shard)
            final = await job.claimers([r.key for r in records])
            if shard.reclaimed and final:
                for key in await self._recover(final):
                    del final[key]
            todo = [r for r in records if r.key not in final]
            if not todo:
                await job.ack(shard.id)
                continue
            self._tracker.add(shard.id, [r.key for r in todo])
            for start in range(0, len(todo), 1000):
                yield todo[start : start + 1000]

    async def _recover(self, claimed: dict[str, str]) -> set[str]:
        """Claims of a dead process on this host whose envelope never reached its file.

        A process killed after its claim but before its write (while the claim's answer
        was on its way) leaves a record final in Redis with no envelope anywhere. Its
        results file is on this host: read it, and release the claims it lacks, so the
        records are sent again (they were in flight when it died). A dead process on
        another host cannot be read: its claims stand.
        """
        job = self.job
        assert job is not None
        beats = await job.workers()
        by_worker: dict[str, list[str]] = {}
        for key, worker in claimed.items():
            if worker != job.worker:
                by_worker.setdefault(worker, []).append(key)
        released: set[str] = set()
        now = time.time()
        for worker, keys in by_worker.items():
            beat = beats.get(worker)
            if beat is None or now - float(beat.get("seen", now)) <= job.timeout:
                continue  # alive (or never seen): its envelope may still come
            path = beat.get("results")
            if beat.get("host") != job.host or not isinstance(path, str):
                continue
            written = await anyio.to_thread.run_sync(_keys_in, path)
            for key in keys:
                if key not in written and await job.release(key, worker):
                    released.add(key)
        return released

    async def _heartbeat(self) -> None:
        assert self.job is not None
        while True:
            stats = self.stats
            await self.job.heartbeat(
                {
                    "records": stats.records,
                    "attempts": stats.attempts,
                    "rate_limited": stats.rate_limited,
                    "in_flight": stats.in_flight,
                    "elapsed": stats.elapsed(),
                    "results": self._results_path,
                }
            )
            await anyio.sleep(HEARTBEAT_S)

    # --- the envelopes -------------------------------------------------------------

    async def drain(
        self,
        receive: MemoryObjectReceiveStream[Envelope],
        sink: Sink,
        journal: Journal | None = None,
    ) -> None:
        """Claim each envelope, write the claimed ones through, acknowledge finished shards."""
        job = self.job
        assert job is not None
        # Claimed envelopes go to the OS at once, through a handle of our own opened for
        # appending (whole lines, one write each): a kill -9 right after a claim then
        # cannot lose the envelope, as it could from a buffer.
        fd = (
            os.open(self.settings.results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if isinstance(sink, JsonlSink)
            else None
        )
        last_sync = time.monotonic()
        try:
            async for env in receive:
                if await job.claim(env.key):
                    if fd is not None:
                        os.write(fd, encode(env))
                    else:
                        sink.write(env)
                else:
                    self.stats.coordination_dropped += 1
                if journal is not None:
                    journal.written(env.key)
                done = self._tracker.finished(env.key)
                if done is not None:
                    await job.ack(done)
                if time.monotonic() - last_sync >= _FLUSH_S:
                    await self._sync(fd, sink)
                    last_sync = time.monotonic()
            await self._sync(fd, sink)
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    async def _sync(fd: int | None, sink: Sink) -> None:
        if fd is None:
            await sink.flush()
        else:
            await anyio.to_thread.run_sync(os.fsync, fd)


def _keys_in(path: str) -> set[str]:
    """The record keys of every whole envelope line of a JSONL results file."""
    import orjson

    keys: set[str] = set()
    try:
        with open(path, "rb") as file:
            for line in file:
                try:
                    key = orjson.loads(line).get("key")
                except (orjson.JSONDecodeError, AttributeError):
                    continue  # a torn last line: its envelope did not make it
                if isinstance(key, str):
                    keys.add(key)
    except OSError:
        pass
    return keys


def _json(value: dict[str, str]) -> str:
    import orjson

    return orjson.dumps(value).decode()


def _unjson(text: str) -> dict[str, str]:
    import orjson

    value = orjson.loads(text)
    return value if isinstance(value, dict) else {}


@contextlib.asynccontextmanager
async def coordinated(
    settings: SendSettings, stats: RunStats, options: ReadOptions
) -> AsyncIterator[Coordinated]:
    """The run's coordination, live for the ``async with`` block."""
    if settings.job is not None:
        check_job_inputs(settings)
        shard_lines()
    shared = Coordinated(settings, stats, options)
    try:
        async with shared.gate.running(), anyio.create_task_group() as tg:
            shared._tg = tg
            if shared.job is not None:
                await shared.job.create(settings.account_id or settings.base_url)
                if await shared.job.become_planner():
                    tg.start_soon(shared._publish_plan)
                tg.start_soon(shared._heartbeat)
            try:
                yield shared
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await shared.link.aclose()
