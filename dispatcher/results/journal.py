"""The in-flight journal: which records may have been sent when a run died.

Envelopes are written after a record's last attempt and made durable by the group commit
a few milliseconds later, so a crash (kill -9, power loss) can leave records whose request
left but whose envelope never made it to disk. Without knowing them, a resumed run would
send them again unannounced.

So, next to the results, ``<results>.inflight`` holds a header (when the run started) and
one line per record, written straight to the OS before its first request leaves (with
the fast client and ``--rate unlimited``, :meth:`Journal.hold`: the lines of the records
that start in one loop turn in one write, just before their requests are written). A
write that fails or comes up short stops its records before their requests leave
(:class:`~dispatcher.results.errors.ResultsWriteError`), and the journal takes no more
lines: a run never sends what it could not journal.

Reading a crashed run's journal (:func:`read_crashed`), an entry counts only for a record
that has no envelope written by that run: the results are searched for the entries' keys
and an envelope finished after the journal's ``run_started`` settles its record, whatever
it says (so a 404 stays ``rejected``). A torn or unreadable line counts as "may have been
sent": its key is recovered when the line got that far (keys come first), else it is
counted as unidentified.

The journal is compacted as envelopes become durable (every :data:`COMPACT_EVERY` lines
written), so it stays small however long the run. A run that ends with every envelope
durable deletes it. ``--processes`` workers keep one each (``<results>.inflight.<i>``);
their envelopes become durable in the parent, which tells each worker how many of its
envelopes are on disk (:meth:`Journal.durable`).

Durability: a line reaches the OS (the page cache) before the request leaves, which a
kill -9 cannot undo. It reaches the disk with the results' group commit (:meth:`sync`,
a few ms later), not with an fsync per record: see "Durability" in docs/results.md.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import anyio
import orjson

from dispatcher.model import Event
from dispatcher.results.errors import ResultsWriteError, cleanup_warning
from dispatcher.results.ledger import finished_times

SUFFIX: Final = ".inflight"
# Envelopes a run may have finished but not yet made durable, beyond its --concurrency
# (at least; a run with more workers may lag by as many as it has): what bounds a kill -9's
# ``unknown`` whatever the disk's speed. See :attr:`Journal.limit`.
BACKLOG: Final = 24
# Compact after this many lines: ~600 KiB of journal, a few hundred µs of rewrite.
COMPACT_EVERY: Final = 4096
_KEY_PREFIX: Final = re.compile(rb'^\{"key":("(?:[^"\\]|\\.)*")')


def path_for(results: str) -> str | None:
    """The journal beside a results file; none when results go to stdout."""
    return None if results == "-" else results + SUFFIX


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` or raise; the caller cuts off whatever part got written.

    A short write is followed by one more for the rest, as POSIX intends: on a full disk
    that one fails with the reason (``ENOSPC``), which the user then reads.
    """
    written = os.write(fd, data)
    if written == len(data):
        return
    more = os.write(fd, data[written:]) if written > 0 else 0
    if written + more != len(data):
        raise OSError(0, f"short write to the journal: {written + more} of {len(data)} bytes")


