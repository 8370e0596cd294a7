"""The ledger: each record key's final fate, read back from results for resume and reports.

Results are JSONL (append-only: a key may have several lines, one per run that reached
it, and the LAST line wins) or SQLite (one row per key, upserted; see
:mod:`dispatcher.results.sqlite_sink`), chosen by the path's extension as the sinks choose.

A JSONL file is read as a crash may have left it: the writer appends whole lines, so
only the last line can be torn (a partial line with no trailing newline). That one is
skipped and reported; :func:`repair_jsonl_tail` cuts it off before a run appends again.
An unparsable line anywhere else means the file is corrupted or is not results at all,
and resuming from it could re-send or skip records: :class:`LedgerError`, naming the line.

Memory: :func:`load_ledger` keeps one dict entry per key and nothing per line. The
values are :class:`KeyState` instances interned per (delivery, ok, error kind), of which
there are a few dozen at most, so 1 M keys cost their key strings plus the dict's slots.
"""

from __future__ import annotations

import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Final

import orjson

from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind, UserError
from dispatcher.results.sqlite_sink import (
    SqliteSinkError,
    is_sqlite_path,
    iter_envelopes,
    open_results,
)

__all__ = [
    "KeyState",
    "LedgerError",
    "TornTail",
    "TornTailWarning",
    "ceiling_path",
    "envelope_from_json",
    "finished_times",
    "load_ceiling",
    "load_ledger",
    "read_envelopes",
    "repair_jsonl_tail",
    "save_ceiling",
]

_READ_BUFFER: Final = 1 << 20
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
# No envelope line comes near this; a "last line" longer than it is not a torn envelope
# but some other file, and repair must not cut (or read into memory) a chunk of it.
_MAX_TAIL: Final = 16 * 1024 * 1024
_TAIL_CHUNK: Final = 64 * 1024


