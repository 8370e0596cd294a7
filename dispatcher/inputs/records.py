"""Reading input into records, in batches, streamed: one :class:`Record` per input line.

Three formats, chosen by :func:`detect_format`:

``jsonl``
    One JSON object a line: ``instance_id`` and ``event_type`` (strings), optional
    ``workflow`` (else ``--workflow``), optional ``body`` (any JSON value; absent means the
    request has no body, ``null`` means the body is ``null``) and optional ``id`` (the
    record's key: a non-empty string, or an integer taken as its decimal string). Any
    other field makes the line invalid (``unknown_field``): a misspelt ``bdy`` must not
    send events without their body. ``--allow-extra-fields`` (``allow_extra_fields``)
    lets other fields through, ignored, so recorded events with extra metadata can be
    replayed as they are.
``csv``
    A header row naming the columns ``instance_id``, ``event_type`` and optionally ``body``
    (JSON text; an empty cell means no body, so a string body is written ``"text"`` with
    its JSON quotes), ``workflow`` and ``id`` (empty cells mean absent). Any other column
    is an error for the whole file, unless ``--allow-extra-fields`` lets it through
    (ignored). Quoted cells may span lines.
``ids``
    One instance id a line, for fan-out: every id gets ``--event-type`` and ``--body``.
    Surrounding whitespace is stripped; ``#`` comment lines are skipped.

Lines holding only whitespace are skipped in every format: they are not records. A
UTF-8 byte order mark at the start of the input is ignored. Line numbers are 1-based
physical lines; a CSV row spanning lines has the number of the line it starts on.

A line that cannot become an :class:`~dispatcher.model.Event` becomes an
:class:`~dispatcher.model.Invalid` naming the rule it broke, and reading goes on; only
whole-input problems (cannot open or read the file, unknown format, unusable CSV header,
an id list without ``--event-type`` or ``--workflow``) raise :class:`InputError`.
:func:`check_inputs` finds all of those for every input before a run sends anything.
Rule names, besides the path and body rules of :mod:`dispatcher.inputs.validation`:
``bad_json``, ``bad_utf8``, ``nul_byte``, ``too_deep`` (JSON nested deeper than orjson
reads or writes), ``not_object``, ``missing_field``, ``id_type``, ``id_empty``, ``id_reserved``,
``bad_csv``, ``ragged_row``, ``unknown_field`` and ``line_too_long``.

Memory stays flat whatever the input size: files are read line by line and records are
handed out in batches of ``batch_size``. A line longer than ``max_line_bytes`` (16 MiB,
far beyond any line whose body fits the API's 1 MiB limit) is skipped unparsed as
``line_too_long``, so one huge line (say a minified JSON array) cannot exhaust memory.
Bodies are encoded once, by orjson, when read; orjson reads integers beyond 64 bits as
floats, so such a number in a body is sent as a float.

:func:`event_from_mapping` applies the JSONL rules to one dict, for the Python API.

Every record, valid or not, gets its key from the run's :class:`~dispatcher.inputs.keys.KeyDeriver`
(explicit ``id``, else derived from content; see :mod:`dispatcher.inputs.keys`). Explicit ids are
taken as given: two records sharing one are not detected here.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import os
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, BinaryIO, Final, Literal

import orjson

from dispatcher.inputs.keys import KeyDeriver
from dispatcher.inputs.validation import RuleViolation, check_body_size, check_path
from dispatcher.model import Event, Invalid, Record, UserError

__all__ = [
    "FORMATS",
    "MAX_LINE_BYTES",
    "PYTHON_SOURCE",
    "STDIN_NAME",
    "Format",
    "InputError",
    "KeyDeriver",
    "ReadOptions",
    "check_inputs",
    "detect_format",
    "event_from_mapping",
    "read_batches",
]

Format = Literal["jsonl", "csv", "ids"]
FORMATS: Final[tuple[Format, ...]] = ("jsonl", "csv", "ids")
MAX_LINE_BYTES: Final = 16 * 1024 * 1024
STDIN_NAME: Final = "<stdin>"
PYTHON_SOURCE: Final = "<python>"

_EXTENSIONS: Final[dict[str, Format]] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".txt": "ids",
    ".ids": "ids",
    ".lst": "ids",
}
_BOM: Final = b"\xef\xbb\xbf"
_CSV_REQUIRED: Final = ("instance_id", "event_type")
_FIELDS: Final = frozenset({"id", "instance_id", "event_type", "workflow", "body"})
_ABSENT: Final = object()
_JSON_KINDS: Final[dict[type, str]] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class InputError(UserError):
    """A whole input is unusable; the message names the file."""


def _unknown_field_message(names: Iterable[str]) -> str:
    parts = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, sorted(_FIELDS), n=1, cutoff=0.6)
        parts.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    return (
        f"unknown field{'s' if len(parts) > 1 else ''} {', '.join(parts)}; fields are "
        f"{', '.join(sorted(_FIELDS))} (--allow-extra-fields lets others through)"
    )


def check_inputs(paths: Sequence[str], override: str | None, options: ReadOptions) -> None:
    """Raise :class:`InputError` for the first input a run could not read as a whole.

    Checks every input before anything is sent: the format, the options an id list needs,
    that the file opens, and a CSV file's header. ``--event-type`` and ``--body`` given
    when no input is an id list are an error: they would apply to nothing. Lines are not
    read (a bad line is that line's error envelope). A CSV header on stdin is checked only
    when it is read.
    """
    formats = [detect_format(path, override) for path in paths]
    if "ids" not in formats:
        # JSONL and CSV records carry their own event type and body: a flag that would
        # apply to none of them is a mistake to say, not a setting to drop silently.
        for flag, value in (("--event-type", options.event_type), ("--body", options.body)):
            if value is not None:
                raise InputError(
                    f"{flag} applies only to id lists (.txt, .ids, .lst or --format ids); "
                    f"the records of {', '.join(paths)} carry their own event_type and body"
                )
    seen: dict[tuple[int, int], str] = {}  # (device, inode) -> the name first given
    for path, fmt in zip(paths, formats, strict=True):
        name = STDIN_NAME if path == "-" else path
        if fmt == "ids":
            _check_id_list_options(name, options)
        if path == "-":
            continue
        if os.path.isdir(path):
            raise InputError(f"{path}: is a folder, not an input file")
        try:
            with open(path, "rb") as stream:
                # The same file twice (under one name or two) would send every record of
                # it twice, each as its own event: a slip of the shell, not a request.
                st = os.fstat(stream.fileno())
                if (st.st_dev, st.st_ino) in seen and stat.S_ISREG(st.st_mode):
                    first = seen[(st.st_dev, st.st_ino)]
                    also = "" if first == path else f" (as {first})"
                    raise InputError(f"{path}: given twice{also}; each input may be named once")
                seen[(st.st_dev, st.st_ino)] = path
                if fmt == "csv":
                    _check_csv_header(stream, name, options)
        except OSError as e:
            raise InputError(f"{path}: cannot open: {e.strerror or e}") from None


def _check_csv_header(stream: BinaryIO, name: str, options: ReadOptions) -> None:
    keys = KeyDeriver()
    try:
        feed = _CsvFeed(_lines(stream, name, options.max_line_bytes), options.max_line_bytes)
        csv.field_size_limit(max(csv.field_size_limit(), options.max_line_bytes))
        _Reader(name, options, keys)._csv_header(csv.reader(feed, strict=False), feed)
    finally:
        keys.close()


def _check_id_list_options(name: str, options: ReadOptions) -> None:
    if options.event_type is None:
        raise InputError(f"{name}: an id list needs --event-type (the event sent to every id)")
    if options.workflow is None:
        raise InputError(f"{name}: an id list needs --workflow (the workflow of every id)")


def detect_format(path: str, override: str | None) -> Format:
    """The format of ``path``: ``override`` (from ``--format``) if given, else by extension."""
    if override is not None:
        if path != "-" and os.path.isdir(path):
            raise InputError(f"{path}: is a folder; give the files in it")
        for fmt in FORMATS:
            if override == fmt:
                return fmt
        raise InputError(f"unknown --format {override!r}: choose one of {', '.join(FORMATS)}")
    if path == "-":
        return "jsonl"
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; give the files in it (for example {path}/*.jsonl)")
    extension = os.path.splitext(path)[1].lower()
    detected = _EXTENSIONS.get(extension)
    if detected is None:
        known = ", ".join(sorted(_EXTENSIONS))
        raise InputError(
            f"{path}: cannot tell the format from the extension {extension or '(none)'!r}"
            f" (known: {known}); give it with --format {'|'.join(FORMATS)}"
        )
    return detected


@dataclass(frozen=True, kw_only=True, slots=True)
class ReadOptions:
    """How to read inputs; validated once, errors name the command-line flag."""

    workflow: str | None = None  # for records that name none
    event_type: str | None = None  # ids format only: the event type for every id
    body: bytes | None = None  # ids format only: JSON-encoded body for every id
    strict_ids: bool = True  # False = --no-validate-ids: instance ids keep only length rules
    extra_fields: bool = False  # True = --allow-extra-fields: unknown fields are ignored
    batch_size: int = 1000
    max_line_bytes: int = MAX_LINE_BYTES

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_line_bytes < 2:
            raise ValueError(f"max_line_bytes must be at least 2, got {self.max_line_bytes}")
        # Placeholders that pass every rule isolate the one field under test.
        if self.workflow is not None:
            _check_option("--workflow", self.workflow, "i", "e")
        if self.event_type is not None:
            _check_option("--event-type", "w", "i", self.event_type)
        if self.body is not None:
            try:
                check_body_size(len(self.body))
            except RuleViolation as e:
                raise ValueError(f"--body: {e.message}") from None


def _check_option(flag: str, workflow: str, instance_id: str, event_type: str) -> None:
    try:
        check_path(workflow, instance_id, event_type)
    except RuleViolation as e:
        raise ValueError(f"{flag}: {e.message}") from None
    if "\0" in event_type:
        raise ValueError(f"{flag}: must not contain a NUL character")


def read_batches(
    path: str,
    fmt: Format,
    options: ReadOptions,
    keys: KeyDeriver,
    *,
    stdin: BinaryIO | None = None,
) -> Iterator[list[Record]]:
    """Read ``path`` (``"-"`` for stdin) lazily, as lists of at most ``batch_size`` records.

    Problems with the options or opening the file raise :class:`InputError` here; problems
    found while reading (a bad CSV header, a read error) raise it from the iteration. Files
    opened here are closed when the iterator ends or is closed; stdin is left open.
    """
    if fmt not in FORMATS:
        raise InputError(f"{path}: unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    name = STDIN_NAME if path == "-" else path
    if fmt == "ids":
        _check_id_list_options(name, options)
    if path == "-":
        return _batches(
            stdin if stdin is not None else sys.stdin.buffer, False, name, fmt, options, keys
        )
    try:
        stream: BinaryIO = open(path, "rb")  # noqa: SIM115 -- _batches closes it
    except OSError as e:
        raise InputError(f"{path}: cannot open: {e.strerror or e}") from e
    return _batches(stream, True, name, fmt, options, keys)


def event_from_mapping(
    fields: Mapping[str, Any],
    keys: KeyDeriver,
    options: ReadOptions | None = None,
    *,
    source: str = PYTHON_SOURCE,
    line: int = 0,
) -> Record:
    """One record from a dict shaped like a JSONL line, for callers of the Python API.

    The fields and rules are those of a JSONL line, except that ``body`` may be any value
    orjson can encode (dataclasses, datetimes...). Never raises for bad fields: returns an
    :class:`~dispatcher.model.Invalid` instead. Use one ``keys`` for the whole run.
    """
    reader = _Reader(source, options if options is not None else ReadOptions(), keys)
    return reader.from_object(line, fields, None)


def _batches(
    stream: BinaryIO,
    owned: bool,
    name: str,
    fmt: Format,
    options: ReadOptions,
    keys: KeyDeriver,
) -> Iterator[list[Record]]:
    try:
        reader = _Reader(name, options, keys)
        lines = _lines(stream, name, options.max_line_bytes)
        if fmt == "jsonl":
            records = reader.read_jsonl(lines)
        elif fmt == "csv":
            records = reader.read_csv(lines)
        else:
            records = reader.read_ids(lines)
        size = options.batch_size
        while batch := list(islice(records, size)):
            yield batch
    finally:
        if owned:
            stream.close()


def _lines(stream: BinaryIO, name: str, limit: int) -> Iterator[tuple[int, bytes, bool]]:
    """Physical lines as ``(number, bytes, too_long)``.

    A line of ``limit`` bytes or more is read to its end in ``limit``-sized pieces that
    are hashed and dropped; it comes out with ``too_long`` set and a digest of the whole
    line in place of its bytes, which is all its key needs.
    """
    readline = stream.readline
    lineno = 0
    try:
        while raw := readline(limit):
            lineno += 1
            if len(raw) == limit and raw[-1] != 0x0A:
                digest = hashlib.blake2b(raw)
                while piece := readline(limit):
                    digest.update(piece)
                    if piece[-1] == 0x0A:
                        break
                yield lineno, digest.digest(), True
                continue
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            yield lineno, raw, False
    except OSError as e:
        raise InputError(f"{name}: cannot read line {lineno + 1}: {e.strerror or e}") from e


def _strip_eol(raw: bytes) -> bytes:
    """A record's bytes without its line ending, so its raw key does not depend on one."""
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    return raw


def _explicit_id(value: object) -> str | None:
    """A JSON ``id`` field as a key; ``_ABSENT`` gives ``None``."""
    if value is _ABSENT:
        return None
    if type(value) is str:
        if not value:
            raise RuleViolation("id_empty", "id must not be empty")
        return value
    if type(value) is int:  # not bool, which is an int subclass
        return str(value)
    raise RuleViolation(
        "id_type",
        f"id must be a string or an integer, got {_JSON_KINDS.get(type(value), 'an object')}",
    )


def _readable_id(value: object) -> str | None:
    try:
        return _explicit_id(value)
    except RuleViolation:
        return None


def _text(value: object) -> str | None:
    return value if type(value) is str else None


def _encode_body(value: object) -> bytes:
    try:
        # orjson leaves a 4 KiB allocation behind each result; a body lives until its
        # record is sent, so keep an exact-size copy instead (100 ns against 4 KiB).
        return bytes(memoryview(orjson.dumps(value)))
    except orjson.JSONEncodeError as e:
        # orjson writes at most 254 levels although it reads 1024.
        if "ecursion" in str(e):
            raise RuleViolation(
                "too_deep", "body is nested too deeply to encode (over 254 levels)"
            ) from None
        raise RuleViolation("bad_body", f"body cannot be encoded as JSON: {e}") from None


def _mapping_bytes(obj: Mapping[str, Any]) -> bytes:
    """Stable bytes standing for a mapping that has no line, to key it when invalid."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except (orjson.JSONEncodeError, TypeError):
        return repr(sorted(obj.items(), key=repr)).encode(errors="surrogatepass")


def _missing(field: str) -> RuleViolation:
    if field == "workflow":
        return RuleViolation(
            "missing_field", "missing field workflow: give it in the record or with --workflow"
        )
    return RuleViolation("missing_field", f"missing field {field}")


class _Reader:
    """Turns the lines of one input into records; holds what is fixed for the whole input."""

    __slots__ = (
        "_body",
        "_event_type",
        "_extra",
        "_keys",
        "_limit",
        "_name",
        "_strict",
        "_workflow",
    )

    def __init__(self, name: str, options: ReadOptions, keys: KeyDeriver) -> None:
        self._name = name
        self._keys = keys
        self._strict = options.strict_ids
        self._workflow = options.workflow
        self._event_type = options.event_type
        self._body = options.body
        self._limit = options.max_line_bytes
        self._extra = options.extra_fields

    def _event(
        self,
        line: int,
        explicit_id: str | None,
        workflow: object,
        instance_id: object,
        event_type: object,
        body: bytes | None,
    ) -> Event:
        check_path(workflow, instance_id, event_type, strict_ids=self._strict)
        assert isinstance(workflow, str)  # for mypy; check_path raised otherwise
        assert isinstance(instance_id, str)
        assert isinstance(event_type, str)
        # The workflow pattern excludes NUL, strict instance ids too; the rest must be
        # checked, as keys separate these fields with NUL.
        if "\0" in event_type or "\0" in instance_id:
            field = "event_type" if "\0" in event_type else "instance_id"
            raise RuleViolation("nul_byte", f"{field} must not contain a NUL character")
        if body is not None:
            check_body_size(len(body))
        return Event(
            key=self._keys.key_for(explicit_id, workflow, instance_id, event_type, body),
            source=self._name,
            line=line,
            workflow=workflow,
            instance_id=instance_id,
            event_type=event_type,
            body=body,
        )

    def _invalid(
        self,
        line: int,
        raw: bytes,
        rule: str,
        message: str,
        *,
        explicit_id: str | None = None,
        workflow: object = None,
        instance_id: object = None,
        event_type: object = None,
    ) -> Invalid:
        return Invalid(
            key=self._keys.key_for_raw(explicit_id, raw),
            source=self._name,
            line=line,
            rule=rule,
            message=message,
            workflow=_text(workflow),
            instance_id=_text(instance_id),
            event_type=_text(event_type),
        )

    def _too_long(self, line: int, digest: bytes) -> Invalid:
        return self._invalid(
            line,
            b"too_long\0" + digest,
            "line_too_long",
            f"line is longer than {self._limit} bytes; not read",
        )

    # -- JSONL ---------------------------------------------------------------------------

    def read_jsonl(self, lines: Iterable[tuple[int, bytes, bool]]) -> Iterator[Record]:
        loads = orjson.loads
        for line, raw, too_long in lines:
            if too_long:
                yield self._too_long(line, raw)
                continue
            if raw.isspace():
                continue
            if b"\0" in raw:
                yield self._invalid(line, _strip_eol(raw), "nul_byte", "line contains a NUL byte")
                continue
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError as e:
                yield self._bad_json(line, raw, e)
                continue
            if type(obj) is not dict:
                yield self._not_object(line, raw, obj)
                continue
            yield self.from_object(line, obj, raw)

    def from_object(self, line: int, obj: Mapping[str, Any], raw: bytes | None) -> Record:
        """The record for one parsed JSON object; ``raw`` (its line) keys it if invalid."""
        explicit: object = obj.get("id", _ABSENT)
        instance_id = obj.get("instance_id", _ABSENT)
        event_type = obj.get("event_type", _ABSENT)
        workflow = obj.get("workflow", _ABSENT)
        if workflow is _ABSENT:
            workflow = self._workflow
        try:
            explicit_id = _explicit_id(explicit)
            if not self._extra and not _FIELDS.issuperset(obj):
                raise RuleViolation("unknown_field", _unknown_field_message(set(obj) - _FIELDS))
            if instance_id is _ABSENT:
                raise _missing("instance_id")
            if event_type is _ABSENT:
                raise _missing("event_type")
            if workflow is None and "workflow" not in obj:
                raise _missing("workflow")
            body = obj.get("body", _ABSENT)
            return self._event(
                line,
                explicit_id,
                workflow,
                instance_id,
                event_type,
                None if body is _ABSENT else _encode_body(body),
            )
        except RuleViolation as e:
            return self._invalid(
                line,
                _strip_eol(raw) if raw is not None else _mapping_bytes(obj),
                e.rule,
                e.message,
                explicit_id=_readable_id(explicit),
                workflow=workflow,
                instance_id=instance_id,
                event_type=event_type,
            )

    def _bad_json(self, line: int, raw: bytes, error: orjson.JSONDecodeError) -> Invalid:
        raw = _strip_eol(raw)
        try:
            raw.decode()
        except UnicodeDecodeError as e:
            return self._invalid(
                line, raw, "bad_utf8", f"line is not valid UTF-8 at byte {e.start + 1}"
            )
        if "depth" in error.msg:
            return self._invalid(line, raw, "too_deep", "JSON is nested deeper than 1024 levels")
        return self._invalid(
            line, raw, "bad_json", f"line is not valid JSON: {error.msg} at column {error.colno}"
        )

    def _not_object(self, line: int, raw: bytes, value: object) -> Invalid:
        message = f"line is {_JSON_KINDS.get(type(value), 'not an object')}, not a JSON object"
        if type(value) is list:
            message += " (one object a line is expected; `jq -c '.[]'` turns an array into that)"
        return self._invalid(line, _strip_eol(raw), "not_object", message)

    # -- CSV -----------------------------------------------------------------------------

    def read_csv(self, lines: Iterable[tuple[int, bytes, bool]]) -> Iterator[Record]:
        feed = _CsvFeed(lines, self._limit)
        # The default limit (128 Ki characters) is below the API's body limit; the line
        # limit bounds what an unbalanced quote can swallow. It is process-wide state.
        csv.field_size_limit(max(csv.field_size_limit(), self._limit))
        rows = csv.reader(feed, strict=False)
        header = self._csv_header(rows, feed)
        if header is None:
            return
        width = len(header)
        index = {column: i for i, column in enumerate(header)}
        i_instance = index["instance_id"]
        i_event = index["event_type"]
        i_body = index.get("body", -1)
        i_workflow = index.get("workflow", -1)
        i_id = index.get("id", -1)
        while True:
            feed.start_row()
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                yield self._invalid(feed.first, feed.raw(), "bad_csv", f"row is not valid CSV: {e}")
                continue
            if feed.problem is not None:
                rule, message = feed.problem
                yield self._invalid(feed.first, feed.raw(), rule, message)
                continue
            if not row or (len(row) == 1 and (not row[0] or row[0].isspace())):
                continue
            if len(row) != width:
                # Cells may be shifted, so even the id cell is not trusted for the key.
                yield self._invalid(
                    feed.first,
                    feed.raw(),
                    "ragged_row",
                    f"row has {len(row)} cells, the header has {width}",
                )
                continue
            explicit_id = (row[i_id] or None) if i_id >= 0 else None
            workflow = (row[i_workflow] if i_workflow >= 0 else "") or self._workflow
            yield self._csv_record(row, feed, explicit_id, workflow, i_instance, i_event, i_body)

    def _csv_record(
        self,
        row: list[str],
        feed: _CsvFeed,
        explicit_id: str | None,
        workflow: str | None,
        i_instance: int,
        i_event: int,
        i_body: int,
    ) -> Record:
        instance_id = row[i_instance]
        event_type = row[i_event]
        try:
            if not instance_id:
                raise _missing("instance_id")
            if not event_type:
                raise _missing("event_type")
            if workflow is None:
                raise _missing("workflow")
            body = None
            if i_body >= 0 and row[i_body]:
                try:
                    body = _encode_body(orjson.loads(row[i_body]))
                except orjson.JSONDecodeError as e:
                    kind = "too_deep" if "depth" in e.msg else "bad_json"
                    raise RuleViolation(
                        kind, f"body is not valid JSON: {e.msg} at column {e.colno}"
                    ) from None
            return self._event(feed.first, explicit_id, workflow, instance_id, event_type, body)
        except RuleViolation as e:
            return self._invalid(
                feed.first,
                feed.raw(),
                e.rule,
                e.message,
                explicit_id=explicit_id,
                workflow=workflow,
                instance_id=instance_id or None,
                event_type=event_type or None,
            )

    def _csv_header(self, rows: Iterator[list[str]], feed: _CsvFeed) -> list[str] | None:
        while True:
            feed.start_row()
            try:
                row = next(rows)
            except StopIteration:
                return None
            except csv.Error as e:
                raise InputError(
                    f"{self._name}: line {feed.first}: header is not valid CSV: {e}"
                ) from None
            if feed.problem is not None:
                raise InputError(f"{self._name}: line {feed.first}: header: {feed.problem[1]}")
            if row and not (len(row) == 1 and (not row[0] or row[0].isspace())):
                break
        header = [column.strip() for column in row]
        for column in _CSV_REQUIRED:
            if column not in header:
                raise InputError(
                    f"{self._name}: the CSV header has no {column} column"
                    f" (it has: {', '.join(header)})"
                )
        if not self._extra and not _FIELDS.issuperset(header):
            raise InputError(
                f"{self._name}: the CSV header has "
                + _unknown_field_message(set(header) - _FIELDS).replace("field", "column", 1)
            )
        repeated = sorted({column for column in header if header.count(column) > 1})
        if repeated:
            raise InputError(f"{self._name}: the CSV header repeats {', '.join(repeated)}")
        return header

    # -- ids -----------------------------------------------------------------------------

    def read_ids(self, lines: Iterable[tuple[int, bytes, bool]]) -> Iterator[Record]:
        workflow = self._workflow
        event_type = self._event_type
        body = self._body
        for line, raw, too_long in lines:
            if too_long:
                yield self._too_long(line, raw)
                continue
            stripped = raw.strip()
            if not stripped or stripped[0] == 0x23:  # '#'
                continue
            if b"\0" in stripped:
                yield self._invalid(line, stripped, "nul_byte", "line contains a NUL byte")
                continue
            try:
                instance_id = stripped.decode()
            except UnicodeDecodeError as e:
                yield self._invalid(
                    line, stripped, "bad_utf8", f"line is not valid UTF-8 at byte {e.start + 1}"
                )
                continue
            record: Record
            try:
                record = self._event(line, None, workflow, instance_id, event_type, body)
            except RuleViolation as e:
                record = self._invalid(
                    line,
                    stripped,
                    e.rule,
                    e.message,
                    workflow=workflow,
                    instance_id=instance_id,
                    event_type=event_type,
                )
            yield record


class _CsvFeed:
    """The text lines the csv module parses, keeping what each row was made of.

    The csv module pulls lines only as it needs them, so between rows this holds exactly
    the raw lines of the row just parsed, and any problem seen in them. Undecodable bytes
    are replaced for the parser's sake; the row is reported as ``bad_utf8`` anyway.
    """

    __slots__ = ("_limit", "_lines", "_raw", "first", "problem")

    def __init__(self, lines: Iterable[tuple[int, bytes, bool]], limit: int) -> None:
        self._lines = iter(lines)
        self._limit = limit
        self._raw: list[bytes] = []
        self.first = 0
        self.problem: tuple[str, str] | None = None

    def start_row(self) -> None:
        self._raw = []
        self.problem = None

    def raw(self) -> bytes:
        return _strip_eol(b"".join(self._raw))

    def __iter__(self) -> Iterator[str]:
        for line, raw, too_long in self._lines:
            if not self._raw:
                self.first = line
            self._raw.append(raw)
            if too_long:
                if self.problem is None:
                    self.problem = (
                        "line_too_long",
                        f"line {line} is longer than {self._limit} bytes; not read",
                    )
                # Stands in for the dropped line so the parser still sees a line end.
                yield "\n"
                continue
            try:
                text = raw.decode()
            except UnicodeDecodeError as e:
                text = raw.decode(errors="replace")
                if self.problem is None:
                    self.problem = (
                        "bad_utf8",
                        f"line {line} is not valid UTF-8 at byte {e.start + 1}",
                    )
            if self.problem is None and "\0" in text:
                self.problem = ("nul_byte", f"line {line} contains a NUL byte")
            yield text


def read_line_range(
    path: str,
    fmt: Format,
    options: ReadOptions,
    keys: KeyDeriver,
    *,
    offset: int,
    first_line: int,
    count: int,
) -> Iterator[list[Record]]:
    """The records of lines ``first_line .. first_line + count - 1`` of a JSONL or id-list
    file, whose first byte is at ``offset`` (a shard of a ``--job``).

    Lines keep their numbers in the whole file. CSV is not read this way: a quoted cell
    may span lines, so a line range need not hold whole rows. Keys are derived with
    ``keys`` alone, so a repeat of a record from an earlier range gets that record's key.
    """
    if fmt not in ("jsonl", "ids"):
        raise InputError(f"{path}: a line range can be read from JSONL or an id list, not {fmt}")
    if fmt == "ids" and (options.event_type is None or options.workflow is None):
        raise InputError(f"{path}: --workflow and --event-type are required for an id list")
    try:
        stream: BinaryIO = open(path, "rb")  # noqa: SIM115 -- closed below
    except OSError as e:
        raise InputError(f"{path}: cannot open: {e.strerror or e}") from e
    try:
        stream.seek(offset)
        shift = first_line - 1
        lines = (
            (number + shift, raw, too_long)
            for number, raw, too_long in islice(_lines(stream, path, options.max_line_bytes), count)
        )
        reader = _Reader(path, options, keys)
        records = reader.read_jsonl(lines) if fmt == "jsonl" else reader.read_ids(lines)
        size = options.batch_size
        while batch := list(islice(records, size)):
            yield batch
    finally:
        stream.close()


_SCAN_BYTES: Final = 1 << 20


def line_offsets(path: str, every: int) -> Iterator[tuple[int, int, int]]:
    """``(first_line, byte offset, line count)`` of consecutive ranges of ``every`` lines.

    Read in pieces of at most :data:`_SCAN_BYTES`: a line without a newline for gigabytes
    costs no more memory than a short one (its shard's reader then rejects it as too long).
    """
    try:
        stream = open(path, "rb")  # noqa: SIM115 -- closed below
    except OSError as e:
        raise InputError(f"{path}: cannot open: {e.strerror or e}") from e
    with stream:
        line, start, offset, count = 1, 0, 0, 0
        partial = False  # the last piece read ended inside a line
        while piece := stream.readline(_SCAN_BYTES):
            offset += len(piece)
            if not piece.endswith(b"\n"):
                partial = True
                continue
            partial = False
            count += 1
            if count == every:
                yield line, start, count
                line, start, count = line + count, offset, 0
        count += partial
        if count:
            yield line, start, count