class Journal:
    """Appends one line per record before its request leaves (one ``write`` each, or one
    per loop turn once :meth:`hold` is called).

    The records whose envelope is not yet durable are kept in memory (a dict, small: the
    records in flight plus those awaiting the next commit), in the order the sink was
    given their envelopes, so :meth:`compact` can rewrite the file with only them.
    """

    __slots__ = (
        "_appended",
        "_batch",
        "_broken",
        "_durable",
        "_entries",
        "_fd",
        "_freed",
        "_given",
        "_path",
        "_results",
        "_size",
        "_started",
        "limit",
    )

    def __init__(self, path: str, *, results: str | None = None, limit: int | None = None) -> None:
        self._path = path
        # The most records journaled and not yet durable that the engine lets it hold
        # (None: no bound): a record's first request waits while it is reached, so a
        # slow disk slows the run rather than widening what a kill -9 leaves unknown.
        self.limit = limit
        self._freed: anyio.Event | None = None
        self._results = results if results is not None else path
        self._started = datetime.now(UTC)
        self._entries: dict[str, bytes] = {}
        self._given: deque[str] = deque()
        self._durable = 0  # how many envelopes given so far are durable
        self._appended = 0
        self._broken: OSError | None = None
        self._size = 0
        # hold(): lines marked and not yet written, their keys; None: each written at once.
        self._batch: list[tuple[str, bytes]] | None = None
        try:
            self._fd = self._open(path, ())
        except OSError as exc:
            raise ResultsWriteError(self._results, exc) from exc

    @property
    def path(self) -> str:
        return self._path

    def in_flight(self) -> list[str]:
        """The keys of the records journaled whose envelope is not durable yet (with those
        whose line :meth:`hold` has queued)."""
        keys = list(self._entries)
        if self._batch:
            keys += [key for key, _ in self._batch]
        return keys

    @property
    def pending(self) -> int:
        """Records journaled (or queued) whose envelope is not durable yet."""
        return len(self._entries) + (len(self._batch) if self._batch else 0)

    async def freed(self) -> None:
        """Wait until some record's envelope becomes durable (:meth:`durable`)."""
        if self._freed is None:
            self._freed = anyio.Event()
        await self._freed.wait()

    @property
    def given_total(self) -> int:
        """Envelopes handed to the sink so far (the count :meth:`durable` takes)."""
        return self._durable + len(self._given)

    def _header(self) -> bytes:
        return orjson.dumps({"run_started": self._started}, option=orjson.OPT_APPEND_NEWLINE)

    def _open(self, path: str, lines: tuple[bytes, ...] | list[bytes]) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        data = self._header() + b"".join(lines)
        try:
            _write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
        self._size = len(data)
        return fd

    def hold(self) -> None:
        """From now on :meth:`mark` only queues its line, and :meth:`flush` writes them.

        For a transport that calls :meth:`flush` before it writes any request (the fast
        client's :meth:`~dispatcher.clients.fast.FastTransport.hold_writes`): the lines of
        one loop turn's requests reach the OS in one ``write``, still before any of them
        leaves.
        """
        if self._batch is None:
            self._batch = []

    def mark(self, event: Event) -> None:
        """Journal a record before its first request; raises if that cannot be done.

        After one failure every later call fails too, without writing: a line appended
        after a torn one would fuse with it. Held (:meth:`hold`), the line is queued for
        the next :meth:`flush`, which must come before the record's request is written.
        """
        if self._broken is not None:
            raise ResultsWriteError(self._results, self._broken)
        line = _line(event)
        batch = self._batch
        if batch is not None:
            batch.append((event.key, line))
            return
        self._write(line)
        self._entries[event.key] = line
        self._appended += 1

    def flush(self) -> None:
        """Write the lines :meth:`mark` queued, in one ``write``; raises if that fails.

        On a failure none of them counts as written (a short write is cut off again), and
        their records' requests must not leave.
        """
        batch = self._batch
        if not batch:
            return
        self._batch = []
        if self._broken is not None:
            raise ResultsWriteError(self._results, self._broken)
        self._write(b"".join(line for _, line in batch))
        entries = self._entries
        for key, line in batch:
            entries[key] = line
        self._appended += len(batch)

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self._broken = exc
            # Cut off what a short write left, so no torn line says "may have been sent"
            # of a record that never was; if that fails too, the torn line stays: safe.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise ResultsWriteError(self._results, exc) from exc
        self._size += len(data)

    def written(self, key: str) -> None:
        """The sink has been given this record's envelope (not durable yet)."""
        self._given.append(key)

    def durable(self, upto: int) -> None:
        """The first ``upto`` envelopes given to the sink are durable: forget them."""
        given, entries = self._given, self._entries
        while self._durable < upto and given:
            entries.pop(given.popleft(), None)
            self._durable += 1
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    def sync(self) -> None:
        """fsync the journal (from the group commit's thread, between compactions)."""
        if self._fd >= 0:
            os.fsync(self._fd)

    def maybe_compact(self) -> None:
        if self._appended >= COMPACT_EVERY:
            self.compact()

    def compact(self) -> None:
        """Rewrite with only the records whose envelope is not durable.

        Runs on the event loop between two marks (no line can be lost to a race); the file
        is small. A failure (full disk) keeps the old journal, a superset: still true.
        """
        if self._broken is not None or self._fd < 0:
            return
        tmp = self._path + ".tmp"
        size = self._size
        try:
            fd = self._open(tmp, list(self._entries.values()))
            try:
                os.fsync(fd)
                os.replace(tmp, self._path)
            except BaseException:
                os.close(fd)
                raise
        except OSError:
            self._size = size
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        os.close(self._fd)
        self._fd = fd
        self._appended = 0

    def close(self, *, delete: bool = True) -> str | None:
        """End of run: delete the journal if every record marked has a durable envelope.

        ``delete=False`` keeps it whatever (the run could not make its envelopes durable).
        Returns a warning when the removal failed (an immutable or read-only folder): the
        run's envelopes are durable all the same, so that is no failure of the run.
        """
        if self._fd < 0:
            return None
        fd, self._fd = self._fd, -1
        with contextlib.suppress(OSError):  # written and fsynced already: nothing to lose
            os.close(fd)
        if delete and not self._entries and self._broken is None:
            return remove_settled(self._path)
        return None


