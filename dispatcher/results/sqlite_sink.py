"""SQLite results: one row per record key, upserted, readable while a run goes on.

The file holds two tables::

    meta(name TEXT PRIMARY KEY, value TEXT)    -- schema_version, created_at, created_by
    envelopes(key TEXT PRIMARY KEY, ...)       -- one row per record key, every envelope field

A resumed run writing to the same file replaces a key's row with its newer envelope
(``INSERT ... ON CONFLICT(key) DO UPDATE``), so the table always holds each record's
latest fate and needs no "last line wins" pass to read.

Durability: the database is in WAL mode, and each :meth:`SqliteSink.flush` commits every
envelope buffered since the last one in a single transaction. ``synchronous=FULL`` makes
that commit fsync the WAL, so a flushed envelope survives a power loss too, which is what
:class:`~dispatcher.results.sinks.JsonlSink` promises with its fsync per flush. ``NORMAL`` would
only fsync at checkpoints: safe against a crash of the process, but a power loss could
roll back every commit since the last checkpoint (up to ~1000 pages, thousands of
envelopes) and resume would re-send, i.e. duplicate, those events. The runner flushes
about once a second, so FULL costs one fsync a second: nothing next to the HTTP work.

WAL also lets other connections (the ``sqlite3`` shell, a report) read a consistent
snapshot while the run writes; readers never block the writer.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Final
from urllib.request import pathname2url

import anyio
import orjson

from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind
from dispatcher.results.errors import ResultsWriteError

__all__ = [
    "SCHEMA_VERSION",
    "SQLITE_SUFFIXES",
    "SqliteSink",
    "SqliteSinkError",
    "envelope_from_row",
    "is_sqlite_path",
    "iter_envelopes",
    "open_results",
]

SCHEMA_VERSION: Final = 1
SQLITE_SUFFIXES: Final = (".sqlite", ".sqlite3", ".db")

# Envelope fields in Envelope order, the error flattened into three columns.
_ENVELOPE_COLUMNS: Final = (
    "key",
    "source",
    "line",
    "workflow",
    "instance_id",
    "event_type",
    "ok",
    "status",
    "attempts",
    "delivery",
    "error_kind",
    "error_code",
    "error_message",
    "started_at",
    "finished_at",
    "latency_ms",
    "elapsed_ms",
)
_ALL_COLUMNS: Final = (*_ENVELOPE_COLUMNS, "run_id", "updated_at")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS envelopes (
    key           TEXT PRIMARY KEY NOT NULL,
    source        TEXT NOT NULL,
    line          INTEGER NOT NULL,
    workflow      TEXT,
    instance_id   TEXT,
    event_type    TEXT,
    ok            INTEGER NOT NULL,
    status        INTEGER,
    attempts      INTEGER NOT NULL,
    delivery      TEXT NOT NULL,
    error_kind    TEXT,
    error_code    INTEGER,
    error_message TEXT,
    started_at    TEXT,
    finished_at   TEXT NOT NULL,
    latency_ms    REAL,
    elapsed_ms    REAL NOT NULL,
    run_id        TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
"""

_UPSERT: Final = (
    f"INSERT INTO envelopes ({', '.join(_ALL_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_ALL_COLUMNS))}) "
    "ON CONFLICT(key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _ALL_COLUMNS if c != "key")
)

_SELECT: Final = f"SELECT {', '.join(_ENVELOPE_COLUMNS)} FROM envelopes ORDER BY rowid"

# A writer waits this long for another connection's write lock (a second process writing
# the same file, or a checkpoint) instead of failing at once with "database is locked".
_BUSY_TIMEOUT_MS: Final = 10_000

_Row = tuple[
    str,
    str,
    int,
    str | None,
    str | None,
    str | None,
    int,
    int | None,
    int,
    str,
    str | None,
    int | None,
    str | None,
    str | None,
    str,
    float | None,
    float,
]


class SqliteSinkError(Exception):
    """The file cannot hold dispatcher results: not SQLite, or another schema."""


def is_sqlite_path(path: str) -> bool:
    """Whether results at ``path`` are SQLite (by extension, case-insensitively)."""
    return path.lower().endswith(SQLITE_SUFFIXES)


def _iso(dt: datetime) -> str:
    # orjson's RFC 3339 text, byte for byte what JSONL results hold (isoformat() gives the
    # same text but takes about three times as long, and this runs twice per envelope).
    return orjson.dumps(dt)[1:-1].decode()


