"""What became of a confirmed event: one instance read, one class (pure functions, no I/O).

``confirmed`` means the API stored the event, not that the workflow used it. Reading the
instance (``GET …/instances/{id}``, with its ``steps[]``) tells which:

==============  ==========================================================================
class           when
==============  ==========================================================================
``consumed``    a ``waitForEvent`` step of the event's type finished at or after our send
``waiting``     a ``waitForEvent`` step of the event's type has not finished yet
``no_waiter``   no step waits for the type: the event sits unused (``pending`` when the
                instance still runs, so that it may yet reach such a wait)
``ended``       the instance is complete, errored or terminated and consumed nothing of
                ours (its end time says whether that was before our send)
``unknown``     the read failed: unknown instance (404), refused, no answer, no steps
``not_verified`` the record was never ``confirmed``, so there is nothing to read
==============  ==========================================================================

Users report that an instance parked in ``waitForEvent`` lists as ``running``, so the
class is read from the steps, never from ``status`` alone. A step without ``event_type``
(wrangler dev's local explorer gives none) is read by the ``type`` of the event its
``output`` holds once it finished; an unfinished one may wait for any type, so it counts
as ``waiting`` (``typed: false``), and one that finished after our send with no type
anywhere is ``unknown``, never ``consumed``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

__all__ = [
    "CLOCK_SKEW",
    "ENDED_STATUSES",
    "Verdict",
    "VerifyClass",
    "classify",
    "classify_failure",
    "read_verify_lines",
    "step_event_type",
]

ENDED_STATUSES: Final = frozenset({"complete", "errored", "terminated"})
# A step's times are the server's clock, our send's is ours (and cut to milliseconds
# there): a wait that ended this much before our send still counts as ours.
CLOCK_SKEW: Final = timedelta(seconds=2)


class VerifyClass(enum.StrEnum):
    CONSUMED = "consumed"
    WAITING = "waiting"
    NO_WAITER = "no_waiter"
    ENDED = "ended"
    UNKNOWN = "unknown"
    NOT_VERIFIED = "not_verified"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One record's class, why, and whether a later read may change it."""

    cls: VerifyClass
    reason: str
    status: str | None = None  # the instance's status as read
    step: str | None = None  # the matching waitForEvent step's name
    step_end: str | None = None
    typed: bool | None = None  # whether the step named its event_type
    pending: bool = False  # the instance runs on: re-read it under --wait-up-to


