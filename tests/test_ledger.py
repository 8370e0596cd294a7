"""The ledger: each key's final fate read back from JSONL or SQLite results."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from factories import make_envelope
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind
from dispatcher.results.ledger import (
    KeyState,
    LedgerError,
    TornTail,
    TornTailWarning,
    load_ledger,
    read_envelopes,
    repair_jsonl_tail,
)
from dispatcher.results.sinks import JsonlSink, encode
from dispatcher.results.sqlite_sink import SqliteSink

T0 = datetime(2026, 3, 1, 12, 0, 0, 500, tzinfo=UTC)
CONFIRMED = KeyState(delivery=Delivery.CONFIRMED, ok=True, error_kind=None)


def env(key: str, **kw: Any) -> Envelope:
    return make_envelope(key, T0, **kw)


def failed(key: str, kind: ErrorKind = ErrorKind.HTTP, **kw: Any) -> Envelope:
    delivery = {
        ErrorKind.HTTP: Delivery.REJECTED,
        ErrorKind.TIMEOUT: Delivery.UNKNOWN,
        ErrorKind.CONNECTION: Delivery.UNKNOWN,
    }.get(kind, Delivery.NOT_SENT)
    args: dict[str, Any] = {
        "ok": False,
        "status": 500 if kind is ErrorKind.HTTP else None,
        "attempts": 5,
        "delivery": delivery,
        "error": EnvelopeError(kind=kind, code=None, message=f"{kind} failure"),
    }
    args.update(kw)
    return env(key, **args)


def write_jsonl(path: Path, envs: Iterable[Envelope], tail: bytes = b"") -> Path:
    path.write_bytes(b"".join(encode(e) for e in envs) + tail)
    return path


async def write_both(tmp: Path, batches: list[list[Envelope]]) -> tuple[str, str]:
    """The same envelopes, flushed in the same batches, through both sinks."""
    jsonl, db = str(tmp / "r.jsonl"), str(tmp / "r.sqlite")
    for sink in (JsonlSink(jsonl), SqliteSink(db)):
        for batch in batches:
            for e in batch:
                sink.write(e)
            await sink.flush()
        await sink.aclose()
    return jsonl, db


def test_the_last_line_of_a_key_wins(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [failed("a", ErrorKind.TIMEOUT), env("b"), env("a", attempts=2), failed("c")],
    )
    assert load_ledger(str(path)) == {
        "a": CONFIRMED,
        "b": CONFIRMED,
        "c": KeyState(delivery=Delivery.REJECTED, ok=False, error_kind=ErrorKind.HTTP),
    }
    assert list(read_envelopes(str(path))) == [env("b"), env("a", attempts=2), failed("c")]


def test_key_states_are_shared_between_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [env(f"k{i}") for i in range(50)] + [failed("f")])
    ledger = load_ledger(str(path))
    states = {id(s) for s in ledger.values()}
    assert len(states) == 2


def test_a_missing_file_is_an_empty_ledger(tmp_path: Path) -> None:
    for name in ("r.jsonl", "r.sqlite", "r.db"):
        assert load_ledger(str(tmp_path / name)) == {}
        assert list(read_envelopes(str(tmp_path / name))) == []
        assert not (tmp_path / name).exists()


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n" + encode(env("a")) + b"\n  \n" + encode(env("b")))
    assert set(load_ledger(str(path))) == {"a", "b"}


def test_a_torn_last_line_is_skipped_and_reported(tmp_path: Path) -> None:
    torn = encode(env("c"))[:40]
    path = write_jsonl(tmp_path / "r.jsonl", [env("a"), failed("b")], tail=torn)
    seen: list[TornTail] = []
    ledger = load_ledger(str(path), on_torn=seen.append)
    assert set(ledger) == {"a", "b"}
    assert seen == [TornTail(path=str(path), line=3, size=40)]

    with pytest.warns(TornTailWarning, match=r"r\.jsonl:3: skipped a partial last line"):
        assert set(load_ledger(str(path))) == {"a", "b"}
    with pytest.warns(TornTailWarning):
        assert [e.key for e in read_envelopes(str(path))] == ["a", "b"]


def test_a_complete_last_line_without_newline_counts(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(encode(env("a")) + encode(env("b")).rstrip(b"\n"))
    assert set(load_ledger(str(path))) == {"a", "b"}
    assert [e.key for e in read_envelopes(str(path))] == ["a", "b"]


def test_repair_cuts_a_torn_tail_so_appending_continues_cleanly(tmp_path: Path) -> None:
    whole = encode(env("a")) + encode(failed("b"))
    path = tmp_path / "r.jsonl"
    path.write_bytes(whole + encode(env("c"))[:55])

    assert repair_jsonl_tail(str(path)) is True
    assert path.read_bytes() == whole
    assert repair_jsonl_tail(str(path)) is False  # nothing left to cut

    with path.open("ab") as f:
        f.write(encode(env("c")) + encode(env("b")))
    assert load_ledger(str(path)) == {"a": CONFIRMED, "b": CONFIRMED, "c": CONFIRMED}


def test_without_repair_an_append_fuses_with_the_torn_line(tmp_path: Path) -> None:
    # Why resume must repair before appending: the torn line becomes a corrupt middle line.
    path = write_jsonl(tmp_path / "r.jsonl", [env("a")], tail=encode(env("c"))[:55])
    with path.open("ab") as f:
        f.write(encode(env("d")))
    with pytest.raises(LedgerError) as info:
        load_ledger(str(path))
    assert info.value.line == 2


def test_repair_terminates_a_complete_last_line_without_cutting(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    whole = encode(env("a")) + encode(env("b"))
    path.write_bytes(whole.rstrip(b"\n"))
    assert repair_jsonl_tail(str(path)) is False
    assert path.read_bytes() == whole


def test_repair_of_a_torn_only_line_empties_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(encode(env("a"))[:10])
    assert repair_jsonl_tail(str(path)) is True
    assert path.read_bytes() == b""


def test_repair_leaves_clean_empty_and_missing_files_alone(tmp_path: Path) -> None:
    clean = write_jsonl(tmp_path / "clean.jsonl", [env("a")])
    before = clean.read_bytes()
    assert repair_jsonl_tail(str(clean)) is False
    assert clean.read_bytes() == before
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert repair_jsonl_tail(str(tmp_path / "empty.jsonl")) is False
    assert repair_jsonl_tail(str(tmp_path / "missing.jsonl")) is False
    assert not (tmp_path / "missing.jsonl").exists()


def test_repair_finds_the_last_newline_far_back(tmp_path: Path) -> None:
    # A torn line longer than one read-back chunk (64 KiB).
    whole = encode(env("a"))
    path = tmp_path / "r.jsonl"
    path.write_bytes(whole + b'{"key": "' + b"x" * 200_000)
    assert repair_jsonl_tail(str(path)) is True
    assert path.read_bytes() == whole


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (b"{not json\n", "not JSON"),
        (b"[1, 2]\n", "not an envelope"),
        (b'{"hello": "world"}\n', "no 'key' field"),
        (b'{"key": "x", "delivery": "lost", "ok": false, "error": null}\n', "lost"),
        (b'{"key": "x", "delivery": "confirmed", "ok": 1, "error": null}\n', "ok must be"),
        (b'{"key": 7, "delivery": "confirmed", "ok": true, "error": null}\n', "key must be"),
    ],
)
def test_a_bad_middle_line_is_an_error_naming_the_line(
    tmp_path: Path, bad: bytes, why: str
) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(encode(env("a")) + bad + encode(env("b")))
    with pytest.raises(LedgerError, match=rf"r\.jsonl:2: .*{why}") as info:
        load_ledger(str(path))
    assert info.value.line == 2
    assert info.value.path == str(path)
    with pytest.raises(LedgerError, match=r"r\.jsonl:2: "):
        list(read_envelopes(str(path)))


def test_a_bad_last_line_that_ends_with_a_newline_is_not_torn(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [env("a")], tail=b'{"key": "b", "sou\n')
    with pytest.raises(LedgerError, match=r"r\.jsonl:2: not JSON"):
        load_ledger(str(path))


def test_read_envelopes_names_the_line_of_a_malformed_envelope(tmp_path: Path) -> None:
    line = orjson.loads(encode(env("b")))
    line["finished_at"] = "yesterday"
    path = tmp_path / "r.jsonl"
    path.write_bytes(encode(env("a")) + orjson.dumps(line) + b"\n")
    assert set(load_ledger(str(path))) == {"a", "b"}  # the ledger needs less than reports
    with pytest.raises(LedgerError, match=r"r\.jsonl:2: .*yesterday"):
        list(read_envelopes(str(path)))


async def test_an_sqlite_file_named_jsonl_says_so(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    sink = SqliteSink(str(db))
    sink.write(env("a"))
    await sink.aclose()
    wrong = tmp_path / "r.jsonl"
    db.rename(wrong)
    with pytest.raises(LedgerError, match="is an SQLite database"):
        load_ledger(str(wrong))
    with pytest.raises(LedgerError, match="is an SQLite database"):
        repair_jsonl_tail(str(wrong))


def test_a_jsonl_file_named_sqlite_says_so(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.db", [env("a")] * 200)
    with pytest.raises(LedgerError, match=r"r\.db"):
        load_ledger(str(path))
    with pytest.raises(LedgerError, match=r"r\.db"):
        list(read_envelopes(str(path)))


async def test_sqlite_ledger_equals_jsonl_ledger(tmp_path: Path) -> None:
    batches = [
        [env("a"), failed("b"), failed("c", ErrorKind.TIMEOUT), failed("d", ErrorKind.INVALID)],
        [env("b", attempts=2), failed("e", ErrorKind.STOPPED)],
        [env("e"), failed("a", ErrorKind.RATE_LIMITED), failed("b", ErrorKind.CONNECTION)],
    ]
    jsonl, db = await write_both(tmp_path, batches)
    assert load_ledger(db) == load_ledger(jsonl)
    assert load_ledger(db)["b"] == KeyState(
        delivery=Delivery.UNKNOWN, ok=False, error_kind=ErrorKind.CONNECTION
    )
    by_key_jsonl = {e.key: e for e in read_envelopes(jsonl)}
    by_key_db = {e.key: e for e in read_envelopes(db)}
    assert by_key_db == by_key_jsonl
    assert len(by_key_db) == 5


def test_read_envelopes_rebuilds_envelopes_with_datetimes(tmp_path: Path) -> None:
    e = failed("x", ErrorKind.TIMEOUT, started_at=None, latency_ms=None)
    path = write_jsonl(tmp_path / "r.jsonl", [e])
    [back] = read_envelopes(str(path))
    assert back == e
    assert isinstance(back.finished_at, datetime)
    assert back.finished_at.tzinfo is not None
    assert back.delivery is Delivery.UNKNOWN
    assert back.error is not None
    assert back.error.kind is ErrorKind.TIMEOUT


_envelopes = st.builds(
    env,
    st.sampled_from(["a", "b", "c", "d"]),
    ok=st.booleans(),
    delivery=st.sampled_from(Delivery),
    error=st.none()
    | st.builds(
        EnvelopeError,
        kind=st.sampled_from(ErrorKind),
        code=st.none() | st.integers(0, 99999),
        message=st.text(max_size=10),
    ),
    started_at=st.none() | st.datetimes(timezones=st.just(UTC)),
    latency_ms=st.none() | st.floats(0, 1e6),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(_envelopes, max_size=5), max_size=4))
def test_both_formats_agree_on_every_key(batches: list[list[Envelope]]) -> None:
    last = {e.key: e for batch in batches for e in batch}
    with tempfile.TemporaryDirectory() as tmp:
        jsonl, db = asyncio.run(write_both(Path(tmp), batches))
        for path in (jsonl, db):
            assert load_ledger(path) == {
                k: KeyState(
                    delivery=e.delivery,
                    ok=e.ok,
                    error_kind=None if e.error is None else e.error.kind,
                )
                for k, e in last.items()
            }
            assert {e.key: e for e in read_envelopes(path)} == last


async def test_an_empty_sqlite_file_holds_no_results_yet(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    path.write_bytes(b"")  # e.g. `touch r.sqlite`
    assert load_ledger(str(path)) == {}
    assert list(read_envelopes(str(path))) == []
    sink = SqliteSink(str(path))
    sink.write(env("a"))
    await sink.aclose()
    assert load_ledger(str(path)) == {"a": CONFIRMED}
