"""Reading JSONL, CSV and id lists into records: fields, line numbers, rules, keys, streaming."""

from __future__ import annotations

import io
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from dispatcher.inputs import records
from dispatcher.inputs.keys import FingerprintTable, KeyDeriver
from dispatcher.inputs.records import (
    PYTHON_SOURCE,
    STDIN_NAME,
    Format,
    InputError,
    ReadOptions,
    check_inputs,
    detect_format,
    event_from_mapping,
    read_batches,
)
from dispatcher.inputs.validation import MAX_BODY_BYTES, RuleViolation
from dispatcher.model import Event, Invalid, Record


def read(
    data: bytes,
    fmt: Format = "jsonl",
    *,
    keys: KeyDeriver | None = None,
    **options: Any,
) -> list[Record]:
    options.setdefault("workflow", "wf")
    stream = io.BytesIO(data)
    batches = read_batches("-", fmt, ReadOptions(**options), keys or KeyDeriver(), stdin=stream)
    return [record for batch in batches for record in batch]


def events(data: bytes, fmt: Format = "jsonl", **options: Any) -> list[Event]:
    out = read(data, fmt, **options)
    assert all(isinstance(r, Event) for r in out), out
    return [r for r in out if isinstance(r, Event)]


def only_invalid(data: bytes, fmt: Format = "jsonl", **options: Any) -> Invalid:
    out = read(data, fmt, **options)
    assert len(out) == 1, out
    assert isinstance(out[0], Invalid), out
    return out[0]


def jl(**fields: Any) -> bytes:
    return orjson.dumps(fields) + b"\n"


# -- formats -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.jsonl", "jsonl"),
        ("a.NDJSON", "jsonl"),
        ("dir.v2/a.json", "jsonl"),
        ("a.csv", "csv"),
        ("a.txt", "ids"),
        ("a.ids", "ids"),
        ("a.lst", "ids"),
        ("-", "jsonl"),
    ],
)
def test_format_from_extension(path: str, expected: str) -> None:
    assert detect_format(path, None) == expected


def test_format_override_wins() -> None:
    assert detect_format("a.jsonl", "csv") == "csv"
    assert detect_format("-", "ids") == "ids"
    assert detect_format("events.data", "jsonl") == "jsonl"


def test_unknown_extension_names_file_and_suggests_format() -> None:
    with pytest.raises(InputError, match=r"events\.data.*--format"):
        detect_format("events.data", None)
    with pytest.raises(InputError, match="--format"):
        detect_format("events", None)


def test_unknown_format_override_is_refused() -> None:
    with pytest.raises(InputError, match="'xml'"):
        detect_format("a.jsonl", "xml")


# -- JSONL ---------------------------------------------------------------------------------


def test_jsonl_fields_defaults_and_bodies() -> None:
    data = (
        jl(instance_id="i-1", event_type="approved", body={"by": "ann", "n": [1, 2]})
        + jl(instance_id="i-2", event_type="approved", workflow="other")
        + jl(instance_id="i-3", event_type="approved", body=None)
        + b'{ "instance_id" : "i-4", "event_type": "x", "body": "text" , "note": "ignored" }\n'
    )
    got = events(data, extra_fields=True)
    assert [(e.workflow, e.instance_id, e.event_type, e.body) for e in got] == [
        ("wf", "i-1", "approved", b'{"by":"ann","n":[1,2]}'),
        ("other", "i-2", "approved", None),  # absent body: no request body at all
        ("wf", "i-3", "approved", b"null"),  # present null: the JSON value null
        ("wf", "i-4", "x", b'"text"'),
    ]
    assert [e.line for e in got] == [1, 2, 3, 4]
    assert {e.source for e in got} == {STDIN_NAME}


def test_blank_lines_are_skipped_and_line_numbers_stay_physical() -> None:
    data = (
        b"\n"
        + jl(instance_id="a", event_type="e")
        + b"   \r\n\t\n"
        + jl(instance_id="b", event_type="e")
    )
    assert [(e.instance_id, e.line) for e in events(data)] == [("a", 2), ("b", 5)]


def test_crlf_bom_and_missing_final_newline() -> None:
    data = b"\xef\xbb\xbf" + jl(instance_id="a", event_type="e")[:-1] + b"\r\n"
    data += jl(instance_id="b", event_type="e")[:-1]
    assert [e.instance_id for e in events(data)] == ["a", "b"]


