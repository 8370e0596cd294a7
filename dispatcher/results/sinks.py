"""Results sinks: where envelopes go. JSONL file or stdout.

A sink buffers encoded lines; :meth:`flush` writes them out and fsyncs, in a worker
thread so the event loop keeps sending meanwhile. The runner's group commit calls it again
as soon as the previous flush ends, so an envelope is durable a few milliseconds after its
record finished: a crash loses only what arrived during the last flush.

A write or fsync that fails (full disk, read-only or removed directory, quota) raises
:class:`ResultsWriteError`, and the sink takes no more: what was durable stays so, and the
run stops (exit 5). A file left with a torn last line is repaired by ``--resume``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Protocol

import anyio
import orjson

from dispatcher.model import Envelope, UserError
from dispatcher.results.errors import EXIT_WRITE_FAILED, ResultsWriteError

__all__ = [
    "EXIT_WRITE_FAILED",
    "JsonlSink",
    "ResultsPathError",
    "ResultsWriteError",
    "Sink",
    "check_results_path",
    "encode",
    "open_sink",
]


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
    """One JSONL line for an envelope: the bytes orjson gives the dataclass itself.

    Spelt out as a dict, field by field in the dataclass's order: orjson encodes a dict in
    ~1.5 us and the same dataclass in ~2.3 us (its dataclass path looks each field up).
    ``tests/test_truth.py`` checks the bytes are the dataclass's, for every kind of
    envelope; a field added to :class:`Envelope` must be added here.
    """
    error = env.error
    return orjson.dumps(
        {
            "key": env.key,
            "source": env.source,
            "line": env.line,
            "workflow": env.workflow,
            "instance_id": env.instance_id,
            "event_type": env.event_type,
            "ok": env.ok,
            "status": env.status,
            "attempts": env.attempts,
            "delivery": env.delivery,
            "error": None
            if error is None
            else {"kind": error.kind, "code": error.code, "message": error.message},
            "started_at": env.started_at,
            "finished_at": env.finished_at,
            "latency_ms": env.latency_ms,
            "elapsed_ms": env.elapsed_ms,
            "waited_ms": env.waited_ms,
            "statuses": env.statuses,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


class Sink(Protocol):
    def write(self, env: Envelope) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


class JsonlSink:
    """Appends one JSON line per envelope to a file (``-`` for stdout)."""

    __slots__ = ("_buf", "_closed", "_failed", "_fd", "_lock", "_path")

    def __init__(self, path: str, *, truncate: bool = False) -> None:
        self._path = path
        self._buf = bytearray()
        self._closed = False
        self._failed: ResultsWriteError | None = None
        self._lock = anyio.Lock()
        if path == "-":
            self._fd = -1
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
            try:
                self._fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ResultsWriteError(path, exc) from exc

    def __repr__(self) -> str:
        return f"JsonlSink({self._path!r})"

    def write(self, env: Envelope) -> None:
        self._buf += encode(env)

    def write_raw(self, line: bytes) -> None:
        """A line that is not an envelope (a ``--processes`` worker's counters), now."""
        self._buf += line
        if self._fd < 0:
            self._to_stdout()

    def write_many(self, envs: Iterable[Envelope]) -> None:
        for env in envs:
            self.write(env)

    def _to_stdout(self) -> None:
        out = sys.stdout.buffer
        out.write(self._buf)
        self._buf.clear()
        out.flush()

    def _sync(self, data: bytearray) -> None:
        try:
            _write_all(self._fd, memoryview(data))
            os.fsync(self._fd)
        except OSError as exc:
            self._failed = ResultsWriteError(self._path, exc)
            raise self._failed from exc

    async def flush(self) -> None:
        """Write and fsync what was written before the call (raises ResultsWriteError)."""
        if self._failed is not None:
            raise self._failed
        if self._fd < 0:
            if self._buf:
                self._to_stdout()
            return
        async with self._lock:
            if not self._buf:
                return
            data, self._buf = self._buf, bytearray()
            # Write and fsync in a thread: a busy disk must not hold up the event loop.
            # Shielded: cancelled before the thread ran, these lines would be lost.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._sync, data)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                if self._failed is None:
                    await self.flush()
            finally:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1


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
