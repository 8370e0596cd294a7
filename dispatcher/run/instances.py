"""Instances as an input source: ``send --instances-of W [--status S] [--waiting-for T]``.

The list endpoint is read page by page (``per_page=100``, ``cursor`` from
``result_info.cursor``; wrangler dev's local explorer API has ``page`` instead), and each
page becomes a batch of records as soon as it arrives, so sending starts with the first
page. Every GET (a page, one instance's steps) passes the run's rate gate first, the same
one the sends pass: the account's REST budget is one budget. A 429 pauses the whole gate.

With ``--waiting-for TYPE`` each listed instance that has not ended is read
(``GET …/instances/{id}``) and sent to only when one of its steps is a ``waitForEvent``
of that type that has not finished: an instance parked in a wait lists as ``running``, so
the status alone cannot tell. The others become :class:`~dispatcher.model.Invalid`
records with a rule of :data:`~dispatcher.results.envelopes.SKIP_RULES`, whose envelopes
say ``skipped`` and why.

Keys: the key an id list gives the same instance and event type (content hash of
workflow, instance id, event type and body), so ``--resume`` skips what an earlier run
settled, and an instance already settled is not read again.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import anyio

from dispatcher.clients.answer import read_answer
from dispatcher.clients.base import Redactor, short
from dispatcher.clients.targets import WRANGLER_DEV_API_PATH, Target
from dispatcher.inputs.keys import KeyDeriver
from dispatcher.inputs.validation import RuleViolation, check_path
from dispatcher.model import Event, Invalid, Record, UserError
from dispatcher.results.verify import step_event_type
from dispatcher.run.settings import Rate, SendSettings
from dispatcher.sending.gate import Gate, RateGate
from dispatcher.sending.stats import RunStats

__all__ = [
    "ENDED",
    "PER_PAGE",
    "Cost",
    "InstanceReader",
    "ListingError",
    "Selection",
    "Verdict",
    "instance_records",
    "listed_batches",
    "reader_for",
    "select",
    "selection_of",
    "survey",
    "verdict",
]

PER_PAGE: Final = 100  # the list endpoint's maximum
ENDED: Final = frozenset({"complete", "errored", "terminated"})
READ_CONCURRENCY: Final = 8  # step reads in flight at once (the gate sets the pace)
_BACKOFF_S: Final = 0.5
_BACKOFF_MAX_S: Final = 8.0


class ListingError(UserError):
    """The list endpoint refused (unknown workflow, credentials): one line, exit 2."""

    exit_code = 2


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """Which instances: the list endpoint's own filter, then the steps' (optional)."""

    workflow: str
    status: str | None = None
    waiting_for: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """Whether to send to one instance; ``rule`` and ``reason`` say why not."""

    send: bool
    rule: str | None = None
    reason: str | None = None


def verdict(status: str, steps: list[Any] | None, waiting_for: str) -> Verdict:
    """Send only when an unfinished ``waitForEvent`` of ``waiting_for`` is among ``steps``
    (or an unfinished one that names no type: it may be waiting for ``waiting_for``)."""
    if status in ENDED:
        return Verdict(send=False, rule="ended", reason=f"the instance ended ({status})")
    others: list[str] = []
    finished = False
    for step in steps or []:
        if not isinstance(step, dict) or step.get("type") != "waitForEvent":
            continue
        kind = step_event_type(step)
        if kind is None and not step.get("finished"):
            # An unfinished wait that names no type (wrangler dev's explorer gives none)
            # may be the one: sent to, and verify says what came of it.
            return Verdict(send=True)
        if kind == waiting_for:
            if not step.get("finished"):
                return Verdict(send=True)
            finished = True
        elif not step.get("finished") and isinstance(kind, str):
            others.append(kind)
    if others:
        reason = f"waits for {', '.join(repr(o) for o in others)}, not {waiting_for!r}"
    elif finished:
        reason = f"its waitForEvent {waiting_for!r} has finished already"
    else:
        reason = f"no unfinished waitForEvent {waiting_for!r} (status {status})"
    return Verdict(send=False, rule="not_waiting", reason=reason)


class InstanceReader:
    """GETs against one target's list and get endpoints, each through ``gate``.

    ``max_attempts`` per request: a 429 pauses the gate for its ``Retry-After`` (at least
    1 s), a 5xx or a lost connection waits a doubling backoff; a 404 or another 4xx is
    final. Counts land in ``stats.list_requests`` and ``stats.read_requests``.
    """

    def __init__(
        self,
        *,
        target: Target,
        base_url: str,
        account_id: str | None,
        headers: Mapping[str, str],
        gate: Gate | None,
        stats: RunStats,
        timeout: float = 30.0,
        max_attempts: int = 5,
        sleep: Callable[[float], Any] = anyio.sleep,
    ) -> None:
        if target == "relay":
            raise ListingError(
                "--instances-of: the relay's Workflow binding cannot list instances; "
                "list through the API (dispatcher instances list --out ids.txt)"
            )
        base = base_url.rstrip("/")
        self._paged = target == "wrangler-dev"
        if self._paged:
            self._root = f"{base}{WRANGLER_DEV_API_PATH}"
        else:
            self._root = f"{base}/accounts/{quote(account_id or '', safe='')}"
        self._headers = dict(headers) if target == "api" else {}
        self._redact = Redactor(self._headers)  # a server may echo the token back
        self._gate = gate
        self._stats = stats
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> InstanceReader:
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=aiohttp.ClientTimeout(total=self._timeout)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _instances_url(self, workflow: str) -> str:
        return f"{self._root}/workflows/{quote(workflow, safe='')}/instances"

    async def _get(self, url: str, params: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
        """(status, envelope); status 0 when no answer came after every attempt."""
        assert self._session is not None, "use `async with InstanceReader(...)`"
        status, doc = 0, None
        for attempt in range(self._max_attempts):
            if self._gate is not None:
                await self._gate.acquire()
            retry_after: float | None = None
            try:
                async with self._session.get(url, params=params, allow_redirects=False) as resp:
                    answer = await read_answer(resp)
                status, doc, retry_after = answer.status, answer.doc, answer.retry_after
            except (aiohttp.ClientError, TimeoutError):
                status, doc = 0, None
            if status == 429:
                wait = max(1.0, retry_after or 1.0)
                if self._gate is not None:
                    self._gate.pause_for(wait)  # the account's budget, for every worker
                else:
                    await self._sleep(wait)
                continue
            if status == 0 or status >= 500:
                await self._sleep(min(_BACKOFF_MAX_S, _BACKOFF_S * 2**attempt))
                continue
            return status, doc
        return status, doc

    def _why(self, status: int, doc: dict[str, Any] | None) -> str:
        try:
            err = doc["errors"][0] if doc is not None else None
            if isinstance(err, dict):
                said = self._redact(str(err.get("message")))
                return f"HTTP {status}, code {err.get('code')}: {short(said)}"
        except (KeyError, IndexError, TypeError):
            pass
        return f"HTTP {status}" if status else "no answer"

    async def pages(
        self, workflow: str, status: str | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Each page's items, in the endpoint's order. Raises :class:`ListingError`.

        By cursor (``result_info.cursor``), or by page number for wrangler dev. An answer
        with no cursor whose ``total_count`` says more pages follow is read on by page
        number (the deprecated ``page``) rather than taken for the end.
        """
        url = self._instances_url(workflow)
        cursor: str | None = None
        by_page = self._paged
        page = 1
        while True:
            params = {"per_page": str(PER_PAGE)}
            if status is not None:
                params["status"] = status
            if by_page:
                params["page"] = str(page)
            elif cursor:
                params["cursor"] = cursor
            code, doc = await self._get(url, params)
            self._stats.list_requests += 1
            if not (200 <= code < 300 and doc is not None and doc.get("success") is True):
                if code == 404:
                    raise ListingError(
                        f"--instances-of: no workflow {workflow!r} here ({self._why(code, doc)})"
                    )
                raise ListingError(
                    f"--instances-of: listing {workflow!r} failed on page {page} "
                    f"({self._why(code, doc)})"
                )
            items = [item for item in doc.get("result") or [] if isinstance(item, dict)]
            self._stats.listed += len(items)
            yield items
            raw_info = doc.get("result_info")
            info: dict[str, Any] = raw_info if isinstance(raw_info, dict) else {}
            total = info.get("total_count")
            more = len(items) == PER_PAGE and (
                not isinstance(total, int) or page * PER_PAGE < total
            )
            next_cursor = info.get("cursor")
            if not by_page and isinstance(next_cursor, str) and next_cursor:
                cursor = next_cursor
            elif not more or (not by_page and not isinstance(total, int)):
                return  # the last page (by cursor: no cursor and no count saying otherwise)
            else:
                by_page = True
            page += 1

    async def steps(self, workflow: str, instance_id: str) -> tuple[str, Any] | Verdict:
        """(status, steps) of one instance, or the Verdict that skips it (gone, failed)."""
        url = f"{self._instances_url(workflow)}/{quote(instance_id, safe='')}"
        code, doc = await self._get(url, {})
        self._stats.read_requests += 1
        if 200 <= code < 300 and doc is not None and doc.get("success") is True:
            result = doc.get("result")
            if isinstance(result, dict):
                return str(result.get("status")), result.get("steps")
        if code == 404:
            why = f"the instance is gone ({self._why(code, doc)})"
            return Verdict(send=False, rule="not_found", reason=why)
        why = f"its steps could not be read ({self._why(code, doc)})"
        return Verdict(send=False, rule="read_failed", reason=why)


