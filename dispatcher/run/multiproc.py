"""``--processes N``: one run spread over N worker processes.

Each worker reads the whole input (so every record gets the same key as in a one-process
run) and sends only its share: the records whose key hashes to its index. The rate budget
is divided evenly. Workers write their envelopes as JSON lines to a pipe; the parent
merges them into the one results sink, flushes it, draws the progress and the summary,
and applies ``--max-failures`` / ``--max-error-rate`` to the merged stream.

Crash safety: each worker journals the records it starts in ``<results>.inflight.<i>``.
Its envelopes reach the disk only through the parent, which after each group commit
writes to the worker's stdin how many of that worker's envelopes are now durable (a count:
a worker's envelopes arrive in the order it wrote them), so the worker can compact its
journal. The parent removes the journals once every worker has ended and all is written.
After a crash, ``--resume`` reads them all.

Workers die with their parent: each asks the kernel for SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``, Linux), and kills itself when its stdin (the parent's end of the
pipe) reaches EOF, which also covers other systems. They inherit the parent's lock on the
results (:mod:`dispatcher.results.lock`), so no new run can touch the results, nor open
their journals, until the last of them is gone.

Worker processes run in their own session, so a Ctrl-C at the terminal reaches only the
parent, which passes it on: the first drains, the second stops at once.

More processes help only when one process keeps a core busy (parsing, TLS, HTTP) and
other cores are free: at the real API's 4 requests/s one process idles.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from typing import Any, Final

import anyio
import anyio.lowlevel
import orjson
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from dispatcher.model import Envelope
from dispatcher.results.errors import EXIT_WRITE_FAILED, ResultsWriteError
from dispatcher.results.journal import Journal
from dispatcher.results.ledger import envelope_from_json
from dispatcher.results.lock import ResultsLock
from dispatcher.results.sinks import JsonlSink, Sink
from dispatcher.run import runner
from dispatcher.run.settings import Rate, SendSettings
from dispatcher.run.signals import ignore_stops, watch_signals
from dispatcher.sending.engine import Engine, FailureWatch
from dispatcher.sending.stats import RunStats

STATS_TAG: Final = b'{"__stats__":'
STATS_INTERVAL: Final = 1.0
_MAX_LINE: Final = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one worker process is told, through its stdin (never argv: it holds the token)."""

    settings: SendSettings
    index: int
    count: int
    parent: int = 0  # the parent's pid: a worker whose parent is already gone stops at once


def worker_settings(settings: SendSettings) -> SendSettings:
    """A worker's share: the rate divided, thresholds left to the parent."""
    rate = settings.rate
    if isinstance(rate, Rate):
        rate = Rate(count=rate.count / settings.processes, per=rate.per)
    return dataclasses.replace(
        settings,
        rate=rate,
        processes=1,
        quiet=True,
        progress="off",
        max_failures=None,
        max_error_rate=None,
    )


# --- the worker ----------------------------------------------------------------------


def _stats_line(stats: RunStats) -> bytes:
    return orjson.dumps(
        {
            "__stats__": {
                "attempts": stats.attempts,
                "retries": stats.retries,
                "rate_limited": stats.rate_limited,
                "pauses": stats.pauses,
                "paused_s": stats.paused_s,
                "disk_held_s": stats.disk_held_s,
                "in_flight": stats.in_flight,
                "answers": {str(k): v for k, v in stats.answers.items()},
                "skipped": dict(stats.skipped),
                "stop_reason": stats.stop_reason,
                "unreachable": stats.unreachable,
                "interrupted": stats.interrupted,
            }
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


async def _report(stats: RunStats, sink: JsonlSink) -> None:
    while True:
        await anyio.sleep(STATS_INTERVAL)
        sink.write_raw(_stats_line(stats))


_PR_SET_PDEATHSIG: Final = 1
_SPEC_HEADER: Final = struct.Struct("!I")


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux); nothing elsewhere (see _acks)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)  # the parent died before we asked


