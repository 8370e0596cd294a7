"""Wiring a run from settings: inputs → engine → sink. The Python API lives here.

``dispatch`` streams envelopes to the caller; ``run`` does a whole run into a results sink
and returns its statistics. The CLI's ``send`` is ``run`` plus signals, progress and a
summary.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import aclosing
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from dispatcher.engine import Engine
from dispatcher.gate import RateGate
from dispatcher.model import Envelope, Record
from dispatcher.policy import RetryPolicy
from dispatcher.records import KeyDeriver, ReadOptions, detect_format, read_batches
from dispatcher.settings import ConfigError, SendSettings
from dispatcher.sinks import Sink, open_sink
from dispatcher.stats import RunStats
from dispatcher.transport import HttpTransport, Transport, TransportConfig

FLUSH_INTERVAL: Final = 1.0  # seconds between sink flush+fsync during a run
_BATCH: Final = 1000


def policy_for(settings: SendSettings) -> RetryPolicy:
    return RetryPolicy(max_attempts=settings.max_attempts, max_retry_wait=settings.max_retry_wait)


def gate_for(settings: SendSettings) -> RateGate:
    rate = settings.rate
    if rate == "unlimited":
        return RateGate(None)
    if rate == "auto":
        raise ConfigError("--rate", "'auto' is not available yet; give a rate such as 4/s")
    return RateGate(rate.per_second)


def transport_for(settings: SendSettings) -> HttpTransport:
    return HttpTransport(
        TransportConfig(
            base_url=settings.base_url,
            account_id=settings.account_id,
            auth_headers=settings.credentials.headers(),
            timeout=settings.timeout,
            connect_timeout=settings.connect_timeout,
            pool_size=settings.concurrency,
        )
    )


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
    keys = keys if keys is not None else KeyDeriver()
    options = read_options(settings)
    for path in settings.inputs:
        fmt = detect_format(path, settings.format)
        batches = read_batches(path, fmt, options, keys)
        while True:
            # abandon_on_cancel: a read blocked on stdin must not hold up Ctrl-C.
            batch = await anyio.to_thread.run_sync(next, batches, None, abandon_on_cancel=True)
            if batch is None:
                break
            yield batch


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


def engine_for(
    settings: SendSettings,
    transport: Transport,
    *,
    stats: RunStats | None = None,
    rng: Callable[[], float] | None = None,
    policy: RetryPolicy | None = None,
) -> Engine:
    return Engine(
        transport=transport,
        gate=gate_for(settings),
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
    :func:`dispatcher.records.event_from_mapping` to build them from dicts). Leaving the
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


async def drain_to_sink(receive: MemoryObjectReceiveStream[Envelope], sink: Sink) -> None:
    """Write every envelope to the sink; flush and fsync at least once a second."""
    async with receive:
        last_flush = anyio.current_time()
        while True:
            with anyio.move_on_after(FLUSH_INTERVAL):
                try:
                    env = await receive.receive()
                except anyio.EndOfStream:
                    break
                sink.write(env)
                # Take whatever else is ready without waiting, as one batch.
                while True:
                    try:
                        sink.write(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
            now = anyio.current_time()
            if now - last_flush >= FLUSH_INTERVAL:
                await sink.flush()
                last_flush = now
    await sink.flush()


async def run(
    settings: SendSettings,
    *,
    transport: Transport | None = None,
    sink: Sink | None = None,
    policy: RetryPolicy | None = None,
    engine_hook: Callable[[Engine], None] | None = None,
) -> RunStats:
    """One whole run: read the inputs, send, write every envelope to the results sink.

    Returns the run's statistics. ``engine_hook`` sees the engine before it starts (the CLI
    uses it to wire signals and progress).
    """
    check_inputs(settings)
    own_transport = transport is None
    tx: Transport = transport_for(settings) if transport is None else transport
    out = sink if sink is not None else open_sink(settings.results)
    engine = engine_for(settings, tx, policy=policy)
    if engine_hook is not None:
        engine_hook(engine)
    send, receive = anyio.create_memory_object_stream[Envelope](settings.concurrency * 4)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_to_sink, receive, out)
            async with aclosing(input_batches(settings)) as batches:
                await engine.run(batches, send)
    finally:
        with anyio.CancelScope(shield=True):
            await out.aclose()
            if own_transport:
                await tx.aclose()
    return engine.stats
