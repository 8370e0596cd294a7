"""Group commit for many callers: one flush in flight at a time, the next one gathering.

A job's write-ahead (each record announced to Redis before its first request leaves) would
cost a round trip per record if every worker called Redis alone. Instead, each worker
adds its key and waits; the first to find no flush in flight flushes every key gathered
so far, and whoever arrives meanwhile waits for the next flush. At any rate the cost is
one round trip per flush, and a record waits at most two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["Coalescer", "FlushCancelled"]

_T = TypeVar("_T")


class FlushCancelled(Exception):
    """The flush that held an item was cancelled: whether it got through is not known."""


class _Batch(Generic[_T]):
    __slots__ = ("done", "error", "items")

    def __init__(self) -> None:
        self.items: list[_T] = []
        self.done = anyio.Event()
        self.error: Exception | None = None


class Coalescer(Generic[_T]):
    """``await add(item)`` returns once a flush that held ``item`` succeeded, and raises
    what that flush raised (:class:`FlushCancelled` if it was cancelled)."""

    __slots__ = ("_busy", "_flush", "_open", "flushes")

    def __init__(self, flush: Callable[[list[_T]], Awaitable[None]]) -> None:
        self._flush = flush
        self._open: _Batch[_T] = _Batch()
        self._busy: _Batch[_T] | None = None
        self.flushes = 0

    async def add(self, item: _T) -> None:
        batch = self._open
        batch.items.append(item)
        while not batch.done.is_set():
            busy = self._busy
            if busy is None:
                await self._run(batch)
            else:
                await busy.done.wait()
        if batch.error is not None:
            raise batch.error

    async def _run(self, batch: _Batch[_T]) -> None:
        self._busy = batch
        self._open = _Batch()
        self.flushes += 1
        try:
            await self._flush(batch.items)
        except Exception as exc:
            batch.error = exc
        except BaseException:
            batch.error = FlushCancelled()
            raise
        finally:
            self._busy = None
            batch.done.set()
