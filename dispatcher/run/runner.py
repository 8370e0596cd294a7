"""Wiring a run from settings: inputs → engine → sink. The Python API lives here.

``dispatch`` streams envelopes to the caller; ``run`` does a whole run into a results sink
and returns its statistics. The CLI's ``send`` is ``run`` plus signals, progress and a
summary.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import random
import sys
import time
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
)
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream

from dispatcher.clients.base import Transport
from dispatcher.clients.fast import FastTransport
from dispatcher.clients.targets import Target, build_transport, spec_of
from dispatcher.inputs.records import KeyDeriver, ReadOptions, detect_format, read_batches
from dispatcher.inputs.records import check_inputs as check_input_files
from dispatcher.model import Delivery, Envelope, ErrorKind, Event, Invalid, Record
from dispatcher.results import envelopes
from dispatcher.results.errors import ResultsWriteError
from dispatcher.results.journal import (
    BACKLOG,
    Journal,
    crashed_unsettled,
    iter_paths,
    remove_settled,
)
from dispatcher.results.journal import path_for as journal_path_for
from dispatcher.results.ledger import (
    KeyState,
    load_ceiling,
    load_ledger,
    repair_jsonl_tail,
    save_ceiling,
)
from dispatcher.results.lock import ResultsLock
from dispatcher.results.lock import acquire as lock_results
from dispatcher.results.sinks import Sink, check_results_path, open_sink
from dispatcher.results.sqlite_sink import is_sqlite_path
from dispatcher.run.settings import (
    ConfigError,
    Credentials,
    HttpClient,
    Rate,
    RateSetting,
    SendSettings,
)
from dispatcher.sending.engine import Engine, StopRules
from dispatcher.sending.gate import RateGate
from dispatcher.sending.pacing import Pacer, guarded
from dispatcher.sending.policy import RetryPolicy
from dispatcher.sending.stats import RunStats

OUTAGE_POLL_S: Final = 0.25  # how often the run looks at how long Redis has been away

if TYPE_CHECKING:
    from dispatcher.coordination.budget import SharedGate
    from dispatcher.coordination.connection import Link
    from dispatcher.run.shared import Coordinated

_BATCH: Final = 1000


def _now() -> datetime:
    return datetime.now(UTC)


def backend_options() -> dict[str, object]:
    """anyio's asyncio backend options: uvloop when installed (the ``speed`` extra)."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def policy_for(settings: SendSettings) -> RetryPolicy:
    return RetryPolicy(max_attempts=settings.max_attempts, max_retry_wait=settings.max_retry_wait)


def gate_for(
    settings: SendSettings, share: float = 1.0, remembered: float | None = None
) -> tuple[RateGate, Pacer]:
    """The run's gate and the pacer that adapts it to the server's rate headers.

    ``share`` is this process's part of the budget when ``--processes`` splits a run;
    ``remembered`` the ceiling an earlier ``--rate auto`` run found (see ``load_ceiling``).
    """
    rate = settings.rate
    requested = rate.per_second if isinstance(rate, Rate) else None
    gate = RateGate(requested)
    pacer = Pacer(
        gate,
        requested,
        auto=rate == "auto",
        clock=time.monotonic,
        share=share,
        remembered=remembered,
        guarded=guarded(settings.base_url),
    )
    return gate, pacer


class TransportSettings(Protocol):
    """What a transport is built from: :class:`SendSettings` and a load test's settings
    both have it."""

    @property
    def target(self) -> Target: ...
    @property
    def base_url(self) -> str: ...
    @property
    def account_id(self) -> str | None: ...
    @property
    def credentials(self) -> Credentials | None: ...
    @property
    def timeout(self) -> float: ...
    @property
    def connect_timeout(self) -> float: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def http_client(self) -> HttpClient: ...
    @property
    def relay_secret(self) -> str | None: ...
    @property
    def batch_size(self) -> int: ...


def transport_for(settings: TransportSettings) -> Transport:
    """The run's transport for its ``--target``: for the API and wrangler dev the lean
    HTTP/1.1 client or aiohttp (``--http-client``); for a relay, the batching client."""
    return build_transport(
        settings.target,
        base_url=settings.base_url,
        account_id=settings.account_id,
        auth_headers=settings.credentials.headers() if settings.credentials else {},
        timeout=settings.timeout,
        connect_timeout=settings.connect_timeout,
        pool_size=settings.concurrency,
        http_client=settings.http_client,
        relay_secret=settings.relay_secret,
        batch_size=settings.batch_size,
    )