class LedgerError(UserError):
    """Results that cannot be trusted for resume: corrupted, or not dispatcher results.

    ``line`` is the 1-based line of a JSONL file where reading stopped, when there is one.
    """

    def __init__(self, message: str, *, path: str, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class KeyState:
    """The essentials of a key's final envelope: what resume and reports decide on."""

    delivery: Delivery
    ok: bool
    error_kind: ErrorKind | None


@dataclass(frozen=True, slots=True)
class TornTail:
    """A partial last line of a JSONL file, skipped when read (a crash mid-write)."""

    path: str
    line: int
    size: int  # bytes in the partial line


class TornTailWarning(UserWarning):
    """Issued for a :class:`TornTail` when the reader gave no ``on_torn`` callback."""


OnTorn = Callable[[TornTail], None]

# Interned states, keyed by the raw values as read (str, bool, str | None): a hit costs one
# tuple and one dict lookup, and every key with the same fate shares one KeyState.
_STATES: dict[tuple[str, bool, str | None], KeyState] = {}


def _key_state(delivery: Any, ok: Any, kind: Any) -> KeyState:
    # `ok` must be a real bool: 1 == True would otherwise hit the cache as True.
    if ok is not True and ok is not False:
        raise ValueError(f"ok must be true or false, not {ok!r}")
    try:
        return _STATES[delivery, ok, kind]
    except KeyError:
        pass
    except TypeError:  # an unhashable value (a list...) where a string belongs
        raise ValueError(f"bad delivery {delivery!r} or error kind {kind!r}") from None
    if not isinstance(delivery, str) or not (kind is None or isinstance(kind, str)):
        raise ValueError(f"bad delivery {delivery!r} or error kind {kind!r}")
    state = KeyState(
        delivery=Delivery(delivery),
        ok=ok,
        error_kind=None if kind is None else ErrorKind(kind),
    )
    return _STATES.setdefault((delivery, ok, kind), state)


def _warn_torn(torn: TornTail) -> None:
    warnings.warn(
        TornTailWarning(
            f"{torn.path}:{torn.line}: skipped a partial last line ({torn.size} bytes, "
            "no newline): the run writing it was cut off mid-write"
        ),
        # Point at the caller: past _warn_torn, _scan, _load/_read_jsonl, the public function.
        stacklevel=5,
    )


def _corrupt(path: str, line: int, why: str) -> LedgerError:
    return LedgerError(
        f"{path}:{line}: {why}; the results file is corrupted or not dispatcher results",
        path=path,
        line=line,
    )


def _not_jsonl(path: str) -> LedgerError:
    return LedgerError(
        f"{path} is an SQLite database: name it .sqlite, .sqlite3 or .db to read it as one",
        path=path,
        line=1,
    )


def _scan(
    f: BinaryIO, path: str, on_torn: OnTorn | None
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line number, byte offset after the line, parsed object) for every envelope line.

    Blank lines are skipped; a torn last line is reported and skipped; an unparsable line
    with a newline after it raises :class:`LedgerError`.
    """
    offset = 0
    for lineno, raw in enumerate(f, 1):
        offset += len(raw)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if not raw.strip():
                continue
            if lineno == 1 and raw.startswith(_SQLITE_MAGIC):
                raise _not_jsonl(path) from None
            if raw.endswith(b"\n"):
                raise _corrupt(path, lineno, f"not JSON ({exc})") from None
            (on_torn or _warn_torn)(TornTail(path=path, line=lineno, size=len(raw)))
            return
        if type(obj) is not dict:
            raise _corrupt(path, lineno, f"a JSON {type(obj).__name__}, not an envelope object")
        yield lineno, offset, obj


def _ledger_entry(obj: dict[str, Any]) -> tuple[str, KeyState]:
    key = obj["key"]
    if type(key) is not str:
        raise ValueError(f"key must be a string, not {key!r}")
    err = obj["error"]
    kind = None if err is None else err["kind"]
    return key, _key_state(obj["delivery"], obj["ok"], kind)


def _load_jsonl(path: str, on_torn: OnTorn | None) -> dict[str, KeyState]:
    ledger: dict[str, KeyState] = {}
    try:
        f = open(path, "rb", buffering=_READ_BUFFER)  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return ledger
    with f:
        for lineno, _, obj in _scan(f, path, on_torn):
            try:
                key, state = _ledger_entry(obj)
            except (KeyError, TypeError, ValueError) as exc:
                raise _corrupt(path, lineno, _why(exc)) from None
            ledger[key] = state
    return ledger


def _why(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no {exc.args[0]!r} field"
    return str(exc)


def _load_sqlite(path: str) -> dict[str, KeyState]:
    try:
        conn = open_results(path)
    except FileNotFoundError:
        return {}
    except SqliteSinkError as exc:
        raise LedgerError(str(exc), path=path) from exc
    ledger: dict[str, KeyState] = {}
    if conn is None:
        return ledger
    try:
        cursor = conn.execute("SELECT key, delivery, ok, error_kind FROM envelopes")
        while rows := cursor.fetchmany(10_000):
            for key, delivery, ok, kind in rows:
                try:
                    ledger[key] = _key_state(delivery, ok == 1 if ok in (0, 1) else ok, kind)
                except ValueError as exc:
                    raise LedgerError(f"{path}: key {key!r}: {exc}", path=path) from None
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: cannot read results: {exc}", path=path) from exc
    finally:
        conn.close()
    return ledger


def load_ledger(path: str, *, on_torn: OnTorn | None = None) -> dict[str, KeyState]:
    """Each key's final state in a results file; an empty dict if the file does not exist.

    JSONL or SQLite by extension (``.sqlite``, ``.sqlite3``, ``.db``). In JSONL the last
    line for a key wins. A torn last line is skipped and passed to ``on_torn`` (default: a
    :class:`TornTailWarning`). Raises :class:`LedgerError` for anything else unreadable.
    """
    if is_sqlite_path(path):
        return _load_sqlite(path)
    return _load_jsonl(path, on_torn)


def finished_times(path: str, keys: set[str]) -> dict[str, datetime]:
    """When the final envelope of each of ``keys`` that has one was finished.

    Resume asks this of the few keys a crashed run's journal names: an envelope finished
    after that run started is that run's own word on the record, and settles it.
    """
    times: dict[str, datetime] = {}
    if not keys:
        return times
    if is_sqlite_path(path):
        try:
            conn = open_results(path)
        except FileNotFoundError:
            return times
        except SqliteSinkError as exc:
            raise LedgerError(str(exc), path=path) from exc
        if conn is None:
            return times
        try:
            wanted = list(keys)
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                query = f"SELECT key, finished_at FROM envelopes WHERE key IN ({marks})"
                for key, finished in conn.execute(query, chunk):
                    times[key] = datetime.fromisoformat(finished)
        except (sqlite3.DatabaseError, ValueError) as exc:
            raise LedgerError(f"{path}: cannot read results: {exc}", path=path) from exc
        finally:
            conn.close()
        return times
    try:
        f = open(path, "rb", buffering=_READ_BUFFER)  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return times
    with f:
        for lineno, _, obj in _scan(f, path, lambda torn: None):
            key = obj.get("key")
            if type(key) is str and key in keys:
                try:
                    times[key] = _time(obj, "finished_at")
                except (KeyError, TypeError, ValueError) as exc:
                    raise _corrupt(path, lineno, _why(exc)) from None
    return times


def _str(obj: dict[str, Any], name: str) -> str:
    value = obj[name]
    if type(value) is not str:
        raise TypeError(f"{name} must be a string, not {value!r}")
    return value


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj[name]
    return None if value is None else _str(obj, name)


def _int(obj: dict[str, Any], name: str) -> int:
    value = obj[name]
    if type(value) is not int:
        raise TypeError(f"{name} must be an integer, not {value!r}")
    return value


def _opt_int(obj: dict[str, Any], name: str) -> int | None:
    value = obj[name]
    return None if value is None else _int(obj, name)


def _float(obj: dict[str, Any], name: str) -> float:
    value = obj[name]
    # orjson reads 20.0 back as a float, but a hand-edited 20 is still a number of ms.
    if type(value) is float or type(value) is int:
        return float(value)
    raise TypeError(f"{name} must be a number, not {value!r}")


def _opt_float(obj: dict[str, Any], name: str) -> float | None:
    value = obj[name]
    return None if value is None else _float(obj, name)


def _time(obj: dict[str, Any], name: str) -> datetime:
    return datetime.fromisoformat(_str(obj, name))


def envelope_from_json(obj: dict[str, Any]) -> Envelope:
    """Rebuild an :class:`Envelope` from its JSONL object (enums and datetimes parsed).

    Raises ``KeyError`` for a missing field, ``TypeError``/``ValueError`` for a bad value.
    """
    err = obj["error"]
    error = None
    if err is not None:
        if type(err) is not dict:
            raise TypeError(f"error must be an object or null, not {err!r}")
        error = EnvelopeError(
            kind=ErrorKind(err["kind"]), code=_opt_int(err, "code"), message=_str(err, "message")
        )
    ok = obj["ok"]
    if ok is not True and ok is not False:
        raise TypeError(f"ok must be true or false, not {ok!r}")
    return Envelope(
        key=_str(obj, "key"),
        source=_str(obj, "source"),
        line=_int(obj, "line"),
        workflow=_opt_str(obj, "workflow"),
        instance_id=_opt_str(obj, "instance_id"),
        event_type=_opt_str(obj, "event_type"),
        ok=ok,
        status=_opt_int(obj, "status"),
        attempts=_int(obj, "attempts"),
        delivery=Delivery(obj["delivery"]),
        error=error,
        started_at=None if obj["started_at"] is None else _time(obj, "started_at"),
        finished_at=_time(obj, "finished_at"),
        latency_ms=_opt_float(obj, "latency_ms"),
        elapsed_ms=_float(obj, "elapsed_ms"),
        # Added later: results written before them still load.
        waited_ms=_float(obj, "waited_ms") if "waited_ms" in obj else 0.0,
        statuses=_counts(obj["statuses"]) if "statuses" in obj else {},
    )


def _counts(value: Any) -> dict[str, int]:
    if type(value) is not dict or not all(type(v) is int for v in value.values()):
        raise TypeError(f"statuses must be an object of counts, not {value!r}")
    return value


def _read_jsonl(path: str, on_torn: OnTorn | None) -> Iterator[Envelope]:
    # Two passes, so memory stays at one int per key rather than one Envelope per key:
    # the first finds each key's last line, the second rebuilds only those lines.
    try:
        f = open(path, "rb", buffering=_READ_BUFFER)  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    with f:
        last: dict[str, int] = {}
        lines = end = 0
        for lineno, offset, obj in _scan(f, path, on_torn):
            key = obj.get("key")
            if type(key) is not str:
                raise _corrupt(path, lineno, f"key must be a string, not {key!r}")
            last[key] = lineno
            lines, end = lineno, offset
        final = bytearray(lines + 1)
        for lineno in last.values():
            final[lineno] = 1
        del last
        # Stop at the first pass's end: a run may be appending to the file meanwhile.
        f.seek(0)
        offset = 0
        for lineno, raw in enumerate(f, 1):
            if offset >= end:
                break
            offset += len(raw)
            if not final[lineno]:
                continue
            try:
                yield envelope_from_json(orjson.loads(raw))
            except (KeyError, TypeError, ValueError) as exc:
                raise _corrupt(path, lineno, _why(exc)) from None


def read_envelopes(path: str, *, on_torn: OnTorn | None = None) -> Iterator[Envelope]:
    """Every key's final envelope, once per key, for reports; nothing if no file.

    JSONL (last line per key wins; envelopes come in the order of those last lines) or
    SQLite (in the order keys were first written) by extension. Raises
    :class:`LedgerError` as :func:`load_ledger` does, possibly after yielding some.
    """
    if not is_sqlite_path(path):
        yield from _read_jsonl(path, on_torn)
        return
    if not os.path.exists(path):
        return
    try:
        yield from iter_envelopes(path)
    except FileNotFoundError:
        return
    except SqliteSinkError as exc:
        raise LedgerError(str(exc), path=path) from exc


def repair_jsonl_tail(path: str) -> bool:
    """Make a JSONL results file safe to append to after a crash; True if it cut a line.

    A torn last line (no trailing newline, unparsable) is truncated away, so the next run's
    first line does not fuse with it into a corrupt middle line. A complete last line that
    only lacks its newline gets one (nothing is cut: False). A missing file is fine (False).
    """
    try:
        f = open(path, "r+b")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return False
    with f:
        if f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC:
            raise _not_jsonl(path)
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        # Read backwards to the last newline: the tail is small, the file may be huge.
        tail = b""
        start = pos = size
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                tail = chunk[cut + 1 :] + tail
                start = pos + cut + 1
                break
            tail = chunk + tail
            start = pos
            if len(tail) > _MAX_TAIL:
                raise LedgerError(
                    f"{path}: last line is over {_MAX_TAIL} bytes with no newline: "
                    "not a torn envelope, refusing to cut it",
                    path=path,
                )
        if not tail:
            return False
        try:
            orjson.loads(tail)
        except orjson.JSONDecodeError:
            f.truncate(start)
            complete = False
        else:
            f.seek(size)
            f.write(b"\n")
            complete = True
        f.flush()
        os.fsync(f.fileno())
        return not complete


# --- the rate ceiling `--rate auto` found, remembered beside the results -----------------


def ceiling_path(results: str) -> str | None:
    """Where the ceilings found by ``--rate auto`` are kept: beside the results file."""
    return None if results == "-" else f"{results}.ceiling.json"


def _ceiling_key(base_url: str, account_id: str | None) -> str:
    return f"{base_url.rstrip('/')} {account_id or '-'}"


def _read_ceilings(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return {}  # only a hint for the next run: a missing or damaged file means "search"
    return data if type(data) is dict else {}


def load_ceiling(results: str, base_url: str, account_id: str | None) -> float | None:
    """The rate (requests/s) an earlier ``--rate auto`` run found for this endpoint and
    account, or ``None``."""
    path = ceiling_path(results)
    if path is None:
        return None
    entry = _read_ceilings(path).get(_ceiling_key(base_url, account_id))
    rate = entry.get("rate") if type(entry) is dict else None
    if isinstance(rate, int | float) and not isinstance(rate, bool) and 0 < rate < float("inf"):
        return float(rate)
    return None


def save_ceiling(
    results: str, base_url: str, account_id: str | None, rate: float, at: datetime
) -> None:
    """Remember ``rate`` for this endpoint and account (atomically: write, then rename)."""
    path = ceiling_path(results)
    if path is None:
        return
    data = _read_ceilings(path)
    data[_ceiling_key(base_url, account_id)] = {"rate": round(rate, 3), "at": at.isoformat()}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        os.replace(tmp, path)
    except OSError:
        pass  # a hint lost costs the next run a search, not a record