def _row(env: Envelope, run_id: str, updated_at: str) -> tuple[object, ...]:
    err = env.error
    return (
        env.key,
        env.source,
        env.line,
        env.workflow,
        env.instance_id,
        env.event_type,
        1 if env.ok else 0,
        env.status,
        env.attempts,
        env.delivery.value,
        None if err is None else err.kind.value,
        None if err is None else err.code,
        None if err is None else err.message,
        None if env.started_at is None else _iso(env.started_at),
        _iso(env.finished_at),
        env.latency_ms,
        env.elapsed_ms,
        run_id,
        updated_at,
    )


def envelope_from_row(row: _Row) -> Envelope:
    """Rebuild an :class:`Envelope` from an ``envelopes`` row (columns in schema order).

    Raises ``ValueError`` for a value that no envelope can hold (an unknown delivery...).
    """
    (
        key,
        source,
        line,
        workflow,
        instance_id,
        event_type,
        ok,
        status,
        attempts,
        delivery,
        error_kind,
        error_code,
        error_message,
        started_at,
        finished_at,
        latency_ms,
        elapsed_ms,
    ) = row
    error = None
    if error_kind is not None:
        error = EnvelopeError(
            kind=ErrorKind(error_kind), code=error_code, message=error_message or ""
        )
    return Envelope(
        key=key,
        source=source,
        line=line,
        workflow=workflow,
        instance_id=instance_id,
        event_type=event_type,
        ok=bool(ok),
        status=status,
        attempts=attempts,
        delivery=Delivery(delivery),
        error=error,
        started_at=None if started_at is None else datetime.fromisoformat(started_at),
        finished_at=datetime.fromisoformat(finished_at),
        latency_ms=latency_ms,
        elapsed_ms=elapsed_ms,
    )