def test_explicit_id_string_or_integer_is_the_key() -> None:
    got = events(
        jl(instance_id="a", event_type="e", id="order-7")
        + jl(instance_id="a", event_type="e", id=42)
    )
    assert [e.key for e in got] == ["order-7", "42"]


GOOD = {"instance_id": "i-1", "event_type": "e"}


def line_with(**changes: Any) -> bytes:
    fields: dict[str, Any] = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in fields.items() if v is not DROP}) + b"\n"


DROP = object()


@pytest.mark.parametrize(
    ("line", "rule", "in_message"),
    [
        (b"{not json}\n", "bad_json", "not valid JSON"),
        (b'{"instance_id": "a", "event_type": "e"} trailing\n', "bad_json", "not valid JSON"),
        (b'{"instance_id": "\xff\xfe", "event_type": "e"}\n', "bad_utf8", "UTF-8"),
        (b'{"instance_id": "a",\x00 "event_type": "e"}\n', "nul_byte", "NUL"),
        (b"[" * 1100 + b"]" * 1100 + b"\n", "too_deep", "1024"),
        (
            b'{"instance_id": "a", "event_type": "e", "body": ' + b"[" * 300 + b"]" * 300 + b"}\n",
            "too_deep",
            "body",
        ),
        (b"[1, 2]\n", "not_object", "jq"),
        (b'"a string"\n', "not_object", "string"),
        (b"7\n", "not_object", "number"),
        (b"null\n", "not_object", "null"),
        (line_with(instance_id=DROP), "missing_field", "instance_id"),
        (line_with(event_type=DROP), "missing_field", "event_type"),
        (line_with(instance_id=5), "instance_id_type", "instance_id"),
        (line_with(instance_id=None), "instance_id_type", "instance_id"),
        (line_with(event_type=["x"]), "event_type_type", "event_type"),
        (line_with(workflow=None), "workflow_type", "workflow"),
        (line_with(workflow="bad name"), "workflow_pattern", "workflow"),
        (line_with(instance_id="has space"), "instance_id_pattern", "instance_id"),
        (line_with(instance_id="x" * 101), "instance_id_length", "instance_id"),
        (line_with(instance_id=""), "instance_id_length", "instance_id"),
        (line_with(event_type="e" * 101), "event_type_length", "event_type"),
        (line_with(event_type="a\x00b"), "nul_byte", "event_type"),
        (line_with(id=1.5), "id_type", "id"),
        (line_with(id=True), "id_type", "id"),
        (line_with(id=None), "id_type", "id"),
        (line_with(id=""), "id_empty", "id"),
        (line_with(body="x" * MAX_BODY_BYTES), "body_too_large", "bytes"),
    ],
)
def test_each_invalid_rule_is_named_with_source_and_line(
    line: bytes, rule: str, in_message: str
) -> None:
    good = jl(instance_id="ok", event_type="e")
    out = read(good + b"\n" + line + good)
    assert [type(r) for r in out] == [Event, Invalid, Event]
    bad = out[1]
    assert isinstance(bad, Invalid)
    assert (bad.rule, bad.source, bad.line) == (rule, STDIN_NAME, 3)
    assert in_message in bad.message
    assert bad.key.startswith("raw-")
    assert [r.line for r in out] == [1, 3, 4]


def test_missing_workflow_suggests_the_flag() -> None:
    bad = only_invalid(jl(instance_id="a", event_type="e"), workflow=None)
    assert bad.rule == "missing_field"
    assert "--workflow" in bad.message
    assert (bad.instance_id, bad.event_type, bad.workflow) == ("a", "e", None)


def test_invalid_keeps_what_could_be_read() -> None:
    bad = only_invalid(jl(instance_id="has space", event_type="e", workflow="w2"))
    assert (bad.workflow, bad.instance_id, bad.event_type) == ("w2", "has space", "e")
    bad = only_invalid(jl(instance_id=5, event_type="e"))
    assert (bad.workflow, bad.instance_id, bad.event_type) == ("wf", None, "e")


def test_invalid_with_readable_id_is_keyed_by_it() -> None:
    assert only_invalid(jl(instance_id="bad id", event_type="e", id="r-9")).key == "r-9"
    assert only_invalid(jl(instance_id="bad id", event_type="e", id=9)).key == "9"


def test_body_exactly_at_the_limit_is_accepted() -> None:
    # orjson adds the two quotes of the JSON string.
    (event,) = events(line_with(body="x" * (MAX_BODY_BYTES - 2)))
    assert event.body is not None
    assert len(event.body) == MAX_BODY_BYTES