def read_options(settings: SendSettings) -> ReadOptions:
    return ReadOptions(
        workflow=settings.workflow,
        event_type=settings.event_type,
        body=settings.body,
        strict_ids=settings.validate_ids,
        extra_fields=settings.allow_extra_fields,
        batch_size=_BATCH,
    )


def check_inputs(settings: SendSettings) -> None:
    """Fail before sending anything if an input cannot be read as a whole (exit 2, not
    mid-run): every input's format, the options an id list needs, a CSV header."""
    if settings.instances_of is not None:
        return  # the records come from the list endpoint
    if not settings.inputs:
        raise ConfigError(
            "INPUT", "give at least one input file, or - for stdin, or --instances-of WORKFLOW"
        )
    check_input_files(settings.inputs, settings.format, read_options(settings))


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
        auth_hint=spec_of(settings.target).auth_hint,
    )


class Dispatch:
    """What :func:`dispatch` returns: an async iterator of envelopes, one per record.

    ``stop()`` winds the run down gracefully: no new record starts, requests in flight
    finish, records waiting for a retry get their ``stopped`` envelope, and iteration then
    ends. Leaving the loop early or cancelling it is a hard stop; the envelopes of the
    records it cut off (and of any finished but not yet yielded) are then in
    :attr:`abandoned`. Use ``async with dispatch(...) as envelopes:`` so that the stop
    happens when the block ends, not when the garbage collector gets to it.
    """

    __slots__ = ("_engine", "_gen", "abandoned")

    def __init__(
        self,
        records: Iterable[Record] | AsyncIterable[Record],
        settings: SendSettings,
        transport: Transport | None,
        policy: RetryPolicy | None,
    ) -> None:
        self.abandoned: list[Envelope] = []
        own = transport is None
        tx: Transport = transport_for(settings) if transport is None else transport
        self._engine = engine_for(settings, tx, policy=policy)
        self._gen = self._run(records, settings, tx, own)

    @property
    def stats(self) -> RunStats:
        """The run's statistics so far (attempts, retries, confirmed...)."""
        return self._engine.stats

    def __aiter__(self) -> Dispatch:
        return self

    async def __anext__(self) -> Envelope:
        return await self._gen.__anext__()

    async def __aenter__(self) -> Dispatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._gen.aclose()

    def stop(self, reason: str = "the caller asked to stop") -> None:
        self._engine.stop(reason)

    async def _run(
        self,
        records: Iterable[Record] | AsyncIterable[Record],
        settings: SendSettings,
        tx: Transport,
        own: bool,
    ) -> AsyncGenerator[Envelope, None]:
        engine = self._engine
        send, receive = anyio.create_memory_object_stream[Envelope](settings.concurrency * 4)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run, _batched(records), send)
                try:
                    while True:
                        try:
                            env = await receive.receive()
                        except anyio.EndOfStream:
                            break
                        yield env
                finally:
                    engine.stop("the caller stopped iterating")
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                # What the workers had finished but not handed over, then what they were
                # in the middle of: no started record goes without its envelope.
                while True:
                    try:
                        self.abandoned.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                receive.close()
                self.abandoned.extend(engine.abandoned())
                if own:
                    await tx.aclose()


def dispatch(
    records: Iterable[Record] | AsyncIterable[Record],
    settings: SendSettings,
    *,
    transport: Transport | None = None,
    policy: RetryPolicy | None = None,
) -> Dispatch:
    """Send ``records`` and yield one envelope per record as each finishes.

    ``records`` are :class:`~dispatcher.Event` / :class:`~dispatcher.Invalid` values (see
    :func:`dispatcher.inputs.records.event_from_mapping` to build them from dicts). See
    :class:`Dispatch` for stopping early: records not yet attempted get no envelope, and
    records cut off by a hard stop get theirs in ``abandoned``.
    """
    return Dispatch(records, settings, transport, policy)


class Durability(Protocol):
    """What the group commit tells of the envelopes it makes durable: the journal, or a
    ``--processes`` parent's account of which worker each came from."""

    @property
    def given_total(self) -> int: ...

    def written(self, key: str) -> None: ...

    def sync(self) -> None: ...

    def durable(self, upto: int) -> None: ...

    def maybe_compact(self) -> None: ...


