"""Wiring a run from settings: inputs → engine → sink. The Python API lives here.

``dispatch`` streams envelopes to the caller; ``run`` does a whole run into a results sink
and returns its statistics. The CLI's ``send`` is ``run`` plus signals, progress and a
summary.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import random
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from dispatcher.clients.aiohttp_client import HttpTransport
from dispatcher.clients.base import Transport, TransportConfig
from dispatcher.clients.fast import FastTransport
from dispatcher.inputs.records import KeyDeriver, ReadOptions, detect_format, read_batches
from dispatcher.model import Delivery, Envelope, ErrorKind, Invalid, Record
from dispatcher.results import envelopes
from dispatcher.results.journal import Journal, read_crashed
from dispatcher.results.journal import path_for as journal_path_for
from dispatcher.results.ledger import KeyState, load_ledger, repair_jsonl_tail
from dispatcher.results.sinks import Sink, open_sink
from dispatcher.results.sqlite_sink import is_sqlite_path
from dispatcher.run.settings import ConfigError, Rate, SendSettings
from dispatcher.sending.engine import Engine, StopRules
from dispatcher.sending.gate import RateGate
from dispatcher.sending.pacing import Pacer
from dispatcher.sending.policy import RetryPolicy
from dispatcher.sending.stats import RunStats

if TYPE_CHECKING:
    from dispatcher.coordination.budget import SharedGate
    from dispatcher.run.shared import Coordinated

FLUSH_INTERVAL: Final = 1.0  # seconds between sink flush+fsync during a run
_BATCH: Final = 1000


def backend_options() -> dict[str, object]:
    """anyio's asyncio backend options: uvloop when installed (``dispatcher[speed]``)."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def policy_for(settings: SendSettings) -> RetryPolicy:
    return RetryPolicy(max_attempts=settings.max_attempts, max_retry_wait=settings.max_retry_wait)


def gate_for(settings: SendSettings, share: float = 1.0) -> tuple[RateGate, Pacer]:
    """The run's gate and the pacer that adapts it to the server's rate headers.

    ``share`` is this process's part of the budget when ``--processes`` splits a run.
    """
    rate = settings.rate
    requested = rate.per_second if isinstance(rate, Rate) else None
    gate = RateGate(requested)
    pacer = Pacer(gate, requested, auto=rate == "auto", clock=time.monotonic, share=share)
    return gate, pacer


def transport_for(settings: SendSettings) -> Transport:
    """The run's transport: the lean HTTP/1.1 client, or aiohttp (``--http-client``)."""
    config = TransportConfig(
        base_url=settings.base_url,
        account_id=settings.account_id,
        auth_headers=settings.credentials.headers(),
        timeout=settings.timeout,
        connect_timeout=settings.connect_timeout,
        pool_size=settings.concurrency,
    )
    if settings.http_client == "aiohttp":
        return HttpTransport(config)
    return FastTransport(config)


def read_options(settings: SendSettings) -> ReadOptions:
    return ReadOptions(
        workflow=settings.workflow,
        event_type=settings.event_type,
        body=settings.body,
        strict_ids=settings.validate_ids,
        batch_size=_BATCH,
    )


def check_inputs(settings: SendSettings) -> None:
    """Fail before sending anything if an input cannot be read at all (exit 2, not mid-run)."""
    if not settings.inputs:
        raise ConfigError("INPUT", "give at least one input file, or - for stdin")
    for path in settings.inputs:
        detect_format(path, settings.format)
        if path != "-":
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError("INPUT", f"cannot read {path}: {exc.strerror}") from exc