def test_very_long_lines_are_read_or_skipped_within_the_line_limit() -> None:
    long_ok = line_with(body="y" * 5000)
    too_long = b'{"instance_id": "' + b"z" * 10_000 + b'"}\n'
    good = jl(instance_id="after", event_type="e")
    out = read(long_ok + too_long + too_long + good, max_line_bytes=8192)
    assert [type(r) for r in out] == [Event, Invalid, Invalid, Event]
    assert isinstance(out[1], Invalid)
    assert (out[1].rule, out[1].line) == ("line_too_long", 2)
    assert "8192" in out[1].message
    # The same unread line in one run still gets its own key.
    assert out[2].key == out[1].key + "#1"
    assert (out[3].instance_id, out[3].line) == ("after", 4)


def test_invalid_raw_key_ignores_the_line_ending() -> None:
    line = b'{"instance_id": 5, "event_type": "e"}'
    keys = {only_invalid(line + ending).key for ending in (b"", b"\n", b"\r\n")}
    assert len(keys) == 1


def test_repeated_bad_lines_get_distinct_keys() -> None:
    out = read(b"nope\n" * 3)
    assert [r.key for r in out] == [out[0].key, out[0].key + "#1", out[0].key + "#2"]


def test_no_validate_ids_relaxes_only_the_instance_id_pattern() -> None:
    cron_id = "cron:2024-01-01T00:00:00Z/abc.def"
    line = jl(instance_id=cron_id, event_type="tick")
    assert only_invalid(line).rule == "instance_id_pattern"
    (event,) = events(line, strict_ids=False)
    assert event.instance_id == cron_id
    # Length rules and the workflow pattern still hold.
    assert only_invalid(line_with(instance_id="c" * 101), strict_ids=False).rule == (
        "instance_id_length"
    )
    assert only_invalid(line_with(workflow="bad wf"), strict_ids=False).rule == "workflow_pattern"
    assert only_invalid(line_with(instance_id="a\x00b"), strict_ids=False).rule == "nul_byte"


# -- CSV -----------------------------------------------------------------------------------


def test_csv_rows_columns_and_bodies() -> None:
    data = (
        b"instance_id,event_type,body,workflow,id,comment\r\n"
        b'i-1,approved,"{""by"": ""ann""}",,,x\r\n'
        b"i-2,approved,,w2,,\r\n"
        b"i-3,approved,null,,k-3,\r\n"
        b'i-4,approved,"""text""",,,\r\n'
    )
    got = events(data, "csv", extra_fields=True)
    assert [(e.workflow, e.instance_id, e.body, e.key[:2], e.line) for e in got] == [
        ("wf", "i-1", b'{"by":"ann"}', got[0].key[:2], 2),
        ("w2", "i-2", None, got[1].key[:2], 3),
        ("wf", "i-3", b"null", "k-", 4),
        ("wf", "i-4", b'"text"', got[3].key[:2], 5),
    ]
    assert got[2].key == "k-3"


def test_csv_line_numbers_follow_multiline_cells_and_blank_lines() -> None:
    data = (
        b"\xef\xbb\xbfinstance_id,event_type,body\n"
        b'a,e,"[1,\n2,\n3]"\n'
        b"\n"
        b"b,e,\n"
        b'c,"multi\nline",\n'
        b"d,e,\n"
    )
    got = events(data, "csv")
    assert [(e.instance_id, e.line) for e in got] == [("a", 2), ("b", 6), ("c", 7), ("d", 9)]
    assert got[0].body == b"[1,2,3]"
    assert got[2].event_type == "multi\nline"


@pytest.mark.parametrize(
    ("row", "rule"),
    [
        (b"a,e,,extra\n", "ragged_row"),
        (b"a\n", "ragged_row"),
        (b"a,e,{bad\n", "bad_json"),
        (b'a,e,"' + b"[" * 300 + b"]" * 300 + b'"\n', "too_deep"),
        (b",e,\n", "missing_field"),
        (b"a,,\n", "missing_field"),
        (b"a b,e,\n", "instance_id_pattern"),
        (b"\xffa,e,\n", "bad_utf8"),
        (b"a,e\x00,\n", "nul_byte"),
        (b"a,b\rc,\n", "bad_csv"),
        (b'a,e,"""' + b"x" * MAX_BODY_BYTES + b'"""\n', "body_too_large"),
    ],
)
def test_csv_invalid_rows(row: bytes, rule: str) -> None:
    data = b"instance_id,event_type,body\n" + row + b"ok,e,\n"
    out = read(data, "csv")
    assert [type(r) for r in out] == [Invalid, Event]
    bad = out[0]
    assert isinstance(bad, Invalid)
    assert (bad.rule, bad.line, bad.source) == (rule, 2, STDIN_NAME)
    assert (out[1].instance_id, out[1].line) == ("ok", 3)