class GroupCommit:
    """Makes envelopes durable as soon as the disk allows: group commit.

    A flush starts as soon as the previous one ends and takes whatever arrived meanwhile;
    the write and fsync run in a worker thread, so the loop keeps sending. The window a
    kill -9 can catch is thus one flush (a few ms), not a fixed interval. Each flush also
    fsyncs the journal, then lets it forget the records now durable (``durable_on_flush``;
    a ``--processes`` worker's sink is a pipe: its parent says what is durable).

    A write that fails stops the flushing: :attr:`error` holds it and ``on_error`` is told
    (the run then stops sending); what was durable stays, the journal keeps the rest.
    """

    __slots__ = (
        "_closing",
        "_dirty",
        "_journal",
        "_journal_error",
        "_on_error",
        "_sink",
        "_wake",
        "durable",
        "error",
    )

    def __init__(
        self,
        sink: Sink,
        journal: Durability | None = None,
        *,
        durable_on_flush: bool = True,
        on_error: Callable[[ResultsWriteError], None] | None = None,
    ) -> None:
        self._sink = sink
        self._journal = journal
        self.durable = durable_on_flush
        self._on_error = on_error
        self._wake = anyio.Event()
        self._dirty = False
        self._closing = False
        self.error: ResultsWriteError | None = None
        self._journal_error: OSError | None = None

    def write(self, env: Envelope) -> None:
        self._sink.write(env)
        if self._journal is not None:
            self._journal.written(env.key)
        if not self._dirty:
            self._dirty = True
            self._wake.set()

    def close(self) -> None:
        """Let :meth:`run` end after one last flush of what is written."""
        self._closing = True
        self._wake.set()

    async def commit(self) -> None:
        """One flush of everything written so far; failures are kept, not raised."""
        self._dirty = False
        if self.error is not None:
            return
        journal = self._journal
        upto = journal.given_total if journal is not None else 0
        failed: ResultsWriteError | None = None
        async with anyio.create_task_group() as tg:
            if journal is not None:
                # The journal's fsync (for power loss) alongside the results' own.
                tg.start_soon(self._sync_journal, journal)
            try:
                await self._sink.flush()
            except ResultsWriteError as exc:
                failed = exc
            except OSError as exc:
                failed = ResultsWriteError(getattr(self._sink, "_path", "results"), exc)
        if failed is None and self._journal_error is not None:
            failed = ResultsWriteError("the journal", self._journal_error)
        if failed is not None:
            self._fail(failed)
            return
        if journal is not None:
            if self.durable:
                journal.durable(upto)
            journal.maybe_compact()

    async def _sync_journal(self, journal: Durability) -> None:
        try:
            await anyio.to_thread.run_sync(journal.sync)
        except OSError as exc:
            self._journal_error = exc

    def _fail(self, exc: ResultsWriteError) -> None:
        self.error = exc
        if self._on_error is not None:
            self._on_error(exc)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if self._dirty:
                await self.commit()
            if self._closing and not self._dirty:
                return


async def drain_to_sink(
    receive: MemoryObjectReceiveStream[Envelope],
    sink: Sink,
    journal: Journal | None = None,
    *,
    commit: GroupCommit | None = None,
) -> None:
    """Write every envelope to the sink, each durable as soon as a group commit allows.

    The stream is left open: after a hard stop the caller takes what is still in it.
    """
    commit = commit if commit is not None else GroupCommit(sink, journal)
    async with anyio.create_task_group() as tg:
        tg.start_soon(commit.run)
        while True:
            try:
                env = receive.receive_nowait()
            except anyio.EndOfStream:
                break
            except anyio.WouldBlock:
                try:
                    env = await receive.receive()
                except anyio.EndOfStream:
                    break
            commit.write(env)
        commit.close()


def skip_reason(record: Record, state: KeyState | None, settings: SendSettings) -> str | None:
    """Why resume leaves this record alone, or None to send it."""
    if state is None:
        return None
    if state.delivery is Delivery.CONFIRMED:
        return "confirmed"
    if state.error_kind is ErrorKind.STOPPED and state.delivery is not Delivery.UNKNOWN:
        # Stopped between attempts with nothing in doubt: not final, so it goes again.
        return None
    if state.error_kind is ErrorKind.SKIPPED:
        # Left out because the instance did not wait: this run's listing decides again.
        return None
    if state.error_kind is ErrorKind.INVALID:
        # Invalid lines stay invalid until the input is fixed (then their key changes,
        # or, with an explicit id, they come back as a valid record and are sent).
        return "invalid" if isinstance(record, Invalid) else None
    if state.delivery is Delivery.UNKNOWN:
        return None if settings.resend_unknown else "unknown"
    if state.error_kind is ErrorKind.RATE_LIMITED:
        return None  # every answer was a 429: never delivered, nothing to fix but the wait
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


