"""The in-flight journal: which records may have been sent when a run died.

Envelopes are written after a record's last attempt and flushed once a second, so a crash
(kill -9, power loss) can leave records whose request left but whose envelope never made
it to disk. Without knowing them, a resumed run would send them again unannounced.

So, next to the results, ``<results>.inflight`` holds a header (when the run started) and
the key of every record just before its first request leaves, written straight to the OS
(it survives the process). After each results flush the journal is rewritten with only
the records whose envelope is not yet on disk, so it stays small. A run that ends (even
by Ctrl-C) deletes it: every record it started then has its envelope. A journal found at
start means the last run crashed: its records not confirmed in the results get an
envelope saying delivery ``unknown``, since their request may have arrived.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import orjson

from dispatcher.model import Event

SUFFIX: Final = ".inflight"


def path_for(results: str) -> str | None:
    """The journal beside a results file; none when results go to stdout."""
    return None if results == "-" else results + SUFFIX


class Journal:
    """Appends records with one ``write`` each, so they reach the OS before a request leaves.

    ``pending`` holds the records marked whose envelope the sink has not yet been given;
    after a results flush, :meth:`compact` keeps only those.
    """

    __slots__ = ("_fd", "_path", "_pending", "_started")

    def __init__(self, path: str) -> None:
        self._path = path
        self._started = datetime.now(UTC)
        self._pending: dict[str, bytes] = {}
        self._fd = self._open(path, [])

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _header(self) -> bytes:
        return orjson.dumps({"run_started": self._started}, option=orjson.OPT_APPEND_NEWLINE)

    def _open(self, path: str, lines: Iterable[bytes]) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        os.write(fd, self._header() + b"".join(lines))
        return fd

    def mark(self, event: Event) -> None:
        line = _line(event)
        self._pending[event.key] = line
        os.write(self._fd, line)

    def written(self, key: str) -> None:
        """The sink has been given this record's envelope."""
        self._pending.pop(key, None)

    def compact(self) -> None:
        """Rewrite with only the pending records; call right after a results flush."""
        tmp = self._path + ".tmp"
        fd = self._open(tmp, self._pending.values())
        os.replace(tmp, self._path)
        os.close(self._fd)
        self._fd = fd

    def close(self, *, delete: bool = True) -> None:
        """End of run: delete the journal if every record marked has its envelope.

        ``delete=False`` keeps it whatever: a ``--processes`` worker's envelopes are
        written by its parent, which removes the journal once they are on disk.
        """
        os.close(self._fd)
        if delete and not self._pending:
            os.unlink(self._path)


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """A record a crashed run had started: enough to write its envelope."""

    key: str
    source: str
    line: int
    workflow: str
    instance_id: str
    event_type: str


def _line(event: Event) -> bytes:
    # Held until the envelope is written: an exact-size copy, not orjson's 4 KiB buffer.
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


def read_crashed(path: str) -> tuple[datetime, Iterator[Started]] | None:
    """The start time and records of a crashed run's journal, or None if there is none."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the generator)
    except FileNotFoundError:
        return None
    first = f.readline()
    try:
        started = datetime.fromisoformat(orjson.loads(first)["run_started"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        # A journal torn before its header was written: the run died before sending.
        f.close()
        return None

    def records() -> Iterator[Started]:
        with f:
            for raw in f:
                try:
                    yield Started(**orjson.loads(raw))
                except (orjson.JSONDecodeError, TypeError):
                    continue  # a torn last line: that record's request had not left yet

    return started, records()