def test_csv_line_too_long_spoils_only_its_row() -> None:
    data = b"instance_id,event_type,body\n" + b"a,e," + b"1" * 500 + b"\nok,e,\n"
    out = read(data, "csv", max_line_bytes=128)
    assert [(type(r), r.line) for r in out] == [(Invalid, 2), (Event, 3)]
    assert isinstance(out[0], Invalid)
    assert out[0].rule == "line_too_long"


def test_csv_missing_workflow() -> None:
    bad = only_invalid(b"instance_id,event_type\na,e\n", "csv", workflow=None)
    assert bad.rule == "missing_field"
    assert "--workflow" in bad.message


def test_csv_header_problems_are_input_errors(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_bytes(b"instance,event_type\na,e\n")
    with pytest.raises(InputError, match=r"events\.csv.*instance_id"):
        list(read_batches(str(path), "csv", ReadOptions(workflow="wf"), KeyDeriver()))
    with pytest.raises(InputError, match="repeats event_type"):
        read(b"instance_id,event_type,event_type\n", "csv")
    with pytest.raises(InputError, match="UTF-8"):
        read(b"instance_id,event_type\xff\n", "csv")


def test_csv_empty_or_header_only_gives_nothing() -> None:
    assert read(b"", "csv") == []
    assert read(b"\n\ninstance_id,event_type\n\n", "csv") == []


def test_csv_and_jsonl_give_the_same_key_for_the_same_record() -> None:
    (from_csv,) = events(b'instance_id,event_type,body\na,e,"{""x"": [1, 2]}"\n', "csv")
    (from_jsonl,) = events(jl(instance_id="a", event_type="e", body={"x": [1, 2]}))
    assert from_csv.key == from_jsonl.key


# -- id lists ------------------------------------------------------------------------------


def test_ids_fan_out_one_event_to_every_id() -> None:
    data = b"# instances to approve\n\ni-1\n  i-2  \r\n#i-3\ni-4"
    got = events(data, "ids", event_type="approve", body=b'{"ok":true}')
    assert [(e.instance_id, e.line) for e in got] == [("i-1", 3), ("i-2", 4), ("i-4", 6)]
    assert {(e.workflow, e.event_type, e.body) for e in got} == {("wf", "approve", b'{"ok":true}')}
    no_body = events(b"i-1\n", "ids", event_type="approve")
    assert no_body[0].body is None


def test_ids_need_event_type_and_workflow() -> None:
    with pytest.raises(InputError, match="an id list needs --event-type"):
        read(b"i-1\n", "ids")
    with pytest.raises(InputError, match="an id list needs --workflow"):
        read(b"i-1\n", "ids", workflow=None, event_type="e")


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        (b"a b", "instance_id_pattern"),
        (b"x" * 101, "instance_id_length"),
        (b"\xff\xfe", "bad_utf8"),
        (b"a\x00b", "nul_byte"),
    ],
)
def test_ids_invalid_lines(line: bytes, rule: str) -> None:
    out = read(b"ok\n" + line + b"\nok2\n", "ids", event_type="e")
    assert [type(r) for r in out] == [Event, Invalid, Event]
    assert isinstance(out[1], Invalid)
    assert (out[1].rule, out[1].line) == (rule, 2)


def test_ids_without_strict_validation() -> None:
    (event,) = events(b"cron:abc/def\n", "ids", event_type="e", strict_ids=False)
    assert event.instance_id == "cron:abc/def"


# -- sources -------------------------------------------------------------------------------