async def input_batches(
    settings: SendSettings, keys: KeyDeriver | None = None
) -> AsyncGenerator[list[Record], None]:
    """Batches of records from every input in turn; parsing runs in a worker thread."""
    own = keys is None
    keys = keys if keys is not None else KeyDeriver()
    options = read_options(settings)
    try:
        for path in settings.inputs:
            fmt = detect_format(path, settings.format)
            batches = read_batches(path, fmt, options, keys)
            while True:
                # abandon_on_cancel: a read blocked on stdin must not hold up Ctrl-C.
                batch = await anyio.to_thread.run_sync(next, batches, None, abandon_on_cancel=True)
                if batch is None:
                    break
                yield batch
    finally:
        if own:
            keys.close()


async def _batched(
    records: Iterable[Record] | AsyncIterable[Record],
) -> AsyncIterator[list[Record]]:
    batch: list[Record] = []
    if isinstance(records, AsyncIterable):
        async for record in records:
            batch.append(record)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
    else:
        for record in records:
            batch.append(record)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def stop_rules_for(settings: SendSettings) -> StopRules:
    return StopRules(
        max_failures=settings.max_failures,
        max_error_rate=settings.max_error_rate,
        window=settings.error_window,
    )


def engine_for(
    settings: SendSettings,
    transport: Transport,
    *,
    stats: RunStats | None = None,
    rng: Callable[[], float] | None = None,
    policy: RetryPolicy | None = None,
) -> Engine:
    gate, pacer = gate_for(settings)
    return Engine(
        transport=transport,
        gate=gate,
        pacer=pacer,
        policy=policy if policy is not None else policy_for(settings),
        concurrency=settings.concurrency,
        stats=stats,
        rng=rng if rng is not None else random.random,
    )


async def dispatch(
    records: Iterable[Record] | AsyncIterable[Record],
    settings: SendSettings,
    *,
    transport: Transport | None = None,
    policy: RetryPolicy | None = None,
) -> AsyncIterator[Envelope]:
    """Send ``records`` and yield one envelope per record as each finishes.

    ``records`` are :class:`~dispatcher.Event` / :class:`~dispatcher.Invalid` values (see
    :func:`dispatcher.inputs.records.event_from_mapping` to build them from dicts). Leaving the
    loop early stops the run: records not yet attempted get no envelope.
    """
    own = transport is None
    tx: Transport = transport_for(settings) if transport is None else transport
    engine = engine_for(settings, tx, policy=policy)
    send, receive = anyio.create_memory_object_stream[Envelope](settings.concurrency * 4)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run, _batched(records), send)
            try:
                async with receive:
                    async for env in receive:
                        yield env
            finally:
                engine.stop("the caller stopped iterating")
                tg.cancel_scope.cancel()
    finally:
        if own:
            with anyio.CancelScope(shield=True):
                await tx.aclose()


async def drain_to_sink(
    receive: MemoryObjectReceiveStream[Envelope], sink: Sink, journal: Journal | None = None
) -> None:
    """Write every envelope to the sink; flush and fsync at least once a second.

    The stream is left open: after a hard stop the caller takes what is still in it.
    """
    last_flush = time.monotonic()
    dirty = False
    while True:
        try:
            env = receive.receive_nowait()
        except anyio.EndOfStream:
            break
        except anyio.WouldBlock:
            # Nothing ready: wait, but not past the next flush if something is unflushed.
            # (A timeout scope only here: one per envelope would cost more than the write.)
            timeout = max(0.0, last_flush + FLUSH_INTERVAL - time.monotonic()) if dirty else None
            try:
                with anyio.fail_after(timeout):
                    env = await receive.receive()
            except TimeoutError:
                env = None
            except anyio.EndOfStream:
                break
        if env is not None:
            sink.write(env)
            dirty = True
            if journal is not None:
                journal.written(env.key)
        if dirty and time.monotonic() - last_flush >= FLUSH_INTERVAL:
            await sink.flush()
            if journal is not None:
                # Only now are those envelopes durable: the journal can forget them.
                journal.compact()
            last_flush = time.monotonic()
            dirty = False
    await sink.flush()