def settle_crashed_run(
    settings: SendSettings, sink: Sink, ledger: dict[str, KeyState]
) -> tuple[int, int]:
    """Give every record a crashed run had started an ``unknown`` envelope, unless that run
    wrote its envelope (whatever it said) or some run confirmed it.

    Returns how many, and how many journal lines were torn before their key (records
    that may have been sent but cannot be named). The records' requests may have arrived:
    only ``--resend-unknown`` sends them again. Reads the journal of a one-process run and
    those of ``--processes`` workers (``<results>.inflight.<i>``). A torn journal line
    counts as "may have been sent".
    """
    now = datetime.now(UTC)
    count = unidentified = 0
    for journal in iter_paths(settings.results):
        found = crashed_unsettled(journal, settings.results)
        if found is None:
            continue
        crashed, entries = found
        unidentified += crashed.unidentified
        for rec in entries:
            state = ledger.get(rec.key)
            if state is not None and (state.delivery is Delivery.CONFIRMED or state is _CRASHED):
                continue  # confirmed by some run, or named by another journal just now
            sink.write(envelopes.for_crashed(rec, now))
            ledger[rec.key] = _CRASHED
            count += 1
    return count, unidentified


_CRASHED: Final = KeyState(delivery=Delivery.UNKNOWN, ok=False, error_kind=ErrorKind.STOPPED)


def remove_journals(results: str, warnings: list[str] | None = None) -> None:
    """Forget the journals beside ``results``: every record they name has its envelope.

    One that cannot be removed (an immutable or read-only folder) is emptied if it can
    be, and noted in ``warnings``: it never fails the run.
    """
    for journal in iter_paths(results):
        warning = remove_settled(journal)
        if warning is not None and warnings is not None:
            warnings.append(warning)


def prepare_results(settings: SendSettings, stats: RunStats) -> tuple[Sink, dict[str, KeyState]]:
    """Open the results sink for this run; on resume, read what earlier runs settled.

    The caller holds the results' lock (:func:`open_results` takes it).
    """
    path = settings.results
    if settings.job is not None and not settings.overwrite and not is_sqlite_path(path):
        # A job's process started again appends to its results: after a crash, complete
        # the torn last line first, or the next envelope would be glued to it.
        repair_jsonl_tail(path)
    if not settings.resume:
        if settings.job is None or settings.overwrite:
            remove_journals(path, stats.warnings)  # --overwrite (or no results): stale journals
        # A job's are settled in Redis once it has joined (dispatcher.run.shared).
        return open_sink(path, truncate=settings.overwrite), {}
    if not is_sqlite_path(path):
        repair_jsonl_tail(path)
    ledger = load_ledger(path, on_torn=lambda torn: None)
    sink = open_sink(path)
    stats.crashed_unknown, stats.crashed_unreadable = settle_crashed_run(settings, sink, ledger)
    return sink, ledger


async def open_results(
    settings: SendSettings, stats: RunStats
) -> tuple[Sink, dict[str, KeyState], ResultsLock | None]:
    """Lock the results for this run, open them, and settle a crashed run's journals.

    Raises :class:`~dispatcher.results.lock.ResultsLocked` (exit 2) while another run
    holds them, before anything is read or sent. On return the settled envelopes are
    durable and the old journals gone: this run's own start afresh.
    """
    try:
        lock = lock_results(settings.results)
    except OSError as exc:
        raise ResultsWriteError(settings.results, exc) from exc
    try:
        try:
            sink, ledger = prepare_results(settings, stats)
        except OSError as exc:
            raise ResultsWriteError(settings.results, exc) from exc
        try:
            await sink.flush()
        except BaseException:
            await sink.aclose()
            raise
        if settings.job is None or settings.overwrite:
            remove_journals(settings.results, stats.warnings)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return sink, ledger, lock


