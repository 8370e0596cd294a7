"""Turning a record's fate into its one envelope (pure functions, no I/O)."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from dispatcher.model import Delivery, Envelope, EnvelopeError, ErrorKind, Event, Invalid, Outcome


class _Where(Protocol):
    """What names a record in its envelope (an Event, an Invalid, a journal entry)."""

    @property
    def key(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def line(self) -> int: ...
    @property
    def workflow(self) -> str | None: ...
    @property
    def instance_id(self) -> str | None: ...
    @property
    def event_type(self) -> str | None: ...


def _failed(
    record: _Where,
    *,
    delivery: Delivery,
    kind: ErrorKind,
    message: str,
    attempts: int,
    started_at: datetime | None,
    finished_at: datetime,
    elapsed_s: float = 0.0,
) -> Envelope:
    """An envelope for a record that ended without any answer from the API."""
    return Envelope(
        key=record.key,
        source=record.source,
        line=record.line,
        workflow=record.workflow,
        instance_id=record.instance_id,
        event_type=record.event_type,
        ok=False,
        status=None,
        attempts=attempts,
        delivery=delivery,
        error=EnvelopeError(kind=kind, code=None, message=message),
        started_at=started_at,
        finished_at=finished_at,
        latency_ms=None,
        elapsed_ms=round(elapsed_s * 1000.0, 3),
    )


def delivery_of(outcome: Outcome) -> Delivery:
    """What the last attempt tells of the record's delivery."""
    if outcome.ok:
        return Delivery.CONFIRMED
    if outcome.status is not None:
        return Delivery.REJECTED
    # No answer: if the request may have left, it may have arrived.
    return Delivery.UNKNOWN if outcome.sent else Delivery.NOT_SENT


def for_invalid(record: Invalid, now: datetime) -> Envelope:
    return _failed(
        record,
        delivery=Delivery.NOT_SENT,
        kind=ErrorKind.INVALID,
        # Names file, line and rule, so the message alone says what to fix where.
        message=f"{record.source}:{record.line}: [{record.rule}] {record.message}",
        attempts=0,
        started_at=None,
        finished_at=now,
    )


def for_outcome(
    event: Event,
    outcome: Outcome,
    *,
    attempts: int,
    started_at: datetime,
    finished_at: datetime,
    elapsed_s: float,
    gave_up: ErrorKind | None = None,
) -> Envelope:
    """The envelope after the final attempt.

    ``gave_up`` overrides the error kind when the policy, not the answer, ended the record
    (``rate_limited``: the Retry-After asked was longer than the run allows).
    """
    error = None
    if not outcome.ok:
        kind = gave_up or outcome.error_kind or ErrorKind.HTTP
        error = EnvelopeError(
            kind=kind, code=outcome.cf_code, message=outcome.message or "request failed"
        )
    return Envelope(
        key=event.key,
        source=event.source,
        line=event.line,
        workflow=event.workflow,
        instance_id=event.instance_id,
        event_type=event.event_type,
        ok=outcome.ok,
        status=outcome.status,
        attempts=attempts,
        delivery=delivery_of(outcome),
        error=error,
        started_at=started_at,
        finished_at=finished_at,
        latency_ms=round(outcome.latency_s * 1000.0, 3),
        elapsed_ms=round(elapsed_s * 1000.0, 3),
    )


def for_cut_off(
    event: Event, *, attempts: int, started_at: datetime, now: datetime, elapsed_s: float
) -> Envelope:
    """A record whose request was in flight when the run was stopped hard: it may have
    arrived, so its delivery is ``unknown`` and a re-send is a possible duplicate."""
    return _failed(
        event,
        delivery=Delivery.UNKNOWN,
        kind=ErrorKind.STOPPED,
        message="the run was stopped while this request was in flight; it may have arrived",
        attempts=attempts + 1,
        started_at=started_at,
        finished_at=now,
        elapsed_s=elapsed_s,
    )


def for_crashed(record: _Where, now: datetime) -> Envelope:
    """A record a crashed run had started without its envelope reaching the disk."""
    return _failed(
        record,
        delivery=Delivery.UNKNOWN,
        kind=ErrorKind.STOPPED,
        message="an earlier run crashed after this record's request may have left; "
        "it may have arrived (--resend-unknown sends it again)",
        attempts=1,
        started_at=None,
        finished_at=now,
    )
