"""Envelopes built by hand for tests of the results readers and writers."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from dispatcher.model import Delivery, Envelope


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
