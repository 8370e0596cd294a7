"""Hostile input never crashes the reader and never disturbs the good lines around it.

Each example mixes good records with bad lines (invalid UTF-8, NUL bytes, very long lines,
deep nesting, wrong types, ragged CSV rows) and blank lines. The reader must return exactly
one Invalid per bad line, at its line number, and the good lines must come out as the
very Events (key, fields, body) that a file of the good lines alone gives.
"""

from __future__ import annotations

import csv
import io
import operator
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dispatcher.inputs.keys import KeyDeriver
from dispatcher.inputs.records import Format, ReadOptions, read_batches
from dispatcher.inputs.validation import MAX_BODY_BYTES
from dispatcher.model import Event, Invalid, Record

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Piece:
    """Some input bytes, and what they must read as: ``good``, ``bad`` or ``blank``."""

    data: bytes
    kind: str


def read_all(data: bytes, fmt: Format, options: ReadOptions) -> list[Record]:
    batches = read_batches("-", fmt, options, KeyDeriver(), stdin=io.BytesIO(data))
    return [record for batch in batches for record in batch]


def without_line(event: Event) -> tuple[Any, ...]:
    return (
        event.key,
        event.source,
        event.workflow,
        event.instance_id,
        event.event_type,
        event.body,
    )


def check(pieces: list[Piece], fmt: Format, options: ReadOptions, header: bytes = b"") -> None:
    data = header + b"".join(p.data for p in pieces)
    out = read_all(data, fmt, options)  # must not raise, whatever the input
    # Two lines with one explicit id: the later is invalid by design (duplicate_id), which
    # is not what this property is about.
    assume(not any(isinstance(r, Invalid) and r.rule == "duplicate_id" for r in out))

    expected: list[tuple[int, str]] = []
    line = 1 + header.count(b"\n")
    for piece in pieces:
        if piece.kind != "blank":
            expected.append((line, piece.kind))
        line += piece.data.count(b"\n")
    got = [(r.line, "good" if isinstance(r, Event) else "bad") for r in out]
    assert got == expected, (pieces, out)

    alone = read_all(header + b"".join(p.data for p in pieces if p.kind == "good"), fmt, options)
    assert all(isinstance(r, Event) for r in alone)
    assert [without_line(r) for r in out if isinstance(r, Event)] == [
        without_line(r) for r in alone if isinstance(r, Event)
    ]


# -- building blocks -----------------------------------------------------------------------

ID_FIRST = "abcxyzABCXYZ0129_"
# Strings drawn from a fixed alphabet generate much faster than from_regex.
valid_ids = st.builds(operator.add, st.sampled_from(ID_FIRST), st.text(ID_FIRST + "-", max_size=20))
event_types = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
blank = st.sampled_from([b"\n", b"   \n", b"\t\r\n"]).map(lambda d: Piece(d, "blank"))
no_newline = st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b" "))


@st.composite
def good_record(draw: st.DrawFn) -> dict[str, Any]:
    record: dict[str, Any] = {"instance_id": draw(valid_ids), "event_type": draw(event_types)}
    if draw(st.booleans()):
        record["body"] = draw(json_values)
    if draw(st.booleans()):
        record["workflow"] = draw(valid_ids)
    if draw(st.integers(0, 3)) == 0:
        record["id"] = draw(valid_ids | st.integers(0, 10**6))
    return record


def spoil(data: bytes, junk: bytes, at: int) -> bytes:
    """``data`` with ``junk`` spliced in before its trailing newline."""
    at %= len(data)
    return data[:at] + junk + data[at:]


# -- JSONL ---------------------------------------------------------------------------------


@st.composite
def jsonl_good(draw: st.DrawFn) -> Piece:
    return Piece(orjson.dumps(draw(good_record())) + b"\n", "good")


@st.composite
def jsonl_bad(draw: st.DrawFn) -> Piece:
    base = orjson.dumps(draw(good_record()))
    at = draw(st.integers(0, 10_000))
    choice = draw(st.integers(0, 9))
    if choice == 0:  # invalid UTF-8 anywhere
        data = spoil(
            base, draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88"])), at
        )
    elif choice == 1:  # NUL bytes
        data = spoil(base, b"\x00", at)
    elif choice == 2:  # nested deeper than orjson reads
        depth = draw(st.integers(1025, 3000))
        data = b"[" * depth + b"]" * depth
    elif choice == 3:  # a body deeper than orjson writes
        depth = draw(st.integers(255, 1000))
        data = b'{"instance_id":"a","event_type":"e","body":' + b"[" * depth + b"]" * depth + b"}"
    elif choice == 4:  # wrong types for the fields
        field = draw(st.sampled_from(["instance_id", "event_type", "workflow", "id"]))
        wrong: object = draw(st.sampled_from([None, 1.5, [], {}, True]))
        record = draw(good_record())
        record[field] = wrong
        data = orjson.dumps(record)
    elif choice == 5:  # JSON, but not an object
        data = orjson.dumps(
            draw(
                st.lists(json_values, max_size=3)
                | st.text(max_size=5)
                | st.integers(-(2**63), 2**63)
            )
        )
    elif choice == 6:  # a body over the API's limit
        data = b'{"instance_id":"a","event_type":"e","body":"' + b"x" * MAX_BODY_BYTES + b'"}'
    elif choice == 7:  # cut short
        data = base[: at % len(base)] or b"{"
    elif choice == 8:  # random bytes that are not blank
        data = b"#" + draw(no_newline)
    else:  # a broken path rule, broken with or without strict instance ids
        record = draw(good_record())
        field, broken = draw(
            st.sampled_from(
                [
                    ("instance_id", ""),
                    ("instance_id", "x" * 101),
                    ("workflow", "has space"),
                    ("workflow", "-lead"),
                    ("event_type", ""),
                    ("event_type", "nul\x00inside"),
                ]
            )
        )
        record[field] = broken
        data = orjson.dumps(record)
    return Piece(data + draw(st.sampled_from([b"\n", b"\r\n"])), "bad")