def skip_reason(record: Record, state: KeyState | None, settings: SendSettings) -> str | None:
    """Why resume leaves this record alone, or None to send it."""
    if state is None:
        return None
    if state.delivery is Delivery.CONFIRMED:
        return "confirmed"
    if state.error_kind is ErrorKind.INVALID:
        # Invalid lines stay invalid until the input is fixed (then their key changes,
        # or, with an explicit id, they come back as a valid record and are sent).
        return "invalid" if isinstance(record, Invalid) else None
    if state.delivery is Delivery.UNKNOWN:
        return None if settings.resend_unknown else "unknown"
    return None if settings.retry_failed else "failed"


async def _resumed(
    batches: AsyncIterator[list[Record]],
    ledger: dict[str, KeyState],
    settings: SendSettings,
    stats: RunStats,
) -> AsyncGenerator[list[Record], None]:
    skipped = stats.skipped
    async for batch in batches:
        kept = []
        for record in batch:
            reason = skip_reason(record, ledger.get(record.key), settings)
            if reason is None:
                kept.append(record)
            else:
                skipped[reason] += 1
        if kept:
            yield kept


def settle_crashed_run(settings: SendSettings, sink: Sink, ledger: dict[str, KeyState]) -> int:
    """Give every record a crashed run had started, and not confirmed, an ``unknown`` envelope.

    Returns how many. The records' requests may have arrived: only ``--resend-unknown``
    sends them again. Reads the journal of a one-process run and those of ``--processes``
    workers (``<results>.inflight.<i>``).
    """
    path = journal_path_for(settings.results)
    if path is None:
        return 0
    now = datetime.now(UTC)
    count = 0
    for journal in [path, *sorted(glob.glob(glob.escape(path) + ".*[0-9]"))]:
        crashed = read_crashed(journal)
        if crashed is None:
            continue
        for rec in crashed[1]:
            state = ledger.get(rec.key)
            if state is not None and state.delivery is Delivery.CONFIRMED:
                continue
            sink.write(envelopes.for_crashed(rec, now))
            ledger[rec.key] = _CRASHED
            count += 1
    return count


_CRASHED: Final = KeyState(delivery=Delivery.UNKNOWN, ok=False, error_kind=ErrorKind.STOPPED)


def remove_journals(results: str) -> None:
    """Forget the journals beside ``results``: every record they name has its envelope."""
    path = journal_path_for(results)
    if path is None:
        return
    for journal in [path, *glob.glob(glob.escape(path) + ".*[0-9]")]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)


