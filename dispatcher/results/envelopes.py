"""Turning a record's fate into its one envelope (pure functions, no I/O).

The truth rule lives here as data, :data:`TRUTH_TABLE`: what a record's attempts saw, taken
together, gives its envelope's ``ok``, ``delivery`` and ``error.kind``. ``docs/results.md``
shows the same table (a test checks the two are one), and the tests run its examples.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol

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


# An HTTP status as the envelopes and the summary count it ("200"), built once per run.
STATUS_TEXT: Final[dict[int, str]] = {code: str(code) for code in range(100, 600)}


class Seen(enum.StrEnum):
    """What one attempt saw, as the truth rule sorts it."""

    SUCCESS = "success"  # a 2xx whose complete body is an object with success: true
    IN_DOUBT = "in_doubt"  # a 2xx without that envelope: HTML, empty, [], 204, "false"...
    NO_ANSWER = "no_answer"  # the request left; no complete, readable answer came back
    ERROR = "error"  # a complete error answer: not 2xx (3xx included), or success: false
    NOT_CONNECTED = "not_connected"  # the request never left (could not connect)


def seen_of(outcome: Outcome) -> Seen:
    if outcome.ok:
        return Seen.SUCCESS
    if outcome.status is not None:
        return Seen.IN_DOUBT if outcome.in_doubt else Seen.ERROR
    return Seen.NO_ANSWER if outcome.sent else Seen.NOT_CONNECTED


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One row of the truth table; the first row whose ``matches`` holds gives the envelope."""

    seen: str  # the row as docs/results.md words it
    matches: Callable[[frozenset[Seen], bool], bool]  # (seen across attempts, stopped)
    ok: bool
    delivery: Delivery | None  # None: no envelope (the record is left for a later run)
    kind: str  # error.kind as docs/results.md words it
    resume: str  # what a later `--resume` does with it
    examples: tuple[tuple[tuple[Seen, ...], bool], ...]  # (attempts, stopped) for the tests


_MAY_HAVE_ARRIVED: Final = frozenset({Seen.IN_DOUBT, Seen.NO_ANSWER})

S, D, N, E, C = Seen.SUCCESS, Seen.IN_DOUBT, Seen.NO_ANSWER, Seen.ERROR, Seen.NOT_CONNECTED

TRUTH_TABLE: Final[tuple[Rule, ...]] = (
    Rule(
        seen="an answer with a success envelope (always the last attempt)",
        matches=lambda seen, stopped: S in seen,
        ok=True,
        delivery=Delivery.CONFIRMED,
        kind="null",
        resume="skips it",
        examples=(((S,), False), ((N, E, S), False), ((C, D, S), False)),
    ),
    Rule(
        seen="stopped before its first request left",
        matches=lambda seen, stopped: not seen,
        ok=False,
        delivery=None,
        kind="(no envelope)",
        resume="sends it",
        examples=(((), True),),
    ),
    Rule(
        seen="stopped before its last allowed attempt, and no attempt may have arrived "
        "(only error answers or never connected)",
        matches=lambda seen, stopped: stopped and not seen & _MAY_HAVE_ARRIVED,
        ok=False,
        delivery=None,  # rejected if any attempt got an error answer, else not_sent
        kind="`stopped`",
        resume="sends it",
        examples=(((E,), True), ((C, C), True), ((E, C), True)),
    ),
    Rule(
        seen="some attempt may have arrived: no answer after the request left (timeout, "
        "connection broke, unreadable answer), or a 2xx without a success envelope",
        matches=lambda seen, stopped: bool(seen & _MAY_HAVE_ARRIVED),
        ok=False,
        delivery=Delivery.UNKNOWN,
        kind="the last attempt's (`timeout`, `connection`, `protocol`, `http`...), "
        "`stopped` if the run stopped it",
        resume="skips it; `--resend-unknown` sends it",
        examples=(
            ((N,), False),
            ((N, E), False),
            ((N, C, C), False),
            ((D,), False),
            ((E, D), False),
            ((N, E), True),
            ((N,), True),
        ),
    ),
    Rule(
        seen="error answers (any status but 2xx, redirects included, or `success: false`), "
        "the other attempts never connected",
        matches=lambda seen, stopped: E in seen,
        ok=False,
        delivery=Delivery.REJECTED,
        kind="`http` (`rate_limited` when it gave up on 429s)",
        resume="skips it; `--retry-failed` sends it",
        examples=(((E,), False), ((C, E), False), ((E, C), False)),
    ),
    Rule(
        seen="never connected",
        matches=lambda seen, stopped: True,
        ok=False,
        delivery=Delivery.NOT_SENT,
        kind="`connect` (`invalid` for a line that was never valid)",
        resume="skips it; `--retry-failed` sends it",
        examples=(((C,), False), ((C, C, C), False)),
    ),
)


