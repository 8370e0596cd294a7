"""The write-ahead's group commit: many callers, one flush in flight, none lost."""

from __future__ import annotations

import anyio
import anyio.lowlevel

from dispatcher.coordination.coalesce import Coalescer, FlushCancelled


async def test_callers_arriving_during_a_flush_share_the_next_one() -> None:
    flushed: list[list[int]] = []
    release = anyio.Event()

    async def flush(items: list[int]) -> None:
        flushed.append(list(items))
        if len(flushed) == 1:
            await release.wait()

    c: Coalescer[int] = Coalescer(flush)
    done: list[int] = []

    async def add(i: int) -> None:
        await c.add(i)
        done.append(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(add, 0)
        await anyio.wait_all_tasks_blocked()
        for i in range(1, 50):
            tg.start_soon(add, i)
        await anyio.wait_all_tasks_blocked()
        assert done == []  # nobody returns before a flush holding its item succeeded
        release.set()
    assert flushed == [[0], list(range(1, 50))]
    assert sorted(done) == list(range(50))
    assert c.flushes == 2


async def test_a_failed_flush_fails_every_caller_it_held_and_the_next_one_goes_on() -> None:
    release = anyio.Event()
    batches: list[list[str]] = []

    async def flush(items: list[str]) -> None:
        batches.append(list(items))
        if len(batches) == 1:
            await release.wait()
        elif len(batches) == 2:
            raise ConnectionError("redis went away")

    c: Coalescer[str] = Coalescer(flush)
    errors: list[str] = []

    async def add(item: str) -> None:
        try:
            await c.add(item)
        except ConnectionError as exc:
            errors.append(f"{item}: {exc}")

    async with anyio.create_task_group() as tg:
        for item in ("a", "b", "c"):
            tg.start_soon(add, item)
            await anyio.wait_all_tasks_blocked()
        release.set()
    assert batches == [["a"], ["b", "c"]]
    assert sorted(errors) == ["b: redis went away", "c: redis went away"]
    await c.add("d")  # a new flush: works
    assert batches[-1] == ["d"]


async def test_a_cancelled_flush_tells_the_others_it_may_not_have_got_through() -> None:
    release = anyio.Event()

    async def flush(items: list[int]) -> None:
        if items == [0]:
            await release.wait()
        else:
            await anyio.sleep_forever()  # the flush of [1, 2]: cut off by its flusher's stop

    c: Coalescer[int] = Coalescer(flush)
    outcome: list[str] = []

    async def second() -> None:
        try:
            await c.add(2)
        except FlushCancelled:
            outcome.append("2: not known whether it got through")

    async with anyio.create_task_group() as tg:
        tg.start_soon(c.add, 0)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as first:
            async with anyio.create_task_group() as inner:
                # 1, then 2, gather behind the flush of [0]; 1, waiting longest, flushes
                # them once [0] is done, and is stopped (cancelled) during that flush.
                inner.start_soon(c.add, 1)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(second)
                await anyio.wait_all_tasks_blocked()
                release.set()
                await anyio.wait_all_tasks_blocked()
                first.cancel()
    assert outcome == ["2: not known whether it got through"]
