"""Results written before ``waited_ms`` and ``statuses`` existed still load, resume and report."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import orjson
from factories import make_envelope

from dispatcher.results.ledger import load_ledger, read_envelopes
from dispatcher.results.sqlite_sink import SqliteSink

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def test_an_old_jsonl_line_reads_with_the_new_fields_empty(tmp_path: Path) -> None:
    new = make_envelope("k1", T0, waited_ms=12.5, statuses={"503": 1, "200": 1}, attempts=2)
    old = orjson.loads(orjson.dumps(make_envelope("k0", T0)))
    del old["waited_ms"], old["statuses"]
    path = tmp_path / "r.jsonl"
    path.write_bytes(orjson.dumps(old) + b"\n" + orjson.dumps(new) + b"\n")
    envs = {e.key: e for e in read_envelopes(str(path))}
    assert (envs["k0"].waited_ms, envs["k0"].statuses) == (0.0, {})
    assert envs["k1"] == new
    assert set(load_ledger(str(path))) == {"k0", "k1"}


async def test_an_old_sqlite_file_reads_and_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    sink = SqliteSink(str(path))
    sink.write(make_envelope("k0", T0))
    await sink.aclose()
    with sqlite3.connect(path) as conn:  # as the first schema-1 files were made
        conn.execute("ALTER TABLE envelopes DROP COLUMN statuses")
        conn.execute("ALTER TABLE envelopes DROP COLUMN waited_ms")
    (env,) = read_envelopes(str(path))
    assert (env.key, env.waited_ms, env.statuses) == ("k0", 0.0, {})
    sink = SqliteSink(str(path))  # a resumed run opens it for writing
    new = make_envelope("k1", T0, waited_ms=3.0, statuses={"timeout": 1, "200": 1}, attempts=2)
    sink.write(new)
    await sink.aclose()
    envs = {e.key: e for e in read_envelopes(str(path))}
    assert envs["k1"] == new
    assert envs["k0"].statuses == {}
