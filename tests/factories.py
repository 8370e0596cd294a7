"""Envelopes and events built by hand for tests."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from dispatcher.model import Delivery, Envelope, Event, Record


def make_envelope(key: str, t0: datetime, **kw: Any) -> Envelope:
    """A confirmed envelope for ``key`` started at ``t0``; ``kw`` overrides any field."""
    base: dict[str, Any] = {
        "key": key,
        "source": "in.jsonl",
        "line": 1,
        "workflow": "wf",
        "instance_id": f"inst-{key}",
        "event_type": "approval",
        "ok": True,
        "status": 200,
        "attempts": 1,
        "delivery": Delivery.CONFIRMED,
        "error": None,
        "started_at": t0,
        "finished_at": t0 + timedelta(milliseconds=15),
        "latency_ms": 12.5,
        "elapsed_ms": 15.25,
    }
    base.update(kw)
    return Envelope(**base)


def make_events(n: int) -> list[Record]:
    """``n`` valid events ``k0..``, to instances ``i0..`` of workflow ``wf``, body ``{}``."""
    return [
        Event(
            key=f"k{i}",
            source="t",
            line=i + 1,
            workflow="wf",
            instance_id=f"i{i}",
            event_type="evt",
            body=b"{}",
        )
        for i in range(n)
    ]


def verify_table(text: str) -> dict[str, int]:
    """The verify summary's rows (class -> records) as the terminal shows them."""
    rows: dict[str, int] = {}
    for row in text.splitlines():
        parts = row.split()
        if len(parts) == 2 and parts[1].isdigit():
            rows[parts[0]] = int(parts[1])
    return rows
