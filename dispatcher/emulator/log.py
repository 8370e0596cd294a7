"""What the emulator received and answered, for tests to assert on and for the stats endpoint.

Nothing here ever holds a credential: entries carry the path, a body hash and the answer.
"""

from __future__ import annotations

import collections
import time
from typing import Any, NamedTuple

from dispatcher.emulator.faults import EventKey, FaultKind

DROPPED = "dropped"  # status_counts key for a connection closed without an answer


class RequestEntry(NamedTuple):
    """One request answered (or dropped). ``t`` is ``time.monotonic()`` when it arrived;
    ``status`` is ``None`` for a dropped connection; ``code`` is the Cloudflare error code
    answered, if any. Path fields are ``None`` when the path did not parse."""

    t: float
    status: int | None
    workflow: str | None
    instance_id: str | None
    event_type: str | None
    body_sha256: str | None
    code: int | None = None


class EmulatorLog:
    """Live record of the emulator's traffic.

    ``accepted`` maps (workflow, instance_id, event_type, body sha256 or None) to the times
    a success was answered for it: more than one time means the client delivered a
    duplicate. ``requests`` keeps every request unless the emulator was configured with
    ``keep_requests=False``.
    """

    __slots__ = (
        "accepted",
        "creations",
        "faults",
        "keep_requests",
        "requests",
        "started",
        "status_counts",
    )

    def __init__(self, *, keep_requests: bool = True) -> None:
        self.keep_requests = keep_requests
        self.accepted: dict[EventKey, list[float]] = {}
        self.requests: list[RequestEntry] = []
        self.status_counts: collections.Counter[int | str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        # (workflow, instance_id) -> instances created with that id (instance mode)
        self.creations: dict[tuple[str, str], int] = {}
        self.started = time.monotonic()

    def record(self, entry: RequestEntry) -> None:
        self.status_counts[DROPPED if entry.status is None else entry.status] += 1
        if self.keep_requests:
            self.requests.append(entry)

    def accept(self, event: EventKey, t: float) -> None:
        times = self.accepted.get(event)
        if times is None:
            self.accepted[event] = [t]
        else:
            times.append(t)

    def fault(self, kind: FaultKind) -> None:
        self.faults[kind.value] += 1

    def total_accepted(self) -> int:
        """Successes answered, duplicates included."""
        return sum(len(times) for times in self.accepted.values())

    def duplicates(self) -> dict[EventKey, int]:
        """Events accepted more than once, with how many times."""
        return {key: len(times) for key, times in self.accepted.items() if len(times) > 1}

    def total_requests(self) -> int:
        return sum(self.status_counts.values())

    def clear(self) -> None:
        self.accepted.clear()
        self.requests.clear()
        self.status_counts.clear()
        self.faults.clear()
        self.creations.clear()
        self.started = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able summary; what ``GET /__emulator/stats`` serves."""
        duplicates = self.duplicates()
        total = self.total_accepted()
        return {
            "requests": self.total_requests(),
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items(), key=str)},
            "accepted": {
                "total": total,
                "unique": len(self.accepted),
                "duplicate_events": len(duplicates),
                "duplicate_deliveries": total - len(self.accepted),
            },
            "faults": dict(sorted(self.faults.items())),
            "created": {
                "total": sum(self.creations.values()),
                "unique": len(self.creations),
                "duplicate_ids": sum(1 for n in self.creations.values() if n > 1),
            },
            "rate_limited": self.status_counts.get(429, 0),
            "dropped": self.status_counts.get(DROPPED, 0),
            "uptime_s": round(time.monotonic() - self.started, 3),
        }
