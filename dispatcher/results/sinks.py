"""Results sinks: where envelopes go. JSONL file or stdout.

A sink buffers encoded lines and writes them in batches; :meth:`flush` pushes them to the
OS and fsyncs, which the runner does at least once a second and at shutdown, so a crash
loses at most the last second of envelopes (their records are then re-sent on resume).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import BinaryIO, Final, Protocol

import anyio
import orjson

from dispatcher.model import Envelope

# Write through to the file once this much is buffered, not only on the 1 s tick.
_WRITE_THRESHOLD: Final = 256 * 1024


def encode(env: Envelope) -> bytes:
    """One JSONL line for an envelope (orjson handles dataclasses, enums, datetimes)."""
    return orjson.dumps(env, option=orjson.OPT_APPEND_NEWLINE)


class Sink(Protocol):
    def write(self, env: Envelope) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


class JsonlSink:
    """Appends one JSON line per envelope to a file (``-`` for stdout)."""

    __slots__ = ("_buf", "_closed", "_file", "_fsync", "_path")

    def __init__(self, path: str, *, truncate: bool = False) -> None:
        self._path = path
        self._buf = bytearray()
        self._closed = False
        self._file: BinaryIO
        if path == "-":
            self._file = sys.stdout.buffer
            self._fsync = False
        else:
            self._file = open(path, "wb" if truncate else "ab")  # noqa: SIM115 (closed in aclose)
            self._fsync = True

    def __repr__(self) -> str:
        return f"JsonlSink({self._path!r})"

    def write(self, env: Envelope) -> None:
        self._buf += encode(env)
        if len(self._buf) >= _WRITE_THRESHOLD:
            self._write_through()

    def write_raw(self, line: bytes) -> None:
        """A line that is not an envelope (a ``--processes`` worker's counters)."""
        self._buf += line
        self._write_through()

    def write_many(self, envs: Iterable[Envelope]) -> None:
        for env in envs:
            self.write(env)

    def _write_through(self) -> None:
        if self._buf:
            self._file.write(self._buf)
            self._buf.clear()

    def _sync(self) -> None:
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    async def flush(self) -> None:
        self._write_through()
        # fsync can take a while on a busy disk: keep the event loop free meanwhile.
        await anyio.to_thread.run_sync(self._sync)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.flush()
        if self._path != "-":
            self._file.close()


def open_sink(path: str, *, truncate: bool = False) -> Sink:
    """Choose the sink from the path: SQLite for ``.sqlite``/``.sqlite3``/``.db``
    (case-insensitive), else JSONL (``-`` is stdout).

    ``truncate`` empties earlier results: the JSONL file, or the SQLite ``envelopes`` table.
    """
    # Imported here so JSONL and stdout runs never load sqlite3.
    from dispatcher.results.sqlite_sink import SqliteSink, is_sqlite_path

    if path != "-" and is_sqlite_path(path):
        return SqliteSink(path, truncate=truncate)
    return JsonlSink(path, truncate=truncate)
