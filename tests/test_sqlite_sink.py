"""The SQLite results sink: what a user reading the file, during or after a run, sees."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from factories import make_envelope
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind
from dispatcher.results.sinks import JsonlSink, open_sink
from dispatcher.results.sqlite_sink import (
    SCHEMA_VERSION,
    SqliteSink,
    SqliteSinkError,
    is_sqlite_path,
    iter_envelopes,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def env(key: str, **kw: Any) -> Envelope:
    return make_envelope(key, T0, **kw)


def failed(key: str, kind: ErrorKind = ErrorKind.HTTP, **kw: Any) -> Envelope:
    args: dict[str, Any] = {
        "ok": False,
        "status": 500,
        "attempts": 5,
        "delivery": Delivery.REJECTED,
        "error": EnvelopeError(kind=kind, code=10001, message="internal error"),
    }
    args.update(kw)
    return env(key, **args)


VARIED = [
    env("a"),
    failed("b"),
    # Invalid input: no path fields, never started, no latency, no code.
    env(
        "raw-0123456789abcdef0123",
        workflow=None,
        instance_id=None,
        event_type=None,
        ok=False,
        status=None,
        attempts=0,
        delivery=Delivery.NOT_SENT,
        error=EnvelopeError(kind=ErrorKind.INVALID, code=None, message="line 3: bad JSON"),
        started_at=None,
        latency_ms=None,
        elapsed_ms=0.0,
    ),
    failed(
        "c",
        ErrorKind.TIMEOUT,
        status=None,
        delivery=Delivery.UNKNOWN,
        error=EnvelopeError(kind=ErrorKind.TIMEOUT, code=None, message="no answer in 30 s"),
    ),
    # Non-UTC offset, whole seconds, unicode and quotes in text.
    env(
        "d#1",
        source='données "q" 日本.jsonl',
        started_at=datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        finished_at=datetime(2026, 3, 1, 14, 0, 1, tzinfo=timezone(timedelta(hours=2))),
    ),
    *(failed(f"k{i}", kind) for i, kind in enumerate(ErrorKind)),
]


def read_rows(path: Path, sql: str = "SELECT key FROM envelopes ORDER BY key") -> list[Any]:
    """A second, independent connection, as the sqlite3 shell would open."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    sink = SqliteSink(str(path))
    for e in VARIED:
        sink.write(e)
    await sink.aclose()
    assert list(iter_envelopes(str(path))) == VARIED