async def select(
    reader: InstanceReader,
    selection: Selection,
    needs_read: Callable[[str], bool] = lambda iid: True,
) -> AsyncGenerator[list[tuple[str, str, Verdict]], None]:
    """Per page: (instance id, listed status, verdict) of each instance not seen before.

    Without ``waiting_for`` every listed instance is sent to; with it, the steps of each
    one that has not ended (and ``needs_read``) are read, up to :data:`READ_CONCURRENCY`
    at once.
    """
    seen: set[str] = set()  # a cursor can repeat an instance when new ones arrive
    async for items in reader.pages(selection.workflow, selection.status):
        page: list[tuple[str, str]] = []
        for item in items:
            iid = item.get("id")
            if isinstance(iid, str) and iid not in seen:
                seen.add(iid)
                page.append((iid, str(item.get("status"))))
        yield await _judge(reader, selection, page, needs_read)


async def _judge(
    reader: InstanceReader,
    selection: Selection,
    page: list[tuple[str, str]],
    needs_read: Callable[[str], bool] = lambda iid: True,
) -> list[tuple[str, str, Verdict]]:
    wanted = selection.waiting_for
    verdicts: list[Verdict | None] = [None] * len(page)
    if wanted is None:
        return [(iid, status, Verdict(send=True)) for iid, status in page]
    limiter = anyio.CapacityLimiter(READ_CONCURRENCY)

    async def judge(n: int, iid: str, status: str) -> None:
        if status in ENDED:
            verdicts[n] = verdict(status, None, wanted)
            return
        if not needs_read(iid):
            verdicts[n] = Verdict(send=True)  # settled earlier: --resume skips it unread
            return
        async with limiter:
            read = await reader.steps(selection.workflow, iid)
        if isinstance(read, Verdict):
            verdicts[n] = read
        else:
            verdicts[n] = verdict(read[0], read[1] if isinstance(read[1], list) else None, wanted)

    async with anyio.create_task_group() as tg:
        for n, (iid, status) in enumerate(page):
            tg.start_soon(judge, n, iid, status)
    out: list[tuple[str, str, Verdict]] = []
    for (iid, status), v in zip(page, verdicts, strict=True):
        assert v is not None
        out.append((iid, status, v))
    return out


