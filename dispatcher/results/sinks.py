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

from dispatcher.model import Envelope, UserError

# Write through to the file once this much is buffered, not only on the 1 s tick.
_WRITE_THRESHOLD: Final = 256 * 1024


class ResultsPathError(UserError):
    """The results path cannot be used as asked; the message names it and what to do."""


def check_results_path(
    path: str, *, resume: bool, overwrite: bool, can_resume: bool = True
) -> None:
    """Raise :class:`ResultsPathError` unless a run may write its results at ``path``.

    Checked before anything is sent, so that a mistake costs no request and leaves no
    empty file behind: the folder must exist and be writable, an existing file must be
    writable, and an existing non-empty file is touched only with ``resume`` or
    ``overwrite`` (the rule of the CLI and of :func:`dispatcher.run` alike).
    ``can_resume=False`` (``load``) leaves ``--resume`` out of the advice.
    """
    if path == "-":
        return
    where = f"--results {path}"
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ResultsPathError(f"{where}: is a folder; give a file path inside it")
    if not os.path.isdir(folder):
        raise ResultsPathError(f"{where}: the folder {folder} does not exist; create it first")
    if not os.path.exists(path):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ResultsPathError(f"{where}: cannot create a file in {folder}: permission denied")
        return
    if os.path.getsize(path) > 0 and not (resume or overwrite):
        options = "--resume to continue that run, --overwrite" if can_resume else "--overwrite"
        raise ResultsPathError(
            f"{where} already holds results; pass {options} to replace it, "
            "or choose another --results path"
        )
    if not os.access(path, os.W_OK):
        raise ResultsPathError(f"{where}: the file is read-only; cannot resume or overwrite it")


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