def prepare_results(settings: SendSettings, stats: RunStats) -> tuple[Sink, dict[str, KeyState]]:
    """Open the results sink for this run; on resume, read what earlier runs settled."""
    path = settings.results
    if not settings.resume:
        remove_journals(path)  # --overwrite (or no earlier results): stale journals
        return open_sink(path, truncate=settings.overwrite), {}
    if not is_sqlite_path(path):
        repair_jsonl_tail(path)
    ledger = load_ledger(path, on_torn=lambda torn: None)
    sink = open_sink(path)
    stats.crashed_unknown = settle_crashed_run(settings, sink, ledger)
    return sink, ledger


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether ``key`` belongs to worker ``shard[0]`` of ``shard[1]`` (stable across runs)."""
    index, count = shard
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % count == index


async def _sharded(
    batches: AsyncIterator[list[Record]], shard: tuple[int, int]
) -> AsyncGenerator[list[Record], None]:
    async for batch in batches:
        kept = [record for record in batch if in_shard(record.key, shard)]
        if kept:
            yield kept


async def run(
    settings: SendSettings,
    *,
    transport: Transport | None = None,
    sink: Sink | None = None,
    policy: RetryPolicy | None = None,
    engine_hook: Callable[[Engine], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> RunStats:
    """One whole run: read the inputs, send, write every envelope to the results sink.

    Returns the run's statistics. ``engine_hook`` sees the engine before it starts (the CLI
    uses it to wire signals and progress). Cancelling the call is a hard stop: records in
    flight get an envelope saying delivery ``unknown``, records not attempted get none.

    ``shard=(i, n)`` makes this run worker ``i`` of ``n`` (``--processes``): it sends only
    its share of the records and writes envelopes to ``sink``; the parent owns the
    results file, so this run reads it (to resume) but never writes it, and keeps its own
    journal, ``<results>.inflight.<i>``, for the parent to remove once all is written.
    """
    check_inputs(settings)
    stats = RunStats()
    if shard is not None:
        if sink is None:
            raise ValueError("a shard writes to the sink its parent gives it")
        out = sink
        ledger = load_ledger(settings.results, on_torn=lambda torn: None) if settings.resume else {}
        jpath = journal_path_for(settings.results)
        jpath = None if jpath is None else f"{jpath}.{shard[0]}"
    elif sink is None:
        out, ledger = prepare_results(settings, stats)
        jpath = journal_path_for(settings.results)
    else:
        out, ledger, jpath = sink, {}, None
    own_transport = transport is None
    tx: Transport = transport_for(settings) if transport is None else transport
    if stats.crashed_unknown:
        # The crashed run's journal is about to be replaced: the envelopes that stand in
        # for it must be on disk first, or a second crash would forget them.
        await out.flush()
    journal = Journal(jpath) if jpath is not None else None
    # A shard's envelopes reach the disk only in its parent: its journal is never
    # compacted, and stays until the parent has written everything.
    tracked = journal if shard is None else None
    coordination = contextlib.AsyncExitStack()
    shared: Coordinated | None = None
    gate: RateGate | SharedGate
    if settings.redis_url is not None:
        # Imported here: redis-py is an extra (dispatcher[redis]), needed only with --redis.
        try:
            from dispatcher.run.shared import coordinated
        except ImportError as exc:
            raise ConfigError("--redis", "needs redis-py: pip install 'dispatcher[redis]'") from exc
        shared = await coordination.enter_async_context(
            coordinated(settings, stats, read_options(settings))
        )
        gate, pacer = shared.gate, shared.pacer
    else:
        gate, pacer = gate_for(settings, share=1.0 if shard is None else 1.0 / shard[1])
    engine = Engine(
        transport=tx,
        gate=gate,
        pacer=pacer,
        policy=policy if policy is not None else policy_for(settings),
        concurrency=settings.concurrency,
        stats=stats,
        stop_rules=stop_rules_for(settings),
        mark_started=journal.mark if journal is not None else None,
    )
    if engine_hook is not None:
        engine_hook(engine)
    send, receive = anyio.create_memory_object_stream[Envelope](settings.concurrency * 4)
    batches: AsyncGenerator[list[Record], None] = (
        shared.batches()
        if shared is not None and shared.job is not None
        else input_batches(settings)
    )
    drain = shared.drain if shared is not None and shared.job is not None else drain_to_sink
    if shard is not None:
        batches = _sharded(batches, shard)
    if settings.resume:
        batches = _resumed(batches, ledger, settings, stats)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, receive, out, tracked)
            async with aclosing(batches):
                await engine.run(batches, send)
    finally:
        with anyio.CancelScope(shield=True):
            # After a hard stop: what the workers had finished but not yet handed over,
            # then what they were in the middle of.
            while True:
                try:
                    env = receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
                out.write(env)
                if tracked is not None:
                    tracked.written(env.key)
            for env in engine.abandoned():
                stats.record(env)
                out.write(env)
                if tracked is not None:
                    tracked.written(env.key)
            receive.close()
            await out.aclose()
            if journal is not None:
                journal.close(delete=tracked is not None)
            if own_transport:
                await tx.aclose()
        # Outside the shield: it ends the coordination's own task group (it shields what
        # must finish, closing the Redis connection).
        await coordination.aclose()
    return stats