async def _acks(journal: Journal) -> None:
    """Follow the parent's counts of this worker's durable envelopes (stdin, one a line).

    EOF means the parent is gone: nothing this worker sends could reach the results, so
    it stops at once (its journal says what it had started).
    """
    os.set_blocking(0, False)
    pending = b""
    while True:
        await anyio.wait_readable(0)
        try:
            chunk = os.read(0, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            os.kill(os.getpid(), signal.SIGKILL)
            return
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if lines:
            journal.durable(int(lines[-1]))
            journal.maybe_compact()


# How the parent starts a worker: SIGINT and SIGTERM are noted from the first line, before
# the imports (which take a while), so that a stop asked for early is neither a
# KeyboardInterrupt traceback nor lost; the engine honours it as soon as it exists.
_BOOTSTRAP: Final = (
    "import signal\n"
    "early = []\n"
    "for sig in (signal.SIGINT, signal.SIGTERM):\n"
    "    signal.signal(sig, lambda number, frame: early.append(number))\n"
    "from dispatcher.run.multiproc import worker_main\n"
    "raise SystemExit(worker_main(early))\n"
)


async def _early_signals(engine: Engine, early: list[int]) -> None:
    """Honour a signal that came before the engine's own watcher was in place."""
    await anyio.lowlevel.checkpoint()  # the watcher, started first, has the signals now
    if early:
        name = signal.Signals(early[0]).name
        engine.stats.interrupted = True
        engine.stop(f"{name}: stopped reading, finished the requests in flight")


async def _worker(spec: WorkerSpec, early: list[int]) -> RunStats:
    sink = JsonlSink("-")
    engines: list[Engine] = []
    run_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        def hook(engine: Engine) -> None:
            engines.append(engine)
            # A worker's stop comes from its parent, which may send SIGINT to every worker
            # while this one winds down: once the watch is over it is ignored, not a
            # KeyboardInterrupt traceback from the middle of the loop's teardown.
            tg.start_soon(
                watch_signals, engine, run_scope, spec.settings.grace, False, ignore_stops
            )
            tg.start_soon(_early_signals, engine, early)
            tg.start_soon(_report, engine.stats, sink)

        with run_scope:
            await runner.run(
                spec.settings,
                sink=sink,
                engine_hook=hook,
                shard=(spec.index, spec.count),
                shard_acks=_acks,
            )
        tg.cancel_scope.cancel()
    stats = engines[0].stats if engines else RunStats()
    if run_scope.cancelled_caught:
        stats.interrupted = True
    return stats


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the parent closed the pipe")
        data += chunk
    return data


def _read_spec() -> object:
    # Exactly the spec's bytes, unbuffered: what follows on stdin is the parent's acks.
    (size,) = _SPEC_HEADER.unpack(_read_exactly(0, _SPEC_HEADER.size))
    return pickle.loads(_read_exactly(0, size))


def _write_error(exc: BaseException) -> ResultsWriteError | None:
    if isinstance(exc, ResultsWriteError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _write_error(inner)) is not None:
                return found
    return None


def worker_main(early: list[int] | None = None) -> int:
    """A worker's whole life; ``early`` collects signals that came before its engine."""
    try:
        spec = _read_spec()
    except (EOFError, OSError, pickle.UnpicklingError, struct.error):
        spec = None
    if not isinstance(spec, WorkerSpec):
        print("dispatcher worker: not started by dispatcher send", file=sys.stderr)
        return 2
    _die_with_parent(spec.parent)
    try:
        stats = anyio.run(
            _worker,
            spec,
            [] if early is None else early,
            backend="asyncio",
            backend_options=runner.backend_options(),
        )
    except Exception as exc:
        # Its journal could not be created (a full, read-only or immutable folder): it
        # sent nothing. One line, and the exit code the parent reads as a write failure.
        refused = _write_error(exc)
        if refused is None:
            raise
        print(f"dispatcher send: worker {spec.index}: error: {refused}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    # The loop put back Python's default handlers as it closed: a stop that comes now
    # (the run is over, only its counters are left to hand over) must not end in a
    # KeyboardInterrupt traceback during the write or the interpreter's shutdown.
    ignore_stops()
    with contextlib.suppress(BrokenPipeError):  # the parent is gone: nobody to tell
        sys.stdout.buffer.write(_stats_line(stats))
        sys.stdout.buffer.flush()
    return 0


# --- the parent ----------------------------------------------------------------------


class _Workers:
    """The parent's view of its workers: their latest counters, and how to stop them."""

    def __init__(self, stats: RunStats) -> None:
        self.stats = stats
        self.procs: list[Process] = []
        self.latest: dict[int, dict[str, Any]] = {}
        self.stopping = False

    def signal_all(self, signum: signal.Signals) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signum)

    def stop(self, reason: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self.stats.stop_reason is None:
            self.stats.stop_reason = reason
        self.signal_all(signal.SIGINT)

    def update(self, index: int, counters: dict[str, Any]) -> None:
        self.latest[index] = counters
        stats = self.stats
        stats.attempts = sum(c["attempts"] for c in self.latest.values())
        stats.retries = sum(c["retries"] for c in self.latest.values())
        stats.rate_limited = sum(c["rate_limited"] for c in self.latest.values())
        stats.in_flight = sum(c["in_flight"] for c in self.latest.values())
        # Workers pause together on a 429 (each sees it): report the longest, not the sum.
        stats.pauses = max(c["pauses"] for c in self.latest.values())
        stats.paused_s = max(c["paused_s"] for c in self.latest.values())
        stats.disk_held_s = max(c.get("disk_held_s", 0.0) for c in self.latest.values())
        stats.skipped.clear()
        stats.answers.clear()
        for c in self.latest.values():
            stats.skipped.update(c["skipped"])
            stats.answers.update({int(k): v for k, v in c.get("answers", {}).items()})
        if counters["interrupted"] and not self.stopping:
            # Signalled directly, not by this process (whose own stop, say after another
            # worker's 401, reaches the workers as a SIGINT too, and keeps its reason).
            stats.interrupted = True
        if counters.get("unreachable") is not None and stats.unreachable is None:
            stats.unreachable = counters["unreachable"]
        reason = counters["stop_reason"]
        if reason is not None and not counters["interrupted"]:
            # A worker stopped on its own (credentials rejected): stop the others too.
            self.stop(reason)


class _Acks:
    """The parent's side of durability: which worker each envelope came from, in order.

    After each group commit, each worker is told how many of its envelopes are durable
    (it compacts its journal with that). Same interface as the journal, for GroupCommit.
    """

    __slots__ = ("_count", "_done", "_durable", "_order", "_sent", "_wakes")

    def __init__(self, count: int) -> None:
        self._count = count
        self._order: deque[int] = deque()
        self._durable = 0
        self._done = [0] * count  # durable envelopes per worker
        self._sent = [0] * count  # the count each worker was last told
        self._wakes = [anyio.Event() for _ in range(count)]

    @property
    def count(self) -> int:
        return self._count

    @property
    def given_total(self) -> int:
        return self._durable + len(self._order)

    def written(self, key: str) -> None:
        self._order.append(runner.shard_of(key, self._count))

    def sync(self) -> None:
        pass

    def durable(self, upto: int) -> None:
        order, done = self._order, self._done
        while self._durable < upto and order:
            done[order.popleft()] += 1
            self._durable += 1
        for wake in self._wakes:
            wake.set()

    def maybe_compact(self) -> None:
        pass

    async def tell(self, index: int, proc: Process) -> None:
        """Send worker ``index`` its durable count whenever it grows (until it ends)."""
        assert proc.stdin is not None
        try:
            while proc.returncode is None:
                await self._wakes[index].wait()
                self._wakes[index] = anyio.Event()
                done = self._done[index]
                if done != self._sent[index]:
                    self._sent[index] = done
                    await proc.stdin.send(b"%d\n" % done)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return


async def _pump(
    index: int,
    proc: Process,
    workers: _Workers,
    watch: FailureWatch,
    out: MemoryObjectSendStream[Envelope],
) -> None:
    assert proc.stdout is not None
    lines = BufferedByteReceiveStream(proc.stdout)
    async with out:
        while True:
            try:
                line = await lines.receive_until(b"\n", _MAX_LINE)
            except (anyio.IncompleteRead, anyio.EndOfStream):
                break
            if line.startswith(STATS_TAG):
                workers.update(index, orjson.loads(line)["__stats__"])
                continue
            env = envelope_from_json(orjson.loads(line))
            workers.stats.record(env)
            reason = watch.check(env)
            if reason is not None:
                workers.stop(reason)
            await out.send(env)
    await proc.wait()


async def _forward_signals(workers: _Workers) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for number in signals:
            signum = signal.Signals(number)
            workers.stats.interrupted = True
            if not workers.stopping:
                workers.stopping = True
                workers.stats.stop_reason = f"{signum.name}: stopped reading"
                print(
                    f"\ndispatcher: {signum.name}: finishing requests in flight "
                    "(again to stop at once)",
                    file=sys.stderr,
                    flush=True,
                )
            workers.signal_all(signum)


async def run_parallel(settings: SendSettings, *, show: Any = None) -> RunStats:
    """Run ``settings`` over ``settings.processes`` worker processes into one sink.

    ``show`` is started with the merged stats (the CLI's progress view). Holds the
    results' lock like a one-process run, and passes it on to the workers.
    """
    runner.check_inputs(settings)
    stats = RunStats()
    out, _, lock = await runner.open_results(settings, stats)
    try:
        return await _run_workers(settings, stats, out, lock, show)
    finally:
        if lock is not None and (warning := lock.release()) is not None:
            stats.warnings.append(warning)


async def _run_workers(
    settings: SendSettings, stats: RunStats, out: Sink, lock: ResultsLock | None, show: Any
) -> RunStats:
    child = worker_settings(settings)
    workers = _Workers(stats)
    watch = FailureWatch(runner.stop_rules_for(settings))
    acks = _Acks(settings.processes)

    def write_failed(exc: ResultsWriteError) -> None:
        if stats.write_error is None:
            stats.write_error = str(exc)
        workers.stop(str(exc))

    commit = runner.GroupCommit(out, acks, on_error=write_failed)
    send, receive = anyio.create_memory_object_stream[Envelope](1024)
    clean = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(runner.drain_to_sink, receive, out, commit=commit))
            helpers = anyio.CancelScope()
            tg.start_soon(_helpers, helpers, workers, show, acks)
            async with send:
                for index in range(settings.processes):
                    proc = await anyio.open_process(
                        [sys.executable, "-c", _BOOTSTRAP],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=None,
                        start_new_session=True,
                        # The lock stays held until the last worker is gone too.
                        pass_fds=() if lock is None else (lock.fileno(),),
                    )
                    workers.procs.append(proc)
                    assert proc.stdin is not None
                    spec = pickle.dumps(
                        WorkerSpec(child, index, settings.processes, parent=os.getpid())
                    )
                    # The pipe stays open: the durable counts follow, and its EOF tells
                    # the worker that this process is gone.
                    await proc.stdin.send(_SPEC_HEADER.pack(len(spec)) + spec)
                    tg.start_soon(_pump, index, proc, workers, watch, send.clone())
            await _wait_all(workers)
            helpers.cancel()
        # Every worker has ended and each envelope it wrote has been received.
        clean = all(proc.returncode == 0 for proc in workers.procs) and commit.error is None
        for index, proc in enumerate(workers.procs):
            if proc.returncode == EXIT_WRITE_FAILED and stats.write_error is None:
                stats.write_error = (
                    f"worker process {index} could not write its journal beside "
                    f"{settings.results} (its reason is above)"
                )
            if proc.returncode != 0 and stats.stop_reason is None:
                stats.stop_reason = (
                    f"worker process {index} failed (exit {proc.returncode}); "
                    "--resume sends what it left"
                )
    finally:
        with anyio.CancelScope(shield=True):
            workers.signal_all(signal.SIGKILL)
            await commit.commit()
            await runner.close_sink(out, commit)
            if commit.error is not None and stats.write_error is None:
                stats.write_error = str(commit.error)
            if clean:
                runner.remove_journals(settings.results, stats.warnings)
            stats.finished = time.monotonic()
    return stats


async def _wait_all(workers: _Workers) -> None:
    for proc in workers.procs:
        await proc.wait()


async def _helpers(scope: anyio.CancelScope, workers: _Workers, show: Any, acks: _Acks) -> None:
    with scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_forward_signals, workers)
            for index in range(acks.count):
                tg.start_soon(_tell_when_started, acks, index, workers)
            if show is not None:
                tg.start_soon(show, workers.stats)


async def _tell_when_started(acks: _Acks, index: int, workers: _Workers) -> None:
    while len(workers.procs) <= index:  # noqa: ASYNC110 (started a moment later)
        await anyio.sleep(0.01)
    await acks.tell(index, workers.procs[index])
