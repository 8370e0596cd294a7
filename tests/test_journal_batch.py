"""The crash journal with many records starting at once: the lines of one loop turn's
records go to the OS in one write, and still no request leaves before its line.

Against a raw server on 127.0.0.1 that answers in bursts (every 5 ms, all the requests
waiting), so the run's workers wake together and start their next records in one turn, as
they do against a fast server. On every request the server reads the journal file: the
record's line must be there already.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from crashkit import FillingDisk, final_by_instance, journals, write_input
from hostile_server import JSON, SUCCESS_BODY, answer, read_request

from dispatcher.results import journal as journal_module
from dispatcher.results.journal import read_crashed
from dispatcher.run import runner
from dispatcher.run.settings import Credentials, SendSettings

OK = answer("200 OK", [JSON], SUCCESS_BODY)


class BurstServer:
    """Answers success to every request, all the waiting ones together every 5 ms."""

    def __init__(self, journal: Path) -> None:
        self.journal = journal
        self.arrived: Counter[str] = Counter()
        self.before_its_line: list[str] = []  # requests whose journal line was not there
        self._waiting: list[asyncio.Future[None]] = []

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            waiting, self._waiting = self._waiting, []
            for future in waiting:
                future.set_result(None)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                request = await read_request(reader)
                path = request.split(b" ", 2)[1].decode()
                instance = path.split("/instances/")[1].split("/")[0]
                self.arrived[instance] += 1
                said = self.journal.read_bytes() if self.journal.exists() else b""
                if f'"instance_id":"{instance}"'.encode() not in said:
                    self.before_its_line.append(instance)
                future: asyncio.Future[None] = loop.create_future()
                self._waiting.append(future)
                await future
                writer.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def burst_server(journal: Path) -> AsyncIterator[tuple[BurstServer, str]]:
    burst = BurstServer(journal)
    server = await asyncio.start_server(burst.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ticker = asyncio.create_task(burst.tick())
    try:
        async with server:
            yield burst, f"http://127.0.0.1:{port}/client/v4"
            server.close()
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


def settings(base_url: str, src: Path, out: Path, **kw: object) -> SendSettings:
    fields: dict[str, Any] = {"rate": "unlimited", "concurrency": 16, **kw}
    return SendSettings(
        inputs=(str(src),),
        workflow="wf",
        account_id="acc",
        base_url=base_url,
        credentials=Credentials(token="tok-journal-batch-77"),
        results=str(out),
        progress="off",
        quiet=True,
        **fields,
    )


def count_journal_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Journal lines per write, header and compactions included."""
    per_write: list[int] = []
    real = journal_module._write_all

    def counted(fd: int, data: bytes) -> None:
        per_write.append(data.count(b"\n"))
        real(fd, data)

    monkeypatch.setattr(journal_module, "_write_all", counted)
    return per_write


async def test_many_records_at_once_share_a_journal_write_and_none_leaves_before_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"b{k}" for k in range(400)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    per_write = count_journal_writes(monkeypatch)
    async with burst_server(Path(str(out) + ".inflight")) as (server, base_url):
        stats = await runner.run(settings(base_url, src, out))
    assert stats.write_error is None
    assert server.before_its_line == []
    assert server.arrived == dict.fromkeys(ids, 1)
    final = final_by_instance(out)
    assert sorted(final) == sorted(ids)
    assert {e["delivery"] for e in final.values()} == {"confirmed"}
    assert not journals(tmp_path, "out.jsonl")  # every envelope durable: journal removed
    # One line per record (plus the header), and records that started in the same turn
    # shared a write: far fewer writes than records.
    assert sum(per_write) == len(ids) + 1
    assert max(per_write) > 1
    assert len(per_write) < len(ids) / 2


async def test_a_short_write_of_several_lines_sends_none_of_them_and_resume_sends_each_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [f"s{k}" for k in range(300)]
    src = write_input(tmp_path / "in.jsonl", ids)
    out = tmp_path / "out.jsonl"
    journal = Path(str(out) + ".inflight")

    def mid_batch(lines: int, records: list[bytes]) -> int | None:
        # The first write of 3 or more records' lines after the first 40 lines gets one
        # whole line and half the next down; the rest fails.
        if lines < 40 or len(records) < 3:
            return None
        return len(records[0]) + len(records[1]) // 2

    disk = FillingDisk(mid_batch)
    torn = disk.torn

    async with burst_server(journal) as (server, base_url):
        monkeypatch.setattr(os, "write", disk)
        stats = await runner.run(settings(base_url, src, out))
        monkeypatch.setattr(os, "write", disk.real)
        assert torn, "no write held 3 records' lines"
        assert stats.write_error is not None
        assert "No space left on device" in stats.write_error
        # Not even the record whose line was written whole: the write was cut back.
        assert not set(torn) & set(server.arrived)
        assert stats.attempts == sum(server.arrived.values())
        crashed = read_crashed(str(journal))
        assert crashed is not None
        assert crashed.torn_keys == []
        assert crashed.unidentified == 0
        assert not {r.instance_id for r in crashed.records} & set(torn)
        assert server.before_its_line == []
        await runner.run(settings(base_url, src, out, resume=True))
    assert server.before_its_line == []
    assert server.arrived == dict.fromkeys(ids, 1)
    final = final_by_instance(out)
    assert sorted(final) == sorted(ids)
    assert {e["delivery"] for e in final.values()} == {"confirmed"}