async def instance_records(
    reader: InstanceReader,
    selection: Selection,
    *,
    event_type: str,
    body: bytes | None,
    strict_ids: bool,
    keys: KeyDeriver,
    settled: Callable[[str], bool] = lambda key: False,
) -> AsyncGenerator[list[Record], None]:
    """One batch of records per page of the listing, for the engine.

    ``settled(key)`` tells of a record an earlier run settled (``--resume``): its
    instance is not read, and the record goes on for the resume filter to skip.
    """
    workflow = selection.workflow
    source = f"instances:{workflow}"
    line = 0

    cached: dict[str, str] = {}  # keys of this page's instances, each derived once

    def key(iid: str) -> str:
        if iid not in cached:
            cached[iid] = keys.key_for(None, workflow, iid, event_type, body)
        return cached[iid]

    def needs_read(iid: str) -> bool:
        return "\0" in iid or not settled(key(iid))

    def invalid(k: str, line: int, iid: str, rule: str, message: str) -> Invalid:
        return Invalid(
            key=k,
            source=source,
            line=line,
            rule=rule,
            message=message,
            workflow=workflow,
            instance_id=iid,
            event_type=event_type,
        )

    async for judged in select(reader, selection, needs_read):
        batch: list[Record] = []
        for iid, _status, v in judged:
            line += 1
            try:
                check_path(workflow, iid, event_type, strict_ids=strict_ids)
            except RuleViolation as exc:
                k = cached.pop(iid, "") or keys.key_for_raw(None, f"{workflow}\0{iid}".encode())
                batch.append(invalid(k, line, iid, exc.rule, f"instance {iid!r}: {exc.message}"))
                continue
            k = key(iid)
            if v.send:
                batch.append(
                    Event(
                        key=k,
                        source=source,
                        line=line,
                        workflow=workflow,
                        instance_id=iid,
                        event_type=event_type,
                        body=body,
                    )
                )
            else:
                assert v.rule is not None
                assert v.reason is not None
                batch.append(invalid(k, line, iid, v.rule, f"instance {iid!r} skipped: {v.reason}"))
        cached.clear()
        if batch:
            yield batch


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """What a selection costs, in requests and at a rate."""

    listed: int
    to_send: int
    skipped: dict[str, int]
    list_requests: int
    read_requests: int

    @property
    def requests(self) -> int:
        return self.list_requests + self.read_requests + self.to_send

    def seconds(self, per_second: float | None) -> float | None:
        return None if per_second is None else self.requests / per_second