@SETTINGS
@given(
    st.lists(st.one_of(jsonl_good(), jsonl_good(), jsonl_bad(), blank), max_size=20),
    st.booleans(),
)
def test_jsonl_hostile_lines_stay_contained(pieces: list[Piece], strict: bool) -> None:
    check(pieces, "jsonl", ReadOptions(workflow="wf", strict_ids=strict))


# -- CSV -----------------------------------------------------------------------------------

CSV_HEADER = b"instance_id,event_type,body,workflow,id\r\n"


def csv_row(cells: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue().encode()


@st.composite
def csv_good(draw: st.DrawFn) -> Piece:
    record = draw(good_record())
    cells = [
        record["instance_id"],
        record["event_type"],
        orjson.dumps(record["body"]).decode() if "body" in record else "",
        record.get("workflow", ""),
        str(record.get("id", "")),
    ]
    return Piece(csv_row(cells), "good")


@st.composite
def csv_bad(draw: st.DrawFn) -> Piece:
    row = draw(csv_good()).data
    choice = draw(st.integers(0, 5))
    if choice == 0:  # ragged: too many or too few cells
        cells = draw(
            st.lists(
                st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5),
                min_size=1,
                max_size=9,
            )
        )
        if len(cells) == 5:
            cells.append("extra")
        if len(cells) == 1 and not cells[0].strip():
            cells[0] = "x"  # a lone blank cell reads as a blank line
        data = csv_row(cells)
    elif choice == 1:  # invalid UTF-8; quotes stay balanced
        data = spoil(row, b"\xff", draw(st.integers(0, 10_000)))
    elif choice == 2:  # NUL bytes
        data = spoil(row, b"\x00", draw(st.integers(0, 10_000)))
    elif choice == 3:  # a body cell that is not JSON
        data = csv_row(["a", "e", draw(st.sampled_from(["{", "nope", "[1,", "'x'"])), "", ""])
    elif choice == 4:  # a body deeper than orjson writes
        depth = draw(st.integers(255, 1000))
        data = csv_row(["a", "e", "[" * depth + "]" * depth, "", ""])
    else:  # a missing required cell
        data = csv_row(["", "e", "", "", ""] if draw(st.booleans()) else ["a", "", "", "", ""])
    return Piece(data, "bad")


@SETTINGS
@given(st.lists(st.one_of(csv_good(), csv_good(), csv_bad(), blank), max_size=20))
def test_csv_hostile_rows_stay_contained(pieces: list[Piece]) -> None:
    check(pieces, "csv", ReadOptions(workflow="wf"), header=CSV_HEADER)


# -- id lists ------------------------------------------------------------------------------


@st.composite
def ids_bad(draw: st.DrawFn) -> Piece:
    good = draw(valid_ids).encode()
    choice = draw(st.integers(0, 4))
    if choice == 0:
        data = spoil(good, b"\xff", draw(st.integers(0, 100)))
    elif choice == 1:
        data = spoil(good, b"\x00", draw(st.integers(0, 100)))
    elif choice == 2:
        data = good + b" " + good
    elif choice == 3:
        data = b"i" * draw(st.integers(101, 100_000))
    else:
        data = b"-" + good
    return Piece(data + b"\n", "bad")


comment = st.text(max_size=10).map(
    lambda t: Piece(b"  # " + t.replace("\n", " ").encode() + b"\n", "blank")
)
ids_good = valid_ids.map(lambda i: Piece(i.encode() + b"\n", "good"))


@SETTINGS
@given(st.lists(st.one_of(ids_good, ids_good, ids_bad(), blank, comment), max_size=20))
def test_id_lists_hostile_lines_stay_contained(pieces: list[Piece]) -> None:
    options = ReadOptions(workflow="wf", event_type="tick", body=b'{"n":1}')
    check(pieces, "ids", options)
