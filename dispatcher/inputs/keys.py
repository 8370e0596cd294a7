"""Record keys: the names resume uses to match records across runs.

A record with an explicit ``id`` is keyed by it, verbatim. Any other record gets a key
derived from its content, so it keeps its key when the input is reordered, split or
merged::

    blake2b(workflow \\0 instance_id \\0 event_type \\0 ("-" | "=" body), digest_size=10)

as 20 hex digits. ``-`` marks an absent body and ``=`` precedes a present one, so "no
body" and a body of ``null`` differ. The three path fields must not contain NUL (the
readers reject such records), which keeps the encoding unambiguous. A record that could
not be read (an :class:`~dispatcher.model.Invalid` without a readable ``id``) is keyed
``"raw-"`` + the same kind of hash of its raw line bytes. The two hashes use different
blake2b personalisations, so a raw line can never pass for a record's content.

Identical records in one run each keep their own key: the n-th repeat (n >= 1) of the
same content gets the suffix ``#n``. The same multiset of records therefore always gets
the same multiset of keys, whatever the order. An invalid line whose ``id`` repeats an
earlier one is keyed ``<id>#n`` (so that it has an envelope of its own).

**The derived namespace.** Derived keys must never equal an explicit ``id``, or one
record's envelope would stand for another's (ids ``k``, ``k``, ``k#2``: the invalid second
line was keyed ``k#2``, the third line too, and after a resume ``report`` counted the
never-sent line as confirmed). So an explicit ``id`` that could be a derived key is
refused (rule ``id_reserved``, the line is not sent, keyed by its raw bytes instead):
one that ends in ``#`` and digits, 20 lowercase hex digits, or ``raw-`` and 20 hex
digits (:func:`is_derived`). Every derived key is of one of those forms and no explicit
key is, so the two sets are disjoint; among derived keys, content hashes, raw-line
hashes and ``<id>#n`` differ by form (an explicit id is never 20 hex digits and never
ends in ``#n`` itself), so they cannot collide either but by a hash collision. The
forms are the ones earlier versions wrote, so results files of earlier runs resume with
the same keys; only a line whose explicit id is in the namespace is now refused (its
old envelope stays in the file, under that id).

Counting repeats must not cost a Python object per record (a ``set`` of 1 M str keys is
about 80 MB), so :class:`FingerprintTable` keeps a 64-bit fingerprint of each derived key
in open-addressing ``array('Q')`` shards held at most three quarters full, each growing
by half when it fills (11 to 16 bytes per record, no peak worth the name), and a small
dict only for fingerprints seen more than once. Past 131,072 distinct derived keys
(about 2 MB), :class:`RepeatCounter` moves them to a private SQLite file in a temporary
folder with a 2 MB page cache, so memory stays flat however long the input: measured
through a no-op transport, peak RSS 44.5 MB at 100 k records and 50.6 MB at 1 M. In
memory an insert takes about 1 to 3 us; on disk about 13 us, in the reader's thread.
Records with an explicit ``id`` cost nothing.

Two different contents whose 64-bit fingerprints collide (odds about n**2 / 2**65, 3e-6
for 10 M records) make the later one look like a repeat: its key gets a spurious ``#1``,
still distinct from every other key, but the two keys may swap if the input is reordered.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import struct
import tempfile
import weakref
from array import array
from collections.abc import Iterator
from typing import Any, Final

from dispatcher.inputs.validation import RuleViolation

__all__ = ["FingerprintTable", "KeyDeriver", "RepeatCounter", "is_derived"]

_DIGEST_SIZE: Final = 10
# Every form a derived key takes: a repeat's "#n" suffix, a content hash, a raw-line hash.
_DERIVED: Final = re.compile(r".*#[0-9]+|(?:raw-)?[0-9a-f]{20}", re.DOTALL)


def is_derived(key: str) -> bool:
    """Whether ``key`` is in the derived namespace, which no explicit ``id`` may enter."""
    return _DERIVED.fullmatch(key) is not None


def _reserved(explicit_id: str) -> RuleViolation:
    shown = explicit_id if len(explicit_id) <= 60 else explicit_id[:59] + "…"
    return RuleViolation(
        "id_reserved",
        f"id {shown!r} has the form of a key dispatcher derives (ending in '#' and digits, "
        "or 20 hex digits, optionally after 'raw-'), so it could be another record's key; "
        "choose another id (this line is not sent)",
    )


# Distinct personalisations keep content hashes and raw-line hashes from ever being the
# same hash of the same bytes, so their repeat counts cannot mix.
_CONTENT_HASH: Final = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"dispatcher.rec")
_RAW_HASH: Final = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"dispatcher.raw")
_ID_HASH: Final = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"dispatcher.id")
_FINGERPRINT: Final = struct.Struct("<Q").unpack_from
_INITIAL_SLOTS: Final = 1 << 12
# Distinct derived keys counted in memory (about 13 bytes each) before moving to disk.
DEFAULT_SPILL_AT: Final = 1 << 17


def _zeros(size: int) -> array[int]:
    # Repeating a one-item array allocates once; array("Q", bytes(8 * size)) would first
    # build a bytes object as big as the array.
    return array("Q", [0]) * size


_SHARD_BITS: Final = 8
_SHARDS: Final = 1 << _SHARD_BITS
_SHARD_SHIFT: Final = 64 - _SHARD_BITS


class FingerprintTable:
    """A set of nonzero 64-bit fingerprints that counts how often each was added.

    Linear probing over ``array('Q')``, 0 marking an empty slot; the fingerprints come
    from a cryptographic hash, so their bits are already uniform. The table is split by
    the top 8 bits into 256 shards that grow one at a time, by half, at three quarters
    full: a growth holds one 256th of the table twice, never the whole table, and the
    slots cost 11 to 16 bytes per record (linear probing stays short at that load: about
    8 probes for a new fingerprint at the fullest, 2 to 3 on average).
    """

    __slots__ = ("_distinct", "_limits", "_repeats", "_shards", "_used")

    def __init__(self, initial_slots: int = _INITIAL_SLOTS) -> None:
        if initial_slots < 2 or initial_slots & (initial_slots - 1):
            raise ValueError(f"initial_slots must be a power of two >= 2, got {initial_slots}")
        per_shard = max(4, initial_slots // _SHARDS)
        self._shards = [_zeros(per_shard) for _ in range(_SHARDS)]
        self._limits = [per_shard * 3 // 4] * _SHARDS
        self._used = [0] * _SHARDS
        self._distinct = 0  # sum(self._used), kept: len() runs once per new record
        self._repeats: dict[int, int] = {}

    def add(self, fingerprint: int) -> int:
        """Record one more sighting; return how many times it was seen before (0 = new)."""
        fingerprint = fingerprint or 1  # 0 marks an empty slot
        shard = fingerprint >> _SHARD_SHIFT
        slots = self._shards[shard]
        size = len(slots)
        i = fingerprint % size
        found = slots[i]
        while found:
            if found == fingerprint:
                count = self._repeats.get(fingerprint, 0) + 1
                self._repeats[fingerprint] = count
                return count
            i += 1
            if i == size:
                i = 0
            found = slots[i]
        slots[i] = fingerprint
        self._distinct += 1
        used = self._used[shard] = self._used[shard] + 1
        if used > self._limits[shard]:
            self._grow(shard)
        return 0

    def _grow(self, shard: int) -> None:
        old = self._shards[shard]
        size = len(old) * 3 // 2
        slots = _zeros(size)
        for fingerprint in filter(None, old):
            i = fingerprint % size
            while slots[i]:
                i = i + 1 if i + 1 < size else 0
            slots[i] = fingerprint
        self._shards[shard] = slots
        self._limits[shard] = size * 3 // 4

    def __len__(self) -> int:
        """Distinct fingerprints held."""
        return self._distinct

    def items(self) -> Iterator[tuple[int, int]]:
        """``(fingerprint as a signed 64-bit int, times seen before the first)`` pairs."""
        repeats = self._repeats
        for slots in self._shards:
            for fingerprint in filter(None, slots):
                yield _signed(fingerprint), repeats.get(fingerprint, 0)

    @property
    def nbytes(self) -> int:
        """Memory held by the slot arrays (the repeat dict is extra, and usually tiny)."""
        return sum(len(slots) for slots in self._shards) * 8


class RepeatCounter:
    """Counts sightings of fingerprints in memory, then on disk: flat memory at any size.

    Up to ``spill_at`` distinct fingerprints live in a :class:`FingerprintTable` (about
    2 MB at the default). Past that, they move to a private SQLite file in a temporary
    folder (rowid B-tree, 2 MB page cache, no journal): memory stays flat however long the
    input, at a cost of a few microseconds per record in the reader's thread. The file is
    deleted by :meth:`close`, or when the counter is collected.
    """

    __slots__ = ("__weakref__", "_cleanup", "_db", "_spill_at", "_table")

    def __init__(self, spill_at: int = DEFAULT_SPILL_AT) -> None:
        if spill_at < 1:
            raise ValueError(f"spill_at must be at least 1, got {spill_at}")
        self._table: FingerprintTable | None = FingerprintTable()
        self._spill_at = spill_at
        self._db: sqlite3.Connection | None = None
        self._cleanup: weakref.finalize[Any, RepeatCounter] | None = None

    def add(self, fingerprint: int) -> int:
        """One more sighting; how many times it was seen before (0 = new)."""
        table = self._table
        if table is not None:
            repeat = table.add(fingerprint)
            if not repeat and len(table) >= self._spill_at:
                self._spill(table)
            return repeat
        assert self._db is not None
        row = self._db.execute(_UPSERT, (_signed(fingerprint or 1),)).fetchone()
        return int(row[0])

    def _spill(self, table: FingerprintTable) -> None:
        folder = tempfile.mkdtemp(prefix="dispatcher-keys-")
        db = sqlite3.connect(
            os.path.join(folder, "keys.sqlite"), isolation_level=None, check_same_thread=False
        )
        self._cleanup = weakref.finalize(self, _remove_db, db, folder)
        # A scratch index: if the process dies, it is rebuilt from the input next time.
        for pragma in (
            "journal_mode=OFF",
            "synchronous=OFF",
            "locking_mode=EXCLUSIVE",
            "cache_size=-2048",
        ):
            db.execute(f"PRAGMA {pragma}")
        db.execute("CREATE TABLE fp (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        # One transaction for the rest of the run, never committed: nothing here needs to
        # outlive the process, and a commit per record would cost more than the record.
        db.execute("BEGIN")
        db.executemany("INSERT INTO fp VALUES (?, ?)", table.items())
        self._db = db
        self._table = None

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()

    def __len__(self) -> int:
        if self._table is not None:
            return len(self._table)
        assert self._db is not None
        return int(self._db.execute("SELECT count(*) FROM fp").fetchone()[0])

    @property
    def nbytes(self) -> int:
        """Memory held for counting: the table's slots, or SQLite's page cache."""
        return self._table.nbytes if self._table is not None else 2048 * 1024

    @property
    def spilled(self) -> bool:
        return self._table is None


_UPSERT: Final = (
    "INSERT INTO fp (id, n) VALUES (?, 0) ON CONFLICT (id) DO UPDATE SET n = n + 1 RETURNING n"
)


def _signed(fingerprint: int) -> int:
    # SQLite integers are signed 64-bit.
    return fingerprint - (1 << 64) if fingerprint >= 1 << 63 else fingerprint


def _remove_db(db: sqlite3.Connection, folder: str) -> None:
    db.close()
    shutil.rmtree(folder, ignore_errors=True)


class KeyDeriver:
    """Gives every record of a run its key; one per run, shared by all its inputs.

    Not thread-safe: a run reads its inputs one after another.
    """

    __slots__ = ("_table",)

    def __init__(self, spill_at: int | None = None) -> None:
        self._table = RepeatCounter() if spill_at is None else RepeatCounter(spill_at)

    def close(self) -> None:
        """Delete the on-disk part of the repeat counts, if the run grew one."""
        self._table.close()

    def key_for(
        self,
        explicit_id: str | None,
        workflow: str,
        instance_id: str,
        event_type: str,
        body: bytes | None,
    ) -> str:
        """The key of a valid record: its explicit id, else derived from its content.

        An explicit id seen before in the run raises :class:`RuleViolation`
        (``duplicate_id``): two records under one key would share one envelope, and
        ``--resume`` would take the second for done once the first was. An explicit id in
        the derived namespace (:func:`is_derived`) raises ``id_reserved``.
        """
        if explicit_id is not None:
            if _DERIVED.fullmatch(explicit_id) is not None:
                raise _reserved(explicit_id)
            repeat = self._id_sighting(explicit_id)
            if repeat:
                raise RuleViolation(
                    "duplicate_id",
                    f"id {explicit_id!r} is already the id of an earlier record; ids must be "
                    "unique (this line is not sent)",
                )
            return explicit_id
        h = _CONTENT_HASH.copy()
        if body is None:
            h.update(f"{workflow}\0{instance_id}\0{event_type}\0-".encode())
        else:
            h.update(f"{workflow}\0{instance_id}\0{event_type}\0=".encode())
            h.update(body)
        digest = h.digest()
        # Inlined _counted: this runs once per record.
        repeat = self._table.add(_FINGERPRINT(digest)[0])
        if repeat:
            return f"{digest.hex()}#{repeat}"
        return digest.hex()

    def key_for_raw(self, explicit_id: str | None, raw: bytes) -> str:
        """The key of an unreadable record: its explicit id if readable (with ``#N`` once
        that id was seen before, so that no two records share a key), else its raw bytes'.
        An id in the derived namespace is not used: the raw bytes key the line."""
        if explicit_id is not None and _DERIVED.fullmatch(explicit_id) is None:
            repeat = self._id_sighting(explicit_id)
            return f"{explicit_id}#{repeat}" if repeat else explicit_id
        h = _RAW_HASH.copy()
        h.update(raw)
        return self._counted("raw-", h.digest())

    def _id_sighting(self, explicit_id: str) -> int:
        h = _ID_HASH.copy()
        h.update(explicit_id.encode("utf-8", "surrogatepass"))
        return self._table.add(_FINGERPRINT(h.digest())[0])

    def _counted(self, prefix: str, digest: bytes) -> str:
        repeat = self._table.add(_FINGERPRINT(digest)[0])
        if repeat:
            return f"{prefix}{digest.hex()}#{repeat}"
        return prefix + digest.hex()

    @property
    def table(self) -> RepeatCounter:
        """The repeat counts, for memory accounting."""
        return self._table
