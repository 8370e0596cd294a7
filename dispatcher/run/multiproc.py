"""``--processes N``: one run spread over N worker processes.

Each worker reads the whole input (so every record gets the same key as in a one-process
run) and sends only its share: the records whose key hashes to its index. The rate budget
is divided evenly. Workers write their envelopes as JSON lines to a pipe; the parent
merges them into the one results sink, flushes it, draws the progress and the summary,
and applies ``--max-failures`` / ``--max-error-rate`` to the merged stream.

Crash safety: each worker journals the records it starts in ``<results>.inflight.<i>``
(its envelopes reach the disk only through the parent, so it cannot compact it); the
parent removes the journals once every worker has ended and all is written. After a
crash, ``--resume`` reads them all.

Worker processes run in their own session, so a Ctrl-C at the terminal reaches only the
parent, which passes it on: the first drains, the second stops at once.

More processes help only when one process keeps a core busy (parsing, TLS, HTTP) and
other cores are free: at the real API's 4 requests/s one process idles.
"""

from __future__ import annotations

import dataclasses
import pickle
import signal
import subprocess
import sys
import time
from typing import Any, Final

import anyio
import orjson
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from dispatcher.model import Envelope
from dispatcher.results.ledger import envelope_from_json
from dispatcher.results.sinks import JsonlSink
from dispatcher.run import runner
from dispatcher.run.settings import Rate, SendSettings
from dispatcher.run.signals import watch_signals
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
                "in_flight": stats.in_flight,
                "skipped": dict(stats.skipped),
                "stop_reason": stats.stop_reason,
                "interrupted": stats.interrupted,
            }
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


async def _report(stats: RunStats, sink: JsonlSink) -> None:
    while True:
        await anyio.sleep(STATS_INTERVAL)
        sink.write_raw(_stats_line(stats))


async def _worker(spec: WorkerSpec) -> RunStats:
    sink = JsonlSink("-")
    engines: list[Engine] = []
    run_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        def hook(engine: Engine) -> None:
            engines.append(engine)
            tg.start_soon(watch_signals, engine, run_scope, spec.settings.grace, False)
            tg.start_soon(_report, engine.stats, sink)

        with run_scope:
            await runner.run(
                spec.settings, sink=sink, engine_hook=hook, shard=(spec.index, spec.count)
            )
        tg.cancel_scope.cancel()
    stats = engines[0].stats if engines else RunStats()
    if run_scope.cancelled_caught:
        stats.interrupted = True
    return stats


def worker_main() -> int:
    spec = pickle.load(sys.stdin.buffer)
    if not isinstance(spec, WorkerSpec):
        print("dispatcher worker: not started by dispatcher send", file=sys.stderr)
        return 2
    stats = anyio.run(_worker, spec, backend="asyncio", backend_options=runner.backend_options())
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
        stats.skipped.clear()
        for c in self.latest.values():
            stats.skipped.update(c["skipped"])
        if counters["interrupted"]:
            stats.interrupted = True
        reason = counters["stop_reason"]
        if reason is not None and not counters["interrupted"]:
            # A worker stopped on its own (credentials rejected): stop the others too.
            self.stop(reason)


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

    ``show`` is started with the merged stats (the CLI's progress view).
    """
    runner.check_inputs(settings)
    stats = RunStats()
    out, _ = runner.prepare_results(settings, stats)
    if stats.crashed_unknown:
        await out.flush()
    child = worker_settings(settings)
    workers = _Workers(stats)
    watch = FailureWatch(runner.stop_rules_for(settings))
    send, receive = anyio.create_memory_object_stream[Envelope](1024)
    clean = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.drain_to_sink, receive, out, None)
            helpers = anyio.CancelScope()
            tg.start_soon(_helpers, helpers, workers, show)
            async with send:
                for index in range(settings.processes):
                    proc = await anyio.open_process(
                        [sys.executable, "-m", "dispatcher.run.worker"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=None,
                        start_new_session=True,
                    )
                    workers.procs.append(proc)
                    assert proc.stdin is not None
                    await proc.stdin.send(
                        pickle.dumps(WorkerSpec(child, index, settings.processes))
                    )
                    await proc.stdin.aclose()
                    tg.start_soon(_pump, index, proc, workers, watch, send.clone())
            await _wait_all(workers)
            helpers.cancel()
        # Every worker has ended and each envelope it wrote has been received.
        clean = all(proc.returncode == 0 for proc in workers.procs)
        for index, proc in enumerate(workers.procs):
            if proc.returncode != 0 and stats.stop_reason is None:
                stats.stop_reason = (
                    f"worker process {index} failed (exit {proc.returncode}); "
                    "--resume sends what it left"
                )
    finally:
        with anyio.CancelScope(shield=True):
            workers.signal_all(signal.SIGKILL)
            await out.aclose()
            if clean:
                runner.remove_journals(settings.results)
            stats.finished = time.monotonic()
    return stats


async def _wait_all(workers: _Workers) -> None:
    for proc in workers.procs:
        await proc.wait()


async def _helpers(scope: anyio.CancelScope, workers: _Workers, show: Any) -> None:
    with scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_forward_signals, workers)
            if show is not None:
                tg.start_soon(show, workers.stats)