def remove_settled(path: str) -> str | None:
    """Remove a journal whose every record has a durable envelope; a warning if it stays."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        # An immutable folder refuses the unlink but not a write to a file in it: emptied,
        # the journal names no record (read_crashed skips a journal without a header).
        try:
            os.truncate(path, 0)
        except OSError:
            consequence = (
                "it is harmless: every record it names has a durable envelope, which a "
                "--resume finds first (remove the file once the folder is writable)"
            )
        else:
            consequence = "it is emptied instead, which is as good (remove it when you can)"
        return cleanup_warning(path, exc, consequence)
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """A record a crashed run had started: enough to write its envelope."""

    key: str
    source: str
    line: int
    workflow: str | None
    instance_id: str | None
    event_type: str | None


@dataclass(slots=True)
class Crashed:
    """What a crashed run's journal says: when it started, and whom it may have sent."""

    started: datetime
    records: list[Started] = field(default_factory=list)
    torn_keys: list[str] = field(default_factory=list)  # torn lines whose key survived
    unidentified: int = 0  # torn lines whose key did not

    def entries(self, journal: str) -> list[Started]:
        """Every record it names; one on a torn line is known by its key alone."""
        torn = [
            Started(key=k, source=journal, line=0, workflow=None, instance_id=None, event_type=None)
            for k in self.torn_keys
        ]
        return [*self.records, *torn]


def _line(event: Event) -> bytes:
    # Held until the envelope is durable: an exact-size copy, not orjson's 4 KiB buffer.
    # "key" first, so a torn line still names its record when it got that far.
    line = orjson.dumps(
        {
            "key": event.key,
            "source": event.source,
            "line": event.line,
            "workflow": event.workflow,
            "instance_id": event.instance_id,
            "event_type": event.event_type,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )
    return bytes(memoryview(line))


def _torn_key(raw: bytes) -> str | None:
    found = _KEY_PREFIX.match(raw)
    if found is None:
        return None
    try:
        key = orjson.loads(found.group(1))
    except orjson.JSONDecodeError:
        return None
    return key if isinstance(key, str) else None


def _parse(raw: bytes) -> Started | None:
    if not raw.endswith(b"\n"):
        return None  # cut off: even a line that parses may have lost a field's end
    try:
        obj = orjson.loads(raw)
        return Started(**obj)
    except (orjson.JSONDecodeError, TypeError):
        return None


def read_crashed(path: str) -> Crashed | None:
    """What a crashed run's journal holds, or None if there is none.

    A journal torn inside its header names no record: its run died before sending.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return None
    with f:
        first = f.readline()
        try:
            started = datetime.fromisoformat(orjson.loads(first)["run_started"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        crashed = Crashed(started=started)
        for raw in f:
            entry = _parse(raw)
            if entry is not None:
                crashed.records.append(entry)
                continue
            if not raw.strip():
                continue
            key = _torn_key(raw)
            if key is None:
                crashed.unidentified += 1
            else:
                crashed.torn_keys.append(key)
    return crashed


def crashed_unsettled(journal: str, results: str) -> tuple[Crashed, list[Started]] | None:
    """What the crashed run of ``journal`` started and did not settle itself: its entries
    without an envelope in ``results`` finished after that run started (an envelope it
    wrote is its word on the record). ``None`` if no run crashed there."""
    crashed = read_crashed(journal)
    if crashed is None:
        return None
    entries = crashed.entries(journal)
    times = finished_times(results, {e.key for e in entries})
    started = crashed.started
    return crashed, [e for e in entries if (f := times.get(e.key)) is None or f < started]


def iter_paths(results: str) -> Iterator[str]:
    """The journal of a one-process run and those of ``--processes`` workers, if any."""
    path = path_for(results)
    if path is None:
        return
    yield path
    yield from sorted(glob.glob(glob.escape(path) + ".*[0-9]"))
