"""The values that flow between the pieces: records in, attempt outcomes, envelopes out.

Nothing here knows about HTTP libraries, files or time; every piece imports from here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(kw_only_default=True, field_specifiers=(field,), frozen_default=True)
def _value(cls: type[_T]) -> type[_T]:
    """A value class: immutable to the type checker, cheap to build at run time.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, which
    costs about five times a plain assignment (3.5 against 0.7 us for an :class:`Outcome`
    on CPython 3.11), and the send path builds an :class:`Event`, an :class:`Outcome` and an
    :class:`Envelope` per record. So the run-time class is a plain slotted dataclass; mypy
    (through ``dataclass_transform``'s ``frozen_default``) still refuses any assignment to
    a field, and ``unsafe_hash`` keeps equality and hashing as frozen ones have them.
    """
    make: Callable[[type[_T]], type[_T]] = dataclass(slots=True, kw_only=True, unsafe_hash=True)
    return make(cls)


@_value
class Event:
    """One valid record, ready to send.

    ``body`` is the payload already encoded as JSON (by orjson, once, when read);
    ``None`` means the request carries no body at all.
    """

    key: str
    source: str
    line: int
    workflow: str
    instance_id: str
    event_type: str
    body: bytes | None


@_value
class Invalid:
    """A line that could not become an :class:`Event`; it gets an error envelope, unsent.

    ``rule`` is a short stable name (``bad_json``, ``missing_field``, ``instance_id_pattern``,
    ``body_too_large``...); ``message`` is for people and names the field and the rule.
    The path fields hold whatever could be read from the line, else ``None``.
    """

    key: str
    source: str
    line: int
    rule: str
    message: str
    workflow: str | None = None
    instance_id: str | None = None
    event_type: str | None = None


Record = Event | Invalid


class UserError(Exception):
    """A mistake or a condition the user must act on: one line on stderr, an exit code.

    The CLI turns every ``UserError`` into ``dispatcher: <message>`` and ``exit_code``,
    never a traceback. Subclasses set ``exit_code`` (2: usage, input or config mistake).
    """

    exit_code: int = 2


class Delivery(enum.StrEnum):
    """What became of a record, as its envelope tells it."""

    CONFIRMED = "confirmed"  # the API answered with a success envelope
    REJECTED = "rejected"  # the API answered with an error and no attempt is in doubt
    NOT_SENT = "not_sent"  # no request can have arrived: invalid input, or never written
    UNKNOWN = "unknown"  # some request may have arrived and none was confirmed


class ErrorKind(enum.StrEnum):
    """Our own error kinds; transport maps every aiohttp exception to one of these."""

    HTTP = "http"  # the server answered with a non-2xx status
    TIMEOUT = "timeout"  # the request left, no answer in time
    CONNECTION = "connection"  # the connection broke after the request left
    CONNECT = "connect"  # could not connect: the request never left
    PROTOCOL = "protocol"  # the request left; the answer could not be read as HTTP/1.x
    INVALID = "invalid"  # the input line was rejected before sending
    SKIPPED = "skipped"  # left out on purpose: the instance does not wait (--waiting-for)
    STOPPED = "stopped"  # the run stopped before this record got an answer
    RATE_LIMITED = "rate_limited"  # gave up on 429s (Retry-After longer than allowed)


@_value
class RateLimitInfo:
    """What the ``Ratelimit`` / ``Ratelimit-Policy`` headers said, when present."""

    remaining: int | None = None  # r=
    reset: float | None = None  # t= seconds until the window resets
    quota: int | None = None  # q=
    window: float | None = None  # w= seconds


@_value
class Outcome:
    """The result of one attempt at sending one event, as transport reports it.

    ``status`` is ``None`` when no HTTP answer came back; then ``error_kind`` says why and
    ``sent`` says whether the request may have reached the server. ``in_doubt`` marks a
    2xx answer that is not the API's envelope (an HTML page, an empty body, a 204): not a
    confirmation, and not a refusal either, since whoever answered may have taken it.
    ``stop_run`` is set when the answer shows that the run's own configuration cannot
    work (the relay's MAX_BATCH below ``--batch-size``): the run stops with that reason,
    and the record is left for ``--resume`` instead of ending here.
    """

    status: int | None
    ok: bool
    sent: bool
    latency_s: float
    error_kind: ErrorKind | None = None
    cf_code: int | None = None
    message: str | None = None
    retry_after: float | None = None
    ratelimit: RateLimitInfo | None = None
    in_doubt: bool = False
    stop_run: str | None = None


@_value
class EnvelopeError:
    """Why a record did not end confirmed: our kind, Cloudflare's code when it sent one."""

    kind: ErrorKind
    code: int | None
    message: str


@_value
class Envelope:
    """The one result written for one input record, after its final attempt.

    orjson serialises it directly (dataclass, enums and datetimes), field order as here.
    """

    key: str
    source: str
    line: int
    workflow: str | None
    instance_id: str | None
    event_type: str | None
    ok: bool
    status: int | None
    attempts: int
    delivery: Delivery
    error: EnvelopeError | None
    started_at: datetime | None
    finished_at: datetime
    latency_ms: float | None
    elapsed_ms: float
    waited_ms: float = 0.0
    """Time held at the rate gate (its pace and run-wide pauses); not in ``elapsed_ms``."""
    statuses: Mapping[str, int] = field(default_factory=dict)
    """Every attempt counted by HTTP status (``"503"``) or, with no answer, by error kind."""