def shard_of(key: str, count: int) -> int:
    """Which of ``count`` workers sends the record of ``key`` (stable across runs)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % count


def in_shard(key: str, shard: tuple[int, int]) -> bool:
    """Whether ``key`` belongs to worker ``shard[0]`` of ``shard[1]`` (stable across runs)."""
    index, count = shard
    return shard_of(key, count) == index


async def _sharded(
    batches: AsyncIterator[list[Record]], shard: tuple[int, int]
) -> AsyncGenerator[list[Record], None]:
    async for batch in batches:
        kept = [record for record in batch if in_shard(record.key, shard)]
        if kept:
            yield kept


async def check_redis(settings: SendSettings) -> None:
    """Connect to ``--redis`` once, within a few seconds, before anything else happens:
    a bad URL, a wrong password, a missing database or an unreachable host is one
    :class:`ConfigError` (exit 2) naming ``--redis`` and the URL without its password.
    A job's own settings are checked first: they need no server to be found wrong."""
    url = settings.redis_url
    assert url is not None
    try:
        from dispatcher.coordination.connection import probe, redact
        from dispatcher.run.shared import check_job_settings
    except ImportError as exc:
        raise ConfigError(
            "--redis", "needs redis-py: pip install 'cf-workflows-dispatcher[redis]'"
        ) from exc
    check_job_settings(settings)
    problem = await probe(url)
    if problem is not None:
        raise ConfigError("--redis", f"{redact(url)}: {problem}")


async def watch_redis(engine: Engine, link: Link, stats: RunStats, limit: float) -> None:
    """End the run once Redis has been unreachable for ``limit`` seconds, and give up
    on it at once when the run stops (Ctrl-C, a stop rule) while it is away: nothing
    then waits for Redis, what is final is written unclaimed, the rest is left."""
    while True:
        await anyio.sleep(OUTAGE_POLL_S)
        if link.gone is not None:
            # Given up on elsewhere: Redis refused the run's credentials or rights.
            engine.stop(f"{link.gone}; nothing more was sent, records not final are left")
            return
        if link.connected:
            continue
        away = link.unreachable_for()
        if away >= limit and not engine.stopping:
            reason = (
                f"redis unreachable for {away:.0f} s (--redis-outage-timeout {limit:g}s): "
                "nothing more was sent; records not final are left for the next run"
            )
            engine.stop(reason)
            link.give_up(reason)
        elif engine.stopping:
            link.give_up("the run stopped while redis was unreachable")
        if link.gone is not None:
            return


async def run(
    settings: SendSettings,
    *,
    transport: Transport | None = None,
    sink: Sink | None = None,
    policy: RetryPolicy | None = None,
    engine_hook: Callable[[Engine], None] | None = None,
    shard: tuple[int, int] | None = None,
    shard_acks: Callable[[Journal], Coroutine[Any, Any, None]] | None = None,
) -> RunStats:
    """One whole run: read the inputs, send, write every envelope to the results sink.

    Returns the run's statistics. ``engine_hook`` sees the engine before it starts (the CLI
    uses it to wire signals and progress). Cancelling the call is a hard stop: records in
    flight get an envelope saying delivery ``unknown``, records not attempted get none.

    The run holds the results' lock for its whole life: a second run on the same results
    raises :class:`~dispatcher.results.lock.ResultsLocked` before sending anything. When
    the results cannot be written (full disk, read-only folder) the run stops sending and
    ``stats.write_error`` says why; what was durable stays, ``--resume`` continues.

    ``shard=(i, n)`` makes this run worker ``i`` of ``n`` (``--processes``): it sends only
    its share of the records and writes envelopes to ``sink``; the parent owns the
    results file (and its lock, inherited), so this run reads it (to resume) but never
    writes it, and keeps its own journal, ``<results>.inflight.<i>``, compacted as
    ``shard_acks`` (started with the journal) reports envelopes durable in the parent.
    """
    check_inputs(settings)
    if shard is None and sink is None:
        # The CLI's rule for the API too: earlier results are touched only when asked.
        check_results_path(
            settings.results,
            resume=settings.keeps_results,
            overwrite=settings.overwrite,
        )
    if settings.redis_url is not None and shard is None:
        await check_redis(settings)
    stats = RunStats()
    lock: ResultsLock | None = None
    if shard is not None:
        if sink is None:
            raise ValueError("a shard writes to the sink its parent gives it")
        out = sink
        ledger = load_ledger(settings.results, on_torn=lambda torn: None) if settings.resume else {}
        jpath = journal_path_for(settings.results)
        jpath = None if jpath is None else f"{jpath}.{shard[0]}"
    elif sink is None:
        out, ledger, lock = await open_results(settings, stats)
        jpath = journal_path_for(settings.results)
    else:
        out, ledger, jpath = sink, {}, None
    try:
        return await _run_locked(
            settings,
            stats,
            out,
            ledger,
            jpath,
            transport=transport,
            policy=policy,
            engine_hook=engine_hook,
            shard=shard,
            shard_acks=shard_acks,
        )
    finally:
        if lock is not None and (warning := lock.release()) is not None:
            stats.warnings.append(warning)