def rule_for(seen: frozenset[Seen], stopped: bool) -> Rule:
    for rule in TRUTH_TABLE:
        if rule.matches(seen, stopped):
            return rule
    raise AssertionError("the last rule matches everything")  # pragma: no cover


@functools.cache
def judge(seen: frozenset[Seen], stopped: bool) -> tuple[bool, Delivery | None]:
    """``(ok, delivery)`` for a record whose attempts saw ``seen``; delivery None: no envelope.

    Pure, over 64 possible arguments: cached, so a record pays a dict look-up, not a walk
    of the table's rules."""
    rule = rule_for(seen, stopped)
    if rule.delivery is None and seen:
        # Stopped, nothing in doubt: what the attempts proved.
        return False, Delivery.REJECTED if Seen.ERROR in seen else Delivery.NOT_SENT
    return rule.ok, rule.delivery


def render_table() -> str:
    """The truth table as docs/results.md shows it (a test compares the two)."""
    lines = [
        "| what the record's attempts saw (the first row that fits) | `ok` | `delivery` "
        "| `error.kind` | a later `--resume` |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rule in TRUTH_TABLE:
        if rule.delivery is not None:
            delivery = f"`{rule.delivery}`"
        elif rule.examples[0][0]:
            delivery = "`rejected` if an error answer came, else `not_sent`"
        else:
            delivery = "none yet"
        ok = "`true`" if rule.ok else "`false`"
        lines.append(f"| {rule.seen} | {ok} | {delivery} | {rule.kind} | {rule.resume} |")
    return "\n".join(lines)


class History:
    """A record's attempts so far: what the truth rule and the envelope need of them.

    ``t_first`` is the engine clock when the first request left; ``waited_s`` the time
    held at the rate gate; ``statuses`` counts every attempt by HTTP status or error kind.
    """

    __slots__ = (
        "attempts",
        "last",
        "seen",
        "started_at",
        "statuses",
        "t_first",
        "waited_before",
        "waited_s",
    )

    def __init__(self) -> None:
        self.attempts = 0
        self.last: Outcome | None = None
        self.seen: set[Seen] = set()
        self.statuses: dict[str, int] = {}
        self.started_at: datetime | None = None
        self.t_first = 0.0
        self.waited_s = 0.0
        self.waited_before = 0.0  # of waited_s, what came before the first request

    def leaving(self, now: datetime, clock: float) -> None:
        """An attempt's request is about to leave."""
        if self.attempts == 0:
            self.started_at = now
            self.t_first = clock
            self.waited_before = self.waited_s

    def add(self, outcome: Outcome) -> None:
        self.attempts += 1
        self.last = outcome
        self.seen.add(seen_of(outcome))
        status = outcome.status
        if status is not None:
            key = STATUS_TEXT.get(status) or str(status)
        else:
            key = str(outcome.error_kind or ErrorKind.HTTP)
        statuses = self.statuses
        statuses[key] = statuses.get(key, 0) + 1


def for_history(
    event: Event,
    history: History,
    *,
    finished_at: datetime,
    elapsed_s: float,
    stopped: str | None = None,
    in_flight: bool = False,
    gave_up: ErrorKind | None = None,
) -> Envelope | None:
    """The envelope the truth table gives a record's attempts; None if none had left.

    ``stopped`` (a message) when the run stopped the record before its last allowed
    attempt; ``in_flight`` when it was cut off with a request out (that attempt may have
    arrived and counts as ``stopped`` in ``statuses``). ``gave_up`` overrides the error
    kind when the policy, not the answer, ended the record (``rate_limited``).
    """
    seen = frozenset(history.seen)
    statuses = history.statuses
    attempts = history.attempts
    if in_flight:
        seen = seen | {Seen.NO_ANSWER}
        statuses = {**statuses, str(ErrorKind.STOPPED): statuses.get(ErrorKind.STOPPED, 0) + 1}
        attempts += 1
    ok, delivery = judge(seen, stopped is not None)
    if delivery is None:
        return None
    last = history.last
    error = None
    status = None
    latency_ms = None
    if last is not None and not in_flight:
        status = last.status
        latency_ms = round(last.latency_s * 1000.0, 3)
    if not ok:
        answered = last is not None and not in_flight
        if stopped is not None:
            said = last.message if last is not None and answered else None
            before = f" (last answer: {said})" if said else ""
            code = last.cf_code if last is not None and answered else None
            error = EnvelopeError(kind=ErrorKind.STOPPED, code=code, message=stopped + before)
        else:
            assert last is not None
            kind = gave_up or last.error_kind or ErrorKind.HTTP
            error = EnvelopeError(
                kind=kind, code=last.cf_code, message=last.message or "request failed"
            )
    return Envelope(
        key=event.key,
        source=event.source,
        line=event.line,
        workflow=event.workflow,
        instance_id=event.instance_id,
        event_type=event.event_type,
        ok=ok,
        status=status,
        attempts=attempts,
        delivery=delivery,
        error=error,
        started_at=history.started_at,
        finished_at=finished_at,
        latency_ms=latency_ms,
        elapsed_ms=round(elapsed_s * 1000.0, 3),
        waited_ms=round(history.waited_s * 1000.0, 3),
        statuses=statuses,
    )


def for_outcome(
    event: Event,
    outcome: Outcome,
    *,
    started_at: datetime,
    finished_at: datetime,
    elapsed_s: float,
) -> Envelope:
    """The envelope of a record sent exactly once (the load test's)."""
    history = History()
    history.started_at = started_at
    history.add(outcome)
    env = for_history(event, history, finished_at=finished_at, elapsed_s=elapsed_s)
    assert env is not None  # one attempt was made
    return env


# Rules of the records an instance listing leaves out on purpose (``send --waiting-for``):
# their envelopes say ``skipped``, not ``invalid`` (dispatcher.run.instances).
SKIP_RULES: Final = frozenset({"not_waiting", "ended", "not_found", "read_failed"})


def for_invalid(record: Invalid, now: datetime) -> Envelope:
    return _failed(
        record,
        delivery=Delivery.NOT_SENT,
        kind=ErrorKind.SKIPPED if record.rule in SKIP_RULES else ErrorKind.INVALID,
        # Names file, line and rule, so the message alone says what to fix where.
        message=f"{record.source}:{record.line}: [{record.rule}] {record.message}",
        attempts=0,
        finished_at=now,
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
        finished_at=now,
    )


def _failed(
    record: _Where,
    *,
    delivery: Delivery,
    kind: ErrorKind,
    message: str,
    attempts: int,
    finished_at: datetime,
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
        started_at=None,
        finished_at=finished_at,
        latency_ms=None,
        elapsed_ms=0.0,
        statuses={str(kind): attempts} if attempts else {},
    )