def reader_for(settings: SendSettings, gate: Gate | None, stats: RunStats) -> InstanceReader:
    """The reader of a run's target, with its credentials, through ``gate``."""
    return InstanceReader(
        target=settings.target,
        base_url=settings.base_url,
        account_id=settings.account_id,
        headers=settings.credentials.headers() if settings.credentials is not None else {},
        gate=gate,
        stats=stats,
        timeout=settings.timeout,
        max_attempts=settings.max_attempts,
    )


def selection_of(settings: SendSettings) -> Selection:
    assert settings.instances_of is not None
    return Selection(
        workflow=settings.instances_of,
        status=settings.instance_status,
        waiting_for=settings.waiting_for,
    )


async def listed_batches(
    settings: SendSettings,
    gate: Gate | None,
    stats: RunStats,
    *,
    stop: Callable[[str], None],
    settled: Callable[[str], bool] = lambda key: False,
) -> AsyncGenerator[list[Record], None]:
    """The run's record batches from the listing (``send --instances-of``).

    A refusal of the first page raises :class:`ListingError` (nothing was sent); one of a
    later page stops the run with that reason (exit 3): ``--resume`` lists again and
    skips what this run settled.
    """
    assert settings.event_type is not None
    keys = KeyDeriver()
    try:
        async with reader_for(settings, gate, stats) as reader:
            records = instance_records(
                reader,
                selection_of(settings),
                event_type=settings.event_type,
                body=settings.body,
                strict_ids=settings.validate_ids,
                keys=keys,
                settled=settled,
            )
            try:
                async for batch in records:
                    yield batch
            except ListingError as exc:
                if stats.list_requests <= 1:
                    raise
                stop(f"{exc}; --resume lists again and sends the rest")
            finally:
                await records.aclose()
    finally:
        keys.close()


async def survey(
    settings: SendSettings,
    *,
    on_page: Callable[[list[tuple[str, str, Verdict]]], None] = lambda page: None,
    settled: Callable[[str], bool] | None = None,
) -> tuple[Cost, RunStats]:
    """Read the selection as a real run would (list pages, step reads) and send nothing.

    What ``send --dry-run`` and ``instances list`` do: the GETs go through a gate at the
    run's ``--rate``, so they spend what a real run's listing would. ``settled(key)``
    (``--dry-run --resume``) names the records earlier results confirmed: not read, and
    counted as skipped ``confirmed``, as the resumed run would.
    """
    stats = RunStats()
    rate = settings.rate
    gate = RateGate(rate.per_second if isinstance(rate, Rate) else None)
    to_send = 0
    skipped: dict[str, int] = {}
    keys = KeyDeriver()
    done: set[str] = set()
    event_type = settings.event_type or ""

    def needs_read(iid: str) -> bool:
        if settled is None or "\0" in iid:
            return True
        if settled(keys.key_for(None, selection.workflow, iid, event_type, settings.body)):
            done.add(iid)
            return False
        return True

    selection = selection_of(settings)
    try:
        async with reader_for(settings, gate, stats) as reader:
            async for page in select(reader, selection, needs_read):
                on_page(page)
                for iid, _status, v in page:
                    if iid in done:
                        skipped["confirmed"] = skipped.get("confirmed", 0) + 1
                    elif v.send:
                        to_send += 1
                    else:
                        assert v.rule is not None
                        skipped[v.rule] = skipped.get(v.rule, 0) + 1
                done.clear()
    finally:
        keys.close()
    cost = Cost(
        listed=stats.listed,
        to_send=to_send,
        skipped=skipped,
        list_requests=stats.list_requests,
        read_requests=stats.read_requests,
    )
    return cost, stats