async def test_columns_hold_plain_values_for_sql_queries(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    sink = SqliteSink(str(path), run_id="run-1")
    sink.write(failed("b"))
    await sink.aclose()
    rows = read_rows(
        path,
        "SELECT ok, status, delivery, error_kind, error_code, error_message, started_at,"
        " latency_ms, run_id FROM envelopes",
    )
    assert rows == [
        (0, 500, "rejected", "http", 10001, "internal error", T0.isoformat(), 12.5, "run-1")
    ]
    assert read_rows(path, "SELECT value FROM meta WHERE name = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]


async def test_a_resumed_run_replaces_the_row_of_a_key(tmp_path: Path) -> None:
    path = str(tmp_path / "results.db")
    first = SqliteSink(path)
    first.write(failed("a", line=7))
    first.write(env("b"))
    await first.aclose()

    second = SqliteSink(path)
    second.write(env("a", line=7, attempts=2))
    await second.aclose()

    by_key = {e.key: e for e in iter_envelopes(path)}
    assert by_key == {"a": env("a", line=7, attempts=2), "b": env("b")}
    runs = dict(read_rows(Path(path), "SELECT key, run_id FROM envelopes"))
    assert runs["a"] == second.run_id != runs["b"] == first.run_id


async def test_within_one_batch_the_later_envelope_of_a_key_wins(tmp_path: Path) -> None:
    path = str(tmp_path / "results.sqlite")
    sink = SqliteSink(path)
    sink.write(failed("a"))
    sink.write(env("a", attempts=3))
    await sink.aclose()
    assert list(iter_envelopes(path)) == [env("a", attempts=3)]


async def test_readable_by_another_connection_while_the_sink_is_open(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    sink = SqliteSink(str(path))
    try:
        sink.write(env("a"))
        sink.write(env("b"))
        await sink.flush()
        assert read_rows(path) == [("a",), ("b",)]
        assert read_rows(path, "PRAGMA journal_mode") == [("wal",)]

        sink.write(env("c"))  # buffered, not yet committed: invisible to readers
        assert read_rows(path) == [("a",), ("b",)]
        assert [e.key for e in iter_envelopes(str(path))] == ["a", "b"]

        # A reader holding a snapshot open does not block the writer (WAL).
        reader = sqlite3.connect(path)
        try:
            reader.execute("BEGIN")
            assert reader.execute("SELECT count(*) FROM envelopes").fetchone() == (2,)
            with anyio.fail_after(5):
                await sink.flush()
            assert reader.execute("SELECT count(*) FROM envelopes").fetchone() == (2,)
            reader.execute("COMMIT")
            assert reader.execute("SELECT count(*) FROM envelopes").fetchone() == (3,)
        finally:
            reader.close()
    finally:
        await sink.aclose()


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="no sqlite3 shell installed")
async def test_the_sqlite3_shell_reads_a_run_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    sink = SqliteSink(str(path))
    try:
        sink.write_many([env("a"), failed("b"), failed("c")])
        await sink.flush()
        with anyio.fail_after(10):
            done = await anyio.run_process(
                ["sqlite3", str(path), "SELECT delivery, count(*) FROM envelopes GROUP BY 1;"]
            )
        assert done.stdout.decode().split() == ["confirmed|1", "rejected|2"]
    finally:
        await sink.aclose()


async def test_one_transaction_per_flush_not_per_envelope(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    sink = SqliteSink(str(path))
    statements: list[str] = []
    sink._conn.set_trace_callback(statements.append)
    try:
        sink.write_many(env(f"k{i}") for i in range(500))
        assert sink.pending == 500
        await sink.flush()
        assert sink.pending == 0
        await sink.flush()  # nothing buffered: no transaction at all
        sink.write_many(env(f"k{i}") for i in range(500, 600))
        await sink.flush()
    finally:
        await sink.aclose()
    assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ] * 2
    assert read_rows(path, "SELECT count(*) FROM envelopes") == [(600,)]


async def test_a_failed_flush_commits_nothing_and_keeps_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    sink = SqliteSink(str(path))
    try:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON envelopes WHEN NEW.key = 'bad'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
        sink.write_many([env("a"), env("bad"), env("c")])
        with pytest.raises(sqlite3.IntegrityError, match="refused"):
            await sink.flush()
        assert read_rows(path) == []  # all of the batch or none of it
        assert sink.pending == 3
        other.execute("DROP TRIGGER refuse")
        other.close()
        sink.write(env("d"))
        await sink.flush()
    finally:
        await sink.aclose()
    assert [e.key for e in iter_envelopes(str(path))] == ["a", "bad", "c", "d"]


async def test_aclose_flushes_even_when_cancelled(tmp_path: Path) -> None:
    path = str(tmp_path / "results.sqlite")
    sink = SqliteSink(path)
    sink.write(env("a"))
    with anyio.CancelScope() as scope:
        scope.cancel()
        await sink.aclose()
    await sink.aclose()  # idempotent
    assert [e.key for e in iter_envelopes(path)] == ["a"]
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(env("b"))


async def test_truncate_empties_earlier_results(tmp_path: Path) -> None:
    path = str(tmp_path / "results.sqlite")
    sink = SqliteSink(path)
    sink.write(env("old"))
    await sink.aclose()
    sink = SqliteSink(path, truncate=True)
    sink.write(env("new"))
    await sink.aclose()
    assert [e.key for e in iter_envelopes(path)] == ["new"]


def test_refuses_a_file_that_is_not_results(tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(SqliteSinkError, match=r"notes\.db"):
        SqliteSink(str(text))
    assert text.read_text().startswith("these are my notes")

    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(SqliteSinkError, match="not dispatcher results"):
        SqliteSink(str(other))


async def test_refuses_another_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    await SqliteSink(str(path)).aclose()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SqliteSinkError, match="schema version 99"):
        SqliteSink(str(path))
    with pytest.raises(SqliteSinkError, match="schema version 99"):
        list(iter_envelopes(str(path)))


def test_iter_envelopes_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(iter_envelopes(str(tmp_path / "nope.sqlite")))
    assert not (tmp_path / "nope.sqlite").exists()  # a reader never creates the file


@pytest.mark.parametrize(
    ("name", "sqlite"),
    [
        ("r.sqlite", True),
        ("r.sqlite3", True),
        ("r.db", True),
        ("R.DB", True),
        ("r.jsonl", False),
        ("r.ndjson", False),
        ("db", False),
        ("r.db.jsonl", False),
    ],
)
async def test_open_sink_chooses_by_extension(tmp_path: Path, name: str, sqlite: bool) -> None:
    assert is_sqlite_path(name) is sqlite
    sink = open_sink(str(tmp_path / name))
    try:
        assert isinstance(sink, SqliteSink if sqlite else JsonlSink)
    finally:
        await sink.aclose()


async def test_open_sink_passes_truncate_to_sqlite(tmp_path: Path) -> None:
    path = str(tmp_path / "r.sqlite3")
    sink = open_sink(path)
    sink.write(env("old"))
    await sink.aclose()
    sink = open_sink(path, truncate=True)
    await sink.aclose()
    assert list(iter_envelopes(path)) == []


def test_open_sink_keeps_stdout_jsonl() -> None:
    sink = open_sink("-")
    assert isinstance(sink, JsonlSink)


# Keys from a small alphabet so that batches repeat keys, within and across flushes.
_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_text = st.text(max_size=20)
_envelopes = st.builds(
    Envelope,
    key=st.sampled_from(["a", "b", "c", "raw-00", "x#1"]),
    source=_text,
    line=st.integers(min_value=0, max_value=2**40),
    workflow=st.none() | _text,
    instance_id=st.none() | _text,
    event_type=st.none() | _text,
    ok=st.booleans(),
    status=st.none() | st.integers(min_value=100, max_value=599),
    attempts=st.integers(min_value=0, max_value=100),
    delivery=st.sampled_from(Delivery),
    error=st.none()
    | st.builds(
        EnvelopeError,
        kind=st.sampled_from(ErrorKind),
        code=st.none() | st.integers(min_value=0, max_value=2**31),
        message=_text,
    ),
    started_at=st.none() | _times,
    finished_at=_times,
    latency_ms=st.none() | st.floats(min_value=0, max_value=1e9),
    elapsed_ms=st.floats(min_value=0, max_value=1e9),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(_envelopes, max_size=6), max_size=4))
def test_the_table_holds_the_last_envelope_of_each_key(batches: list[list[Envelope]]) -> None:
    expected: dict[str, Envelope] = {}
    for batch in batches:
        for e in batch:
            expected[e.key] = e  # a re-inserted key keeps its first position (upsert)

    async def write(path: str) -> None:
        sink = SqliteSink(path)
        for batch in batches:
            sink.write_many(batch)
            await sink.flush()
        await sink.aclose()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "r.sqlite")
        asyncio.run(write(path))
        assert list(iter_envelopes(path)) == list(expected.values())