def _when(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def classify(result: Mapping[str, Any], event_type: str, sent_at: datetime) -> Verdict:
    """The class of an event of ``event_type`` sent at ``sent_at``, from the instance's
    GET ``result`` (the envelope's ``result`` object, with ``steps``)."""
    if sent_at.tzinfo is None:  # results written by hand or an old tool: UTC, as ours
        sent_at = sent_at.replace(tzinfo=UTC)
    status = result.get("status")
    status = status if isinstance(status, str) else None
    steps = result.get("steps")
    if not isinstance(steps, list):
        return Verdict(
            cls=VerifyClass.UNKNOWN, reason="the answer has no steps[] to read", status=status
        )
    waits = [
        s
        for s in steps
        if isinstance(s, dict)
        and s.get("type") == "waitForEvent"
        and step_event_type(s) in (None, event_type)
    ]
    since = sent_at - CLOCK_SKEW
    open_wait: dict[str, Any] | None = None
    last_done: dict[str, Any] | None = None
    for step in waits:
        end = _when(step.get("end"))
        if step.get("finished") is True or end is not None:
            # A wait that ended with an error (it timed out) consumed no event.
            if end is not None and end >= since and not step.get("error"):
                if step_event_type(step) is None:
                    # Neither the step nor its output names a type: it took *an* event
                    # after our send, maybe another type's. Never claimed as consumed.
                    return Verdict(
                        cls=VerifyClass.UNKNOWN,
                        reason=f"waitForEvent {step.get('name')!r} finished at "
                        f"{step.get('end')}, after our send, but names no event type: "
                        "whether it took ours cannot be told",
                        status=status,
                        step=_name(step),
                        step_end=step.get("end"),
                        typed=False,
                    )
                return Verdict(
                    cls=VerifyClass.CONSUMED,
                    reason=f"waitForEvent {step.get('name')!r} finished at {step.get('end')}",
                    status=status,
                    step=_name(step),
                    step_end=step.get("end"),
                    typed="event_type" in step,
                )
            last_done = step
        elif open_wait is None:
            open_wait = step
    ended = status in ENDED_STATUSES
    if ended:
        end_text = result.get("end")
        end = _when(end_text)
        when = "" if end is None else " before our send" if end <= sent_at else " after our send"
        return Verdict(
            cls=VerifyClass.ENDED,
            reason=f"the instance is {status} (ended {end_text}{when}) and consumed nothing "
            "of ours",
            status=status,
        )
    if open_wait is not None:
        return Verdict(
            cls=VerifyClass.WAITING,
            reason=f"waitForEvent {open_wait.get('name')!r} has not finished",
            status=status,
            step=_name(open_wait),
            typed="event_type" in open_wait,
            pending=True,
        )
    if last_done is not None:
        reason = (
            f"the wait for {event_type!r} finished at {last_done.get('end')}, before our send; "
            "no later step waits for it"
        )
    else:
        reason = f"no waitForEvent step waits for {event_type!r}"
    others = sorted(
        {
            str(s["event_type"])
            for s in steps
            if isinstance(s, dict)
            and s.get("type") == "waitForEvent"
            and isinstance(s.get("event_type"), str)
            and s["event_type"] != event_type
            and s.get("finished") is not True
        }
    )
    alive = status not in {"paused", "waitingForPause"} and status is not None
    if alive:
        reason += f" (yet: the instance is {status})"
    if others:  # most often a typo in --event-type: say what it does wait for
        reason += f"; it waits for {', '.join(repr(o) for o in others)}"
    return Verdict(
        cls=VerifyClass.NO_WAITER,
        reason=reason,
        status=status,
        pending=alive,
    )


def step_event_type(step: Mapping[str, Any]) -> str | None:
    """The event type of a ``waitForEvent`` step: its ``event_type``, else (once finished)
    the ``type`` of the event it returned, as wrangler dev's explorer gives only that;
    ``None`` when neither says (an unfinished wait there: it may wait for any type)."""
    kind = step.get("event_type")
    if isinstance(kind, str):
        return kind
    output = step.get("output")
    if isinstance(output, dict) and isinstance(output.get("type"), str):
        return str(output["type"])
    return None


def _name(step: Mapping[str, Any]) -> str | None:
    name = step.get("name")
    return name if isinstance(name, str) else None


def classify_failure(http_status: int, doc: Any, *, unknown_codes: frozenset[int]) -> Verdict:
    """The class of a read that got no instance back (``http_status`` 0: no answer)."""
    code: int | None = None
    message = ""
    try:
        err = doc["errors"][0]
        code = int(err["code"])
        message = str(err["message"])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    if http_status == 404 and (code in unknown_codes or code is None):
        said = f" code {code}" if code is not None else ""
        return Verdict(
            cls=VerifyClass.UNKNOWN,
            reason=f"unknown instance: the API answered 404{said} {message}".rstrip(),
        )
    if http_status == 0:
        return Verdict(cls=VerifyClass.UNKNOWN, reason="read failed: no answer")
    said = f": code {code} {message}" if code is not None else ""
    return Verdict(cls=VerifyClass.UNKNOWN, reason=f"read failed: HTTP {http_status}{said}")


def read_verify_lines(path: str) -> Iterator[dict[str, Any]]:
    """Every line of a ``dispatcher verify`` output file (the report's verify section).

    Raises :class:`ValueError` naming the file and line for a line that is not one.
    """
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not JSON") from None
            if not isinstance(obj, dict) or obj.get("class") not in set(VerifyClass):
                raise ValueError(f"{path}:{n}: not a dispatcher verify line")
            yield obj