async def _run_locked(
    settings: SendSettings,
    stats: RunStats,
    out: Sink,
    ledger: dict[str, KeyState],
    jpath: str | None,
    *,
    transport: Transport | None,
    policy: RetryPolicy | None,
    engine_hook: Callable[[Engine], None] | None,
    shard: tuple[int, int] | None,
    shard_acks: Callable[[Journal], Coroutine[Any, Any, None]] | None,
) -> RunStats:
    coordination = contextlib.AsyncExitStack()
    shared: Coordinated | None = None
    try:
        if settings.redis_url is not None:
            # Imported here: redis-py is an extra (cf-workflows-dispatcher[redis]), needed
            # only with --redis.
            try:
                from dispatcher.run.shared import coordinated
            except ImportError as exc:
                raise ConfigError(
                    "--redis", "needs redis-py: pip install 'cf-workflows-dispatcher[redis]'"
                ) from exc
            shared = await coordination.enter_async_context(
                coordinated(settings, stats, read_options(settings))
            )
            if shared.job is not None and jpath is not None:
                # One per run of a job's process: another process that finds this one
                # dead reads what it had in flight there (see Coordinated._dead_in_doubt).
                jpath = shared.journal_path(jpath)
            if shared.job is not None:
                await _claim_unclaimed(shared, settings.results, stats)
        journal = (
            Journal(jpath, results=settings.results, limit=in_doubt_limit(settings, shard))
            if jpath is not None
            else None
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await coordination.aclose()
            await out.aclose()
        raise
    own_transport = transport is None
    tx: Transport = transport_for(settings) if transport is None else transport
    remembered = (
        load_ceiling(settings.results, settings.base_url, settings.account_id)
        if settings.rate == "auto"
        else None
    )
    gate: RateGate | SharedGate
    if shared is not None:
        gate, pacer = shared.gate, shared.pacer
    else:
        gate, pacer = gate_for(
            settings, share=1.0 if shard is None else 1.0 / shard[1], remembered=remembered
        )
    engine = Engine(
        transport=tx,
        gate=gate,
        pacer=pacer,
        policy=policy if policy is not None else policy_for(settings),
        concurrency=settings.concurrency,
        stats=stats,
        stop_rules=stop_rules_for(settings),
        mark_started=None if journal is None else _marker(journal, engine_stats=stats),
        auth_hint=spec_of(settings.target).auth_hint,
        backlog=journal,
        announce=shared.announce if shared is not None and shared.job is not None else None,
    )

    def write_failed(exc: ResultsWriteError) -> None:
        # Send nothing more: every later envelope could only be lost.
        if stats.write_error is None:
            stats.write_error = str(exc)
        engine.stop(str(exc))

    # A shard's sink is a pipe to its parent: durable only once the parent says so.
    commit = GroupCommit(out, journal, durable_on_flush=shard is None, on_error=write_failed)
    held = journal is not None and _hold_journal(
        tx, journal, rate=settings.rate, engine_stats=stats
    )
    if shared is not None:
        shared.attach(engine.stop)
    if engine_hook is not None:
        engine_hook(engine)
    send, receive = anyio.create_memory_object_stream[Envelope](settings.concurrency * 4)
    batches: AsyncGenerator[list[Record], None]
    if shared is not None and shared.job is not None:
        batches = shared.batches()
    elif settings.instances_of is not None:
        from dispatcher.run.instances import listed_batches

        def settled(key: str) -> bool:
            state = ledger.get(key)
            return state is not None and state.delivery is Delivery.CONFIRMED

        # The list and step reads pass the same gate as the sends: one account budget.
        batches = listed_batches(
            settings,
            gate,
            stats,
            stop=engine.stop,
            settled=settled if settings.resume else lambda key: False,
        )
    else:
        batches = input_batches(settings)
    if shard is not None:
        batches = _sharded(batches, shard)
    if settings.resume:
        batches = _resumed(batches, ledger, settings, stats)
    try:
        async with anyio.create_task_group() as tg:
            if shard_acks is not None and journal is not None:
                tg.start_soon(shard_acks, journal)
            if shared is not None:
                tg.start_soon(
                    watch_redis, engine, shared.link, stats, settings.redis_outage_timeout
                )
            async with anyio.create_task_group() as flow:
                if shared is not None and shared.job is not None:
                    # A job claims each envelope in Redis and writes the claimed ones through.
                    flow.start_soon(
                        _failing_fast, shared.drain(receive, out, journal, write_failed)
                    )
                else:
                    flow.start_soon(functools.partial(drain_to_sink, receive, out, commit=commit))
                async with aclosing(batches):
                    await engine.run(batches, send)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if shared is not None and not shared.link.connected and shared.link.gone is None:
                # Stopped while Redis is away (the watch may not have looked yet): claims
                # and the hand-back of shards would only wait for it.
                shared.link.give_up("the run stopped while redis was unreachable")
            # After a hard stop: what the workers had finished but not yet handed over,
            # then what they were in the middle of.
            leftovers: list[Envelope] = []
            while True:
                try:
                    leftovers.append(receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            for env in engine.abandoned():
                stats.record(env)
                leftovers.append(env)
            if shared is not None and shared.job is not None:
                # A job's envelopes are claimed before they are written, these too; those
                # the drain held when the run gave up on Redis are written unclaimed.
                leftovers = [*shared.cut, *leftovers]
                shared.cut = []
                try:
                    await _failing_fast(shared.settle_leftovers(leftovers, out, journal))
                except _redis_gone() as exc:
                    said = _unclaimed(leftovers, commit, stats, settings.results)
                    stats.warnings.append(f"{exc}: {said}")
            else:
                for env in leftovers:
                    commit.write(env)
            receive.close()
            await commit.commit()
            await close_sink(out, commit)
            if commit.error is not None and stats.write_error is None:
                stats.write_error = str(commit.error)
            found = pacer.found
            if found is not None and (shard is None or shard[0] == 0):
                # The next run (and --resume) starts its search near this.
                save_ceiling(
                    settings.results, settings.base_url, settings.account_id, found, _now()
                )
            if journal is not None:
                # Kept unless every envelope is durable (a shard's: its parent removes it).
                warning = journal.close(delete=shard is None and commit.error is None)
                if warning is not None:
                    stats.warnings.append(warning)
            if held:
                assert isinstance(tx, FastTransport)
                tx.hold_writes(None)  # a caller's transport, used again, writes at once
            if own_transport:
                await tx.aclose()
        # Outside the shield: it ends the coordination's own task group (it shields what
        # must finish, closing the Redis connection).
        try:
            await _failing_fast(coordination.aclose())
        except _redis_gone():
            pass  # the shards are not handed back: another process takes them on timeout
        except BaseExceptionGroup as group:  # the same, out of a task group
            if group.split(_redis_gone())[1] is not None:
                raise
    return stats


async def _failing_fast(call: Coroutine[Any, Any, None]) -> None:
    """Await ``call`` with Redis calls raising ``RedisGone`` once the run gave up on it.

    A run without ``--redis`` never loaded the connection module, so it has no Redis call
    to fail fast: importing redis-py here would cost a plain send ~60% of its start-up."""
    connection = sys.modules.get("dispatcher.coordination.connection")
    if connection is None:
        await call
        return
    fail_fast = connection.fail_fast

    token = fail_fast.set(True)
    try:
        await call
    finally:
        fail_fast.reset(token)


class _NoRedis(Exception):
    """Never raised: what ``except _redis_gone()`` catches in a run without Redis."""


def _redis_gone() -> type[Exception]:
    connection = sys.modules.get("dispatcher.coordination.connection")
    if connection is None:
        return _NoRedis  # no Redis call was made, so none can have given up
    gone: type[Exception] = connection.RedisGone
    return gone


def unclaimed_path(results: str) -> str:
    """Where a --job run that gave up on Redis lists the envelopes it wrote unclaimed."""
    return f"{results}.unclaimed.jsonl"


def _unclaimed(envs: list[Envelope], commit: GroupCommit, stats: RunStats, results: str) -> str:
    """Write the final ones of ``envs`` without a claim (Redis is gone); say how many.
    The others are not written (left for the next run), so not counted either.

    The final ones are also listed beside the results: the job's next run here claims
    them first (:func:`_claim_unclaimed`), so that nobody sends those records again."""
    from dispatcher.results.sinks import encode
    from dispatcher.run.shared import _is_final

    final = [env for env in envs if _is_final(env)]
    for env in envs:
        if _is_final(env):
            commit.write(env)
        else:
            stats.unrecord(env)
    listed = ""
    if final:
        try:
            with open(unclaimed_path(results), "ab") as side:
                side.writelines(encode(env) for env in final)
                side.flush()
                os.fsync(side.fileno())
        except OSError as exc:
            listed = f" (could not list them in {unclaimed_path(results)}: {exc.strerror})"
    return (
        f"{len(final)} final envelope(s) written without their claim in Redis{listed}, "
        f"{len(envs) - len(final)} record(s) not final left for the next run"
    )


async def _claim_unclaimed(shared: Coordinated, results: str, stats: RunStats) -> None:
    """Claim, before sending, what an earlier run of this job wrote to these results
    while Redis was away (:func:`_unclaimed`): written already, so marked written at once;
    a key another process claimed meanwhile keeps that claim (this copy is a duplicate)."""
    job = shared.job
    assert job is not None
    path = unclaimed_path(results)
    try:
        data = await anyio.Path(path).read_bytes()
    except FileNotFoundError:
        return
    lines = [line for line in data.splitlines() if line.strip()]
    claims: dict[str, bytes] = {}
    for line in lines:
        try:
            key = orjson.loads(line).get("key")
        except (orjson.JSONDecodeError, AttributeError):
            continue  # torn by a crash while it was listed: its record is sent again
        if isinstance(key, str):
            claims[key] = line + b"\n"
    from dispatcher.coordination.job import JobStateLost

    items = list(claims.items())
    try:
        for start in range(0, len(items), 500):
            batch = items[start : start + 500]
            won = await job.settle(claims=batch)
            await job.settle(written=[key for (key, _), w in zip(batch, won, strict=True) if w])
    except JobStateLost as exc:
        shared.lose(exc)  # kept: the next run, after Redis is sorted out, claims them
        return
    await anyio.Path(path).unlink()


async def close_sink(out: Sink, commit: GroupCommit) -> None:
    """Close the sink; after a failed commit, its last flush may fail again: kept quiet."""
    try:
        await out.aclose()
    except ResultsWriteError as exc:
        if commit.error is None:
            commit.error = exc


# Finished envelopes waiting for the disk that a run may hold: this much traffic at a fixed
# --rate (what the group commit, or a --job's claim and fsync, takes to make them durable).
IN_DOUBT_S: Final = 0.05
UNPACED_BACKLOG: Final = 512  # the same with --rate unlimited or auto (no rate to go by)


def in_doubt_limit(settings: SendSettings, shard: tuple[int, int] | None) -> int:
    """The most records this process may have started and not yet made durable.

    Its ``--concurrency`` in flight, plus finished envelopes waiting for the disk: as many
    as it has workers, at least :data:`BACKLOG`, at least :data:`IN_DOUBT_S` of traffic at
    ``--rate`` (:data:`UNPACED_BACKLOG` without a fixed rate), shared among the run's
    processes. That is what a kill -9 can leave ``unknown``, however slow the disk; a disk
    whose flushes take less than that much traffic never holds a request.
    """
    processes = 1 if shard is None else shard[1]
    rate = settings.rate
    paced = math.ceil(rate.per_second * IN_DOUBT_S) if isinstance(rate, Rate) else UNPACED_BACKLOG
    backlog = max(BACKLOG, paced)
    return settings.concurrency + max(settings.concurrency, -(-backlog // processes))


def _marker(journal: Journal, *, engine_stats: RunStats) -> Callable[[Event], None]:
    def mark(event: Event) -> None:
        try:
            journal.mark(event)
        except ResultsWriteError as exc:
            if engine_stats.write_error is None:
                engine_stats.write_error = str(exc)
            raise

    return mark


def _hold_journal(
    tx: Transport, journal: Journal, *, rate: RateSetting, engine_stats: RunStats
) -> bool:
    """With the fast client and ``--rate unlimited``, the journal lines of one loop turn's
    requests go out in one ``write``, before any of those requests
    (``FastTransport.hold_writes``). False: each line is written as its record is marked,
    and its request right after.

    Only unpaced: a paced run lets one request out at a time, so there is nothing to
    batch, and the gate times its spacing (and a server's stalls) from the moment it lets
    a request out: held for a loop turn, four ``--redis`` runs sharing 50/s saw 54
    requests in 0.9 s (``tests/test_redis_budget.py``)."""
    if rate != "unlimited" or not isinstance(tx, FastTransport):
        return False

    def flush() -> None:
        try:
            journal.flush()
        except ResultsWriteError as exc:
            if engine_stats.write_error is None:
                engine_stats.write_error = str(exc)
            raise

    journal.hold()
    tx.hold_writes(flush)
    return True