def _new_run_id() -> str:
    # Sortable by start time, and unique enough to tell apart runs started the same second.
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _check_schema(conn: sqlite3.Connection, path: str) -> bool:
    """Refuse a database that is not ours (or not ours at this version), before using it.

    Returns False for a database with no tables at all (a new or 0-byte file): no results
    yet, and the sink may create them.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    if not tables:
        return False
    if "meta" not in tables or "envelopes" not in tables:
        raise SqliteSinkError(
            f"{path} is an SQLite database but not dispatcher results "
            f"(tables: {', '.join(sorted(tables))})"
        )
    found = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    if found is None or found[0] != str(SCHEMA_VERSION):
        version = "none" if found is None else found[0]
        raise SqliteSinkError(
            f"{path} holds dispatcher results of schema version {version}; "
            f"this version reads and writes {SCHEMA_VERSION}"
        )
    return True


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; flush issues BEGIN/COMMIT itself so
    # one flush is exactly one transaction. check_same_thread=False because flushes run in
    # anyio's worker threads, one at a time (see SqliteSink._thread_lock).
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise SqliteSinkError(f"cannot open {path} as SQLite results: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        # The first statement that reads the file: "file is not a database" shows here.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        conn.close()
        raise SqliteSinkError(f"cannot open {path} as SQLite results: {exc}") from exc
    if str(mode).lower() != "wal":
        conn.close()
        raise SqliteSinkError(f"{path}: cannot switch to WAL journal mode (got {mode!r})")
    return conn


class SqliteSink:
    """Upserts one row per envelope into an SQLite file's ``envelopes`` table.

    :meth:`write` only buffers; :meth:`flush` commits the buffer as one transaction in a
    worker thread. The file is created (or checked) when the sink is made, so a path that
    cannot hold results fails before anything is sent. ``truncate`` deletes earlier rows.
    """

    __slots__ = (
        "_buf",
        "_closed",
        "_conn",
        "_flush_lock",
        "_path",
        "_thread_lock",
        "run_id",
    )

    def __init__(self, path: str, *, truncate: bool = False, run_id: str | None = None) -> None:
        self._path = path
        self.run_id = run_id if run_id is not None else _new_run_id()
        self._buf: list[Envelope] = []
        self._closed = False
        # _flush_lock keeps flushes in order (a later batch must not commit first, or an
        # older envelope of a key would win); _thread_lock guards the connection itself.
        self._flush_lock = anyio.Lock()
        self._thread_lock = threading.Lock()
        self._conn = _connect(path)
        try:
            self._setup(truncate)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise SqliteSinkError(f"{path}: cannot set up results tables: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteSink({self._path!r})"

    def _setup(self, truncate: bool) -> None:
        conn = self._conn
        # IMMEDIATE takes the write lock now, so two runs creating the file at once cannot
        # both see it empty and race on the schema.
        conn.execute("BEGIN IMMEDIATE")
        try:
            _check_schema(conn, self._path)
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            now = datetime.now(UTC).isoformat()
            conn.executemany(
                "INSERT OR IGNORE INTO meta (name, value) VALUES (?, ?)",
                [
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created_at", now),
                    ("created_by", "dispatcher"),
                ],
            )
            if truncate:
                conn.execute("DELETE FROM envelopes")
            conn.execute("COMMIT")
        except BaseException:
            # Some errors (a full disk...) have already rolled back: a second ROLLBACK
            # would fail and hide the first error.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @property
    def pending(self) -> int:
        """Envelopes written but not yet committed."""
        return len(self._buf)

    def write(self, env: Envelope) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._buf.append(env)

    def write_many(self, envs: Iterable[Envelope]) -> None:
        for env in envs:
            self.write(env)

    def _commit(self, batch: list[Envelope]) -> None:
        with self._thread_lock:
            conn = self._conn
            run_id = self.run_id
            updated_at = datetime.now(UTC).isoformat()
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Rows are built here, in the worker thread, lazily: no second list.
                conn.executemany(_UPSERT, (_row(env, run_id, updated_at) for env in batch))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def flush(self) -> None:
        """Commit what was written before the call; a commit the disk refuses raises
        :class:`~dispatcher.results.sinks.ResultsWriteError` and keeps the batch."""
        async with self._flush_lock:
            if not self._buf:
                return
            batch, self._buf = self._buf, []
            try:
                # Not abandon_on_cancel: a cancelled flush still waits for its commit to end,
                # so the connection is never used by two threads and a batch is never half
                # written (SQLite commits all of it or none).
                await anyio.to_thread.run_sync(self._commit, batch)
            except BaseException as exc:
                # Nothing of the batch was committed: keep it, ahead of anything written
                # since, so a later flush (aclose's at the latest) retries in order.
                self._buf[:0] = batch
                if isinstance(exc, (sqlite3.OperationalError, OSError)):
                    # A full disk, a read-only file or folder: SQLite has rolled back all
                    # of the batch, so a later flush may try again.
                    raise ResultsWriteError(self._path, exc) from exc
                raise

    def _close(self) -> None:
        with self._thread_lock:
            # The last connection to close checkpoints the WAL into the main file and
            # removes it, which can take a moment on a large run: hence a worker thread.
            self._conn.close()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self.flush()
            finally:
                await anyio.to_thread.run_sync(self._close)


def _connect_read_only(path: str) -> sqlite3.Connection:
    # mode=ro: a reader must neither create a missing file nor change the database.
    uri = "file:" + pathname2url(os.path.abspath(path)) + "?mode=ro"
    return sqlite3.connect(uri, uri=True)


def open_results(path: str) -> sqlite3.Connection | None:
    """A read-only connection to a results database, its schema checked.

    ``None`` when the database holds no tables yet (no results). Raises
    ``FileNotFoundError`` for a missing file (a reader never creates one) and
    :class:`SqliteSinkError` for a file that is not dispatcher results of this version.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        conn = _connect_read_only(path)
    except sqlite3.Error as exc:
        raise SqliteSinkError(f"cannot open {path} as SQLite results: {exc}") from exc
    try:
        if _check_schema(conn, path):
            return conn
    except sqlite3.Error as exc:
        conn.close()
        raise SqliteSinkError(f"cannot read {path} as SQLite results: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    conn.close()
    return None


def iter_envelopes(path: str) -> Iterator[Envelope]:
    """Every envelope in an SQLite results file, one per key, in first-written order.

    One SELECT reads one consistent snapshot, even while a run is writing the file.
    Raises ``FileNotFoundError`` for a missing file and :class:`SqliteSinkError` for a
    file that is not dispatcher results.
    """
    conn = open_results(path)
    if conn is None:
        return
    try:
        try:
            cursor = conn.execute(_SELECT)
            while rows := cursor.fetchmany(1000):
                for row in rows:
                    yield envelope_from_row(row)
        except sqlite3.DatabaseError as exc:
            raise SqliteSinkError(f"{path}: cannot read results: {exc}") from exc
        except ValueError as exc:
            raise SqliteSinkError(f"{path}: a row holds a value no envelope has: {exc}") from exc
    finally:
        conn.close()