def test_file_source_is_the_path_as_given(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(jl(instance_id="a", event_type="e"))
    (batch,) = read_batches(str(path), "jsonl", ReadOptions(workflow="wf"), KeyDeriver())
    assert batch[0].source == str(path)


def test_dash_reads_process_stdin_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeStdin:
        buffer = io.BytesIO(jl(instance_id="a", event_type="e"))

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    (batch,) = read_batches("-", "jsonl", ReadOptions(workflow="wf"), KeyDeriver())
    assert [(r.source, r.instance_id) for r in batch] == [(STDIN_NAME, "a")]


def test_stdin_is_left_open() -> None:
    stream = io.BytesIO(jl(instance_id="a", event_type="e"))
    list(read_batches("-", "jsonl", ReadOptions(workflow="wf"), KeyDeriver(), stdin=stream))
    assert not stream.closed


def test_unopenable_inputs_raise_naming_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match=r"nope\.jsonl"):
        read_batches(missing, "jsonl", ReadOptions(), KeyDeriver())
    with pytest.raises(InputError, match=str(tmp_path)):
        read_batches(str(tmp_path), "jsonl", ReadOptions(), KeyDeriver())


def test_read_failure_midway_is_an_input_error() -> None:
    class Failing(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            raise OSError(5, "Input/output error")

    with pytest.raises(InputError, match=r"<stdin>.*Input/output error"):
        list(
            read_batches(
                "-", "jsonl", ReadOptions(), KeyDeriver(), stdin=io.BufferedReader(Failing())
            )
        )


def test_files_are_closed_when_the_reader_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(jl(instance_id="a", event_type="e") * 10)
    opened: list[io.BufferedReader] = []

    def tracking_open(file: str, mode: str) -> io.BufferedReader:
        stream = open(file, mode)  # noqa: SIM115
        assert isinstance(stream, io.BufferedReader)
        opened.append(stream)
        return stream

    monkeypatch.setattr(records, "open", tracking_open, raising=False)
    batches = read_batches(
        str(path), "jsonl", ReadOptions(workflow="wf", batch_size=3), KeyDeriver()
    )
    next(batches)
    assert not opened[0].closed
    batches.close()  # type: ignore[attr-defined]
    assert opened[0].closed
    list(read_batches(str(path), "jsonl", ReadOptions(workflow="wf"), KeyDeriver()))
    assert opened[1].closed


# -- Python API ----------------------------------------------------------------------------


def test_event_from_mapping_matches_a_jsonl_line() -> None:
    fields = {"instance_id": "a", "event_type": "e", "body": {"x": 1}}
    event = event_from_mapping(fields, KeyDeriver(), ReadOptions(workflow="wf"), line=3)
    (from_line,) = events(orjson.dumps(fields))
    assert isinstance(event, Event)
    assert (event.source, event.line) == (PYTHON_SOURCE, 3)
    assert (event.key, event.body, event.workflow) == (from_line.key, from_line.body, "wf")


def test_event_from_mapping_never_raises_for_bad_fields() -> None:
    keys = KeyDeriver()
    bad = event_from_mapping({"instance_id": "a", "event_type": "e"}, keys)
    assert isinstance(bad, Invalid)
    assert bad.rule == "missing_field"
    odd = event_from_mapping(
        {"instance_id": "a", "event_type": "e", "workflow": "w", "body": object()}, keys
    )
    assert isinstance(odd, Invalid)
    assert odd.rule == "bad_body"
    assert event_from_mapping({"instance_id": 1, "event_type": "e", "id": 5}, keys).key == "5"


# -- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"batch_size": 0}, "--batch-size"),
        ({"workflow": "no spaces allowed"}, "--workflow"),
        ({"event_type": "e" * 101}, "--event-type"),
        ({"body": b"1" * (MAX_BODY_BYTES + 1)}, "--body"),
    ],
)
def test_options_are_validated_once_naming_the_flag(options: dict[str, Any], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        ReadOptions(**options)


# -- keys ----------------------------------------------------------------------------------


def test_keys_are_stable_under_reordering_and_distinct_for_repeats() -> None:
    lines = [jl(instance_id=f"i-{n % 40}", event_type="e", body={"n": n % 7}) for n in range(100)]
    lines += [jl(instance_id="dup", event_type="e")] * 3
    first = read(b"".join(lines))
    shuffled = lines[:]
    random.Random(4).shuffle(shuffled)
    second = read(b"".join(shuffled))

    def by_content(out: list[Record]) -> Counter[tuple[str, str]]:
        assert all(isinstance(r, Event) for r in out)
        return Counter((r.instance_id or "", r.key) for r in out)

    assert by_content(first) == by_content(second)
    assert len({r.key for r in first}) == len(first)
    dup_keys = [r.key for r in first if r.instance_id == "dup"]
    assert dup_keys[1:] == [dup_keys[0] + "#1", dup_keys[0] + "#2"]


def test_key_depends_on_content_not_formatting() -> None:
    (a,) = events(b'{"instance_id":"a","event_type":"e","body":{"x":1}}\n')
    (b,) = events(b'{ "body" : { "x" : 1 },\t"event_type":"e", "instance_id":"a" }\n')
    assert a.key == b.key
    (c,) = events(b'{"instance_id":"a","event_type":"e","body":{"x":2}}\n')
    (d,) = events(b'{"instance_id":"a","event_type":"e","workflow":"w2","body":{"x":1}}\n')
    assert len({a.key, c.key, d.key}) == 3


def test_absent_and_null_bodies_have_different_keys() -> None:
    absent, null = events(
        jl(instance_id="a", event_type="e") + jl(instance_id="a", event_type="e", body=None)
    )
    assert "#" not in absent.key
    assert "#" not in null.key
    assert absent.key != null.key


def test_an_explicit_id_is_the_key_and_is_used_once() -> None:
    keys = KeyDeriver()
    assert keys.key_for("mine", "w", "i", "e", None) == "mine"
    # Two records under one key would share an envelope: the second one is refused.
    with pytest.raises(RuleViolation) as caught:
        keys.key_for("mine", "w", "other", "e", None)
    assert caught.value.rule == "duplicate_id"
    # Ids and contents are counted apart: an id never makes content look repeated.
    derived = keys.key_for(None, "w", "i", "e", None)
    assert "#" not in derived
    assert keys.key_for(None, "w", "i", "e", None) == derived + "#1"


def test_a_repeated_id_makes_the_later_lines_invalid_with_keys_of_their_own() -> None:
    lines = (
        jl(id="x", instance_id="a", event_type="e")
        + jl(id="x", instance_id="b", event_type="e")
        + jl(id="x", instance_id="c")  # invalid for another reason too
        + jl(id="y", instance_id="d", event_type="e")
    )
    recs = read(lines)
    assert isinstance(recs[0], Event)
    assert isinstance(recs[3], Event)
    assert [type(r).__name__ for r in recs] == ["Event", "Invalid", "Invalid", "Event"]
    assert isinstance(recs[1], Invalid)
    assert recs[1].rule == "duplicate_id"
    assert "'x'" in recs[1].message
    keys = [r.key for r in recs]
    assert len(set(keys)) == 4
    assert keys[0] == "x"
    assert keys[3] == "y"
    # The same input read again gives the same keys: --resume finds every record.
    assert [r.key for r in read(lines)] == keys


def test_one_deriver_counts_across_the_inputs_of_a_run() -> None:
    keys = KeyDeriver()
    line = jl(instance_id="a", event_type="e")
    (first,) = read(line, keys=keys)
    (second,) = read(b"instance_id,event_type\na,e\n", "csv", keys=keys)
    (third,) = read(b"a\n", "ids", keys=keys, event_type="e")
    assert [second.key, third.key] == [first.key + "#1", first.key + "#2"]


def test_raw_and_content_keys_never_share_counts() -> None:
    keys = KeyDeriver()
    content = keys.key_for(None, "w", "i", "e", None)
    raw = keys.key_for_raw(None, b"w\0i\0e\0-")
    assert raw.startswith("raw-")
    assert "#" not in content
    assert "#" not in raw


def test_fingerprint_table_counts_through_growth() -> None:
    table = FingerprintTable(initial_slots=4)
    rng = random.Random(1)
    values = list({rng.getrandbits(64) | 1 for _ in range(20000)})
    assert [table.add(v) for v in values] == [0] * len(values)
    assert [table.add(v) for v in values[:100]] == [1] * 100
    assert [table.add(v) for v in values[:10]] == [2] * 10
    assert len(table) == len(values)
    # Shards at most three quarters full and, once grown, at least half full.
    assert 8 / 0.75 <= table.nbytes / len(table) <= 16
    assert table.add(0) == 0  # 0 stands for 1 internally; it is the first sighting of either
    assert table.add(1) == 1


# -- batching and streaming ----------------------------------------------------------------


def test_batches_are_bounded_and_never_empty() -> None:
    data = b"".join(jl(instance_id=f"i-{n}", event_type="e") for n in range(50))
    batches = list(
        read_batches(
            "-",
            "jsonl",
            ReadOptions(workflow="wf", batch_size=7),
            KeyDeriver(),
            stdin=io.BytesIO(data),
        )
    )
    assert [len(b) for b in batches] == [7] * 7 + [1]
    assert (
        list(read_batches("-", "jsonl", ReadOptions(), KeyDeriver(), stdin=io.BytesIO(b""))) == []
    )


class CountingRaw(io.RawIOBase):
    """A raw stream that counts the bytes handed out, to show how far reading got."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._data.readinto(buffer)
        self.bytes_read += n
        return n


def test_reading_is_lazy_on_a_large_input() -> None:
    data = b"".join(b'{"instance_id":"i-%d","event_type":"e"}\n' % n for n in range(200_000))
    raw = CountingRaw(data)
    batches = read_batches(
        "-", "jsonl", ReadOptions(workflow="wf"), KeyDeriver(), stdin=io.BufferedReader(raw)
    )
    assert raw.bytes_read == 0
    first = next(batches)
    assert len(first) == 1000
    assert raw.bytes_read < len(data) // 50
    second = next(batches)
    assert second[0].line == 1001
    assert raw.bytes_read < len(data) // 25


def test_repeat_counts_stay_exact_when_spilled_to_disk() -> None:
    from dispatcher.inputs.keys import RepeatCounter

    counter = RepeatCounter(spill_at=100)
    rng = random.Random(7)
    values = list({rng.getrandbits(64) for _ in range(1000)} | {0})
    assert [counter.add(v) for v in values[:50]] == [0] * 50
    assert not counter.spilled
    assert [counter.add(v) for v in values] == [1] * 50 + [0] * (len(values) - 50)
    assert counter.spilled
    assert len(counter) == len(values)
    assert [counter.add(v) for v in values[:60]] == [2] * 50 + [1] * 10
    counter.close()


def test_keys_after_the_spill_match_keys_in_memory() -> None:
    records = [("wf", f"i{k % 300}", "e", b"{}") for k in range(1000)]
    small, big = KeyDeriver(spill_at=50), KeyDeriver()
    try:
        assert [small.key_for(None, *r) for r in records] == [
            big.key_for(None, *r) for r in records
        ]
        assert small.table.spilled
    finally:
        small.close()
        big.close()


# -- unknown fields and the checks before a run ------------------------------------------


def test_a_misspelt_jsonl_field_makes_the_line_invalid_naming_the_field() -> None:
    bad = only_invalid(jl(instance_id="a", event_type="e", bdy={"x": 1}))
    assert bad.rule == "unknown_field"
    assert "'bdy' (did you mean 'body'?)" in bad.message
    (ok,) = events(jl(instance_id="a", event_type="e", bdy=1), extra_fields=True)
    assert ok.body is None


def test_an_unknown_csv_column_is_an_error_for_the_file() -> None:
    with pytest.raises(InputError, match="unknown column 'bdy'"):
        read(b"instance_id,event_type,bdy\na,e,1\n", "csv")
    (ok,) = events(b"instance_id,event_type,bdy\na,e,1\n", "csv", extra_fields=True)
    assert ok.body is None


def test_check_inputs_finds_a_bad_second_file_before_anything_is_read(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(jl(instance_id="a", event_type="e"))
    headless = tmp_path / "bad.csv"
    headless.write_bytes(b"id,foo\n1,2\n")
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"a\n")
    options = ReadOptions(workflow="wf")
    check_inputs([str(good)], None, options)
    with pytest.raises(InputError, match=r"bad.csv: the CSV header has no instance_id column"):
        check_inputs([str(good), str(headless)], None, options)
    with pytest.raises(InputError, match=r"ids.txt: an id list needs --event-type"):
        check_inputs([str(good), str(ids)], None, options)
    with pytest.raises(InputError, match=r"missing.jsonl: cannot open"):
        check_inputs([str(good), str(tmp_path / "missing.jsonl")], None, options)


def test_event_type_and_body_without_an_id_list_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(jl(instance_id="a", event_type="e"))
    with pytest.raises(InputError, match="--event-type applies only to id lists"):
        check_inputs([str(good)], None, ReadOptions(workflow="wf", event_type="x"))
    with pytest.raises(InputError, match="--body applies only to id lists"):
        check_inputs([str(good)], None, ReadOptions(workflow="wf", body=b"1"))
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"a\n")
    check_inputs([str(good), str(ids)], None, ReadOptions(workflow="wf", event_type="x"))
