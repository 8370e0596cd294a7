"""Stopping a run on SIGINT/SIGTERM: drain on the first signal, stop at once on the second."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator

import anyio

from dispatcher.sending.engine import Engine
from dispatcher.sending.stats import RunStats


@contextlib.contextmanager
def _then(callback: Callable[[], None] | None) -> Iterator[None]:
    try:
        yield
    finally:
        if callback is not None:
            callback()


def ignore_stops() -> None:
    """From now on SIGINT and SIGTERM are ignored (for a process whose run is over)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


async def _grace_then_stop(
    grace: float, hard_stop: anyio.CancelScope, stats: RunStats, name: str
) -> None:
    await anyio.sleep(grace)
    print(
        f"dispatcher: requests still in flight after --grace {grace:g}s: stopping now",
        file=sys.stderr,
        flush=True,
    )
    stats.stop_reason = (
        f"{name}: stopped reading; requests still in flight after --grace {grace:g}s "
        "were cut off (their delivery is unknown)"
    )
    hard_stop.cancel()


async def watch_signals(
    engine: Engine,
    hard_stop: anyio.CancelScope,
    grace: float,
    announce: bool = True,
    then: Callable[[], None] | None = None,
) -> None:
    """First SIGINT/SIGTERM: stop reading, drain for ``grace`` s; second: stop at once.

    ``then`` runs the moment the watch ends: asyncio has just put back Python's default
    handlers (a SIGINT would be a KeyboardInterrupt wherever the program then is).
    """
    seen = 0
    async with anyio.create_task_group() as tg:
        with _then(then), anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                engine.stats.interrupted = True
                seen += 1
                if seen == 1:
                    engine.stop(f"{name}: stopped reading, finished the requests in flight")
                    if announce:
                        print(
                            f"\ndispatcher: {name}: finishing requests in flight for up to "
                            f"{grace:g}s (again to stop at once)",
                            file=sys.stderr,
                            flush=True,
                        )
                    tg.start_soon(_grace_then_stop, grace, hard_stop, engine.stats, name)
                else:
                    if announce:
                        print(f"\ndispatcher: {name} again: stopping now", file=sys.stderr)
                    # The first signal's reason promised to finish what was in flight.
                    engine.stats.stop_reason = (
                        f"{name} twice: stopped at once; requests in flight were cut off "
                        "(their delivery is unknown)"
                    )
                    hard_stop.cancel()
                    tg.cancel_scope.cancel()
                    return
